"""Explanations shown wherever a component appears, and component pages worth opening, against
independent computations: explanations.parquet read with pandas, activations from the naive
reference model (tests/reference.py), the logit lens by a plain matrix product.

A scan of the tiny test model over a few documents, explained by `tdb explain`, serves most
tests; the documented example (docs/node-table.md) is real output of the demo model."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from fastapi.testclient import TestClient
from reference import naive_run
from transformers import GPT2LMHeadModel

from tdb.checkpoint import LoadedModel
from tdb.cli import main
from tdb.explain import explain
from tdb.scan import ScanSettings, scan
from tdb.scan.corpus import DEMO_CORPUS
from tdb.scan.routes import mount_scan
from tdb.server.app import create_app

ROOT = Path(__file__).parent.parent
PROMPT = [5, 9, 2, 7, 5, 9]  # token ids: the tiny model's tokenizer has few whole words


@pytest.fixture(scope="module")
def explained(
    tmp_path_factory: pytest.TempPathFactory, checkpoint_dir: Path, loaded: LoadedModel
) -> Path:
    from test_scan import make_documents

    folder = tmp_path_factory.mktemp("explained")
    corpus = folder / "docs.txt"
    corpus.write_text("".join(d + "\n" for d in make_documents()))
    out = folder / "scan"
    scan(corpus, out, ScanSettings(model=str(checkpoint_dir), k=3, window=8, context=3))
    result = explain(out)
    assert result.explained == result.total > 0
    return out


def parquet_rows(out: Path) -> dict[tuple[str, int, int], dict[str, object]]:
    frame = pd.read_parquet(out / "explanations.parquet")
    return {(r["node_type"], int(r["layer"]), int(r["index"])): r for r in frame.to_dict("records")}


def nodes_json(capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, object]:
    ids = ",".join(map(str, PROMPT))
    argv = ["nodes", "--token-ids", ids, "--target-id", "3", "--distractor-id", "4", "-k", "3"]
    assert main([*argv, *extra, "--json"]) == 0
    out: dict[str, object] = json.loads(capsys.readouterr().out)
    return out


def test_nodes_scan_adds_each_rows_explanation(
    explained: Path, checkpoint_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = parquet_rows(explained)
    doc = nodes_json(capsys, "--model", str(checkpoint_dir), "--scan", str(explained))
    rows = doc["nodes"]
    assert isinstance(rows, list)
    kinds = set()
    for row in rows:
        if row["node_type"] == "embedding":
            assert row["explanation"] is None and row["explanation_score"] is None
            continue
        kinds.add(row["node_type"])
        # A head's node at any (query, key) pair is that head's explanation.
        e = expected[row["node_type"], row["layer"], row["index"]]
        assert row["explanation"] == e["explanation"]
        assert row["explanation_score"] == pytest.approx(e["score"])
    assert kinds == {"attention_head", "mlp_neuron"}
    # Without --scan the rows have no such fields (the documented JSON stays as it is).
    plain = nodes_json(capsys, "--model", str(checkpoint_dir))
    assert all("explanation" not in row for row in plain["nodes"])  # type: ignore[union-attr]


def test_nodes_scan_prints_an_explanation_column(
    explained: Path, checkpoint_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = ",".join(map(str, PROMPT))
    argv = ["nodes", "--token-ids", ids, "--target-id", "3", "--distractor-id", "4", "-k", "2"]
    assert main([*argv, "--model", str(checkpoint_dir), "--scan", str(explained)]) == 0
    out = capsys.readouterr().out
    assert "explanation" in out
    first = next(iter(parquet_rows(explained).values()))
    assert str(first["explanation"])[:10] in out or "…" in out


def test_nodes_scan_bad_folders_are_one_line_errors(
    explained: Path, checkpoint_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = ",".join(map(str, PROMPT))
    argv = ["nodes", "--token-ids", ids, "--target-id", "3", "--distractor-id", "4"]
    bare = tmp_path / "bare"
    shutil.copytree(explained, bare)
    (bare / "explanations.parquet").unlink()
    cases = {
        str(tmp_path / "nothing"): "holds no finished scan",
        str(bare): f"run `tdb explain --scan {bare}`",
    }
    for folder, message in cases.items():
        assert main([*argv, "--model", str(checkpoint_dir), "--scan", folder]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err
    # The scan is of the tiny model; the demo model (no --model) is another model.
    assert main([*argv, "--scan", str(explained)]) == 2
    err = capsys.readouterr().err
    assert "the scan was made with the model at" in err and str(checkpoint_dir) in err


def test_python_with_explanations(explained: Path, loaded: LoadedModel) -> None:
    from tdb.scan.explanations import Explanations, with_explanations
    from tdb.table import node_table

    table = node_table(loaded, PROMPT, target=3, distractor=4, k=3)
    annotated = with_explanations(table, Explanations.read(explained, loaded))
    expected = parquet_rows(explained)
    frame = annotated.to_dataframe()
    for node, text in zip(annotated.nodes, frame["explanation"], strict=True):
        if node.layer is None:
            assert pd.isna(text)
        else:
            assert text == expected[node.node_type.value, node.layer, node.index]["explanation"]
    # Sorting keeps each row's explanation with its node.
    from tdb.metrics import Group

    resorted = annotated.select(None, Group.DIRECT_EFFECT)
    assert resorted.explanations is not None
    for node, text in zip(resorted.nodes, resorted.explanations, strict=True):
        if node.layer is not None:
            assert text == expected[node.node_type.value, node.layer, node.index]["explanation"]


@pytest.fixture(scope="module")
def client(explained: Path, loaded: LoadedModel) -> TestClient:
    app = create_app(loaded)
    mount_scan(app, explained)
    return TestClient(app, base_url="http://localhost")


def test_explanation_routes(client: TestClient, explained: Path, tmp_path: Path) -> None:
    expected = parquet_rows(explained)
    every = client.get("/api/explanations").json()["explanations"]
    assert len(every) == len(expected)
    for e in every:
        row = expected[e["node_type"], e["layer"], e["index"]]
        assert e["explanation"] == row["explanation"]
        assert e["evidence"] == json.loads(str(row["evidence"]))
    heads = client.get("/api/explanations", params={"node_type": "attention_head", "layer": 1})
    assert {(e["node_type"], e["layer"]) for e in heads.json()["explanations"]} == {
        ("attention_head", 1)
    }
    assert len(heads.json()["explanations"]) == sum(
        1 for t, layer, _ in expected if (t, layer) == ("attention_head", 1)
    )
    one = client.get("/api/explanations/mlp_neuron/0/5").json()
    assert one["id"] == "n0.5" and one["explanation"] == expected["mlp_neuron", 0, 5]["explanation"]
    missing = client.get("/api/explanations/mlp_neuron/0/100000")
    assert missing.status_code == 404 and "tdb explain --scan" in missing.json()["error"]
    assert client.get("/api/explanations", params={"node_type": "neuron"}).status_code == 422

    # A scan with no explanations: 404 naming the command to run.
    bare = tmp_path / "bare"
    shutil.copytree(explained, bare)
    (bare / "explanations.parquet").unlink()
    from fastapi import FastAPI

    from tdb.scan.routes import scan_router

    app = FastAPI()
    app.include_router(scan_router(bare))
    got = TestClient(app).get("/api/explanations")
    assert got.status_code == 404 and f"tdb explain --scan {bare}" in got.json()["detail"]


def test_node_table_rows_carry_explanations(
    client: TestClient, explained: Path, loaded: LoadedModel
) -> None:
    expected = parquet_rows(explained)
    body = {"prompt": PROMPT, "target": 3, "distractor": 4, "k": 3}
    for request in (body, body | {"sort": "direct_effect", "node_types": ["attention_head"]}):
        rows = client.post("/api/nodes", json=request).json()["nodes"]
        assert rows
        for row in rows:
            if row["layer"] is None:
                assert row["explanation"] is None
                continue
            e = expected[row["node_type"], row["layer"], row["index"]]
            assert row["explanation"] == e["explanation"]
            assert row["explanation_score"] == pytest.approx(e["score"])
    # A server without a scan: the fields are there, null.
    plain = TestClient(create_app(loaded), base_url="http://localhost")
    rows = plain.post("/api/nodes", json=body).json()["nodes"]
    assert all(r["explanation"] is None and r["explanation_score"] is None for r in rows)


def test_component_activations_match_the_naive_reference(
    client: TestClient, checkpoint_dir: Path
) -> None:
    hf = GPT2LMHeadModel.from_pretrained(checkpoint_dir).eval()
    ref = naive_run(hf, PROMPT, position=len(PROMPT) - 1, target=3, distractor=4)
    got = client.post("/api/component_activations", json={"component": "n1.7", "prompt": PROMPT})
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["token_ids"] == PROMPT
    np.testing.assert_allclose(body["values"], ref.post[1][:, 7].numpy(), atol=1e-4)
    # A head: per query token its largest write p·‖v W_O‖ over keys, and the key of it.
    got = client.post(
        "/api/component_activations", json={"component": "h1.2@3:1", "prompt": PROMPT}
    ).json()
    writes = ref.head_writes[1][2].norm(dim=-1)  # [query key]
    np.testing.assert_allclose(got["values"], writes.amax(dim=1).numpy(), atol=1e-4)
    assert got["top_keys"] == [int(k) for k in writes.argmax(dim=1)]
    assert got["component"] == "h1.2" and "write" in got["meaning"]
    for bad, message in [
        ("e@1", "is not a component"),
        ("h7.0", "layer must be in"),
        ("n0.99999", "index must be in"),
        ("zz", "is not one of"),
    ]:
        r = client.post("/api/component_activations", json={"component": bad, "prompt": PROMPT})
        assert r.status_code == 400 and message in r.json()["error"], (bad, r.text)


def test_component_json_has_id_explanation_and_logit_lens(
    client: TestClient, explained: Path, loaded: LoadedModel
) -> None:
    body = client.get("/api/component/mlp_neuron/1/7").json()
    assert (body["id"], body["kind"]) == ("n1.7", "MLP neuron")
    assert (
        body["explanation"]["explanation"]
        == parquet_rows(explained)["mlp_neuron", 1, 7]["explanation"]
    )
    # The logit lens by hand: W_out[7] through the final norm's gain and the unembedding.
    model = loaded.model
    with torch.no_grad():
        scores = (model.block(1).mlp.W_out[7] * model.ln_f.w) @ model.unembed
        scores = scores - scores.mean()
    top = [loaded.tokenizer.token_text(int(i)) for i in torch.topk(scores, 5).indices]
    bottom = [loaded.tokenizer.token_text(int(i)) for i in torch.topk(-scores, 5).indices]
    assert body["logit_lens"]["promotes"] == top
    assert body["logit_lens"]["suppresses"] == bottom
    head = client.get("/api/component/attention_head/0/1").json()
    assert head["id"] == "h0.1" and head["logit_lens"] is None and head["explanation"]


def test_no_head_example_at_a_position_that_can_only_attend_to_itself(explained: Path) -> None:
    rows = pq.read_table(explained / "examples.parquet").to_pandas()
    heads = rows[rows["node_type"] == "attention_head"]
    assert len(heads) > 0
    alone = heads[(heads["token_position"] == 0) & (heads["context_tokens"].apply(len) == 0)]
    assert alone.empty, alone[["layer", "index", "doc_id", "window_start"]]
    # Windows after a document's first one carry their left context.
    later = rows[rows["window_start"] > 0]
    assert len(later) > 0 and (later["context_tokens"].apply(len) == 3).all()


# --- the documented example ---------------------------------------------------------------


@pytest.mark.slow  # scans and explains the demo model on a slice of its corpus
def test_the_documented_explanation_fields_are_real_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/node-table.md shows `tdb nodes ... --scan DIR --json` rows on a scan of the bundled
    corpus's first 12 documents (-k 4 --window 32), explained: every field it shows is real."""
    doc = (ROOT / "docs" / "node-table.md").read_text()
    section = doc[doc.index("### With explanations") :]
    example = json.loads(re.search(r"```json\n(.*?)```", section, re.DOTALL).group(1))  # type: ignore[union-attr]
    corpus = tmp_path / "slice.txt"
    corpus.write_text("".join(DEMO_CORPUS.read_text().splitlines(keepends=True)[:12]))
    out = tmp_path / "scan"
    scan(corpus, out, ScanSettings(k=4, window=32))
    explain(out)
    argv = [
        "nodes",
        "When Mary and John went to the store, John gave a drink to",
        "--target",
        " Mary",
        "--distractor",
        " John",
        "-k",
        "1",
        "--node-types",
        "attention_head",
        "--sort",
        "direct_effect",
        "--scan",
        str(out),
        "--json",
    ]
    assert main(argv) == 0
    real = json.loads(capsys.readouterr().out)["nodes"]
    for documented, row in zip(example["nodes"], real, strict=False):
        for key, value in documented.items():
            if isinstance(value, float):
                assert row[key] == pytest.approx(value, abs=1e-6), key
            else:
                assert row[key] == value, key


# --- the component page in a browser -----------------------------------------------------------


@pytest.mark.slow  # headless Chromium
def test_component_page_shows_the_prompt_explanation_id_and_a_back_link(
    explained: Path, loaded: LoadedModel
) -> None:
    from urllib.parse import quote

    from live_server import live_server
    from playwright.sync_api import expect, sync_playwright

    expected = parquet_rows(explained)["mlp_neuron", 1, 7]
    prompt = "the cat sat on the mat"
    tokens = loaded.tokenizer.encode(prompt)
    app = create_app(loaded)
    mount_scan(app, explained)
    with live_server(app) as base, sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium", args=["--no-sandbox", "--headless"]
        )
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        investigation = f"{base}/?prompt={quote(prompt)}&k=3"
        url = f"{base}/component/mlp_neuron/1/7?prompt={quote(prompt)}&from={quote(investigation)}"
        page.goto(url)
        expect(page.locator("#component-id")).to_have_text("n1.7", timeout=60_000)
        expect(page.locator("#explanation .explanation")).to_have_text(str(expected["explanation"]))
        score = page.locator("#explanation-score").text_content() or ""
        shown = re.match(r"score (\S+) ", score)
        assert shown is not None and float(shown[1]) == pytest.approx(expected["score"], abs=1e-3)
        # The prompt's tokens, each with the component's value (as the route computes it).
        spans = page.locator("#prompt .tok")
        expect(spans).to_have_count(len(tokens), timeout=60_000)
        values = client_values(app, prompt)
        assert [spans.nth(i).text_content() for i in range(len(tokens))] == [
            loaded.tokenizer.token_text(t) for t in tokens
        ]
        for i, value in enumerate(values):
            assert float(spans.nth(i).get_attribute("title") or "nan") == pytest.approx(
                value, rel=1e-3, abs=1e-3
            )
        assert page.locator("#prompt-box").is_visible()
        # Back to the investigation it came from.
        back = page.locator("#back")
        expect(back).to_have_text("← back")
        back.click()
        page.wait_for_url(investigation)
        # Opened on its own: a link home instead.
        page.goto(f"{base}/component/attention_head/0/1")
        expect(page.locator("#back")).to_have_text("tdb home")
        assert page.locator("#back").get_attribute("href") == f"{base}/"
        assert not page.locator("#prompt-box").is_visible()
        browser.close()
    assert errors == []


def client_values(app: object, prompt: str) -> list[float]:
    body = {"component": "n1.7", "prompt": prompt}
    got = TestClient(app, base_url="http://localhost").post(  # type: ignore[arg-type]
        "/api/component_activations", json=body
    )
    values: list[float] = got.json()["values"]
    return values
