"""Client certificates for the certificate mode, made at test time with `cryptography` (never committed)."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class ClientCertificate:
    cert_pem: str  # the public part, as uploaded to the app registration
    key_pem: str
    pfx_base64: str  # PKCS#12 without password, base64: what a Key Vault certificate's secret holds by default
    sha1: str  # hex thumbprint (x5t is its base64url)
    not_after: datetime

    @property
    def pem_with_key(self) -> str:
        """The application/x-pem-file form of a Key Vault certificate's secret."""
        return self.key_pem + self.cert_pem


def make_certificate(common_name: str = "dynamics-intake", days: float = 365, valid_from_days: float = -1
                     ) -> ClientCertificate:
    """A self-signed RSA 2048 certificate valid from `valid_from_days` to `days` days from now."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    not_after = now + timedelta(days=days)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now + timedelta(days=valid_from_days))
            .not_valid_after(not_after).sign(key, hashes.SHA256()))
    der = cert.public_bytes(serialization.Encoding.DER)
    pfx = pkcs12.serialize_key_and_certificates(common_name.encode(), key, cert, None,
                                                serialization.NoEncryption())
    return ClientCertificate(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        key_pem=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()).decode(),
        pfx_base64=base64.b64encode(pfx).decode(), sha1=hashlib.sha1(der).hexdigest(),  # noqa: S324 - x5t is SHA-1
        not_after=cert.not_valid_after_utc)
