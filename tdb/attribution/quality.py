"""How well each estimator agrees with exact patching, on the demo model's built-in tasks: the
table in docs/attribution.md (tests/test_attribution_quality.py checks it is current).

    .venv/bin/python -m tdb.attribution.quality [--n 32] [--seed 0]

Per task and component kind: Pearson and Spearman correlation of each estimator with `exact`
over every component, and how many of the top 10 by |exact| are in the estimator's top 10.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from tdb.attribution.run import Attribution, attribution
from tdb.attribution.tasks import task_records
from tdb.checkpoint import LoadedModel, load_model

ESTIMATORS = ("atp", "atp*", "ig")
TASKS = ("ioi", "induction")
KINDS = {"attention_head": "heads", "mlp_neuron": "neurons"}


@dataclass(frozen=True)
class Agreement:
    task: str
    components: str  # "heads" or "neurons"
    method: str
    pearson: float
    spearman: float
    top10: int  # of exact's top 10 by |score|, how many are in the method's top 10


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().to(torch.float64)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def agreements(result: Attribution, task: str) -> list[Agreement]:
    """Each estimator against `exact`, per component kind, from one attribution result."""
    out = []
    for node_type, name in KINDS.items():
        rows = [r for r in result.rows if r.component.node_type.value == node_type]
        if not rows:
            continue
        exact = torch.tensor([r.scores["exact"] or 0.0 for r in rows], dtype=torch.float64)
        top = set(exact.abs().argsort(descending=True)[:10].tolist())
        for method in result.methods:
            if method == "exact":
                continue
            values = torch.tensor([r.scores[method] or 0.0 for r in rows], dtype=torch.float64)
            found = set(values.abs().argsort(descending=True)[:10].tolist())
            out.append(
                Agreement(
                    task,
                    name,
                    method,
                    _pearson(exact, values),
                    _pearson(_ranks(exact), _ranks(values)),
                    len(top & found),
                )
            )
    return out


def measure(loaded: LoadedModel, n: int = 32, seed: int = 0) -> list[Agreement]:
    """The agreement table on the built-in IOI and induction tasks (corrupted references)."""
    out = []
    for task in TASKS:
        records = task_records(task, n=n, seed=seed, tokenizer=loaded.tokenizer)
        result = attribution(loaded, records, methods=["exact", *ESTIMATORS])
        out += agreements(result, task)
    return out


def markdown(rows: list[Agreement]) -> str:
    lines = [
        "| task | components | method | Pearson r | Spearman ρ | top 10 found |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.task} | {r.components} | {r.method} | {r.pearson:.2f} | {r.spearman:.2f} "
            f"| {r.top10}/10 |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(markdown(measure(load_model(None), args.n, args.seed)))


if __name__ == "__main__":
    main()
