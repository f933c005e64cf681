"""The breaker: after a fault only an operator can fix, queue messages wait instead of re-running the path.

A missing privilege, a vault 403 or a wrong setting fails every message the same way until someone
fixes it. After such a fault (a code marked `operator` in shared/errors.py) this instance holds new
queue messages (they are deferred without calling the vault, Entra ID or Dataverse) for a back-off that
grows from BASE to CAP; after it, one message at a time probes the path; a probe that succeeds closes
the breaker. Scope: a missing Dataverse privilege is about one entity (cases may lack it while leads
do not), so it opens that entity's breaker; every other such fault opens the instance's ("*").
Per instance, in memory: a restart closes it, and the first message finds the fault again.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from shared.errors import IntakeError

BASE = 30.0  # seconds of the first hold
CAP = 900.0  # the longest hold
LEASE = 120.0  # a probe that has not reported by then (its invocation died) lets another one probe
ANY = "*"
PER_ENTITY = frozenset({"dynamics_privilege_missing"})


@dataclass
class _Open:
    code: str
    since: float  # time.time() of the first fault
    faults: int  # faults in a row: the back-off's exponent
    next_probe: float  # time.monotonic()
    probing_since: float | None = None


_lock = threading.Lock()
_open: dict[str, _Open] = {}


def scope(entity: str, code: str) -> str:
    return entity if code in PER_ENTITY else ANY


def admit(entity: str) -> tuple[str, IntakeError | None, float]:
    """("pass", None, 0): go ahead; ("probe", None, 0): go ahead as the one probe (report it with `done`);
    ("hold", the fault, seconds until the next probe): defer the message without trying it."""
    now = time.monotonic()
    with _lock:
        state = next((_open[s] for s in (entity, ANY) if s in _open), None)
        if state is None:
            return "pass", None, 0.0
        probing = state.probing_since is not None and now - state.probing_since < LEASE
        if now >= state.next_probe and not probing:
            state.probing_since = now
            return "probe", None, 0.0
        wait = max(state.next_probe - now, 1.0)
        return "hold", IntakeError(state.code, "Held by the breaker: " + IntakeError(state.code).detail), wait


def done(entity: str, err: IntakeError | None, probe: bool) -> None:
    """Report an attempt's outcome: an operator's fault opens (or extends) the breaker; success closes it."""
    now = time.monotonic()
    with _lock:
        if err is not None and err.spec.operator:
            key = scope(entity, err.code)
            state = _open.get(key)
            if state is None:
                state = _open[key] = _Open(err.code, time.time(), 0, now)
            state.code = err.code
            state.faults += 1
            state.next_probe = now + min(BASE * 2 ** min(state.faults - 1, 20), CAP)
            state.probing_since = None
            return
        for key in (entity, ANY):
            state = _open.get(key)
            if state is None:
                continue
            if err is None:  # the path works again
                del _open[key]
            elif probe:  # a probe that proved nothing (throttled, a bad event): the next message probes
                state.probing_since = None


def state() -> list[dict]:
    """What diagnostics shows: each open breaker, its code, since when, and when it probes next."""
    now_m, now = time.monotonic(), time.time()
    with _lock:
        return [{"scope": key, "code": s.code, "faults": s.faults,
                 "since": datetime.fromtimestamp(s.since, UTC).isoformat(timespec="seconds"),
                 "nextProbe": datetime.fromtimestamp(now + max(s.next_probe - now_m, 0), UTC).isoformat(
                     timespec="seconds")}
                for key, s in sorted(_open.items())]


def reset() -> None:
    """Close every breaker (tests; a restart does the same)."""
    with _lock:
        _open.clear()
