"""The local run: the pieces `./scripts/run-local.sh` starts, and the end-to-end run with `func` where it exists."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from devstack import localstack
from shared import instance
from tests.azurite import free_port
from tests.hostsim import Context
from tools.queues import send

ROOT = Path(__file__).resolve().parent.parent


def no_func_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PATH"}
    env["PATH"] = f"{Path(shutil.which('python3')).parent}:{Path(shutil.which('npm')).parent}:/usr/bin:/bin"
    assert shutil.which("func", path=env["PATH"]) is None
    return env


def running() -> set[str]:
    return set(subprocess.run(["pgrep", "-f", "azurite|devstack.standin"], capture_output=True, text=True,
                              check=False).stdout.split())


@pytest.mark.skipif(shutil.which("func") is not None or localstack.LOCAL_FUNC.exists(),
                    reason="Azure Functions Core Tools is installed here: nothing to show without it")
def test_without_func_the_run_command_sets_up_tries_npm_and_says_what_to_do(tmp_path):
    before = running()
    out = subprocess.run([str(ROOT / "scripts" / "run-local.sh"), "--settings", str(tmp_path / "s.json")],
                         capture_output=True, text=True, env=no_func_env(), timeout=600, check=False)
    assert out.returncode == 2, out.stderr
    assert "trying the project-local install from npm" in out.stdout
    assert "npm install -g azure-functions-core-tools@4" in out.stderr
    assert "--stack-only" in out.stderr and "Nothing is left running" in out.stderr
    assert "Traceback" not in out.stderr
    assert (ROOT / ".venv" / "bin" / "python").exists() and localstack.AZURITE.exists()  # it set up first
    assert running() <= before


def test_stack_only_keeps_azurite_and_the_stand_in_and_serves_the_routes(tmp_path):
    """Where func cannot be had: the README's curl and queue commands work against the running stack."""
    port = free_port()
    settings = tmp_path / "local.settings.json"
    proc = subprocess.Popen([str(ROOT / "scripts" / "run-local.sh"), "--stack-only", "--port", str(port),
                             "--settings", str(settings), "--seconds", "60"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=no_func_env())
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("stack ready"):
                break
        assert any(line.startswith("stack ready") for line in lines), "".join(lines)
        values = json.loads(settings.read_text())["Values"]
        assert values["DYNAMICS_URL"].startswith("https://127.0.0.1:")
        assert requests.get(f"http://127.0.0.1:{port}/api/health", timeout=5).json()["status"] == "ok"
        resp = requests.post(f"http://127.0.0.1:{port}/api/cases", timeout=20,
                             json={"title": "Caller reports outage", "customer": {"email": "ada@example.com"},
                                   "externalId": "call-1"})
        assert resp.status_code in (200, 201), resp.text
        assert requests.get(f"http://127.0.0.1:{port}/api/diagnostics", timeout=20).json()["status"] == "ok"
        env = {**os.environ, "AZURE_STORAGE_CONNECTION_STRING": values["AzureWebJobsStorage"]}
        sent = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "tools.queues", "send", "cases",
                               '{"title": "From the queue", "customer": {"email": "ada@example.com"}}'],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
        assert sent.returncode == 0, sent.stderr
        # The queues are drained with the host's semantics: a message becomes a case, then a resolution.
        def queued(queue: str, body: dict) -> None:
            out = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "tools.queues", "send", queue,
                                  json.dumps(body)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
                                 check=False)
            assert out.returncode == 0, out.stderr

        def probe(want: int) -> int:  # an update that changes nothing: 404 until the case exists, 409 once resolved
            status = 0
            until = time.monotonic() + 30
            while status != want and time.monotonic() < until:
                status = requests.post(f"http://127.0.0.1:{port}/api/cases/update", timeout=20, json={
                    "case": {"externalId": "queued-1"}, "changes": {"priority": "normal"}}).status_code
                time.sleep(0.3)
            return status

        queued("followups", {"op": "resolve", "entity": "case", "case": {"externalId": "queued-1"},
                             "resolution": {"subject": "Done"}})  # before its case: deferred, then applied
        queued("cases", {"title": "Queued, no customer", "externalId": "queued-1"})  # the seeded default account
        assert probe(409) == 409
        replay = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "tools.queues", "replay", "cases"],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
        assert (replay.returncode, replay.stdout.strip()) == (0, "moved 0 message(s)"), replay.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_stand_in_process_and_written_settings_make_a_working_app(tmp_path, monkeypatch):
    """What run-local.sh does before `func start`: the stand-in process, then local.settings.json from it."""
    ports = {"entra": free_port(), "vault": free_port(), "dataverse": free_port()}
    proc, info = localstack.start_standin(tmp_path / "standin", ports)
    try:
        settings = localstack.standin_settings(info)
        path = tmp_path / "local.settings.json"
        path.write_text(json.dumps(settings))
        assert localstack.uses_standin(path)
        assert settings["Values"]["AzureWebJobsStorage"] == "UseDevelopmentStorage=true"
        for name, value in settings["Values"].items():
            monkeypatch.setenv(name, value)
        instance.reset()
        from triggers import http_intake, ops

        diag = ops.diagnostics.build().get_user_function()
        import azure.functions as func

        report = json.loads(diag(func.HttpRequest("GET", "/api/diagnostics", body=b""), Context()).get_body())
        assert all(step["status"] == "ok" for step in report["steps"]), report
        # UseDevelopmentStorage=true: Azurite on 10001 answers only if a local run is up; either way it is named.
        assert report["queues"]["status"] == "ok" or report["queues"]["code"] == "queue_storage_unreachable"
        create = http_intake.create_case.build().get_user_function()
        body = json.dumps({"title": "Local", "customer": {"contactId": info["seed_contact_id"]}}).encode()
        resp = create(func.HttpRequest("POST", "/api/cases", body=body), Context())
        assert resp.status_code == 201
        rows = requests.get(f"{info['dataverse_url']}/_standin/records/incidents", verify=info["ca_path"],
                            timeout=5).json()["value"]
        assert [r["incidentid"] for r in rows] == [json.loads(resp.get_body())["id"]]
    finally:
        instance.reset()
        localstack.stop(proc)
    assert proc.returncode is not None


@pytest.mark.skipif(shutil.which("func") is None,
                    reason="Azure Functions Core Tools (func) is not installed: "
                           "npm install -g azure-functions-core-tools@4")
def test_end_to_end_with_func(tmp_path, azurite):
    """func start against Azurite and the stand-in: a case over HTTP and one through the queue."""
    ports = {"entra": free_port(), "vault": free_port(), "dataverse": free_port()}
    proc, info = localstack.start_standin(tmp_path / "standin", ports)
    app = tmp_path / "app"
    shutil.copytree(ROOT, app, ignore=shutil.ignore_patterns(".venv", "node_modules", ".git", ".local", "tests",
                                                             "local.settings.json", "__pycache__"))
    (app / "local.settings.json").write_text(json.dumps(localstack.standin_settings(info, azurite.connection_string)))
    port = free_port()
    host = subprocess.Popen([shutil.which("func"), "start", "--port", str(port)], cwd=app, env=localstack.func_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(1)
        resp = requests.post(f"http://127.0.0.1:{port}/api/cases", timeout=30,
                             json={"title": "e2e http", "customer": {"contactId": info["seed_contact_id"]}})
        assert resp.status_code == 201, resp.text
        send(azurite.connection_string, "cases", {"title": "e2e queue", "customer": {"email": "e2e@example.com"}})
        titles: set[str] = set()
        while time.monotonic() < deadline and titles != {"e2e http", "e2e queue"}:
            rows = requests.get(f"{info['dataverse_url']}/_standin/records/incidents", verify=info["ca_path"],
                                timeout=5).json()["value"]
            titles = {r["title"] for r in rows}
            time.sleep(1)
        assert titles == {"e2e http", "e2e queue"}
    finally:
        localstack.stop(host)
        localstack.stop(proc)


def test_local_run_in_entra_caller_mode_prints_and_gets_a_working_token(tmp_path, monkeypatch):
    """INTAKE_CALLER_AUTH=entra set for the first run: local.settings.json carries the caller settings, the printed
    commands fetch a token (python -m devstack.localstack --token) and send it, and the app lets exactly that in."""
    from shared import caller_tokens, callers

    ports = {"entra": free_port(), "vault": free_port(), "dataverse": free_port()}
    proc, info = localstack.start_standin(tmp_path / "standin", ports)
    try:
        values = localstack.standin_settings(info, callers="entra")["Values"]
        assert values["INTAKE_CALLER_AUTH"] == "entra" and values["INTAKE_API_CLIENT_ID"] == info["api_client_id"]
        printed = localstack.try_it(7071, entra=True)
        assert "TOKEN=$(.venv/bin/python -m devstack.localstack --token)" in printed
        assert printed.count('-H "Authorization: Bearer $TOKEN"') == 2
        assert "Authorization" not in localstack.try_it(7071, entra=False)
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(callers, "MODE", "entra")
        instance.reset()
        token = localstack.caller_token(tmp_path / "standin")
        import azure.functions as func

        from triggers import http_intake

        create = http_intake.create_case.build().get_user_function()
        body = json.dumps({"title": "Local", "customer": {"contactId": info["seed_contact_id"]}}).encode()
        assert create(func.HttpRequest("POST", "/api/cases", body=body), Context()).status_code == 401
        resp = create(func.HttpRequest("POST", "/api/cases", body=body, headers={"Authorization": f"Bearer {token}"}),
                      Context())
        assert resp.status_code == 201, resp.get_body()
    finally:
        instance.reset()
        caller_tokens.reset()
        localstack.stop(proc)
