"""The published JSON document, as docs/node-table.md shows it, is real output: the example there
must match what `tdb nodes --json` prints now (every field it shows, with its value), so a field
can be added but never silently renamed or dropped. README's Python snippet runs too (the other
commands of README and docs: tests/test_docs_commands.py)."""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

import pytest
from test_docs_python import python_blocks

from tdb.cli import main

ROOT = Path(__file__).parent.parent


def same(documented: object, real: object, where: str = "") -> None:
    """Every field of the documented value is in the real one with the same value (floats to
    1e-5: the docs print the float32 results as float64 decimals)."""
    if isinstance(documented, float):
        assert isinstance(real, float) and math.isclose(documented, real, abs_tol=1e-5), where
    elif isinstance(documented, dict):
        assert isinstance(real, dict), where
        assert set(real) == set(documented), (where, set(real) ^ set(documented))
        for key, value in documented.items():
            same(value, real[key], f"{where}.{key}")
    elif isinstance(documented, list):
        assert isinstance(real, list) and len(real) >= len(documented), where
        for i, value in enumerate(documented):
            same(value, real[i], f"{where}[{i}]")
    else:
        assert documented == real, (where, documented, real)


def test_the_documented_json_is_real_output(capsys: pytest.CaptureFixture[str]) -> None:
    doc = (ROOT / "docs" / "node-table.md").read_text()
    section = doc[doc.index("## JSON: one document") :]
    command = re.search(r"^    tdb nodes (.*?)--json$", section, re.MULTILINE | re.DOTALL)
    assert command is not None
    argv = shlex.split(command.group(1).replace("\\\n", " "))
    example = json.loads(re.search(r"```json\n(.*?)```", section, re.DOTALL).group(1))  # type: ignore[union-attr]
    assert main(["nodes", *argv, "--json"]) == 0
    same(example, json.loads(capsys.readouterr().out))


def test_readme_python_snippet_runs() -> None:
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert blocks, "README.md lost its Python snippet"
    namespace: dict[str, object] = {"__name__": "readme"}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)


def test_every_document_the_code_points_to_exists() -> None:
    """Docstrings and messages that send a reader to a document name one that is in the
    repository (tdb/topk.py once pointed to a DESIGN.md that is not)."""
    named = set()
    for source in (ROOT / "tdb").rglob("*.py"):
        named |= set(re.findall(r"[\w/.-]*\b[A-Za-z][\w-]*\.md\b", source.read_text()))
    assert named, "no document named in the code: the pattern broke"
    for name in sorted(named):
        path = ROOT / name if "/" in name else ROOT / "docs" / name
        assert path.is_file() or (ROOT / name).is_file(), f"the code points to {name}, missing"
