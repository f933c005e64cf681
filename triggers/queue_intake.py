"""Storage-queue triggers: one row per message; a message that can never succeed is set aside, kept.

A message whose failure lies outside it (throttling, an outage, a missing privilege) is deferred: sent
back to its own queue with a delay, keeping its key (shared/deferral.py), so it spends no delivery and
is never poisoned for a cause it does not hold. After INTAKE_DEFERRAL_MAX_HOURS, or for a failure
nobody can classify, the function sets it aside in <queue>-poison itself, for `tools.queues replay`.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable

import azure.functions as func

from shared import deferral, runtime, storage, telemetry
from shared import settings as settings_mod
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


def _max_hours() -> float:
    try:
        return runtime.settings().deferral_max_hours
    except IntakeError:  # a wrong setting is itself a cause outside the message: defer it by the default
        return float(settings_mod.default("INTAKE_DEFERRAL_MAX_HOURS"))


def _process(msg: func.QueueMessage, rejected: func.Out[str], context: func.Context, queue: str,
             parse: Callable[[dict], Event]) -> None:
    started = time.perf_counter()
    body, envelope = deferral.unwrap(msg.get_body(), msg.id)
    entity = "incident" if parse is parse_case else "lead"
    with telemetry.get().invocation("queue", entity, context) as inv:
        inv.attempt = envelope.attempt + 1
        where = telemetry.fields(invocation=context.invocation_id, trigger="queue", entity=entity, queue=queue,
                                 message_id=envelope.key, attempt=inv.attempt)
        try:
            event = parse(parse_json(body))
            outcome = runtime.intake().submit(event, key=envelope.key, key_source=KEY_SOURCE, budget=QUEUE_BUDGET)
        except IntakeError as err:
            where.update(telemetry.fields(code=err.code, request_id=err.request_id, record_id=err.record_id))
            if err.in_event:
                inv.ended(telemetry.outcome_of(err), code=err.code, record_id=err.record_id)
                rejected.set(rejection(err, msg, queue, body))
                log.warning("message rejected: invocation=%s queue=%s message_id=%s code=%s request_id=%s",
                            context.invocation_id, queue, envelope.key, err.code, err.request_id or "-",
                            extra={**where, **telemetry.fields(outcome=inv.outcome)})
                return
            if not storage.configured():  # nowhere to defer to (a bare test harness): the host retries it
                raise
            result, delay = deferral.defer(queue, body, envelope, err, _max_hours())
            inv.ended(result, code=err.code, record_id=err.record_id)
            inv.reason = err.code
            log.warning("message %s: invocation=%s queue=%s message_id=%s attempt=%s code=%s delay=%.0fs "
                        "request_id=%s", result, context.invocation_id, queue, envelope.key, envelope.attempt,
                        err.code, delay, err.request_id or "-",
                        extra={**where, **telemetry.fields(outcome=result, deferral_reason=err.code)})
            return
        except Exception:  # nobody can classify it: set it aside now, with its key, instead of five blind tries
            if not storage.configured():
                raise
            inv.ended("poisoned", code="internal_error")
            log.exception("message poisoned: invocation=%s queue=%s message_id=%s", context.invocation_id, queue,
                          envelope.key, extra={**where, **telemetry.fields(outcome="poisoned", code="internal_error")})
            deferral.poison(queue, body, envelope, IntakeError("internal_error"))
            return
        inv.ended("created" if outcome.created else "existed", record_id=outcome.id)
        log.info("intake done: invocation=%s queue=%s message_id=%s entity=%s id=%s created=%s request_id=%s "
                 "ms=%.0f", context.invocation_id, queue, envelope.key, outcome.entity, outcome.id, outcome.created,
                 outcome.request_id or "-", (time.perf_counter() - started) * 1000,
                 extra={**where, **telemetry.fields(outcome=inv.outcome, record_id=outcome.id,
                                                    request_id=outcome.request_id)})


@queue_bp.queue_trigger(arg_name="msg", queue_name="cases", connection="AzureWebJobsStorage")
@queue_bp.queue_output(arg_name="rejected", queue_name="cases-rejected", connection="AzureWebJobsStorage")
def cases_queue(msg: func.QueueMessage, rejected: func.Out[str], context: func.Context) -> None:
    _process(msg, rejected, context, "cases", parse_case)


@queue_bp.queue_trigger(arg_name="msg", queue_name="leads", connection="AzureWebJobsStorage")
@queue_bp.queue_output(arg_name="rejected", queue_name="leads-rejected", connection="AzureWebJobsStorage")
def leads_queue(msg: func.QueueMessage, rejected: func.Out[str], context: func.Context) -> None:
    _process(msg, rejected, context, "leads", parse_lead)
