"""What a running server holds: the model (loaded once), its limits, the worker and the cache.

Routes reach it through the `get_state` dependency; nothing here is global.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from tdb.checkpoint import LoadedModel
from tdb.errors import TdbError
from tdb.server.cache import ResultCache, cache_key
from tdb.server.schemas import AttributionRequest, CircuitRequest, NodeTableRequest, ViewsRequest
from tdb.server.service import (
    attribution_response,
    circuit_response,
    node_table_response,
    node_table_responses,
    views_response,
)
from tdb.server.worker import ModelWorker


@dataclass(frozen=True)
class ServerState:
    loaded: LoadedModel
    max_prompt_tokens: int
    worker: ModelWorker
    cache: ResultCache

    async def node_table(self, request: NodeTableRequest) -> tuple[bytes, bool]:
        """The table's JSON (before the display-only node type filter and sort), and whether it was
        cached. The key is the whole request but those: the model is fixed per server."""
        key = cache_key("nodes", request.model_dump_json(exclude={"node_types", "sort"}))

        def job() -> bytes:
            response = node_table_response(self.loaded, request, self.max_prompt_tokens)
            return response.model_dump_json().encode()

        async def compute() -> bytes:
            return await self.worker.run(job)

        return await self.cache.get_or_compute(key, compute)

    async def node_tables(
        self, requests: Sequence[NodeTableRequest]
    ) -> list[tuple[bytes, bool] | TdbError]:
        """`node_table` of each request, the uncached ones computed in one job on the worker,
        in batches where they can share a capture (`node_table_responses`)."""
        keys = [
            cache_key("nodes", r.model_dump_json(exclude={"node_types", "sort"})) for r in requests
        ]
        results: list[tuple[bytes, bool] | TdbError | None] = []
        for key in keys:
            cached = self.cache.get(key)
            results.append(None if cached is None else (cached, True))
        todo = [i for i, r in enumerate(results) if r is None]

        def job() -> list[bytes | TdbError]:
            answers = node_table_responses(
                self.loaded, [requests[i] for i in todo], self.max_prompt_tokens
            )
            return [a if isinstance(a, TdbError) else a.model_dump_json().encode() for a in answers]

        if todo:
            for i, answer in zip(todo, await self.worker.run(job), strict=True):
                if isinstance(answer, TdbError):
                    results[i] = answer
                else:
                    self.cache.put(keys[i], answer)
                    results[i] = (answer, False)
        return [r for r in results if r is not None]

    async def views(self, request: ViewsRequest) -> tuple[bytes, bool]:
        """The token views' JSON, and whether it was cached."""
        key = cache_key("views", request.model_dump_json())

        def job() -> bytes:
            response = views_response(self.loaded, request, self.max_prompt_tokens)
            return response.model_dump_json().encode()

        async def compute() -> bytes:
            return await self.worker.run(job)

        return await self.cache.get_or_compute(key, compute)

    async def attribution(self, request: AttributionRequest) -> tuple[bytes, bool]:
        """The task-level attribution's JSON, and whether it was cached."""
        key = cache_key("attribute", request.model_dump_json())

        def job() -> bytes:
            response = attribution_response(self.loaded, request, self.max_prompt_tokens)
            return response.model_dump_json().encode()

        async def compute() -> bytes:
            return await self.worker.run(job)

        return await self.cache.get_or_compute(key, compute)

    async def circuit(self, request: CircuitRequest) -> tuple[bytes, bool]:
        """The circuit's JSON (with its SVGs), and whether it was cached. The search is
        deterministic (its random circuits are seeded), so the whole request is the key."""
        key = cache_key("circuit", request.model_dump_json())

        def job() -> bytes:
            response = circuit_response(self.loaded, request, self.max_prompt_tokens)
            return response.model_dump_json(by_alias=True).encode()  # edges' `from` and `to`

        async def compute() -> bytes:
            return await self.worker.run(job)

        return await self.cache.get_or_compute(key, compute)


def get_state(request: Request) -> ServerState:
    state = request.app.state.tdb
    assert isinstance(state, ServerState)
    return state


State = Annotated[ServerState, Depends(get_state)]
