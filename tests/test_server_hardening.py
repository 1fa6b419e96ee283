"""What an adversarial client tries: bodies without a Content-Length, bytes that are not JSON,
a foreign Host (DNS rebinding), numbers past any index, and requests that run silently wrong or
for hours. Each answer is a bounded 4xx JSON error or a warning, never a 500 or a stall."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from live_server import live_server

from tdb.checkpoint import LoadedModel
from tdb.cli import build_parser, main
from tdb.errors import TdbError
from tdb.server.app import MAX_BODY_BYTES, BodyLimit, create_app
from tdb.server.worker import ModelWorker
from tdb.table import NodeRequest, node_table

PROMPT = "When Mary and John went to the store, John gave a drink to"
IOI = {"prompt": PROMPT, "target": " Mary", "distractor": " John"}
LOCAL = "http://localhost"  # a Host the server accepts by default


@pytest.fixture(scope="module")
def client(demo: LoadedModel) -> Iterator[TestClient]:
    with TestClient(create_app(demo), base_url=LOCAL) as c:
        yield c


# --- the body limit counts the bytes that arrive, not the Content-Length a client claims -------


def test_a_chunked_body_over_the_limit_gets_413_over_a_real_socket(demo: LoadedModel) -> None:
    def chunks(total: int) -> Iterator[bytes]:
        sent = 0
        while sent < total:
            part = min(64 << 10, total - sent)
            sent += part
            yield b" " * part

    headers = {"content-type": "application/json"}
    with live_server(create_app(demo)) as url, httpx.Client(base_url=url, timeout=30) as c:
        # No Content-Length: httpx sends a generator body with Transfer-Encoding: chunked.
        over = c.post("/api/nodes", content=chunks(MAX_BODY_BYTES + 1), headers=headers)
        assert over.request.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in over.request.headers
        assert over.status_code == 413, over.text
        assert "over 4194304 bytes" in over.json()["error"]
        # At the limit the body is read and parsed (spaces are not JSON: 422, not 413).
        at = c.post("/api/nodes", content=chunks(MAX_BODY_BYTES), headers=headers)
        assert at.status_code == 422 and "not valid JSON" in at.json()["error"]
        # The server is still serving.
        assert c.get("/api/model").status_code == 200


def test_the_body_limit_stops_reading_at_the_limit() -> None:
    """A body of 100 times the limit: the app is answered 413 after reading just past the
    limit, and the rest is never asked for (nothing buffers it)."""
    limit, chunk = 1000, 64
    pulled = 0
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        nonlocal pulled
        pulled += 1
        more = pulled * chunk < 100 * limit
        return {"type": "http.request", "body": b"x" * chunk, "more_body": more}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    async def app(scope: object, receive_: object, send_: object) -> None:
        from fastapi import Request

        await Request(scope, receive_).body()  # type: ignore[arg-type]
        raise AssertionError("the whole body was read")

    scope = {"type": "http", "method": "POST", "path": "/", "headers": []}
    asyncio.run(BodyLimit(app, max_bytes=limit)(scope, receive, send))  # type: ignore[arg-type]
    assert sent[0]["status"] == 413
    assert pulled == limit // chunk + 1  # the chunk that crossed the limit, and none after
    assert json.loads(sent[1]["body"])["error"].startswith("the request body is over 1000")  # type: ignore[arg-type]


# --- bytes that are not JSON are a 422, as docs/server.md says ---------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"prompt": "\xff\xfe"}', "not UTF-8"),
        (b"[" * 100_000, "nested too deeply"),
        (b'{"prompt": ' * 50_000, "nested too deeply"),
    ],
    ids=["invalid-utf8", "deep-array", "deep-object"],
)
def test_bytes_that_are_not_json_get_422(client: TestClient, body: bytes, message: str) -> None:
    for path in ["/api/nodes", "/api/views", "/api/batch", "/api/tokenize"]:
        response = client.post(path, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 422, (path, response.text)
        error = response.json()["error"]
        assert "not valid JSON" in error and message in error, error


# --- Host: only localhost names unless allowed (DNS rebinding) --------------------------------


def test_the_default_refuses_a_foreign_host(demo: LoadedModel) -> None:
    app = create_app(demo)
    with TestClient(app, base_url="http://evil.example:8000") as c:
        for response in [c.get("/api/model"), c.get("/"), c.post("/api/nodes", json=IOI)]:
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert "evil.example" in error and "tdb serve --allow-host evil.example" in error
    with TestClient(app) as c:  # Starlette's own name for its test client is not local either
        assert c.get("/api/model").status_code == 400


@pytest.mark.parametrize(
    "base_url",
    [
        "http://localhost",
        "http://localhost:8000",
        "http://127.0.0.1:51234",
        "http://[::1]:8000",
        "http://LOCALHOST:8000",
    ],
)
def test_the_default_accepts_localhost_names(client: TestClient, base_url: str) -> None:
    response = client.get(base_url + "/api/model")
    assert response.status_code == 200, response.text


def test_allowed_hosts_add_names(demo: LoadedModel) -> None:
    app = create_app(demo, allowed_hosts=["tdb.lab.example"])
    with TestClient(app, base_url="http://tdb.lab.example:8000") as c:
        assert c.get("/api/model").status_code == 200
        assert c.get("http://localhost:8000/api/model").status_code == 200
        assert c.get("http://other.example/api/model").status_code == 400


def test_a_request_without_host_is_refused(demo: LoadedModel) -> None:
    sent: list[dict[str, object]] = []

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/api/model",
        "raw_path": b"/api/model",
        "query_string": b"",
        "headers": [],
        "http_version": "1.0",
        "scheme": "http",
        "root_path": "",
    }
    asyncio.run(create_app(demo)(scope, receive, send))  # type: ignore[arg-type]
    assert sent[0]["status"] == 400
    assert "Host" in json.loads(sent[1]["body"])["error"]  # type: ignore[arg-type]


def test_serve_allow_host_is_repeatable() -> None:
    from tdb.cli import serve_hosts

    args = build_parser().parse_args(
        ["serve", "--allow-host", "a.example", "--allow-host", "b.example:8000"]
    )
    assert serve_hosts(args) == ["a.example", "b.example:8000"]
    args = build_parser().parse_args(["serve", "--host", "192.168.1.5"])
    assert serve_hosts(args) == ["192.168.1.5"]  # the address it binds to is a name for it
    assert serve_hosts(build_parser().parse_args(["serve", "--host", "0.0.0.0"])) == []


# --- Retry-After: how long the queue takes to drain --------------------------------------------


def test_retry_after_follows_the_queue() -> None:
    """Jobs of ~0.4 s, nine pending: Retry-After is about 9 × 0.4 s, not 1 s."""
    worker = ModelWorker(queue_size=8)

    async def main() -> int:
        await worker.run(lambda: time.sleep(0.4))  # one measured job
        gate = threading.Event()
        jobs = [asyncio.ensure_future(worker.run(lambda: gate.wait(30))) for _ in range(9)]
        await asyncio.sleep(0.05)
        assert worker.pending == 9
        estimate = worker.retry_after()
        gate.set()
        await asyncio.gather(*jobs)
        return estimate

    try:
        estimate = asyncio.run(main())
    finally:
        worker.close()
    assert 9 * 0.4 <= estimate <= 9 * 0.4 * 2, estimate


def test_retry_after_counts_a_job_that_runs_long() -> None:
    """No job has finished yet, the running one has taken 1 s and two wait behind it: the
    estimate is three jobs of at least 1 s, not a guess of 0.1 s each."""
    worker = ModelWorker(queue_size=2)

    async def main() -> int:
        gate = threading.Event()
        jobs = [asyncio.ensure_future(worker.run(lambda: gate.wait(30))) for _ in range(3)]
        await asyncio.sleep(1.0)
        assert worker.pending == 3
        estimate = worker.retry_after()
        gate.set()
        await asyncio.gather(*jobs)
        return estimate

    try:
        assert asyncio.run(main()) >= 3
    finally:
        worker.close()
    assert ModelWorker(queue_size=0).retry_after() == 1  # nothing pending: at least 1 s


# --- a direction that is zero is a warning, not silence ----------------------------------------


def test_target_equal_to_distractor_warns(demo: LoadedModel, client: TestClient) -> None:
    table = node_table(demo, PROMPT, " John", " John", k=2)
    assert len(table.warnings) == 1 and "the direction is zero" in table.warnings[0]
    assert table.to_json()["warnings"] == table.warnings
    same = node_table(demo, PROMPT, [" John", " Mary"], [" Mary", " John"], k=2)
    assert same.warnings  # the same mean, in another order
    assert node_table(demo, PROMPT, " Mary", " John", k=2).warnings == []
    response = client.post("/api/nodes", json=IOI | {"target": " John", "k": 2})
    assert response.status_code == 200
    assert response.json()["warnings"] == table.warnings
    assert client.post("/api/nodes", json=IOI | {"k": 2}).json()["warnings"] == []


def test_the_cli_prints_warnings_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["nodes", PROMPT, "--target", " John", "--distractor", " John", "-k", "1"])
    out, err = capsys.readouterr()
    assert code == 0 and out
    assert err.startswith("tdb: warning: ") and "the direction is zero" in err


# --- --verify is bounded before any work ------------------------------------------------------


def test_verify_is_bounded_in_the_request(capsys: pytest.CaptureFixture[str]) -> None:
    from tdb.table.request import MAX_VERIFY

    NodeRequest(PROMPT, verify=MAX_VERIFY).checked()
    with pytest.raises(TdbError, match=f"--verify must be at most {MAX_VERIFY}"):
        NodeRequest(PROMPT, verify=MAX_VERIFY + 1).checked()
    start = time.monotonic()
    ioi = ["nodes", PROMPT, "--target", " Mary", "--distractor", " John"]
    code = main([*ioi, "--verify", "1000000000"])
    assert code == 2 and time.monotonic() - start < 10
    assert f"--verify must be at most {MAX_VERIFY}" in capsys.readouterr().err


# --- component pages: an index past any integer is a 4xx naming it ----------------------------


@pytest.fixture(scope="module")
def scan_client(
    tmp_path_factory: pytest.TempPathFactory, checkpoint_dir: Path, loaded: LoadedModel
) -> Iterator[TestClient]:
    from tdb.scan import ScanSettings, scan
    from tdb.scan.routes import scan_router

    corpus = tmp_path_factory.mktemp("corpus") / "docs.txt"
    corpus.write_text("the cat sat on the mat\nand the dog ran\n")
    out = tmp_path_factory.mktemp("scan") / "out"
    settings = ScanSettings(model=str(checkpoint_dir), k=2, window=4, batch_size=4)
    scan(corpus, out, settings)
    app = create_app(loaded, extra_routers=[scan_router(out)])
    with TestClient(app, base_url=LOCAL) as c:
        yield c


@pytest.mark.parametrize(
    ("path", "part"),
    [
        ("/component/mlp_neuron/1/99999999999999999999999", "index"),
        ("/api/component/mlp_neuron/1/99999999999999999999999", "index"),
        ("/api/component/mlp_neuron/99999999999999999999999/1", "layer"),
        ("/api/component/attention_head/1/-99999999999999999999999", "index"),
        ("/api/component/mlp_neuron/1/x", "index"),
        ("/api/component/neuron/1/1", "node_type"),
    ],
)
def test_component_numbers_out_of_range_are_a_json_4xx(
    scan_client: TestClient, path: str, part: str
) -> None:
    response = scan_client.get(path)
    assert 400 <= response.status_code < 500, response.text
    assert part in response.json()["error"]


def test_component_pages_still_serve(scan_client: TestClient) -> None:
    assert scan_client.get("/api/component/mlp_neuron/0/1").status_code == 200
    missing = scan_client.get("/api/component/mlp_neuron/0/2147483647")
    assert missing.status_code == 404 and "the scan has no" in missing.json()["error"]
