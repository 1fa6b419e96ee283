#!/usr/bin/env bash
# The whole test suite: set-up, formatting, lint, types, tests. Fails on "no tests collected".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff format --check .
.venv/bin/ruff check .
.venv/bin/mypy
# pytest exits 5 when it collected no tests; set -e turns that (like any failure) into an error.
.venv/bin/pytest "$@"
