#!/usr/bin/env bash
# Set up (venv, Azurite; Core Tools from npm where its download is allowed), then run the app locally:
# Azurite + the HTTPS stand-in (no Azure tenant needed) + `func start`.
# --stack-only: without func, keep Azurite and the stand-in up and serve the HTTP routes (devstack.httphost).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python -m devstack.localstack "$@"
