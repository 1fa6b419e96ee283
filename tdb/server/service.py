"""The model work behind each route: API requests in, response schemas out, through the same
`tdb.table.run_request` the CLI uses, on the same `NodeRequest` (no metric is computed here).

>>> node_table_response(load_model(), NodeTableRequest(prompt="...", target=" Mary",
...                     distractor=" John"), max_prompt_tokens=512)

>>> attribution_response(load_model(), AttributionRequest(task=TaskSpec(name="ioi", n=16)),
...                      max_prompt_tokens=512)

>>> circuit_response(load_model(), CircuitRequest(task=TaskSpec(name="ioi", n=8)),
...                  max_prompt_tokens=512)

These functions block (they run the model); the app calls them on its worker thread.
"""

from __future__ import annotations

from collections.abc import Sequence

from tdb.attribution import Dataset, attribution, task_records
from tdb.attribution.dataset import dataset_from_records
from tdb.checkpoint import LoadedModel
from tdb.circuit.graph import circuit_svg, curve_svg
from tdb.circuit.search import find_circuit
from tdb.errors import TdbError
from tdb.metrics import Group, is_signed
from tdb.nodes import ComponentIndex, NodeType, component_link, parse_target
from tdb.server.schemas import (
    AttributionRequest,
    AttributionResponse,
    CircuitRequest,
    CircuitResponse,
    NodeTableRequest,
    NodeTableResponse,
    PromptRequest,
    TokenizeResponse,
    TokenOut,
    ViewsRequest,
    ViewsResponse,
)
from tdb.table import NodeRequest, run_request, second_prompts
from tdb.table.batch import run_requests
from tdb.table.result import row_order


def tokenize(loaded: LoadedModel, text: str) -> TokenizeResponse:
    """How a text splits into tokens (for warnings such as "' Maryanne' is 4 tokens")."""
    tokenizer = loaded.tokenizer
    ids = tokenizer.encode(text) if text else []
    tokens = [TokenOut(id=i, text=tokenizer.token_text(i)) for i in ids]
    return TokenizeResponse(tokens=tokens, single_token=len(ids) == 1)


def prompt_tokens(
    loaded: LoadedModel,
    prompt: str | Sequence[int],
    max_prompt_tokens: int,
    what: str,
    bos: bool | None = None,
) -> list[int]:
    """The prompt's token ids (BOS as `bos` says, see `Tokenizer.prompt_ids`), within the
    model's context and this server's limit."""
    tokens = loaded.tokenizer.prompt_ids(prompt, loaded.model.config.n_ctx, what, bos)
    if len(tokens) > max_prompt_tokens:
        raise TdbError(
            f"{what} is {len(tokens)} tokens; this server takes at most {max_prompt_tokens} "
            "(shorten it, or restart with tdb serve --max-prompt-tokens N)"
        )
    return tokens


def node_request(
    loaded: LoadedModel, request: PromptRequest, max_prompt_tokens: int, **fields: object
) -> NodeRequest:
    """The `NodeRequest` an API request makes (the same type the CLI builds from argv), every
    prompt tokenized and checked against the server's limit (`run_request` checks the rest).
    `fields`: k, groups, views, ..."""

    def ids(prompt: str | Sequence[int] | None, what: str) -> list[int] | None:
        if prompt is None:
            return None
        return prompt_tokens(loaded, prompt, max_prompt_tokens, what, request.bos)

    compare, resample = second_prompts(
        ids(request.second_prompt, "the second prompt"),
        request.ablate,
        ids(request.compare_prompt, "the compare prompt"),
        ids(request.resample_prompt, "the resample prompt"),
    )
    return NodeRequest(
        prompt=prompt_tokens(loaded, request.prompt, max_prompt_tokens, "the prompt", request.bos),
        target=request.target,
        distractor=request.distractor,
        logprob=request.logprob,
        position=request.position,
        trace=request.trace,
        downstream=request.downstream,
        ablate=tuple(request.ablate),
        mean_prompts=tuple(ids(p, "a mean prompt") or [] for p in request.mean_prompts),
        mlp_nodes=request.mlp_nodes,
        attn_nodes=request.attn_nodes,
        compare_prompt=compare,
        resample_prompt=resample,
        compare_target=request.compare_target,
        compare_distractor=request.compare_distractor,
        **fields,  # type: ignore[arg-type]
    )


def table_request(
    loaded: LoadedModel, request: NodeTableRequest, max_prompt_tokens: int
) -> NodeRequest:
    """The `NodeRequest` of a node-table API request."""
    return node_request(
        loaded,
        request,
        max_prompt_tokens,
        k=request.k,
        groups=tuple(request.groups),
        verify=request.verify,
        views=request.views,
        view_nodes=tuple(request.view_nodes),
    )


def node_table_response(
    loaded: LoadedModel, request: NodeTableRequest, max_prompt_tokens: int
) -> NodeTableResponse:
    """The node table of a request (every node type, in top-k order: `select_rows` filters
    and sorts it for display, so the cached result serves every filter)."""
    table = run_request(loaded, table_request(loaded, request, max_prompt_tokens))
    return NodeTableResponse.model_validate(table.to_json())


def node_table_responses(
    loaded: LoadedModel, requests: Sequence[NodeTableRequest], max_prompt_tokens: int
) -> list[NodeTableResponse | TdbError]:
    """`node_table_response` of each request (or its TdbError), the requests that can share a
    capture run as one batch (`tdb.table.batch.run_requests`)."""
    results: list[NodeTableResponse | TdbError] = []
    todo: list[tuple[int, NodeRequest]] = []
    for request in requests:
        try:
            todo.append((len(results), table_request(loaded, request, max_prompt_tokens)))
            results.append(TdbError("not run"))  # replaced below
        except TdbError as e:
            results.append(e)
    tables = run_requests(loaded, [r for _, r in todo])
    for (index, _), table in zip(todo, tables, strict=True):
        results[index] = (
            table
            if isinstance(table, TdbError)
            else NodeTableResponse.model_validate(table.to_json())
        )
    return results


def select_rows(
    response: NodeTableResponse, node_types: Sequence[NodeType] | None, sort: Group | None
) -> NodeTableResponse:
    """The table with only the rows of `node_types`, ordered by `sort`: the same as asking for
    them in the request (`NodeTable.select`). The top k is taken per node type, so other types
    never change a type's rows."""
    if node_types is None and sort is None:
        return response
    nodes = response.nodes
    values = None if sort is None else [n.values.get(sort.value) for n in nodes]
    order = row_order(
        [n.node_type for n in nodes], values, node_types, sort is not None and is_signed(sort)
    )
    return response.model_copy(update={"nodes": [nodes[i] for i in order]})


def views_response(
    loaded: LoadedModel, request: ViewsRequest, max_prompt_tokens: int
) -> ViewsResponse:
    """Token views: next-token logits (target and distractor pinned), per-token act × grad sums,
    and each requested node's promoted and suppressed tokens."""
    # k=0: the table's rows are not needed, only the capture behind them.
    fields = {"k": 0, "views": True, "view_nodes": tuple(request.view_nodes)}
    doc = run_request(loaded, node_request(loaded, request, max_prompt_tokens, **fields)).to_json()
    views = doc["token_views"]
    assert isinstance(views, dict)
    return ViewsResponse.model_validate(
        {"tokens": doc["tokens"], "direction": doc["direction"]} | views
    )


def attribution_dataset(
    loaded: LoadedModel, request: AttributionRequest | CircuitRequest, max_prompt_tokens: int
) -> Dataset:
    """The request's prompt pairs: its records, or the built-in task's; each prompt within the
    server's limit."""
    if request.dataset is not None and request.task is not None:
        raise TdbError("give dataset or task, not both")
    if request.dataset is None and request.task is None:
        raise TdbError("give dataset (a list of records) or task ({name, n, seed})")
    if request.task is not None:
        task = request.task
        records = task_records(task.name, task.n, task.seed, loaded.tokenizer)
        source = f"task {task.name.value}"
    else:
        assert request.dataset is not None
        # exclude_unset: a record is passed on as it was sent (explicit nulls mean absent).
        records = [r.model_dump(exclude_unset=True) for r in request.dataset]
        source = "dataset"
    data = dataset_from_records(records, loaded.tokenizer, loaded.model.config.n_ctx, source)
    for pair in data.pairs:
        if len(pair.tokens) > max_prompt_tokens:
            raise TdbError(
                f"{source} line {pair.line}: the prompt is {len(pair.tokens)} tokens; this "
                f"server takes at most {max_prompt_tokens} (shorten it, or raise the "
                "server's max_prompt_tokens)"
            )
    return data


def attribution_response(
    loaded: LoadedModel, request: AttributionRequest, max_prompt_tokens: int
) -> AttributionResponse:
    """Task-level attribution (`tdb.attribution.attribution`) as `Attribution.to_json()`, each
    row with the link to its component page that the node table's rows have."""
    result = attribution(
        loaded,
        attribution_dataset(loaded, request, max_prompt_tokens),
        methods=[m.value for m in request.methods],
        ablation=None if request.ablation is None else request.ablation.value,
        components=[c.value for c in request.components],
        by=request.by.value,
        verify=request.verify,
        k=request.k,
        logprob=request.logprob,
        ig_steps=request.ig_steps,
    )
    response = AttributionResponse.model_validate(result.to_json())
    for out, row in zip(response.components, result.rows, strict=True):
        out.component = component_link(row.component.at(0))
    return response


def circuit_response(
    loaded: LoadedModel, request: CircuitRequest, max_prompt_tokens: int
) -> CircuitResponse:
    """A circuit (`tdb.circuit.find_circuit`) as `Circuit.to_json()`, with its graph and its
    faithfulness curve as SVG (`tdb.circuit.graph`) and each component's page."""
    circuit = find_circuit(
        loaded,
        attribution_dataset(loaded, request, max_prompt_tokens),
        method=request.method.value,
        ablation=None if request.ablation is None else request.ablation.value,
        components=[c.value for c in request.components],
        max_components=request.max_components,
        target_faithfulness=request.target_faithfulness,
        max_edges=request.max_edges,
        verify=request.verify,
        logprob=request.logprob,
        ig_steps=request.ig_steps,
        random_draws=5,
        seed=0,
    )
    links = {}
    for cid in circuit.components:
        component = parse_target(cid)
        assert isinstance(component, ComponentIndex)
        links[cid] = component_link(component.at(0))
    return CircuitResponse.model_validate(
        circuit.to_json()
        | {
            "links": links,
            "svg": circuit_svg(circuit, loaded.model.config.n_layer),
            "curve_svg": curve_svg(circuit),
        }
    )
