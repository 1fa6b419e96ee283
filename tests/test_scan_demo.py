"""Out of the box: `tdb scan --out DIR` on the demo model and its bundled corpus."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest

from tdb.checkpoint import DEMO_MODEL_DIR
from tdb.cli import main
from tdb.scan.corpus import DEMO_CORPUS, count_documents

pytestmark = pytest.mark.slow  # scans the whole demo corpus


def test_scan_runs_with_no_other_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "scan"
    assert main(["scan", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "600 documents" in captured.out and "tokens/s" in captured.err  # the progress bar
    manifest = json.loads((out / "scan.json").read_text())
    assert manifest["complete"] and manifest["n_docs"] == count_documents(DEMO_CORPUS)
    rows = duckdb.sql(
        f"""SELECT node_type, count(DISTINCT layer), count(DISTINCT "index"),
                   count(*) FILTER (rank IS NOT NULL), count(*) FILTER (rank IS NULL)
            FROM '{out / "examples.parquet"}' GROUP BY node_type ORDER BY node_type"""
    ).fetchall()
    # The demo model: 3 layers of 8 heads and d_mlp neurons; k = 20 top and 20 random each.
    d_mlp = json.loads((DEMO_MODEL_DIR / "config.json").read_text())["n_inner"]
    assert rows == [
        ("attention_head", 3, 8, 3 * 8 * 20, 3 * 8 * 20),
        ("mlp_neuron", 3, d_mlp, 3 * d_mlp * 20, 3 * d_mlp * 20),
    ]
    assert not (out / "state.npz").exists() and not list((out / "shards").iterdir())
