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
# The smoke jobs' source data (and one data test): Debian's Fashion-MNIST, which installs offline from the
# distribution's archive. Installed when we can (root with apt-get); otherwise say how, and those tests fail
# with a message naming the package.
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
      || echo "note: could not install dataset-fashion-mnist; the smoke jobs need it" >&2
  else
    echo "note: install Debian's dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist) for the smoke jobs" >&2
  fi
fi
