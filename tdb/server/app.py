"""The FastAPI app: the API routes, the web page at `/`, and the error mapping.

>>> app = create_app(load_model(), max_prompt_tokens=512)
>>> uvicorn.run(app, host="127.0.0.1", port=8000)      # what `tdb serve` does

Errors: bad input (`TdbError`) is 400, a request that does not match the schema (malformed JSON,
wrong types, out-of-range numbers) is 422, unknown routes 404, a body over 4 MiB 413, a full
model queue 503 with Retry-After; every one is JSON `{"error": "<what to change>"}`. A 500
means a bug in tdb.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from tdb.checkpoint import LoadedModel
from tdb.errors import TdbError
from tdb.server.cache import ResultCache
from tdb.server.routes import router
from tdb.server.state import ServerState
from tdb.server.worker import ModelWorker, QueueFullError

STATIC_DIR = Path(__file__).parent / "static"
MAX_BODY_BYTES = 4 << 20  # far above any request the schema allows, far below harm


def create_app(
    loaded: LoadedModel,
    *,
    max_prompt_tokens: int = 512,
    queue_size: int = 8,
    cache_size: int = 256,
    cache_bytes: int = 64 << 20,
    extra_routers: Sequence[APIRouter] = (),
) -> FastAPI:
    """The app for one loaded model.

    - `max_prompt_tokens`: longer prompts get a 400 (the model's context is a limit too).
    - `queue_size`: model jobs that may wait behind the running one before a 503.
    - `cache_size`, `cache_bytes`: the results cache's bounds (entries, bytes of JSON).
    - `extra_routers`: more routes on the same app (e.g. the corpus scan's component pages).
    """
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    worker = ModelWorker(queue_size)
    state = ServerState(loaded, max_prompt_tokens, worker, ResultCache(cache_size, cache_bytes))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        worker.close()

    app = FastAPI(
        title="tdb",
        summary="A transformer debugger: which components made the model say this, and how much",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.tdb = state
    app.include_router(router)
    for extra in extra_routers:
        app.include_router(extra)
    add_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    return app


class BodyLimit:
    """Answers 413 to a request whose Content-Length is over `max_bytes`, before reading it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"0")
            if not length.isdigit() or int(length) > self.max_bytes:
                message = f"the request body is over {self.max_bytes} bytes: send less"
                await error(413, message)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def error(status: int, message: str, **extra: object) -> JSONResponse:
    return JSONResponse({"error": message} | extra, status_code=status)


# tdb's messages name the CLI's flags; over HTTP the request's fields are what a person changes.
FLAG_FIELDS = {
    "--token-ids": "prompt",
    "--target-id": "target",
    "--distractor-id": "distractor",
    "--second-prompt": "second_prompt",
    "--compare-prompt": "compare_prompt",
    "--resample-prompt": "resample_prompt",
    "--mean-prompt": "mean_prompts",
    "--view-node": "view_nodes",
    "-k": "k",
}
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z-]*|-k)\b")


def api_names(message: str) -> str:
    """`--trace h9.0@3:1: layer 9 ...` -> `trace h9.0@3:1: layer 9 ...`."""
    return FLAG.sub(lambda m: FLAG_FIELDS.get(m.group(1), m.group(1).lstrip("-")), message)


def validation_message(errors: Sequence[dict[str, object]]) -> str:
    """One line a person can act on: `k: Input should be less than or equal to 100; ...`."""
    parts = []
    for e in errors[:5]:
        raw = e.get("loc")
        loc = [str(p) for p in raw] if isinstance(raw, list | tuple) else []
        where = ".".join(loc[1:] if loc[:1] == ["body"] else loc) or "request body"
        if e.get("type") == "json_invalid":
            parts.append(f"the request body is not valid JSON ({e.get('msg')})")
        else:
            parts.append(f"{where}: {e.get('msg')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TdbError)
    async def bad_input(_: Request, exc: TdbError) -> JSONResponse:
        return error(400, api_names(str(exc)))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        detail = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg")), "type": e["type"]}
            for e in errors
        ]
        return error(422, validation_message(errors), detail=detail)

    @app.exception_handler(QueueFullError)
    async def busy(_: Request, exc: QueueFullError) -> JSONResponse:
        response = error(503, str(exc))
        response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        response = error(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})
        return response
