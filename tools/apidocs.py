"""Generate the API descriptions from their one source: docs/contract.schema.json and the code table.

    python -m tools.apidocs          write docs/openapi.json and the Power Automate connector's swagger
    python -m tools.apidocs --check  exit 1 (one line per stale file) when a committed file is out of date

OpenAPI 3.1 takes the contract's JSON Schema (2020-12) as it is; Swagger 2.0 (Power Automate custom
connectors accept nothing newer) gets a down-converted copy: no null types, no anyOf, no lookaround
patterns; the descriptions keep every rule.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONTRACT = ROOT / "docs" / "contract.schema.json"
OPENAPI = ROOT / "docs" / "openapi.json"
SWAGGER = ROOT / "integrations" / "power-automate" / "apiDefinition.swagger.json"
SWAGGER_ENTRA = ROOT / "integrations" / "power-automate" / "entra" / "apiDefinition.swagger.json"
KEY_HEADER = "x-functions-key"
# INTAKE_CALLER_AUTH=entra: a caller's token is for the intake API's app registration (README, Calling with Entra ID).
API_SCOPE = "api://<INTAKE_API_CLIENT_ID>/.default"
TOKEN_URL = "https://login.microsoftonline.com/<INTAKE_API_TENANT_ID>/oauth2/v2.0/token"
ROUTES = {"cases": ("case", "CreateCase", "Create a case",
                    "Creates a Dynamics 365 case (incident) for a customer found or created by email or phone. "
                    "Send externalId (and source) so a retry can never create a second case."),
          "leads": ("lead", "CreateLead", "Create a lead",
                    "Creates a Dynamics 365 lead. Send externalId (and source) so a retry can never create a "
                    "second lead."),
          "cases/notes": ("caseNote", "AddCaseNote", "Add a note to a case",
                          "Adds a note (with an optional attachment) to the case an event created, exactly once per "
                          "noteId. Name the case by its externalId and source, or by its id."),
          "leads/notes": ("leadNote", "AddLeadNote", "Add a note to a lead",
                          "Adds a note (with an optional attachment) to the lead an event created, exactly once per "
                          "noteId. Name the lead by its externalId and source, or by its id."),
          "cases/resolve": ("caseResolve", "ResolveCase", "Resolve a case",
                            "Resolves the case with one case resolution; sending it again changes nothing."),
          "cases/cancel": ("caseCancel", "CancelCase", "Cancel a case",
                           "Cancels the case; sending it again changes nothing."),
          "cases/update": ("caseUpdate", "UpdateCase", "Update a case",
                           "Changes an active case's description or priority; never creates a case."),
          "alerts": ("azureMonitorAlert", "AzureMonitorAlert", "Azure Monitor alert webhook",
                     "An action group's webhook (common alert schema): Fired opens a case, Resolved resolves it, "
                     "exactly once. Every failure a retry could fix is a 503 with Retry-After.")}
CONNECTOR_ROUTES = ("cases", "leads", "cases/notes", "leads/notes", "cases/resolve", "cases/cancel", "cases/update")
# Which error codes each answer can carry (the code table's status decides; a code is listed where it occurs).
ERROR_STATUSES = (400, 401, 403, 404, 409, 413, 415, 500, 502, 503, 504)


def _contract() -> dict[str, Any]:
    return json.loads(CONTRACT.read_text())


def _codes() -> dict[int, list[str]]:
    from shared.errors import CODES

    out: dict[int, list[str]] = {}
    for code, spec in CODES.items():
        out.setdefault(spec.status, []).append(code)
    return out


def _created_schema(entity: str) -> dict[str, Any]:
    return {"type": "object", "required": ["id", "entity", "created"], "additionalProperties": False,
            "properties": {"id": {"type": "string", "format": "uuid", "description": "The record's id."},
                           "entity": {"type": "string", "enum": [entity]},
                           "created": {"type": "boolean",
                                       "description": "true: created now; false: this key's record existed."}}}


def _note_schema() -> dict[str, Any]:
    return {"type": "object", "required": ["id", "entity", "created", "recordId"], "additionalProperties": False,
            "properties": {"id": {"type": "string", "format": "uuid", "description": "The note's id."},
                           "entity": {"type": "string", "enum": ["annotation"]},
                           "created": {"type": "boolean",
                                       "description": "true: created now; false: this noteId's note existed."},
                           "recordId": {"type": "string", "format": "uuid", "description": "The record's id."}}}


def _state_schema() -> dict[str, Any]:
    return {"type": "object", "required": ["id", "entity", "state", "changed"], "additionalProperties": False,
            "properties": {"id": {"type": "string", "format": "uuid", "description": "The case's id."},
                           "entity": {"type": "string", "enum": ["incident"]},
                           "state": {"type": "string", "enum": ["active", "resolved", "cancelled"]},
                           "changed": {"type": "boolean",
                                       "description": "true: changed now; false: it was already so."}}}


def _alert_schema() -> dict[str, Any]:
    out = _created_schema("incident")
    out["required"] = [*out["required"], "state"]
    out["properties"]["state"] = {"type": "string", "enum": ["active", "resolved"]}
    return out


def _success(route: str, entity_def: str) -> dict[str, Any]:
    """The 2xx answers of a route."""
    def answer(description: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": schema}}}
    if route.endswith("/notes"):
        return {"201": answer("Created.", _note_schema()),
                "200": answer("A repeat of the same noteId with the same content: the existing note.", _note_schema())}
    if route.startswith("cases/"):
        return {"200": answer("Done, now or before.", _state_schema())}
    if route == "alerts":
        return {"201": answer("The alert's case, created now.", _alert_schema()),
                "200": answer("The alert's case existed.", _alert_schema())}
    entity = "incident" if entity_def == "case" else "lead"
    return {"201": answer("Created.", _created_schema(entity)),
            "200": answer("A repeat of the same event's key: the existing record.", _created_schema(entity))}


def _error_schema(codes: list[str]) -> dict[str, Any]:
    return {"type": "object", "required": ["error"], "additionalProperties": False, "properties": {"error": {
        "type": "object", "required": ["code", "message", "fix", "correlationId"], "properties": {
            "code": {"type": "string", "enum": sorted(codes),
                     "description": "Stable code: README, 'Error codes and troubleshooting'."},
            "message": {"type": "string"}, "fix": {"type": "string"}, "correlationId": {"type": "string"},
            "details": {"type": "array", "items": {"type": "object", "properties": {
                "field": {"type": "string"}, "problem": {"type": "string"}}}},
            "upstreamCode": {"type": "string"}, "requestId": {"type": "string"},
            "recordId": {"type": "string", "description": "The record the error is about (409, 503, 504)."},
            "retryAfter": {"type": "number"}}}}}


def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the HTTP routes."""
    from shared import __version__

    contract = _contract()
    schemas = json.loads(json.dumps(contract["$defs"]).replace("#/$defs/", "#/components/schemas/"))
    by_status = _codes()
    paths: dict[str, Any] = {}
    for route, (entity_def, op_id, summary, description) in ROUTES.items():
        responses: dict[str, Any] = _success(route, entity_def)
        for status in ERROR_STATUSES:
            resp: dict[str, Any] = {"description": ", ".join(sorted(by_status[status])),
                                    "content": {"application/json": {"schema": _error_schema(by_status[status])}}}
            if status == 401:
                resp["description"] = ("Under function keys: no key or a wrong one, answered by the Functions host "
                                       "with an empty body. Under Entra ID: " + resp["description"] + ".")
                resp["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}, "description":
                                   'Bearer (no token), or Bearer error="invalid_token" (Entra ID mode).'}}
            if status == 503:
                resp["headers"] = {"Retry-After": {"schema": {"type": "integer", "minimum": 1},
                                                   "description": "Seconds to wait before sending again."}}
            responses[str(status)] = resp
        keyed = route in ("cases", "leads")
        paths[f"/{route}"] = {"post": {
            "operationId": op_id, "summary": summary, "description": description,
            "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                            "description": schemas["idempotencyKey"]["description"],
                            "schema": {"$ref": "#/components/schemas/idempotencyKey"}}] if keyed else [],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{entity_def}"}}}},
            "responses": responses}}
    paths["/health"] = {"get": {"operationId": "Health", "summary": "Liveness", "security": [],
                                "responses": {"200": {"description": "The app is running.", "content": {
                                    "application/json": {"schema": {"type": "object", "required": ["status"],
                                                                    "properties": {"status": {"const": "ok"},
                                                                                   "version": {"type": "string"}}}}}}}}}
    return {"openapi": "3.1.0",
            "info": {"title": "Dynamics 365 intake", "version": __version__,
                     "description": contract["description"]},
            "servers": [{"url": "https://{app}.azurewebsites.net/api",
                         "variables": {"app": {"default": "contoso-intake"}}},
                        {"url": "http://localhost:7071/api"}],
            "security": [{"functionKey": []}, {"entraId": [API_SCOPE]}],
            "paths": paths,
            "components": {"schemas": schemas, "securitySchemes": {
                "functionKey": {"type": "apiKey", "in": "header", "name": KEY_HEADER,
                                "description": "INTAKE_CALLER_AUTH=function_key (the default): a function key of the "
                                               "Function App (az functionapp function keys list)."},
                "entraId": {"type": "oauth2", "description": (
                    "INTAKE_CALLER_AUTH=entra: an Entra ID access token for the intake API (client credentials, "
                    "scope api://<INTAKE_API_CLIENT_ID>/.default) carrying the route's app role: Cases.Create "
                    "(POST /cases), Leads.Create (POST /leads). Sent as Authorization: Bearer <token>."),
                    "flows": {"clientCredentials": {"tokenUrl": TOKEN_URL, "scopes": {
                        API_SCOPE: "The app roles assigned to the calling application."}}}}}}}


_SWAGGER_KEYWORDS = frozenset({"type", "format", "title", "description", "default", "maximum", "minimum", "maxLength",
                               "minLength", "maxItems", "minItems", "enum", "items", "properties", "required",
                               "additionalProperties", "readOnly", "example"})


def _down(node: Any, defs: dict[str, Any]) -> Any:
    """A JSON Schema 2020-12 node as Swagger 2.0 accepts it: refs inlined, nulls and anyOf folded away."""
    if isinstance(node, list):
        return [_down(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        return _down(copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]]), defs)
    out: dict[str, Any] = {}
    alternatives = node.get("anyOf") or []
    if len(alternatives) == 2 and {"type": "null"} in alternatives:  # "X or null": X, nullable
        (other,) = [alt for alt in alternatives if alt != {"type": "null"}]
        folded = {**_down(other, defs), "x-nullable": True}
        if "description" in node:
            folded["description"] = node["description"]
        return folded
    if "anyOf" in node:  # fold the alternatives into one object whose description says "exactly one way"
        props: dict[str, Any] = {}
        for alt in node["anyOf"]:
            for name, sub in (alt.get("properties") or {}).items():
                if "enum" not in sub:
                    props.setdefault(name, _down(sub, defs))
        if props:
            out["properties"] = props
    for key, value in node.items():
        if key not in _SWAGGER_KEYWORDS or (key == "properties" and "properties" in out):
            continue
        if key == "type" and isinstance(value, list):
            kinds = [t for t in value if t != "null"]
            if len(kinds) == 1:  # several kinds (string, number, boolean) have no Swagger 2.0 type: leave it open
                out["type"] = kinds[0]
            if "null" in value:
                out["x-nullable"] = True
        elif key == "enum":
            out["enum"] = [v for v in value if v is not None]
        elif key == "properties":
            out["properties"] = {k: _down(v, defs) for k, v in value.items()}
        else:
            out[key] = _down(value, defs)
    return out


def swagger(entra: bool = False) -> dict[str, Any]:
    """The Power Automate / Logic Apps custom connector's definition (Swagger 2.0), from the same source;
    `entra`: the variant whose connection signs in with Azure Active Directory (OAuth 2.0)."""
    doc = openapi()
    defs = doc["components"]["schemas"]
    paths: dict[str, Any] = {}
    for route in CONNECTOR_ROUTES:
        entity_def, op_id, summary, description = ROUTES[route]
        op = doc["paths"][f"/{route}"]["post"]
        responses = {}
        for status, resp in op["responses"].items():
            responses[status] = {"description": resp["description"]}
            if "content" in resp:
                responses[status]["schema"] = _down(resp["content"]["application/json"]["schema"], defs)
        paths[f"/{route}"] = {"post": {
            "operationId": op_id, "summary": summary, "description": description,
            "consumes": ["application/json"], "produces": ["application/json"],
            "parameters": [
                *([{"name": "Idempotency-Key", "in": "header", "required": False, "type": "string",
                    "x-ms-summary": "Idempotency key", "description": defs["idempotencyKey"]["description"]}]
                  if route in ("cases", "leads") else []),
                {"name": "body", "in": "body", "required": True, "schema": _down(defs[entity_def], defs)}],
            "responses": responses}}
    return {"swagger": "2.0",
            "info": {"title": "Dynamics 365 intake", "version": doc["info"]["version"],
                     "description": "Create Dynamics 365 cases and leads, and add notes, resolve, cancel and update "
                                    "them, exactly once, with named failures."},
            "host": "contoso-intake.azurewebsites.net", "basePath": "/api", "schemes": ["https"],
            "securityDefinitions": _ENTRA_SECURITY if entra else {"api_key": {"type": "apiKey", "in": "header",
                                                                               "name": KEY_HEADER}},
            "security": [{"oauth2_auth": []}] if entra else [{"api_key": []}],
            "paths": paths}


# What the maker portal writes for "OAuth 2.0 / Azure Active Directory": the real endpoints and scope come from
# apiProperties.json's oAuthSettings (the connection's tenant, client, resource), not from these URLs.
_ENTRA_SECURITY = {"oauth2_auth": {"type": "oauth2", "flow": "accessCode",
                                   "authorizationUrl": "https://login.windows.net/common/oauth2/authorize",
                                   "tokenUrl": "https://login.windows.net/common/oauth2/authorize", "scopes": {}}}


GENESYS = ROOT / "integrations" / "genesys"
GENESYS_ACTIONS = ("create-case", "create-lead")
# The custom auth action of a "User Defined (OAuth)" credential: Entra ID's client credentials request for the
# intake API, from the credential's fields. Genesys keeps the answer as ${authResponse.*} for the data actions.
_GENESYS_AUTH = {
    "name": "Dynamics 365 intake - Entra ID token (custom auth)",
    "integrationType": "custom-rest-actions",
    "actionType": "custom",
    "secure": True,
    "category": "Dynamics 365 intake",
    "config": {
        "request": {
            "requestUrlTemplate": "https://${credentials.loginHost}/${credentials.tenantId}/oauth2/v2.0/token",
            "requestType": "POST",
            "headers": {"Content-Type": "application/x-www-form-urlencoded"},
            "requestTemplate": "grant_type=client_credentials&client_id=$esc.url($credentials.clientId)"
                               "&client_secret=$esc.url($credentials.clientSecret)"
                               "&scope=$esc.url(\"api://${credentials.apiClientId}/.default\")"},
        "response": {"translationMap": {}, "translationMapDefaults": {}, "successTemplate": "${rawResult}"},
        "timeoutSeconds": 10},
    "contract": {"input": {"inputSchema": {"$schema": "http://json-schema.org/draft-04/schema#",
                                           "title": "Custom auth input", "type": "object", "properties": {}}},
                 "output": {"successSchema": {"$schema": "http://json-schema.org/draft-04/schema#",
                                              "title": "Entra ID token response", "type": "object",
                                              "required": ["access_token"],
                                              "properties": {"access_token": {"type": "string"},
                                                             "token_type": {"type": "string"},
                                                             "expires_in": {"type": "integer"}}}}}}


def genesys_oauth() -> dict[Path, str]:
    """The OAuth variant of the Genesys data actions, from the function-key ones (their one source): the same
    request and contract, sending the custom auth action's token instead of the function key."""
    out = {GENESYS / "oauth" / "custom-auth.json": json.dumps(_GENESYS_AUTH, indent=2, ensure_ascii=False) + "\n"}
    for name in GENESYS_ACTIONS:
        action = json.loads((GENESYS / f"{name}.json").read_text())
        action["name"] += " (Entra ID)"
        headers = action["config"]["request"]["headers"]
        headers.pop(KEY_HEADER)
        action["config"]["request"]["headers"] = {"Authorization": "Bearer ${authResponse.access_token}", **headers}
        out[GENESYS / "oauth" / f"{name}.json"] = json.dumps(action, indent=2, ensure_ascii=False) + "\n"
    return out


def rendered() -> dict[Path, str]:
    return {OPENAPI: json.dumps(openapi(), indent=2, ensure_ascii=False) + "\n",
            SWAGGER: json.dumps(swagger(), indent=2, ensure_ascii=False) + "\n",
            SWAGGER_ENTRA: json.dumps(swagger(entra=True), indent=2, ensure_ascii=False) + "\n",
            **genesys_oauth()}


def main(argv: list[str]) -> int:
    files = rendered()
    if argv[:1] == ["--check"]:
        stale = [p for p, text in files.items() if not p.exists() or p.read_text() != text]
        for p in stale:
            print(f"{p.relative_to(ROOT)} is out of date: run python -m tools.apidocs", file=sys.stderr)
        return 1 if stale else 0
    for p, text in files.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        print(f"wrote {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
