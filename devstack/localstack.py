"""The local stack: Azurite, the HTTPS stand-in for Entra ID / Key Vault / Dataverse, and `func start`.

    ./scripts/run-local.sh                 (sets up, then: python -m devstack.localstack)
    ./scripts/run-local.sh --stack-only    Azurite + stand-in + the HTTP routes, without `func`

Without a local.settings.json it writes one that points at the stand-in, so the app runs with no
Azure tenant. With a local.settings.json whose DYNAMICS_URL is a real environment, it starts only
Azurite and the Functions host. `func` is the one on PATH, else the project-local one from npm
(package.json lists it as optional: its installer downloads the host from a CDN, which some networks
refuse). Where neither can be had, --stack-only keeps Azurite and the stand-in running, serves the
HTTP routes through devstack.httphost and drains the `cases`, `leads` and `followups` queues with the
host's queue semantics (devstack/queuehost.py: batches, visibility, dequeue count, poison), so the
README's curl and queue commands can be tried. Everything it started stops with it (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STATE = ROOT / ".local"
SETTINGS = ROOT / "local.settings.json"
AZURITE = ROOT / "node_modules" / ".bin" / "azurite"
STANDIN_PORTS = {"entra": 7441, "vault": 7442, "dataverse": 7443}
AZURITE_PORTS = {"blob": 10000, "queue": 10001, "table": 10002}
QUEUES = ("cases", "leads", "followups", "cases-rejected", "leads-rejected", "followups-rejected", "cases-poison",
          "leads-poison", "followups-poison")
LOCAL_FUNC = ROOT / "node_modules" / ".bin" / "func"

FUNC_MISSING = """\
Azure Functions Core Tools (the `func` command) is not installed, and the project-local install from
npm failed{why}, so the Functions host cannot be started. Either:
  - install version 4, then run ./scripts/run-local.sh again:
      npm install -g azure-functions-core-tools@4 --unsafe-perm true
      (or: macOS `brew tap azure/functions && brew install azure-functions-core-tools@4`;
       Windows `winget install Microsoft.Azure.FunctionsCoreTools`;
       Linux packages: https://learn.microsoft.com/azure/azure-functions/functions-run-local)
  - or run ./scripts/run-local.sh --stack-only: Azurite, the stand-in and the HTTP routes, without func.
Nothing is left running. The test suite needs no `func`: ./scripts/test.sh"""


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


def start_azurite(location: Path, ports: dict[str, int],
                  oauth_tls: tuple[str, str] | None = None) -> subprocess.Popen | None:
    """Azurite on 127.0.0.1 (blob, queue, table); None when one already listens on the queue port.

    With `oauth_tls` (certificate and key PEM paths) it serves HTTPS and accepts Entra ID bearer tokens
    (`--oauth basic`: issuer, audience and lifetime are checked), as a storage account without shared keys."""
    if port_open(ports["queue"]):
        print(f"Azurite already listening on {ports['queue']}: using it")
        return None
    if not AZURITE.exists():
        raise RuntimeError(f"{AZURITE} is missing: run scripts/bootstrap.sh (it installs Azurite from npm)")
    location.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [str(AZURITE), "--location", str(location), "--silent", "--skipApiVersionCheck", "--loose",
         "--blobHost", "127.0.0.1", "--blobPort", str(ports["blob"]), "--queueHost", "127.0.0.1",
         "--queuePort", str(ports["queue"]), "--tableHost", "127.0.0.1", "--tablePort", str(ports["table"]),
         *(["--oauth", "basic", "--cert", oauth_tls[0], "--key", oauth_tls[1]] if oauth_tls else [])],
        stdout=subprocess.DEVNULL)
    if not (wait_port(ports["queue"], 30) and wait_port(ports["blob"], 10)):
        stop(proc)
        raise RuntimeError("Azurite did not start within 30 s")
    return proc


def start_standin(state_dir: Path, ports: dict[str, int]) -> tuple[subprocess.Popen, dict[str, Any]]:
    """The stand-in as its own process (so `func`'s worker talks to it over real sockets)."""
    info_path = state_dir / "standin.json"
    info_path.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "devstack.standin", "--state-dir", str(state_dir),
                             "--entra-port", str(ports["entra"]), "--vault-port", str(ports["vault"]),
                             "--dataverse-port", str(ports["dataverse"])], cwd=ROOT)
    deadline = time.monotonic() + 30
    while not info_path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError("the stand-in did not start (are its ports free?)")
        time.sleep(0.1)
    return proc, json.loads(info_path.read_text())


def standin_settings(info: dict[str, Any], storage: str = "UseDevelopmentStorage=true",
                     callers: str | None = None) -> dict[str, Any]:
    """local.settings.json for the stand-in. AZURE_CLIENT_SECRET is the stand-in's own vault reader.
    `callers` = "entra": callers need a token from the stand-in's Entra ID (INTAKE_CALLER_AUTH=entra)."""
    return {"IsEncrypted": False,
            "Values": {"FUNCTIONS_WORKER_RUNTIME": "python", "AzureWebJobsStorage": storage,
                       **info["settings_env"], **(info["caller_env"] if callers == "entra" else {}),
                       # The seeded account files the cases that name no customer (an anonymous caller) and alerts.
                       "INTAKE_DEFAULT_CUSTOMER_ACCOUNT_ID": info["seed_account_id"],
                       "INTAKE_ALERT_ACCOUNT_ID": info["seed_account_id"]}}


def caller_token(state_dir: Path = STATE / "standin") -> str:
    """An access token for the intake API from the running stand-in, for its local caller (every app role)."""
    import requests

    info = json.loads((state_dir / "standin.json").read_text())
    caller = info["local_caller"]
    resp = requests.post(f"{info['entra_url']}/{info['tenant_id']}/oauth2/v2.0/token", verify=info["ca_path"],
                         timeout=10, data={"grant_type": "client_credentials", "client_id": caller["client_id"],
                                           "client_secret": caller["secret"],
                                           "scope": f"api://{info['api_client_id']}/.default"})
    resp.raise_for_status()
    return resp.json()["access_token"]


def try_it(port: int, entra: bool) -> str:
    """The commands printed once the stack is up; under entra each call carries a token from the stand-in."""
    auth = ' -H "Authorization: Bearer $TOKEN"' if entra else ""
    token = ("  # INTAKE_CALLER_AUTH=entra: a token from the stand-in's Entra ID (client credentials, every app role)\n"
             "  TOKEN=$(.venv/bin/python -m devstack.localstack --token)\n") if entra else ""
    return f"""
Try it, once the host says it is ready:
{token}  curl -s localhost:{port}/api/health
  curl -s -X POST localhost:{port}/api/cases{auth} -H 'Content-Type: application/json' \\
       -d '{{"title": "Caller reports outage", "customer": {{"email": "ada@example.com"}}, "externalId": "call-1"}}'
  .venv/bin/python -m tools.queues send cases \\
       '{{"title": "From the queue", "customer": {{"email": "ada@example.com"}}}}'
  .venv/bin/python -m tools.queues send followups \\
       '{{"op": "note", "entity": "case", "case": {{"externalId": "call-1"}}, "noteId": "n1", "text": "Wrap-up"}}'
  .venv/bin/python -m tools.queues send followups \\
       '{{"op": "resolve", "entity": "case", "case": {{"externalId": "call-1"}}, "resolution": {{"subject": "Done"}}}}'
  curl -s localhost:{port}/api/diagnostics{auth}
"""


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


def find_func(install: bool = True) -> tuple[str | None, str]:
    """`func` from PATH, else the project's own (node_modules/.bin), installed from npm on first need.

    Returns (path or None, why it could not be had)."""
    found = shutil.which("func") or (str(LOCAL_FUNC) if LOCAL_FUNC.exists() else None)
    if found or not install:
        return found, ""
    npm = shutil.which("npm")
    if npm is None:
        return None, " (npm is not installed)"
    print("Azure Functions Core Tools is not installed: trying the project-local install from npm ...")
    try:
        out = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--include=optional", "--loglevel=error"],
                             cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired:
        return None, " (npm did not finish within 10 minutes)"
    if LOCAL_FUNC.exists():
        return str(LOCAL_FUNC), ""
    cause = next((line.removeprefix("npm error ").strip() for line in out.stderr.splitlines()
                  if "ENOTFOUND" in line or "ECONNREFUSED" in line or "ETIMEDOUT" in line or "403" in line), "")
    return None, f" (its installer could not download the host: {cause})" if cause else ""


def drain_queues(conn_str: str, stopping: threading.Event) -> list[threading.Thread]:
    """Threads that drain cases, leads and followups as the host would, until `stopping` is set."""
    from devstack.queuehost import QueueHost
    from triggers import followups_queue, queue_intake

    functions = {"cases": queue_intake.cases_queue, "leads": queue_intake.leads_queue,
                 "followups": followups_queue.followups_queue}

    def loop(name: str, fn: object) -> None:
        host = QueueHost(conn_str, name, fn.build().get_user_function())  # type: ignore[attr-defined]
        seen = (0, 0, 0)
        while not stopping.is_set():
            try:
                host.run(idle_seconds=0.5, max_seconds=5)
            except Exception as exc:  # Azurite went away (Ctrl-C): say so once, try again while running
                print(f"queue {name}: {type(exc).__name__}", flush=True)
            now = (host.stats.succeeded, host.stats.rejected, host.stats.poisoned)
            if now != seen:
                print(f"queue {name}: {now[0]} done, {now[1]} rejected, {now[2]} poisoned", flush=True)
                seen = now
            stopping.wait(0.5)

    threads = [threading.Thread(target=loop, args=item, name=f"drain-{item[0]}", daemon=True)
               for item in functions.items()]
    for t in threads:
        t.start()
    return threads


def serve_stack_only(port: int, seconds: float | None, conn_str: str | None = None) -> int:
    """Keep the stack up, serve the HTTP routes and drain the queues until Ctrl-C (or `seconds`, for tests)."""
    from devstack.httphost import serve

    stopping = threading.Event()
    threads = drain_queues(conn_str, stopping) if conn_str else []
    with serve(port, keys=False) as url:
        print(f"stack ready: HTTP routes at {url} (devstack.httphost, not the Functions host); the cases, leads and "
              "followups queues drained with the host's semantics; Ctrl-C stops everything", flush=True)
        deadline = None if seconds is None else time.monotonic() + seconds
        try:
            while deadline is None or time.monotonic() < deadline:
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
        finally:
            stopping.set()
            for t in threads:
                t.join(timeout=10)
    return 0


def func_env() -> dict[str, str]:
    """The host starts its Python worker from PATH: put the project's venv first."""
    env = dict(os.environ)
    venv = ROOT / ".venv"
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=7071, help="port of the Functions host (or the HTTP routes)")
    parser.add_argument("--stack-only", action="store_true",
                        help="no func: keep Azurite and the stand-in running and serve the HTTP routes")
    parser.add_argument("--settings", type=Path, default=SETTINGS,
                        help="the local.settings.json to use or write (--stack-only; func reads ./local.settings.json)")
    parser.add_argument("--seconds", type=float, default=None, help=argparse.SUPPRESS)  # tests: stop after this
    parser.add_argument("--token", action="store_true",
                        help="print an access token for the intake API from the running stand-in "
                             "(INTAKE_CALLER_AUTH=entra)")
    args = parser.parse_args(argv)
    if args.token:
        print(caller_token())
        return 0
    settings_path: Path = args.settings
    # SIGTERM (a terminal closing, a supervisor) must stop the children too, as Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    func, why = (None, "") if args.stack_only else find_func()
    if func is None and not args.stack_only:
        print(FUNC_MISSING.format(why=why), file=sys.stderr)
        return 2
    procs: list[subprocess.Popen | None] = []
    try:
        procs.append(start_azurite(STATE / "azurite", AZURITE_PORTS))
        from tools.queues import azurite_connection_string

        create_queues(azurite_connection_string(AZURITE_PORTS["queue"]))
        if not settings_path.exists() or uses_standin(settings_path):
            proc, info = start_standin(STATE / "standin", STANDIN_PORTS)
            procs.append(proc)
            if not settings_path.exists():
                mode = os.environ.get("INTAKE_CALLER_AUTH")
                settings_path.write_text(json.dumps(standin_settings(info, callers=mode), indent=2) + "\n")
                print(f"wrote {settings_path.name}: the app talks to the local stand-in (no Azure tenant needed)")
            print(f"stand-in seeded: contact {info['seed_contact_id']}, account {info['seed_account_id']}")
        else:
            target = json.loads(settings_path.read_text())["Values"].get("DYNAMICS_URL")
            print(f"{settings_path.name} points at {target}: no stand-in started (run `az login` so the app can "
                  "read Key Vault)")
        entra = json.loads(settings_path.read_text())["Values"].get("INTAKE_CALLER_AUTH", "").lower() == "entra"
        print(try_it(args.port, entra), flush=True)
        if args.stack_only:
            values = json.loads(settings_path.read_text())["Values"]
            os.environ.update(values)  # as func does: the settings file wins over the shell's environment
            print(f"settings ({settings_path.name}): " + ", ".join(
                f"{k}={v}" for k, v in values.items() if "SECRET" not in k and "AccountKey" not in v), flush=True)
            return serve_stack_only(args.port, args.seconds, values.get("AzureWebJobsStorage"))
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
