"""The host's queue semantics for the tests: devstack/queuehost.py (what `run-local.sh --stack-only` drains with)."""

from devstack.queuehost import HOST_JSON, Context, Out, QueueHost, Stats, drain, receive_all

__all__ = ["HOST_JSON", "Context", "Out", "QueueHost", "Stats", "drain", "receive_all"]
