"""docs/circuits.md is executable: its commands run, its JSON example has the real output's
fields, and its table of the demo model's IOI and induction circuits is what `tdb circuit`
finds, meeting the goal (faithfulness >= 0.8 with at most 32 components on IOI and 85 on
induction; random circuits far below)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_docs_commands import commands, run_documented

from tdb.attribution import task_records
from tdb.checkpoint import LoadedModel
from tdb.circuit import find_circuit

DOC = Path(__file__).parent.parent / "docs" / "circuits.md"
GOAL = {"ioi": 32, "induction": 85}


@pytest.mark.slow  # three circuit searches on the demo model
def test_circuit_commands_run_and_the_json_has_the_documented_fields(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    readme = (DOC.parent.parent / "README.md").read_text()
    documented = [
        c
        for text in (readme, DOC.read_text())
        for c in commands(text)
        if re.match(r"tdb (task|circuit) ", c)
    ]
    assert len(documented) >= 5
    outputs = [
        run_documented(c, capsys, {"/tmp/ioi-circuit": str(tmp_path / "figures")})
        for c in documented
    ]
    real = json.loads(next(o for c, o in zip(documented, outputs, strict=True) if "--json" in c))
    shown = json.loads(re.findall(r"^```json\n(.*?)^```$", DOC.read_text(), re.S | re.M)[0])
    assert set(shown) == set(real)
    assert set(shown["metric"]) == set(real["metric"])
    assert set(shown["curve"][0]) == set(real["curve"][0])
    assert set(shown["edges"][0]) == set(real["edges"][0])
    assert len(real["edges"]) == 20 and sum(e["exact"] is not None for e in real["edges"]) == 5
    files = {p.name for p in (tmp_path / "figures").iterdir()}
    assert files == {"circuit.json", "circuit.svg", "curve.svg", "curve.png"}


ROW = re.compile(r"^\| (ioi|induction) \| (\d+) \| ([\d.]+) \| ([\d.−-]+) \| ([\d.−-]+) \|", re.M)
CURVE = re.compile(r"^\| (ioi|induction), (top n|random) \|(.*)\|$", re.M)


def number(text: str) -> float:
    return float(text.replace("−", "-"))


@pytest.mark.slow  # the IOI and induction searches on 32 prompts each
@pytest.mark.parametrize("task", ["ioi", "induction"])
def test_the_documented_circuits_are_what_tdb_circuit_finds(demo: LoadedModel, task: str) -> None:
    text = DOC.read_text()
    rows = {m[0]: m[1:] for m in ROW.findall(text)}
    size, faith, full, empty = rows[task]
    records = task_records(task, n=32, seed=0, tokenizer=demo.tokenizer)
    circuit = find_circuit(demo, records, max_components=100, max_edges=0)
    assert len(circuit.components) == int(size)
    assert circuit.faithfulness == pytest.approx(float(faith), abs=0.002)
    assert circuit.clean == pytest.approx(number(full), abs=0.01)
    assert circuit.m_empty == pytest.approx(number(empty), abs=0.01)
    # the goal
    assert circuit.faithfulness >= 0.8 and len(circuit.components) <= GOAL[task]
    curve = {p.n: p for p in circuit.curve}
    header = re.search(r"^\| n \|(.*)\|$", text, re.M)
    assert header is not None
    sizes = [int(s) for s in header[1].split("|")]
    for kind, values in ((k, v) for t, k, v in CURVE.findall(text) if t == task):
        documented = [number(v) for v in values.split("|")]
        for n, value in zip(sizes, documented, strict=True):
            point = curve[n]
            measured = point.faithfulness if kind == "top n" else point.random
            assert measured == pytest.approx(value, abs=0.006), (task, kind, n)
    # random circuits of the circuit's size are far below it
    nearest = min(curve, key=lambda n: abs(n - len(circuit.components)))
    assert curve[nearest].random < 0.1
