"""What every `tdb` process does before its command: lazy imports and the malloc setting."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_python(code: str, **env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    environment.pop("TDB_MALLOC", None)
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env=environment | env,
        timeout=120,
    )
    return result.stdout.strip()


def test_importing_tdb_and_its_cli_loads_no_torch() -> None:
    """`tdb --help` and the package's import stay fast: names load on first use."""
    out = run_python("import sys, tdb, tdb.cli; print('torch' in sys.modules)")
    assert out == "False"


def test_every_exported_name_resolves_and_attribution_stays_the_function() -> None:
    code = (
        "import tdb.attribution.run, tdb, inspect\n"
        "assert inspect.isfunction(tdb.attribution), tdb.attribution\n"
        "from tdb import attribution, attribute\n"
        "assert attribution is tdb.attribution\n"
        "missing = [n for n in tdb.__all__ if getattr(tdb, n, None) is None]\n"
        "print(missing, len(tdb.__all__))\n"
    )
    assert run_python(code) == "[] 21"
    import tdb

    assert tdb.__all__ == sorted(tdb.MODULE_OF)
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        _ = tdb.nonsense


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_malloc_keeps_freed_memory_unless_told_otherwise() -> None:
    code = "from tdb.malloc import keep_freed_memory; print(keep_freed_memory())"
    assert run_python(code) == "True"
    assert run_python(code, TDB_MALLOC="default") == "False"
    assert run_python(code, MALLOC_ARENA_MAX="2") == "False"  # the user's own tuning wins
