"""The published JSON document, as docs/node-table.md shows it, is real output: the example there
must match what `tdb nodes --json` prints now (every field it shows, with its value), so a field
can be added but never silently renamed or dropped. README's Python snippet runs too."""

from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
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


PROMPT = "When Mary and John went to the store, John gave a drink to"
SECOND = "When Tom and Anna went to the park, Anna gave a ball to"
# Commands whose arguments name the reader's own files: shown, not run.
PLACEHOLDERS = ("DIR", "my_saes/", "/tmp/tiny", "FILE")


def documented_commands(markdown: str) -> list[str]:
    """Every `tdb nodes` command of a Markdown file's indented blocks, continuation lines joined
    and trailing `# comments` dropped."""
    joined = re.sub(r"\\\n\s*", " ", markdown)
    lines = re.findall(r"^    (?:\.venv/bin/)?tdb nodes (.*)$", joined, re.MULTILINE)
    return [re.sub(r"\s+#.*$", "", line) for line in lines]


@pytest.mark.parametrize(
    "name", ["README.md", *sorted(p.name for p in (ROOT / "docs").glob("*.md"))]
)
def test_documented_node_commands_run(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's and docs' `tdb nodes` commands run on the demo model, "..." standing for the
    IOI prompt (and, as the second prompt of --compare-prompt / --resample-prompt, another)."""
    path = ROOT / name if name == "README.md" else ROOT / "docs" / name
    for command in documented_commands(path.read_text()):
        if any(p in command for p in PLACEHOLDERS):
            continue
        argv = shlex.split(command)
        argv = [PROMPT if a == "..." else a for a in argv]
        for flag in ("--compare-prompt", "--resample-prompt", "--second-prompt"):
            if flag in argv:
                argv[argv.index(flag) + 1] = SECOND
        assert main(["nodes", *argv]) == 0, (command, capsys.readouterr().err)
        capsys.readouterr()


@pytest.mark.slow  # a scan of the bundled corpus (a few seconds)
def test_readme_scan_commands_run(tmp_path: Path) -> None:
    """README's scan section: `tdb scan --out /tmp/scan` and the query that reads its Parquet,
    run as documented (in a temporary folder instead of /tmp/scan)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## `tdb scan`") :]
    commands = re.findall(r"^    (\.venv/bin/\S+ .*?)(?<!\\)$", section, re.MULTILINE | re.DOTALL)
    scan, query = commands[0], next(c for c in commands if "read_parquet" in c)
    out = tmp_path / "scan"
    scan = re.sub(r"\s+#.*$", "", scan).replace("/tmp/scan", str(out)) + " --quiet"
    query = query.replace("/tmp/scan/", f"{out}/")
    for command in (scan, query):
        done = subprocess.run(
            ["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, (command, done.stderr)
    rows = [line.split() for line in done.stdout.splitlines()[1:]]
    assert [float(r[1]) for r in rows] == [float(i) for i in range(len(rows))]  # rank 0, 1, ...
    assert len(rows) >= 10
