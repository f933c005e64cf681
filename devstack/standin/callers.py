"""The stand-in's Entra ID as the intake API's issuer: the API's app registration with its app roles, caller
app registrations (client credentials) with roles assigned, and the tenant's published signing keys.

Tokens are shaped like Entra ID's app-only access tokens: RS256 with `kid` (and `x5t`) in the header; v2
(`aud` = the API's client id, `iss` = {authority}/{tid}/v2.0, caller in `azp`) or v1 (`aud` = api://<id>,
`iss` = https://sts.windows.net/{tid}/, caller in `appid`), as the API registration's
`requestedAccessTokenVersion` decides; `roles` only when some are assigned; `idtyp` = app.
"""

from __future__ import annotations

import random
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from .state import State, secret_value, seeded_guid

API_ROLES = ("Cases.Create", "Leads.Create", "Intake.Admin")


@dataclass
class SigningKey:
    kid: str
    private: Any  # cryptography RSAPrivateKey
    published: bool = True


def _new_key(rng: random.Random) -> SigningKey:
    from cryptography.hazmat.primitives.asymmetric import rsa

    kid = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_") for _ in range(27))
    return SigningKey(kid, rsa.generate_private_key(public_exponent=65537, key_size=2048))


class CallerDirectory:
    """The API registration, its callers and the signing keys (thread-safe; keys made on first use)."""

    def __init__(self, state: State, seed: int, token_lifetime: int = 3599) -> None:
        self.state = state
        self._rng = random.Random(f"standin-callers-{seed}")
        self._lock = threading.Lock()
        self.api_client_id = seeded_guid(self._rng)
        self.token_version = 2  # the API registration's requestedAccessTokenVersion
        self.token_lifetime = token_lifetime
        self.roles: dict[str, list[str]] = {}  # caller client id -> app roles assigned to its service principal
        self.principals: dict[str, str] = {}  # caller client id -> its service principal's object id
        self._keys: list[SigningKey] = []
        self._signing: SigningKey | None = None

    # ---- keys ---------------------------------------------------------------------------------------
    def _ensure_keys(self) -> None:
        if self._signing is None:
            self._signing = _new_key(self._rng)
            self._keys.append(self._signing)

    def jwks(self) -> dict[str, Any]:
        """The published keys, as the tenant's jwks_uri serves them."""
        from jwt.algorithms import RSAAlgorithm

        with self._lock:
            self._ensure_keys()
            keys = [k for k in self._keys if k.published]
        out = []
        for k in keys:
            jwk = RSAAlgorithm.to_jwk(k.private.public_key(), as_dict=True)
            out.append({"kty": "RSA", "use": "sig", "kid": k.kid, "x5t": k.kid, "n": jwk["n"], "e": jwk["e"]})
        return {"keys": out}

    def rotate(self, sign_with_new: bool = True, publish: bool = True) -> str:
        """A new key (published unless told otherwise); tokens are signed with it from now when `sign_with_new`."""
        with self._lock:
            self._ensure_keys()
            key = _new_key(self._rng)
            key.published = publish
            self._keys.append(key)
            if sign_with_new:
                self._signing = key
            return key.kid

    def retire(self, kid: str) -> None:
        """Stop publishing a key (tokens it signed then fail everywhere that refetches the key set)."""
        with self._lock:
            for k in self._keys:
                if k.kid == kid:
                    k.published = False

    @property
    def signing_kid(self) -> str:
        with self._lock:
            self._ensure_keys()
            return self._signing.kid  # type: ignore[union-attr]

    # ---- callers ------------------------------------------------------------------------------------
    def add_caller(self, roles: list[str] | tuple[str, ...] = API_ROLES, client_id: str | None = None) -> str:
        with self._lock:
            client_id = client_id or seeded_guid(self._rng)
            self.roles[client_id] = list(roles)
            self.principals[client_id] = seeded_guid(self._rng)
            return client_id

    def new_secret(self) -> str:
        with self._lock:
            return secret_value(self._rng)

    def is_api(self, resource: str) -> bool:
        res = resource.rstrip("/").lower()
        return res in (self.api_client_id, f"api://{self.api_client_id}")

    def claims(self, client_id: str, tenant: str, entra_url: str, version: int | None = None) -> dict[str, Any]:
        now = int(time.time())
        version = version or self.token_version
        principal = self.principals.get(client_id) or seeded_guid(random.Random(client_id))
        claims: dict[str, Any] = {"iat": now, "nbf": now, "exp": now + self.token_lifetime, "tid": tenant,
                                  "oid": principal, "sub": principal, "idtyp": "app",
                                  "uti": secrets.token_urlsafe(16), "rh": "0.AAAA" + secrets.token_urlsafe(8)}
        if version == 1:
            claims.update(aud=f"api://{self.api_client_id}", iss=f"https://sts.windows.net/{tenant}/",
                          appid=client_id, appidacr="1", ver="1.0")
        else:
            claims.update(aud=self.api_client_id, iss=f"{entra_url}/{tenant}/v2.0", azp=client_id, azpacr="1",
                          ver="2.0")
        roles = self.roles.get(client_id) or []
        if roles:
            claims["roles"] = list(roles)
        return claims

    def sign(self, claims: dict[str, Any], kid: str | None = None, unpublished: bool = False,
             header_kid: str | None = None, alg: str = "RS256") -> str:
        """RS256 with the signing key (or the key `kid`; or, `unpublished`, a key nobody publishes); `header_kid`
        names another kid in the header (a made-up one); `alg` PS256 etc. signs with the same key otherwise."""
        import jwt

        with self._lock:
            self._ensure_keys()
            if unpublished:
                key = _new_key(self._rng)
                key.published = False
            else:
                key = next((k for k in self._keys if k.kid == kid), None) if kid else self._signing
                if key is None:
                    raise ValueError(f"no signing key {kid!r}")
        shown = header_kid or key.kid
        return jwt.encode(claims, key.private, algorithm=alg, headers={"kid": shown, "x5t": shown})
