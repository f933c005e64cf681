"""Certificates for the stand-in: a trustme CA and a server certificate for 127.0.0.1/localhost."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass


@dataclass(frozen=True)
class TlsMaterial:
    """Paths of the generated PEM files and a ready server context."""

    ca_path: str
    cert_path: str
    key_path: str
    context: ssl.SSLContext


def make_tls(directory: str) -> TlsMaterial:
    """Create a fresh CA and server certificate in ``directory`` and a server SSL context."""
    import trustme

    os.makedirs(directory, exist_ok=True)
    ca = trustme.CA(organization_name="standin")
    leaf = ca.issue_cert("127.0.0.1", "localhost", common_name="standin")
    ca_path = os.path.join(directory, "ca.pem")
    cert_path = os.path.join(directory, "server.pem")
    key_path = os.path.join(directory, "server-key.pem")
    ca.cert_pem.write_to_path(ca_path)
    with open(cert_path, "wb") as fh:
        for blob in leaf.cert_chain_pems:
            fh.write(blob.bytes())
    leaf.private_key_pem.write_to_path(key_path)
    os.chmod(key_path, 0o600)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_path, key_path)
    return TlsMaterial(ca_path, cert_path, key_path, ctx)
