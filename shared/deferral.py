"""Deferral: a queue message whose failure lies outside it waits in its own queue, spending no delivery.

Throttling, outages and faults an operator will fix are not the message's fault: raising would spend
one of maxDequeueCount deliveries each time and end in <queue>-poison. Instead the function sends a
copy back to its own queue with an initial visibility delay (Retry-After and jitter for a 429, growing
back-off for the rest) and completes the original. The copy is an envelope: the original body once
(compact UTF-8 JSON), the key the first delivery used (its message id, when the event has no
externalId), when it was first seen, the attempt count and the last reason. Send-then-complete is not
atomic, but a crash between them leaves two copies with the same key, and creates are idempotent by
key: still one record.

Everything sent here never expires (`time_to_live=-1`): Storage's default is 7 days. An envelope that
would not fit a queue message (48 KiB of text before base64) carries a claim check instead of the
body (shared/claims.py). An envelope is checked like any input: one that carries the marker but breaks
the rules (key, counts, times, claim) raises `envelope_invalid`, and the function rejects it.

A message deferred for longer than INTAKE_DEFERRAL_MAX_HOURS, or whose failure nobody can classify, is
written to <queue>-poison by the function itself, as an envelope: `tools.queues replay` brings it back
under its original key, keyed or not. Producers never see or send envelopes.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from datetime import UTC, datetime

from shared import claims, storage
from shared.errors import IntakeError
from shared.validation import is_key

MARKER = "intakeDeferral"  # the envelope's version field; a producer's event never has it
MAX_DELAY = 6 * 3600.0  # seconds; Storage allows 7 days, a message's TTL may be shorter
BACKOFF_BASE = 5.0
BACKOFF_CAP = 300.0
KEEP = -1  # time_to_live: never expires
QUEUE_TEXT_LIMIT = 48 * 1024  # bytes of text before base64: 64 KiB on the queue
HEADROOM = 1024  # room for a longer reason and replayedAt, so an envelope that fit keeps fitting
MAX_COUNT = 100_000  # attempt and streak: far above what INTAKE_DEFERRAL_MAX_HOURS allows
CLOCK_SKEW = 300.0  # seconds a time written by another instance may lie ahead of ours


@dataclass
class Envelope:
    key: str  # the key the first delivery used
    first_seen: datetime
    attempt: int  # deferrals so far
    reason: dict | None = None
    replayed_at: datetime | None = None
    streak: int = 0  # deferrals in a row for a cause other than throttling: the back-off's exponent
    claim: str | None = None  # the claim-check blob holding the body, when it did not fit

    def age_hours(self, now: datetime) -> float:
        since = max(self.first_seen, self.replayed_at or self.first_seen)
        return (now - since).total_seconds() / 3600


def _time(text: object) -> datetime | None:
    try:
        return datetime.fromisoformat(str(text))
    except ValueError:
        return None


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT


def _header(doc: object, now: datetime) -> tuple[Envelope | None, str]:
    """The envelope a parsed document describes, or (None, the first rule it breaks)."""
    if not isinstance(doc, dict) or doc.get(MARKER) != 1:
        return None, f"{MARKER} is not 1"
    if not is_key(doc.get("key")):
        return None, "key breaks the key rule (printable ASCII without spaces, 1-200 characters)"
    for name in ("attempt", "streak"):
        if name in doc and not _count(doc[name]):
            return None, f"{name} is not an integer from 0 to {MAX_COUNT}"
    times = {}
    for name in ("firstSeen", "replayedAt"):
        if name not in doc or (name == "replayedAt" and doc[name] is None):
            continue
        at = _time(doc[name]) if isinstance(doc[name], str) else None
        if at is None or at.tzinfo is None:
            return None, f"{name} is not an ISO 8601 time with a time zone"
        if (at - now).total_seconds() > CLOCK_SKEW:
            return None, f"{name} lies in the future"
        times[name] = at
    if "firstSeen" not in times:
        return None, "firstSeen is missing"
    body, claim = doc.get("body"), doc.get("claim")
    if (body is None) == (claim is None):
        return None, "it carries neither or both of body and claim"
    if body is not None and not isinstance(body, str):
        return None, "body is not a string"
    if claim is not None and not (isinstance(claim, str) and claims.NAME.match(claim)):
        return None, "claim is not a claim-check name"
    if doc.get("reason") is not None and not isinstance(doc["reason"], dict):
        return None, "reason is not an object"
    return Envelope(doc["key"], times["firstSeen"], doc.get("attempt") or 0, doc.get("reason"),
                    times.get("replayedAt"), doc.get("streak") or 0, claim), ""


def _marked(raw: bytes) -> bool:
    return raw[:1] == b"{" and MARKER.encode() in raw[:64]


def invalid(problem: str) -> IntakeError:
    return IntakeError("envelope_invalid", f"The deferral envelope is not valid: {problem}.")


def replayed(raw: bytes, now: datetime | None = None) -> bytes:
    """An envelope as `tools.queues replay` sends it back: its age limit counts from now. Others as they are.

    Only the header changes: a claim check stays a claim check (the blob is not read here)."""
    now = now or datetime.now(UTC)
    if not _marked(raw):
        return raw
    try:
        doc = json.loads(raw)
    except ValueError:
        return raw
    envelope, _ = _header(doc, now)
    if envelope is None:
        return raw  # the function rejects it with its reason
    doc["replayedAt"] = now.isoformat()
    return _dumps(doc).encode("utf-8")


def unwrap(raw: bytes, message_id: str, now: datetime | None = None) -> tuple[bytes, Envelope]:
    """The original body and its envelope; a producer's message is its own first delivery.

    Raises IntakeError(envelope_invalid) for a message that carries the marker and breaks a rule, and the
    storage SDK's error when a claim check cannot be read now (the host retries the message)."""
    now = now or datetime.now(UTC)
    if not _marked(raw):
        return raw, Envelope(message_id, now, 0)
    try:
        doc = json.loads(raw)
    except ValueError:
        raise invalid("it is not JSON") from None
    envelope, problem = _header(doc, now)
    if envelope is None:
        raise invalid(problem)
    if envelope.claim is None:
        return doc["body"].encode("utf-8"), envelope
    body = claims.get(envelope.claim)
    if body is None:
        raise invalid("its claim-check blob is gone")
    return body, envelope


def _dumps(doc: dict) -> str:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


def wrap(body: bytes, envelope: Envelope) -> str:
    """The envelope's text: the body once, or its claim check when the envelope holds one."""
    doc = {MARKER: 1, "key": envelope.key, "firstSeen": envelope.first_seen.isoformat(),
           "attempt": envelope.attempt, "streak": envelope.streak, "reason": envelope.reason}
    if envelope.claim is not None:
        doc["claim"] = envelope.claim
    else:
        doc["body"] = body.decode("utf-8")
    if envelope.replayed_at is not None:
        doc["replayedAt"] = envelope.replayed_at.isoformat()
    return _dumps(doc)


def fits(text: str) -> bool:
    """Whether `text` fits a queue message with room to grow (base64 makes 4 bytes of 3)."""
    return len(text.encode("utf-8")) <= QUEUE_TEXT_LIMIT - HEADROOM


def fit(queue: str, body: bytes, envelope: Envelope) -> str:
    """The envelope's text, moving the body to a claim-check blob first when it would not fit."""
    text = wrap(body, envelope)
    if envelope.claim is None and not fits(text):
        envelope.claim = claims.put(queue, envelope.key, body)
        text = wrap(body, envelope)
    return text


def done(envelope: Envelope) -> None:
    """The record is done: its claim-check blob, if any, is no longer needed."""
    if envelope.claim is not None:
        claims.delete(envelope.claim)


def delay_for(err: IntakeError, streak: int) -> float:
    """When the copy becomes visible: after Retry-After (plus jitter) for throttling, else a back-off that
    grows with the deferrals in a row for such causes (`streak`), so one slow moment in a long throttled
    burst does not cost minutes."""
    if err.code == "dynamics_throttled" and err.retry_after is not None:
        return min(err.retry_after + random.uniform(0.05, 0.3) + 0.05 * err.retry_after * random.random(), MAX_DELAY)
    if err.retry_after is not None:
        base = max(err.retry_after, BACKOFF_BASE * 2 ** min(streak - 1, 10))
    else:
        base = BACKOFF_BASE * 2 ** min(streak - 1, 10)
    return min(base, BACKOFF_CAP) * random.uniform(0.75, 1.0)


def _reason(err: IntakeError) -> dict:
    out = err.to_dict()
    out.pop("details", None)
    return out


def defer(queue: str, body: bytes, envelope: Envelope, err: IntakeError, max_hours: float,
          now: datetime | None = None) -> tuple[str, float]:
    """Send the envelope back to `queue` with a delay, or (too old) to `<queue>-poison`.

    Returns ("deferred", delay seconds) or ("poisoned", 0). Raises the storage SDK's error when the
    queue cannot be written: the host then retries the original, which loses nothing.
    """
    now = now or datetime.now(UTC)
    envelope.reason = _reason(err)
    if envelope.age_hours(now) >= max_hours:
        poison(queue, body, envelope, err)
        return "poisoned", 0.0
    envelope.attempt += 1
    envelope.streak = 0 if err.code == "dynamics_throttled" else envelope.streak + 1
    delay = delay_for(err, envelope.streak)
    storage.keep(queue, fit(queue, body, envelope), visibility_timeout=max(1, math.ceil(delay)))
    return "deferred", delay


def hold(queue: str, body: bytes, envelope: Envelope, err: IntakeError, delay: float) -> None:
    """Send the envelope back for `delay` seconds without trying it (the breaker is open): no attempt is
    counted and no age limit applies, since the message itself never failed."""
    envelope.reason = _reason(err)
    storage.keep(queue, fit(queue, body, envelope), visibility_timeout=max(1, min(math.ceil(delay), int(MAX_DELAY))))


def poison(queue: str, body: bytes, envelope: Envelope, err: IntakeError) -> None:
    """Set the envelope aside in `<queue>-poison`, keeping the key for an exactly-once replay."""
    envelope.reason = _reason(err)
    storage.keep(f"{queue}-poison", fit(queue, body, envelope))
