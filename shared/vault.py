"""A Key Vault secret (the Dynamics client secret, or the secret behind a certificate), read once per
instance and kept in memory.

The Azure SDKs are imported on first use: importing them costs more than the rest of the app, and
the health route and function indexing never need them.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from shared.errors import IntakeError
from shared.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VaultSecret:
    value: str
    version: str | None
    enabled: bool
    expires_on: datetime | None
    content_type: str | None = None

    def __repr__(self) -> str:  # never let the value reach a log through repr()
        return f"VaultSecret(version={self.version!r}, enabled={self.enabled}, expires_on={self.expires_on})"


def _keyvault_error(exc: Exception, settings: Settings, kind: str = "secret") -> IntakeError:
    """Map an azure-core exception from SecretClient to a stable code."""
    from azure.core.exceptions import (
        ClientAuthenticationError,
        HttpResponseError,
        ResourceNotFoundError,
        ServiceRequestError,
    )

    fix = settings.fix_args()
    if isinstance(exc, ValueError) and "challenge resource" in str(exc):
        # The SDK's challenge-resource verification: the host at KEY_VAULT_URL names a resource that is not
        # its own, so no token is sent to it (a wrong URL, or something else answering there).
        return IntakeError("keyvault_unreachable", f"The server at {settings.key_vault_url} answered with a "
                           "challenge for another resource, which does not match the vault's host: no token was "
                           "sent. Check that KEY_VAULT_URL is the vault's URI.", fix_args=fix)
    if isinstance(exc, ResourceNotFoundError):
        if kind == "certificate":
            return IntakeError("keyvault_certificate_missing", "The vault has no certificate named "
                               f"{settings.certificate_name!r}.", fix_args=fix)
        return IntakeError("keyvault_secret_missing", f"The vault has no secret named {settings.secret_name!r}.",
                           fix_args=fix)
    if isinstance(exc, ClientAuthenticationError) and getattr(exc, "status_code", None) is None:
        # Raised by the credential, before any answer from the vault. An Entra ID outage is not a missing
        # identity: classify the credential's own error as a token request's would be.
        from shared.tokens import entra_error

        if entra_error(exc, settings).code == "entra_unavailable":
            return IntakeError("keyvault_identity_unavailable", "Entra ID could not issue the app's identity a "
                               "token for Key Vault (it answered a transient error or did not answer).",
                               retry_after=5.0, fix_args=fix)
        return IntakeError("keyvault_auth_failed", "No Azure identity could get a token for Key Vault.", fix_args=fix)
    if isinstance(exc, HttpResponseError) and exc.status_code == 401:
        return IntakeError("keyvault_auth_failed", "Key Vault refused the identity's token (401).", fix_args=fix)
    if isinstance(exc, HttpResponseError) and exc.status_code == 403:
        inner = ""
        err = getattr(exc, "error", None)
        if err is not None and getattr(err, "innererror", None):
            inner = (err.innererror or {}).get("code", "")
        request_id = exc.response.headers.get("x-ms-request-id") if exc.response is not None else None
        if inner == "SecretDisabled":
            return IntakeError("keyvault_secret_disabled", f"The vault secret {settings.secret_name!r} is disabled.",
                               request_id=request_id, upstream_code=inner, fix_args=fix)
        return IntakeError("keyvault_forbidden", "The app's identity may not read secrets in this vault.",
                           request_id=request_id, upstream_code=inner or "Forbidden", fix_args=fix)
    if isinstance(exc, ServiceRequestError) or (isinstance(exc, HttpResponseError) and (exc.status_code or 0) >= 500):
        return IntakeError("keyvault_unreachable", f"Key Vault at {settings.key_vault_url} did not answer.",
                           fix_args=fix)
    status = getattr(exc, "status_code", None)
    return IntakeError("keyvault_unreachable", f"Key Vault answered HTTP {status}.", fix_args=fix)


class SecretSource:
    """Reads the secret once, and again only when asked (after Entra ID rejected the one held).

    `kind` "certificate" reads the secret behind the Key Vault certificate DYNAMICS_CLIENT_CERTIFICATE_NAME.
    """

    def __init__(self, settings: Settings, kind: str = "secret") -> None:
        self._settings = settings
        self._kind = kind
        self._name = settings.certificate_name if kind == "certificate" else settings.secret_name
        self._client: Any = None
        self._secret: VaultSecret | None = None
        self._lock = threading.Lock()

    def _secret_client(self) -> Any:
        if self._client is None:
            from azure.identity import DefaultAzureCredential
            from azure.keyvault.secrets import SecretClient

            s = self._settings
            kwargs: dict[str, Any] = {"exclude_interactive_browser_credential": True}
            if not s.is_public_authority:
                kwargs["disable_instance_discovery"] = True
            credential = DefaultAzureCredential(**kwargs)
            # The SDK's challenge-resource verification stays on for every vault: sovereign-cloud vaults
            # pass it, and a vault host that does not end with the challenge's resource is refused.
            self._client = SecretClient(s.key_vault_url, credential, retry_total=2, retry_backoff_factor=0.2,
                                        connection_timeout=5, read_timeout=10)
        return self._client

    def read(self) -> VaultSecret:
        """One read from the vault, classified; used by the diagnostics step as well."""
        try:
            secret = self._secret_client().get_secret(self._name)
        except Exception as exc:  # azure-core raises a family of exceptions; classify them all
            err = _keyvault_error(exc, self._settings, self._kind)
            log.warning("key vault read failed: code=%s", err.code)
            raise err from None
        props = secret.properties
        value = secret.value or ""
        return VaultSecret(value=value, version=props.version, enabled=bool(props.enabled),
                           expires_on=props.expires_on, content_type=props.content_type)

    def secret(self) -> VaultSecret:
        """The secret held by this instance, read on first use."""
        held = self._secret
        if held is not None:
            return held
        with self._lock:
            if self._secret is None:
                self._secret = self.read()
            return self._secret

    def get(self) -> str:
        return self.secret().value

    def refresh(self, rejected: str) -> str:
        """Read the vault again unless another thread already replaced the rejected value."""
        with self._lock:
            if self._secret is not None and self._secret.value != rejected:
                return self._secret.value
            self._secret = self.read()
            log.info("%s re-read from key vault", self._kind)
            return self._secret.value
