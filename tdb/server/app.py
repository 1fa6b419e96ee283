"""The FastAPI app: the API routes, the web pages (`/`, `/dataset`, `/circuit`), and the error
mapping.

>>> app = create_app(load_model(), max_prompt_tokens=512)
>>> uvicorn.run(app, host="127.0.0.1", port=8000)      # what `tdb serve` does

Errors: bad input (`TdbError`) is 400, a request that does not match the schema (malformed JSON,
wrong types, out-of-range numbers) is 422, unknown routes 404, a body over 4 MiB 413, a full
model queue 503 with Retry-After; every one is JSON `{"error": "<what to change>"}`. A 500
means a bug in tdb. A request whose Host is not one of this server's names is a 400 before
anything else (a web page that rebinds its DNS name to 127.0.0.1 must not drive the server).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tdb.checkpoint import LoadedModel
from tdb.errors import TdbError
from tdb.server.cache import ResultCache
from tdb.server.routes import router
from tdb.server.state import ServerState
from tdb.server.worker import ModelWorker, QueueFullError

STATIC_DIR = Path(__file__).parent / "static"
SWAGGER_UI_DIR = Path(str(files("fastapi_offline") / "static"))  # Swagger UI's JS and CSS
MAX_BODY_BYTES = 4 << 20  # far above any request the schema allows, far below harm
# The names a server answers to unless told more (`allowed_hosts`, `tdb serve --allow-host`).
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def create_app(
    loaded: LoadedModel,
    *,
    max_prompt_tokens: int = 512,
    queue_size: int = 8,
    cache_size: int = 256,
    cache_bytes: int = 64 << 20,
    extra_routers: Sequence[APIRouter] = (),
    allowed_hosts: Sequence[str] = (),
) -> FastAPI:
    """The app for one loaded model.

    - `max_prompt_tokens`: longer prompts get a 400 (the model's context is a limit too).
    - `queue_size`: model jobs that may wait behind the running one before a 503.
    - `cache_size`, `cache_bytes`: the results cache's bounds (entries, bytes of JSON).
    - `extra_routers`: more routes on the same app (e.g. the corpus scan's component pages).
    - `allowed_hosts`: Host names (any port) accepted besides 127.0.0.1, localhost and [::1];
      a request with another Host gets a 400.
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
        docs_url=None,  # served below from local files: FastAPI's loads Swagger UI from a CDN
        redoc_url=None,
    )
    app.state.tdb = state
    app.include_router(router)
    for extra in extra_routers:
        app.include_router(extra)
    add_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    app.add_middleware(HostCheck, allowed=(*LOCAL_HOSTS, *allowed_hosts))  # outermost: first
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    add_docs(app)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/dataset", include_in_schema=False)
    async def dataset_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "dataset.html")

    @app.get("/circuit", include_in_schema=False)
    async def circuit_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "circuit.html")

    return app


def add_docs(app: FastAPI) -> None:
    """`/docs`: Swagger UI on the app's `/openapi.json`, its JavaScript and CSS served from the
    copy the `fastapi-offline` package ships (Swagger UI 5, Apache-2.0) under `/docs-assets/`,
    so the page works with no network. No favicon and no validator badge: both would be
    requests to other hosts."""
    app.mount("/docs-assets", StaticFiles(directory=SWAGGER_UI_DIR), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title="tdb: HTTP API",
            swagger_js_url=f"{root}/docs-assets/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/docs-assets/swagger-ui.css",
            swagger_favicon_url="data:,",
            swagger_ui_parameters={"validatorUrl": None},
        )


class BodyLimit:
    """Answers 413 to a request whose body is over `max_bytes`: at once when its Content-Length
    says so, else (a chunked body) as soon as the bytes received pass the limit, without reading
    the rest. The bytes are counted where they arrive, in `receive`, so nothing downstream (the
    JSON parser on the event loop) ever holds more than `max_bytes` of one body."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"the request body is over {self.max_bytes} bytes: send less"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await error(413, message)(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside the route's body read: FastAPI passes an HTTPException on,
                    # and the app's handler answers it as JSON (`http_error`).
                    raise HTTPException(413, message)
            return event

        try:
            await self.app(scope, counted, send)
        except HTTPException as e:  # a route outside FastAPI's handlers read the body
            if e.status_code != 413:
                raise
            await error(413, message)(scope, receive, send)


class HostCheck:
    """Answers 400 to a request whose Host header is not one of `allowed` (any port; a missing
    Host too). A browser sends the page's own name as Host, so a page on another site that
    rebinds its name to 127.0.0.1 (DNS rebinding) is refused instead of driving the model."""

    def __init__(self, app: ASGIApp, allowed: Sequence[str]) -> None:
        self.app = app
        self.allowed = frozenset(host_name(h) for h in allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan (the app serves no websockets)
            await self.app(scope, receive, send)
            return
        raw = dict(scope["headers"]).get(b"host")
        host = None if raw is None else raw.decode("latin-1")
        if host is not None and host_name(host) in self.allowed:
            await self.app(scope, receive, send)
            return
        if host is None:
            message = "the request has no Host header; send one (e.g. Host: 127.0.0.1)"
        else:
            name = host_name(host) or host
            shown = f"[{name}]" if ":" in name else name
            message = (
                f"Host {host!r} is not one of this server's names ("
                f"{', '.join(sorted(self.allowed))}); to reach it by this name, restart it "
                f"with tdb serve --allow-host {shown}, or create_app(allowed_hosts=[{name!r}])"
            )
        await error(400, message)(scope, receive, send)


def host_name(host: str) -> str:
    """A Host header's name, without its port, lower case: `[::1]:8000` -> `::1`,
    `LocalHost:80` -> `localhost`, `example.org.` -> `example.org`."""
    host = host.strip().lower()
    if host.startswith("["):  # an IPv6 literal, maybe with a port
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        host = host.split(":")[0]
    return host.rstrip(".")


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
    "--compare-target": "compare_target",
    "--compare-distractor": "compare_distractor",
    "--mean-prompt": "mean_prompts",
    "--view-node": "view_nodes",
    "-k": "k",
    "--method": "methods",
    "--ig-steps": "ig_steps",
    "--n": "task.n",
    "--max-components": "max_components",
    "--target-faithfulness": "target_faithfulness",
    "--max-edges": "max_edges",
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

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and isinstance(exc.__cause__, ValueError | RecursionError):
            # FastAPI answers 400 "There was an error parsing the body" when the JSON parser
            # fails other than by a syntax error: bytes that are not UTF-8 (UnicodeDecodeError,
            # a ValueError) or nesting past Python's recursion limit. Both are malformed JSON,
            # which docs/server.md promises is a 422.
            return error(422, f"the request body is not valid JSON ({not_json(exc.__cause__)})")
        response = error(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})
        return response


def not_json(cause: BaseException) -> str:
    """Why a body FastAPI could not parse is not JSON, for a person to read."""
    if isinstance(cause, UnicodeDecodeError):
        return f"not UTF-8: byte {cause.object[cause.start]:#x} at {cause.start}"
    if isinstance(cause, RecursionError):
        return "nested too deeply"
    return str(cause)
