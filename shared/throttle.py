"""One throttle state per instance, and a limit on its concurrent Dataverse requests that adapts.

Dataverse's service protection limits count the application user across the whole fleet, and sending
while throttled lengthens the wait. So when Dataverse answers 429, every thread of the instance holds
its next request until Retry-After has passed (plus a little jitter, so the waiters do not wake as one
herd), instead of each invocation discovering the limit on its own. The concurrency limit starts from
INTAKE_DATAVERSE_CONCURRENCY, is capped by the x-ms-dop-hint Dataverse sends, shrinks once per throttle
episode (by a quarter on the concurrency-limit code 0x80072326, by half on the execution-time code and
others; not on the request budget 0x80072322, a count that only the hold answers) and grows back by one
after four limits' worth of successes. After a 429 the instance resumes with one probing request, and
the others follow when it got through; a probe refused again waits longer each time, and a throttle
that recurs soon after the last one ended is held twice as long as that one (at most ESCALATION_CAP
beyond Retry-After), since a sliding window that frees a sliver at a time costs a 429 per sliver.
"""

from __future__ import annotations

import random
import threading
import time

from shared.deadline import RESERVE, Deadline
from shared.errors import IntakeError

CONCURRENCY_CODE = "0x80072326"
REQUEST_BUDGET_CODE = "0x80072322"  # requests per window: a count the hold answers (and a $batch relieves)
PROBE_BACKOFF = 0.05  # seconds, doubled per refused probe in one throttle episode...
PROBE_BACKOFF_CAP = 30.0  # ...up to this
ESCALATION_CAP = 1.0  # seconds: the most a recurring throttle's hold is raised beyond its Retry-After
GROWTH = 4  # successes per unit of limit before it grows by one: slow, since more in flight only meets more 429s


class Gate:
    """Thread-safe; one per DataverseClient (one per instance)."""

    def __init__(self, limit: int) -> None:
        self._cond = threading.Condition()
        self._setting = max(1, limit)
        self._ceiling = self._setting  # the setting, or x-ms-dop-hint when that is lower
        self._limit = self._ceiling
        self._active = 0
        self._successes = 0
        self._resume_at = 0.0
        self._probing = False  # after a 429: one request at a time until one gets through
        self._episode_wait = 0.0  # Retry-After of the 429 that began this throttle episode
        self._refusals = 0  # probes refused in a row in this episode
        self._episode_end = -1e9  # when the last episode's probe got through
        self._last_hold = 0.0  # the hold that began the last episode
        self.waits = 0  # requests that waited out another request's 429 (for tests and telemetry)

    @property
    def limit(self) -> int:
        return self._limit

    def hint(self, dop: int) -> None:
        """Dataverse's recommended degree of parallelism (x-ms-dop-hint): never exceed it."""
        with self._cond:
            if dop > 0:
                self._ceiling = min(self._setting, dop)
                self._limit = min(self._limit, self._ceiling)

    def enter(self, deadline: Deadline) -> None:
        """Wait for the throttle to pass and a slot to free, within the call's deadline.

        A wait is refused before it starts when it, its jitter and the request after it (RESERVE) would not
        fit the deadline: the caller then answers "throttled, retry after" in time.
        """
        with self._cond:
            waited = False
            while True:
                hold = self._resume_at - time.monotonic()
                if hold > 0:
                    jitter = random.uniform(0, min(0.25, 0.05 * hold + 0.02))
                    if not deadline.allows(hold + jitter + RESERVE):
                        raise IntakeError("dynamics_throttled", "Dataverse is throttling this instance for "
                                          f"{hold:.1f}s more; the call's deadline comes first.", retry_after=hold)
                    waited = True
                    self._cond.wait(hold + jitter)
                    continue
                if self._active < (1 if self._probing else self._limit):
                    self._active += 1
                    self.waits += waited
                    return
                left = deadline.left() - RESERVE
                if left <= 0:
                    raise IntakeError("dynamics_throttled", "No Dataverse request slot of this instance freed within "
                                      "the call's deadline.", retry_after=1.0)
                self._cond.wait(left)

    def _saturated(self) -> bool:
        return self._resume_at > time.monotonic() or self._active >= (1 if self._probing else self._limit)

    def saturated(self) -> bool:
        """Whether a request arriving now would wait: the instance is held, or every slot is taken."""
        with self._cond:
            return self._saturated()

    def wait_free(self, deadline: Deadline) -> bool:
        """Wait, without taking it, until a request could go out now; False when the deadline comes first."""
        with self._cond:
            while self._saturated():
                left = deadline.left() - RESERVE
                if left <= 0:
                    return False
                hold = self._resume_at - time.monotonic()
                self._cond.wait(min(left, hold) if hold > 0 else left)
            return True

    @property
    def active(self) -> int:
        """Requests of this instance holding a slot now."""
        return self._active

    def throttled(self, code: str | None, retry_after: float) -> None:
        """A 429 seen without a slot of its own (a part of a $batch): hold the instance as for a request."""
        with self._cond:
            self._throttle(code, retry_after)
            self._cond.notify_all()

    def leave(self, status: int, code: str | None = None, retry_after: float | None = None) -> None:
        """Release a slot and account for its answer: a 429 holds every thread; successes grow the limit."""
        with self._cond:
            self._active -= 1
            if status == 429:
                self._throttle(code, retry_after)
            elif status < 500:
                if self._probing:
                    self._episode_end = time.monotonic()
                self._probing = False
                self._successes += 1
                if self._successes >= GROWTH * self._limit and self._limit < self._ceiling:
                    self._limit += 1
                    self._successes = 0
            self._cond.notify_all()

    def _throttle(self, code: str | None, retry_after: float | None) -> None:
        """Hold every thread for Retry-After; lower the limit once per episode (the caller holds the lock)."""
        wait = retry_after if retry_after is not None else 1.0
        now = time.monotonic()
        if not self._probing:  # once per throttle episode: the answers of requests already in flight
            # The concurrency code says outright that there were too many at once, and execution time
            # is concurrency times duration: fewer at once. The request budget is a count per window:
            # the hold is the answer, and fewer at once after it would only drain slower.
            if code != REQUEST_BUDGET_CODE:
                self._limit = max(1, int(self._limit * 0.75) if code == CONCURRENCY_CODE else self._limit // 2)
            if now - self._episode_end < max(1.0, 4 * self._last_hold):
                # Throttled again soon after the last episode ended: the window frees a sliver at a
                # time, and each sliver costs a 429. Holding twice as long as last time lets a larger
                # share free (a sliding window keeps what is not used), sent in one go.
                wait = max(wait, min(ESCALATION_CAP, 2 * self._last_hold))
            self._episode_wait, self._refusals, self._last_hold = wait, 0, wait
        elif now >= self._resume_at:  # a probe refused: others (other instances) took the freed slots
            # Their sending lengthens everyone's wait; probing again after the few milliseconds
            # Retry-After now says would join them. Each refusal doubles a floor, up to the episode's
            # wait, and doubles an absolute one: instances that each probe again at the Retry-After
            # they were given would otherwise keep the throttle alive between them.
            self._refusals += 1
            wait = max(wait, self._episode_wait * min(1.0, 0.1 * 2 ** self._refusals),
                       min(PROBE_BACKOFF_CAP, PROBE_BACKOFF * 2 ** self._refusals))
        self._resume_at = max(self._resume_at, now + wait)
        self._successes = 0
        # Sending into a window Dataverse already refused lengthens the wait: after the hold, one
        # request probes; the others follow once it got through.
        self._probing = True
