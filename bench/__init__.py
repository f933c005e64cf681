"""The intake benchmark: `python -m bench.run` (see bench/run.py)."""
