"""Storage-queue triggers: one row per message; a message that can never succeed is set aside, kept.

A message whose failure lies outside it (throttling, an outage, a missing privilege) raises, so the
host makes it visible again later and, after maxDequeueCount tries, moves it to <queue>-poison for
the operator to replay once the cause is fixed.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable

import azure.functions as func

from shared import runtime, telemetry
from shared.errors import IntakeError
from shared.validation import Event, parse_case, parse_json, parse_lead

log = logging.getLogger("intake.queue")
queue_bp = func.Blueprint()

QUEUE_BUDGET = 60.0  # seconds a message may spend in all (well under functionTimeout) before it is retried later
KEY_SOURCE = "queue-message"  # namespaces message ids, so they never collide with an externalId


def rejection(err: IntakeError, msg: func.QueueMessage, queue: str, body: bytes) -> str:
    """The record kept in <queue>-rejected: why, and the original body, to fix and replay."""
    try:
        original: dict = {"body": body.decode("utf-8")}
    except UnicodeDecodeError:
        original = {"bodyBase64": base64.b64encode(body).decode()}
    reason = err.to_dict()
    if reason.get("details"):
        reason["details"] = reason["details"][:50]
    return json.dumps({"queue": queue, "messageId": msg.id, "dequeueCount": msg.dequeue_count,
                       "rejectedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "reason": reason, **original})


def _process(msg: func.QueueMessage, rejected: func.Out[str], context: func.Context, queue: str,
             parse: Callable[[dict], Event]) -> None:
    started = time.perf_counter()
    body = msg.get_body()
    entity = "incident" if parse is parse_case else "lead"
    with telemetry.get().invocation("queue", entity) as inv:
        inv.attempt = msg.dequeue_count
        try:
            event = parse(parse_json(body))
            outcome = runtime.intake().submit(event, key=msg.id, key_source=KEY_SOURCE, budget=QUEUE_BUDGET)
        except IntakeError as err:
            where = telemetry.fields(invocation=context.invocation_id, trigger="queue", entity=entity, queue=queue,
                                     message_id=msg.id, code=err.code, request_id=err.request_id,
                                     record_id=err.record_id)
            if err.in_event:
                inv.ended("conflict" if err.code == "idempotency_conflict" else "rejected", code=err.code,
                          record_id=err.record_id)
                rejected.set(rejection(err, msg, queue, body))
                log.warning("message rejected: invocation=%s queue=%s message_id=%s code=%s request_id=%s",
                            context.invocation_id, queue, msg.id, err.code, err.request_id or "-",
                            extra={**where, "intake.outcome": inv.outcome})
                return
            inv.ended("failed", code=err.code, record_id=err.record_id)
            log.error("message failed, will be retried: invocation=%s queue=%s message_id=%s dequeue_count=%s "
                      "code=%s request_id=%s", context.invocation_id, queue, msg.id, msg.dequeue_count, err.code,
                      err.request_id or "-", extra={**where, "intake.outcome": "failed"})
            raise
        inv.ended("created" if outcome.created else "existed", record_id=outcome.id)
        log.info("intake done: invocation=%s queue=%s message_id=%s entity=%s id=%s created=%s request_id=%s "
                 "ms=%.0f", context.invocation_id, queue, msg.id, outcome.entity, outcome.id, outcome.created,
                 outcome.request_id or "-", (time.perf_counter() - started) * 1000,
                 extra=telemetry.fields(invocation=context.invocation_id, trigger="queue", entity=entity,
                                        queue=queue, message_id=msg.id, outcome=inv.outcome, record_id=outcome.id,
                                        request_id=outcome.request_id))


@queue_bp.queue_trigger(arg_name="msg", queue_name="cases", connection="AzureWebJobsStorage")
@queue_bp.queue_output(arg_name="rejected", queue_name="cases-rejected", connection="AzureWebJobsStorage")
def cases_queue(msg: func.QueueMessage, rejected: func.Out[str], context: func.Context) -> None:
    _process(msg, rejected, context, "cases", parse_case)


@queue_bp.queue_trigger(arg_name="msg", queue_name="leads", connection="AzureWebJobsStorage")
@queue_bp.queue_output(arg_name="rejected", queue_name="leads-rejected", connection="AzureWebJobsStorage")
def leads_queue(msg: func.QueueMessage, rejected: func.Out[str], context: func.Context) -> None:
    _process(msg, rejected, context, "leads", parse_lead)
