#!/usr/bin/env bash
# Set up, then run the app locally: Azurite + the HTTPS stand-in (no Azure tenant needed) + `func start`.
# Needs Azure Functions Core Tools 4 (`func`); without it, says how to install it and starts nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v func >/dev/null 2>&1; then
  exec python3 -c 'import sys; sys.path.insert(0, "."); from tools.localstack import FUNC_MISSING; print(FUNC_MISSING, file=sys.stderr); sys.exit(2)'
fi
scripts/bootstrap.sh
exec .venv/bin/python -m tools.localstack "$@"
