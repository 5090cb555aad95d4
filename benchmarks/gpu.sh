#!/usr/bin/env bash
# The GPU benchmark in one command (see benchmarks/gpu.py): on a CUDA machine the full-size
# run, elsewhere the CPU smoke run. Options are python -m benchmarks.gpu's, e.g. --out PREFIX.
# PYTHON picks the interpreter (default: the repo's .venv, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" -m benchmarks.gpu "$@"
