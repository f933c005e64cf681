"""The local stack: Azurite, the HTTPS stand-in for Entra ID / Key Vault / Dataverse, and `func start`.

    ./scripts/run-local.sh            (calls: python -m tools.localstack)

Without a local.settings.json it writes one that points at the stand-in, so the app runs with no
Azure tenant. With a local.settings.json whose DYNAMICS_URL is a real environment, it starts only
Azurite and the Functions host. Everything it started stops when `func` stops (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STATE = ROOT / ".local"
SETTINGS = ROOT / "local.settings.json"
AZURITE = ROOT / "node_modules" / ".bin" / "azurite"
STANDIN_PORTS = {"entra": 7441, "vault": 7442, "dataverse": 7443}
AZURITE_PORTS = {"blob": 10000, "queue": 10001, "table": 10002}
QUEUES = ("cases", "leads", "cases-rejected", "leads-rejected")

FUNC_MISSING = """\
Azure Functions Core Tools (the `func` command) is not installed, so the app cannot be started.
Install version 4, then run ./scripts/run-local.sh again:
  npm install -g azure-functions-core-tools@4 --unsafe-perm true
  (or: macOS `brew tap azure/functions && brew install azure-functions-core-tools@4`;
   Windows `winget install Microsoft.Azure.FunctionsCoreTools`;
   Linux packages: https://learn.microsoft.com/azure/azure-functions/functions-run-local)
Nothing was started. The test suite needs no `func`: ./scripts/test.sh"""


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex((host, port)) == 0


def wait_port(port: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if port_open(port):
            return True
        time.sleep(0.1)
    return False


def start_azurite(location: Path, ports: dict[str, int]) -> subprocess.Popen | None:
    """Azurite on 127.0.0.1 (blob, queue, table); None when one already listens on the queue port."""
    if port_open(ports["queue"]):
        print(f"Azurite already listening on {ports['queue']}: using it")
        return None
    if not AZURITE.exists():
        raise RuntimeError(f"{AZURITE} is missing: run scripts/bootstrap.sh (it installs Azurite from npm)")
    location.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [str(AZURITE), "--location", str(location), "--silent", "--skipApiVersionCheck", "--loose",
         "--blobHost", "127.0.0.1", "--blobPort", str(ports["blob"]), "--queueHost", "127.0.0.1",
         "--queuePort", str(ports["queue"]), "--tableHost", "127.0.0.1", "--tablePort", str(ports["table"])],
        stdout=subprocess.DEVNULL)
    if not (wait_port(ports["queue"], 30) and wait_port(ports["blob"], 10)):
        stop(proc)
        raise RuntimeError("Azurite did not start within 30 s")
    return proc


def start_standin(state_dir: Path, ports: dict[str, int]) -> tuple[subprocess.Popen, dict[str, Any]]:
    """The stand-in as its own process (so `func`'s worker talks to it over real sockets)."""
    info_path = state_dir / "standin.json"
    info_path.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "tools.standin", "--state-dir", str(state_dir),
                             "--entra-port", str(ports["entra"]), "--vault-port", str(ports["vault"]),
                             "--dataverse-port", str(ports["dataverse"])], cwd=ROOT)
    deadline = time.monotonic() + 30
    while not info_path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError("the stand-in did not start (are its ports free?)")
        time.sleep(0.1)
    return proc, json.loads(info_path.read_text())


def standin_settings(info: dict[str, Any], storage: str = "UseDevelopmentStorage=true") -> dict[str, Any]:
    """local.settings.json for the stand-in. AZURE_CLIENT_SECRET is the stand-in's own vault reader."""
    return {"IsEncrypted": False,
            "Values": {"FUNCTIONS_WORKER_RUNTIME": "python", "AzureWebJobsStorage": storage,
                       **info["settings_env"]}}


def uses_standin(settings_path: Path) -> bool:
    values = json.loads(settings_path.read_text()).get("Values", {})
    return values.get("DYNAMICS_URL", "").startswith("https://127.0.0.1:")


def create_queues(conn_str: str) -> None:
    from tools.queues import ensure, queue_client

    for name in QUEUES:
        ensure(queue_client(conn_str, name))


def stop(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    """Terminate, and kill after `grace` seconds (Azurite sometimes ignores SIGTERM after heavy use)."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def func_env() -> dict[str, str]:
    """The host starts its Python worker from PATH: put the project's venv first."""
    env = dict(os.environ)
    venv = ROOT / ".venv"
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=7071, help="port of the Functions host")
    args = parser.parse_args(argv)
    func = shutil.which("func")
    if func is None:
        print(FUNC_MISSING, file=sys.stderr)
        return 2
    procs: list[subprocess.Popen | None] = []
    try:
        procs.append(start_azurite(STATE / "azurite", AZURITE_PORTS))
        from tools.queues import azurite_connection_string

        create_queues(azurite_connection_string(AZURITE_PORTS["queue"]))
        if not SETTINGS.exists() or uses_standin(SETTINGS):
            proc, info = start_standin(STATE / "standin", STANDIN_PORTS)
            procs.append(proc)
            if not SETTINGS.exists():
                SETTINGS.write_text(json.dumps(standin_settings(info), indent=2) + "\n")
                print(f"wrote {SETTINGS.name}: the app talks to the local stand-in (no Azure tenant needed)")
            print(f"stand-in seeded: contact {info['seed_contact_id']}, account {info['seed_account_id']}")
        else:
            print(f"{SETTINGS.name} points at {json.loads(SETTINGS.read_text())['Values'].get('DYNAMICS_URL')}: "
                  "no stand-in started (run `az login` so the app can read Key Vault)")
        print(f"""
Try it, once the host says it is ready:
  curl -s localhost:{args.port}/api/health
  curl -s -X POST localhost:{args.port}/api/cases -H 'Content-Type: application/json' \\
       -d '{{"title": "Caller reports outage", "customer": {{"email": "ada@example.com"}}, "externalId": "call-1"}}'
  .venv/bin/python -m tools.queues send cases \\
       '{{"title": "From the queue", "customer": {{"email": "ada@example.com"}}}}'
  curl -s localhost:{args.port}/api/diagnostics
""")
        host = subprocess.Popen([func, "start", "--port", str(args.port)], cwd=ROOT, env=func_env())
        procs.append(host)
        try:
            return host.wait()
        except KeyboardInterrupt:
            return 0
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 1
    finally:
        for proc in reversed(procs):
            stop(proc)


if __name__ == "__main__":
    sys.exit(main())
