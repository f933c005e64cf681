"""HTTP routes that create cases and leads and answer with the new record's id."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import azure.functions as func

from shared import callers, instance, telemetry
from shared.deadline import Deadline
from shared.errors import IntakeError
from shared.intake import HEADER_KEY_SOURCE
from shared.validation import Event, idempotency_key, parse_case, parse_json, parse_lead

log = logging.getLogger("intake.http")
http_bp = func.Blueprint()

HTTP_BUDGET = 15.0  # seconds a caller on the line may wait for the whole call: secret, token, lookups, waits
_JSON = "application/json"


def error_response(err: IntakeError, correlation_id: str) -> func.HttpResponse:
    body = {"error": {**err.to_dict(), "correlationId": correlation_id}}
    headers = {}
    challenge = callers.challenge(err.code)
    if challenge:
        headers["WWW-Authenticate"] = challenge
    if err.status == 503:
        headers["Retry-After"] = str(max(1, round(err.retry_after if err.retry_after is not None else 5)))
    return func.HttpResponse(json.dumps(body), status_code=err.status, mimetype=_JSON, headers=headers)


def _handle(req: func.HttpRequest, context: func.Context, parse: Callable[[dict], Event],
            route: str) -> func.HttpResponse:
    started = time.perf_counter()
    deadline = Deadline(HTTP_BUDGET)
    invocation = context.invocation_id
    entity = "incident" if parse is parse_case else "lead"
    with telemetry.get().invocation("http", entity, context) as inv:
        try:
            caller = callers.authenticate(req)
            inv.caller = caller.app_id if caller else None  # known from here on, a refused role included
            callers.require(caller, route)
            data = parse_json(req.get_body())
            event = parse_case(data, instance.default_account()) if parse is parse_case else parse(data)
            key = idempotency_key(req.headers.get("Idempotency-Key"))
            # Header keys live in their own namespace (per source): they never meet an externalId. Under entra
            # both kinds live in the caller's namespace: one caller cannot reach or probe another's keys.
            outcome = instance.intake().submit(event, key=key, key_source=HEADER_KEY_SOURCE + (event.source or ""),
                                              budget=deadline, caller=caller.app_id if caller else None)
        except IntakeError as err:
            inv.ended(telemetry.outcome_of(err), code=err.code, record_id=err.record_id)
            log.warning("intake failed: invocation=%s entity=%s code=%s status=%s request_id=%s ms=%.0f",
                        invocation, entity, err.code, err.status, err.request_id or "-",
                        (time.perf_counter() - started) * 1000,
                        extra=telemetry.fields(invocation=invocation, trigger="http", entity=entity,
                                               outcome=inv.outcome, code=err.code, request_id=err.request_id,
                                               record_id=err.record_id, caller_app_id=inv.caller))
            return error_response(err, invocation)
        except Exception:
            inv.ended("failed", code="internal_error")
            log.exception("intake crashed: invocation=%s entity=%s", invocation, entity,
                          extra=telemetry.fields(invocation=invocation, trigger="http", entity=entity,
                                                 outcome="failed", code="internal_error", caller_app_id=inv.caller))
            return error_response(IntakeError("internal_error"), invocation)
        inv.ended("created" if outcome.created else "existed", record_id=outcome.id)
        log.info("intake done: invocation=%s entity=%s id=%s created=%s request_id=%s ms=%.0f",
                 invocation, outcome.entity, outcome.id, outcome.created, outcome.request_id or "-",
                 (time.perf_counter() - started) * 1000,
                 extra=telemetry.fields(invocation=invocation, trigger="http", entity=entity, outcome=inv.outcome,
                                        record_id=outcome.id, request_id=outcome.request_id,
                                        caller_app_id=inv.caller))
    body = {"id": outcome.id, "entity": outcome.entity, "created": outcome.created}
    return func.HttpResponse(json.dumps(body), status_code=201 if outcome.created else 200, mimetype=_JSON)


@http_bp.route(route="cases", methods=["POST"], auth_level=callers.auth_level("cases"))
def create_case(req: func.HttpRequest, context: func.Context) -> func.HttpResponse:
    return _handle(req, context, parse_case, "cases")


@http_bp.route(route="leads", methods=["POST"], auth_level=callers.auth_level("leads"))
def create_lead(req: func.HttpRequest, context: func.Context) -> func.HttpResponse:
    return _handle(req, context, parse_lead, "leads")
