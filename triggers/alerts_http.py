"""POST /api/alerts: an Azure Monitor action group's webhook (common alert schema) opens and closes its case.

Action groups retry only 408, 429, 503, 504 and connection failures, a few times within about a minute,
and wait about 10 s for an answer: the route answers within ALERT_BUDGET, and every failure a retry could
fix is a 503 with Retry-After (never 500 or 502, which are not retried). A failure in the alert itself
keeps its own status (400, 409).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import azure.functions as func

from shared import alerts, callers, followups, instance, telemetry
from shared.deadline import Deadline
from shared.errors import IntakeError
from shared.validation import FollowUp, Ref, parse_case, parse_json
from triggers.http_intake import error_response

log = logging.getLogger("intake.alerts")
alerts_bp = func.Blueprint()
ALERT_BUDGET = 7.0  # seconds: within the action group's ~10 s, with room for the worker and the network
_JSON = "application/json"


def retryable(err: IntakeError) -> IntakeError:
    """The error as the action group should see it: never a 5xx other than 503 (500, 502 and 504 are not retried:
    a missing privilege, a wrong setting or an alert account that does not exist are fixed, then retried)."""
    if err.status < 500 or err.status == 503:
        return err
    twin = err.copy()
    twin.spec = dataclasses.replace(err.spec, status=503)
    twin.retry_after = err.retry_after if err.retry_after is not None else 5.0
    return twin


@alerts_bp.route(route="alerts", methods=["POST"], auth_level=callers.auth_level("alerts"))
def alert(req: func.HttpRequest, context: func.Context) -> func.HttpResponse:
    started = time.perf_counter()
    deadline = Deadline(ALERT_BUDGET)
    invocation = context.invocation_id
    with telemetry.get().invocation("http", "alert", context) as inv:
        try:
            caller = callers.authenticate(req)
            inv.caller = caller.app_id if caller else None
            callers.require(caller, "alerts")
            data = parse_json(req.get_body(), alerts.MAX_BODY)
            account = instance.settings().alert_account_id
            got = alerts.parse(data, account)
            inv.entity = f"alert.{got.condition.lower()}"
            outcome = instance.intake().submit(parse_case(got.case), budget=deadline)
            state, changed = "active", outcome.created
            if got.condition == "Resolved":
                done = followups.apply(instance.intake().client, FollowUp(
                    "resolve", "incident", Ref(id=outcome.id), subject=got.resolution["subject"],
                    text=got.resolution["description"]), deadline)
                state, changed = "resolved", outcome.created or done.changed
        except IntakeError as err:
            shown = retryable(err)
            inv.ended(telemetry.outcome_of(err), code=err.code, record_id=err.record_id)
            log.warning("alert failed: invocation=%s code=%s status=%s request_id=%s ms=%.0f", invocation, err.code,
                        shown.status, err.request_id or "-", (time.perf_counter() - started) * 1000,
                        extra=telemetry.fields(invocation=invocation, trigger="http", entity=inv.entity,
                                               outcome=inv.outcome, code=err.code, request_id=err.request_id,
                                               record_id=err.record_id))
            return error_response(shown, invocation)
        except Exception:
            inv.ended("failed", code="internal_error")
            log.exception("alert crashed: invocation=%s", invocation,
                          extra=telemetry.fields(invocation=invocation, trigger="http", entity=inv.entity,
                                                 outcome="failed", code="internal_error"))
            return error_response(retryable(IntakeError("internal_error")), invocation)
        inv.ended("created" if changed else "existed", record_id=outcome.id)
        log.info("alert done: invocation=%s condition=%s id=%s created=%s state=%s ms=%.0f", invocation,
                 got.condition, outcome.id, outcome.created, state, (time.perf_counter() - started) * 1000,
                 extra=telemetry.fields(invocation=invocation, trigger="http", entity=inv.entity, outcome=inv.outcome,
                                        record_id=outcome.id))
    body = {"id": outcome.id, "entity": "incident", "created": outcome.created, "state": state}
    return func.HttpResponse(json.dumps(body), status_code=201 if outcome.created else 200, mimetype=_JSON)
