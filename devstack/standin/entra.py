"""Microsoft Entra ID stand-in: OpenID metadata and the v2 client-credentials token endpoint."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, unquote

from .base import HandlerFn, HttpError, Request, Response, Route, format_retry_after, json_response
from .state import Fault, State, secret_value

VAULT_RESOURCE = "https://vault.azure.net"  # the public cloud's vault resource (kept for reference)


def vault_resource(vault_url: str) -> str:
    """The resource the vault stand-in names in its challenge: its host less the first label.

    Key Vault's SDK verifies that the vault host ends with "." + the challenge resource's host
    (x.vault.azure.net / vault.azure.net). 127.0.0.1 ends with ".0.0.1", so the app keeps that
    verification on against the stand-in, as it does for every real vault. The SDK compares host and
    port together, so the resource keeps the vault's port.
    """
    netloc = vault_url.split("://", 1)[-1].split("/", 1)[0]
    return "https://" + netloc.split(".", 1)[1]

_FIC_HINT = ("Check your federated identity credential Subject, Audience and Issuer against the presented assertion. "
             "https://learn.microsoft.com/entra/workload-id/workload-identity-federation")

MESSAGES = {
    90002: "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing "
           "into the correct cloud. Check with your subscription administrator, this may happen if there are "
           "no active subscriptions for the tenant.",
    700016: "Application with identifier '{client_id}' was not found in the directory '{tenant}'. This "
            "can happen if the application has not been installed by the administrator of the tenant or "
            "consented to by any user in the tenant. You may have sent your authentication request to the "
            "wrong tenant.",
    7000215: "Invalid client secret provided. Ensure the secret being sent in the request is the client "
             "secret value, not the client secret ID, for a secret added to app '{client_id}'.",
    7000222: "The provided client secret keys for app '{client_id}' are expired. Visit the Azure portal to "
             "create new keys for your app: https://aka.ms/NewClientSecret, or consider using certificate "
             "credentials for added security: https://aka.ms/certCreds.",
    7000218: "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
    500011: "The resource principal named {resource} was not found in the tenant named {tenant}. This "
            "can happen if the application has not been installed by the administrator of the tenant or "
            "consented to by any user in the tenant. You might have sent your authentication request to the "
            "wrong tenant.",
    1002012: "The provided value for scope {scope} is not valid. Client credential flows must have a scope "
             "value with /.default suffixed to the resource identifier (application ID URI).",
    900144: "The request body must contain the following parameter: '{param}'.",
    70003: "The app requested an unsupported grant type '{grant}'.",
    90024: "A transient error has occurred. Please try again.",
    700027: "The certificate with identifier used to sign the client assertion is not registered on application. "
            "[Reason - The key was not found., Thumbprint of key used by client: '{thumbprint}', Found key "
            "'Start=..., End=...'. Please visit the Azure Portal, Graph Explorer or directly use MS Graph to see "
            "configured keys for app Id '{client_id}'.]",
    700024: "Client assertion is not within its valid time range. Current time: {now}, assertion valid from "
            "{nbf}, expiry time of assertion {exp}.",
    70021: "No matching federated identity record found for presented assertion. Assertion Issuer: '{issuer}'. "
           "Assertion Subject: '{subject}'. Assertion Audience: '{audience}'.",
    # Entra ID names the part of a federated assertion that matched no federated credential: 700211 the
    # issuer, 700212 the audience, 700213 the subject (e.g. Azure/login#482, azure-workload-identity#1200:
    # "AADSTS700213: No matching federated identity record found for presented assertion subject '...'.
    # Check your federated identity credential Subject, Audience and Issuer against the presented assertion.").
    700211: "No matching federated identity record found for presented assertion issuer '{value}'. " + _FIC_HINT,
    700212: "No matching federated identity record found for presented assertion audience '{value}'. " + _FIC_HINT,
    700213: "No matching federated identity record found for presented assertion subject '{value}'. " + _FIC_HINT,
    50027: "JWT token is invalid or malformed.",
    50196: "The server terminated an operation because it encountered a client request loop.",
}


STORAGE_AUDIENCE = "https://storage.azure.com"  # Azure Storage's resource (scope https://storage.azure.com/.default)
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
EXCHANGE_AUDIENCE = "api://AzureADTokenExchange"


@dataclass(frozen=True)
class TokenInfo:
    """What a bearer token stands for."""

    client_id: str
    audience: str
    expires_at: float
    generation: int


@dataclass
class Registration:
    """What an app registration trusts besides secrets: certificates and federated credentials."""

    certificates: dict[str, tuple[bytes, float]] = field(default_factory=dict)  # sha1 hex -> (DER, not_after)
    federated: list[tuple[str, str, str]] = field(default_factory=list)  # (issuer, subject, audience)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Directory:
    """Tenant directory: app registrations with their secrets, and every token issued (thread-safe)."""

    def __init__(self, state: State, token_lifetime: int) -> None:
        self.state = state
        self.token_lifetime = token_lifetime
        self._lock = threading.Lock()
        self._apps: dict[str, dict[str, str]] = {}
        self._tokens: dict[str, TokenInfo] = {}
        self._issued: list[str] = []
        self._generation = 0
        self._registrations: dict[str, Registration] = {}
        self.identities: dict[str, str] = {}  # managed identities: client id -> principal (object) id
        self.identity_header = secrets.token_urlsafe(16)
        self.callers: Any = None  # the intake API's registration, callers and signing keys (callers.py)

    def registration(self, client_id: str) -> Registration:
        with self._lock:
            return self._registrations.setdefault(client_id, Registration())

    def register_certificate(self, client_id: str, cert_pem: str) -> str:
        """Upload a certificate's public part to an app registration; returns its SHA-1 thumbprint (hex)."""
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding

        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        der = cert.public_bytes(Encoding.DER)
        thumb = hashlib.sha1(der).hexdigest()  # noqa: S324 - x5t is SHA-1 by definition
        self.registration(client_id).certificates[thumb] = (der, cert.not_valid_after_utc.timestamp())
        return thumb

    def add_managed_identity(self, client_id: str | None = None) -> tuple[str, str]:
        client_id = client_id or str(uuid.UUID(int=self.state.rng.getrandbits(128), version=4))
        principal = str(uuid.UUID(int=self.state.rng.getrandbits(128), version=4))
        with self._lock:
            self.identities[client_id] = principal
        return client_id, principal

    def issuer(self) -> str:
        return f"{self.state.urls['entra']}/{self.state.ids.tenant_id}/v2.0"

    def add_app(self, client_id: str, secret: str) -> None:
        with self._lock:
            self._apps[client_id] = {secret: "valid"}

    def has_app(self, client_id: str) -> bool:
        with self._lock:
            return client_id in self._apps

    def add_secret(self, client_id: str, value: str | None = None) -> str:
        with self._lock:
            value = value or secret_value(self.state.rng)
            self._apps[client_id][value] = "valid"
            return value

    def expire_secret(self, client_id: str, value: str) -> None:
        with self._lock:
            self._apps[client_id][value] = "expired"

    def remove_secret(self, client_id: str, value: str) -> None:
        with self._lock:
            self._apps[client_id].pop(value, None)

    def secret_status(self, client_id: str, value: str) -> str | None:
        """"valid", "expired", or None when the app has no such secret."""
        with self._lock:
            return self._apps.get(client_id, {}).get(value)

    def record(self, token: str, client_id: str, audience: str, lifetime: int) -> None:
        """Remember a token issued elsewhere (a caller's, for the intake API), for the leak check."""
        with self._lock:
            self._tokens[token] = TokenInfo(client_id, audience, time.time() + lifetime, self._generation)
            self._issued.append(token)

    def issue(self, client_id: str, audience: str) -> tuple[str, int]:
        lifetime = self.token_lifetime
        token = (self._storage_token(client_id, lifetime) if audience == STORAGE_AUDIENCE
                 else "sti1." + secrets.token_urlsafe(32))
        with self._lock:
            self._tokens[token] = TokenInfo(client_id, audience, time.time() + lifetime, self._generation)
            self._issued.append(token)
        return token, lifetime

    def _storage_token(self, client_id: str, lifetime: int) -> str:
        """A JWT shaped like Entra ID's v1 access token for Azure Storage, which the storage service (and
        Azurite with `--oauth basic`) reads: iss https://sts.windows.net/<tenant>/, aud https://storage.azure.com,
        iat/nbf/exp. Azurite checks issuer, audience and lifetime, not the signature, so it is unsigned."""
        tenant, now = self.state.ids.tenant_id, int(time.time())
        principal = self.identities.get(client_id) or str(uuid.uuid5(uuid.NAMESPACE_URL, client_id))
        claims = {"aud": STORAGE_AUDIENCE, "iss": f"https://sts.windows.net/{tenant}/", "iat": now, "nbf": now,
                  "exp": now + lifetime, "appid": client_id, "oid": principal, "sub": principal, "tid": tenant,
                  "uti": secrets.token_urlsafe(16), "ver": "1.0"}
        header = {"typ": "JWT", "alg": "none"}
        return ".".join(_b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)) + "."

    def revoke_all(self) -> None:
        """Every token issued so far stops working at Dataverse; later ones work."""
        with self._lock:
            self._generation += 1

    def check(self, token: str, audience: str, honour_revocation: bool = True) -> TokenInfo | None:
        """The token's info when it is known, for ``audience``, unexpired and (optionally) not revoked."""
        with self._lock:
            info = self._tokens.get(token)
            if info is None or info.audience != audience or info.expires_at <= time.time():
                return None
            if honour_revocation and info.generation < self._generation:
                return None
            return info

    def issued_to(self, audience: str) -> int:
        """How many tokens were issued for `audience` (e.g. the Dataverse URL)."""
        with self._lock:
            return sum(1 for info in self._tokens.values() if info.audience == audience)

    def issued(self) -> list[str]:
        with self._lock:
            return list(self._issued)


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


class EntraService:
    """Listener A."""

    name = "entra"
    control = None

    def __init__(self, state: State, directory: Directory) -> None:
        self.state = state
        self.directory = directory

    @property
    def base(self) -> str:
        return self.state.urls["entra"]

    # ---- errors -------------------------------------------------------------------------------------
    def error(self, req: Request, status: int, error: str, code: int, text: str | None = None,
              retry_after: float | None = None, **fmt: str) -> Response:
        trace_id = str(uuid.uuid4())
        corr = req.header("client-request-id") or str(uuid.uuid4())
        stamp = _stamp()
        text = text or MESSAGES.get(code, "An error occurred.").format(**fmt)
        body = {
            "error": error,
            "error_description": f"AADSTS{code}: {text}\r\nTrace ID: {trace_id}\r\n"
                                 f"Correlation ID: {corr}\r\nTimestamp: {stamp}",
            "error_codes": [code],
            "timestamp": stamp,
            "trace_id": trace_id,
            "correlation_id": corr,
            "error_uri": f"{self.base}/error?code={code}",
        }
        resp = json_response(status, body, headers=[("x-ms-request-id", trace_id)])
        if retry_after is not None:
            resp.header("Retry-After", format_retry_after(retry_after))
        return resp

    def fault_response(self, req: Request, fault: Fault) -> Response:
        code = int(fault.code) if fault.code is not None and str(fault.code).isdigit() else 90024
        if fault.status in (429,) or fault.status >= 500:
            error = "temporarily_unavailable"
        elif fault.status == 401:
            error = "invalid_client"
        else:
            error = "invalid_request"
        if isinstance(fault.code, str) and not fault.code.isdigit():
            error, code = fault.code, 90024
        retry = fault.retry_after if fault.retry_after is not None else (1 if fault.status == 429 else None)
        return self.error(req, fault.status, error, code, fault.message, retry)

    def finalize(self, req: Request, resp: Response) -> None:
        cid = req.header("client-request-id")
        if cid:
            resp.header("client-request-id", cid)
        resp.header("Cache-Control", "no-store, no-cache")

    # ---- routing ------------------------------------------------------------------------------------
    def route(self, req: Request) -> Route:
        parts = [p for p in req.path.split("/") if p]
        m = req.method
        if parts == ["common", "discovery", "instance"]:
            return "instance_discovery", self._allow(m, "GET", self.instance_discovery)
        if len(parts) == 4 and parts[1:] == ["v2.0", ".well-known", "openid-configuration"]:
            return "openid", self._allow(m, "GET", self.openid)
        if len(parts) == 4 and parts[1:] == ["oauth2", "v2.0", "token"]:
            return "token", self._allow(m, "POST", self.token)
        if parts == ["msi", "token"]:
            return "msi", self._allow(m, "GET", self.managed_identity)
        if len(parts) == 4 and parts[1:] == ["discovery", "v2.0", "keys"]:
            return "keys", self._allow(m, "GET", self.keys)
        raise HttpError(json_response(404, {"error": "not_found",
                                            "error_description": f"No route for {req.path}."}))

    def _allow(self, method: str, expected: str, fn: HandlerFn) -> HandlerFn:
        if method != expected:
            raise HttpError(json_response(405, {"error": "invalid_request",
                                                "error_description": f"AADSTS900561: The endpoint only "
                                                                     f"accepts {expected} requests."}))
        return fn

    def _tenant(self, req: Request) -> str:
        tenant = unquote(req.path.strip("/").split("/")[0])
        if tenant.lower() != self.state.ids.tenant_id:
            raise HttpError(self.error(req, 400, "invalid_tenant", 90002, tenant=tenant))
        return self.state.ids.tenant_id

    # ---- endpoints ----------------------------------------------------------------------------------
    def openid(self, req: Request) -> Response:
        t = self._tenant(req)
        a = f"{self.base}/{t}"
        doc = {
            "token_endpoint": f"{a}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt",
                                                      "client_secret_basic"],
            "jwks_uri": f"{a}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": f"{a}/v2.0",
            "request_uri_parameter_supported": False,
            "userinfo_endpoint": f"{self.base}/oidc/userinfo",
            "authorization_endpoint": f"{a}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{a}/oauth2/v2.0/devicecode",
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "end_session_endpoint": f"{a}/oauth2/v2.0/logout",
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "acr", "nonce", "tid",
                                 "ver"],
            "kerberos_endpoint": f"{a}/kerberos",
            "tenant_region_scope": "EU",
            "cloud_instance_name": "microsoftonline.com",
            "cloud_graph_host_name": "graph.windows.net",
            "msgraph_host": "graph.microsoft.com",
            "rbac_url": "https://pas.windows.net",
        }
        return json_response(200, doc)

    def keys(self, req: Request) -> Response:
        self._tenant(req)
        callers = self.directory.callers
        return json_response(200, callers.jwks() if callers is not None else {"keys": []})

    def instance_discovery(self, req: Request) -> Response:
        """MSAL instance discovery; the tenant comes from the ``authorization_endpoint`` parameter."""
        host = self.base.split("://", 1)[1]
        endpoint = (req.query.get("authorization_endpoint") or [""])[-1]
        tenant = self.state.ids.tenant_id
        if "://" in endpoint:
            segs = [s for s in endpoint.split("://", 1)[1].split("/")[1:] if s]
            tenant = segs[0] if segs else tenant
        return json_response(200, {
            "tenant_discovery_endpoint": f"{self.base}/{tenant}/v2.0/.well-known/openid-configuration",
            "api-version": "1.1",
            "metadata": [{"preferred_network": host, "preferred_cache": host, "aliases": [host]}],
        })

    def token(self, req: Request) -> Response:
        tenant = self._tenant(req)
        ctype = (req.header("Content-Type") or "").lower()
        if "application/x-www-form-urlencoded" not in ctype:
            return self.error(req, 400, "invalid_request", 900144, param="grant_type")
        form = {k: v[-1] for k, v in parse_qs(req.body.decode("utf-8", "replace"),
                                              keep_blank_values=True).items()}
        client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        basic = req.header("Authorization") or ""
        if basic.lower().startswith("basic "):
            try:
                user, _, pwd = base64.b64decode(basic[6:]).decode("utf-8").partition(":")
                client_id, secret = unquote(user), unquote(pwd)
            except ValueError:
                pass
        grant = form.get("grant_type", "")
        if not grant:
            return self.error(req, 400, "invalid_request", 900144, param="grant_type")
        if grant != "client_credentials":
            return self.error(req, 400, "unsupported_grant_type", 70003, grant=grant)
        if not client_id:
            return self.error(req, 400, "invalid_request", 900144, param="client_id")
        if not self.directory.has_app(client_id):
            return self.error(req, 400, "unauthorized_client", 700016, client_id=client_id, tenant=tenant)
        assertion = form.get("client_assertion", "")
        if assertion:
            if form.get("client_assertion_type") != JWT_BEARER:
                return self.error(req, 400, "invalid_request", 900144, param="client_assertion_type")
            refused = self._check_assertion(req, tenant, client_id, assertion)
            if refused is not None:
                return refused
            return self._issue(req, tenant, client_id, form)
        if not secret:
            return self.error(req, 401, "invalid_client", 7000218)
        status = self.directory.secret_status(client_id, secret)
        if status is None:
            return self.error(req, 401, "invalid_client", 7000215, client_id=client_id)
        if status == "expired":
            return self.error(req, 401, "invalid_client", 7000222, client_id=client_id)
        return self._issue(req, tenant, client_id, form)

    def _issue(self, req: Request, tenant: str, client_id: str, form: dict[str, str]) -> Response:
        scope = form.get("scope", "")
        if not scope:
            return self.error(req, 400, "invalid_request", 900144, param="scope")
        wanted = [s for s in scope.split() if s not in ("openid", "profile", "offline_access")]
        if len(wanted) != 1 or not wanted[0].endswith("/.default"):
            return self.error(req, 400, "invalid_scope", 1002012, scope=scope)
        resource = wanted[0][: -len("/.default")]
        callers = self.directory.callers
        if callers is not None and callers.is_api(resource):
            claims = callers.claims(client_id, tenant, self.base)
            token = callers.sign(claims)
            lifetime = int(claims["exp"] - claims["iat"])
            self.directory.record(token, client_id, str(claims["aud"]), lifetime)
            return json_response(200, {"token_type": "Bearer", "expires_in": lifetime,
                                       "ext_expires_in": lifetime, "access_token": token})
        audience = self.audience_for(resource)
        if audience is None:
            return self.error(req, 400, "invalid_resource", 500011, resource=resource, tenant=tenant)
        token, lifetime = self.directory.issue(client_id, audience)
        return json_response(200, {"token_type": "Bearer", "expires_in": lifetime,
                                   "ext_expires_in": lifetime, "access_token": token})

    def _check_assertion(self, req: Request, tenant: str, client_id: str, assertion: str) -> Response | None:
        """A certificate-signed JWT (x5t / x5t#S256 of a registered certificate, RS256, aud = this token
        endpoint, iss = sub = client id, nbf/exp) or a federated one (a token our managed identity endpoint
        issued for api://AzureADTokenExchange, matching one of the app's federated credentials)."""
        parts = assertion.split(".")
        if len(parts) != 3:
            return self._check_federated(req, client_id, assertion)
        try:
            header, claims = json.loads(_unb64url(parts[0])), json.loads(_unb64url(parts[1]))
        except ValueError:
            return self.error(req, 401, "invalid_client", 50027)
        certs = self.directory.registration(client_id).certificates
        found = None
        sha1, sha256 = (str(header.get(k) or "").rstrip("=") for k in ("x5t", "x5t#S256"))  # padding varies
        for thumb, (der, not_after) in certs.items():
            if sha1 == _b64url(bytes.fromhex(thumb)) or sha256 == _b64url(hashlib.sha256(der).digest()):
                found = (thumb, der, not_after)
        shown = header.get("x5t#S256") or header.get("x5t") or ""
        if found is None or header.get("alg") != "RS256":
            return self.error(req, 401, "invalid_client", 700027, thumbprint=shown, client_id=client_id)
        from cryptography import x509
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        try:
            x509.load_der_x509_certificate(found[1]).public_key().verify(  # type: ignore[call-arg]
                _unb64url(parts[2]), f"{parts[0]}.{parts[1]}".encode(), padding.PKCS1v15(), hashes.SHA256())
        except (InvalidSignature, ValueError):
            return self.error(req, 401, "invalid_client", 700027, thumbprint=shown, client_id=client_id)
        now = time.time()
        if claims.get("aud") != f"{self.base}/{tenant}/oauth2/v2.0/token" or \
                not (claims.get("iss") == claims.get("sub") == client_id):
            return self.error(req, 401, "invalid_client", 50027)
        exp, nbf = float(claims.get("exp") or 0), float(claims.get("nbf") or claims.get("iat") or 0)
        if now > exp + 300 or now < nbf - 300 or now > found[2]:  # 5 minutes of clock skew, as Entra allows
            stamp = lambda t: datetime.fromtimestamp(t, UTC).strftime("%m/%d/%Y %H:%M:%S")  # noqa: E731
            return self.error(req, 401, "invalid_client", 700024, now=stamp(now), nbf=stamp(nbf),
                              exp=stamp(min(exp, found[2])))
        return None

    def _check_federated(self, req: Request, client_id: str, assertion: str) -> Response | None:
        info = self.directory.check(assertion, EXCHANGE_AUDIENCE, honour_revocation=False)
        if info is None:
            return self.error(req, 401, "invalid_client", 50027)
        issuer, subject = self.directory.issuer(), self.directory.identities.get(info.client_id, "")
        records = self.directory.registration(client_id).federated
        # Entra ID narrows the app's federated credentials part by part and names the first part that
        # left none: issuer (700211), then subject (700213), then audience (700212).
        for number, index, value in ((700211, 0, issuer), (700213, 1, subject), (700212, 2, EXCHANGE_AUDIENCE)):
            records = [r for r in records if r[index] == value]
            if not records:
                return self.error(req, 401, "invalid_client", number, value=value)
        return None

    def managed_identity(self, req: Request) -> Response:
        """The App Service / Functions identity endpoint (IDENTITY_ENDPOINT + IDENTITY_HEADER, 2019-08-01)."""
        def fail(status: int, message: str) -> Response:
            return json_response(status, {"statusCode": status, "message": message,
                                          "correlationId": str(uuid.uuid4())})

        if req.header("X-IDENTITY-HEADER") != self.directory.identity_header:
            return fail(401, "The request is missing or has an invalid X-IDENTITY-HEADER.")
        q = {k: v[-1] for k, v in req.query.items()}
        if q.get("api-version") != "2019-08-01":
            return fail(400, "Unsupported api-version.")
        client_id = (q.get("client_id") or "").lower()
        ids = self.directory.identities
        if not client_id and len(ids) == 1:
            client_id = next(iter(ids))  # the system-assigned identity
        if client_id not in ids:
            return fail(400, "No User Assigned or Delegated Managed Identity found for specified ClientId/"
                             "ResourceId/PrincipalId.")
        resource = (q.get("resource") or "").removesuffix("/.default")
        audience = EXCHANGE_AUDIENCE if resource.rstrip("/") == EXCHANGE_AUDIENCE else self.audience_for(resource)
        if audience is None:
            return fail(400, f"AADSTS500011: The resource principal named {resource} was not found in the tenant.")
        token, lifetime = self.directory.issue(client_id, audience)
        return json_response(200, {"access_token": token, "expires_on": str(int(time.time()) + lifetime),
                                   "resource": resource, "token_type": "Bearer", "client_id": client_id})

    def audience_for(self, resource: str) -> str | None:
        """Canonical audience for a requested resource, or None when no such resource principal exists."""
        res = resource.rstrip("/").lower()
        dv = self.state.urls["dataverse"]
        if res in (dv.lower(), dv.lower().replace("127.0.0.1", "localhost")):
            return dv
        vault = vault_resource(self.state.urls["vault"])
        if res == vault:
            return vault
        if res == STORAGE_AUDIENCE:
            return STORAGE_AUDIENCE
        return None
