"""Azurite from the project's node_modules, on free ports on 127.0.0.1, for as long as a test needs it."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AZURITE = ROOT / "node_modules" / ".bin" / "azurite"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.1)
    return False


class Azurite:
    def __init__(self) -> None:
        if not AZURITE.exists():
            raise RuntimeError(f"{AZURITE} is missing: run scripts/bootstrap.sh (it installs Azurite from npm)")
        self.dir = tempfile.mkdtemp(prefix="azurite-")
        self.blob_port, self.queue_port = free_port(), free_port()
        self.proc = subprocess.Popen(
            [str(AZURITE), "--location", self.dir, "--silent", "--skipApiVersionCheck", "--loose",
             "--blobHost", "127.0.0.1", "--blobPort", str(self.blob_port),
             "--queueHost", "127.0.0.1", "--queuePort", str(self.queue_port),
             "--tableHost", "127.0.0.1", "--tablePort", str(free_port())],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if not (wait_for_port(self.queue_port, 30) and wait_for_port(self.blob_port, 10)):
            self.stop()
            raise RuntimeError("Azurite did not start within 30 s")

    @property
    def connection_string(self) -> str:
        from tools.queues import AZURITE_KEY

        return (f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={AZURITE_KEY};"
                f"BlobEndpoint=http://127.0.0.1:{self.blob_port}/devstoreaccount1;"
                f"QueueEndpoint=http://127.0.0.1:{self.queue_port}/devstoreaccount1;")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=2)  # Azurite sometimes ignores SIGTERM after heavy use
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        shutil.rmtree(self.dir, ignore_errors=True)
