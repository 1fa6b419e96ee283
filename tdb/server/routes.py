"""The API routes: model info, tokenize, node table, token views, a batch of those,
task-level attribution and circuits over a dataset (with the built-in tasks' names).

Every route has a response model; errors are JSON `{"error": "..."}` with a 4xx status (see
`tdb.server.app` for the mapping), 503 with Retry-After when the model worker's queue is full.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response

from tdb.attribution import Task
from tdb.errors import TdbError
from tdb.investigation import tdb_version
from tdb.metrics import ALL_GROUPS
from tdb.nodes import LatentSite, NodeType
from tdb.server.schemas import (
    MAX_K,
    MAX_RECORDS,
    MAX_TASK_N,
    AttributionRequest,
    AttributionResponse,
    BatchRequest,
    BatchResponse,
    BatchResult,
    CircuitRequest,
    CircuitResponse,
    ErrorResponse,
    ModelInfo,
    NodesItem,
    NodeTableRequest,
    NodeTableResponse,
    TasksResponse,
    TokenizeItem,
    TokenizeRequest,
    TokenizeResponse,
    ViewsItem,
    ViewsRequest,
    ViewsResponse,
)
from tdb.server.service import select_rows, tokenize
from tdb.server.state import State
from tdb.server.worker import QueueFullError

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "bad input: the message says what to change"},
    413: {"model": ErrorResponse, "description": "the request body is over 4 MiB"},
    422: {"model": ErrorResponse, "description": "the request does not match the schema"},
    503: {"model": ErrorResponse, "description": "the model is busy: retry after Retry-After s"},
}

router = APIRouter(prefix="/api", responses=ERRORS)


def json_response(body: bytes, cached: bool) -> Response:
    return Response(
        body, media_type="application/json", headers={"X-Tdb-Cache": "hit" if cached else "miss"}
    )


@router.get("/model", response_model=ModelInfo)
async def model_info(state: State) -> ModelInfo:
    """The loaded model's shape and this server's limits."""
    config = state.loaded.model.config
    return ModelInfo(
        name=state.loaded.name,
        architecture=type(state.loaded.model).__name__,
        # Hashed once, off the event loop (a large model's weights take seconds).
        fingerprint=await asyncio.to_thread(lambda: state.loaded.fingerprint),
        tdb_version=tdb_version(),
        n_layer=config.n_layer,
        n_head=config.n_head,
        d_model=config.d_model,
        d_mlp=config.d_mlp,
        d_vocab=config.d_vocab,
        n_ctx=config.n_ctx,
        has_tokenizer=state.loaded.tokenizer.has_text,
        max_prompt_tokens=min(state.max_prompt_tokens, config.n_ctx),
        max_k=MAX_K,
        groups=list(ALL_GROUPS),
        node_types=[NodeType.EMBEDDING, NodeType.ATTENTION_HEAD, NodeType.MLP_NEURON],
        device=str(state.loaded.placement.device),
        dtype=str(state.loaded.model.unembed.dtype).removeprefix("torch."),
    )


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize_route(request: TokenizeRequest, state: State) -> TokenizeResponse:
    """How a text splits into tokens (cheap: answered on the event loop)."""
    return tokenize(state.loaded, request.text)


@router.post("/nodes", response_model=NodeTableResponse)
async def nodes_route(request: NodeTableRequest, state: State, http: Request) -> Response:
    """The node table: ranked nodes with every metric, under ablations, traces, two prompts."""
    body, cached = await state.node_table(request)
    if request.node_types is not None or request.sort is not None:
        table = NodeTableResponse.model_validate_json(body)
        body = select_rows(table, request.node_types, request.sort).model_dump_json().encode()
    return json_response(with_explanations(body, http), cached)


def with_explanations(body: bytes, http: Request) -> bytes:
    """The table's JSON with each row's `explanation` and `explanation_score`, when the server
    has a scan with explanations (`tdb.scan.routes.mount_scan`); else as it is (null)."""
    source = getattr(http.app.state, "explanations", None)
    found = None if source is None else source.current_or_none()
    if found is None:
        return body
    table = NodeTableResponse.model_validate_json(body)
    for row in table.nodes:
        site = None if row.site is None else LatentSite(row.site)
        e = None if row.layer is None else found.get(row.node_type, row.layer, row.index, site)
        row.explanation = None if e is None else e.explanation
        row.explanation_score = None if e is None else e.score
    return table.model_dump_json().encode()


@router.post("/views", response_model=ViewsResponse)
async def views_route(request: ViewsRequest, state: State) -> Response:
    """Token views: next-token logits, per-token effects, nodes' promoted/suppressed tokens."""
    body, cached = await state.views(request)
    return json_response(body, cached)


@router.post("/batch", response_model=BatchResponse)
async def batch_route(request: BatchRequest, state: State) -> BatchResponse:
    """Several requests in one call, answered in order; each has its own status and error.
    The node tables run first, in one job, in batches where they can share a capture."""
    node_items = [item for item in request.requests if isinstance(item, NodesItem)]
    tables: list[tuple[bytes, bool] | TdbError | QueueFullError] = []
    if node_items:
        try:
            tables += await state.node_tables([item.request for item in node_items])
        except QueueFullError as e:
            tables += [e] * len(node_items)
    next_table = iter(tables)
    results = []
    for item in request.requests:
        try:
            body: NodeTableResponse | ViewsResponse | TokenizeResponse
            if isinstance(item, TokenizeItem):
                body = tokenize(state.loaded, item.request.text)
            elif isinstance(item, ViewsItem):
                body = ViewsResponse.model_validate_json((await state.views(item.request))[0])
            else:
                answer = next(next_table)
                if isinstance(answer, TdbError | QueueFullError):
                    raise answer
                table = NodeTableResponse.model_validate_json(answer[0])
                body = select_rows(table, item.request.node_types, item.request.sort)
            results.append(BatchResult(status=200, body=body))
        except TdbError as e:
            results.append(BatchResult(status=400, error=ErrorResponse(error=str(e))))
        except QueueFullError as e:
            results.append(BatchResult(status=503, error=ErrorResponse(error=str(e))))
    return BatchResponse(responses=results)


@router.post("/attribute", response_model=AttributionResponse)
async def attribute_route(request: AttributionRequest, state: State) -> Response:
    """Task-level attribution: each component's score over a dataset of prompt pairs, by each
    method (`tdb.attribution.attribution`)."""
    body, cached = await state.attribution(request)
    return json_response(body, cached)


@router.post("/circuit", response_model=CircuitResponse)
async def circuit_route(request: CircuitRequest, state: State) -> Response:
    """A circuit over a dataset of prompt pairs: the smallest set of components whose measured
    faithfulness reaches the target, the curve against random circuits, the edges, and the
    graph and curve as SVG (`tdb.circuit.find_circuit`, `tdb.circuit.graph`)."""
    body, cached = await state.circuit(request)
    return json_response(body, cached)


@router.get("/tasks", response_model=TasksResponse)
async def tasks_route() -> TasksResponse:
    """The built-in tasks `POST /api/attribute` and `POST /api/circuit` take as `task`, and
    their size limits."""
    return TasksResponse(tasks=list(Task), max_n=MAX_TASK_N, max_records=MAX_RECORDS)
