"""Node-table requests answered together (`tdb.table.batch.run_requests`, `POST /api/batch`)
give the tables the same requests give one at a time: the same rows in the same order, every
other field equal, values equal up to float rounding (a batch sums in another order)."""

from __future__ import annotations

import math
from unittest import mock

import pytest
from fastapi.testclient import TestClient

import tdb.table.batch
from tdb.attribution import task_records
from tdb.checkpoint import LoadedModel
from tdb.errors import TdbError
from tdb.server.app import create_app
from tdb.table import NodeRequest, run_request
from tdb.table.batch import run_requests


def assert_close_json(ours: object, theirs: object, where: str = "") -> None:
    """Equal JSON, floats within rounding of a different summation order."""
    if isinstance(theirs, float) and isinstance(ours, float | int):
        if math.isnan(theirs):
            assert math.isnan(ours), where
        else:
            assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-5), where
    elif isinstance(theirs, dict):
        assert isinstance(ours, dict) and ours.keys() == theirs.keys(), where
        for key in theirs:
            assert_close_json(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_close_json(a, b, f"{where}[{i}]")
    else:
        assert ours == theirs, where


@pytest.fixture(scope="module")
def ioi(demo: LoadedModel) -> list[dict[str, object]]:
    """8 IOI prompts of 16 to 22 tokens."""
    return task_records("ioi", 8, 0, demo.tokenizer)


def requests_of(ioi: list[dict[str, object]]) -> list[NodeRequest]:
    plain = [
        NodeRequest(r["prompt"], r["target"], r["distractor"], k=5)  # type: ignore[arg-type]
        for r in ioi
    ]
    first = ioi[0]
    return [
        *plain,
        NodeRequest(first["prompt"], first["target"], k=5, logprob=True),  # type: ignore[arg-type]
        NodeRequest(first["prompt"], " Mary", " John", k=5, position=5),  # type: ignore[arg-type]
        NodeRequest(first["prompt"], " Mary", " John", k=5, views=True, verify=3),  # type: ignore[arg-type]
        NodeRequest(first["prompt"], " Mary", " John", k=5, ablate=("h1.0",)),  # type: ignore[arg-type]
        NodeRequest(first["prompt"], " Mary", " John", k=5, trace="n1.3@4"),  # type: ignore[arg-type]
        NodeRequest(first["prompt"], " Mary", " Maryanne", k=5),  # type: ignore[arg-type]
        NodeRequest(ioi[1]["prompt"], " Mary", " John", k=5, views=True),  # type: ignore[arg-type]
        NodeRequest(ioi[2]["prompt"], " Mary", " John", k=3, attn_nodes="latents"),  # type: ignore[arg-type]
        NodeRequest(ioi[3]["prompt"], " Mary", " John", k=3, attn_nodes="latents"),  # type: ignore[arg-type]
    ]


@pytest.mark.slow  # ~2 min on a busy 2-core machine: 30 node tables
def test_run_requests_equals_one_at_a_time(demo: LoadedModel, ioi: list[dict[str, object]]) -> None:
    requests = requests_of(ioi)
    batch_sizes: list[int] = []
    real = tdb.table.batch.capture_batch

    def counting(*args: object, **kwargs: object) -> object:
        batch_sizes.append(len(args[1]))  # type: ignore[arg-type]
        return real(*args, **kwargs)  # type: ignore[arg-type]

    with mock.patch.object(tdb.table.batch, "capture_batch", counting):
        together = run_requests(demo, requests)
    # The 8 IOI prompts, the log-prob and the position requests share one capture; views
    # (dense) share another; the latent requests a third; the rest run alone.
    assert sorted(batch_sizes) == [2, 2, 10]
    for request, ours in zip(requests, together, strict=True):
        try:
            alone = run_request(demo, request)
        except TdbError as e:
            assert isinstance(ours, TdbError) and str(ours) == str(e)
            continue
        assert not isinstance(ours, TdbError)
        assert_close_json(ours.to_json(), alone.to_json())


@pytest.mark.slow
def test_api_batch_equals_single_requests(demo: LoadedModel, ioi: list[dict[str, object]]) -> None:
    items = [
        {"prompt": r["prompt"], "target": r["target"], "distractor": r["distractor"], "k": 4}
        for r in ioi
    ]
    items += [
        items[0] | {"ablate": ["h1.0@13:4"]},
        items[0] | {"prompt": "x " * 50},  # over the server's 40 tokens: 400
        items[1] | {"node_types": ["attention_head"], "sort": "direct_effect"},
    ]
    batch = [{"route": "nodes", "request": item} for item in items]
    batch.insert(3, {"route": "tokenize", "request": {"text": " John"}})
    with TestClient(create_app(demo, max_prompt_tokens=40), base_url="http://localhost") as c:
        together = c.post("/api/batch", json={"requests": batch}).json()["responses"]
    with TestClient(create_app(demo, max_prompt_tokens=40), base_url="http://localhost") as c:
        alone = [c.post(f"/api/{b['route']}", json=b["request"]) for b in batch]
    for ours, theirs in zip(together, alone, strict=True):
        assert ours["status"] == theirs.status_code
        if theirs.status_code == 200:
            assert_close_json(ours["body"], theirs.json())
        else:
            # (the single route's error handler drops the dashes of CLI flags; the batch's not)
            assert ours["error"]["error"].replace("--", "") == theirs.json()["error"]
