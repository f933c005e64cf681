"""Azurite for the tests: the local run's starter (devstack/localstack.py), on free ports on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from devstack import localstack
from tools.queues import Account, azurite_connection_string

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Azurite:
    def __init__(self, oauth_tls: tuple[str, str] | None = None) -> None:
        """`oauth_tls` (certificate, key): HTTPS with Entra ID bearer tokens (`--oauth basic`)."""
        self.dir = tempfile.mkdtemp(prefix="azurite-")
        self.ports = {"blob": free_port(), "queue": free_port(), "table": free_port()}
        self.proc = localstack.start_azurite(Path(self.dir), self.ports, oauth_tls)

    @property
    def queue_url(self) -> str:
        """The queue endpoint as --account-url takes it (Azurite's account is the first path segment)."""
        return f"https://127.0.0.1:{self.ports['queue']}/devstoreaccount1"

    @property
    def connection_string(self) -> str:
        return azurite_connection_string(self.ports["queue"], blob_port=self.ports["blob"])

    def stop(self) -> None:
        localstack.stop(self.proc, grace=2)
        shutil.rmtree(self.dir, ignore_errors=True)


def signed_in(si: Any, **override: str) -> dict[str, str]:
    """What `az login` stands for here: EnvironmentCredential's variables, pointed at the stand-in's Entra ID.
    AZURE_STORAGE_CONNECTION_STRING names an unreachable account, so nothing can succeed through it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "IDENTITY_"))}
    wanted = ("AZURE_AUTHORITY_HOST", "AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "REQUESTS_CA_BUNDLE")
    env.update({k: v for k, v in si.settings_env().items() if k in wanted})
    env["AZURE_STORAGE_CONNECTION_STRING"] = azurite_connection_string(queue_port=9)
    env.update(override)
    return env


def cli_as(env: dict[str, str], *args: str) -> tuple[int, str, str, float]:
    """`python -m tools.queues ...` in its own process with exactly `env`: (exit code, stdout, stderr, seconds)."""
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "tools.queues", *args], check=False, cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    return out.returncode, out.stdout, out.stderr, time.monotonic() - started


def token_account(si: Any, url: str) -> Account:
    """The test's own way into an OAuth Azurite: a real ClientSecretCredential from the stand-in, trusting its CA."""
    from azure.identity import ClientSecretCredential

    return Account(url, ClientSecretCredential(si.tenant_id, si.kv_client_id, si.kv_secret, authority=si.entra_url,
                                               disable_instance_discovery=True, connection_verify=si.ca_path))
