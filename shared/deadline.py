"""One deadline per call: every hop (secret, token, lookups, creates, retries, waits) spends the same budget.

A budget per request let a call with three Dataverse requests take three budgets; a deadline makes the
caller's promise (HTTP 15 s, a queue message well under functionTimeout) hold for the whole call.
"""

from __future__ import annotations

import time

MIN_TIMEOUT = 0.05  # a socket timeout of 0 means "no timeout" in some libraries: never hand one out
# The least time worth sending a request with: a wait (Retry-After, backoff, a free slot) that leaves less
# is refused before it starts, so the caller gets the honest cause (throttled, unavailable) in time, not a
# request sent with a 50 ms timeout that times out into "outcome unknown".
RESERVE = 0.5


class Deadline:
    """The moment a call must have answered by; `cap` shortens any timeout to the time left."""

    __slots__ = ("at",)

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    @classmethod
    def of(cls, budget: float | Deadline) -> Deadline:
        return budget if isinstance(budget, Deadline) else cls(budget)

    def left(self) -> float:
        return self.at - time.monotonic()

    def expired(self) -> bool:
        return self.left() <= 0

    def cap(self, seconds: float) -> float:
        """`seconds`, or the time left if that is shorter (never below MIN_TIMEOUT)."""
        return max(min(seconds, self.left()), MIN_TIMEOUT)

    def allows(self, wait: float) -> bool:
        """Whether a wait of `wait` seconds still ends before the deadline."""
        return time.monotonic() + wait < self.at
