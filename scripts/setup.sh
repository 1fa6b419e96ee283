#!/usr/bin/env bash
# Create .venv in the repo root (if missing) and install tdb with its test tools.
# torch is installed first and pinned: any other spec makes pip fetch a multi-GB CUDA build.
# The browser tests drive Debian's chromium (never a browser that Playwright downloads): it is
# installed with apt-get when missing, which needs root (as on CI) or sudo.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
if [ ! -x /usr/bin/chromium ]; then
    sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver >/dev/null
fi
