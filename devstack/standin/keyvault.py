"""Azure Key Vault stand-in: secrets get/set behind the bearer-challenge protocol."""

from __future__ import annotations

import re
import threading
import time
import uuid
from typing import Any

from .base import HttpError, Request, Response, Route, format_retry_after, json_response
from .entra import Directory, vault_resource
from .state import Fault, State

_NAME = re.compile(r"^[0-9A-Za-z-]{1,127}$")
SERVICE_VERSION = "1.9.2179.1"


class Vault:
    """Secret versions by name (names are case-insensitive), readers and the deny switch."""

    def __init__(self, state: State) -> None:
        self.state = state
        self._lock = threading.Lock()
        self._secrets: dict[str, list[dict[str, Any]]] = {}
        self.readers: set[str] = set()
        self.denied = False
        self.challenge_resource: str | None = None  # None: vault_resource(own URL), as a real vault matches

    def set(self, name: str, value: str, exp: float | None = None, tags: dict | None = None,
            content_type: str | None = None) -> str:
        """Add a new version (it becomes the current one); returns the version id."""
        if not _NAME.match(name):
            raise ValueError(f"invalid secret name {name!r}")
        now = int(time.time())
        version = uuid.UUID(int=self.state.rng.getrandbits(128), version=4).hex
        entry = {"name": name, "version": version, "value": value, "enabled": True, "created": now,
                 "updated": now, "exp": int(exp) if exp is not None else None, "tags": dict(tags or {}),
                 "contentType": content_type}
        with self._lock:
            self._secrets.setdefault(name.lower(), []).append(entry)
        return version

    def all_values(self) -> list[str]:
        """Every value of every version (secrets, certificates' keys): what must never be shown."""
        with self._lock:
            return [v["value"] for versions in self._secrets.values() for v in versions]

    def get(self, name: str, version: str | None = None) -> dict[str, Any] | None:
        with self._lock:
            versions = self._secrets.get(name.lower())
            if not versions:
                return None
            if not version:
                return dict(versions[-1])
            for v in versions:
                if v["version"] == version.lower():
                    return dict(v)
            return None

    def _update_current(self, name: str, **changes: Any) -> None:
        with self._lock:
            versions = self._secrets.get(name.lower())
            if not versions:
                raise KeyError(name)
            versions[-1].update(changes, updated=int(time.time()))

    def disable(self, name: str, disabled: bool = True) -> None:
        self._update_current(name, enabled=not disabled)

    def set_expiry(self, name: str, epoch: float | None) -> None:
        self._update_current(name, exp=int(epoch) if epoch is not None else None)

    def delete(self, name: str) -> None:
        with self._lock:
            self._secrets.pop(name.lower(), None)


class VaultService:
    """Listener B."""

    name = "vault"
    control = None

    def __init__(self, state: State, vault: Vault, directory: Directory) -> None:
        self.state = state
        self.vault = vault
        self.directory = directory

    @property
    def base(self) -> str:
        return self.state.urls["vault"]

    @staticmethod
    def error(status: int, code: str, message: str, inner: str | None = None) -> Response:
        err: dict[str, Any] = {"code": code, "message": message}
        if inner:
            err["innererror"] = {"code": inner}
        return json_response(status, {"error": err})

    def challenge(self) -> Response:
        authority = f"{self.state.urls['entra']}/{self.state.ids.tenant_id}"
        resource = self.vault.challenge_resource or vault_resource(self.base)
        return Response(401, b"", [("WWW-Authenticate", f'Bearer authorization="{authority}", resource="{resource}"')])

    def fault_response(self, req: Request, fault: Fault) -> Response:
        s = fault.status
        if s == 401:
            return self.challenge()
        defaults = {429: ("Throttled", "Request was not processed because too many requests were received. "
                                       "Reason: VaultRequestTypeLimitReached"),
                    403: ("Forbidden", "Caller is not authorized to perform action on resource."),
                    404: ("SecretNotFound", "A secret was not found in this key vault.")}
        code, msg = defaults.get(s, ("ServiceUnavailable" if s == 503 else "InternalServerError",
                                     "The service is temporarily unavailable. Please retry."))
        resp = self.error(s, str(fault.code or code), fault.message or msg)
        retry = fault.retry_after if fault.retry_after is not None else (1 if s == 429 else None)
        if retry is not None:
            resp.header("Retry-After", format_retry_after(retry))
        return resp

    def finalize(self, req: Request, resp: Response) -> None:
        resp.headers += [
            ("x-ms-request-id", str(uuid.uuid4())),
            ("x-ms-keyvault-service-version", SERVICE_VERSION),
            ("x-ms-keyvault-region", "westeurope"),
            ("x-ms-keyvault-network-info", "conn_type=Ipv4;addr=127.0.0.1;act_addr_fam=InterNetwork;"),
            ("Cache-Control", "no-cache"),
            ("X-Content-Type-Options", "nosniff"),
        ]

    def route(self, req: Request) -> Route:
        parts = req.path.strip("/").split("/")
        if parts[0] == "secrets" and len(parts) in (2, 3) and parts[1]:
            if req.method == "GET":
                return "secret_get", self.get_secret
            if req.method == "PUT" and (len(parts) == 2 or not parts[2]):
                return "secret_set", self.put_secret
            raise HttpError(self.error(405, "MethodNotAllowed", f"The requested method {req.method} is not "
                                                                "allowed for this resource."))
        raise HttpError(self.error(404, "NotFound", f"The requested path {req.path} was not found."))

    def _authorize(self, req: Request, action: str) -> None:
        if not (req.query.get("api-version") or [""])[-1]:
            raise HttpError(self.error(400, "BadParameter", "The request URI contains an invalid or missing "
                                                            "api-version query parameter."))
        auth = req.header("Authorization") or ""
        scheme, _, token = auth.partition(" ")
        info = (self.directory.check(token.strip(), vault_resource(self.base), honour_revocation=False)
                if scheme.lower() == "bearer" else None)
        if info is None:
            raise HttpError(self.challenge())
        if self.vault.denied or info.client_id not in self.vault.readers:
            t = self.state.ids.tenant_id
            oid = uuid.uuid5(uuid.NAMESPACE_URL, info.client_id)
            msg = ("Caller is not authorized to perform action on resource.\r\nIf role assignments, deny "
                   "assignments or role definitions were changed recently, please observe propagation "
                   f"time.\r\nCaller: appid={info.client_id};oid={oid};iss=https://sts.windows.net/{t}/\r\n"
                   f"Action: 'Microsoft.KeyVault/vaults/secrets/{action}'\r\nResource: "
                   "'/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/standin/providers/"
                   "microsoft.keyvault/vaults/standin'\r\nAssignment: (not found)\r\nDenyAssignmentId: null"
                   "\r\nDecisionReason: null \r\nVault: standin;location=westeurope\r\n")
            raise HttpError(self.error(403, "Forbidden", msg, "ForbiddenByRbac"))

    def bundle(self, entry: dict[str, Any]) -> dict[str, Any]:
        attrs: dict[str, Any] = {"enabled": entry["enabled"], "created": entry["created"],
                                 "updated": entry["updated"], "recoveryLevel": "Recoverable+Purgeable",
                                 "recoverableDays": 90}
        if entry["exp"] is not None:
            attrs["exp"] = entry["exp"]
        out: dict[str, Any] = {"value": entry["value"],
                               "id": f"{self.base}/secrets/{entry['name']}/{entry['version']}",
                               "attributes": attrs, "tags": entry["tags"]}
        if entry["contentType"]:
            out["contentType"] = entry["contentType"]
        return out

    def get_secret(self, req: Request) -> Response:
        self._authorize(req, "getSecret/action")
        parts = req.path.strip("/").split("/")
        name, version = parts[1], (parts[2] if len(parts) > 2 else "")
        entry = self.vault.get(name, version or None)
        if entry is None:
            ident = f"{name}/{version}" if version else name
            return self.error(404, "SecretNotFound",
                              f"A secret with (name/id) {ident} was not found in this key vault. If you "
                              "recently deleted this secret you may be able to recover it using the correct "
                              "recovery command. For help resolving this issue, please see "
                              "https://go.microsoft.com/fwlink/?linkid=2125182")
        if not entry["enabled"]:
            return self.error(403, "Forbidden", "Operation get is not allowed on a disabled secret.",
                              "SecretDisabled")
        return json_response(200, self.bundle(entry))

    def put_secret(self, req: Request) -> Response:
        self._authorize(req, "setSecret/action")
        name = req.path.strip("/").split("/")[1]
        try:
            body = req.json()
            value = body["value"]
            if not isinstance(value, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return self.error(400, "BadParameter", "Property has invalid value\r\n")
        if not _NAME.match(name):
            return self.error(400, "BadParameter", "The request URI contains an invalid name: " + name)
        attrs = body.get("attributes") or {}
        self.vault.set(name, value, attrs.get("exp"), body.get("tags"), body.get("contentType"))
        return json_response(200, self.bundle(self.vault.get(name) or {}))
