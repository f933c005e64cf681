"""Dataverse service protection limits for the one application user, on a scaled clock.

As api-limits.md describes (platform-facts.md): per user, over a sliding window, a budget of requests
(0x80072322), a budget of combined execution time (0x80072321) and a number of concurrent requests
(0x80072326, answered at once). A `$batch` counts as one request, but its execution time is the sum of
its records': each record costs `cost` seconds of the execution budget. Dataverse judges the budgets
over the past window, so a client can overshoot by what it had in flight; here a request is charged
when admitted and refused once the budget is already spent. The answer is 429 with Retry-After: until
the window frees (so a client that waits the full Retry-After gets through), a short pause for
concurrency. A client that keeps sending while throttled is given longer waits: each request during a
throttle extends it by `penalty` seconds. Time is scaled down (a window of seconds, not 300 s) so a
fleet test runs in minutes.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field


@dataclass
class Stats:
    admitted: int = 0
    records: int = 0  # operations carried by the admitted requests ($batch parts count one each)
    throttled: dict[str, int] = field(default_factory=dict)
    peak_concurrency: int = 0
    sent_while_throttled: int = 0
    timeline: list[tuple[float, int, str]] = field(default_factory=list)  # (monotonic, records, "" or 429 code)


class Protection:
    """Thread-safe; one per stand-in (all instances of the app sign in as the same user)."""

    def __init__(self, window: float, max_requests: int, max_concurrent: int = 52, penalty: float = 0.0,
                 concurrency_retry_after: float = 0.5, max_execution: float | None = None,
                 cost: float = 0.0) -> None:
        self.window = window
        self.max_requests = max_requests
        self.max_concurrent = max_concurrent
        self.penalty = penalty
        self.concurrency_retry_after = concurrency_retry_after
        self.max_execution = max_execution  # seconds of combined execution per window (None: unlimited)
        self.cost = cost  # seconds of execution per record
        self._lock = threading.Lock()
        self._times: deque[tuple[float, float]] = deque()  # (admitted at, execution charged)
        self._spent = 0.0
        self._throttled_until = 0.0
        self._code = "0x80072322"  # the limit that began the current throttle
        self.stats = Stats()

    def admit(self, inflight: int, records: int = 1) -> tuple[str, float] | None:
        """None to serve the request, or (error code, Retry-After seconds) to answer 429."""
        now = time.monotonic()
        with self._lock:
            self.stats.peak_concurrency = max(self.stats.peak_concurrency, inflight)
            if inflight > self.max_concurrent:
                return self._throttle("0x80072326", self.concurrency_retry_after)
            if now < self._throttled_until:
                self.stats.sent_while_throttled += 1
                self._throttled_until += self.penalty
                return self._throttle(self._code, self._throttled_until - now)
            while self._times and self._times[0][0] <= now - self.window:
                self._spent -= self._times.popleft()[1]
            if len(self._times) >= self.max_requests:
                self._throttled_until, self._code = self._times[0][0] + self.window, "0x80072322"
                return self._throttle(self._code, self._throttled_until - now)
            if self.max_execution is not None and self._spent >= self.max_execution:
                self._throttled_until, self._code = self._frees_execution() + self.window, "0x80072321"
                return self._throttle(self._code, self._throttled_until - now)
            charge = records * self.cost
            self._times.append((now, charge))
            self._spent += charge
            self.stats.admitted += 1
            self.stats.records += records
            self.stats.timeline.append((now, records, ""))
            return None

    def _frees_execution(self) -> float:
        """When the oldest charges have left the window far enough for the spent time to drop under budget."""
        left = self._spent
        for at, charge in self._times:
            left -= charge
            if left < (self.max_execution or 0.0):
                return at
        return self._times[-1][0] if self._times else time.monotonic() - self.window

    def _throttle(self, code: str, retry_after: float) -> tuple[str, float]:
        self.stats.throttled[code] = self.stats.throttled.get(code, 0) + 1
        self.stats.timeline.append((time.monotonic(), 0, f"{code} {retry_after:.3f}"))
        return code, max(retry_after, 0.001)
