"""The main page as a workbench, in headless Chromium: the table's default order (direct effect,
checked against the API's numbers sorted by brute force), widths at 1,440 and 800 px, no dead
ends (a failing ablation removable by its chip, k clamped, errors in the page's words), space
warnings, TDB's candidates (probabilities against a softmax of the model's logits, ranks from 1),
the second prompt's own target, and SAE latents in the heatmap.

Fixtures (the live server, Chromium, a page that saves a screenshot on failure) are those of
tests/test_server_browser.py.
"""

from __future__ import annotations

import math
from urllib.parse import urlencode

import httpx
import pytest
import torch
from playwright.sync_api import Page, Route, expect
from test_server_browser import base_url, browser, page, wait_for_results

from tdb.checkpoint import LoadedModel

__all__ = ["base_url", "browser", "page"]  # fixtures, imported for pytest

pytestmark = pytest.mark.slow  # headless Chromium

IOI = {
    "prompt": "When Mary and John went to the store, John gave a drink to",
    "target": " Mary",
    "distractor": " John",
}
SECOND = "When Tom and Anna went to the park, Anna gave a ball to"


def open_page(page: Page, base_url: str, **params: object) -> None:
    query = urlencode({**IOI, **params}, doseq=True)
    page.goto(f"{base_url}/?{query}")
    # Before the page's script runs, the status is already empty: wait for an answer first.
    page.wait_for_selector("#results:not([hidden]), #error:not([hidden])")
    wait_for_results(page)


def row_ids(page: Page) -> list[str]:
    return page.locator("#node-table tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.node)"
    )


def no_page_scroll(page: Page) -> bool:
    return bool(page.evaluate("document.scrollingElement.scrollWidth <= window.innerWidth"))


def is_trivial(row: dict[str, object], columns: list[str]) -> bool:
    """The page's rule, restated: a head at query token 0, or every effect ≈ 0."""
    if row["node_type"] == "attention_head" and row["token"] == 0:
        return True
    values = row["values"]
    assert isinstance(values, dict)
    effects = [c for c in columns if c.startswith(("direct_effect", "act_times_grad"))]
    return all(abs(values[c] or 0.0) < 1e-6 for c in effects)


def test_default_order_is_direct_effect_by_magnitude(page: Page, base_url: str) -> None:
    open_page(page, base_url, k=10)
    api = httpx.post(f"{base_url}/api/nodes", json={**IOI, "k": 10}, timeout=60).json()
    rows, columns = api["nodes"], api["columns"]
    # Brute force: every non-trivial row, by |direct effect|, ties in the API's order.
    expected = [
        r["id"]
        for _, r in sorted(
            ((i, r) for i, r in enumerate(rows) if not is_trivial(r, columns)),
            key=lambda x: (-abs(x[1]["values"]["direct_effect"]), x[0]),
        )
    ]
    assert row_ids(page) == expected
    hidden = len(rows) - len(expected)
    assert hidden > 0  # the IOI table has heads at the first token
    expect(page.locator("#trivial-count")).to_have_text(f"({hidden} hidden)")
    assert "sort=" not in page.url  # the default needs no URL

    # Trivial rows on demand: every row, in the same brute-force order.
    page.check("#show-trivial")
    everything = [
        r["id"]
        for _, r in sorted(
            enumerate(rows), key=lambda x: (-abs(x[1]["values"]["direct_effect"]), x[0])
        )
    ]
    assert row_ids(page) == everything

    # The type filter and the id search narrow the rows; the URL keeps them.
    page.select_option("#type-filter", "attention_head")
    assert all(i.startswith("h") for i in row_ids(page)) and row_ids(page)
    page.fill("#search", "h1.")
    assert all(i.startswith("h1.") for i in row_ids(page))
    assert "type=attention_head" in page.url and "search=h1." in page.url

    # Headers say what they mean; colours are scaled per node type.
    title = page.locator('#node-table th[data-column="direct_effect"]').get_attribute("title")
    assert title and "write vector" in title
    label = page.locator('#node-table th[data-column="act_times_grad"]').inner_text()
    assert label.startswith("est. total effect")


def test_widths_at_1440_and_800_px(page: Page, base_url: str) -> None:
    for width in (1440, 800):
        page.set_viewport_size({"width": width, "height": 900})
        # An ablation: compact columns (value and change) fit 1,440 px without scrolling.
        open_page(page, base_url, ablate="h2.1@13:9")
        assert no_page_scroll(page), width
        header = page.locator("#node-table thead").inner_text()
        assert "(after)" in header and "(change)" in header and "(before)" not in header
        if width == 1440:
            fits = page.evaluate(
                "(() => { const b = document.querySelector('.table-box');"
                " return b.scrollWidth <= b.clientWidth; })()"
            )
            assert fits
        # Every column on demand: the table scrolls in its box, never the page; the actions
        # column stays in view (sticky).
        page.check("#full-columns")
        assert "(before)" in page.locator("#node-table thead").inner_text()
        assert no_page_scroll(page), width
        box = page.locator("#node-table tbody tr td.actions").first.bounding_box()
        assert box is not None and box["x"] + box["width"] <= width
        # A second prompt.
        open_page(page, base_url, second=SECOND, second_target=" Tom", second_distractor=" Anna")
        assert no_page_scroll(page), width


def test_a_failing_ablation_is_a_chip_that_removes_it(page: Page, base_url: str) -> None:
    open_page(page, base_url)
    good = page.locator("#direction-value").inner_text()
    open_page(page, base_url, ablate="h9.9@13:1")
    expect(page.locator("#error")).to_be_visible()
    assert "--" not in page.locator("#error").inner_text()
    chip = page.locator('[data-testid="ablation"]')
    expect(chip).to_contain_text("h9.9@13:1")
    chip.locator("button").click()
    wait_for_results(page)
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator('[data-testid="ablation"]')).to_have_count(0)
    assert page.locator("#direction-value").inner_text() == good
    assert "ablate" not in page.url

    # After an error the previous results are greyed, not shown as current.
    page.locator("#node-table tbody tr").first.locator('button[data-action="views"]').click()
    wait_for_results(page)
    page.goto(page.url + "&view=n9.9@1")
    wait_for_results(page)
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator('[data-testid="view-chip"]')).to_have_count(2)


def test_stale_results_are_greyed_and_errors_name_the_page_fields(
    page: Page, base_url: str
) -> None:
    open_page(page, base_url)
    page.fill("#second", "Two tokens")
    page.click("#submit")
    wait_for_results(page)
    error = page.locator("#error").inner_text()
    assert "Second prompt" in error and "--" not in error, error
    expect(page.locator("#results")).to_have_class("stale")


def test_k_is_clamped_with_a_note(page: Page, base_url: str) -> None:
    open_page(page, base_url, k=100000)
    expect(page.locator("#error")).to_be_hidden()
    assert page.locator("#k").input_value() == "100"
    expect(page.locator("#k-note")).to_contain_text("k = 100000")
    assert "k=100&" in page.url or page.url.endswith("k=100")


def test_space_warnings(page: Page, base_url: str) -> None:
    page.goto(base_url + "/")
    page.fill("#prompt", IOI["prompt"] + " ")
    expect(page.locator('[data-testid="warning-prompt-space"]')).to_contain_text(
        "ends with a space"
    )
    page.fill("#target", "Mary")
    # After a trailing space a target without its space is what the prompt asks: no warning.
    expect(page.locator('[data-testid="warning-target-space"]')).to_have_count(0)
    page.fill("#prompt", IOI["prompt"])
    expect(page.locator('[data-testid="warning-prompt-space"]')).to_have_count(0)
    expect(page.locator('[data-testid="warning-target-space"]')).to_contain_text('" Mary"')
    page.fill("#target", " Mary")
    expect(page.locator('[data-testid="warning-target-space"]')).to_have_count(0)


def test_candidates_match_a_softmax_of_the_logits(
    page: Page, base_url: str, demo: LoadedModel
) -> None:
    open_page(page, base_url)
    with torch.no_grad():
        tokens = torch.tensor([demo.tokenizer.encode(IOI["prompt"])])
        logits = demo.model(tokens)[0, -1].double()
    probs = torch.softmax(logits, dim=-1)
    rows = page.locator("#candidates tbody tr").evaluate_all(
        """rows => rows.map(r => ({
            token: Number(r.dataset.token), role: r.querySelector('.role').textContent,
            rank: Number(r.querySelector('.rank').textContent),
            logit: Number(r.querySelector('.logit').textContent),
            prob: Number(r.querySelector('.prob').textContent.replace('%', '')) / 100,
            relative: Number(r.querySelector('.relative').textContent)}))"""
    )
    mary, john = (demo.tokenizer.encode(t)[0] for t in (" Mary", " John"))
    assert [(r["role"], r["token"]) for r in rows[:2]] == [("target", mary), ("distractor", john)]
    top = rows[2:]
    assert [r["rank"] for r in top] == list(range(1, len(top) + 1))
    assert [r["token"] for r in top] == torch.topk(logits, len(top)).indices.tolist()
    for r in rows:
        assert r["prob"] == pytest.approx(float(probs[r["token"]]), abs=6e-5)
        assert r["logit"] == pytest.approx(float(logits[r["token"]]), abs=1e-3)
        assert r["relative"] == pytest.approx(float(logits[r["token"]] - logits[mary]), abs=2e-3)
    assert sum(r["prob"] for r in top) <= 1
    target_rank = 1 + int((logits > logits[mary]).sum())
    assert rows[0]["rank"] == target_rank
    loss = page.locator("#loss").inner_text()
    assert float(loss.split("=")[-1]) == pytest.approx(-math.log(float(probs[mary])), abs=1e-3)

    # The log-prob direction.
    page.check("#logprob")
    page.click("#submit")
    wait_for_results(page)
    expect(page.locator("#direction-label")).to_contain_text('log p(" Mary")')
    value = float(page.locator("#direction-value").inner_text())
    assert value == pytest.approx(math.log(float(probs[mary])), abs=1e-3)
    assert "logprob=1" in page.url


def test_second_prompt_has_its_own_target_and_keeps_views_and_trace(
    page: Page, base_url: str
) -> None:
    open_page(page, base_url)
    head = page.locator("#node-table tbody tr[data-node^='h']").first
    head_id = head.get_attribute("data-node")
    head.locator('button[data-action="views"]').click()
    wait_for_results(page)
    page.fill("#second", SECOND)
    page.fill("#second-target", " Tom")
    page.fill("#second-distractor", " Anna")
    page.click("#submit")
    wait_for_results(page)
    alone = httpx.post(
        f"{base_url}/api/views",
        json={"prompt": SECOND, "target": " Tom", "distractor": " Anna"},
        timeout=60,
    ).json()["direction"]["value"]
    extra = page.locator("#direction-extra").inner_text()
    assert f"second prompt {alone:.3f}" in extra, (extra, alone)
    assert alone > 0
    expect(page.locator("#right-tokens")).to_contain_text("Tom")
    expect(page.locator('[data-testid="view-chip"]')).to_contain_text(str(head_id))
    expect(page.locator('[data-testid="view"]')).to_have_count(1)
    # A trace on both prompts keeps the second prompt.
    page.locator("#node-table tbody tr[data-node^='h']").first.locator(
        'button[data-action="trace q"]'
    ).click()
    wait_for_results(page)
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator('[data-testid="trace"]')).to_be_visible()
    assert "second=" in page.url


def test_a_second_prompt_with_an_ablation_compares_both_ablated(page: Page, base_url: str) -> None:
    params = {"second": SECOND, "second_target": " Tom", "second_distractor": " Anna"}
    open_page(page, base_url, ablate="h2.1@13:9", **params)
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator('[data-testid="ablation"]')).to_have_count(1)
    body = {**IOI, "k": 10, "ablate": ["h2.1@13:9"], "compare_prompt": SECOND}
    body |= {"compare_target": " Tom", "compare_distractor": " Anna"}
    direction = httpx.post(f"{base_url}/api/nodes", json=body, timeout=60).json()["direction"]
    extra = page.locator("#direction-extra").inner_text()
    assert f"before ablation {direction['baseline_value']:.3f}" in extra, (extra, direction)
    assert f"second prompt {direction['right_value']:.3f}" in extra, (extra, direction)


def test_latents_in_the_heatmap_with_a_trace_action_and_a_hint(page: Page, base_url: str) -> None:
    open_page(page, base_url, mlp="latents")
    cells = page.locator('#heatmap tr[data-row="latents_mlp_out"] td').all_inner_texts()
    assert cells and any(abs(float(c)) > 1e-3 for c in cells), cells
    expect(page.locator('#heatmap tr[data-row="mlp"]')).to_have_count(0)
    latent = page.locator("#node-table tbody tr[data-type='autoencoder_latent']").first
    latent_id = latent.get_attribute("data-node")
    latent.locator('button[data-action="trace"]').click()
    wait_for_results(page)
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#direction-label")).to_contain_text(str(latent_id))
    page.locator('[data-testid="trace"] button').click()
    wait_for_results(page)
    page.locator('#node-types input[value="autoencoder_latent"]').uncheck()
    wait_for_results(page)
    expect(page.locator("#latent-hint")).to_be_visible()
    page.locator("#latent-hint button").click()
    wait_for_results(page)
    expect(page.locator("#latent-hint")).to_be_hidden()
    expect(
        page.locator("#node-table tbody tr[data-type='autoencoder_latent']").first
    ).to_be_visible()


def test_explanations_show_when_rows_carry_them(page: Page, base_url: str) -> None:
    # Rows get `explanation` / `explanation_score` from a server with a scan's explanations:
    # added here to the live answers, as such a server would send them.
    sentence = "fires on the second mention of a name, right before the indirect object"

    def with_explanations(route: Route) -> None:
        response = route.fetch()
        body = response.json()
        first = body["responses"][0]
        if first["status"] == 200 and "nodes" in (first["body"] or {}):
            for node in first["body"]["nodes"]:
                if node["node_type"] == "attention_head":
                    node |= {"explanation": sentence, "explanation_score": 0.42}
        route.fulfill(response=response, json=body)

    page.route("**/api/batch", with_explanations)
    open_page(page, base_url)
    expect(page.locator("#node-table thead")).to_contain_text("explanation")
    cell = page.locator("#node-table tbody tr[data-type='attention_head'] td.explanation").first
    expect(cell).to_contain_text("(0.420)")
    assert "…" in cell.inner_text() and sentence in (cell.get_attribute("title") or "")
    neuron = page.locator("#node-table tbody tr[data-type='mlp_neuron'] td.explanation").first
    expect(neuron).to_have_text("")


def test_a_schema_error_names_the_field_not_its_path(page: Page, base_url: str) -> None:
    open_page(page, base_url, target="x" * 201)
    error = page.locator("#error").inner_text()
    assert error.startswith("target"), error
    assert "requests." not in error
