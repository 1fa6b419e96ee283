"""The investigation a node table answers, as one typed request: every front end builds one.

    >>> request = NodeRequest("When Mary and John went to the store, John gave a drink to",
    ...                       target=" Mary", distractor=" John", k=10, ablate=("h0.1@13:4",))
    >>> table = run_request(load_model(), request)

The CLI parses argv into a `NodeRequest` (tdb.cli), the HTTP API validates JSON into one
(tdb.server.schemas), Python callers build one or pass the same names to `node_table`. Nothing
else turns user input into a table, so the three front ends cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import TypeVar

from tdb.ablation import Ablation, AblationKind, parse_ablation
from tdb.errors import TdbError
from tdb.metrics import ALL_GROUPS, METRIC_SPECS, Group, Metric
from tdb.nodes import NodeType
from tdb.sae import AttachedSae

Prompt = str | Sequence[int]  # text, or token ids
TokenSpec = str | int  # a token as text (one token) or as its id
Tokens = TokenSpec | Sequence[TokenSpec]  # one or several (several: their mean)

E = TypeVar("E", bound=Enum)
# Each verified node is one more forward pass: past a few hundred, `verify` would run for hours
# on a large table. (The server allows fewer: tdb.server.schemas.MAX_VERIFY.)
MAX_VERIFY = 200
MLP_NODE_CHOICES = ("neurons", "latents", "both")
ATTN_NODE_CHOICES = ("heads", "latents", "both")


@dataclass(frozen=True)
class NodeRequest:
    """One investigation: a prompt, a direction of interest, interventions, what to show.

    Direction (default logit(target) - logit(distractor) at `position`):
    - `target` / `distractor`: one or several tokens (text or ids); several are averaged.
    - `logprob=True`: log p(target) instead; `vector`: a file with a residual-stream direction.
    - `trace="h1.2@9:3:q"` (`:k`, `:qk`, `:v`; `"n1.5@3"`, `"am1.4@3"`): explain that node's
      pre-activation instead; `downstream`: the node whose gradient a `:v` trace uses.

    Interventions and comparisons:
    - `ablate`: node ids, optionally `:zero` (default), `:mean` or `:resample`; whole heads
      (`h2.1`), neurons (`n1.5`) and layers' outputs (`m1`, `a1`) too. The table then shows
      ablated, baseline and difference per metric.
    - `resample_prompt`: the source of `:resample` ablations (same token count).
    - `mean_prompts`: the reference prompts of `:mean` ablations (default: the prompt itself).
    - `compare_prompt`: a second prompt of the same token count, shown side by side (left,
      right, right - left). With `ablate`, both prompts run ablated (`baseline_value`: the
      first prompt's value without the ablations).
    - `compare_target` / `compare_distractor`: the compared prompt's own target and distractor
      (default: the first prompt's), so `direction.right_value` means the same on a prompt whose
      names differ.

    What to show:
    - `k`: nodes per metric and node type; `groups`: the metrics (columns).
    - `verify=N`: zero-ablate the top N nodes by |act_times_grad| one at a time.
    - `views=True`: token views (logits, per-token effects); `view_nodes`: nodes' token views.
    - `saes`: sparse autoencoders (loaded, or paths); `mlp_nodes` / `attn_nodes`: `"latents"`
      shows SAE latents instead of neurons / heads, `"both"` next to them.
    - `node_types`: only these rows; `sort`: rows ordered by this metric (signed metrics by
      magnitude), instead of the top-k's first-seen order.

    Tokens:
    - `bos`: start text prompts (all of them) with the BOS token; None (default): when the
      tokenizer adds one (Llama, Gemma; not GPT-2 or the demo). Token ids are taken as given.
    """

    prompt: Prompt
    target: Tokens | None = None
    distractor: Tokens | None = None
    logprob: bool = False
    vector: str | Path | None = None
    position: int = -1
    trace: str | None = None
    downstream: str | None = None
    ablate: Sequence[str | Ablation] = ()
    resample_prompt: Prompt | None = None
    mean_prompts: Sequence[Prompt] = ()
    compare_prompt: Prompt | None = None
    verify: int = 0
    # The compared prompt's own target / distractor (None: the first prompt's).
    compare_target: Tokens | None = None
    compare_distractor: Tokens | None = None
    views: bool = False
    view_nodes: Sequence[str] = ()
    saes: Sequence[AttachedSae | str | Path] = ()
    mlp_nodes: str = "neurons"
    attn_nodes: str = "heads"
    k: int = 10
    groups: Sequence[Metric] = ALL_GROUPS
    node_types: Sequence[NodeType] | None = None
    sort: Metric | None = None
    bos: bool | None = None
    # Parsed ablations, filled by `checked()` (callers give `ablate`).
    ablations: tuple[Ablation, ...] = field(default=(), repr=False, compare=False)

    def checked(self) -> NodeRequest:
        """The request with its simple fields validated and its ablations parsed; a TdbError
        naming the field otherwise. Needs no model (the run checks the rest)."""
        if self.k < 0:
            raise TdbError(f"-k must be >= 0, got {self.k}")
        if self.verify < 0:
            raise TdbError(f"--verify must be >= 0, got {self.verify}")
        if self.verify > MAX_VERIFY:
            raise TdbError(
                f"--verify must be at most {MAX_VERIFY} (each verified node is one more forward "
                f"pass), got {self.verify}"
            )
        groups = [g if g in METRIC_SPECS else member(Group, g, "--groups") for g in self.groups]
        if not groups:
            raise TdbError(f"--groups: give at least one of {', '.join(g.value for g in Group)}")
        if len(set(groups)) != len(groups):
            raise TdbError("--groups: each metric may appear once")
        if self.sort is not None and self.sort not in groups:
            raise TdbError(f"--sort {self.sort}: not among the metrics shown")
        if self.mlp_nodes not in MLP_NODE_CHOICES:
            raise TdbError(f"--mlp-nodes must be one of {', '.join(MLP_NODE_CHOICES)}")
        if self.attn_nodes not in ATTN_NODE_CHOICES:
            raise TdbError(f"--attn-nodes must be one of {', '.join(ATTN_NODE_CHOICES)}")
        ablations = tuple(a if isinstance(a, Ablation) else parse_ablation(a) for a in self.ablate)
        resamples = any(a.kind is AblationKind.RESAMPLE for a in ablations)
        if resamples and self.resample_prompt is None:
            raise TdbError("a :resample ablation needs a second prompt (--resample-prompt)")
        if self.resample_prompt is not None and not resamples:
            raise TdbError("--resample-prompt is the source of :resample ablations; none is given")
        own_answers = self.compare_target is not None or self.compare_distractor is not None
        if own_answers and self.compare_prompt is None:
            raise TdbError("--compare-target/--compare-distractor need --compare-prompt")
        if own_answers and (self.trace is not None or self.vector is not None):
            raise TdbError(
                "--compare-target/--compare-distractor name the compared prompt's answers; "
                "a trace or --vector explains the same direction on both prompts"
            )
        return replace(
            self,
            groups=tuple(groups),
            sort=None if self.sort is None else groups[groups.index(self.sort)],
            node_types=None
            if self.node_types is None
            else tuple(member(NodeType, t, "--node-types") for t in self.node_types),
            ablations=ablations,
        )

    @property
    def dense(self) -> bool:
        """Whether the capture must keep every node (ablations, comparisons and token views
        read values the pruned store does not hold)."""
        return bool(self.ablate) or self.compare_prompt is not None or self.wants_views

    @property
    def wants_views(self) -> bool:
        return self.views or bool(self.view_nodes)


def member(enum: type[E], value: object, what: str) -> E:
    """`enum(value)`, or a TdbError naming the field and what is allowed."""
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(str(m.value) for m in enum)
        raise TdbError(f"{what}: {value!r} is not one of {allowed}") from None


def second_prompts(
    second_prompt: Prompt | None,
    ablate: Sequence[str | Ablation],
    compare_prompt: Prompt | None = None,
    resample_prompt: Prompt | None = None,
) -> tuple[Prompt | None, Prompt | None]:
    """(compare_prompt, resample_prompt), with the old single `second_prompt` (CLI
    `--second-prompt`, HTTP `second_prompt`, kept for compatibility) resolved into one of them:
    the resample source when an ablation resamples, else the comparison. Every front end
    resolves it here.

    >>> compare, resample = second_prompts(other, ["h1.2@3:resample"])  # (None, other)
    """
    if second_prompt is None:
        return compare_prompt, resample_prompt
    if compare_prompt is not None or resample_prompt is not None:
        raise TdbError("give --second-prompt or --compare-prompt / --resample-prompt, not both")
    ablations = [a if isinstance(a, Ablation) else parse_ablation(a) for a in ablate]
    if any(a.kind is AblationKind.RESAMPLE for a in ablations):
        return None, second_prompt
    return second_prompt, None
