"""A circuit: its components, measured faithfulness, the faithfulness curve against random
circuits, and its edges. `Circuit.to_json()` is what `tdb circuit --json` prints and what
`POST /api/circuit` answers (docs/circuits.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CurvePoint:
    """Faithfulness of the top-n circuit (components in the search's order) and the mean over
    random circuits of the same size."""

    n: int
    faithfulness: float
    random: float


@dataclass(frozen=True)
class Edge:
    """How much of the metric flows from `source`'s output into `target`'s input.

    `source`: a component id (`h0.4`, `n1.7`, `am1.42`) or "embed" (the token and position
    embeddings). `target`: a component id or "logits" (the final read-out). `input`: which input
    of the target: "q", "k" or "v" for a head, "mlp" for a neuron or latent, "logits".
    `score`: the estimate (edge attribution patching with the chosen method), `exact`: path
    patching (`source` patched as seen by that input alone), None unless verified."""

    source: str
    target: str
    input: str
    score: float
    exact: float | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "from": self.source,
            "to": self.target,
            "input": self.input,
            "score": self.score,
            "exact": self.exact,
        }


@dataclass(frozen=True)
class Circuit:
    metric_kind: str  # "logit_diff" or "logprob"
    clean: float  # mean metric on the clean prompts (= m(full))
    corrupted: float | None  # on the corrupted prompts, None without them
    m_empty: float  # every component patched from its reference
    m_circuit: float  # every component outside the circuit patched
    n_prompts: int
    ablation: str  # "corrupted", "zero" or "mean"
    method: str  # the estimator that ordered the search
    target_faithfulness: float
    components: tuple[str, ...]  # the circuit, by decreasing estimated score
    candidates: int  # how many components the search chose among
    curve: tuple[CurvePoint, ...]
    edges: tuple[Edge, ...]
    source: str = ""

    @property
    def faithfulness(self) -> float:
        """(m(circuit) - m(empty)) / (m(full) - m(empty)): measured, never estimated."""
        return faithfulness(self.m_circuit, self.clean, self.m_empty)

    def to_json(self) -> dict[str, object]:
        return {
            "metric": {"kind": self.metric_kind, "clean": self.clean, "corrupted": self.corrupted},
            "n_prompts": self.n_prompts,
            "ablation": self.ablation,
            "method": self.method,
            "target_faithfulness": self.target_faithfulness,
            "components": list(self.components),
            "faithfulness": self.faithfulness,
            "m_full": self.clean,
            "m_empty": self.m_empty,
            "m_circuit": self.m_circuit,
            "curve": [
                {"n": p.n, "faithfulness": p.faithfulness, "random": p.random} for p in self.curve
            ],
            "edges": [e.to_json() for e in self.edges],
        }


def faithfulness(m_circuit: float, m_full: float, m_empty: float) -> float:
    gap = m_full - m_empty
    return float("nan") if gap == 0 else (m_circuit - m_empty) / gap
