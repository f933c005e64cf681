#!/usr/bin/env bash
# The intake benchmark (not part of the test suite): set up, then run bench/run.py. Arguments go to it,
# e.g. scripts/bench.sh --n 500 --threads 16. Results: .local/bench/latest.{json,md} (untracked);
# --commit writes bench/results/latest.{json,md}, the committed figures.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
PYTHONPATH=. exec .venv/bin/python -m bench.run "$@"
