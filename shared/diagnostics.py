"""Diagnostics: walk the whole chain step by step and name the exact cause and fix of a failure.

The report also shows this instance's open breakers (shared/breaker.py: code, since, next probe).
Steps: settings -> Key Vault (the secret or the certificate; no such step where DYNAMICS_AUTH uses no
vault) -> Entra ID token -> WhoAmI -> privileges. A failed step marks
the later ones skipped. Codes and fixes come from the one table in `shared.errors`. A report is kept
for CACHE_SECONDS and concurrent probes share one run, so a monitor polling it cannot hammer Entra
ID, Key Vault and Dataverse. It says what an operator needs to act and no more: no ids, no secret
version, no URLs beyond the environment's host.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from shared import settings as settings_mod
from shared.auth import TokenProvider
from shared.credentials import certificate_pem, proof_for
from shared.dataverse import DataverseClient
from shared.errors import IntakeError
from shared.secrets import SecretSource, VaultSecret
from shared.settings import Settings

# What the intake path does: create and read cases, leads and contacts, and bind a customer to a case.
PRIVILEGES = ("prvCreateIncident", "prvReadIncident", "prvAppendIncident", "prvCreateLead", "prvReadLead",
              "prvCreateContact", "prvReadContact", "prvAppendToContact", "prvAppendToAccount", "prvReadAccount")
EXPIRY_WARNING_DAYS = 30
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
STEPS = ("settings", "keyvault", "token", "whoami", "privileges")  # without "keyvault" where no vault is used
CACHE_SECONDS = 30.0
_cache_lock = threading.Lock()
_cached: tuple[float, dict[str, Any]] | None = None


class _FixedToken:
    """Hands the diagnostics' own fresh token to a DataverseClient; a 401 is then reported, not retried away."""

    def __init__(self, provider: TokenProvider, token: str) -> None:
        self._provider = provider
        self.value = token

    def token(self, deadline: Any = None) -> str:
        return self.value

    def refresh(self, rejected: str, deadline: Any = None) -> str:
        self.value = self._provider.refresh(rejected, deadline)
        return self.value


def _step(name: str, ok: bool, ms: float, code: str | None = None, detail: str = "", fix: str = "",
          warning: bool = False) -> dict:
    return {"name": name, "ok": ok, "status": "warning" if warning else ("ok" if ok else "failed"),
            "ms": round(ms, 1), "code": code, "detail": detail, "fix": fix}


def _failed(name: str, ms: float, err: IntakeError) -> dict:
    step = _step(name, False, ms, err.code, err.detail, err.fix)
    if err.request_id:
        step["requestId"] = err.request_id
    return step


def run(environ: dict[str, str] | None = None, *, secrets: SecretSource | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> dict[str, Any]:
    """Run every step; return {"status": ok|degraded|failed, "steps": [...]}."""
    steps: list[dict] = []
    clock = time.perf_counter
    state: dict[str, Any] = {}

    def settings_step() -> dict:
        t = clock()
        s = settings_mod.load(environ)
        state["settings"] = s
        return _step("settings", True, (clock() - t) * 1000,
                     detail=f"every setting is valid; environment {s.fix_args()['environment']}")

    def keyvault_step() -> dict:
        s: Settings = state["settings"]
        t = clock()
        kind = "certificate" if s.auth == "certificate" else "secret"
        secret: VaultSecret = (secrets or SecretSource(s, kind)).read()
        ms = (clock() - t) * 1000
        state["secret"] = secret
        name = s.certificate_name if kind == "certificate" else s.secret_name
        if not secret.value:
            raise IntakeError("keyvault_secret_missing", f"The vault secret {name!r} is empty.", fix_args=s.fix_args())
        expires_on = secret.expires_on
        if kind == "certificate":
            _, expires_on = certificate_pem(secret, s, now())
            detail = f"certificate {name!r} readable, with its private key"
            warn_code, fix = "keyvault_certificate_expiring", (
                f"Add a new version of the vault certificate {name} and upload its public part to the app "
                "registration before it expires.")
        else:
            detail = f"secret {name!r} readable and enabled"
            warn_code, fix = "keyvault_secret_expiring", (
                f"Create a new client secret in Entra ID and store it as a new version of {name} before it expires.")
        if expires_on is not None:
            days = (expires_on - now()).total_seconds() / 86400
            detail += f", expires {expires_on.date().isoformat()}"
            if days < EXPIRY_WARNING_DAYS:
                return _step("keyvault", True, ms, warn_code, f"{detail}: {max(days, 0):.0f} days left", fix,
                             warning=True)
        return _step("keyvault", True, ms, detail=detail)

    def token_step() -> dict:
        s: Settings = state["settings"]
        t = clock()
        provider = TokenProvider(s, proof_for(s, _Pinned(state["secret"]) if "secret" in state else None))
        try:
            state["token"] = _FixedToken(provider, provider.token())
        except IntakeError as err:
            if err.code == "entra_invalid_secret" and _GUID.match(state["secret"].value):
                err.detail += " The vault holds a GUID: that is the secret's ID, not its Value."
            raise
        return _step("token", True, (clock() - t) * 1000, detail="Entra ID issued a token for the environment")

    def whoami_step() -> dict:
        s: Settings = state["settings"]
        t = clock()
        client = DataverseClient(s, state["token"], pool_size=1, read_timeout=15)
        state["client"] = client
        who = client.get("WhoAmI", budget=5)
        state["user_id"] = who.get("UserId")
        return _step("whoami", True, (clock() - t) * 1000,
                     detail="the application user exists and is enabled in the environment")

    def privileges_step() -> dict:
        s: Settings = state["settings"]
        t = clock()
        client: DataverseClient = state["client"]
        missing = []
        for name in PRIVILEGES:
            path = (f"systemusers({state['user_id']})/Microsoft.Dynamics.CRM."
                    f"RetrieveUserPrivilegeByPrivilegeName(PrivilegeName='{name}')")
            if not client.get(path, budget=5).get("RolePrivileges"):
                missing.append(name)
        ms = (clock() - t) * 1000
        if missing:
            raise IntakeError("dynamics_privilege_missing",
                              f"The application user's roles lack: {', '.join(missing)}.", fix_args=s.fix_args())
        return _step("privileges", True, ms, detail=f"holds all {len(PRIVILEGES)} privileges the intake needs")

    failed = False
    try:
        runners = dict(zip(STEPS, (settings_step, keyvault_step, token_step, whoami_step, privileges_step),
                           strict=True))
        for name, fn in runners.items():
            if name == "keyvault" and "settings" in state and not state["settings"].uses_vault:
                continue  # this mode reads no vault: no step to show
            if failed:
                skipped = _step(name, False, 0.0, "skipped", "An earlier step failed.")
                skipped["status"] = "skipped"
                steps.append(skipped)
                continue
            t = clock()
            try:
                steps.append(fn())
            except IntakeError as err:
                steps.append(_failed(name, (clock() - t) * 1000, err))
                failed = True
    finally:
        if "client" in state:
            state["client"].close()
    from shared import breaker, queue_health

    queues = queue_health.check(os.environ if environ is None else environ)
    held = breaker.state()  # this instance's: queue messages wait for the fix without being tried
    warned = any(s["status"] == "warning" for s in steps) or queues["status"] in ("warning", "failed") or bool(held)
    status = "failed" if failed else ("degraded" if warned else "ok")
    return {"status": status, "steps": steps, "queues": queues, "breaker": held}


def cached(ttl: float = CACHE_SECONDS) -> dict[str, Any]:
    """The last report if younger than `ttl` seconds, else a new one (concurrent callers share one run)."""
    global _cached
    with _cache_lock:
        now = time.monotonic()
        if _cached is None or now - _cached[0] >= ttl:
            _cached = (now, run())
        at, report = _cached
    return {**report, "ageSeconds": round(time.monotonic() - at, 1)}


def forget() -> None:
    """Drop the cached report (tests; a restart does the same)."""
    global _cached
    with _cache_lock:
        _cached = None


class _Pinned:
    """A vault reader holding what the keyvault step just read (no second vault read)."""

    def __init__(self, secret: VaultSecret) -> None:
        self._secret = secret

    def secret(self) -> VaultSecret:
        return self._secret

    def get(self) -> str:
        return self._secret.value

    def refresh(self, rejected: str) -> str:
        return self._secret.value
