"""Azurite for the tests: the local run's starter (tools/localstack.py), on free ports on 127.0.0.1."""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

from tools import localstack
from tools.queues import azurite_connection_string


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
