"""The one function that answers a node-table request, whichever front end built it.

    >>> table = node_table(load_model(), "When Mary and John went to the store, John gave a "
    ...                    "drink to", target=" Mary", distractor=" John", k=10)
    >>> table = run_request(loaded, NodeRequest(prompt, target=" Mary", distractor=" John"))
    >>> table.to_json(); table.to_dataframe()

One forward and one backward pass (the capture), then the multi-group top-k; ablations add a
baseline capture, a comparison a capture of the second prompt, `verify` one ablated forward pass
per verified node.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from fractions import Fraction

import torch
from torch import Tensor

from tdb.ablation import Ablation, AblationKind, ablation_hooks
from tdb.capture import Capture, capture
from tdb.checkpoint import LoadedModel
from tdb.direction import Direction
from tdb.direction.parse import make_direction
from tdb.errors import TdbError
from tdb.hooks import NO_HOOKS, Hooks
from tdb.latents import latent_sizes, resolve_saes
from tdb.metrics import Group, Metric
from tdb.models.base import TransformerModel
from tdb.nodes import NodeIndex, NodeType, check_node, parse_node_id
from tdb.sae import AttachedSae
from tdb.store import ScalarStore
from tdb.table.request import NodeRequest, Prompt, Tokens, second_prompts
from tdb.table.result import NodeTable, TokenViews, Verification
from tdb.token_views import effect_by_token, logit_view, node_view
from tdb.topk import TopKResult, multi_group_topk
from tdb.verify import correlation, verify_nodes


def only(cap: Capture, shown: set[NodeType]) -> Capture:
    """The capture with only the node types a table shows."""
    blocks = {t: b for t, b in cap.store.blocks.items() if t in shown}
    return replace(cap, store=ScalarStore(blocks))


def table_nodes(stores: Sequence[ScalarStore], groups: Sequence[Metric], k: int) -> list[NodeIndex]:
    """The union (first-seen order) of the multi-group top-k of each store."""
    seen: dict[NodeIndex, None] = {}
    for store in stores:
        seen |= dict.fromkeys(multi_group_topk(store, groups, k).nodes)
    return list(seen)


def values_at(store: ScalarStore, groups: Sequence[Metric], nodes: list[NodeIndex]) -> TopKResult:
    return TopKResult(nodes, {g: store.values_at(g, nodes) for g in groups})


def node_table(
    loaded: LoadedModel,
    prompt: Prompt,
    target: Tokens | None = None,
    distractor: Tokens | None = None,
    *,
    second_prompt: Prompt | None = None,
    **fields: object,
) -> NodeTable:
    """Explain a direction (default logit(target) - logit(distractor) at the last token).

    >>> table = node_table(load_model(), "Paris, France. Ottawa,", " Canada", " France", k=5)
    >>> table.to_dataframe().head()

    The keywords are `NodeRequest`'s fields (see there): `k`, `position`, `groups`, `logprob`,
    `vector`, `trace`, `downstream`, `ablate`, `resample_prompt`, `mean_prompts`,
    `compare_prompt`, `verify`, `views`, `view_nodes`, `saes`, `mlp_nodes`, `attn_nodes`,
    `node_types`, `sort`. `second_prompt` (older name) is the resample source when an ablation
    resamples, else the comparison prompt; `views=[ids]` (older form) means `view_nodes=[ids]`.
    """
    ablate = fields.get("ablate", ())
    assert isinstance(ablate, Sequence)
    compare, resample = second_prompts(
        second_prompt,
        ablate,
        fields.pop("compare_prompt", None),  # type: ignore[arg-type]
        fields.pop("resample_prompt", None),  # type: ignore[arg-type]
    )
    fields |= {"compare_prompt": compare, "resample_prompt": resample}
    views = fields.get("views")
    if isinstance(views, list | tuple):  # older form: the nodes whose views to show
        fields |= {"views": True, "view_nodes": tuple(views)}
    request = NodeRequest(prompt, target, distractor, **fields)  # type: ignore[arg-type]
    return run_request(loaded, request)


def run_request(
    loaded: LoadedModel, request: NodeRequest, captured: Capture | None = None
) -> NodeTable:
    """The node table a request asks for. See `NodeRequest` for what each field does.

    `captured`: the request's main capture, already run (by `tdb.table.batch.run_requests`, in
    a batch with other requests); the table is then built from it."""
    request = request.checked()
    model, tokenizer = loaded.model, loaded.tokenizer
    n_ctx = model.config.n_ctx
    tokens = tokenizer.prompt_ids(request.prompt, n_ctx, bos=request.bos)
    groups = list(request.groups)
    k = request.k
    attached, shown = resolve_saes(loaded, request.saes, request.mlp_nodes, request.attn_nodes)
    direction = request_direction(loaded, request, tokens, attached)
    ablations = list(request.ablations)
    resample = (
        None
        if request.resample_prompt is None
        else tokenizer.prompt_ids(
            request.resample_prompt, n_ctx, "the resample prompt", request.bos
        )
    )
    means = [
        tokenizer.prompt_ids(p, n_ctx, "a mean prompt", request.bos) for p in request.mean_prompts
    ]
    hooks = (
        ablation_hooks(model, tokens, ablations, resample, means, attached)
        if ablations
        else NO_HOOKS
    )
    compare = None
    if request.compare_prompt is not None:  # checked before any capture runs
        compare = tokenizer.prompt_ids(
            request.compare_prompt, n_ctx, "the compare prompt", request.bos
        )
        if len(compare) != len(tokens):
            raise TdbError(
                f"--compare-prompt must have the same number of tokens as the prompt: "
                f"{len(compare)} vs {len(tokens)}"
            )
    target_ids = direction_token_ids(direction, "target_ids")
    distractor_ids = direction_token_ids(direction, "distractor_ids")
    token_tensor = torch.tensor(tokens)

    def run(
        tokens: Tensor,
        prune_k: int | None = None,
        hooks: Hooks = NO_HOOKS,
        direction: Direction = direction,
    ) -> Capture:
        return only(capture(model, tokens, direction, groups, prune_k, hooks, attached), shown)

    main = (
        run(token_tensor, main_prune_k(request), hooks)
        if captured is None
        else only(captured, shown)
    )
    columns: dict[str, list[float]] = {}
    table_fields: dict[str, object] = {}
    warnings: list[str] = []
    if compare is not None:
        right_direction = direction
        if request.compare_target is not None or request.compare_distractor is not None:
            # The compared prompt's own answers: logit(its target) - logit(its distractor).
            right_direction = make_direction(
                loaded,
                compare,
                request.target if request.compare_target is None else request.compare_target,
                request.distractor
                if request.compare_distractor is None
                else request.compare_distractor,
                request.position,
                request.logprob,
            )
            table_fields |= {
                f"right_{name}_texts": [
                    tokenizer.token_text(t)
                    for t in direction_token_ids(right_direction, f"{name}_ids")
                ]
                for name in ("target", "distractor")
            }
        # With ablations, both prompts run under them (each its own hooks: mean ablations
        # average over each prompt's own reference, positions are the same).
        right_hooks = (
            ablation_hooks(model, compare, ablations, resample, means, attached)
            if ablations
            else NO_HOOKS
        )
        right = run(torch.tensor(compare), hooks=right_hooks, direction=right_direction)
        nodes = table_nodes([main.store, right.store], groups, k)
        result = values_at(main.store, groups, nodes)
        other = values_at(right.store, groups, nodes)
        for g in groups:
            columns[f"{g.value}_right"] = other.values[g].tolist()
            columns[f"{g.value}_diff"] = (other.values[g] - result.values[g]).tolist()
        table_fields |= {
            "right_value": right.direction_value,
            "right_tokens": compare,
            "right_token_texts": [tokenizer.token_text(t) for t in compare],
        }
        if ablations:  # the first prompt's value without them, and ablations that do nothing
            baseline = run(token_tensor)
            table_fields["baseline_value"] = baseline.direction_value
            warnings += inert_ablations(ablations, baseline.store)
    elif ablations:
        baseline = run(token_tensor)
        result = values_at(main.store, groups, table_nodes([main.store], groups, k))
        before = values_at(baseline.store, groups, result.nodes)
        for g in groups:
            columns[f"{g.value}_baseline"] = before.values[g].tolist()
            columns[f"{g.value}_diff"] = (result.values[g] - before.values[g]).tolist()
        table_fields["baseline_value"] = baseline.direction_value
        warnings += inert_ablations(ablations, baseline.store)
    else:
        result = multi_group_topk(main.store, groups, k)
    if request.verify:
        table_fields["verification"] = verification(
            model, tokens, direction, main.store, groups, request.verify, hooks, attached
        )
    if request.wants_views:
        table_fields["token_views"] = token_views(
            loaded,
            tokens,
            main,
            target_ids + distractor_ids,
            request.view_nodes,
            attached,
            roles=["target"] * len(target_ids) + ["distractor"] * len(distractor_ids),
        )
    table = NodeTable(
        tokens=tokens,
        token_texts=[tokenizer.token_text(t) for t in tokens],
        direction=direction,
        direction_value=main.direction_value,
        target_texts=[tokenizer.token_text(t) for t in target_ids],
        distractor_texts=[tokenizer.token_text(t) for t in distractor_ids],
        k=k,
        groups=groups,
        nodes=result.nodes,
        values={g: result.values[g].tolist() for g in groups},
        columns=columns,
        warnings=direction_warnings(target_ids, distractor_ids, tokenizer.token_text) + warnings,
        **table_fields,  # type: ignore[arg-type]
    )
    if request.node_types is None and request.sort is None:
        return table
    return table.select(request.node_types, request.sort)


def request_direction(
    loaded: LoadedModel, request: NodeRequest, tokens: list[int], saes: Sequence[AttachedSae]
) -> Direction:
    """The direction of interest the request names, on the prompt's `tokens`."""
    return make_direction(
        loaded,
        tokens,
        request.target,
        request.distractor,
        request.position,
        request.logprob,
        request.vector,
        request.trace,
        request.downstream,
        saes,
    )


def main_prune_k(request: NodeRequest) -> int | None:
    """The per-layer top k the main capture keeps (None: every node)."""
    return None if request.dense else max(request.k, request.verify)


def inert_ablations(ablations: Sequence[Ablation], store: ScalarStore) -> list[str]:
    """Zero-ablating a node whose activation is already 0 (an inactive SAE latent, a ReLU
    neuron, a head that does not attend there) changes nothing: say so, not silently."""
    nodes = [
        a.node for a in ablations if a.kind is AblationKind.ZERO and isinstance(a.node, NodeIndex)
    ]
    if not nodes or Group.ACTIVATION not in store.groups:
        return []
    values = store.values_at(Group.ACTIVATION, nodes).tolist()
    return [
        f"zero-ablating {node.id} changes nothing: its activation there is already 0"
        for node, value in zip(nodes, values, strict=True)
        if value == 0
    ]


def direction_warnings(
    target: list[int], distractor: list[int], token_text: Callable[[int], str]
) -> list[str]:
    """What makes a direction useless without an error: the target's tokens and the
    distractor's with the same mean (the same token, or the same tokens in another order) give
    logit(target) - logit(distractor) = 0, so every gradient is zero."""

    def mean_weights(ids: list[int]) -> dict[int, Fraction]:
        return {t: Fraction(n, len(ids)) for t, n in Counter(ids).items()}

    if target and distractor and mean_weights(target) == mean_weights(distractor):
        texts = ", ".join(repr(token_text(t)) for t in dict.fromkeys(target))
        return [
            f"the target and the distractor are the same ({texts}): the direction is zero, so "
            "act_times_grad is 0 for every node; give a different distractor"
        ]
    return []


def direction_token_ids(direction: Direction, field_name: str) -> list[int]:
    ids = direction.to_json().get(field_name, [])
    return [int(i) for i in ids] if isinstance(ids, list) else []


def verification(
    model: TransformerModel,
    tokens: list[int],
    direction: Direction,
    store: ScalarStore,
    groups: list[Metric],
    n: int,
    hooks: Hooks,
    saes: Sequence[AttachedSae] = (),
) -> Verification:
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
    return Verification(
        rows=checked,
        correlation_estimated_actual=correlation(
            [v.estimated for v in checked], [v.actual for v in checked]
        ),
        correlation_direct_actual=correlation(
            [v.direct for v in checked], [v.actual for v in checked]
        ),
    )


def token_views(
    loaded: LoadedModel,
    tokens: list[int],
    main: Capture,
    pinned: list[int],
    node_ids: Sequence[str],
    saes: Sequence[AttachedSae] = (),
    roles: Sequence[str] = (),
) -> TokenViews:
    """Next-token logits with the `pinned` tokens (target, distractor) ranked, per-token
    act x grad sums, and each node's promoted and suppressed tokens."""
    model, tokenizer = loaded.model, loaded.tokenizer
    sizes = latent_sizes(saes)
    nodes = [
        check_node(parse_node_id(i), model.config, len(tokens), "view", sizes) for i in node_ids
    ]
    return TokenViews(
        logits=logit_view(main.logits, tokenizer, pinned, roles=roles),
        effect_by_token=effect_by_token(main.store, len(tokens)),
        nodes=[node_view(model, tokenizer, tokens, node, saes=saes) for node in nodes],
    )
