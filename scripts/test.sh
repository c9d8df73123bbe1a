#!/usr/bin/env bash
# Set up everything the tests need on a fresh machine, then run them. CI's .ci/run calls this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Debian's Chromium for the browser end-to-end test of the UI (no browser download: Playwright drives it)
if [ -f scripts/install_browser.sh ]; then bash scripts/install_browser.sh; fi
# lint, format and import order first: cheap, and a failure says exactly what to fix
.venv/bin/ruff check .
.venv/bin/ruff format --check .
export QMOE_CACHE="${QMOE_CACHE:-$HOME/.cache/qmoe}"
# without a GPU the Triton kernel tests run in triton's interpreter; it must be on before triton is imported
if ! command -v nvidia-smi >/dev/null 2>&1; then export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"; fi
.venv/bin/python -m pytest "$@"
