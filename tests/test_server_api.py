"""The HTTP API: the same numbers as the Python API, the cache, the queue, and every bad request
answered with a 4xx JSON error a person can act on."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from checkpoints import make_checkpoint
from fastapi import APIRouter
from fastapi.testclient import TestClient

from tdb.checkpoint import LoadedModel, load_model
from tdb.metrics import Group
from tdb.server.app import MAX_BODY_BYTES, create_app
from tdb.server.cache import ResultCache
from tdb.server.state import ServerState
from tdb.server.worker import ModelWorker, QueueFullError
from tdb.table import node_table

PROMPT = "When Mary and John went to the store, John gave a drink to"
SECOND = "When Tom and Anna went to the park, Anna gave a ball to"
IOI = {"prompt": PROMPT, "target": " Mary", "distractor": " John"}
# The server answers only to localhost names by default; Starlette's TestClient would send Host
# `testserver` (tests/test_server_hardening.py checks that it is refused).
LOCAL = "http://localhost"


@pytest.fixture(scope="module")
def client(demo: LoadedModel) -> Iterator[TestClient]:
    with TestClient(create_app(demo, max_prompt_tokens=40), base_url=LOCAL) as c:
        yield c


def test_model_info_and_openapi(client: TestClient) -> None:
    info = client.get("/api/model").json()
    assert info["name"] == "demo" and info["n_layer"] == 3 and info["max_prompt_tokens"] == 40
    assert info["groups"] == ["activation", "write_norm", "direct_effect", "act_times_grad"]
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/model", "/api/tokenize", "/api/nodes", "/api/views", "/api/batch"} <= set(paths)


def test_tokenize_shows_how_a_text_splits(client: TestClient) -> None:
    out = client.post("/api/tokenize", json={"text": " Maryanne"}).json()
    assert [t["text"] for t in out["tokens"]] == [" Mary", "an", "ne"]
    assert not out["single_token"]
    assert client.post("/api/tokenize", json={"text": " Mary"}).json()["single_token"]
    assert client.post("/api/tokenize", json={"text": ""}).json() == {
        "tokens": [],
        "single_token": False,
    }


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"ablate": ["h2.3@13:1", "n1.5@13:mean"]},
        {"trace": "h2.3@13:1:q"},
        {"trace": "n1.5@13"},
        {"second_prompt": SECOND},
        {"logprob": True, "distractor": None},
        {"groups": ["direct_effect", "act_times_grad"], "verify": 3},
        {"mlp_nodes": "latents", "attn_nodes": "latents"},
        {"mlp_nodes": "both", "ablate": ["am2.807@13"], "trace": "am1.5@13"},
    ],
    ids=[
        "plain",
        "ablate",
        "trace-head",
        "trace-neuron",
        "two-prompts",
        "logprob",
        "verify",
        "latents",
        "latents-ablate-trace",
    ],
)
def test_node_table_equals_the_python_api(
    client: TestClient, demo: LoadedModel, options: dict[str, object]
) -> None:
    request = IOI | {"k": 4} | options
    response = client.post("/api/nodes", json=request)
    assert response.status_code == 200, response.text
    out = response.json()
    kwargs = {k: v for k, v in request.items() if k not in {"prompt", "target", "distractor"}}
    if "groups" in kwargs:
        kwargs["groups"] = [Group(g) for g in kwargs["groups"]]  # type: ignore[attr-defined]
    if "second_prompt" in kwargs:
        kwargs["second_prompt"] = demo.tokenizer.encode(SECOND)
    table = node_table(
        demo, demo.tokenizer.encode(PROMPT), " Mary", request["distractor"], **kwargs
    )  # type: ignore[arg-type]
    expected = json.loads(json.dumps(table.to_json()))
    assert out["direction"] == expected["direction"]
    assert [n["id"] for n in out["nodes"]] == [n["id"] for n in expected["nodes"]]
    for row, want in zip(out["nodes"], expected["nodes"], strict=True):
        assert row["values"] == {c: want[c] for c in out["columns"]}
        assert row["name"] == want["name"]
    if "verify" in options:
        assert out["verification"] == expected["verification"]


def test_rows_link_to_component_pages(client: TestClient) -> None:
    rows = client.post("/api/nodes", json=IOI | {"k": 2}).json()["nodes"]
    for row in rows:
        if row["node_type"] == "embedding":
            assert row["component"] is None
        else:
            assert (
                row["component"] == f"/component/{row['node_type']}/{row['layer']}/{row['index']}"
            )


def test_extra_routers_are_served(demo: LoadedModel) -> None:
    router = APIRouter()

    @router.get("/component/{node_type}/{layer}/{index}")
    async def component(node_type: str, layer: int, index: int) -> dict[str, object]:
        return {"node_type": node_type, "layer": layer, "index": index}

    with TestClient(create_app(demo, extra_routers=[router]), base_url=LOCAL) as c:
        row = next(
            n for n in c.post("/api/nodes", json=IOI | {"k": 1}).json()["nodes"] if n["component"]
        )
        assert c.get(row["component"]).json()["index"] == row["index"]


def test_views_equal_the_python_api(client: TestClient, demo: LoadedModel) -> None:
    out = client.post("/api/views", json=IOI | {"view_nodes": ["n1.5@13", "h2.3@13:1"]}).json()
    table = node_table(
        demo, PROMPT, " Mary", " John", k=0, views=["n1.5@13", "h2.3@13:1"]
    ).to_json()
    views = json.loads(json.dumps(table["token_views"]))
    assert out["logits"] == views["logits"]
    assert out["effect_by_token"] == views["effect_by_token"]
    assert out["nodes"] == [
        v | {"exciting_tokens": v.get("exciting_tokens")} for v in views["nodes"]
    ]
    pinned = out["logits"]["pinned"]
    assert [p["text"] for p in pinned] == [" Mary", " John"]


def test_cache_hits_and_display_options(client: TestClient) -> None:
    request = IOI | {"k": 7, "ablate": ["e@3"]}
    first = client.post("/api/nodes", json=request)
    again = client.post("/api/nodes", json=request)
    assert first.headers["x-tdb-cache"] == "miss" and again.headers["x-tdb-cache"] == "hit"
    assert first.json() == again.json()
    # Node types are a display option: answered from the cache, and the same rows as filtering.
    heads = client.post("/api/nodes", json=request | {"node_types": ["attention_head"]})
    assert heads.headers["x-tdb-cache"] == "hit"
    assert heads.json()["nodes"] == [
        n for n in first.json()["nodes"] if n["node_type"] == "attention_head"
    ]


def test_cache_is_bounded() -> None:
    cache = ResultCache(max_entries=2, max_bytes=10)
    cache.put("a", b"1234")
    cache.put("b", b"1234")
    cache.put("c", b"1234")  # over both bounds: the least recently used goes
    assert cache.get("a") is None and len(cache) == 2 and cache.nbytes == 8
    cache.get("b")
    cache.put("d", b"12345")  # 13 bytes would be over: "c" (least recently used) goes
    assert cache.get("c") is None and cache.get("b") == b"1234" and cache.nbytes == 9
    cache.put("huge", b"x" * 11)  # larger than the whole cache: not kept
    assert cache.get("huge") is None


def test_batch(client: TestClient) -> None:
    out = client.post(
        "/api/batch",
        json={
            "requests": [
                {"route": "nodes", "request": IOI | {"k": 2}},
                {"route": "views", "request": IOI},
                {"route": "tokenize", "request": {"text": " John"}},
                {"route": "nodes", "request": IOI | {"ablate": ["h7.0@13:1"]}},
            ]
        },
    ).json()["responses"]
    assert [r["status"] for r in out] == [200, 200, 200, 400]
    assert out[0]["body"]["nodes"] and out[1]["body"]["logits"]["top"]
    assert out[2]["body"]["single_token"]
    assert "layer 7 is outside 0..2" in out[3]["error"]["error"]


BAD_REQUESTS = [
    ("/api/nodes", b'{"prompt": "hi", ', 422, "not valid JSON"),
    ("/api/nodes", b"[1, 2]", 422, "Input should be a valid dictionary"),
    ("/api/nodes", IOI | {"k": "ten"}, 422, "k: Input should be a valid integer"),
    ("/api/nodes", IOI | {"k": 0}, 422, "k: Input should be greater than or equal to 1"),
    ("/api/nodes", IOI | {"k": 101}, 422, "k: Input should be less than or equal to 100"),
    ("/api/nodes", IOI | {"targt": " Mary"}, 422, "targt: Extra inputs are not permitted"),
    ("/api/nodes", {"target": " Mary"}, 422, "prompt: Field required"),
    ("/api/nodes", IOI | {"prompt": ""}, 422, "at least 1 character"),
    ("/api/nodes", IOI | {"logprob": "yes"}, 422, "logprob: Input should be a valid boolean"),
    ("/api/nodes", IOI | {"groups": ["loudness"]}, 422, "groups.0: Input should be"),
    ("/api/nodes", IOI | {"verify": 21}, 422, "verify: Input should be less than or equal to 20"),
    ("/api/nodes", IOI | {"ablate": ["x1"]}, 400, "node id 'x1' is not one of"),
    ("/api/nodes", IOI | {"ablate": ["h7.0@13:1"]}, 400, "layer 7 is outside 0..2"),
    ("/api/nodes", IOI | {"ablate": ["n0.5@99"]}, 400, "token 99 is outside the prompt (0..13)"),
    ("/api/nodes", IOI | {"ablate": ["n0.5000@3"]}, 400, "neuron 5000 is outside 0..511"),
    ("/api/nodes", IOI | {"ablate": ["h1.2@3:9"]}, 400, "key token 9 must be in 0..3"),
    ("/api/nodes", IOI | {"ablate": ["e@2:resample"]}, 400, "needs a second prompt"),
    ("/api/nodes", IOI | {"trace": "e@3"}, 400, "trace e@3: trace an MLP neuron"),
    ("/api/nodes", IOI | {"trace": "h2.3@13:1:v", "downstream": "n0.1@2"}, 400, "downstream"),
    ("/api/nodes", IOI | {"position": 14}, 400, "position 14 is outside the prompt's 14 tokens"),
    ("/api/nodes", IOI | {"prompt": "x " * 41}, 400, "this server takes at most 40"),
    ("/api/nodes", IOI | {"prompt": [1, 2, 99999]}, 400, "token id 99999 is outside"),
    ("/api/nodes", IOI | {"second_prompt": "short"}, 400, "same number of tokens"),
    ("/api/nodes", IOI | {"target": " Maryanne"}, 400, "splits into ' Mary', 'an', 'ne'"),
    ("/api/nodes", IOI | {"distractor": None}, 400, "give a target and a distractor"),
    ("/api/nodes", IOI | {"groups": ["activation", "activation"]}, 400, "may appear once"),
    ("/api/views", IOI | {"view_nodes": ["n9.1@1"]}, 400, "layer 9 is outside"),
    ("/api/views", IOI | {"k": 3}, 422, "k: Extra inputs are not permitted"),
    ("/api/tokenize", {"text": 5}, 422, "text: Input should be a valid string"),
    ("/api/batch", {"requests": []}, 422, "requests: List should have at least 1 item"),
    ("/api/batch", {"requests": [{"route": "nope", "request": {}}]}, 422, "does not match"),
    ("/api/nowhere", {}, 404, "Not Found"),
    ("/api/nodes", b" " * (5 << 20), 413, "the request body is over 4194304 bytes"),
]


@pytest.mark.parametrize(("path", "body", "status", "message"), BAD_REQUESTS)
def test_bad_requests_get_a_4xx_json_error(
    client: TestClient, path: str, body: object, status: int, message: str
) -> None:
    if isinstance(body, bytes):
        response = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = client.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error, error
    assert "Traceback" not in response.text and "--" not in error


def test_wrong_method_and_checkpoint_without_tokenizer(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, with_tokenizer=False)
    with TestClient(create_app(load_model(tmp_path)), base_url=LOCAL) as c:
        assert c.get("/api/nodes").status_code == 405
        text = c.post("/api/nodes", json=IOI)
        assert text.status_code == 400 and "give token ids instead" in text.json()["error"]
        ids = c.post("/api/nodes", json={"prompt": [5, 6, 7], "target": 8, "distractor": 9})
        assert ids.status_code == 200
        assert [t["text"] for t in ids.json()["tokens"]] == ["<5>", "<6>", "<7>"]


def test_a_full_queue_answers_503_and_the_server_stays_responsive(demo: LoadedModel) -> None:
    app = create_app(demo, queue_size=0)
    state: ServerState = app.state.tdb
    started, release = threading.Event(), threading.Event()

    def block() -> None:
        started.set()
        release.wait(timeout=30)

    blocker = threading.Thread(target=asyncio.run, args=(state.worker.run(block),))
    with TestClient(app, base_url=LOCAL) as c:
        blocker.start()
        try:
            assert started.wait(timeout=30)
            busy = c.post("/api/nodes", json=IOI | {"k": 9})
            assert busy.status_code == 503
            assert int(busy.headers["retry-after"]) >= 1
            assert "busy" in busy.json()["error"]
            # While the model is busy, cheap routes answer.
            assert c.get("/api/model").status_code == 200
            assert c.post("/api/tokenize", json={"text": "hi"}).status_code == 200
        finally:
            release.set()
            blocker.join(timeout=30)
        assert c.post("/api/nodes", json=IOI | {"k": 9}).status_code == 200


def test_worker_counts_jobs_until_they_end() -> None:
    worker = ModelWorker(queue_size=1)

    async def main() -> None:
        gate = threading.Event()
        first = asyncio.ensure_future(worker.run(lambda: gate.wait(30)))
        second = asyncio.ensure_future(worker.run(lambda: 2))
        await asyncio.sleep(0)
        await asyncio.sleep(0.05)
        assert worker.pending == 2
        with pytest.raises(QueueFullError):
            await worker.run(lambda: 3)
        gate.set()
        assert await first and await second == 2
        assert worker.pending == 0

    asyncio.run(main())
    worker.close()


def test_page_and_assets_are_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '<script type="module" src="/static/app.js">' in page.text
    assert "javascript" in client.get("/static/app.js").headers["content-type"]
    assert client.get("/static/style.css").status_code == 200
    # Offline: the page loads nothing from another host.
    for asset in [page.text, client.get("/static/app.js").text]:
        assert "http://" not in asset and "https://" not in asset


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow  # runs `tdb serve` in a subprocess
def test_tdb_serve_serves_the_page() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tdb.cli", "serve", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    assert "<title>tdb</title>" in r.read().decode()
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "tdb serve did not answer"
                time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/model", timeout=5) as r:
            assert json.loads(r.read())["name"] == "demo"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert f"serving demo at http://127.0.0.1:{port}/" in err


@pytest.mark.slow  # runs `tdb serve` in a subprocess
def test_tdb_serve_with_a_bad_model_stops_with_a_message(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tdb.cli",
            "serve",
            "--model",
            str(tmp_path / "no"),
            "--port",
            str(port),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert "tdb: error: --model:" in proc.stderr and "neither a checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr
    with socket.socket() as s:  # nothing was left listening
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_latent_rows_carry_their_type_and_component_link(client: TestClient) -> None:
    out = client.post("/api/nodes", json=IOI | {"k": 3, "mlp_nodes": "latents"}).json()
    latents = [r for r in out["nodes"] if r["node_type"] == "autoencoder_latent"]
    assert latents and all(
        r["component"] == f"/component/autoencoder_latent/{r['layer']}/{r['index']}?site=mlp_out"
        for r in latents
    )
    assert not [r for r in out["nodes"] if r["node_type"] == "mlp_neuron"]
    bad = client.post("/api/nodes", json=IOI | {"mlp_nodes": "neurones"})
    assert bad.status_code == 422 and "mlp_nodes" in bad.text


# Each limit of docs/server.md's table, at the limit (accepted: the schema lets it through) and
# one past it (refused). Past-the-limit cases of k, verify, the prompt's tokens and the body's
# Content-Length are in BAD_REQUESTS; a chunked body's are in test_server_hardening.py.
IDS = [5] * 40  # 40 tokens: the fixture's --max-prompt-tokens
LIMITS = [
    ("prompt tokens", IOI | {"prompt": IDS}, 200, IOI | {"prompt": [*IDS, 5]}, 400),
    ("prompt text", IOI | {"prompt": "a" * 20_000}, 400, IOI | {"prompt": "a" * 20_001}, 422),
    ("token ids", IOI | {"prompt": [5] * 8_192}, 400, IOI | {"prompt": [5] * 8_193}, 422),
    ("k", IOI | {"k": 100}, 200, IOI | {"k": 101}, 422),
    ("verify", IOI | {"k": 1, "verify": 20}, 200, IOI | {"k": 1, "verify": 21}, 422),
    ("ablate", IOI | {"ablate": ["e@1"] * 32}, 200, IOI | {"ablate": ["e@1"] * 33}, 422),
    ("targets", IOI | {"target": [" Mary"] * 32}, 200, IOI | {"target": [" Mary"] * 33}, 422),
    (
        "mean prompts",
        IOI | {"ablate": ["e@1:mean"], "mean_prompts": [PROMPT] * 8},
        200,
        IOI | {"ablate": ["e@1:mean"], "mean_prompts": [PROMPT] * 9},
        422,
    ),
]


@pytest.mark.parametrize(
    ("at", "at_status", "past", "past_status"),
    [case[1:] for case in LIMITS],
    ids=[case[0] for case in LIMITS],
)
def test_each_request_limit_at_and_past_it(
    client: TestClient,
    at: dict[str, object],
    at_status: int,
    past: dict[str, object],
    past_status: int,
) -> None:
    response = client.post("/api/nodes", json=at)
    assert response.status_code == at_status, response.text
    if at_status == 400:  # through the schema; refused by the server's prompt-token limit
        assert "tokens" in response.json()["error"]  # the model's context or the server's limit
    response = client.post("/api/nodes", json=past)
    assert response.status_code == past_status, response.text


def test_the_body_limit_at_and_past_it(client: TestClient) -> None:
    headers = {"content-type": "application/json"}
    at = client.post("/api/nodes", content=b" " * MAX_BODY_BYTES, headers=headers)
    assert at.status_code == 422 and "not valid JSON" in at.json()["error"]  # read and parsed
    past = client.post("/api/nodes", content=b" " * (MAX_BODY_BYTES + 1), headers=headers)
    assert past.status_code == 413, past.text


def test_the_batch_limit_at_and_past_it(client: TestClient) -> None:
    item = {"route": "tokenize", "request": {"text": " Mary"}}
    at = client.post("/api/batch", json={"requests": [item] * 16})
    assert at.status_code == 200 and len(at.json()["responses"]) == 16
    past = client.post("/api/batch", json={"requests": [item] * 17})
    assert past.status_code == 422 and "at most 16 items" in past.json()["error"]


@pytest.mark.parametrize("queue_size", [0, 2])
def test_the_queue_limit_at_and_past_it(queue_size: int) -> None:
    """`queue_size` jobs wait behind the running one; the next is refused at once."""
    worker = ModelWorker(queue_size)

    async def main() -> None:
        gate = threading.Event()
        accepted = [
            asyncio.ensure_future(worker.run(lambda: gate.wait(30))) for _ in range(queue_size + 1)
        ]
        await asyncio.sleep(0.05)
        assert worker.pending == queue_size + 1 and not any(j.done() for j in accepted)
        with pytest.raises(QueueFullError):
            await worker.run(lambda: None)
        gate.set()
        await asyncio.gather(*accepted)

    try:
        asyncio.run(main())
    finally:
        worker.close()


def test_the_cache_limits_through_the_app(demo: LoadedModel) -> None:
    """`cache_size` results are kept, one more evicts the oldest; `cache_bytes` likewise."""
    with TestClient(create_app(demo, cache_size=2), base_url=LOCAL) as c:
        requests = [IOI | {"k": k} for k in (1, 2, 3)]
        for request in requests[:2]:
            assert c.post("/api/nodes", json=request).headers["x-tdb-cache"] == "miss"
        assert c.app.state.tdb.cache.__len__() == 2  # type: ignore[attr-defined]
        assert c.post("/api/nodes", json=requests[0]).headers["x-tdb-cache"] == "hit"
        c.post("/api/nodes", json=requests[2])  # past the limit: k=2 (least recent) goes
        assert c.post("/api/nodes", json=requests[1]).headers["x-tdb-cache"] == "miss"
    with TestClient(create_app(demo, cache_bytes=10), base_url=LOCAL) as c:
        c.post("/api/nodes", json=requests[0])  # a result over cache_bytes is not kept
        assert c.post("/api/nodes", json=requests[0]).headers["x-tdb-cache"] == "miss"
