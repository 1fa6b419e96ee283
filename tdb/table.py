"""The node table: the Python API that turns a prompt and a direction into ranked nodes.

loaded = load_model()                       # the demo model
table = node_table(loaded, "When Mary and John went to the store, John gave a drink to",
                   target=" Mary", distractor=" John", k=10)
table.to_json(); table.to_dataframe()
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tdb.ablation import Ablation, ablation_hooks, parse_ablation
from tdb.capture import Capture, capture
from tdb.checkpoint import LoadedModel
from tdb.direction import (
    AttentionLogit,
    Direction,
    HeadValueWrite,
    LatentPreActivation,
    LogitDiff,
    LogProb,
    NeuronPreActivation,
    ResidualDirection,
)
from tdb.errors import TdbError
from tdb.hooks import NO_HOOKS, HookPoint, Hooks, compose
from tdb.latents import check_saes, latent_sizes, resolve_saes
from tdb.metrics import ALL_GROUPS, Group
from tdb.models.base import TransformerModel
from tdb.nodes import NodeIndex, NodeType, check_node, parse_node_id
from tdb.sae import AttachedSae
from tdb.store import ScalarStore
from tdb.token_views import effect_by_token, logit_view, node_view
from tdb.tokens import Tokenizer
from tdb.topk import TopKResult, multi_group_topk
from tdb.verify import correlation, verify_nodes

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class NodeTable:
    """Ranked nodes with every metric's value; one row per node, one column per group."""

    tokens: list[int]
    token_texts: list[str]
    direction: Direction
    direction_value: float
    target_texts: list[str]
    distractor_texts: list[str]
    k: int
    groups: list[Group]
    nodes: list[NodeIndex]
    values: dict[Group, list[float]]
    columns: dict[str, list[float]] = field(default_factory=dict)  # e.g. "activation_baseline"
    direction_extra: dict[str, object] = field(default_factory=dict)  # e.g. "baseline_value"
    extra: dict[str, object] = field(default_factory=dict)  # e.g. "verification", "token_views"

    def node_name(self, node: NodeIndex) -> str:
        """A name a person reads: `L2 head 3 ' to'@7 <- ' Mary'@4`."""

        def tok(i: int) -> str:
            return f"{self.token_texts[i]!r}@{i}"

        if node.node_type is NodeType.EMBEDDING:
            return f"embedding {tok(node.token)}"
        if node.node_type is NodeType.ATTENTION_HEAD:
            keys = "all keys" if node.key_token is None else tok(node.key_token)
            return f"L{node.layer} head {node.index} {tok(node.token)} <- {keys}"
        if node.node_type is NodeType.MLP_NEURON:
            return f"L{node.layer} neuron {node.index} {tok(node.token)}"
        site = "" if node.site is None else f"{node.site.value} "
        return f"L{node.layer} {site}latent {node.index} {tok(node.token)}"

    def rows(self) -> list[dict[str, object]]:
        rows: list[dict[str, object]] = []
        for i, node in enumerate(self.nodes):
            row: dict[str, object] = {
                "id": node.id,
                "node_type": node.node_type.value,
                "layer": node.layer,
                "token": node.token,
            }
            if node.node_type is NodeType.ATTENTION_HEAD:
                row["key_token"] = node.key_token
            if node.site is not None:
                row["site"] = node.site.value  # which activation the latent's SAE reads
            row["index"] = node.index
            row["name"] = self.node_name(node)
            row |= {g.value: self.values[g][i] for g in self.groups}
            row |= {name: column[i] for name, column in self.columns.items()}
            rows.append(row)
        return rows

    def to_json(self) -> dict[str, object]:
        """The schema other tools rely on (see docs/node-table.md)."""
        return {
            "tokens": [
                {"id": t, "text": text}
                for t, text in zip(self.tokens, self.token_texts, strict=True)
            ],
            "direction": self.direction.to_json()
            | {
                "value": self.direction_value,
                "target_texts": self.target_texts,
                "distractor_texts": self.distractor_texts,
            }
            | self.direction_extra,
            "k": self.k,
            "groups": [g.value for g in self.groups],
            "nodes": self.rows(),
        } | self.extra

    def to_dataframe(self) -> pd.DataFrame:
        """One row per node: id, node_type, layer, token, key_token, index, name, metrics."""
        import pandas as pd  # imported here: the CLI's JSON path never pays for pandas

        columns = ["id", "node_type", "layer", "token", "key_token", "index", "name"]
        if any(node.site is not None for node in self.nodes):
            columns.insert(5, "site")
        columns += [g.value for g in self.groups] + list(self.columns)
        return pd.DataFrame(self.rows(), columns=columns)


TokenSpec = str | int
TRACE_MODES = ("q", "k", "qk", "v")


def only(cap: Capture, shown: set[NodeType]) -> Capture:
    """The capture with only the node types a table shows."""
    blocks = {t: b for t, b in cap.store.blocks.items() if t in shown}
    return replace(cap, store=ScalarStore(blocks))


def resolve_tokens(tokenizer: Tokenizer, prompt: str | Sequence[int], n_ctx: int) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise TdbError("the prompt is empty: give some text (or token ids)")
        tokens = tokenizer.encode(prompt)
    else:
        tokens = [tokenizer.check_id(int(t), "token id") for t in prompt]
    if not tokens:
        raise TdbError("the prompt has no tokens")
    if len(tokens) > n_ctx:
        raise TdbError(f"the prompt is {len(tokens)} tokens, longer than the model's {n_ctx}")
    return tokens


def resolve_token_list(
    tokenizer: Tokenizer, spec: TokenSpec | Sequence[TokenSpec] | None, what: str
) -> tuple[int, ...]:
    if spec is None:
        return ()
    specs = [spec] if isinstance(spec, str | int) else list(spec)
    return tuple(
        tokenizer.single_token(s, what) if isinstance(s, str) else tokenizer.check_id(s, what)
        for s in specs
    )


def load_vector(path: str | Path, d_model: int) -> Tensor:
    """A residual-stream direction from .pt/.pth (torch), .npy (numpy) or text (numbers)."""
    path = Path(path)
    if not path.is_file():
        raise TdbError(f"--vector: {path} is not a file")
    try:
        if path.suffix in {".pt", ".pth"}:
            vector = torch.load(path, map_location="cpu", weights_only=True)
        elif path.suffix == ".npy":
            import numpy as np

            vector = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            vector = torch.tensor([float(x) for x in path.read_text().replace(",", " ").split()])
    except (ValueError, RuntimeError, OSError) as e:
        raise TdbError(f"--vector: cannot read {path}: {e}") from None
    if not isinstance(vector, Tensor) or vector.shape != (d_model,):
        shape = tuple(vector.shape) if isinstance(vector, Tensor) else type(vector).__name__
        raise TdbError(f"--vector: {path} must hold {d_model} numbers (d_model), got {shape}")
    return vector.float()


def parse_trace(text: str) -> tuple[NodeIndex, str | None]:
    """`h1.2@9:3:q` -> (node, "q"); `n1.5@3` -> (node, None)."""
    head, _, mode = text.rpartition(":")
    if mode in TRACE_MODES and head:
        return parse_node_id(head), mode
    return parse_node_id(text), None


def trace_direction(
    model: TransformerModel,
    tokens: list[int],
    text: str,
    downstream: Direction | None,
    saes: Sequence[AttachedSae] = (),
) -> Direction:
    """The direction that makes a node's pre-activation the thing to explain."""
    node, mode = parse_trace(text)
    check_node(node, model.config, len(tokens), "--trace", latent_sizes(saes))
    assert node.layer is not None or node.node_type is NodeType.EMBEDDING
    if node.node_type is NodeType.AUTOENCODER_LATENT:
        if mode is not None:
            raise TdbError(f"--trace {text}: :{mode} applies to attention heads only")
        assert node.layer is not None and node.site is not None
        attached = check_saes(saes, model.config)[(node.site, node.layer)]
        reads = model.block(node.layer).mlp_input
        return LatentPreActivation(attached, node.token, node.index, reads)
    if node.node_type is NodeType.MLP_NEURON:
        if mode is not None:
            raise TdbError(f"--trace {text}: :{mode} applies to attention heads only")
        assert node.layer is not None
        reads = model.block(node.layer).mlp_input
        return NeuronPreActivation(node.layer, node.token, node.index, reads)
    if node.node_type is not NodeType.ATTENTION_HEAD or node.key_token is None:
        raise TdbError(
            f"--trace {text}: trace an MLP neuron (n<layer>.<neuron>@<token>), an SAE latent "
            "(a<a|p|m><layer>.<latent>@<token>) or an attention head at a (query, key) pair "
            "(h<layer>.<head>@<query>:<key>[:q|:k|:qk|:v])"
        )
    assert node.layer is not None
    if mode != "v":
        through = "qk" if mode is None else mode
        return AttentionLogit(node.layer, node.index, node.token, node.key_token, through)  # type: ignore[arg-type]
    if downstream is None:
        raise TdbError(f"--trace {text}: tracing through the value needs a downstream direction")
    prob, grad = value_trace_inputs(model, tokens, node, downstream)
    name = downstream.to_json().get("node", downstream.kind)
    return HeadValueWrite(node.layer, node.index, node.token, node.key_token, prob, grad, str(name))


def value_trace_inputs(
    model: TransformerModel, tokens: list[int], node: NodeIndex, downstream: Direction
) -> tuple[float, Tensor]:
    """The head's probability at (query, key), and d(downstream)/d(residual stream at the query
    right after the head's layer), from one forward and one backward pass."""
    assert node.layer is not None and node.key_token is not None
    layer = node.layer
    if downstream.read_point.upstream_layers(model.config.n_layer, True) <= layer:
        raise TdbError(f"--downstream must read the residual stream after layer {layer}")
    saved: dict[str, Tensor] = {}

    def keep(name: str, at_layer: int | None = None) -> Callable[[Tensor, int | None], None]:
        def hook(x: Tensor, hook_layer: int | None) -> None:
            if hook_layer == at_layer:
                saved[name] = x

        return hook

    def leaf(x: Tensor, _: int | None) -> Tensor:
        return x.detach().requires_grad_(True)

    hooks = Hooks(
        {
            HookPoint.RESID_EMBED: leaf,
            HookPoint.RESID_MID: keep("mid", layer),
            HookPoint.ATTN_PROBS: keep("probs", layer),
        }
    )
    point = downstream.read_point
    hooks = compose(hooks, Hooks({point.hook: keep("read", point.layer)}))
    with torch.enable_grad():
        model(torch.tensor([tokens]), hooks, logit_positions=torch.tensor([len(tokens) - 1]))
        value = downstream.read(model, saved["read"][0])
        (grad,) = torch.autograd.grad(value, saved["mid"])
    prob = float(saved["probs"][0, node.index, node.token, node.key_token].detach())
    return prob, grad[0, node.token].detach()


def make_direction(
    loaded: LoadedModel,
    tokens: list[int],
    target: TokenSpec | Sequence[TokenSpec] | None,
    distractor: TokenSpec | Sequence[TokenSpec] | None,
    position: int = -1,
    logprob: bool = False,
    vector: str | Path | None = None,
    trace: str | None = None,
    downstream: str | None = None,
    saes: Sequence[AttachedSae] = (),
) -> Direction:
    """The direction of interest a request names (see `node_table` for the arguments)."""
    model, tokenizer = loaded.model, loaded.tokenizer
    if not -len(tokens) <= position < len(tokens):
        raise TdbError(f"position {position} is outside the prompt's {len(tokens)} tokens")
    position %= len(tokens)
    targets = resolve_token_list(tokenizer, target, "target")
    distractors = resolve_token_list(tokenizer, distractor, "distractor")
    base: Direction
    if vector is not None:
        if targets or distractors or logprob:
            raise TdbError("--vector replaces --target/--distractor/--logprob: give only one")
        base = ResidualDirection(load_vector(vector, model.config.d_model), position, str(vector))
    elif logprob:
        if len(targets) != 1 or distractors:
            raise TdbError("--logprob explains log p(target): give one target and no distractor")
        base = LogProb(targets[0], position)
    else:
        if not targets or not distractors:
            raise TdbError(
                "give a target and a distractor (or --logprob with a target, or --vector FILE)"
            )
        base = LogitDiff(targets, distractors, position)
    if trace is None:
        if downstream is not None:
            raise TdbError("--downstream applies only with --trace ...:v")
        return base
    down = base if downstream is None else trace_direction(model, tokens, downstream, None, saes)
    return trace_direction(model, tokens, trace, down, saes)


def table_nodes(stores: Sequence[ScalarStore], groups: Sequence[Group], k: int) -> list[NodeIndex]:
    """The union (first-seen order) of the multi-group top-k of each store."""
    seen: dict[NodeIndex, None] = {}
    for store in stores:
        seen |= dict.fromkeys(multi_group_topk(store, groups, k).nodes)
    return list(seen)


def values_at(store: ScalarStore, groups: Sequence[Group], nodes: list[NodeIndex]) -> TopKResult:
    return TopKResult(nodes, {g: store.values_at(g, nodes) for g in groups})


def node_table(
    loaded: LoadedModel,
    prompt: str | Sequence[int],
    target: TokenSpec | Sequence[TokenSpec] | None = None,
    distractor: TokenSpec | Sequence[TokenSpec] | None = None,
    *,
    k: int = 10,
    position: int = -1,
    groups: Sequence[Group] = ALL_GROUPS,
    logprob: bool = False,
    vector: str | Path | None = None,
    trace: str | None = None,
    downstream: str | None = None,
    ablate: Sequence[str | Ablation] = (),
    second_prompt: str | Sequence[int] | None = None,
    mean_prompts: Sequence[str | Sequence[int]] = (),
    verify: int = 0,
    views: Sequence[str] | bool = False,
    saes: Sequence[AttachedSae | str | Path] = (),
    mlp_nodes: str = "neurons",
    attn_nodes: str = "heads",
) -> NodeTable:
    """Explain a direction (default logit(target) - logit(distractor) at the last token).

    >>> table = node_table(load_model(), "Paris, France. Ottawa,", " Canada", " France", k=5)
    >>> table.to_dataframe().head()

    - `target` / `distractor`: one or several tokens (text or ids); several are averaged.
    - `logprob=True`: explain log p(target) instead; `vector=FILE`: the final residual stream
      dotted with a vector. `position`: which token's prediction (default the last).
    - `trace="h1.2@9:3:q"` (or `:k`, `:qk`, `:v`; `"n1.5@3"` for a neuron): explain that node's
      pre-activation instead; `downstream` names the node whose gradient a `:v` trace uses.
    - `ablate=["n1.5@3:mean", "h0.1@4:2"]`: ablate nodes (`:zero` default, `:mean`, `:resample`)
      and show ablated, baseline and difference per metric.
    - `second_prompt`: the source of `:resample` ablations; without those, a second prompt of the
      same length shown side by side (left, right, right - left).
    - `verify=N`: zero-ablate the top N nodes by |act_times_grad| one at a time, next to the
      estimate. `views=True` (or node ids): token views.
    - `saes`: sparse autoencoders (loaded, or paths for `tdb.sae.load_saes`) attached inside
      the forward pass; their latents are nodes (`am1.42@5`). `mlp_nodes="latents"` /
      `attn_nodes="latents"` show latents instead of neurons / heads (`"both"`: next to them);
      the demo model brings its own SAEs. See `tdb.latents.resolve_saes` and docs/sae.md.
    """
    if k < 0:
        raise TdbError(f"k must be >= 0, got {k}")
    if verify < 0:
        raise TdbError(f"--verify must be >= 0, got {verify}")
    if not groups:
        raise TdbError(f"groups: give at least one of {', '.join(g.value for g in Group)}")
    groups = list(groups)
    model, tokenizer = loaded.model, loaded.tokenizer
    n_ctx = model.config.n_ctx
    tokens = resolve_tokens(tokenizer, prompt, n_ctx)
    attached, shown = resolve_saes(loaded, saes, mlp_nodes, attn_nodes)
    direction = make_direction(
        loaded, tokens, target, distractor, position, logprob, vector, trace, downstream, attached
    )
    ablations = [a if isinstance(a, Ablation) else parse_ablation(a) for a in ablate]
    second = None if second_prompt is None else resolve_tokens(tokenizer, second_prompt, n_ctx)
    means = [resolve_tokens(tokenizer, p, n_ctx) for p in mean_prompts]
    hooks = (
        ablation_hooks(model, tokens, ablations, second, means, attached) if ablations else NO_HOOKS
    )
    token_tensor = torch.tensor(tokens)
    columns: dict[str, list[float]] = {}
    direction_extra: dict[str, object] = {}
    extra: dict[str, object] = {}
    compare = second is not None and not any(a.kind == "resample" for a in ablations)
    dense = bool(ablations) or compare or bool(views)

    def run(tokens: Tensor, prune_k: int | None = None, hooks: Hooks = NO_HOOKS) -> Capture:
        return only(capture(model, tokens, direction, groups, prune_k, hooks, attached), shown)

    main = run(token_tensor, None if dense else max(k, verify), hooks)
    if ablations:
        baseline = run(token_tensor)
        result = values_at(main.store, groups, table_nodes([main.store], groups, k))
        before = values_at(baseline.store, groups, result.nodes)
        for g in groups:
            columns[f"{g.value}_baseline"] = before.values[g].tolist()
            columns[f"{g.value}_diff"] = (result.values[g] - before.values[g]).tolist()
        direction_extra["baseline_value"] = baseline.direction_value
    elif compare:
        assert second is not None
        if len(second) != len(tokens):
            raise TdbError(
                f"--second-prompt must have the same number of tokens as the prompt: "
                f"{len(second)} vs {len(tokens)}"
            )
        right = run(torch.tensor(second))
        nodes = table_nodes([main.store, right.store], groups, k)
        result = values_at(main.store, groups, nodes)
        other = values_at(right.store, groups, nodes)
        for g in groups:
            columns[f"{g.value}_right"] = other.values[g].tolist()
            columns[f"{g.value}_diff"] = (other.values[g] - result.values[g]).tolist()
        direction_extra["right_value"] = right.direction_value
        extra["right_tokens"] = [{"id": t, "text": tokenizer.token_text(t)} for t in second]
    else:
        result = multi_group_topk(main.store, groups, k)
    if verify:
        extra |= verification(model, tokens, direction, main.store, groups, verify, hooks, attached)
    if views:
        extra["token_views"] = token_views(loaded, tokens, direction, main, views, attached)
    return NodeTable(
        tokens=tokens,
        token_texts=[tokenizer.token_text(t) for t in tokens],
        direction=direction,
        direction_value=main.direction_value,
        target_texts=[
            tokenizer.token_text(t) for t in direction_token_ids(direction, "target_ids")
        ],
        distractor_texts=[
            tokenizer.token_text(t) for t in direction_token_ids(direction, "distractor_ids")
        ],
        k=k,
        groups=groups,
        nodes=result.nodes,
        values={g: result.values[g].tolist() for g in groups},
        columns=columns,
        direction_extra=direction_extra,
        extra=extra,
    )


def direction_token_ids(direction: Direction, field_name: str) -> list[int]:
    ids = direction.to_json().get(field_name, [])
    return [int(i) for i in ids] if isinstance(ids, list) else []


def verification(
    model: TransformerModel,
    tokens: list[int],
    direction: Direction,
    store: ScalarStore,
    groups: list[Group],
    n: int,
    hooks: Hooks,
    saes: Sequence[AttachedSae] = (),
) -> dict[str, object]:
    """The top n nodes by |act_times_grad|, each zero-ablated alone: estimate vs actual."""
    needed = {Group.ACT_TIMES_GRAD, Group.DIRECT_EFFECT}
    if not needed <= set(groups):
        raise TdbError("--verify needs the act_times_grad and direct_effect metrics")
    # Every node type's top n by magnitude is among its top n and bottom n, which the
    # multi-group top-k of act_times_grad holds (the store keeps at least n per layer).
    candidates = multi_group_topk(store, [Group.ACT_TIMES_GRAD, Group.DIRECT_EFFECT], n)
    estimates = candidates.values[Group.ACT_TIMES_GRAD]
    order = torch.argsort(estimates.abs().nan_to_num(-1.0), descending=True, stable=True)[:n]
    nodes = [candidates.nodes[int(i)] for i in order]
    checked = verify_nodes(
        model,
        tokens,
        direction,
        nodes,
        [float(estimates[i]) for i in order],
        [float(candidates.values[Group.DIRECT_EFFECT][i]) for i in order],
        hooks,
        saes,
    )
    return {
        "verification": [v.to_json() for v in checked],
        "verification_summary": {
            "correlation_estimated_actual": correlation(
                [v.estimated for v in checked], [v.actual for v in checked]
            ),
            "correlation_direct_actual": correlation(
                [v.direct for v in checked], [v.actual for v in checked]
            ),
            "sign_disagreements": [v.node.id for v in checked if v.sign_disagrees],
        },
    }


def token_views(
    loaded: LoadedModel,
    tokens: list[int],
    direction: Direction,
    main: Capture,
    views: Sequence[str] | bool,
    saes: Sequence[AttachedSae] = (),
) -> dict[str, object]:
    model, tokenizer = loaded.model, loaded.tokenizer
    pinned = direction_token_ids(direction, "target_ids") + direction_token_ids(
        direction, "distractor_ids"
    )
    node_ids = [] if isinstance(views, bool) else list(views)
    sizes = latent_sizes(saes)
    nodes = [
        check_node(parse_node_id(i), model.config, len(tokens), "view", sizes) for i in node_ids
    ]
    return {
        "logits": logit_view(main.logits, tokenizer, pinned),
        "effect_by_token": effect_by_token(main.store, len(tokens)),
        "nodes": [node_view(model, tokenizer, tokens, node, saes=saes) for node in nodes],
    }
