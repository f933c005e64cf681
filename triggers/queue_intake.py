"""Storage-queue triggers: one row per message; a message that can never succeed is set aside, kept.

A message whose failure lies outside it (throttling, an outage, a missing privilege) is deferred: sent
back to its own queue with a delay, keeping its key (shared/deferral.py), so it spends no delivery and
is never poisoned for a cause it does not hold. After INTAKE_DEFERRAL_MAX_HOURS, or for a failure
nobody can classify, the function sets it aside in <queue>-poison itself, for `tools.queues replay`.
After a fault only an operator can fix, the breaker (shared/breaker.py) holds new messages without
trying them, one probe at a time. A message that can never succeed goes to <queue>-rejected, written
with the SDK so that it never expires; the `rejected` output binding (which sends with Storage's
7-day default) is used only where no queue storage is configured (a bare test harness).
"""

from __future__ import annotations

import base64
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import azure.functions as func

from shared import breaker, claims, deferral, instance, storage, telemetry
from shared import settings as settings_mod
from shared.errors import IntakeError
from shared.telemetry import Invocation
from shared.validation import parse_case, parse_json, parse_lead

log = logging.getLogger("intake.queue")
queue_bp = func.Blueprint()

QUEUE_BUDGET = 60.0  # seconds a message may spend in all (well under functionTimeout) before it is retried later
KEY_SOURCE = "queue-message"  # namespaces message ids, so they never collide with an externalId
UNCLASSIFIED_TRIES = 3  # a failure nobody classified, in a row, before the message is set aside in -poison


def rejection(err: IntakeError, msg: func.QueueMessage, queue: str, body: bytes, claim: str | None = None) -> str:
    """The record kept in <queue>-rejected: why, and the original body (or its claim check), to fix and replay."""
    original: dict
    if claim is not None:
        original = {"bodyClaim": claim}
    else:
        try:
            original = {"body": body.decode("utf-8")}
        except UnicodeDecodeError:
            original = {"bodyBase64": base64.b64encode(body).decode()}
    reason = err.to_dict()
    if reason.get("details"):
        reason["details"] = reason["details"][:50]
    return json.dumps({"queue": queue, "messageId": msg.id, "dequeueCount": msg.dequeue_count,
                       "rejectedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "reason": reason, **original}, ensure_ascii=False, separators=(",", ":"))


def _reject(err: IntakeError, msg: func.QueueMessage, rejected: func.Out[str], queue: str, body: bytes,
            claim: str | None) -> None:
    """Keep the record in <queue>-rejected for good; a body too large for a queue message waits in a blob."""
    if not storage.configured():
        rejected.set(rejection(err, msg, queue, body, claim))
        return
    text = rejection(err, msg, queue, body, claim)
    if not deferral.fits(text):
        text = rejection(err, msg, queue, body, claims.put(f"{queue}-rejected", msg.id, body))
    storage.keep(f"{queue}-rejected", text)


def _max_hours() -> float:
    try:
        return instance.settings().deferral_max_hours
    except Exception:  # a wrong setting (or a broken instance) is a cause outside the message: the default
        return float(settings_mod.default("INTAKE_DEFERRAL_MAX_HOURS"))


@dataclass(frozen=True)
class Applied:
    id: str
    entity: str
    created: bool  # created or changed now; False: a repeat found it done
    request_id: str | None = None


def create(entity: str) -> Callable[[bytes, str, Invocation], Applied]:
    """The work of a `cases` or `leads` message: one row, keyed by the message's key when it has no externalId."""
    def run(body: bytes, key: str, inv: Invocation) -> Applied:
        data = parse_json(body)
        event = parse_case(data, instance.default_account()) if entity == "incident" else parse_lead(data)
        outcome = instance.intake().submit(event, key=key, key_source=KEY_SOURCE, budget=QUEUE_BUDGET)
        return Applied(outcome.id, outcome.entity, outcome.created, outcome.request_id)
    return run


def process(msg: func.QueueMessage, rejected: func.Out[str], context: func.Context, queue: str,
             entity: str, work: Callable[[bytes, str, Invocation], Applied]) -> None:
    """One message through `work`, with the envelope, breaker, deferral, -rejected and poison rules of every queue.

    `entity` names the breaker's scope and the telemetry's entity (work may refine the latter once parsed)."""
    started = time.perf_counter()
    with telemetry.get().invocation("queue", entity, context) as inv:
        try:
            body, envelope = deferral.unwrap(msg.get_body(), msg.id)
        except IntakeError as err:  # a forged or broken envelope: kept with its reason, never tried
            inv.ended("rejected", code=err.code)
            _reject(err, msg, rejected, queue, msg.get_body(), None)
            log.warning("message rejected: invocation=%s queue=%s message_id=%s code=%s detail=%s",
                        context.invocation_id, queue, msg.id, err.code, err.detail,
                        extra=telemetry.fields(invocation=context.invocation_id, trigger="queue", entity=entity,
                                               queue=queue, message_id=msg.id, code=err.code, outcome="rejected"))
            return
        inv.attempt = envelope.attempt + 1
        where = telemetry.fields(invocation=context.invocation_id, trigger="queue", entity=entity, queue=queue,
                                 message_id=envelope.key, attempt=inv.attempt)
        gate, fault, wait = breaker.admit(entity)
        if gate == "hold" and fault is not None and storage.configured():
            delay = wait + random.uniform(0.5, 1.0) * breaker.BASE  # spread the held messages' return
            deferral.hold(queue, body, envelope, fault, delay)
            inv.ended("deferred", code=fault.code)
            inv.reason, inv.breaker = fault.code, "held"
            telemetry.get().held(entity, fault.code)
            log.info("message held by the breaker: invocation=%s queue=%s message_id=%s code=%s delay=%.0fs",
                     context.invocation_id, queue, envelope.key, fault.code, delay,
                     extra={**where, **telemetry.fields(outcome="deferred", deferral_reason=fault.code,
                                                        breaker="held")})
            return
        probe = gate == "probe"
        if probe:
            inv.breaker = "probe"
        try:
            outcome = work(body, envelope.key, inv)
        except IntakeError as err:
            breaker.done(entity, err, probe)
            where.update(telemetry.fields(code=err.code, request_id=err.request_id, record_id=err.record_id))
            if err.in_event:
                inv.ended(telemetry.outcome_of(err), code=err.code, record_id=err.record_id)
                _reject(err, msg, rejected, queue, body, envelope.claim)
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
        except Exception:  # nobody classified it: it may pass (deferred), but not forever (then set aside, kept)
            breaker.done(entity, IntakeError("internal_error"), probe)
            if not storage.configured():
                raise
            unclassified = IntakeError("internal_error")
            again = ((envelope.reason or {}).get("code") == "internal_error"
                     and envelope.streak >= UNCLASSIFIED_TRIES - 1)
            result, delay = ("poisoned", 0.0) if again else deferral.defer(queue, body, envelope, unclassified,
                                                                            _max_hours())
            if again:
                deferral.poison(queue, body, envelope, unclassified)
            inv.ended(result, code="internal_error")
            log.exception("message %s after an unclassified failure: invocation=%s queue=%s message_id=%s "
                          "delay=%.0fs", result, context.invocation_id, queue, envelope.key, delay,
                          extra={**where, **telemetry.fields(outcome=result, code="internal_error")})
            return
        breaker.done(entity, None, probe)
        deferral.done(envelope)
        inv.ended("created" if outcome.created else "existed", record_id=outcome.id)
        log.info("intake done: invocation=%s queue=%s message_id=%s entity=%s id=%s created=%s request_id=%s "
                 "ms=%.0f", context.invocation_id, queue, envelope.key, outcome.entity, outcome.id, outcome.created,
                 outcome.request_id or "-", (time.perf_counter() - started) * 1000,
                 extra={**where, **telemetry.fields(outcome=inv.outcome, record_id=outcome.id,
                                                    request_id=outcome.request_id)})


@queue_bp.queue_trigger(arg_name="msg", queue_name="cases", connection="AzureWebJobsStorage")
@queue_bp.queue_output(arg_name="rejected", queue_name="cases-rejected", connection="AzureWebJobsStorage")
def cases_queue(msg: func.QueueMessage, rejected: func.Out[str], context: func.Context) -> None:
    process(msg, rejected, context, "cases", "incident", create("incident"))


@queue_bp.queue_trigger(arg_name="msg", queue_name="leads", connection="AzureWebJobsStorage")
@queue_bp.queue_output(arg_name="rejected", queue_name="leads-rejected", connection="AzureWebJobsStorage")
def leads_queue(msg: func.QueueMessage, rejected: func.Out[str], context: func.Context) -> None:
    process(msg, rejected, context, "leads", "lead", create("lead"))
