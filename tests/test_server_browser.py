"""The web page in headless Chromium (Debian's package, driven by Playwright): submit the IOI
prompt, ablate, trace, compare two prompts, and reload the URL into the same state.

A failing test saves a screenshot of the page to $TDB_TEST_ARTIFACTS (default test-artifacts/).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_server import live_server
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tdb.checkpoint import LoadedModel
from tdb.server.app import create_app

pytestmark = pytest.mark.slow  # headless Chromium

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(
    os.environ.get("TDB_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts")
)
TIMEOUT_MS = 60_000  # generous: the CPUs may be shared
expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture(scope="module")
def base_url(demo: LoadedModel) -> Iterator[str]:
    with live_server(create_app(demo)) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: bash scripts/setup.sh installs Debian's chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--headless"]
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    report = getattr(request.node, "report_call", None)
    if report is None or report.failed:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', request.node.name)}.png"
        page.screenshot(path=str(path), full_page=True)
        print(f"screenshot of the failed test: {path}")
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def wait_for_results(page: Page) -> None:
    expect(page.locator("#status")).to_have_text("")
    expect(page.locator("#submit")).to_be_enabled()


def submit_ioi(page: Page, base_url: str) -> None:
    page.goto(base_url + "/")
    page.click("#example")
    page.click("#submit")
    expect(page.locator("#node-table tbody tr").first).to_be_visible()
    wait_for_results(page)


def direction_value(page: Page) -> float:
    return float(page.locator("#direction-value").inner_text())


def test_ioi_ablate_trace_and_reload(page: Page, base_url: str) -> None:
    submit_ioi(page, base_url)
    assert page.locator("#node-table tbody tr").count() > 10
    before = direction_value(page)
    assert before > 0  # the demo model prefers " Mary"
    candidates = page.locator("#candidates tr.pinned td.token").all_inner_texts()
    assert candidates == ['" Mary"', '" John"']

    # Sort by estimated total effect, then ablate the top row: the direction's value changes.
    page.click('#node-table th[data-column="act_times_grad"]')
    top = page.locator("#node-table tbody tr").first
    top_id = top.get_attribute("data-node")
    assert top_id
    top.locator('button[data-action="ablate"]').click()
    expect(page.locator('[data-testid="ablation"]')).to_contain_text(top_id)
    wait_for_results(page)
    expect(page.locator("#direction-extra")).to_contain_text("before ablation")
    after = direction_value(page)
    assert abs(after - before) > 0.1, (before, after)
    assert "act_times_grad_diff" in page.locator("#node-table thead").inner_html()
    page.check("#full-columns")  # compact by default: value and change; all columns on demand
    assert "act_times_grad_baseline" in page.locator("#node-table thead").inner_html()

    # Trace the first head through its query.
    head = page.locator("#node-table tbody tr[data-node^='h']").first
    head_id = head.get_attribute("data-node")
    head.locator('button[data-action="trace q"]').click()
    expect(page.locator('[data-testid="trace"]')).to_contain_text(f"{head_id}:q")
    wait_for_results(page)
    expect(page.locator("#direction-label")).to_contain_text(f"attention_logit of {head_id}")
    traced_value = page.locator("#direction-value").inner_text()
    pinned = page.locator("#candidates tr.pinned td.token").all_inner_texts()
    assert pinned == ['" Mary"', '" John"']  # still pinned while the direction is a trace
    rows = page.locator("#node-table tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.node)"
    )
    assert rows

    # The URL holds the investigation: reloading it shows the same state.
    url = page.url
    assert "ablate=" in url and "trace=" in url and "sort=act_times_grad" in url
    page.goto(url)
    expect(page.locator("#node-table tbody tr").first).to_be_visible()
    wait_for_results(page)
    expect(page.locator('[data-testid="ablation"]')).to_contain_text(top_id)
    expect(page.locator('[data-testid="trace"]')).to_contain_text(f"{head_id}:q")
    assert page.locator("#direction-value").inner_text() == traced_value
    assert page.locator("#prompt").input_value().startswith("When Mary and John")
    reloaded = page.locator("#node-table tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.node)"
    )
    assert reloaded == rows

    # Removing the trace and the ablation brings back the first value.
    page.locator('[data-testid="trace"] button').click()
    wait_for_results(page)
    page.locator('[data-testid="ablation"] button').click()
    wait_for_results(page)
    expect(page.locator("#direction-extra")).to_have_text("")
    assert direction_value(page) == pytest.approx(before, abs=1e-3)


def test_two_prompts_heatmap_views_and_node_types(page: Page, base_url: str) -> None:
    submit_ioi(page, base_url)
    # Token heatmap: one column per prompt token, a row per kind of node.
    assert page.locator("#heatmap thead th").count() == 15  # a label column and 14 tokens
    assert page.locator("#heatmap tbody tr").count() == 4

    page.fill("#second", "When Tom and Anna went to the park, Anna gave a ball to")
    page.click("#submit")
    expect(page.locator("#direction-extra")).to_contain_text("second prompt")
    wait_for_results(page)
    header = page.locator("#node-table thead").inner_text()
    assert "(left)" in header and "(diff)" in header
    page.check("#full-columns")
    assert "(right)" in page.locator("#node-table thead").inner_text()

    # Node types: only heads remain; the server answers from its cache.
    page.locator('#node-types input[value="embedding"]').uncheck()
    page.locator('#node-types input[value="mlp_neuron"]').uncheck()
    wait_for_results(page)
    expect(page.locator("#node-table tbody tr[data-node^='n']")).to_have_count(0)
    assert page.locator("#node-table tbody tr[data-node^='h']").count() > 0

    # A node's token view.
    page.locator("#node-table tbody tr").first.locator('button[data-action="views"]').click()
    expect(page.locator('[data-testid="view"]')).to_have_count(1)
    expect(page.locator('[data-testid="view"]')).to_contain_text("promotes")


def test_a_multi_token_target_is_explained(page: Page, base_url: str) -> None:
    page.goto(base_url + "/")
    page.click("#example")
    page.fill("#target", " Maryanne")
    # Shown while typing, before the request is submitted.
    expect(page.locator('[data-testid="warning-target"]')).to_contain_text("not a single token")
    page.click("#submit")
    expect(page.locator('[data-testid="warning-target"]')).to_contain_text('" Mary" | "an" | "ne"')
    expect(page.locator("#error")).to_contain_text("must be a single token")


def test_sae_latents_replace_neurons_and_heads_and_stay_in_the_url(
    page: Page, base_url: str
) -> None:
    submit_ioi(page, base_url)
    page.select_option("#mlp-nodes", "latents")
    wait_for_results(page)
    page.select_option("#attn-nodes", "latents")
    wait_for_results(page)
    expect(page.locator("#node-table tbody tr[data-node^='am']").first).to_be_visible()
    assert page.locator("#node-table tbody tr[data-node^='aa']").count() > 0
    expect(page.locator("#node-table tbody tr[data-node^='n']")).to_have_count(0)
    expect(page.locator("#node-table tbody tr[data-node^='h']")).to_have_count(0)
    assert "mlp=latents" in page.url and "attn=latents" in page.url

    # Ablating a latent changes the direction; a reload restores the whole state.
    before = direction_value(page)
    page.locator("#node-table tbody tr[data-node^='am2'][data-node$='@13']").first.locator(
        'button[data-action="ablate"]'
    ).click()
    wait_for_results(page)
    assert direction_value(page) != before
    url = page.url
    page.goto(url)
    wait_for_results(page)
    assert page.url == url and page.locator("#mlp-nodes").input_value() == "latents"
    expect(page.locator("#node-table tbody tr[data-node^='am']").first).to_be_visible()
