"""The record writer: what this app asks of Dataverse (creates by id, $batch, reads, lookups).

Every write is a create by id with If-None-Match: *, so any retry, in this call or a later one, finds the
row instead of making a second. How each request is attempted, retried and classified is the transport's
(shared/transport.py); whether a create may already be applied is kept on its `Call`, so an un-keyed
create whose outcome is unknown always ends as `dynamics_outcome_unknown` with its record id, whatever
refused the next attempt.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from shared import telemetry
from shared.batching import UNCLEAR, Answer, Gatherer, Op, decode, encode
from shared.deadline import Deadline
from shared.errors import IntakeError
from shared.settings import Settings
from shared.throttle import REQUEST_BUDGET_CODE, Gate
from shared.tokens import TokenSource
from shared.transport import Call, Reply, Transport, error_in, parse_retry_after

log = logging.getLogger(__name__)

_CREATE_ONLY = {"If-None-Match": "*"}
_UPDATE_ONLY = {"If-Match": "*"}  # a PATCH that never creates: 404 when the row is missing


@dataclass(frozen=True)
class Created:
    id: str
    created: bool
    request_id: str | None


class DataverseClient:
    """Thread-safe: one transport (session, token, gate) and one batch gatherer per instance."""

    def __init__(self, settings: Settings, tokens: TokenSource, *, pool_size: int | None = None,
                 connect_timeout: float = 3.05, read_timeout: float = 30.0, backoff: float = 0.5,
                 concurrency: int | None = None) -> None:
        self._settings = settings
        self.gate = Gate(concurrency or settings.dataverse_concurrency)
        batch = settings.batch_size
        self.batches = (Gatherer(self._send_batch, settings.batch_window_ms / 1000, batch, self.gate)
                        if batch > 1 else None)
        self.transport = Transport(settings, tokens, self.gate, pool_size=pool_size, connect_timeout=connect_timeout,
                                   read_timeout=read_timeout, backoff=backoff, on_throttle=self._throttled)
        self.session = self.transport.session
        self.pool_size = self.transport.pool_size

    @property
    def settings(self) -> Settings:
        return self._settings

    def close(self) -> None:
        self.transport.close()

    def _throttled(self, code: str | None, retry_after: float) -> None:
        if code == REQUEST_BUDGET_CODE and self.batches is not None:
            self.batches.engage(retry_after)

    def request(self, method: str, path: str, *, budget: float | Deadline = 20.0, **options: Any) -> Any:
        """One request through the transport (diagnostics and tools); see Transport.request."""
        return self.transport.request(method, path, deadline=Deadline.of(budget), **options)

    def create(self, entity_set: str, record: dict, *, record_id: str, keyed: bool,
               budget: float | Deadline = 20.0) -> Created:
        """Create-only by id (PATCH + If-None-Match: *), so every retry inside the call is safe.

        `keyed`: the id was derived from the event's key, and a 412 means the event's row already exists.
        Otherwise the id was generated for this call alone, and a 412 can only be this call's own earlier
        attempt, applied with its answer lost: the row is ours, created now.
        """
        deadline = Deadline.of(budget)
        path = f"{entity_set}({record_id})"
        data = json.dumps(record, separators=(",", ":")).encode()
        call = Call()
        try:
            if self.batches is not None:
                got = self.batches.submit(Op(path, data), deadline)
                if isinstance(got, Answer):
                    if got.status in (200, 201, 204, 412):
                        return Created(record_id, got.status != 412 or not keyed, got.request_id)
                    code, message = error_in(got.body)
                    raise self.transport.failure(got.status, code, message, got.request_id)
                call.maybe_applied = got is UNCLEAR  # resent alone below: safe, it is create-only
            reply = self.transport.request("PATCH", path, deadline=deadline, call=call, data=data,
                                           headers=_CREATE_ONLY, ok=(200, 201, 204, 412), expect="none")
        except Exception as exc:
            if not keyed and call.maybe_applied:
                detail = exc.detail if isinstance(exc, IntakeError) else type(exc).__name__
                unknown = IntakeError("dynamics_outcome_unknown", f"{detail}; the row may exist as "
                                      f"{entity_set}({record_id}).", fix_args=self._settings.fix_args(),
                                      request_id=getattr(exc, "request_id", None),
                                      upstream_code=getattr(exc, "upstream_code", None), record_id=record_id)
                raise unknown from None
            if isinstance(exc, IntakeError):
                exc.record_id = record_id
            raise
        finally:
            if self.batches is not None:
                self.batches.done()
        return Created(record_id, reply.status != 412 or not keyed, reply.request_id)

    def _send_batch(self, ops: list[Op], deadline: Deadline, call: Call) -> list[Answer]:
        """One $batch of create-only parts, each answered on its own (continue-on-error).

        A part answered 429 tells the instance's gate as a request's 429 would: the parts sent again alone
        then wait out Retry-After instead of meeting the same throttle at once.
        """
        body, content_type = encode(ops, self.transport.base)
        reply = self.transport.request("POST", "$batch", deadline=deadline, call=call, data=body, ok=(200,),
                                       expect="multipart", resend=False, headers={"Content-Type": content_type,
                                                                    "Prefer": "odata.continue-on-error"})
        answers = decode(reply.headers.get("Content-Type") or "", reply.content)
        telemetry.get().batched(len(ops))
        for answer in answers:
            if answer.status == 429:
                code = error_in(answer.body)[0] or None
                retry_after = parse_retry_after(answer.headers.get("retry-after"))
                self.gate.throttled(code, retry_after)
                self.transport.observe_throttle(code, retry_after)
        rid = reply.request_id or ""
        return [a if a.request_id else Answer(a.status, {**a.headers, "x-ms-service-request-id": rid}, a.body)
                for a in answers]

    def read(self, entity_set: str, record_id: str, columns: tuple[str, ...],
             budget: float | Deadline = 20.0) -> dict:
        """Selected columns of one row (used only to compare a repeated key's row with its new event)."""
        return self.transport.request("GET", f"{entity_set}({record_id})", deadline=Deadline.of(budget),
                                      params={"$select": ",".join(columns)}).data

    def find_id(self, entity_set: str, key_column: str, filter_: str,
                budget: float | Deadline = 20.0) -> str | None:
        """The key of the first row matching an OData filter the caller built with `odata_literal`."""
        reply = self.transport.request("GET", entity_set, deadline=Deadline.of(budget),
                                       params={"$select": key_column, "$filter": filter_, "$top": "1"})
        rows = reply.data.get("value")
        if not isinstance(rows, list) or (rows and not (isinstance(rows[0], dict) and rows[0].get(key_column))):
            raise IntakeError("dynamics_unavailable", f"Dataverse answered a lookup of {entity_set} with a body that "
                              "is not a list of rows.", request_id=reply.request_id,
                              fix_args=self._settings.fix_args())
        return str(rows[0][key_column]).lower() if rows else None

    def update(self, entity_set: str, record_id: str, columns: dict, budget: float | Deadline = 20.0) -> Reply:
        """Update-only PATCH (If-Match: *): the same columns again change nothing, and a missing row stays missing."""
        data = json.dumps(columns, separators=(",", ":")).encode()
        return self.transport.request("PATCH", f"{entity_set}({record_id})", deadline=Deadline.of(budget), data=data,
                                      headers=_UPDATE_ONLY, expect="none")

    def action(self, name: str, parameters: dict, budget: float | Deadline = 20.0) -> Reply:
        """An unbound action (CloseIncident) that returns no value; safe to repeat only if its effect is keyed."""
        data = json.dumps(parameters, separators=(",", ":")).encode()
        return self.transport.request("POST", name, deadline=Deadline.of(budget), data=data, expect="none")

    def get(self, path: str, budget: float | Deadline = 10.0) -> dict:
        return self.transport.request("GET", path, deadline=Deadline.of(budget)).data


def odata_literal(value: str) -> str:
    """An OData string literal: single quotes doubled, so a value can never end the literal early."""
    return "'" + value.replace("'", "''") + "'"
