"""The model work behind each route: API requests in, response schemas out, through the same
`tdb.table.node_table` the CLI uses (no metric is computed here).

>>> node_table_response(load_model(), NodeTableRequest(prompt="...", target=" Mary",
...                     distractor=" John"), max_prompt_tokens=512)

These functions block (they run the model); the app calls them on its worker thread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from tdb.checkpoint import LoadedModel
from tdb.errors import TdbError
from tdb.metrics import ALL_GROUPS, Group
from tdb.nodes import NodeIndex, NodeType
from tdb.server.schemas import (
    Direction,
    LogitView,
    NodeRow,
    NodeTableRequest,
    NodeTableResponse,
    NodeView,
    PromptRequest,
    TokenizeResponse,
    TokenOut,
    ViewsRequest,
    ViewsResponse,
)
from tdb.table import NodeTable, node_table, resolve_tokens

Json = object


def finite(value: Json) -> Json:
    """`value` with every NaN or infinite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def tokenize(loaded: LoadedModel, text: str) -> TokenizeResponse:
    """How a text splits into tokens (for warnings such as "' Maryanne' is 4 tokens")."""
    tokenizer = loaded.tokenizer
    ids = tokenizer.encode(text) if text else []
    tokens = [TokenOut(id=i, text=tokenizer.token_text(i)) for i in ids]
    return TokenizeResponse(tokens=tokens, single_token=len(ids) == 1)


def prompt_tokens(
    loaded: LoadedModel, prompt: str | Sequence[int], max_prompt_tokens: int, what: str
) -> list[int]:
    """The prompt's token ids, within the model's context and this server's limit."""
    tokens = resolve_tokens(loaded.tokenizer, prompt, loaded.model.config.n_ctx)
    if len(tokens) > max_prompt_tokens:
        raise TdbError(
            f"{what} is {len(tokens)} tokens; this server takes at most {max_prompt_tokens} "
            "(shorten it, or restart with tdb serve --max-prompt-tokens N)"
        )
    return tokens


def run_table(
    loaded: LoadedModel,
    request: PromptRequest,
    max_prompt_tokens: int,
    *,
    k: int,
    groups: Sequence[Group] = ALL_GROUPS,
    verify: int = 0,
    views: Sequence[str] | bool = False,
) -> NodeTable:
    """`node_table` on an API request, every prompt checked against the server's limit."""
    tokens = prompt_tokens(loaded, request.prompt, max_prompt_tokens, "the prompt")
    second = (
        None
        if request.second_prompt is None
        else prompt_tokens(loaded, request.second_prompt, max_prompt_tokens, "the second prompt")
    )
    means = [
        prompt_tokens(loaded, p, max_prompt_tokens, "a mean prompt") for p in request.mean_prompts
    ]
    if len(set(groups)) != len(groups):
        raise TdbError("groups: each metric may appear once")
    return node_table(
        loaded,
        tokens,
        request.target,
        request.distractor,
        k=k,
        position=request.position,
        logprob=request.logprob,
        trace=request.trace,
        downstream=request.downstream,
        ablate=request.ablate,
        second_prompt=second,
        mean_prompts=means,
        verify=verify,
        views=views,
        groups=groups,
        mlp_nodes=request.mlp_nodes,
        attn_nodes=request.attn_nodes,
    )


def component_link(node: NodeIndex) -> str | None:
    """Where the component's page lives (served by the corpus scan's router, when present)."""
    if node.node_type is NodeType.EMBEDDING:
        return None
    link = f"/component/{node.node_type.value}/{node.layer}/{node.index}"
    return link if node.site is None else f"{link}?site={node.site.value}"


def finite_float(value: float) -> float | None:
    return value if math.isfinite(value) else None


def node_rows(table: NodeTable) -> tuple[list[str], list[NodeRow]]:
    """The table's column names (metrics, then e.g. `_baseline`, `_diff`) and its rows."""
    columns = {g.value: table.values[g] for g in table.groups} | table.columns
    rows = [
        NodeRow(
            id=node.id,
            node_type=node.node_type,
            layer=node.layer,
            token=node.token,
            key_token=node.key_token,
            index=node.index,
            name=table.node_name(node),
            component=component_link(node),
            values={name: finite_float(values[i]) for name, values in columns.items()},
        )
        for i, node in enumerate(table.nodes)
    ]
    return list(columns), rows


def tokens_out(ids: Sequence[int], texts: Sequence[str]) -> list[TokenOut]:
    return [TokenOut(id=i, text=t) for i, t in zip(ids, texts, strict=True)]


def direction_out(table: NodeTable) -> Direction:
    direction = table.to_json()["direction"]
    return Direction.model_validate(finite(direction))


def node_table_response(
    loaded: LoadedModel, request: NodeTableRequest, max_prompt_tokens: int
) -> NodeTableResponse:
    """The node table of a request: rows with every column's value, and the direction's value."""
    table = run_table(
        loaded,
        request,
        max_prompt_tokens,
        k=request.k,
        groups=request.groups,
        verify=request.verify,
    )
    columns, rows = node_rows(table)
    extra = {
        k: table.extra.get(k) for k in ("right_tokens", "verification", "verification_summary")
    }
    return NodeTableResponse.model_validate(
        {
            "tokens": tokens_out(table.tokens, table.token_texts),
            "direction": direction_out(table),
            "k": table.k,
            "groups": table.groups,
            "columns": columns,
            "nodes": rows,
        }
        | extra
    )


def only_node_types(
    response: NodeTableResponse, node_types: Sequence[NodeType] | None
) -> NodeTableResponse:
    """The table with only the rows of `node_types`. The same as asking for those node types
    alone: the top k is taken per node type, so other types never change a type's rows."""
    if node_types is None:
        return response
    keep = set(node_types)
    nodes = [n for n in response.nodes if n.node_type in keep]
    return response.model_copy(update={"nodes": nodes})


def views_response(
    loaded: LoadedModel, request: ViewsRequest, max_prompt_tokens: int
) -> ViewsResponse:
    """Token views: next-token logits (target and distractor pinned), per-token act × grad sums,
    and each requested node's promoted and suppressed tokens."""
    # k=0: the table's rows are not needed, only the capture behind them.
    views: list[str] | bool = list(request.view_nodes) or True
    table = run_table(loaded, request, max_prompt_tokens, k=0, views=views)
    out = finite(table.extra["token_views"])
    assert isinstance(out, dict)
    return ViewsResponse(
        tokens=tokens_out(table.tokens, table.token_texts),
        direction=direction_out(table),
        logits=LogitView.model_validate(out["logits"]),
        effect_by_token=out["effect_by_token"],
        nodes=[NodeView.model_validate(v) for v in out["nodes"]],
    )
