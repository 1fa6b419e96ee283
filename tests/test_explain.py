"""`tdb explain` on a scan of the demo model over a slice of its bundled corpus, against
independent computations: the top token read with pandas, attention shares recomputed by hand."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from tdb.checkpoint import LoadedModel
from tdb.cli import main
from tdb.explain import explain
from tdb.explain.attention import pattern_masks
from tdb.scan import ScanSettings, scan
from tdb.scan.corpus import DEMO_CORPUS

N_DOCS, K, WINDOW = 12, 4, 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "slice.txt"
    path.write_text("".join(DEMO_CORPUS.read_text().splitlines(keepends=True)[:N_DOCS]))
    return path


@pytest.fixture(scope="module")
def explained(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    out = tmp_path_factory.mktemp("scan") / "s"
    scan(corpus, out, ScanSettings(k=K, window=WINDOW, batch_size=16))
    result = explain(out)
    assert result.explained == result.total > 0
    return out


def rows(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "explanations.parquet")


@pytest.mark.slow
def test_every_component_has_a_scored_row(explained: Path) -> None:
    components = pd.read_parquet(explained / "stats.parquet")[["node_type", "layer", "index"]]
    got = rows(explained)
    assert len(got) == len(components)
    assert set(map(tuple, got[["node_type", "layer", "index"]].to_numpy().tolist())) == set(
        map(tuple, components.to_numpy().tolist())
    )
    assert got["score"].between(-1, 1).all() and got["control_score"].between(-1, 1).all()
    assert (got["explainer"] == "builtin").all() and got["explanation"].str.endswith(".").all()
    assert all(len(s) > 0 for s in got["scored_on"])
    assert got["score"].mean() > got["control_score"].mean() + 0.1


@pytest.mark.slow
def test_neuron_sentences_name_their_top_token(explained: Path) -> None:
    examples = pd.read_parquet(explained / "examples.parquet")
    top = examples[(examples["node_type"] == "mlp_neuron") & (examples["rank"] == 0)]
    top = top[top["activation"] > 0]
    token = {(r.layer, r.index): r.tokens[r.token_position] for r in top.itertuples(index=False)}
    got = rows(explained).set_index(["node_type", "layer", "index"])
    assert len(token) > 100
    for (layer, index), text in token.items():
        assert repr(text) in got.loc[("mlp_neuron", layer, index), "explanation"]


@pytest.mark.slow
def test_head_attention_shares_by_hand(explained: Path, corpus: Path, demo: LoadedModel) -> None:
    layer, head = 1, 2
    examples = pd.read_parquet(explained / "examples.parquet")
    mine = examples[
        (examples["node_type"] == "attention_head")
        & (examples["layer"] == layer)
        & (examples["index"] == head)
        & (examples["rank"] % 2 == 0)  # the explaining top windows
    ]
    docs = corpus.read_text().splitlines()
    total = dict.fromkeys(["previous", "first", "self"], 0.0)
    weight = 0.0
    for r in mine.itertuples(index=False):
        ids = demo.tokenizer.encode(docs[r.doc_id])[r.window_start : r.window_start + WINDOW]
        assert [demo.tokenizer.token_text(i) for i in ids] == list(r.tokens)
        probs = demo.run([ids], cache=["attn_probs"]).cache["attn_probs", layer][0, head]
        for q in range(1, len(ids)):
            w = max(float(r.activations[q]), 0.0)
            weight += w
            total["previous"] += w * float(probs[q, q - 1])
            total["first"] += w * float(probs[q, 0])
            total["self"] += w * float(probs[q, q])
    row = rows(explained).set_index(["node_type", "layer", "index"])
    shares = json.loads(row.loc[("attention_head", layer, head), "evidence"])["attention"]
    for name, value in total.items():
        assert shares[name] == pytest.approx(value / weight, abs=1e-4)


def test_pattern_masks_by_hand() -> None:
    masks = pattern_masks([5, 7, 5, 7])
    assert np.argwhere(masks["same_token"]).tolist() == [[2, 0], [3, 1]]
    assert np.argwhere(masks["induction"]).tolist() == [[2, 1], [3, 2]]  # after an earlier copy
    assert np.argwhere(masks["previous"]).tolist() == [[1, 0], [2, 1], [3, 2]]
    assert not masks["first"][0].any()  # query 0 has one key: no pattern


@pytest.mark.slow
def test_rerun_is_incremental(explained: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(explained, out)
    path = out / "explanations.parquet"
    before = path.stat().st_mtime_ns
    again = explain(out)
    assert (again.explained, again.controlled) == (0, 0)
    assert path.stat().st_mtime_ns == before  # nothing written
    table = pq.read_table(path).to_pandas()
    gone = table[(table["node_type"] == "mlp_neuron")].iloc[7]
    kept = table.drop(index=gone.name)
    kept.to_parquet(path, index=False)
    again = explain(out)
    assert (again.explained, again.total) == (1, len(table))
    after = rows(out).set_index(["node_type", "layer", "index"]).sort_index()
    expected = table.set_index(["node_type", "layer", "index"]).sort_index()
    pd.testing.assert_frame_equal(after, expected)  # the same row back, the others untouched


def test_missing_or_unfinished_scan_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope"
    assert main(["explain", "--scan", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(missing) in err and "no such folder" in err
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "scan.json").write_text(json.dumps({"identity": {}, "complete": False}))
    assert main(["explain", "--scan", str(unfinished)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(unfinished) in err and "not finished" in err
    assert main(["explain", "--scan", str(unfinished), "--components", "bogus"]) == 2
    assert "--components" in capsys.readouterr().err


@pytest.mark.slow  # scans the whole bundled corpus with latents, and explains 7,704 components
def test_docs_table_is_current(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """docs/explanations.md's commands run, its score table is what they produce now, and the
    explanations beat the control by a wide margin for every kind."""
    from tdb.explain.report import score_table

    out = tmp_path / "scan"
    assert main(["scan", "--out", str(out), "--latents", "--quiet"]) == 0
    assert main(["explain", "--scan", str(out)]) == 0
    table = score_table(out)
    doc = (Path(__file__).parent.parent / "docs" / "explanations.md").read_text()
    assert table in doc
    frame = rows(out)
    for _, kind in frame.groupby(["node_type", frame["site"].fillna("")]):
        assert kind["score"].mean() > kind["control_score"].mean() + 0.15
