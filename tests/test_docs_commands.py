"""Every command of README.md and docs/ runs in a test, or says why not: each command found in
an indented block is matched by one of the runners below or by an exemption with its reason."""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_docs_python import python_blocks

from tdb.cli import main

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROMPT = "When Mary and John went to the store, John gave a drink to"
SECOND = "When Tom and Anna went to the park, Anna gave a ball to"

# Which test runs each kind of command (a regex on the command, without `.venv/bin/`).
RUN = {
    r"^tdb nodes (?!.*(DIR|my_saes/|/tmp/tiny))": "test_node_commands_run",
    r"^tdb nodes .*--model /tmp/tiny": "test_readme_random_checkpoint_runs",
    r"^python -c \"from transformers import GPT2Config": "test_readme_random_checkpoint_runs",
    r"^tdb scan --out /tmp/scan": "test_readme_scan_commands_run",
    r"^python -c \"import pandas": "test_readme_scan_commands_run",
    r"^tdb serve$": "test_readme_serve_and_curl_run",
    r"^curl ": "test_readme_serve_and_curl_run",
    r"^bash scripts/test.sh": "CI itself (.ci/run runs it)",
    r"^tdb (task|attribute) ": "test_attribution_docs.py::test_attribution_commands_run",
    r"^tdb circuit ": "test_circuit_docs.py (its commands test)",
    r"^tdb replay ioi\.tdb\.json": "test_investigation.py::test_docs_replay_commands_run",
    r"^python -m tdb\.attribution\.quality": "test_attribution_docs.py (the quality table test)",
    r"^tdb (scan|explain) --(out|scan) DIR": "test_explain.py::test_docs_table_is_current",
    r"^python -m tdb\.explain\.report": "test_explain.py::test_docs_table_is_current",
    r"^tdb explain .*--explainer llm": "test_explain_llm.py::test_docs_llm_commands_run",
}
# Commands not run by a test, and why.
EXEMPT = {
    r"\b(DIR|DIR_OR_FILE|DIR_OR_NAME|PATH|ADDRESS)\b|my_saes/|docs\.jsonl|\[--": (
        "a grammar line: it names the reader's own files or options"
    ),
    r"^bash scripts/demo.sh": "creates .venv like scripts/test.sh; its table is `tdb nodes` on the "
    "demo model, which test_node_commands_run runs",
    r"^python -m tdb\.demo\.train": "trains the demo model: 43 minutes",
    r"^python -m tdb\.demo\.sae\.train": "trains the demo SAEs: about 12 minutes",
    r"^python benchmarks/": "a benchmark (minutes of timed runs), not a test",
    r"^python scripts/screenshots\.py": "rewrites docs/img/*.png (a scan, a server, chromium: "
    "about a minute); the browser tests cover the same page flows",
}


def commands(markdown: str) -> list[str]:
    """The shell commands of a Markdown file's indented blocks: continuation lines joined (and
    lines inside an open quote, as a shell reads them), trailing `# comments` dropped,
    `.venv/bin/` left out."""
    lines = re.sub(r"\\\n\s*", " ", markdown).split("\n")
    out = []
    for i, line in enumerate(lines):
        if not re.match(r"    (\.venv/bin/)?(tdb|python|curl|bash|duckdb) ", line):
            continue
        command = line.strip()
        while command.count("'") % 2 and i + 1 < len(lines):  # a quote still open
            i += 1
            command += " " + lines[i].strip()
        out.append(re.sub(r"\s+#[^'\"]*$", "", command).removeprefix(".venv/bin/"))
    return out


QUIET = ("attribute", "circuit")  # commands with a progress bar to turn off


def run_documented(
    command: str, capsys: pytest.CaptureFixture[str], paths: dict[str, str] | None = None
) -> str:
    """Run one documented `tdb ...` command in-process (in the current directory), with each
    path in `paths` replaced; `> FILE` writes its output there. Returns its output."""
    command, _, target = command.partition(" > ")
    argv = shlex.split(command)[1:]
    for old, new in (paths or {}).items():
        argv = [a.replace(old, new) for a in argv]
    if argv[0] in QUIET:
        argv.append("--quiet")
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, (command, err)
    if target:
        Path(target.strip()).write_text(out)
    return out


def test_every_documented_command_is_run_or_exempt() -> None:
    every = [(path.name, c) for path in DOCS for c in commands(path.read_text())]
    assert len(every) >= 25, "the docs lost their commands"
    for name, command in every:
        runs = [t for pattern, t in RUN.items() if re.search(pattern, command)]
        exempt = [why for pattern, why in EXEMPT.items() if re.search(pattern, command)]
        assert runs or exempt, f"{name}: {command!r} is neither run by a test nor exempt"


def test_node_commands_run(capsys: pytest.CaptureFixture[str]) -> None:
    """The `tdb nodes` commands run on the demo model, "..." standing for the IOI prompt (and,
    as the second prompt of --compare-prompt / --resample-prompt, another)."""
    pattern = next(p for p, t in RUN.items() if t == "test_node_commands_run")
    runnable = [c for path in DOCS for c in commands(path.read_text()) if re.search(pattern, c)]
    assert len(runnable) >= 12, "the docs lost their commands"
    for command in runnable:
        argv = [PROMPT if a == "..." else a for a in shlex.split(command)[2:]]
        for flag in ("--compare-prompt", "--resample-prompt", "--second-prompt"):
            if flag in argv:
                argv[argv.index(flag) + 1] = SECOND
        assert main(["nodes", *argv]) == 0, (command, capsys.readouterr().err)
        capsys.readouterr()


def readme_command(pattern: str) -> str:
    return next(c for c in commands((ROOT / "README.md").read_text()) if re.search(pattern, c))


def venv(command: str) -> list[str]:
    """A documented command as argv, run with this interpreter's `tdb` / `python`."""
    argv = shlex.split(command)
    if argv[0] == "tdb":
        return [sys.executable, "-m", "tdb.cli", *argv[1:]]
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    return argv


@pytest.mark.slow  # imports transformers in a subprocess
def test_readme_random_checkpoint_runs(tmp_path: Path) -> None:
    make = readme_command(r"^python -c \"from transformers").replace("/tmp/tiny", str(tmp_path))
    nodes = readme_command(r"--model /tmp/tiny").replace("/tmp/tiny", str(tmp_path))
    for command in (make, nodes):
        done = subprocess.run(venv(command), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (command, done.stderr)
    assert "nodes: per metric and node type" in done.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow  # starts a server process
def test_readme_serve_and_curl_run() -> None:
    port = free_port()
    serve = [*venv(readme_command(r"^tdb serve$")), "--port", str(port)]
    server = subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/model", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, server.stderr.read() if server.stderr else ""
                assert time.monotonic() < deadline, "tdb serve did not answer in 120 s"
                time.sleep(0.5)
        curl = readme_command(r"^curl ").replace("localhost:8000", f"localhost:{port}")
        done = subprocess.run(shlex.split(curl), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        table = json.loads(done.stdout)
        assert table["nodes"] and table["direction"]["baseline_value"] is not None  # ablated
    finally:
        server.terminate()
        server.wait(timeout=30)
        if server.stderr is not None:
            server.stderr.close()


def test_docs_python_blocks_run() -> None:
    """The Python blocks of docs/ other than python.md (tests/test_docs_python.py runs those)."""
    ran = 0
    for path in DOCS[1:]:
        if path.name == "python.md":
            continue
        for block in python_blocks(path.read_text()):
            exec(compile(block, str(path), "exec"), {"__name__": path.stem})
            ran += 1
    assert ran >= 1, "docs lost their Python blocks"


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
