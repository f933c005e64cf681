"""The Dataverse access token: one per instance, refreshed before it expires, replaced on a 401.

Modelled on azure-core's BearerTokenCredentialPolicy: a cached token with a refresh window, one
acquisition at a time, and a forced refresh when the resource rejects the token held. Acquisition is
a single flight (`shared.singleflight`): threads that waited for a failed attempt get its failure at once,
each waits only until its own call's deadline, and the next attempt comes after a short back-off.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from shared.deadline import Deadline
from shared.errors import IntakeError
from shared.settings import Settings
from shared.singleflight import Flights

log = logging.getLogger(__name__)

REFRESH_MARGIN = 300.0  # seconds before expiry when a new token is fetched
FAILURE_BACKOFF = 1.0  # seconds after a failed acquisition during which callers get that failure at once
DEFAULT_WAIT = 20.0  # a caller that names no deadline waits at most this long for a token

# AADSTS numbers -> our codes. Decided on the number, never on the description text.
_AADSTS = {
    7000215: "entra_invalid_secret",
    7000222: "entra_secret_expired",
    700016: "entra_unknown_client",
    90002: "entra_unknown_tenant",
    500011: "dynamics_url_wrong_scope",
    90024: "entra_unavailable",
    90055: "entra_unavailable",
    700027: "entra_certificate_not_registered",
    700024: "entra_certificate_expired",
    70021: "entra_federation_mismatch",
    700211: "entra_federation_mismatch",
    700212: "entra_federation_mismatch",
    700213: "entra_federation_mismatch",
}
# Which part of the federated assertion matched no federated credential, where Entra ID says so.
_FEDERATION_PART = {700211: "issuer", 700212: "audience", 700213: "subject"}


class Proof(Protocol):
    """How the app proves itself to Entra ID in one DYNAMICS_AUTH mode (shared.proofs)."""

    rotation_codes: frozenset[str]  # Entra ID answers after which the proof is read again once

    def credential(self) -> Any:
        """A fresh azure-identity credential for one acquisition (no lower cache survives a rejection)."""
        ...

    def reload(self) -> bool:
        """Read the proof again after Entra ID rejected it; True when something new was read."""
        ...


class TokenSource(Protocol):
    """What the Dataverse client needs: the current token, and a replacement for a rejected one."""

    def token(self, deadline: Deadline | None = None) -> str: ...

    def refresh(self, rejected: str, deadline: Deadline | None = None) -> str: ...


@dataclass(frozen=True)
class Token:
    value: str
    expires_on: float
    refresh_on: float

    def __repr__(self) -> str:
        return f"Token(expires_on={self.expires_on})"


_AADSTS_RE = re.compile(r"\bAADSTS(\d+)\b")
_ID_RE = re.compile(r"\b(Trace|Correlation) ID: ([0-9a-fA-F-]{36})")


def _entra_answer(exc: Exception) -> dict:
    """Entra ID's JSON error, from the response when azure-identity kept it, else from its message.

    azure-identity 1.27 raises ClientAuthenticationError without the response for MSAL-handled errors;
    its message then carries Entra ID's error_description, which starts with the AADSTS number and
    ends with the trace and correlation ids.
    """
    response = getattr(exc, "response", None)
    if response is not None:
        try:
            body = json.loads(response.text() or "{}")
            if isinstance(body, dict) and body:
                return body
        except (ValueError, TypeError, AttributeError):
            pass
    text = str(exc)
    body: dict = {}
    numbers = [int(n) for n in _AADSTS_RE.findall(text)]
    if numbers:
        body["error_codes"] = numbers
    for kind, value in _ID_RE.findall(text):
        body["trace_id" if kind == "Trace" else "correlation_id"] = value
    return body


def entra_error(exc: Exception, settings: Settings) -> IntakeError:
    """Classify a failed token request by its AADSTS number, never by the description text."""
    from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError
    from azure.identity import CredentialUnavailableError

    if isinstance(exc, IntakeError):  # already classified (a proof's own failure, e.g. the vault's)
        return exc
    fix = settings.fix_args()
    body = _entra_answer(exc)
    response = getattr(exc, "response", None)
    codes = body.get("error_codes") or []
    ids = ", ".join(f"{k}={body[k]}" for k in ("trace_id", "correlation_id") if body.get(k))
    request_id = body.get("correlation_id") or None
    for number in codes:
        if number in _AADSTS:
            code = _AADSTS[number]
            part = _FEDERATION_PART.get(number)
            said = (f": the {part} of the managed identity's token matches no federated credential on the app "
                    "registration" if part else "")
            return IntakeError(code, f"Entra ID answered AADSTS{number}{said}. {ids}".strip(),
                               request_id=request_id, upstream_code=f"AADSTS{number}", fix_args=fix)
    if settings.auth == "managed_identity" or isinstance(exc, CredentialUnavailableError) or \
            "ManagedIdentityCredential" in str(exc):
        # The managed identity endpoint: unreachable, no identity assigned, or it refused (no Entra ID answer).
        return IntakeError("managed_identity_unavailable", "The managed identity endpoint could not issue a token "
                           f"({type(exc).__name__}).", retry_after=5.0, fix_args=fix)
    if body.get("error") == "temporarily_unavailable" or (response is not None and response.status_code >= 500):
        return IntakeError("entra_unavailable", f"Entra ID is temporarily unavailable. {ids}".strip(),
                           request_id=request_id, fix_args=fix)
    if codes or body.get("error"):
        number = f"AADSTS{codes[0]}" if codes else str(body.get("error"))
        return IntakeError("entra_error", f"Entra ID refused the token request: {number}. {ids}".strip(),
                           request_id=request_id, upstream_code=number, fix_args=fix)
    http_status = re.search(r"HTTP Error: (\d{3})", str(exc))  # MSAL's words for a failed metadata request
    if http_status and int(http_status.group(1)) >= 500:
        return IntakeError("entra_unavailable", f"Entra ID answered HTTP {http_status.group(1)}.", fix_args=fix)
    if "authority configuration" in str(exc):
        # MSAL fetches the tenant's OpenID metadata first; Entra answers AADSTS90002 there.
        return IntakeError("entra_unknown_tenant", "Entra ID has no OpenID configuration for DYNAMICS_TENANT_ID.",
                           upstream_code="AADSTS90002", fix_args=fix)
    if isinstance(exc, ServiceRequestError) or not isinstance(exc, ClientAuthenticationError):
        return IntakeError("entra_unavailable", f"Entra ID could not be reached: {type(exc).__name__}.", fix_args=fix)
    return IntakeError("entra_error", "Entra ID refused the token request.", fix_args=fix)


class TokenProvider:
    """Caches the Dataverse token for every thread of the instance."""

    def __init__(self, settings: Settings, proof: Proof, *, margin: float = REFRESH_MARGIN,
                 clock: Callable[[], float] = time.time, backoff: float = FAILURE_BACKOFF) -> None:
        self._settings = settings
        self._proof = proof
        self._margin = margin
        self._clock = clock
        self._flights: Flights[Token] = Flights("token", backoff)
        self._token: Token | None = None

    @property
    def acquisitions(self) -> int:
        return self._flights.attempts

    def _request(self) -> Token:
        now = self._clock()
        try:
            access = self._proof.credential().get_token(self._settings.scope)
        except Exception as exc:  # azure-identity raises ClientAuthenticationError and azure-core errors
            raise entra_error(exc, self._settings) from None
        lifetime = max(access.expires_on - now, 0.0)
        margin = min(self._margin, lifetime / 2)
        return Token(access.token, float(access.expires_on), float(access.expires_on) - margin)

    def _acquire(self, rejected: str | None) -> Token:
        """Runs in the flight's thread: a token, unless one newer than `rejected` arrived meanwhile.

        If Entra ID rejects the proof (a rotated secret or certificate), the vault is read once more.
        """
        current = self._token
        if current is not None and current.value != rejected and self._clock() < current.refresh_on:
            return current
        try:
            token = self._request()
        except IntakeError as err:
            if err.code not in self._proof.rotation_codes:
                raise
            log.warning("entra rejected the app's proof (%s); reading it again once", err.code)
            if not self._proof.reload():
                raise
            token = self._request()
        self._token = token
        log.info("dataverse token acquired: expires_in=%.0fs", token.expires_on - self._clock())
        return token

    def _wait(self, rejected: str | None, deadline: Deadline | None) -> str:
        def late() -> IntakeError:
            return IntakeError("entra_unavailable", "Entra ID issued no token within the call's deadline.",
                               retry_after=5.0, fix_args=self._settings.fix_args())

        token = self._flights.run("token", lambda: self._acquire(rejected), deadline or Deadline(DEFAULT_WAIT),
                                  late)
        return token.value

    def token(self, deadline: Deadline | None = None) -> str:
        """The cached token. Inside the refresh window a new one is fetched in the background while the
        valid one is used; a missing or stale one is awaited (shared by every waiting thread)."""
        held = self._token
        now = self._clock()
        if held is not None and now < held.refresh_on:
            return held.value
        if held is not None and now < held.expires_on - 30:
            try:
                self._flights.join("token", lambda: self._acquire(held.value))
            except IntakeError as err:  # the last attempt failed moments ago: keep the valid token
                log.warning("proactive token refresh failed (%s); using the token held", err.code)
            return held.value
        return self._wait(held.value if held is not None else None, deadline)

    def refresh(self, rejected: str, deadline: Deadline | None = None) -> str:
        """Replace the token Dataverse rejected, unless another thread already did."""
        current = self._token
        if current is not None and current.value != rejected:
            return current.value
        return self._wait(rejected, deadline)
