"""Creates gathered into one Dataverse `$batch`: fewer requests against the fleet's request budget.

Dataverse counts a `$batch` as ONE request toward the 6000-per-window limit (its execution time is the
sum of its parts'). With `Prefer: odata.continue-on-error` and each create in its own top-level part,
every record gets its own answer (204 created, 412 already exists, 400 ...), so exactly-once holds as for
a single create by id (platform-facts.md, bulk writes; CreateMultiple would roll back the whole request
on one duplicate, UpsertMultiple does not say what it did per record).

But Dataverse runs a batch's parts one after another: a batch of n takes n creates' time, so with free
slots batches drain slower than single creates (measured: bench/fleet.py, no limits). So creates are
gathered only when they would wait anyway, or when the request budget bites:
- the instance's gate is full (every Dataverse slot taken, or the instance held by a 429): the creates
  that arrive gather behind the first, which waits for a slot, and go out together when one frees;
- Dataverse refused a request for the request budget (0x80072322): the first create waits a short
  window (INTAKE_BATCH_WINDOW_MS) for others, up to a size that grows from 2 while that goes on.
A create with nothing else in flight, or with too little time left (MIN_LEFT), is sent alone at once.
A part answered 429 or 401, or left unanswered, was not run: sent again alone (the gate, told of the
429, holds it). A part answered 5xx or unreadable, and every part of a batch whose answer was lost, may
have run: sent again alone as unclear, which is safe since every part is create-only. A batch refused
as a whole for a cause that passes lets each member go on alone under its own deadline.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from shared.deadline import Deadline
from shared.errors import IntakeError
from shared.throttle import Gate
from shared.transport import Call


@dataclass
class Op:
    """One create by id: `PATCH {entity_set}({record_id})` with If-None-Match: *."""

    path: str
    body: bytes


@dataclass(frozen=True)
class Answer:
    """One part's own response."""

    status: int  # 0: the part holds no HTTP response this client can read
    headers: dict[str, str]
    body: bytes

    @property
    def request_id(self) -> str | None:
        return self.headers.get("x-ms-service-request-id") or None


class Unsent:
    """The op was not part of a batch that reached Dataverse: send it alone."""


class Unclear:
    """The op was sent in a batch whose answer for it is missing: it may exist; resend it alone (safe)."""


UNSENT, UNCLEAR = Unsent(), Unclear()
ENGAGED_FOR = 300.0  # seconds: Dataverse's service protection window (platform-facts.md)
MIN_LEFT = 2.0  # seconds: a create with less time left is sent alone, never holding up a batch
Result = Answer | Unsent | Unclear
Sender = Callable[[list[Op], Deadline, Call], list[Answer]]


def encode(ops: list[Op], base: str) -> tuple[bytes, str]:
    """A multipart/mixed $batch body: one top-level application/http part per create (no change sets)."""
    boundary = f"batch_{uuid.uuid4()}"
    out = bytearray()
    for i, op in enumerate(ops, 1):
        out += (f"--{boundary}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
                f"Content-ID: {i}\r\n\r\nPATCH {base}{op.path} HTTP/1.1\r\n"
                "Content-Type: application/json; charset=utf-8\r\nIf-None-Match: *\r\n\r\n").encode()
        out += op.body + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/mixed; boundary={boundary}"


def decode(content_type: str, body: bytes) -> list[Answer]:
    """The parts of a $batch response, in order (ValueError when it is not a multipart answer)."""
    from email.parser import BytesParser  # here: only a throttled instance batches (cold start)
    from email.policy import HTTP

    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
                                              + body)
    if not msg.is_multipart():
        raise ValueError("the $batch answer is not multipart/mixed")
    answers = []
    for part in msg.iter_parts():
        raw = part.get_payload(decode=True) or b""
        head, _, content = raw.partition(b"\r\n\r\n" if b"\r\n\r\n" in raw else b"\n\n")
        lines = head.decode("latin-1").splitlines()
        words = lines[0].split() if lines else []
        if len(words) < 2 or not words[0].startswith("HTTP/") or not words[1].isdigit():
            answers.append(Answer(0, {}, b""))  # unreadable: this part alone is unclear
            continue
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        answers.append(Answer(int(words[1]), headers, content))
    return answers


@dataclass
class _Batch:
    ops: list[Op] = field(default_factory=list)
    deadlines: list[Deadline] = field(default_factory=list)
    size: int = 2  # the most ops it takes
    at_gate: bool = False  # gathered while the instance's requests wait at its gate: sent when a slot frees
    full: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    results: list[Result] = field(default_factory=list)
    error: BaseException | None = None
    call: Call = field(default_factory=Call)


class Gatherer:
    """Thread-safe; one per DataverseClient (one per instance)."""

    def __init__(self, send: Sender, window: float, size: int, gate: Gate | None = None) -> None:
        self._send = send
        self._gate = gate
        self._window = window
        self._max = size
        self._size = 1  # 1: off, every create alone
        self._until = 0.0  # batching stays on until then (ENGAGED_FOR after the last request-count 429)
        self._next_growth = 0.0
        self._lock = threading.Lock()
        self._open: _Batch | None = None
        self._busy = 0  # creates of this instance now on their way to Dataverse
        self.batches = 0  # batches sent, and the ops they carried (for the benchmark and tests)
        self.batched = 0

    @property
    def size(self) -> int:
        """The size batches are gathered up to now (1: off)."""
        return self._size

    def engage(self, retry_after: float) -> None:
        """Dataverse refused a request for the request budget (0x80072322): gather, or gather more.

        Batches help only against that budget: a batch's parts run one after another, so a batch of n
        takes n creates' time, and the execution-time budget counts every record anyway. So batching
        starts at the first request-count 429, doubles its size at each later one (at most once per
        Retry-After, up to INTAKE_BATCH_SIZE) and stops ENGAGED_FOR seconds after the last.
        """
        now = time.monotonic()
        with self._lock:
            self._until = now + ENGAGED_FOR
            if now >= self._next_growth and self._size < self._max:
                self._size = min(self._max, self._size * 2)
                self._next_growth = now + max(retry_after, 0.1)

    def submit(self, op: Op, deadline: Deadline) -> Result:
        """This op's answer from a batch, or UNSENT / UNCLEAR (send it alone). Raises the batch's IntakeError."""
        with self._lock:
            self._busy += 1
            if self._size > 1 and time.monotonic() >= self._until:
                self._size = 1  # the storm is over: every create alone again, at full parallelism
            # Creates that would wait at the gate anyway (every slot taken, or the instance held) go out
            # together when a slot frees: what waits costs no throughput by riding in one request.
            at_gate = self._max > 1 and self._gate is not None and self._gate.saturated()
            size = self._max if at_gate else self._size
            if size < 2 or (self._busy == 1 and self._open is None) or deadline.left() < MIN_LEFT + self._window:
                return UNSENT  # off, nothing else in flight (no window to pay), or too little time to share
            batch, lead = self._open, self._open is None
            if batch is None:
                batch = self._open = _Batch(size=size, at_gate=at_gate)
            index = len(batch.ops)
            batch.ops.append(op)
            batch.deadlines.append(deadline)
            if len(batch.ops) >= batch.size:
                self._open = None
                batch.full.set()
        if lead:
            if batch.at_gate and self._gate is not None:
                self._gate.wait_free(min(batch.deadlines, key=lambda d: d.left()))  # others join meanwhile
            else:
                batch.full.wait(max(0.0, min(self._window, deadline.left())))
            with self._lock:
                if self._open is batch:
                    self._open = None
            self._run(batch)
        elif not batch.done.wait(max(0.0, deadline.left())):
            return UNCLEAR  # the batch is still out: it may yet create this op's row
        if batch.error is not None:
            return self._after_failed(batch, deadline)
        return batch.results[index]

    @staticmethod
    def _after_failed(batch: _Batch, deadline: Deadline) -> Result:
        """A batch that failed as a whole: what it means for one of its creates.

        Sent and unanswered: each create may exist, and is sent again alone (UNCLEAR). Refused for a cause
        that passes (throttled, unavailable, the batch's deadline): each create goes on alone under its own
        deadline, so a short member never fails a long one. Anything else (a missing privilege...) is every
        create's own failure: each caller raises its own copy.
        """
        err = batch.error
        if batch.call.maybe_applied:
            return UNCLEAR
        if isinstance(err, IntakeError):
            if err.status == 503 and not deadline.expired():
                return UNSENT
            raise err.copy()  # each caller marks its own copy (record id) and raises it in its thread
        raise err  # type: ignore[misc]

    def done(self) -> None:
        """The caller's create has its outcome (whichever way it went)."""
        with self._lock:
            self._busy -= 1

    def _run(self, batch: _Batch) -> None:
        try:
            if len(batch.ops) == 1:
                batch.results = [UNSENT]
                return
            deadline = min(batch.deadlines, key=lambda d: d.left())
            answers = self._send(batch.ops, deadline, batch.call)
            with self._lock:
                self.batches += 1
                self.batched += len(batch.ops)
            # A part with no answer (the batch stopped), answered 401 or 429 was not run: sent again alone,
            # where the single path's rules apply (and the gate, told of the 429, holds it). One answered 5xx,
            # or whose answer cannot be read, may have run: sent again alone too, known to be unclear.
            results: list[Result] = [UNSENT if a.status in (401, 429) else UNCLEAR if a.status >= 500 or a.status == 0
                                     else a for a in answers[:len(batch.ops)]]
            batch.results = results + [UNSENT] * (len(batch.ops) - len(results))
        except ValueError:  # an answer that is not a $batch answer: the parts may have run
            batch.results = [UNCLEAR] * len(batch.ops)
        except BaseException as exc:  # noqa: BLE001 - handed to every op of the batch, then raised in each
            batch.error = exc
        finally:
            batch.done.set()
