"""Dataverse service protection limits for the one application user, on a scaled clock.

As api-limits.md describes (platform-facts.md): per user, over a sliding window, a budget of requests
(0x80072322) and a number of concurrent requests (0x80072326, answered at once). The answer is 429
with Retry-After: until the window frees for the request budget (so a client that waits the full
Retry-After gets through), a short pause for concurrency. A client that keeps sending while throttled
is given longer waits: each request during a throttle extends it by `penalty` seconds. Time is scaled
down (a window of seconds, not 300 s) so a fleet test runs in minutes.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field


@dataclass
class Stats:
    admitted: int = 0
    throttled: dict[str, int] = field(default_factory=dict)
    peak_concurrency: int = 0
    sent_while_throttled: int = 0


class Protection:
    """Thread-safe; one per stand-in (all instances of the app sign in as the same user)."""

    def __init__(self, window: float, max_requests: int, max_concurrent: int = 52, penalty: float = 0.0,
                 concurrency_retry_after: float = 0.5) -> None:
        self.window = window
        self.max_requests = max_requests
        self.max_concurrent = max_concurrent
        self.penalty = penalty
        self.concurrency_retry_after = concurrency_retry_after
        self._lock = threading.Lock()
        self._times: deque[float] = deque()
        self._throttled_until = 0.0
        self.stats = Stats()

    def admit(self, inflight: int) -> tuple[str, float] | None:
        """None to serve the request, or (error code, Retry-After seconds) to answer 429."""
        now = time.monotonic()
        with self._lock:
            self.stats.peak_concurrency = max(self.stats.peak_concurrency, inflight)
            if inflight > self.max_concurrent:
                return self._throttle("0x80072326", self.concurrency_retry_after)
            if now < self._throttled_until:
                self.stats.sent_while_throttled += 1
                self._throttled_until += self.penalty
                return self._throttle("0x80072322", self._throttled_until - now)
            while self._times and self._times[0] <= now - self.window:
                self._times.popleft()
            if len(self._times) >= self.max_requests:
                self._throttled_until = self._times[0] + self.window
                return self._throttle("0x80072322", self._throttled_until - now)
            self._times.append(now)
            self.stats.admitted += 1
            return None

    def _throttle(self, code: str, retry_after: float) -> tuple[str, float]:
        self.stats.throttled[code] = self.stats.throttled.get(code, 0) + 1
        return code, max(retry_after, 0.001)
