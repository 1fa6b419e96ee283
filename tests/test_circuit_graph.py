"""The circuit's pictures (`tdb.circuit.graph`) and `POST /api/circuit` with its page.

The SVG is parsed as XML and read back: one link per component to its component page, one
curve per edge with its width growing with |score| and its colour by sign, q/k/v told apart,
tooltips. The PNG is a PNG. The route answers what `find_circuit` called directly answers, with
the SVGs `circuit_svg` / `curve_svg` draw of it; bad requests are 4xx naming the field; the
page runs a circuit in headless Chromium and its boxes link to component pages."""

from __future__ import annotations

import itertools
import json
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from live_server import live_server
from playwright.sync_api import Page, expect
from test_docs_contract import same
from test_server_attribute import IOI_LINE, close
from test_server_browser import browser, page  # noqa: F401  (fixtures)

from tdb.attribution import task_records
from tdb.checkpoint import LoadedModel
from tdb.circuit import Circuit, CurvePoint, Edge
from tdb.circuit.graph import circuit_svg, curve_png, curve_svg
from tdb.circuit.search import find_circuit
from tdb.server.app import create_app

SVG = "{http://www.w3.org/2000/svg}"
LOCAL = "http://localhost"
ROOT = Path(__file__).parent.parent
N_LAYER = 3

CIRCUIT = Circuit(
    metric_kind="logit_diff",
    clean=14.6,
    corrupted=-0.7,
    m_empty=0.5,
    m_circuit=12.0,
    n_prompts=8,
    ablation="corrupted",
    method="ig",
    target_faithfulness=0.8,
    components=("h2.1", "h0.4", "h1.3", "n1.234", "n0.7", "am1.42", "aa0.5"),
    candidates=48,
    curve=(CurvePoint(1, 0.4, 0.05), CurvePoint(2, float("nan"), 0.1), CurvePoint(7, 0.82, 0.2)),
    edges=(
        Edge("h2.1", "logits", "logits", 5.0, 4.8),
        Edge("h0.4", "h2.1", "q", 2.0),
        Edge("h0.4", "h2.1", "k", -1.0, -0.9),
        Edge("h1.3", "h2.1", "v", 0.5),
        Edge("embed", "h0.4", "q", 3.0),
        Edge("n0.7", "n1.234", "mlp", -0.25),
        Edge("aa0.5", "am1.42", "mlp", 0.1),
        Edge("am1.42", "logits", "logits", 0.0),
    ),
)
LINKS = {
    "h2.1": "/component/attention_head/2/1",
    "h0.4": "/component/attention_head/0/4",
    "h1.3": "/component/attention_head/1/3",
    "n1.234": "/component/mlp_neuron/1/234",
    "n0.7": "/component/mlp_neuron/0/7",
    "am1.42": "/component/autoencoder_latent/1/42?site=mlp_out",
    "aa0.5": "/component/autoencoder_latent/0/5?site=attn_out",
}


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)  # raises on XML that is not well formed
    assert root.tag == f"{SVG}svg"
    return root


def edges_of(root: ET.Element) -> list[ET.Element]:
    return [p for p in root.iter(f"{SVG}path") if p.get("class") == "edge"]


def title(element: ET.Element) -> str:
    found = element.find(f"{SVG}title")
    assert found is not None and found.text, ET.tostring(element)
    return found.text


def test_one_link_per_component_to_its_page_with_a_tooltip() -> None:
    root = parse(circuit_svg(CIRCUIT, N_LAYER))
    links = root.findall(f".//{SVG}a")
    assert {a.get("data-id"): a.get("href") for a in links} == LINKS
    assert len(links) == len(CIRCUIT.components)
    for a in links:
        text = title(a)
        cid = a.get("data-id")
        assert text.startswith(f"{cid}: ")
        rank = CIRCUIT.components.index(str(cid)) + 1
        assert f"#{rank} of 7 by ig score" in text
        labels = [t.text for t in a.iter(f"{SVG}text")]
        assert labels[0] == (cid[1:] if cid and cid.startswith("h") else cid)  # heads: "2.1"
    h21 = title(next(a for a in links if a.get("data-id") == "h2.1"))
    assert "edges in: 3, scores sum 1.5" in h21 and "to logits: score 5, exact 4.8" in h21


def test_one_edge_each_width_by_score_colour_by_sign_with_a_tooltip() -> None:
    paths = edges_of(parse(circuit_svg(CIRCUIT, N_LAYER)))
    assert len(paths) == len(CIRCUIT.edges)
    by_key = {(p.get("data-from"), p.get("data-to"), p.get("data-input")): p for p in paths}
    widths = []
    for edge in CIRCUIT.edges:
        path = by_key[(edge.source, edge.target, edge.input)]
        widths.append((abs(edge.score), float(path.get("stroke-width", "nan"))))
        assert path.get("stroke") == ("#1f5fbf" if edge.score < 0 else "#c62828")
        exact = "none" if edge.exact is None else f"{edge.exact:.4g}"
        assert title(path) == (
            f"{edge.source} -> {edge.target} ({edge.input}): score {edge.score:.4g}, exact {exact}"
        )
    widths.sort()
    for (a, wa), (b, wb) in itertools.pairwise(widths):
        assert wa < wb if a < b else wa == wb, widths
    # Drawn weakest first, so the strongest lies on top.
    scores = [abs(float(p.get("data-score", "nan"))) for p in paths]
    assert scores == sorted(scores)


def end_point(path: ET.Element) -> tuple[float, float]:
    numbers = re.findall(r"-?\d+(?:\.\d+)?", path.get("d", ""))
    return float(numbers[-2]), float(numbers[-1])


def test_q_k_v_are_told_apart_by_dash_and_by_where_they_enter() -> None:
    root = parse(circuit_svg(CIRCUIT, N_LAYER))
    into = {p.get("data-input"): p for p in edges_of(root) if p.get("data-to") == "h2.1"}
    dashes = {name: into[name].get("stroke-dasharray") for name in "qkv"}
    assert len(set(dashes.values())) == 3, dashes
    xs = [end_point(into[name])[0] for name in "qkv"]
    assert xs == sorted(xs) and len(set(xs)) == 3  # q left, k middle, v right
    assert len({end_point(into[name])[1] for name in "qkv"}) == 1  # all at the box's bottom
    legend = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert all(f"into {name}" in legend for name in "qkv")


def test_the_embeddings_are_below_and_the_logits_above() -> None:
    paths = edges_of(parse(circuit_svg(CIRCUIT, N_LAYER)))
    for p in paths:  # every edge goes up the page (y grows downwards)
        numbers = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", p.get("d", ""))]
        assert numbers[1] > numbers[-1], p.attrib


def test_an_empty_circuit_and_a_bad_one() -> None:
    empty = Circuit("logprob", 1.0, None, 0.0, 0.0, 2, "mean", "atp", 0.9, (), 24, (), ())
    root = parse(circuit_svg(empty, N_LAYER))
    assert root.findall(f".//{SVG}a") == [] and edges_of(root) == []
    parse(curve_svg(empty))
    with pytest.raises(ValueError, match=r"h3\.0: layer 3 is outside 0\.\.2"):
        circuit_svg(Circuit(**{**empty.__dict__, "components": ("h3.0",)}), N_LAYER)
    with pytest.raises(ValueError, match="not a component id"):
        circuit_svg(Circuit(**{**empty.__dict__, "components": ("h1.2@3",)}), N_LAYER)


def test_the_curve_svg_has_both_curves_and_the_target() -> None:
    root = parse(curve_svg(CIRCUIT))
    lines = {p.get("class"): p for p in root.iter(f"{SVG}polyline")}
    # The NaN at n=2 breaks the top-n line in two; the random line is whole.
    top = [p for p in root.iter(f"{SVG}polyline") if p.get("class") == "curve-top-n"]
    assert [len(p.get("points", "").split()) for p in top] == [1, 1]
    assert len(lines["curve-random"].get("points", "").split()) == 3
    titles = [title(e) for e in root.iter() if e.find(f"{SVG}title") is not None]
    assert "target 0.8" in titles


def test_curve_png_writes_a_png(tmp_path: Path) -> None:
    path = tmp_path / "curve.png"
    curve_png(CIRCUIT, path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (600, 400)


# ---- POST /api/circuit ------------------------------------------------------------------------

HEADS = {"components": ["heads"]}
SMALL = {"task": {"name": "ioi", "n": 8, "seed": 0}, "max_components": 20} | HEADS


@pytest.fixture(scope="module")
def client(demo: LoadedModel) -> Iterator[TestClient]:
    with TestClient(create_app(demo, max_prompt_tokens=40), base_url=LOCAL) as c:
        yield c


def test_a_task_request_equals_find_circuit(client: TestClient, demo: LoadedModel) -> None:
    request = SMALL | {"max_edges": 10, "verify": 2}
    response = client.post("/api/circuit", json=request)
    assert response.status_code == 200, response.text
    assert response.headers["x-tdb-cache"] == "miss"
    out = response.json()
    records = task_records("ioi", n=8, seed=0, tokenizer=demo.tokenizer)
    direct = find_circuit(
        demo, records, components=["heads"], max_components=20, max_edges=10, verify=2
    )
    svg, curve, links = out.pop("svg"), out.pop("curve_svg"), out.pop("links")
    close(out, json.loads(json.dumps(direct.to_json())))
    assert svg == circuit_svg(direct, demo.model.config.n_layer)
    assert curve == curve_svg(direct)
    assert links == {c: f"/component/attention_head/{c[1]}/{c[3:]}" for c in direct.components}
    assert len(edges_of(parse(svg))) == len(direct.edges)
    again = client.post("/api/circuit", json=request)
    assert again.headers["x-tdb-cache"] == "hit"
    assert json.loads(again.content) == json.loads(response.content)


def test_a_dataset_request_equals_find_circuit(client: TestClient, demo: LoadedModel) -> None:
    lines = task_records("capitals", n=4, seed=1, tokenizer=demo.tokenizer)
    options = {"method": "atp", "ablation": "mean", "target_faithfulness": 0.5, "max_edges": 5}
    response = client.post(
        "/api/circuit", json={"dataset": lines, "max_components": 10} | HEADS | options
    )
    assert response.status_code == 200, response.text
    direct = find_circuit(demo, lines, components=["heads"], max_components=10, **options)  # type: ignore[arg-type]
    out = response.json()
    for key in ("svg", "curve_svg", "links"):
        out.pop(key)
    close(out, json.loads(json.dumps(direct.to_json())))


TASK = {"task": {"name": "ioi", "n": 2}} | HEADS
BAD_REQUESTS = [
    ({}, 400, "give dataset (a list of records) or task"),
    (TASK | {"dataset": [IOI_LINE]}, 400, "give dataset or task, not both"),
    ({"dataset": [IOI_LINE | {"promt": "x"}]}, 422, "dataset.0.promt: Extra inputs"),
    ({"dataset": [IOI_LINE, {"prompt": "hi"}]}, 400, "dataset line 2: missing 'target'"),
    (TASK | {"method": "eaxct"}, 422, "method: Input should be 'exact', 'atp', 'atp*' or 'ig'"),
    (TASK | {"methods": ["ig"]}, 422, "methods: Extra inputs are not permitted"),
    (TASK | {"components": []}, 422, "components: List should have at least 1 item"),
    (TASK | {"ablation": "resample"}, 422, "ablation: Input should be"),
    (TASK | {"max_components": 0}, 422, "max_components: Input should be greater than or equal"),
    (TASK | {"max_components": 201}, 422, "max_components: Input should be less than or equal"),
    (TASK | {"max_components": 2.5}, 422, "max_components: Input should be a valid integer"),
    (TASK | {"target_faithfulness": 0}, 422, "target_faithfulness: Input should be greater than 0"),
    (TASK | {"target_faithfulness": 1.5}, 422, "target_faithfulness: Input should be less than"),
    (TASK | {"target_faithfulness": "0.8"}, 422, "target_faithfulness: Input should be a valid"),
    (TASK | {"max_edges": -1}, 422, "max_edges: Input should be greater than or equal to 0"),
    (TASK | {"max_edges": 1001}, 422, "max_edges: Input should be less than or equal to 1000"),
    (TASK | {"verify": 21}, 422, "verify: Input should be less than or equal to 20"),
    (TASK | {"ig_steps": 0}, 422, "ig_steps: Input should be greater than or equal to 1"),
    (TASK | {"task": {"name": "ioi", "n": 257}}, 422, "task.n: Input should be less than"),
    (
        {"dataset": [IOI_LINE | {"corrupted": None}], "ablation": "corrupted"},
        400,
        "dataset line 1: no 'corrupted' prompt",
    ),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_REQUESTS)
def test_bad_requests_get_a_4xx_naming_the_field(
    client: TestClient, body: dict[str, object], status: int, message: str
) -> None:
    response = client.post("/api/circuit", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error, error
    assert "Traceback" not in response.text and "--" not in error


# docs/server.md's limits table: each at the limit (through the schema) and one past it.
ONE = {"task": {"name": "ioi", "n": 1}} | HEADS
LIMITS = [
    ("max components", ONE | {"max_components": 200}, ONE | {"max_components": 201}),
    ("target faithfulness", ONE | {"target_faithfulness": 1}, ONE | {"target_faithfulness": 0}),
    ("max edges", ONE | {"max_edges": 1000}, ONE | {"max_edges": 1001}),
    ("verify", ONE | {"verify": 20, "max_components": 4}, ONE | {"verify": 21}),
]


@pytest.mark.parametrize(
    ("at", "past"), [case[1:] for case in LIMITS], ids=[str(case[0]) for case in LIMITS]
)
def test_each_circuit_limit_at_and_past_it(
    client: TestClient, at: dict[str, object], past: dict[str, object]
) -> None:
    response = client.post("/api/circuit", json=at)
    assert response.status_code == 200, response.text
    response = client.post("/api/circuit", json=past)
    assert response.status_code == 422, response.text


def docs_section() -> str:
    doc = (ROOT / "docs" / "server.md").read_text()
    start = doc.index("## Circuits: `POST /api/circuit`")
    return doc[start : doc.index("\n## ", start + 1)]


def test_the_documented_example_is_real_output(client: TestClient) -> None:
    """The example leaves out the two SVGs (each a few kB); the rest is as the route answers."""
    request, response = (
        json.loads(block)
        for block in re.findall(r"```json\n(.*?)```", docs_section(), re.DOTALL)[:2]
    )
    out = client.post("/api/circuit", json=request)
    assert out.status_code == 200, out.text
    real = out.json()
    assert real.pop("svg").startswith("<svg") and real.pop("curve_svg").startswith("<svg")
    same(response, real)


def test_the_circuit_page_is_served_and_linked(client: TestClient) -> None:
    html = client.get("/circuit")
    assert html.status_code == 200 and "text/html" in html.headers["content-type"]
    assert '<script type="module" src="/static/circuit.js">' in html.text
    for page_path in ("/", "/dataset"):
        assert 'href="/circuit"' in client.get(page_path).text
    scripts = [client.get(f"/static/{name}.js") for name in ("circuit", "pairs")]
    assert all("javascript" in s.headers["content-type"] for s in scripts)
    for asset in [html.text, *(s.text for s in scripts)]:  # offline: nothing from elsewhere
        assert "http://" not in asset and "https://" not in asset


# ---- the circuit page, in headless Chromium ---------------------------------------------------


@pytest.fixture(scope="module")
def base_url(demo: LoadedModel) -> Iterator[str]:
    with live_server(create_app(demo)) as url:
        yield url


def run_and_wait(tab: Page) -> None:
    tab.click("#run")
    expect(tab.locator("#status")).to_have_text("")
    expect(tab.locator("#run")).to_be_enabled()


@pytest.mark.slow  # headless Chromium
def test_the_circuit_view_runs_and_links_to_component_pages(
    page: Page,  # noqa: F811
    base_url: str,
) -> None:
    page.goto(base_url + "/dataset")
    page.click("#circuit-tab")
    expect(page).to_have_url(base_url + "/circuit")
    expect(page.locator("#task option")).to_have_count(3)
    page.select_option("#task", "ioi")
    page.fill("#n", "8")
    page.fill("#max-components", "12")
    page.fill("#max-edges", "15")
    run_and_wait(page)
    expect(page.locator("#error")).to_be_hidden()
    faithfulness = float(page.locator("#faithfulness").inner_text())
    assert math.isfinite(faithfulness)
    # The graph, inline: one link per component, the same as the table's rows.
    boxes = page.locator("#graph svg a.node")
    rows = page.locator("#components-table tbody tr")
    n = rows.count()
    assert n >= 1
    expect(boxes).to_have_count(n)
    assert (
        page.locator("#graph svg path.edge").count()
        == page.locator("#edges-table tbody tr").count()
    )
    top = rows.first.get_attribute("data-component")
    box = page.locator(f'#graph svg a.node[data-id="{top}"]')
    expect(box).to_be_visible()
    assert (box.locator("title").text_content() or "").startswith(f"{top}: ")
    box.hover()
    href = box.get_attribute("href")
    assert href and re.fullmatch(r"/component/attention_head/\d+/\d+", href)
    # The curve beside it: both lines and the target.
    expect(page.locator("#curve svg polyline.curve-top-n").first).to_be_visible()
    expect(page.locator("#curve svg polyline.curve-random").first).to_be_visible()
    # A click on the box follows its link (the page is a 404 without `tdb serve --scan`).
    with page.expect_navigation():
        box.click()
    assert page.url == base_url + href
    # Back: the URL reruns the task (answered from the cache).
    page.go_back()
    expect(page.locator("#graph svg a.node")).to_have_count(n)


@pytest.mark.slow  # headless Chromium
def test_the_circuit_view_shows_errors(page: Page, base_url: str) -> None:  # noqa: F811
    page.goto(base_url + "/circuit")
    expect(page.locator("#task option")).to_have_count(3)
    page.fill("#target", "0")
    run_and_wait(page)
    expect(page.locator("#error")).to_contain_text("target_faithfulness: Input should be")
    expect(page.locator("#results")).to_be_hidden()
    page.set_input_files(
        "#file",
        files=[{"name": "bad.jsonl", "mimeType": "text/plain", "buffer": b'{"prompt": "hi"}\n'}],
    )
    page.fill("#target", "0.8")
    run_and_wait(page)
    expect(page.locator("#error")).to_contain_text("bad.jsonl line 1: missing 'target'")
