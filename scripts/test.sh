#!/usr/bin/env bash
# Install (if needed) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/python -m pytest "$@"
