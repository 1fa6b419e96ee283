#!/usr/bin/env bash
# Set up .venv and run the main job: the IOI node table on the built-in demo model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/tdb nodes "When Mary and John went to the store, John gave a drink to" \
    --target " Mary" --distractor " John" "$@"
