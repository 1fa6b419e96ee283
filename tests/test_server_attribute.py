"""Task-level attribution over HTTP (`POST /api/attribute`, `GET /api/tasks`) and the dataset
page: the same numbers as `tdb.attribution.attribution` called directly, every bad request a 4xx
naming its field, each limit at and past it, docs/server.md's example real output, and the page
in headless Chromium (a task run, an uploaded file, a malformed one)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from live_server import live_server
from playwright.sync_api import Page, expect
from test_docs_contract import same
from test_server_browser import browser, page  # noqa: F401  (fixtures)

from tdb.attribution import Task, attribution, task_records
from tdb.checkpoint import LoadedModel
from tdb.server.app import create_app

LOCAL = "http://localhost"  # the server answers only to localhost names
ROOT = Path(__file__).parent.parent
HEADS = {"components": ["heads"]}  # 24 heads on the demo model: small and quick


@pytest.fixture(scope="module")
def client(demo: LoadedModel) -> Iterator[TestClient]:
    with TestClient(create_app(demo, max_prompt_tokens=40), base_url=LOCAL) as c:
        yield c


def close(api: object, direct: object, where: str = "") -> None:
    """The API's document equals the direct one: floats to 1e-5, everything else exactly."""
    if isinstance(direct, float):
        assert isinstance(api, float) and math.isclose(api, direct, abs_tol=1e-5), where
    elif isinstance(direct, dict):
        assert isinstance(api, dict) and set(api) == set(direct), (where, api, direct)
        for key, value in direct.items():
            close(api[key], value, f"{where}.{key}")
    elif isinstance(direct, list):
        assert isinstance(api, list) and len(api) == len(direct), where
        for i, value in enumerate(direct):
            close(api[i], value, f"{where}[{i}]")
    else:
        assert api == direct, (where, api, direct)


def without_links(doc: dict[str, object]) -> dict[str, object]:
    rows = doc["components"]
    assert isinstance(rows, list)
    return doc | {"components": [{k: v for k, v in r.items() if k != "component"} for r in rows]}


def test_tasks_are_listed(client: TestClient) -> None:
    assert client.get("/api/tasks").json() == {
        "tasks": [t.value for t in Task],
        "max_n": 256,
        "max_records": 512,
    }
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/attribute", "/api/tasks"} <= set(paths)


def test_the_dataset_page_and_its_assets_are_served(client: TestClient) -> None:
    html = client.get("/dataset")
    assert html.status_code == 200 and "text/html" in html.headers["content-type"]
    assert '<script type="module" src="/static/dataset.js">' in html.text
    assert 'href="/dataset"' in client.get("/").text  # reachable from the node table
    scripts = [client.get(f"/static/{name}.js") for name in ("dataset", "common")]
    assert all("javascript" in s.headers["content-type"] for s in scripts)
    for asset in [html.text, *(s.text for s in scripts)]:  # offline: nothing from elsewhere
        assert "http://" not in asset and "https://" not in asset


def test_a_task_request_equals_the_python_api(client: TestClient, demo: LoadedModel) -> None:
    request = {"task": {"name": "ioi", "n": 8, "seed": 3}, "methods": ["ig", "exact"]} | HEADS
    response = client.post("/api/attribute", json=request)
    assert response.status_code == 200, response.text
    assert response.headers["x-tdb-cache"] == "miss"
    out = response.json()
    records = task_records("ioi", n=8, seed=3, tokenizer=demo.tokenizer)
    direct = attribution(demo, records, methods=["ig", "exact"], components=["heads"])
    close(without_links(out), json.loads(json.dumps(direct.to_json())))
    assert len(out["components"]) == 24 and out["n_prompts"] == 8
    for row in out["components"]:  # the node table's link scheme (tdb.nodes.component_link)
        assert row["component"] == f"/component/attention_head/{row['layer']}/{row['index']}"
    again = client.post("/api/attribute", json=request)
    assert again.headers["x-tdb-cache"] == "hit" and again.json() == out


@pytest.mark.parametrize(
    ("records", "options"),
    [
        pytest.param(
            "capitals",
            {"methods": ["atp", "atp*"], "k": 5},
            # atp*'s torch.func.jvp first imports torch._decomp, which calls the deprecated
            # torch.jit.script (torch 2.13): a warning, an error under filterwarnings=error.
            marks=pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated"),
        ),
        ("induction", {"ablation": "zero", "by": "position", "k": 10, "verify": 2}),
        ("ioi-logprob", {"logprob": True, "ablation": "mean", "ig_steps": 3}),
    ],
    ids=["capitals-atp", "induction-by-position", "ioi-logprob-mean"],
)
def test_a_dataset_request_equals_the_python_api(
    client: TestClient, demo: LoadedModel, records: str, options: dict[str, object]
) -> None:
    task, _, variant = records.partition("-")
    lines = task_records(task, n=4, seed=1, tokenizer=demo.tokenizer)
    if variant == "logprob":  # log p(target) needs no distractor nor corrupted twin
        lines = [{"prompt": r["prompt"], "target": r["target"]} for r in lines]
    response = client.post("/api/attribute", json={"dataset": lines} | HEADS | options)
    assert response.status_code == 200, response.text
    direct = attribution(demo, lines, components=["heads"], **options)  # type: ignore[arg-type]
    close(without_links(response.json()), json.loads(json.dumps(direct.to_json())))


def test_a_dataset_of_a_tasks_records_equals_the_task(
    client: TestClient, demo: LoadedModel
) -> None:
    task = client.post("/api/attribute", json={"task": {"name": "capitals", "n": 4}} | HEADS)
    records = task_records("capitals", n=4, seed=0, tokenizer=demo.tokenizer)
    dataset = client.post("/api/attribute", json={"dataset": records} | HEADS)
    assert task.status_code == dataset.status_code == 200
    assert task.json() == dataset.json()


IOI_LINE = {
    "prompt": "When Mary and John went to the store, John gave a drink to",
    "target": " Mary",
    "distractor": " John",
    "corrupted": "When Mary and John went to the store, Paul gave a drink to",
}
TASK = {"task": {"name": "ioi", "n": 2}}
BAD_REQUESTS = [
    ({}, 400, "give dataset (a list of records) or task"),
    (TASK | {"dataset": [IOI_LINE]}, 400, "give dataset or task, not both"),
    ({"dataset": []}, 422, "dataset: List should have at least 1 item"),
    ({"dataset": [IOI_LINE, {"prompt": 5}]}, 422, "dataset.1.prompt: Input should be"),
    ({"dataset": [IOI_LINE | {"promt": "x"}]}, 422, "dataset.0.promt: Extra inputs"),
    ({"dataset": [IOI_LINE, {"prompt": "hi"}]}, 400, "dataset line 2: missing 'target'"),
    ({"dataset": [{"target": " Mary"}]}, 400, "dataset line 1: missing 'prompt'"),
    ({"dataset": [IOI_LINE | {"target": " Maryanne"}]}, 400, "dataset line 1: target ' Maryanne'"),
    (
        {"dataset": [IOI_LINE | {"corrupted": "short"}]},
        400,
        "corrupted has 2 tokens, prompt has 14",
    ),
    ({"dataset": [IOI_LINE | {"prompt_ids": [1, 2]}]}, 400, "give prompt or prompt_ids"),
    (
        {"dataset": [IOI_LINE | {"prompt": "x " * 41, "corrupted": None}]},
        400,
        "this server takes at most 40",
    ),
    ({"dataset": [IOI_LINE | {"target": None, "target_ids": [99999]}]}, 400, "99999"),
    ({"dataset": [IOI_LINE], "methods": ["ig", "eaxct"]}, 422, "methods.1: Input should be"),
    ({"dataset": [IOI_LINE], "methods": []}, 422, "methods: List should have at least 1 item"),
    ({"dataset": [IOI_LINE], "components": ["layers"]}, 422, "components.0: Input should be"),
    ({"dataset": [IOI_LINE], "ablation": "resample"}, 422, "ablation: Input should be"),
    ({"dataset": [IOI_LINE], "by": "token"}, 422, "by: Input should be"),
    ({"dataset": [{"prompt": "a", "target": " Mary"}]}, 400, "no distractor"),
    (TASK | {"ablation": "corrupted", "dataset": None}, 200, ""),  # null: absent
    (
        {"dataset": [IOI_LINE | {"corrupted": None}], "ablation": "corrupted"},
        400,
        "dataset line 1: no 'corrupted' prompt",
    ),
    ({"task": {"name": "ioi", "n": 0}}, 422, "task.n: Input should be greater than or equal to 1"),
    ({"task": {"name": "ioi", "n": 257}}, 422, "task.n: Input should be less than or equal to 256"),
    ({"task": {"name": "ioi", "n": "8"}}, 422, "task.n: Input should be a valid integer"),
    ({"task": {"name": "iou"}}, 422, "task.name: Input should be 'ioi', 'induction' or 'capitals'"),
    ({"task": {"n": 4}}, 422, "task.name: Field required"),
    (TASK | {"ig_steps": 0}, 422, "ig_steps: Input should be greater than or equal to 1"),
    (TASK | {"ig_steps": 51}, 422, "ig_steps: Input should be less than or equal to 50"),
    (TASK | {"verify": 21}, 422, "verify: Input should be less than or equal to 20"),
    (TASK | {"k": 0}, 422, "k: Input should be greater than or equal to 1"),
    (TASK | {"logprob": "yes"}, 422, "logprob: Input should be a valid boolean"),
    (TASK | {"by": "position"}, 400, "by position: the prompts must have one token count"),
    (TASK | {"methodz": ["ig"]}, 422, "methodz: Extra inputs are not permitted"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_REQUESTS)
def test_bad_requests_get_a_4xx_naming_the_field(
    client: TestClient, body: dict[str, object], status: int, message: str
) -> None:
    response = client.post("/api/attribute", json=HEADS | body)
    assert response.status_code == status, response.text
    if status == 200:
        return
    error = response.json()["error"]
    assert message in error, error
    assert "Traceback" not in response.text and "--" not in error


def test_malformed_json_and_wrong_method(client: TestClient) -> None:
    headers = {"content-type": "application/json"}
    bad = client.post("/api/attribute", content=b'{"task": ', headers=headers)
    assert bad.status_code == 422 and "not valid JSON" in bad.json()["error"]
    assert client.get("/api/attribute").status_code == 405


# docs/server.md's limits table: each at the limit (through the schema) and one past it.
LIMITS = [
    (
        "records",  # 512 through the schema; the dataset check then finds the bad last one
        {"dataset": [IOI_LINE] * 511 + [{"prompt": "hi"}]},
        400,
        {"dataset": [IOI_LINE] * 513},
        422,
    ),
    (
        "task n",
        {"task": {"name": "induction", "n": 256}, "ig_steps": 1},
        200,
        TASK | {"task": {"name": "ioi", "n": 257}},
        422,
    ),
    (
        "ig steps",
        {"task": {"name": "ioi", "n": 1}, "ig_steps": 50},
        200,
        TASK | {"ig_steps": 51},
        422,
    ),
    ("verify", TASK | {"verify": 20}, 200, TASK | {"verify": 21}, 422),
]


@pytest.mark.parametrize(
    ("at", "at_status", "past", "past_status"),
    [case[1:] for case in LIMITS],
    ids=[str(case[0]) for case in LIMITS],
)
def test_each_attribution_limit_at_and_past_it(
    client: TestClient,
    at: dict[str, object],
    at_status: int,
    past: dict[str, object],
    past_status: int,
) -> None:
    response = client.post("/api/attribute", json=at | HEADS)
    assert response.status_code == at_status, response.text
    if at_status == 400:
        assert "dataset line 512: missing 'target'" in response.json()["error"]
    response = client.post("/api/attribute", json=past | HEADS)
    assert response.status_code == past_status, response.text


def docs_section() -> str:
    doc = (ROOT / "docs" / "server.md").read_text()
    start = doc.index("## Task-level attribution")
    return doc[start : doc.index("\n## ", start + 1)]


def test_the_documented_example_is_real_output(client: TestClient) -> None:
    request, response = (
        json.loads(block)
        for block in re.findall(r"```json\n(.*?)```", docs_section(), re.DOTALL)[:2]
    )
    out = client.post("/api/attribute", json=request)
    assert out.status_code == 200, out.text
    same(response, out.json())


# ---- the dataset page, in headless Chromium --------------------------------------------------


@pytest.fixture(scope="module")
def base_url(demo: LoadedModel) -> Iterator[str]:
    with live_server(create_app(demo)) as url:
        yield url


def run_and_wait(tab: Page) -> None:
    tab.click("#run")
    expect(tab.locator("#status")).to_have_text("")
    expect(tab.locator("#run")).to_be_enabled()


@pytest.mark.slow  # headless Chromium
def test_the_dataset_view_runs_a_task(page: Page, base_url: str) -> None:  # noqa: F811
    page.goto(base_url + "/")
    page.click("#dataset-tab")
    expect(page).to_have_url(base_url + "/dataset")
    expect(page.locator("#task option")).to_have_count(3)
    page.select_option("#task", "ioi")
    page.fill("#n", "8")
    assert page.locator("#methods input:checked").evaluate_all("b => b.map(x => x.value)") == ["ig"]
    run_and_wait(page)
    expect(page.locator("#error")).to_be_hidden()
    assert float(page.locator("#metric-clean").inner_text()) > 0  # the model does IOI
    assert page.locator("#metric-corrupted").is_visible()
    # The table: the 24 heads, one score column; each id links to its component page.
    expect(page.locator("#scores tbody tr")).to_have_count(24)
    assert page.locator("#scores thead th[data-column]").all_inner_texts() == ["ig"]
    href = page.locator("#scores tbody tr").first.locator("a").get_attribute("href")
    assert href and re.fullmatch(r"/component/attention_head/\d+/\d+", href)
    # The heatmap: 3 layers x 8 heads, coloured, the value in each cell's tooltip.
    expect(page.locator("#head-heatmap tbody tr")).to_have_count(3)
    cells = page.locator("#head-heatmap td.cell")
    expect(cells).to_have_count(24)
    top = page.locator("#scores tbody tr").first.get_attribute("data-component")
    cell = page.locator(f'#head-heatmap td[data-head="{top}"]')
    assert cell.get_attribute("title", timeout=1000).startswith(f"{top}: ")  # type: ignore[union-attr]
    assert "rgba(220, 50, 47" in (cell.get_attribute("style") or "")  # the top head: red
    # Sorting by the column reverses on a second click; the URL reruns the task.
    page.click('#scores th[data-column="ig"]')
    page.click('#scores th[data-column="ig"]')
    values = [float(v) for v in page.locator("#scores tbody td[data-column=ig]").all_inner_texts()]
    assert values == sorted(values)
    assert "task=ioi" in page.url and "n=8" in page.url
    page.goto(page.url)
    expect(page.locator("#scores tbody tr")).to_have_count(24)


@pytest.mark.slow  # headless Chromium
def test_an_uploaded_file_runs_and_a_malformed_one_shows_its_line(
    page: Page,  # noqa: F811
    base_url: str,
) -> None:
    page.goto(base_url + "/dataset")
    expect(page.locator("#task option")).to_have_count(3)
    good = json.dumps(IOI_LINE)

    def upload(name: str, text: str) -> None:
        page.set_input_files(
            "#file", files=[{"name": name, "mimeType": "text/plain", "buffer": text.encode()}]
        )

    # Not JSON: found in the browser, before any request.
    upload("broken.jsonl", good + "\n" + '{"prompt": "x",\n')
    expect(page.locator("#error")).to_contain_text("broken.jsonl line 2: not JSON")
    # JSON the server refuses: its record number becomes the file's line (blank lines count).
    upload("bad.jsonl", good + "\n\n" + json.dumps({"prompt": "hi"}) + "\n")
    expect(page.locator("#error")).to_be_hidden()
    run_and_wait(page)
    expect(page.locator("#error")).to_contain_text("bad.jsonl line 3: missing 'target'")
    expect(page.locator("#results")).to_be_hidden()
    # A good file runs.
    upload("good.jsonl", good + "\n" + good + "\n")
    expect(page.locator("#file-info")).to_have_text("2 records")
    run_and_wait(page)
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#scores tbody tr")).to_have_count(24)
