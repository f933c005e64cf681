"""Deferral: a queue message whose failure lies outside it waits in its own queue, spending no delivery.

Throttling, outages and faults an operator will fix are not the message's fault: raising would spend
one of maxDequeueCount deliveries each time and end in <queue>-poison. Instead the function sends a
copy back to its own queue with an initial visibility delay (Retry-After and jitter for a 429, growing
back-off for the rest) and completes the original. The copy is an envelope: the original body unchanged,
the key the first delivery used (its message id, when the event has no externalId), when it was first
seen, the attempt count and the last reason. Send-then-complete is not atomic, but a crash between
them leaves two copies with the same key, and creates are idempotent by key: still one record.

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

from shared import storage
from shared.errors import IntakeError

MARKER = "intakeDeferral"  # the envelope's version field; a producer's event never has it
MAX_DELAY = 6 * 3600.0  # seconds; Storage allows 7 days, a message's TTL may be shorter
BACKOFF_BASE = 5.0
BACKOFF_CAP = 300.0


@dataclass
class Envelope:
    key: str  # the key the first delivery used
    first_seen: datetime
    attempt: int  # deferrals so far
    reason: dict | None = None
    replayed_at: datetime | None = None
    streak: int = 0  # deferrals in a row for a cause other than throttling: the back-off's exponent

    def age_hours(self, now: datetime) -> float:
        since = max(self.first_seen, self.replayed_at or self.first_seen)
        return (now - since).total_seconds() / 3600


def _time(text: object) -> datetime | None:
    try:
        return datetime.fromisoformat(str(text))
    except ValueError:
        return None


def replayed(raw: bytes, now: datetime | None = None) -> bytes:
    """An envelope as `tools.queues replay` sends it back: its age limit counts from now. Others as they are."""
    body, envelope = unwrap(raw, "")
    if not envelope.key:
        return raw
    envelope.replayed_at = now or datetime.now(UTC)
    return wrap(body, envelope).encode("utf-8")


def unwrap(raw: bytes, message_id: str, now: datetime | None = None) -> tuple[bytes, Envelope]:
    """The original body and its envelope; a producer's message is its own first delivery."""
    now = now or datetime.now(UTC)
    if raw[:1] == b"{" and MARKER.encode() in raw[:64]:
        try:
            doc = json.loads(raw)
            first = _time(doc["firstSeen"])
            if doc.get(MARKER) == 1 and isinstance(doc.get("body"), str) and isinstance(doc.get("key"), str) \
                    and first is not None:
                return doc["body"].encode("utf-8"), Envelope(doc["key"], first, int(doc.get("attempt") or 0),
                                                             doc.get("reason"), _time(doc.get("replayedAt")),
                                                             int(doc.get("streak") or 0))
        except (ValueError, KeyError, TypeError):
            pass
    return raw, Envelope(message_id, now, 0)


def wrap(body: bytes, envelope: Envelope) -> str:
    doc = {MARKER: 1, "key": envelope.key, "firstSeen": envelope.first_seen.isoformat(),
           "attempt": envelope.attempt, "streak": envelope.streak, "reason": envelope.reason,
           "body": body.decode("utf-8")}
    if envelope.replayed_at is not None:
        doc["replayedAt"] = envelope.replayed_at.isoformat()
    return json.dumps(doc)


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
    storage.queue(queue).send_message(wrap(body, envelope), visibility_timeout=max(1, math.ceil(delay)))
    return "deferred", delay


def poison(queue: str, body: bytes, envelope: Envelope, err: IntakeError) -> None:
    """Set the envelope aside in `<queue>-poison`, keeping the key for an exactly-once replay."""
    envelope.reason = _reason(err)
    client = storage.queue(f"{queue}-poison")
    from azure.core.exceptions import ResourceNotFoundError

    try:
        client.send_message(wrap(body, envelope))
    except ResourceNotFoundError:  # the host creates -poison on first use; here it may not exist yet
        client.create_queue()
        client.send_message(wrap(body, envelope))
