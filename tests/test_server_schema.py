"""Schemathesis over the OpenAPI schema: generated requests, valid and invalid, never get a 5xx,
and every response matches the schema (status code, content type, body).

Each operation is run with hypothesis directly (not through schemathesis' pytest plugin), in
both generation modes, with a bounded number of examples so the whole run stays short.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tdb.checkpoint import LoadedModel
from tdb.server.app import create_app

pytestmark = pytest.mark.slow  # schemathesis sends hundreds of generated requests

EXAMPLES = {GenerationMode.POSITIVE: 60, GenerationMode.NEGATIVE: 60}
# A batch nests every other request: generating one costs several times more, and what it can
# break is mostly what the single routes already cover.
BATCH_EXAMPLES = 25
# An attribution runs the model over up to 256 prompts: fewer examples, and a generous timeout
# (the requests are valid, only slow on shared CPUs; a timeout is not a server error).
ATTRIBUTE_EXAMPLES = 15
ATTRIBUTE_TIMEOUT_S = 300
# A circuit search measures many patched forward passes on top of an attribution: fewer still.
CIRCUIT_EXAMPLES = 8
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def api_schema(loaded: LoadedModel) -> schemathesis.BaseSchema:
    # Schemathesis' in-process client sends Host `testserver`: allowed here by name.
    app = create_app(loaded, max_prompt_tokens=32, allowed_hosts=["testserver"])
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def operation_labels() -> list[str]:
    return [
        "GET /api/model",
        "POST /api/tokenize",
        "POST /api/nodes",
        "POST /api/views",
        "POST /api/batch",
        "POST /api/attribute",
        "POST /api/circuit",
        "GET /api/tasks",
    ]


def test_every_operation_is_fuzzed(api_schema: schemathesis.BaseSchema) -> None:
    labels = {result.ok().label for result in api_schema.get_all_operations()}
    assert labels == set(operation_labels())


@pytest.mark.parametrize("mode", list(EXAMPLES), ids=str)
@pytest.mark.parametrize("label", operation_labels())
def test_generated_requests_get_no_server_error(
    api_schema: schemathesis.BaseSchema, label: str, mode: GenerationMode
) -> None:
    if label.startswith("GET") and mode is GenerationMode.NEGATIVE:
        pytest.skip("a route without parameters has no invalid requests to generate")
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None
    checks = [*CHECKS, negative_data_rejection] if mode is GenerationMode.NEGATIVE else CHECKS

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=BATCH_EXAMPLES
        if label.endswith("batch")
        else ATTRIBUTE_EXAMPLES
        if label.endswith("attribute")
        else CIRCUIT_EXAMPLES
        if label.endswith("circuit")
        else EXAMPLES[mode],
        deadline=None,
        database=None,
        derandomize=True,  # the same examples every run: CI never fails by the draw
        suppress_health_check=list(HealthCheck),
    )
    def run(case: schemathesis.Case) -> None:
        if label.endswith(("attribute", "circuit")):
            case.call_and_validate(checks=checks, timeout=ATTRIBUTE_TIMEOUT_S)
        else:
            case.call_and_validate(checks=checks)

    run()
