"""How the app proves itself to Entra ID for Dataverse, one class per DYNAMICS_AUTH mode.

| mode               | credential (azure-identity)                                  | Key Vault |
| secret             | ClientSecretCredential, the secret read from the vault        | yes       |
| certificate        | CertificateCredential, the certificate's secret (key + chain) | yes       |
| federated          | ClientAssertionCredential, the managed identity's token for   | no        |
|                    | api://AzureADTokenExchange as the assertion                   |           |
| managed_identity   | ManagedIdentityCredential: the identity is the app user       | no        |

Each builds a fresh credential per acquisition (TokenProvider asks for one per token), so no lower
cache can hand back a token Dataverse rejected. The Azure SDKs and `cryptography` are imported on
first use, never at start-up.
"""

from __future__ import annotations

import base64
import logging
from datetime import UTC, datetime
from typing import Any

from shared.errors import IntakeError
from shared.settings import Settings
from shared.vault import SecretSource, VaultSecret

log = logging.getLogger(__name__)
EXCHANGE_SCOPE = "api://AzureADTokenExchange/.default"  # the audience of a federated credential


def _common(settings: Settings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"connection_timeout": 5, "read_timeout": 10, "retry_total": 2}
    if settings.authority_host:
        kwargs["authority"] = settings.authority_host
    if not settings.is_public_authority:
        kwargs["disable_instance_discovery"] = True
    return kwargs


class SecretProof:
    """DYNAMICS_AUTH=secret: the app registration's client secret from Key Vault."""

    rotation_codes = frozenset({"entra_invalid_secret", "entra_secret_expired"})

    def __init__(self, settings: Settings, source: Any = None) -> None:
        self._settings = settings
        self._source = source or SecretSource(settings)
        self._used: str | None = None

    def credential(self) -> Any:
        from azure.identity import ClientSecretCredential

        s = self._settings
        self._used = self._source.get()
        return ClientSecretCredential(s.tenant_id, s.client_id, self._used, **_common(s))

    def reload(self) -> bool:
        used = self._used or ""
        return self._source.refresh(used) != used


def certificate_pem(secret: VaultSecret, settings: Settings, now: datetime | None = None) -> tuple[bytes, datetime]:
    """The PEM (private key + certificate chain) a vault certificate's secret holds, and its expiry.

    Key Vault returns PKCS#12 (base64, no password) or PEM, by the certificate's content type.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, pkcs12

    fix = settings.fix_args()
    try:
        if (secret.content_type or "").lower() == "application/x-pkcs12":
            key, cert, extra = pkcs12.load_key_and_certificates(base64.b64decode(secret.value), None)
            if key is None or cert is None:
                raise ValueError("no private key")
            chain = [cert, *extra]
            pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()) + b"".join(
                c.public_bytes(Encoding.PEM) for c in chain)
        else:
            pem = secret.value.encode()
            if b"PRIVATE KEY-----" not in pem:
                raise ValueError("no private key")
            cert = x509.load_pem_x509_certificate(pem)
    except (ValueError, TypeError) as exc:
        raise IntakeError("keyvault_certificate_unusable", f"The secret behind the certificate "
                          f"{settings.certificate_name!r} holds no usable key and certificate "
                          f"({type(exc).__name__}).", fix_args=fix) from None
    expires = cert.not_valid_after_utc
    if expires <= (now or datetime.now(UTC)):
        raise IntakeError("entra_certificate_expired", f"The certificate {settings.certificate_name!r} in the vault "
                          f"expired on {expires.date().isoformat()}.", fix_args=fix)
    return pem, expires


class CertificateProof:
    """DYNAMICS_AUTH=certificate: the app registration's certificate, kept as a Key Vault certificate."""

    rotation_codes = frozenset({"entra_certificate_not_registered", "entra_certificate_expired"})

    def __init__(self, settings: Settings, source: Any = None) -> None:
        self._settings = settings
        self._source = source or SecretSource(settings, kind="certificate")
        self._used: str | None = None

    def credential(self) -> Any:
        from azure.identity import CertificateCredential

        s = self._settings
        secret = self._source.secret()
        self._used = secret.value
        pem, _ = certificate_pem(secret, s)
        # The chain is sent (x5c) so a certificate registered by subject name and issuer is accepted too.
        return CertificateCredential(s.tenant_id, s.client_id, certificate_data=pem, send_certificate_chain=True,
                                     **_common(s))

    def reload(self) -> bool:
        used = self._used or ""
        return self._source.refresh(used) != used


def _identity(settings: Settings) -> Any:
    from azure.identity import ManagedIdentityCredential

    kwargs: dict[str, Any] = {"connection_timeout": 5, "read_timeout": 10, "retry_total": 2}
    return ManagedIdentityCredential(client_id=settings.identity_client_id, **kwargs)


class FederatedProof:
    """DYNAMICS_AUTH=federated: the user-assigned managed identity is a federated credential of the app."""

    rotation_codes: frozenset[str] = frozenset()

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def _assertion(self) -> str:
        """Called by azure-identity on every acquisition: the identity's token for the exchange audience."""
        try:
            return _identity(self._settings).get_token(EXCHANGE_SCOPE).token
        except Exception as exc:  # azure-identity's family of errors: none of them is Entra's answer to the app
            from shared.tokens import entra_error

            err = entra_error(exc, self._settings)
            if err.code in ("entra_unavailable", "entra_error"):
                err = IntakeError("managed_identity_unavailable", "The managed identity could not get its token for "
                                  f"the federated credential ({type(exc).__name__}).", retry_after=5.0,
                                  fix_args=self._settings.fix_args())
            raise err from None

    def credential(self) -> Any:
        from azure.identity import ClientAssertionCredential

        s = self._settings
        return ClientAssertionCredential(s.tenant_id, s.client_id, self._assertion, **_common(s))

    def reload(self) -> bool:
        return False


class ManagedIdentityProof:
    """DYNAMICS_AUTH=managed_identity: the Function App's managed identity is the Dataverse application user."""

    rotation_codes: frozenset[str] = frozenset()

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def credential(self) -> Any:
        return _identity(self._settings)

    def reload(self) -> bool:
        return False


def proof_for(settings: Settings, source: Any = None) -> Any:
    """The proof of the configured mode; `source` stands in for the vault reader (diagnostics pins one)."""
    if settings.auth == "certificate":
        return CertificateProof(settings, source)
    if settings.auth == "federated":
        return FederatedProof(settings)
    if settings.auth == "managed_identity":
        return ManagedIdentityProof(settings)
    return SecretProof(settings, source)
