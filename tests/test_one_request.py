"""One request, three front ends: `tdb nodes --json`, `POST /api/nodes` and the Python API build
the same `NodeRequest` and return the same document."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from tdb.checkpoint import LoadedModel, load_model
from tdb.cli import main
from tdb.errors import TdbError
from tdb.metrics import Group
from tdb.nodes import NodeType
from tdb.server.app import create_app
from tdb.table import NodeRequest, node_table, run_request

PROMPT = "When Mary and John went to the store, John gave a drink to"
SECOND = "When Tom and Anna went to the park, Anna gave a ball to"
IOI = {"prompt": PROMPT, "target": " Mary", "distractor": " John"}

# (CLI flags, the same request as JSON): a plain table, ablations of every kind, traces,
# comparison, verification, token views, SAE latents, display options.
CASES: dict[str, tuple[list[str], dict[str, object]]] = {
    "plain": ([], {}),
    "ablate": (
        ["--ablate", "h2.3@13:1", "--ablate", "n1.5@13:mean"],
        {"ablate": ["h2.3@13:1", "n1.5@13:mean"]},
    ),
    "resample": (
        ["--ablate", "h0.1@13:resample", "--resample-prompt", SECOND],
        {"ablate": ["h0.1@13:resample"], "resample_prompt": SECOND},
    ),
    "whole-head-and-layer": (
        ["--ablate", "h2.3", "--ablate", "m1:mean"],
        {"ablate": ["h2.3", "m1:mean"]},
    ),
    "compare": (["--compare-prompt", SECOND], {"compare_prompt": SECOND}),
    "second-prompt": (["--second-prompt", SECOND], {"second_prompt": SECOND}),
    "trace": (["--trace", "h2.3@13:1:q"], {"trace": "h2.3@13:1:q"}),
    "verify-groups": (
        ["--verify", "3", "--groups", "direct_effect,act_times_grad"],
        {"verify": 3, "groups": ["direct_effect", "act_times_grad"]},
    ),
    "views": (
        ["--views", "--view-node", "n1.5@13", "--view-node", "h2.3@13:1"],
        {"views": True, "view_nodes": ["n1.5@13", "h2.3@13:1"]},
    ),
    "latents": (
        ["--mlp-nodes", "latents", "--attn-nodes", "both", "--ablate", "am2.807@13"],
        {"mlp_nodes": "latents", "attn_nodes": "both", "ablate": ["am2.807@13"]},
    ),
    "sort-filter": (
        ["--sort", "direct_effect", "--node-types", "attention_head,mlp_neuron"],
        {"sort": "direct_effect", "node_types": ["attention_head", "mlp_neuron"]},
    ),
}


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    return load_model()


@pytest.fixture(scope="module")
def client(demo: LoadedModel) -> Iterator[TestClient]:
    with TestClient(create_app(demo), base_url="http://localhost") as c:
        yield c


def assert_same(a: object, b: object, where: str = "") -> None:
    """Equal JSON documents: the same keys (in any order, as JSON objects are unordered), lists
    in the same order, the same values; floats to 1e-6 (the server
    computes on its worker thread, where threaded kernels may round the last bit differently)."""
    if isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6), (where, a, b)
    elif isinstance(a, dict) and isinstance(b, dict):
        assert sorted(a) == sorted(b), (where, sorted(a), sorted(b))
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), (where, len(a), len(b))
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize("case", list(CASES))
def test_cli_json_equals_the_http_document(
    case: str, client: TestClient, capsys: pytest.CaptureFixture[str]
) -> None:
    flags, fields = CASES[case]
    args = ["nodes", PROMPT, "--target", " Mary", "--distractor", " John", "-k", "4", "--json"]
    assert main([*args, *flags]) == 0, capsys.readouterr().err
    from_cli = json.loads(capsys.readouterr().out)
    response = client.post("/api/nodes", json=IOI | {"k": 4} | fields)
    assert response.status_code == 200, response.text
    document = response.json()
    # Rows always carry the explanation fields over HTTP (null: the server has no scan);
    # `tdb nodes --json` has them only with --scan.
    for row in document["nodes"]:
        assert row.pop("explanation") is None and row.pop("explanation_score") is None
    assert_same(from_cli, document)
    assert from_cli["nodes"], "an empty table proves nothing"


def test_python_keywords_build_the_same_request(demo: LoadedModel) -> None:
    by_keywords = node_table(demo, PROMPT, " Mary", " John", k=3, ablate=["h2.3@13:1"])
    request = NodeRequest(PROMPT, " Mary", " John", k=3, ablate=("h2.3@13:1",))
    assert_same(by_keywords.to_json(), run_request(demo, request).to_json())


def test_sort_and_node_types_only_reorder_and_filter_the_rows(demo: LoadedModel) -> None:
    full = node_table(demo, PROMPT, " Mary", " John", k=4)
    shown = node_table(
        demo,
        PROMPT,
        " Mary",
        " John",
        k=4,
        sort=Group.DIRECT_EFFECT,
        node_types=[NodeType.ATTENTION_HEAD],
    )
    heads = [n for n in full.nodes if n.node_type is NodeType.ATTENTION_HEAD]
    assert sorted(shown.nodes) == sorted(heads)
    effects = [abs(v) for v in shown.values[Group.DIRECT_EFFECT]]
    assert effects == sorted(effects, reverse=True)  # signed metric: by magnitude


def test_comparison_and_resample_source_are_separate_fields(demo: LoadedModel) -> None:
    with pytest.raises(TdbError, match="none is given"):
        node_table(demo, PROMPT, " Mary", " John", resample_prompt=SECOND)
    with pytest.raises(TdbError, match="not both"):  # the older name never overrides silently
        node_table(demo, PROMPT, " Mary", " John", second_prompt=SECOND, compare_prompt=PROMPT)
    resampled = node_table(
        demo, PROMPT, " Mary", " John", ablate=["h0.1@13:resample"], resample_prompt=SECOND
    )
    assert resampled.baseline_value is not None and resampled.right_value is None
    compared = node_table(demo, PROMPT, " Mary", " John", compare_prompt=SECOND)
    assert compared.right_value is not None and compared.baseline_value is None


@pytest.mark.slow  # two dense ablated tables of every node, as the reference
def test_a_comparison_with_ablations_compares_the_two_ablated_prompts(
    demo: LoadedModel,
) -> None:
    """Both prompts run under the ablations: each row's left and right values are the values
    the ablated table of each prompt alone has for that node (every node kept there)."""
    ablate = ["h2.3@13:1", "n1.7@12"]
    both = node_table(demo, PROMPT, " Mary", " John", k=4, ablate=ablate, compare_prompt=SECOND)
    alone = {
        prompt: node_table(demo, prompt, " Mary", " John", k=100_000, ablate=ablate)
        for prompt in (PROMPT, SECOND)
    }
    rows = {p: {n["id"]: n for n in t.to_json()["nodes"]} for p, t in alone.items()}
    document = both.to_json()
    assert document["nodes"]
    for node in document["nodes"]:
        for group in ("activation", "direct_effect", "act_times_grad"):
            left, right = rows[PROMPT][node["id"]][group], rows[SECOND][node["id"]][group]
            assert math.isclose(node[group], left, rel_tol=1e-5, abs_tol=1e-6), node["id"]
            assert math.isclose(node[f"{group}_right"], right, rel_tol=1e-5, abs_tol=1e-6)
            assert math.isclose(node[f"{group}_diff"], right - left, rel_tol=1e-5, abs_tol=1e-5)
    assert both.right_value == pytest.approx(alone[SECOND].direction_value, abs=1e-5)
    assert both.direction_value == pytest.approx(alone[PROMPT].direction_value, abs=1e-5)
    unablated = node_table(demo, PROMPT, " Mary", " John", k=1)
    assert both.baseline_value == pytest.approx(unablated.direction_value, abs=1e-5)
    assert both.baseline_value != pytest.approx(both.direction_value, abs=1e-3)  # it bites


def test_bad_display_options_name_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["nodes", PROMPT, "--target", " Mary", "--distractor", " John"]
    for bad, message in [
        (["--sort", "loudness"], "--sort: 'loudness' is not one of activation"),
        (["--groups", "activation", "--sort", "direct_effect"], "not among the metrics shown"),
        (["--node-types", "neuron"], "--node-types: 'neuron' is not one of embedding"),
        (["--groups", "activation,activation"], "each metric may appear once"),
    ]:
        assert main([*base, *bad]) == 2
        assert message in capsys.readouterr().err


def test_a_trace_needs_no_target_unless_through_the_value(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Tracing a node explains its pre-activation: target and distractor are only read by a
    trace through a head's value (its write is projected on the downstream gradient)."""
    assert main(["nodes", PROMPT, "--trace", "h2.1@13:9:k", "--json", "-k", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["direction"]["kind"] == "attention_logit" and out["direction"]["through"] == "k"
    assert main(["nodes", PROMPT, "--trace", "n1.5@13", "--json", "-k", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["direction"]["kind"] == "mlp_pre_activation"
    assert main(["nodes", PROMPT, "--trace", "h2.1@13:9:v"]) == 2
    assert "give --target/--distractor" in capsys.readouterr().err
    through_v = ["--trace", "h2.1@13:9:v", "--downstream", "n2.4@13", "--json", "-k", "2"]
    assert main(["nodes", PROMPT, *through_v]) == 0
    assert json.loads(capsys.readouterr().out)["direction"]["downstream"] == "n2.4@13"


def test_zero_ablating_an_inactive_latent_warns(demo: LoadedModel) -> None:
    """A TopK SAE latent that is 0 at a token changes nothing when zero-ablated there: the
    table says so instead of silently showing no effect; an active one gets no warning."""
    latents = ["am2.235@13", "am2.0@13", "am2.1@13", "am2.2@13"]  # 235: active (a top row)
    tables = [
        node_table(demo, PROMPT, " Mary", " John", k=1, ablate=[latent], mlp_nodes="both")
        for latent in latents
    ]
    inert = [t for t in tables if t.warnings]
    assert inert and len(inert) < len(tables)
    for table in tables:
        unchanged = table.direction_value == table.baseline_value
        assert unchanged == bool(table.warnings), (table.warnings, table.direction_value)
    assert "changes nothing: its activation there is already 0" in inert[0].warnings[0]


def test_a_trace_table_holds_what_interventions_md_says(demo: LoadedModel) -> None:
    """Tracing neuron 1.5 at token 13: no later layer, no layer-1 neuron, no token after 13;
    layer-1 heads at other queries can appear (activation, write magnitude) with direct effect
    and act x grad exactly 0, as docs/interventions.md says."""
    table = node_table(demo, PROMPT, k=10, trace="n1.5@13")
    assert all(n.layer is None or n.layer <= 1 for n in table.nodes)
    assert not [n for n in table.nodes if n.layer == 1 and n.node_type is NodeType.MLP_NEURON]
    assert all(n.token <= 13 for n in table.nodes)
    same_layer = [
        i
        for i, n in enumerate(table.nodes)
        if n.layer == 1 and n.node_type is NodeType.ATTENTION_HEAD and n.token != 13
    ]
    assert same_layer, "the case the docs describe did not occur"
    for i in same_layer:
        assert table.values[Group.DIRECT_EFFECT][i] == 0
        assert table.values[Group.ACT_TIMES_GRAD][i] == 0
