"""Single flight: one attempt at a time per key; everyone waiting shares its result or its failure.

Without it, threads queued on a lock each repeat a failed acquisition in turn (12 callers behind an
Entra ID outage finished one after another), and striped locks held across network calls made one
caller wait behind an unrelated caller's throttling. Here an attempt runs in its own thread; each
waiter waits only until its own deadline, and a failure is remembered for a short back-off so the
next callers fail at once instead of hammering a service that is down.

The attempt's thread runs in a copy of its starter's context, so its spans (a token request, a contact
lookup) belong to the starter's trace. If the thread cannot start, the entry is removed at once and the
caller gets `instance_overloaded` (503, retried later): a dead entry would make every later caller of
the key wait for an attempt that never runs.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Generic, TypeVar

from shared.deadline import Deadline
from shared.errors import IntakeError

T = TypeVar("T")
log = logging.getLogger(__name__)


def _own(exc: BaseException) -> BaseException:
    """Each waiter's own copy of a shared failure: callers mark theirs (a record id) in their own thread."""
    return exc.copy() if isinstance(exc, IntakeError) else exc


class Flights(Generic[T]):
    """In-flight attempts by key. `backoff` seconds after a failure, callers get that failure at once."""

    def __init__(self, name: str, backoff: float = 0.0) -> None:
        self._name = name
        self._backoff = backoff
        self._lock = threading.Lock()
        self._running: dict[Hashable, Future[T]] = {}
        self._failed: dict[Hashable, tuple[BaseException, float]] = {}
        self.attempts = 0

    def _start(self, key: Hashable, fn: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        self._running[key] = future
        self.attempts += 1

        def attempt() -> None:
            try:
                result = fn()
            except BaseException as exc:  # handed to every waiter, never swallowed
                with self._lock:
                    self._running.pop(key, None)
                    if self._backoff:
                        self._failed[key] = (exc, time.monotonic() + self._backoff)
                future.set_exception(exc)
                return
            with self._lock:
                self._running.pop(key, None)
                self._failed.pop(key, None)
            future.set_result(result)

        try:
            threading.Thread(target=contextvars.copy_context().run, args=(attempt,), name=f"flight-{self._name}",
                             daemon=True).start()
        except RuntimeError as exc:  # "can't start new thread": the process is at its thread limit
            self._running.pop(key, None)
            log.warning("flight %s: could not start a thread: %s", self._name, exc)
            raise IntakeError("instance_overloaded", f"This instance could not start a thread for the {self._name} "
                              "attempt.") from None
        return future

    def join(self, key: Hashable, fn: Callable[[], T]) -> Future[T]:
        """The attempt running for `key`, or a new one running `fn`; a recent failure is raised at once."""
        with self._lock:
            running = self._running.get(key)
            if running is not None:
                return running
            failed = self._failed.get(key)
            if failed is not None:
                if time.monotonic() < failed[1]:
                    raise _own(failed[0])
                del self._failed[key]
            return self._start(key, fn)

    def run(self, key: Hashable, fn: Callable[[], T], deadline: Deadline, on_timeout: Callable[[], Exception]) -> T:
        """Join or start the attempt for `key` and wait for it until `deadline`."""
        future = self.join(key, fn)
        try:
            return future.result(timeout=max(deadline.left(), 0.0))
        except FutureTimeout:
            raise on_timeout() from None
        except IntakeError as err:
            raise _own(err) from None
