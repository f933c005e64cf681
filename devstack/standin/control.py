"""HTTP control endpoints on the Dataverse listener, for out-of-process use (the CLI).

``POST /_standin/control`` with ``{"op": "<StandIn method>", "args": {...}}``;
``GET /_standin/counts``, ``/_standin/records/{set}``, ``/_standin/queries``, ``/_standin/info``,
``/_standin/log``. No bearer token needed; not counted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Request, Response, json_response

if TYPE_CHECKING:
    from .server import StandIn

OPS = frozenset({
    "fail_next", "fault_rates", "clear_faults", "set_hold_seconds", "set_latency", "set_max_concurrent",
    "revoke_tokens", "set_token_lifetime", "add_client_secret", "expire_secret", "remove_client_secret",
    "rotate_dynamics_secret", "set_secret", "disable_secret", "enable_secret", "delete_secret",
    "set_secret_expiry", "deny_vault_access", "remove_app_user", "restore_app_user", "disable_app_user",
    "enable_app_user", "revoke_privilege", "grant_privilege", "privileges", "add_column", "add_record", "delete_record",
    "reset_counters", "add_caller", "set_caller_roles", "set_api_token_version", "rotate_signing_key",
    "retire_signing_key",
})


def _fail(status: int, message: str) -> Response:
    return json_response(status, {"ok": False, "error": message})


def counts_json(standin: StandIn) -> dict[str, Any]:
    """Counts with ``"METHOD kind"`` string keys, plus connections."""
    out: dict[str, Any] = {}
    for service, counts in standin.counts.items():
        out[service] = {k if isinstance(k, str) else f"{k[0]} {k[1]}": v for k, v in counts.items()}
    out["connections"] = standin.connections
    return out


def handle_control(standin: StandIn, req: Request) -> Response:
    """Answer one ``/_standin/...`` request."""
    parts = [p for p in req.path.split("/") if p][1:]
    if req.method == "GET":
        if parts == ["counts"]:
            return json_response(200, counts_json(standin))
        if len(parts) == 2 and parts[0] == "records":
            if parts[1] not in standin.org.entities:
                return _fail(404, f"unknown entity set {parts[1]!r}")
            return json_response(200, {"value": standin.records(parts[1])})
        if parts == ["queries"]:
            return json_response(200, {"value": standin.queries})
        if parts == ["info"]:
            return json_response(200, standin.info())
        if parts == ["log"]:
            return json_response(200, {"value": standin.request_log})
        return _fail(404, "unknown control path")
    if req.method != "POST" or parts != ["control"]:
        return _fail(405 if parts == ["control"] else 404, "use POST /_standin/control")
    try:
        doc = req.json()
        op, args = doc["op"], doc.get("args") or {}
        if not isinstance(args, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError, AttributeError):
        return _fail(400, 'body must be {"op": "<name>", "args": {...}}')
    if op not in OPS:
        return _fail(400, f"op {op!r} is not allowed; allowed: {sorted(OPS)}")
    try:
        result = getattr(standin, op)(**args)
    except (TypeError, ValueError, KeyError) as exc:
        return _fail(400, f"{type(exc).__name__}: {exc}")
    return json_response(200, {"ok": True, "result": result})
