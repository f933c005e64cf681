"""The host's queue semantics for the tests: tools/queuehost.py (also what `run-local.sh --stack-only` drains with)."""

from tools.queuehost import HOST_JSON, Context, Out, QueueHost, Stats, drain

__all__ = ["HOST_JSON", "Context", "Out", "QueueHost", "Stats", "drain"]
