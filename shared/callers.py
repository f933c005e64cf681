"""Who may call each HTTP route: one table of routes and app roles, and the one check the triggers call.

`INTAKE_CALLER_AUTH` is the one setting read at import, because the host reads each route's auth level
when it indexes the functions: under `function_key` the host checks a function key (or the admin key)
and the app checks nothing more; under `entra` the routes are anonymous at the host and the app checks
an Entra ID access token (shared/caller_tokens.py, imported on the first request) and the route's app
role. A value that is no mode never opens a route: the routes keep their key levels and every request
answers `config_invalid`. The mode stays what it was at import for the life of the process, so a
setting changed under a running worker cannot leave an anonymous route unchecked.
"""

from __future__ import annotations

from dataclasses import dataclass

import azure.functions as func

from shared import settings as settings_mod
from shared.errors import IntakeError


@dataclass(frozen=True)
class RouteAuth:
    role: str  # the app role a caller's token must carry (entra)
    key_level: func.AuthLevel  # the key the host asks for otherwise (function_key)


# One row per protected route, keyed by the route as registered. A new route: add its row, register it
# with `auth_level(route)` and call `authorize(req, route)` before anything else.
ROUTES: dict[str, RouteAuth] = {
    "cases": RouteAuth("Cases.Create", func.AuthLevel.FUNCTION),
    "leads": RouteAuth("Leads.Create", func.AuthLevel.FUNCTION),
    "diagnostics": RouteAuth("Intake.Admin", func.AuthLevel.ADMIN),
    # Follow-ups need the entity's create role; alerts a role of their own, for Azure Monitor's secure webhook.
    "cases/notes": RouteAuth("Cases.Create", func.AuthLevel.FUNCTION),
    "leads/notes": RouteAuth("Leads.Create", func.AuthLevel.FUNCTION),
    "cases/resolve": RouteAuth("Cases.Create", func.AuthLevel.FUNCTION),
    "cases/cancel": RouteAuth("Cases.Create", func.AuthLevel.FUNCTION),
    "cases/update": RouteAuth("Cases.Create", func.AuthLevel.FUNCTION),
    "alerts": RouteAuth("Alerts.Send", func.AuthLevel.FUNCTION),
}

MODE = settings_mod.caller_mode()  # read at import (see above); tests of the entra mode set it


@dataclass(frozen=True)
class Caller:
    """The application that called (its client id: `azp`, or `appid` in a v1 token), never the token."""

    app_id: str
    roles: tuple[str, ...]
    token_version: str


def auth_level(route: str) -> func.AuthLevel:
    """The auth level the host enforces for `route`: anonymous only when the app checks tokens itself."""
    return func.AuthLevel.ANONYMOUS if MODE == "entra" else ROUTES[route].key_level


def bearer(header: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header; caller_token_missing for anything else."""
    scheme, _, token = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise IntakeError("caller_token_missing")
    return token.strip()


def authenticate(req: func.HttpRequest) -> Caller | None:
    """Who calls: the caller of a valid token under entra, None under function keys (the host checked the key).

    Raises IntakeError: caller_token_missing/caller_token_invalid (401), caller_keys_unavailable or
    config_invalid (503). X-MS-CLIENT-PRINCIPAL headers are never read.
    """
    if MODE == "function_key":
        return None
    if MODE != "entra":
        problem = f"INTAKE_CALLER_AUTH must be one of {', '.join(settings_mod.CALLER_MODES)} (the routes stay behind " \
                  "function keys, and answer this, until it is; restart after changing it)"
        raise IntakeError("config_invalid", problem, details=[{"field": "INTAKE_CALLER_AUTH", "problem": problem}])
    from shared import caller_tokens

    return caller_tokens.verifier().verify(bearer(req.headers.get("Authorization")))


def require(caller: Caller | None, route: str) -> None:
    """caller_role_missing (403) unless the caller's token carries the route's app role (None: keys, checked)."""
    role = ROUTES[route].role
    if caller is not None and role not in caller.roles:
        raise IntakeError("caller_role_missing", f"The caller's token lacks the app role {role}, which "
                                                 f"/api/{route} needs.")


def authorize(req: func.HttpRequest, route: str) -> Caller | None:
    """authenticate, then require the route's role: the one call of a route that needs nothing in between."""
    caller = authenticate(req)
    require(caller, route)
    return caller


def challenge(code: str) -> str | None:
    """The WWW-Authenticate header of an answer with this code (RFC 6750 3.1), if any."""
    return {"caller_token_missing": "Bearer", "caller_token_invalid": 'Bearer error="invalid_token"'}.get(code)

