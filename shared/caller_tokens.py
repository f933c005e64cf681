"""The check of a caller's Entra ID access token (INTAKE_CALLER_AUTH=entra), with PyJWT.

Imported on the first request in entra mode only, so the function-key mode's cold start is unchanged.
The tenant's signing keys are fetched with `requests` (PyJWKClient's urllib would ignore
REQUESTS_CA_BUNDLE and the app's proxies), cached, refreshed about hourly, and refetched for an unknown
`kid` (a key rollover) at most once per COOLDOWN per instance: one fetch at a time, only a successful
fetch starts the cooldown, and after a failed one the next waits BACKOFF. A flood of made-up kids thus
costs one fetch of the key set and of the openid-configuration per cooldown. Nothing of a token is
logged or put in an error: the message names the check that failed.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import jwt
import requests
from jwt import PyJWK

from shared import settings as settings_mod
from shared.callers import Caller
from shared.errors import IntakeError

log = logging.getLogger(__name__)

COOLDOWN = 300.0  # seconds between refetches for unknown kids (Microsoft: not more than once per 5 minutes)
BACKOFF = 1.0  # seconds after a failed fetch before the next one
REFRESH = 3600.0  # the cached key set is refreshed after this long even when every kid is known
SKEW = 300  # seconds of clock skew allowed on exp/nbf
MAX_TOKEN = 16 * 1024  # characters; Entra ID's access tokens are a few KiB
_TIMEOUT = (3.05, 5.0)
_REQUIRED = ["exp", "nbf", "iss", "aud", "tid"]


def invalid(check: str) -> IntakeError:
    return IntakeError("caller_token_invalid", f"The bearer token failed the check: {check}.")


class KeySet:
    """The tenant's signing keys by kid (thread-safe, single flight)."""

    def __init__(self, s: settings_mod.CallerSettings, *, cooldown: float = COOLDOWN, backoff: float = BACKOFF,
                 refresh: float = REFRESH) -> None:
        self.settings = s
        self.cooldown, self.backoff, self.refresh = cooldown, backoff, refresh
        self.session = requests.Session()  # trust_env: REQUESTS_CA_BUNDLE and proxies as for every other call
        self.issuer: str | None = None  # the v2 issuer, from the openid-configuration
        self._jwks_uri: str | None = None
        self._config_at = 0.0
        self._keys: dict[str, PyJWK] = {}
        self._fetched: float | None = None  # monotonic time of the last successful fetch
        self._failed_until = 0.0
        self._lock = threading.Lock()

    def _get(self, url: str) -> Any:
        resp = self.session.get(url, timeout=_TIMEOUT, headers={"Accept": "application/json"})
        resp.raise_for_status()
        return resp.json()

    def _fetch(self) -> None:
        now = time.monotonic()
        if self._jwks_uri is None or now - self._config_at >= self.refresh:
            config = self._get(self.settings.openid_configuration)
            issuer, jwks_uri = config.get("issuer"), config.get("jwks_uri")
            if not isinstance(issuer, str) or self.settings.tenant_id not in issuer.lower() \
                    or not isinstance(jwks_uri, str) or not jwks_uri.startswith("https://"):
                raise ValueError("openid-configuration without this tenant's issuer and an https jwks_uri")
            self.issuer, self._jwks_uri, self._config_at = issuer, jwks_uri, now
        keys: dict[str, PyJWK] = {}
        for item in self._get(self._jwks_uri).get("keys") or []:
            kid = item.get("kid") if isinstance(item, dict) else None
            if not isinstance(kid, str) or item.get("kty") != "RSA" or item.get("use", "sig") != "sig":
                continue
            try:
                keys[kid] = PyJWK(item, algorithm="RS256")
            except jwt.PyJWTError:
                continue
        if not keys:
            raise ValueError("the key set holds no RSA signing key")
        self._keys, self._fetched = keys, time.monotonic()
        log.info("caller keys: fetched %s signing keys", len(keys))

    def _fresh(self, now: float) -> bool:
        return self._fetched is not None and now - self._fetched < self.refresh

    def key(self, kid: str) -> PyJWK:
        """The key `kid`; caller_token_invalid when the tenant does not publish it, caller_keys_unavailable
        when the keys cannot be fetched while it is unknown."""
        known = self._keys.get(kid)
        if known is not None and self._fresh(time.monotonic()):
            return known
        with self._lock:  # one fetch at a time; who waited looks again, and mostly finds the answer
            now = time.monotonic()
            known = self._keys.get(kid)
            if known is not None and self._fresh(now):
                return known
            if known is None and self._fetched is not None and now - self._fetched < self.cooldown:
                raise invalid("signing key (kid) not published by the tenant")
            if now < self._failed_until:
                if known is not None:
                    return known
                raise IntakeError("caller_keys_unavailable", retry_after=max(1.0, self._failed_until - now))
            try:
                self._fetch()
            except (requests.RequestException, ValueError, TypeError, AttributeError) as exc:
                self._failed_until = time.monotonic() + self.backoff
                log.warning("caller keys: fetch failed: %s", type(exc).__name__)
                if known is not None:
                    return known  # a stale key set still checks tokens signed by keys it holds
                raise IntakeError("caller_keys_unavailable", retry_after=max(1.0, self.backoff)) from None
            found = self._keys.get(kid)
            if found is None:
                raise invalid("signing key (kid) not published by the tenant")
            return found

    def fetch_now(self) -> int:
        """Fetch now (diagnostics); the number of signing keys, or what a failed fetch raises."""
        with self._lock:
            self._fetch()
            return len(self._keys)


class Verifier:
    def __init__(self, s: settings_mod.CallerSettings, **options: float) -> None:
        self.settings = s
        self.keys = KeySet(s, **options)

    def verify(self, token: str) -> Caller:
        """The caller of a valid app-only token for this API; caller_token_invalid naming the failed check."""
        if len(token) > MAX_TOKEN:
            raise invalid("longer than 16 KiB")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise invalid("not a JWS (three base64url parts, a JSON header)") from None
        if header.get("alg") != "RS256":
            raise invalid("algorithm (only RS256 is accepted)")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise invalid("no kid in the header")
        key = self.keys.key(kid)
        s = self.settings
        issuers = [i for i in (self.keys.issuer, s.v1_issuer) if i]
        try:
            claims = jwt.decode(token, key.key, algorithms=["RS256"], audience=s.audiences, issuer=issuers,
                                leeway=SKEW, options={"require": _REQUIRED})
        except jwt.InvalidSignatureError:
            raise invalid("signature") from None
        except jwt.ExpiredSignatureError:
            raise invalid("expiry (exp is past, 5 minutes of skew allowed)") from None
        except jwt.ImmatureSignatureError:
            raise invalid("not yet valid (nbf or iat in the future, 5 minutes of skew allowed)") from None
        except jwt.InvalidAudienceError:
            raise invalid("audience (aud is not INTAKE_API_CLIENT_ID nor api://<it>)") from None
        except jwt.InvalidIssuerError:
            raise invalid("issuer (iss is not the tenant INTAKE_API_TENANT_ID's v2 or v1 issuer)") from None
        except jwt.MissingRequiredClaimError as exc:
            raise invalid(f"required claim {exc.claim} missing") from None
        except jwt.PyJWTError:
            raise invalid("malformed token") from None
        if str(claims.get("tid", "")).lower() != s.tenant_id:
            raise invalid("tenant (tid is not INTAKE_API_TENANT_ID)")
        if "scp" in claims:
            raise invalid("a user's (delegated) token, with scp: only application tokens are accepted")
        if claims.get("idtyp") != "app":
            raise invalid("not an application token (idtyp is not app)")
        v1 = claims["iss"] == s.v1_issuer
        app_id = claims.get("appid" if v1 else "azp")
        if not isinstance(app_id, str) or not app_id:
            raise invalid(f"no {'appid' if v1 else 'azp'} (the calling application)")
        roles = claims.get("roles")
        roles = tuple(r for r in roles if isinstance(r, str)) if isinstance(roles, list) else ()
        return Caller(app_id.lower(), roles, "1.0" if v1 else "2.0")


_lock = threading.Lock()
_verifier: Verifier | None = None
_options: dict[str, float] = {}


def verifier() -> Verifier:
    """The instance's verifier; config_invalid naming the setting while one is missing or wrong."""
    global _verifier
    held = _verifier
    if held is not None:
        return held
    with _lock:
        if _verifier is None:
            _verifier = Verifier(settings_mod.load_callers(), **_options)
        return _verifier


def reset(**options: float) -> None:
    """Forget the instance's verifier and keys (tests); options (cooldown, backoff, refresh) go to the next."""
    global _verifier
    with _lock:
        if _verifier is not None:
            _verifier.keys.session.close()
        _verifier = None
        _options.clear()
        _options.update(options)
