"""Operator routes: an anonymous liveness probe and the diagnostics of the whole chain.

Diagnostics run with the admin (master) key only: the producers' function and host keys cannot
open it, and what it shows is for the operator.
"""

from __future__ import annotations

import json
import logging

import azure.functions as func

from shared import __version__

log = logging.getLogger("intake.ops")
bp = func.Blueprint()
_HEALTH = json.dumps({"status": "ok", "version": __version__})


@bp.route(route="health", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def health(req: func.HttpRequest) -> func.HttpResponse:
    """Liveness only: no outbound call, nothing about the configuration."""
    return func.HttpResponse(_HEALTH, status_code=200, mimetype="application/json")


@bp.route(route="diagnostics", methods=["GET"], auth_level=func.AuthLevel.ADMIN)
def diagnostics(req: func.HttpRequest, context: func.Context) -> func.HttpResponse:
    from shared import diagnostics as diag

    report = diag.cached()
    report["correlationId"] = context.invocation_id
    for step in report["steps"]:
        if step["status"] in ("failed", "warning"):
            log.warning("diagnostics: invocation=%s step=%s code=%s", context.invocation_id, step["name"],
                        step["code"])
    return func.HttpResponse(json.dumps(report), status_code=200 if report["status"] == "ok" else 503,
                             mimetype="application/json")
