"""Single flight (shared/singleflight.py): an attempt whose thread cannot start leaves nothing behind."""

from __future__ import annotations

import threading

import pytest

from shared.deadline import Deadline
from shared.errors import IntakeError
from shared.singleflight import Flights


def waited_too_long() -> Exception:
    return TimeoutError("waited for an attempt that never ran")


def test_a_thread_that_cannot_start_leaves_no_dead_entry(monkeypatch):
    flights: Flights[str] = Flights("token")
    start = threading.Thread.start

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    with pytest.raises(IntakeError) as refused:
        flights.run("k", lambda: "token-1", Deadline(1.0), waited_too_long)
    assert (refused.value.code, refused.value.status) == ("instance_overloaded", 503)  # clear, retried later
    monkeypatch.setattr(threading.Thread, "start", start)
    # The next caller starts its own attempt instead of waiting out its deadline behind a dead entry.
    assert flights.run("k", lambda: "token-2", Deadline(1.0), waited_too_long) == "token-2"


def test_an_attempt_runs_in_its_starters_context():
    import contextvars

    who: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="nobody")
    who.set("starter")
    flights: Flights[str] = Flights("contact")
    assert flights.run("k", who.get, Deadline(2.0), waited_too_long) == "starter"  # its spans join that trace
