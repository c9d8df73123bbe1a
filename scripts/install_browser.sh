#!/usr/bin/env bash
# Install what the browser end-to-end UI tests need: Debian's Chromium and the playwright Python package.
# Playwright's own browser download (`playwright install`) is never used: the tests drive /usr/bin/chromium.
# Needs root (or sudo) for apt; safe to re-run (skips what is already there).
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
cd "$(dirname "$0")/.."
# the project's virtual environment when there is one (scripts/setup.sh makes .venv), else $PYTHON/python3
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
"$PY" -c "import playwright" 2>/dev/null || "$PY" -m pip install --quiet "playwright>=1.50"
echo "browser tests ready: $(chromium --version 2>/dev/null), playwright $("$PY" -c 'import importlib.metadata as m; print(m.version("playwright"))')"
