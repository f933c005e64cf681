"""Diagnostics: walk the whole chain step by step and name the exact cause and fix of a failure.

The report also shows this instance's open breakers (shared/breaker.py: code, since, next probe).
Steps: settings -> Key Vault (the secret or the certificate; no such step where DYNAMICS_AUTH uses no
vault) -> Entra ID token -> WhoAmI -> privileges. A failed step marks
the later ones skipped. Codes and fixes come from the one table in `shared.errors`. A report is kept
for CACHE_SECONDS and concurrent probes share one walk, so a monitor polling it cannot hammer Entra
ID, Key Vault and Dataverse. The walk runs in its own thread under DEADLINE_SECONDS, and no lock is
held while it walks: a caller waits for it until that deadline at most and then answers with the steps
done so far and the step that did not answer, even if a service holds the walk's connection longer.
It says what an operator needs to act and no more: no ids, no secret version, no URLs beyond the
environment's host.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import UTC, datetime
from typing import Any

from shared import instance
from shared import settings as settings_mod
from shared.dataverse import DataverseClient
from shared.deadline import Deadline
from shared.errors import IntakeError
from shared.proofs import certificate_pem
from shared.settings import Settings
from shared.tokens import TokenProvider
from shared.vault import SecretSource, VaultSecret

# What the intake path does: create and read cases, leads and contacts, and bind a customer to a case.
PRIVILEGES = ("prvCreateIncident", "prvReadIncident", "prvAppendIncident", "prvCreateLead", "prvReadLead",
              "prvCreateContact", "prvReadContact", "prvAppendToContact", "prvAppendToAccount", "prvReadAccount",
              # follow-ups (issue 22): notes, resolve, cancel, update
              "prvWriteIncident", "prvAppendToIncident", "prvAppendToLead", "prvCreateNote", "prvReadNote",
              "prvAppendNote", "prvCreateActivity")
EXPIRY_WARNING_DAYS = 30
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
STEPS = ("settings", "keyvault", "token", "whoami", "privileges")  # without "keyvault" where no vault is used
CACHE_SECONDS = 30.0
DEADLINE_SECONDS = 10.0  # the whole walk: a monitor's probe gets an answer within it, whatever hangs
STEP_SECONDS = 5.0  # one Dataverse call of the walk
# A step that did not answer within the deadline is named with the code of its service being unreachable.
UNANSWERED = {"settings": "internal_error", "keyvault": "keyvault_unreachable", "token": "entra_unavailable",
              "whoami": "dynamics_unavailable", "privileges": "dynamics_unavailable"}
log = logging.getLogger(__name__)
_lock = threading.Lock()  # guards the two below; never held across a walk
_cached: tuple[float, dict[str, Any]] | None = None
_walk: tuple[Future[dict[str, Any]], _Progress] | None = None


class _Progress:
    """What a walk has done so far, for a caller whose deadline comes first."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.walked = False  # every step has its result (the queues may still be being read)
        self.uses_vault = True
        self.fix_args: dict[str, str] = {}


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


def _unanswered(name: str, ms: float, fix_args: dict[str, str]) -> dict:
    detail = f"No answer within the diagnostics' {DEADLINE_SECONDS:.0f} s deadline."
    return _failed(name, ms, IntakeError(UNANSWERED[name], detail, fix_args=fix_args))


def run(environ: dict[str, str] | None = None, *, secrets: SecretSource | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC), deadline: Deadline | None = None,
        progress: _Progress | None = None) -> dict[str, Any]:
    """Run every step; return {"status": ok|degraded|failed, "steps": [...]}."""
    deadline = deadline or Deadline(DEADLINE_SECONDS)
    progress = progress or _Progress()
    steps = progress.steps

    def call_budget() -> Deadline:
        return Deadline(min(STEP_SECONDS, max(deadline.left(), 0.0)))
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
        provider = instance.token_provider(s, _Pinned(state["secret"]) if "secret" in state else None)
        try:
            state["token"] = _FixedToken(provider, provider.token(deadline))
        except IntakeError as err:
            if err.code == "entra_invalid_secret" and _GUID.match(state["secret"].value):
                err.detail += " The vault holds a GUID: that is the secret's ID, not its Value."
            raise
        return _step("token", True, (clock() - t) * 1000, detail="Entra ID issued a token for the environment")

    def whoami_step() -> dict:
        s: Settings = state["settings"]
        t = clock()
        client = instance.dataverse_client(s, state["token"], pool_size=1, read_timeout=15)
        state["client"] = client
        who = client.get("WhoAmI", budget=call_budget())
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
            if not client.get(path, budget=call_budget()).get("RolePrivileges"):
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
            if deadline.expired():
                steps.append(_unanswered(name, 0.0, progress.fix_args))
                failed = True
                continue
            t = clock()
            try:
                steps.append(fn())
            except IntakeError as err:
                steps.append(_failed(name, (clock() - t) * 1000, err))
                failed = True
            if "settings" in state:
                progress.fix_args = state["settings"].fix_args()
                progress.uses_vault = state["settings"].uses_vault
        progress.walked = True
    finally:
        if "client" in state:
            state["client"].close()
    from shared import breaker, queue_health

    queues = queue_health.check(os.environ if environ is None else environ)
    held = breaker.state()  # this instance's: queue messages wait for the fix without being tried
    warned = any(s["status"] == "warning" for s in steps) or queues["status"] in ("warning", "failed") or bool(held)
    report = {"status": "", "steps": steps, "queues": queues, "breaker": held}
    from shared import callers

    if callers.MODE != "function_key":  # the caller check's own section: the Dataverse chain does not need it
        report["callers"] = callers_check(environ)
        failed = failed or report["callers"]["status"] == "failed"
    report["status"] = "failed" if failed else ("degraded" if warned else "ok")
    return report


def callers_check(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """INTAKE_CALLER_AUTH=entra: the settings are valid (the audience configured) and the tenant's signing keys
    can be fetched now, as the app fetches them (a fresh fetch, not this instance's cache)."""
    from shared import callers

    t = time.perf_counter()
    try:
        if callers.MODE != "entra":
            problem = f"INTAKE_CALLER_AUTH must be one of {', '.join(settings_mod.CALLER_MODES)}"
            raise IntakeError("config_invalid", problem, details=[{"field": "INTAKE_CALLER_AUTH", "problem": problem}])
        s = settings_mod.load_callers(environ)
        from shared.caller_tokens import KeySet

        keys = KeySet(s)
        try:
            count = keys.fetch_now()
        except Exception as exc:  # noqa: BLE001 - any failure to fetch is the same finding for the operator
            raise IntakeError("caller_keys_unavailable", f"The tenant's signing keys could not be fetched "
                                                         f"({type(exc).__name__}).") from None
        finally:
            keys.session.close()
    except IntakeError as err:
        out = {"mode": callers.MODE, "status": "failed", "ms": round((time.perf_counter() - t) * 1000, 1),
               "code": err.code, "detail": err.detail, "fix": err.fix}
        if err.details:
            out["details"] = err.details
        return out
    return {"mode": "entra", "status": "ok", "ms": round((time.perf_counter() - t) * 1000, 1), "code": None,
            "detail": f"callers' tokens are checked for INTAKE_API_CLIENT_ID (or api://<it>) of INTAKE_API_TENANT_ID; "
                      f"the tenant publishes {count} signing keys", "fix": ""}


def _start_walk() -> tuple[Future[dict[str, Any]], _Progress]:
    """A walk in its own thread; called with `_lock` held. Its report is cached unless forgotten meanwhile."""
    future: Future[dict[str, Any]] = Future()
    progress = _Progress()
    walk = (future, progress)

    def attempt() -> None:
        global _cached, _walk
        try:
            report = run(progress=progress)
        except BaseException as exc:  # a bug: handed to every caller waiting, never swallowed
            with _lock:
                if _walk is walk:
                    _walk = None
            future.set_exception(exc)
            return
        with _lock:
            if _walk is walk:
                _cached, _walk = (time.monotonic(), report), None
        future.set_result(report)

    try:
        threading.Thread(target=attempt, name="diagnostics", daemon=True).start()
    except RuntimeError as exc:  # no thread to be had: this caller's report says so
        log.warning("diagnostics: could not start a thread: %s", exc)
        future.set_exception(IntakeError("instance_overloaded"))
        return walk
    return walk


def _partial(progress: _Progress) -> dict[str, Any]:
    """The report of a walk still running at the caller's deadline: the step it waits on did not answer."""
    steps = list(progress.steps)
    shown = {s["name"] for s in steps}
    remaining = [n for n in STEPS if n not in shown and (n != "keyvault" or progress.uses_vault)]
    if remaining and not progress.walked:
        steps.append(_unanswered(remaining[0], DEADLINE_SECONDS * 1000, progress.fix_args))
        for name in remaining[1:]:
            skipped = _step(name, False, 0.0, "skipped", "An earlier step failed.")
            skipped["status"] = "skipped"
            steps.append(skipped)
    failed = any(s["status"] in ("failed", "skipped") for s in steps)
    queues = {"status": "skipped", "detail": "Not read: the walk did not finish within its deadline."}
    return {"status": "failed" if failed else "degraded", "steps": steps, "queues": queues}


def cached(ttl: float = CACHE_SECONDS, wait: float = DEADLINE_SECONDS + 1.0) -> dict[str, Any]:
    """The last report if younger than `ttl` seconds, else the one of a walk (concurrent callers share one),
    waited for `wait` seconds at most: past that, what the walk had done and the step it waits on."""
    global _walk
    with _lock:
        if _cached is not None and time.monotonic() - _cached[0] < ttl:
            at, report = _cached
            return {**report, "ageSeconds": round(time.monotonic() - at, 1)}
        walk = _walk or _start_walk()
        if not walk[0].done():  # done already only when its thread could not start: not shared
            _walk = walk
        future, progress = walk
    try:
        report = future.result(timeout=wait)
    except FutureTimeout:
        report = _partial(progress)
    except IntakeError as err:  # the walk could not start
        report = {"status": "failed", "steps": [_failed("settings", 0.0, err)],
                  "queues": {"status": "skipped", "detail": "Not read."}}
    return {**report, "ageSeconds": 0.0}


def forget() -> None:
    """Drop the cached report and let the next caller start a new walk (tests; a restart does the same)."""
    global _cached, _walk
    with _lock:
        _cached, _walk = None, None


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
