#!/usr/bin/env bash
# The whole test suite on a fresh machine: set up, lint, test. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
.venv/bin/python -m ruff check .
exec .venv/bin/python -m pytest "$@"
