#!/usr/bin/env bash
# Create .venv (if needed) and install idtl-ray with its test extras into it. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch/torchvision come as ranges from pyproject.toml; pip resolves them (from local wheels where the
# machine has them) in about a minute on a fresh machine.
.venv/bin/python -m pip install --quiet -e '.[dev]'
