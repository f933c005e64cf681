"""HTTP routes for follow-ups on the record an event made: notes on cases and leads; resolve, cancel, update a case.

Each names its record as the create did ({externalId, source} or {id}) and is applied exactly once
(shared/followups.py). Registered like the create routes (auth level FUNCTION), so caller roles can be
wired the same way.
"""

from __future__ import annotations

import json
import logging
import time

import azure.functions as func

from shared import callers, followups, instance, telemetry
from shared.deadline import Deadline
from shared.errors import IntakeError
from shared.validation import MAX_BODY, parse_followup, parse_json
from triggers.http_intake import HTTP_BUDGET, error_response

log = logging.getLogger("intake.followups")
followups_http_bp = func.Blueprint()
_JSON = "application/json"


def note_body_limit(note_max_bytes: int) -> int:
    """Bodies up to twice the attachment limit are read, so a file over the limit is named as such (413
    attachment_too_large), not as an oversized body."""
    return 2 * note_max_bytes + MAX_BODY


def handle(req: func.HttpRequest, context: func.Context, op: str, entity: str) -> func.HttpResponse:
    started = time.perf_counter()
    deadline = Deadline(HTTP_BUDGET)
    invocation = context.invocation_id
    label = f"{entity}.{op}"
    route = f"{'cases' if entity == 'incident' else 'leads'}/{'notes' if op == 'note' else op}"
    with telemetry.get().invocation("http", label, context) as inv:
        try:
            caller = callers.authenticate(req)
            inv.caller = caller.app_id if caller else None
            callers.require(caller, route)
            note_max = instance.settings().note_max_bytes
            data = parse_json(req.get_body(), note_body_limit(note_max) if op == "note" else MAX_BODY)
            fu = parse_followup(data, op, entity, note_max)
            done = followups.apply(instance.intake().client, fu, deadline, caller.app_id if caller else None)
        except IntakeError as err:
            inv.ended(telemetry.outcome_of(err), code=err.code, record_id=err.record_id)
            log.warning("follow-up failed: invocation=%s op=%s code=%s status=%s request_id=%s ms=%.0f",
                        invocation, label, err.code, err.status, err.request_id or "-",
                        (time.perf_counter() - started) * 1000,
                        extra=telemetry.fields(invocation=invocation, trigger="http", entity=label,
                                               outcome=inv.outcome, code=err.code, request_id=err.request_id,
                                               record_id=err.record_id))
            return error_response(err, invocation)
        except Exception:
            inv.ended("failed", code="internal_error")
            log.exception("follow-up crashed: invocation=%s op=%s", invocation, label,
                          extra=telemetry.fields(invocation=invocation, trigger="http", entity=label,
                                                 outcome="failed", code="internal_error"))
            return error_response(IntakeError("internal_error"), invocation)
        inv.ended("created" if done.changed else "existed", record_id=done.id)
        log.info("follow-up done: invocation=%s op=%s id=%s record=%s changed=%s ms=%.0f", invocation, label,
                 done.id, done.record_id, done.changed, (time.perf_counter() - started) * 1000,
                 extra=telemetry.fields(invocation=invocation, trigger="http", entity=label, outcome=inv.outcome,
                                        record_id=done.id))
    return func.HttpResponse(json.dumps(answer(done)), status_code=201 if op == "note" and done.changed else 200,
                             mimetype=_JSON)


def answer(done: followups.Done) -> dict:
    if done.entity == "annotation":
        return {"id": done.id, "entity": "annotation", "created": done.changed, "recordId": done.record_id}
    return {"id": done.id, "entity": "incident", "state": done.state, "changed": done.changed}


@followups_http_bp.route(route="cases/notes", methods=["POST"], auth_level=callers.auth_level("cases/notes"))
def case_note(req: func.HttpRequest, context: func.Context) -> func.HttpResponse:
    return handle(req, context, "note", "incident")


@followups_http_bp.route(route="leads/notes", methods=["POST"], auth_level=callers.auth_level("leads/notes"))
def lead_note(req: func.HttpRequest, context: func.Context) -> func.HttpResponse:
    return handle(req, context, "note", "lead")


@followups_http_bp.route(route="cases/resolve", methods=["POST"], auth_level=callers.auth_level("cases/resolve"))
def resolve_case(req: func.HttpRequest, context: func.Context) -> func.HttpResponse:
    return handle(req, context, "resolve", "incident")


@followups_http_bp.route(route="cases/cancel", methods=["POST"], auth_level=callers.auth_level("cases/cancel"))
def cancel_case(req: func.HttpRequest, context: func.Context) -> func.HttpResponse:
    return handle(req, context, "cancel", "incident")


@followups_http_bp.route(route="cases/update", methods=["POST"], auth_level=callers.auth_level("cases/update"))
def update_case(req: func.HttpRequest, context: func.Context) -> func.HttpResponse:
    return handle(req, context, "update", "incident")
