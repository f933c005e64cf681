"""``StandIn``: the three HTTPS listeners over one shared state, plus the Python control API."""

from __future__ import annotations

import shutil
import tempfile
import threading
import uuid
from typing import Any

from .base import TlsServer
from .callers import API_ROLES, CallerDirectory
from .dataverse import DataverseService, Org
from .entra import Directory, EntraService, vault_resource
from .keyvault import Vault, VaultService
from .state import MANGLES, SERVICES, TIMEOUT_AFTER_APPLY, FailRule, Rates, State, service_name
from .tls import make_tls

DYNAMICS_SECRET_NAME = "dynamics-client-secret"


class StandIn:
    """Local stand-in for Entra ID (A), Key Vault (B) and Dataverse (C) on 127.0.0.1.

    Use as a context manager or call ``start()``/``stop()``.
    """

    def __init__(
        self,
        latency_entra: float = 0.0,
        latency_dataverse: float = 0.0,
        token_lifetime: int = 3599,
        seed: int = 0,
        *,
        latency_vault: float = 0.0,
        state_dir: str | None = None,
        entra_port: int = 0,
        vault_port: int = 0,
        dataverse_port: int = 0,
        max_concurrent: int | None = None,
        hold_seconds: float = 5.0,
        host: str = "127.0.0.1",
    ) -> None:
        self.state = State(seed, {"entra": latency_entra, "vault": latency_vault,
                                  "dataverse": latency_dataverse}, hold_seconds, max_concurrent)
        ids = self.state.ids
        self.directory = Directory(self.state, token_lifetime)
        self.directory.add_app(ids.dynamics_client_id, ids.dynamics_secret)
        self.directory.add_app(ids.kv_client_id, ids.kv_secret)
        self.directory.callers = CallerDirectory(self.state, seed, token_lifetime)
        # A caller with every app role, for the local run (INTAKE_CALLER_AUTH=entra).
        self.local_caller = self.add_caller(API_ROLES)
        self.vault = Vault(self.state)
        self.vault.readers.add(ids.kv_client_id)
        self.vault.set(DYNAMICS_SECRET_NAME, ids.dynamics_secret)
        self.org = Org(self.state)
        self._dynamics_secret = ids.dynamics_secret
        self._host = host
        self._ports = {"entra": entra_port, "vault": vault_port, "dataverse": dataverse_port}
        self._state_dir = state_dir
        self._tmpdir: str | None = None
        self._servers: dict[str, TlsServer] = {}
        self._threads: list[threading.Thread] = []
        self.ca_path = ""

    # ---- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> StandIn:
        """Generate certificates, bind the three listeners and serve them in daemon threads."""
        if self._servers:
            return self
        from .control import handle_control

        self.state.stopping.clear()
        directory = self._state_dir or tempfile.mkdtemp(prefix="standin-")
        self._tmpdir = None if self._state_dir else directory
        tls = make_tls(directory)
        self.tls = tls
        self.ca_path = tls.ca_path
        services = {
            "entra": EntraService(self.state, self.directory),
            "vault": VaultService(self.state, self.vault, self.directory),
            "dataverse": DataverseService(self.state, self.org, self.directory),
        }
        services["dataverse"].control = lambda req: handle_control(self, req)
        try:
            for name in SERVICES:
                server = TlsServer((self._host, self._ports[name]), services[name], tls.context)
                self._servers[name] = server
                self.state.urls[name] = f"https://{self._host}:{server.server_address[1]}"
        except OSError:
            self.stop()
            raise
        for name, server in self._servers.items():
            t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                 name=f"standin-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        """Stop serving, drop open connections, close sockets and remove temporary certificates."""
        self.state.stopping.set()
        for server in self._servers.values():
            if any(t.is_alive() for t in self._threads):
                server.shutdown()
        for server in self._servers.values():
            server.close_active()
            server.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self._servers.clear()
        self._threads.clear()
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def close_listener(self, service: str) -> None:
        """Stop one listener and close its port: that service refuses connections (unreachable), the others
        serve on. ``stop()`` still cleans up."""
        server = self._servers.pop(service_name(service))
        server.shutdown()
        server.close_active()
        server.server_close()

    def __enter__(self) -> StandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- addresses and identities -------------------------------------------------------------------
    def _url(self, name: str) -> str:
        try:
            return self.state.urls[name]
        except KeyError:
            raise RuntimeError("StandIn is not started: call start() first") from None

    @property
    def entra_url(self) -> str:
        return self._url("entra")

    @property
    def vault_url(self) -> str:
        return self._url("vault")

    @property
    def dataverse_url(self) -> str:
        return self._url("dataverse")

    @property
    def api_url(self) -> str:
        """Dataverse Web API base, ``{dataverse_url}/api/data/v9.2``."""
        return f"{self.dataverse_url}/api/data/v9.2"

    tenant_id = property(lambda self: self.state.ids.tenant_id)
    dynamics_client_id = property(lambda self: self.state.ids.dynamics_client_id)
    kv_client_id = property(lambda self: self.state.ids.kv_client_id)
    kv_secret = property(lambda self: self.state.ids.kv_secret)
    systemuserid = property(lambda self: self.state.ids.systemuserid)
    business_unit_id = property(lambda self: self.state.ids.business_unit_id)
    organization_id = property(lambda self: self.state.ids.organization_id)
    seed_contact_id = property(lambda self: self.state.ids.seed_contact_id)
    seed_account_id = property(lambda self: self.state.ids.seed_account_id)
    dynamics_secret_name = DYNAMICS_SECRET_NAME

    @property
    def vault_resource(self) -> str:
        return vault_resource(self.vault_url)

    @property
    def dynamics_secret(self) -> str:
        """The Dynamics app's current secret value (changes with ``rotate_dynamics_secret``)."""
        return self._dynamics_secret

    def settings_env(self) -> dict[str, str]:
        """Environment variables the app needs to run against this stand-in."""
        return {
            "DYNAMICS_URL": self.dataverse_url,
            "DYNAMICS_TENANT_ID": self.tenant_id,
            "DYNAMICS_CLIENT_ID": self.dynamics_client_id,
            "KEY_VAULT_URL": self.vault_url,
            "DYNAMICS_CLIENT_SECRET_NAME": DYNAMICS_SECRET_NAME,
            "AZURE_AUTHORITY_HOST": self.entra_url,
            "AZURE_TENANT_ID": self.tenant_id,
            "AZURE_CLIENT_ID": self.kv_client_id,
            "AZURE_CLIENT_SECRET": self.kv_secret,
            "REQUESTS_CA_BUNDLE": self.ca_path,
        }

    def info(self) -> dict[str, Any]:
        """URLs, ids and settings (what the CLI writes to ``standin.json``)."""
        return {
            "entra_url": self.entra_url, "vault_url": self.vault_url, "dataverse_url": self.dataverse_url,
            "ca_path": self.ca_path, "tenant_id": self.tenant_id,
            "dynamics_client_id": self.dynamics_client_id,
            "dynamics_secret": self.dynamics_secret, "kv_client_id": self.kv_client_id,
            "kv_secret": self.kv_secret, "systemuserid": self.systemuserid,
            "seed_contact_id": self.seed_contact_id, "seed_account_id": self.seed_account_id,
            "settings_env": self.settings_env(), "caller_env": self.caller_env(),
            "api_client_id": self.api_client_id, "local_caller": self.local_caller,
        }

    # ---- observations -------------------------------------------------------------------------------
    @property
    def counts(self) -> dict[str, dict[Any, int]]:
        """``{service: {(METHOD, kind): n, ..., "total": n}}`` (a snapshot)."""
        return self.state.metrics.counts()

    @property
    def connections(self) -> dict[str, int]:
        """TCP connections accepted per service (a snapshot)."""
        return self.state.metrics.connections()

    @property
    def request_log(self) -> list[tuple[str, str, str, int]]:
        """Recent ``(service, method, path, status)``; status 0 = held without answer."""
        return list(self.state.metrics.log)

    @property
    def issued_tokens(self) -> list[str]:
        return self.directory.issued()

    @property
    def queries(self) -> list[list[tuple[str, Any]]]:
        """Every parsed ``$filter`` as ``[(column, value), ...]`` (the live list)."""
        return self.org.queries

    @property
    def errors(self) -> list[str]:
        """Tracebacks of stand-in bugs (answered 500); should stay empty."""
        return self.state.errors

    def records(self, entity_set: str) -> list[dict[str, Any]]:
        return self.org.rows(entity_set)

    def reset_counters(self) -> None:
        """Zero counts and connections; clear the request log and recorded queries."""
        self.state.metrics.reset()
        del self.org.queries[:]

    # ---- faults -------------------------------------------------------------------------------------
    def fail_next(self, service: str, n: int, status: int | str, code: str | int | None = None,
                  message: str | None = None, retry_after: float | None = None, method: str | None = None,
                  path_contains: str | None = None, in_batch: bool | None = None) -> None:
        """The next ``n`` matching requests answer ``status``.

        ``status="timeout_after_apply"``: handle the request, then hold the connection and close it
        without an answer. ``status`` one of ``MANGLES`` (state.py): handle it, then damage the answer.
        """
        if status != TIMEOUT_AFTER_APPLY and status not in MANGLES:
            status = int(status)
        self.state.faults.add_rule(FailRule(service_name(service), int(n), status, code, message, retry_after,
                                            method, path_contains, in_batch))

    def fault_rates(self, service: str, *, rate_5xx: float = 0.0, rate_timeout_after_apply: float = 0.0,
                    rate_429: float = 0.0, retry_after: float = 1, status_5xx: int = 503) -> None:
        """Random faults at these rates (one seeded draw per request)."""
        self.state.faults.set_rates(service_name(service), Rates(rate_5xx, rate_timeout_after_apply, rate_429,
                                                                 retry_after, status_5xx))

    def clear_faults(self) -> None:
        self.state.faults.clear()

    def set_hold_seconds(self, seconds: float) -> None:
        self.state.hold_seconds = float(seconds)

    def set_latency(self, service: str, seconds: float) -> None:
        self.state.latency[service_name(service)] = float(seconds)

    def set_max_concurrent(self, limit: int | None) -> None:
        self.state.max_concurrent = limit

    def throttle_for(self, seconds: float) -> None:
        """Every Dataverse request answers 429 (0x80072322) for `seconds`, Retry-After = the time left."""
        import time

        self.state.throttle_until = time.monotonic() + float(seconds)

    def set_protection(self, window: float, max_requests: int, max_concurrent: int = 52, penalty: float = 0.0,
                       dop_hint: int | None = None, max_execution: float | None = None, cost: float = 0.0) -> Any:
        """Dataverse's service protection limits on a scaled clock (devstack/standin/protection.py)."""
        from .protection import Protection

        self.state.protection = Protection(window, max_requests, max_concurrent, penalty,
                                           max_execution=max_execution, cost=cost)
        if dop_hint is not None:
            self.state.dop_hint = dop_hint
        return self.state.protection

    # ---- Entra controls -----------------------------------------------------------------------------
    def revoke_tokens(self) -> None:
        """Tokens issued so far answer 401 at Dataverse; new ones work."""
        self.directory.revoke_all()

    def set_token_lifetime(self, seconds: int) -> None:
        self.directory.token_lifetime = int(seconds)

    def add_client_secret(self, client_id: str, value: str | None = None) -> str:
        return self.directory.add_secret(client_id, value)

    def expire_secret(self, client_id: str, value: str) -> None:
        self.directory.expire_secret(client_id, value)

    def remove_client_secret(self, client_id: str, value: str) -> None:
        self.directory.remove_secret(client_id, value)

    def rotate_dynamics_secret(self, retire: str = "remove") -> str:
        """New Entra secret, stored as a new vault version; the old one is removed/expired/kept."""
        cid, old = self.dynamics_client_id, self._dynamics_secret
        new = self.directory.add_secret(cid)
        self.vault.set(DYNAMICS_SECRET_NAME, new)
        self._dynamics_secret = new
        if retire == "remove":
            self.directory.remove_secret(cid, old)
        elif retire == "expire":
            self.directory.expire_secret(cid, old)
        elif retire != "keep":
            raise ValueError("retire must be 'remove', 'expire' or 'keep'")
        return new

    # ---- credentials other than a secret --------------------------------------------------------------
    def register_certificate(self, cert_pem: str, client_id: str | None = None) -> str:
        """Upload a certificate's public part to the Dynamics app registration; returns its thumbprint."""
        return self.directory.register_certificate(client_id or self.dynamics_client_id, cert_pem)

    def remove_certificate(self, thumbprint: str, client_id: str | None = None) -> None:
        self.directory.registration(client_id or self.dynamics_client_id).certificates.pop(thumbprint, None)

    def store_certificate(self, name: str, value: str, content_type: str = "application/x-pkcs12") -> str:
        """A Key Vault certificate as the app reads it: its secret (PFX base64, or PEM with the key)."""
        return self.vault.set(name, value, content_type=content_type)

    def add_managed_identity(self, client_id: str | None = None) -> dict[str, str]:
        """A managed identity of the Function App; its endpoint settings come from ``identity_env``."""
        cid, principal = self.directory.add_managed_identity(client_id)
        return {"client_id": cid, "principal_id": principal}

    def add_federated_credential(self, subject: str, issuer: str | None = None,
                                 audience: str = "api://AzureADTokenExchange") -> None:
        """Make the Dynamics app registration trust tokens of `subject` (a managed identity's principal id)."""
        self.directory.registration(self.dynamics_client_id).federated.append(
            (issuer or self.directory.issuer(), subject, audience))

    def set_app_user(self, client_id: str) -> None:
        """Which client is the environment's application user (a managed identity's, in that mode)."""
        self._user(client_id=client_id)

    def identity_env(self) -> dict[str, str]:
        """What Functions sets for its managed identity endpoint."""
        return {"IDENTITY_ENDPOINT": f"{self.entra_url}/msi/token", "IDENTITY_HEADER": self.directory.identity_header}

    # ---- callers of the intake API (INTAKE_CALLER_AUTH=entra) -------------------------------------------
    @property
    def api_client_id(self) -> str:
        return self.directory.callers.api_client_id

    def caller_env(self) -> dict[str, str]:
        """The settings of the app's entra caller mode against this stand-in."""
        return {"INTAKE_CALLER_AUTH": "entra", "INTAKE_API_CLIENT_ID": self.api_client_id,
                "INTAKE_API_TENANT_ID": self.tenant_id}

    def add_caller(self, roles: list[str] | tuple[str, ...] = API_ROLES,
                   client_id: str | None = None) -> dict[str, str]:
        """A caller app registration (client credentials) with these app roles of the intake API assigned."""
        cid = self.directory.callers.add_caller(list(roles), client_id)
        secret = self.directory.callers.new_secret() if not self.directory.has_app(cid) else ""
        if secret:
            self.directory.add_app(cid, secret)
        return {"client_id": cid, "secret": secret}

    def set_caller_roles(self, client_id: str, roles: list[str]) -> None:
        self.directory.callers.roles[client_id] = list(roles)

    def set_api_token_version(self, version: int) -> None:
        """The API registration's requestedAccessTokenVersion (1 or 2): the token shape every caller gets."""
        if int(version) not in (1, 2):
            raise ValueError("version must be 1 or 2")
        self.directory.callers.token_version = int(version)

    def rotate_signing_key(self, sign_with_new: bool = True, publish: bool = True) -> str:
        """Add a signing key (published), sign new tokens with it; returns its kid."""
        return self.directory.callers.rotate(sign_with_new, publish)

    def retire_signing_key(self, kid: str) -> None:
        self.directory.callers.retire(kid)

    def mint_caller_token(self, client_id: str | None = None, *, drop: tuple[str, ...] = (),
                          version: int | None = None, sign: dict[str, Any] | None = None, **claims: Any) -> str:
        """A caller token as the token endpoint would issue it, with claims changed or dropped (tests of each
        check); recorded as issued, so the leak check covers it."""
        callers = self.directory.callers
        cid = client_id or self.local_caller["client_id"]
        body = {**callers.claims(cid, self.tenant_id, self.entra_url, version), **claims}
        for name in drop:
            body.pop(name, None)
        token = callers.sign(body, **(sign or {}))
        self.directory.record(token, cid, str(body.get("aud")), 3599)
        return token

    # ---- Key Vault controls -------------------------------------------------------------------------
    def set_secret(self, name: str, value: str, exp: float | None = None) -> str:
        """New version of a vault secret; returns the version id."""
        return self.vault.set(name, value, exp)

    def disable_secret(self, name: str) -> None:
        self.vault.disable(name, True)

    def enable_secret(self, name: str) -> None:
        self.vault.disable(name, False)

    def delete_secret(self, name: str) -> None:
        self.vault.delete(name)

    def set_secret_expiry(self, name: str, epoch: float | None) -> None:
        self.vault.set_expiry(name, epoch)

    def deny_vault_access(self, deny: bool = True) -> None:
        self.vault.denied = bool(deny)

    def set_vault_challenge_resource(self, resource: str | None) -> None:
        """Make the vault's 401 challenge name another resource (a proxy, a wrong URL); None restores it."""
        self.vault.challenge_resource = resource

    # ---- Dataverse controls -------------------------------------------------------------------------
    def _user(self, **changes: Any) -> None:
        with self.state.lock:
            for k, v in changes.items():
                setattr(self.org.user, k, v)

    def remove_app_user(self) -> None:
        self._user(present=False)

    def restore_app_user(self) -> None:
        self._user(present=True)

    def disable_app_user(self) -> None:
        self._user(enabled=False)

    def enable_app_user(self) -> None:
        self._user(enabled=True)

    def revoke_privilege(self, name: str) -> None:
        with self.state.lock:
            self.org.user.privileges.discard(name)

    def grant_privilege(self, name: str) -> None:
        with self.state.lock:
            self.org.user.privileges.add(name)

    def privileges(self) -> list[str]:
        with self.state.lock:
            return sorted(self.org.user.privileges)

    def add_column(self, entity_set: str, logical_name: str, max_length: int = 100) -> None:
        self.org.add_column(entity_set, logical_name, max_length)

    def set_max_upload(self, size: int) -> None:
        """organization.maxuploadfilesize: bytes of base64 text a note's documentbody may hold."""
        self.org.max_upload = size

    def update_record(self, entity_set: str, key: str, values: dict[str, Any]) -> bool:
        """Change a record directly (an agent in Dynamics), no rule checked; False when it is not there."""
        return self.org.update(entity_set, key, dict(values))

    def delete_record(self, entity_set: str, key: str) -> bool:
        return self.org.delete(entity_set, key)

    def add_record(self, entity_set: str, values: dict[str, Any], key: str | None = None) -> str:
        """Insert a record directly (no validation); returns its id."""
        key = (key or str(uuid.uuid4())).lower()
        if not self.org.insert(entity_set, key, dict(values)):
            raise ValueError(f"{entity_set}({key}) exists")
        return key
