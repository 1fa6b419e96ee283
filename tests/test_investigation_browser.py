"""The saved-investigation round trip in headless Chromium (Debian's, driven by Playwright, as
tests/test_server_browser.py): the IOI example, one ablation, Save (the download is captured),
Open in a fresh page (banner, the same table), `tdb replay` on the saved file; and `/docs`
rendering its route list with every request off this server aborted."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import test_server_browser
from playwright.sync_api import Browser, Page, Route, expect

from tdb.cli import main

pytestmark = pytest.mark.slow  # headless Chromium

# The same live demo server and Chromium as the page's other browser tests.
base_url = test_server_browser.base_url
browser = test_server_browser.browser
TIMEOUT_MS = test_server_browser.TIMEOUT_MS


def new_page(browser: Browser, errors: list[str]) -> Page:
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.on("pageerror", lambda e: errors.append(str(e)))
    return page


def wait_for_results(page: Page) -> None:
    expect(page.locator("#node-table tbody tr").first).to_be_visible()
    expect(page.locator("#status")).to_have_text("")
    expect(page.locator("#submit")).to_be_enabled()


def table_rows(page: Page) -> list[str]:
    return page.locator("#node-table tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.node + ' ' + r.innerText)"
    )


def test_save_open_and_replay(
    browser: Browser, base_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    errors: list[str] = []
    page = new_page(browser, errors)
    page.goto(base_url + "/")
    page.click("#example")
    page.click("#submit")
    wait_for_results(page)
    head = page.locator("#node-table tbody tr[data-node^='h']").first
    head_id = head.get_attribute("data-node")
    head.locator('button[data-action="ablate"]').click()
    expect(page.locator('[data-testid="ablation"]')).to_contain_text(str(head_id))
    expect(page.locator("#direction-extra")).to_contain_text("before ablation")
    wait_for_results(page)
    value = page.locator("#direction-value").inner_text()
    rows = table_rows(page)
    url = page.url

    with page.expect_download() as download:
        page.click("#save-investigation")
    saved = tmp_path / "investigation.json"
    download.value.save_as(saved)
    assert download.value.suggested_filename.startswith("tdb-investigation-")
    doc = json.loads(saved.read_text())
    assert doc["format"] == "tdb-investigation" and doc["version"] == 1
    assert doc["model"]["name"] == "demo" and doc["model"]["fingerprint"].startswith("sha256:")
    # The page's batches: tokenize while typing (the example fills the fields), the table,
    # the table with the ablation.
    assert {s["route"] for s in doc["steps"]} == {"/api/batch"} and len(doc["steps"]) >= 2
    last = doc["steps"][-1]
    assert last["page"] == url.removeprefix(base_url)
    assert last["request"]["requests"][0]["request"]["ablate"] == [head_id]
    assert last["status"] == 200 and last["response"]["responses"][0]["status"] == 200

    # The record follows the investigation to another page of the same tab.
    page.click("#dataset-tab")
    expect(page.locator("#investigation-tools")).to_be_visible()
    with page.expect_download() as elsewhere:
        page.click("#save-investigation")
    elsewhere.value.save_as(tmp_path / "elsewhere.json")
    assert json.loads((tmp_path / "elsewhere.json").read_text())["steps"] == doc["steps"]

    # Open it in a fresh page (its own browser context: nothing shared but the file).
    fresh = new_page(browser, errors)
    fresh.goto(base_url + "/dataset")
    fresh.set_input_files("#open-investigation", str(saved))
    banner = fresh.locator("#investigation-banner")
    count = len(doc["steps"])
    expect(banner).to_contain_text(
        f"opened investigation investigation.json ({count} steps, saved "
    )
    expect(banner).to_contain_text("the restored view matches the saved result")
    wait_for_results(fresh)
    assert fresh.url == url
    assert fresh.locator("#direction-value").inner_text() == value
    assert table_rows(fresh) == rows
    expect(fresh.locator('[data-testid="ablation"]')).to_contain_text(str(head_id))

    # Saving again keeps the opened steps (the restored view is not recorded twice).
    with fresh.expect_download() as again:
        fresh.click("#save-investigation")
    resaved = tmp_path / "again.json"
    again.value.save_as(resaved)
    assert json.loads(resaved.read_text())["steps"] == doc["steps"]

    # tdb replay recomputes both steps the same; an edited number is found by the page too.
    assert main(["replay", str(saved)]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert out.splitlines()[:count] == [f"step {i} /api/batch: same" for i in range(count)]

    node = last["response"]["responses"][0]["body"]["nodes"][0]
    node["values"]["direct_effect"] = (node["values"]["direct_effect"] or 0) + 1.0
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(doc))
    assert main(["replay", str(edited)]) == 1
    assert f"nodes[{node['id']}].values.direct_effect" in capsys.readouterr().out
    fresh.goto(base_url + "/")
    fresh.set_input_files("#open-investigation", str(edited))
    expect(banner).to_contain_text("the restored view differs from the saved result")
    expect(banner).to_contain_text(f"nodes[{node['id']}].values.direct_effect")

    # A file saved with another model: the banner names both fingerprints.
    doc["model"] = {"name": "elsewhere", "fingerprint": "sha256:0123456789abcdef"}
    edited.write_text(json.dumps(doc))
    fresh.set_input_files("#open-investigation", str(edited))
    expect(banner).to_contain_text("saved with model elsewhere (0123456789ab), now demo (")

    # A file that is not an investigation: a message, the page stays where it is.
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    fresh.set_input_files("#open-investigation", str(tmp_path / "bad.json"))
    expect(banner).to_contain_text("cannot open bad.json: not an investigation")
    assert errors == []


def test_docs_render_offline(browser: Browser, base_url: str) -> None:
    errors: list[str] = []
    page = new_page(browser, errors)
    host = urlsplit(base_url).netloc
    blocked: list[str] = []

    def only_this_server(route: Route) -> None:
        if urlsplit(route.request.url).netloc == host:
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    page.route("**/*", only_this_server)
    page.goto(base_url + "/docs")
    expect(page.locator(".swagger-ui .opblock-summary-path").first).to_be_visible()
    paths = page.locator(".swagger-ui .opblock-summary-path").all_inner_texts()
    assert {"/api/model", "/api/nodes", "/api/batch", "/api/circuit"} <= {
        p.strip().replace("\u200b", "") for p in paths
    }
    assert blocked == []
    assert errors == []


def test_a_dataset_view_round_trip(browser: Browser, base_url: str, tmp_path: Path) -> None:
    """The dataset view's request is in its URL: Open runs it again and compares."""
    errors: list[str] = []
    page = new_page(browser, errors)
    page.goto(base_url + "/dataset?task=ioi&n=4&seed=0&method=atp&component=heads&ig_steps=10")
    # The page runs the URL's request once it has started: wait until it is recorded.
    page.wait_for_function(
        "() => JSON.parse(sessionStorage.getItem('tdb-investigation-steps') ?? '[]').length > 0"
    )
    expect(page.locator("#status")).to_have_text("")
    expect(page.locator("#run")).to_be_enabled()
    with page.expect_download() as download:
        page.click("#save-investigation")
    saved = tmp_path / "dataset.json"
    download.value.save_as(saved)
    steps = json.loads(saved.read_text())["steps"]
    assert [s["route"] for s in steps] == ["/api/attribute"] and steps[0]["status"] == 200

    fresh = new_page(browser, errors)
    fresh.goto(base_url + "/")
    fresh.set_input_files("#open-investigation", str(saved))
    banner = fresh.locator("#investigation-banner")
    expect(banner).to_contain_text("opened investigation dataset.json (1 step, saved ")
    expect(banner).to_contain_text("the restored view matches the saved result")
    assert fresh.url == page.url
    assert errors == []
