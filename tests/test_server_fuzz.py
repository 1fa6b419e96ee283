"""Requests that match the schema but not the model or the prompt (node ids out of range, traces
of the wrong node type, resample without a second prompt, positions past the end, ...), mixed
with ones that are fine: each gets a 200 or a 400 with a message, never a 5xx.

Schemathesis (test_server_schema.py) explores the schema; this explores tdb's own grammar of
node ids, ablations and traces, which a schema cannot describe.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdb.checkpoint import LoadedModel
from tdb.server.app import create_app

pytestmark = pytest.mark.slow  # hypothesis sends hundreds of generated requests

PROMPT = "When Mary and John went to the store, John gave a drink to"
SECOND = "When Tom and Anna went to the park, Anna gave a ball to"

small = st.integers(min_value=0, max_value=15)  # the prompt has 14 tokens
layer = st.integers(min_value=0, max_value=2)  # the test model has 2 layers
neurons = st.builds(lambda L, n, t: f"n{L}.{n}@{t}", layer, st.integers(0, 140), small)
heads = st.builds(
    lambda L, h, q, k: f"h{L}.{h}@{q}" + ("" if k is None else f":{k}"),
    layer,
    st.integers(0, 5),
    small,
    st.none() | small,
)
embeddings = st.builds(lambda t: f"e@{t}", small)
nodes = neurons | heads | embeddings
ablations = st.builds(
    lambda node, kind: node + kind, nodes, st.sampled_from(["", ":zero", ":mean", ":resample"])
)
traces = st.builds(
    lambda node, mode: node + mode, nodes, st.sampled_from(["", ":q", ":k", ":qk", ":v"])
)


@st.composite
def requests(draw: st.DrawFn) -> dict[str, object]:
    """Mostly plausible requests (so most reach the model), with every kind of mistake."""
    request: dict[str, object] = {"prompt": PROMPT, "target": " Mary"}
    if draw(st.integers(0, 4)) == 0:
        request["logprob"] = True
    else:
        request["distractor"] = " John"
    if draw(st.booleans()):
        request["position"] = draw(st.integers(-16, 16))
    request["ablate"] = draw(st.lists(ablations, max_size=3))
    if draw(st.booleans()):
        request["trace"] = trace = draw(traces)
        if trace.endswith(":v") and draw(st.booleans()):
            request["downstream"] = draw(traces)
    if draw(st.integers(0, 3)) == 0:
        request["second_prompt"] = draw(st.sampled_from([SECOND, "Too short", PROMPT]))
    if draw(st.integers(0, 3)) == 0:
        request["mean_prompts"] = draw(st.lists(st.sampled_from([SECOND, "a b c"]), max_size=2))
    request["k"] = draw(st.integers(1, 5))
    request["verify"] = draw(st.sampled_from([0, 0, 0, 2]))
    return request


@pytest.fixture(scope="module")
def client(loaded: LoadedModel) -> TestClient:
    return TestClient(
        create_app(loaded), raise_server_exceptions=False, base_url="http://localhost"
    )


@given(request=requests(), views=st.booleans())
@settings(
    max_examples=150,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_tdb_grammar_never_gets_a_server_error(
    client: TestClient, request: dict[str, object], views: bool
) -> None:
    if views:
        request = {k: v for k, v in request.items() if k not in {"k", "verify"}}
        request["view_nodes"] = [a.split(":")[0] for a in request.get("ablate", [])]  # type: ignore[attr-defined]
    response = client.post("/api/views" if views else "/api/nodes", json=request)
    assert response.status_code in {200, 400}, response.text
    if response.status_code == 400:
        assert response.json()["error"]
