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

from shared import runtime
from tests.azurite import free_port
from tests.hostsim import Context
from tools import localstack
from tools.queues import send

ROOT = Path(__file__).resolve().parent.parent


def test_without_func_the_run_command_says_how_to_install_and_starts_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PATH"}
    env["PATH"] = f"{Path(shutil.which('python3')).parent}:/usr/bin:/bin"  # no func here
    assert shutil.which("func", path=env["PATH"]) is None
    before = subprocess.run(["pgrep", "-f", "azurite|tools.standin"], capture_output=True, text=True,
                            check=False).stdout.split()
    out = subprocess.run([str(ROOT / "scripts" / "run-local.sh")], capture_output=True, text=True, env=env,
                         timeout=60, check=False)
    assert out.returncode == 2
    assert "npm install -g azure-functions-core-tools@4" in out.stderr
    assert "Nothing was started" in out.stderr
    after = subprocess.run(["pgrep", "-f", "azurite|tools.standin"], capture_output=True, text=True,
                           check=False).stdout.split()
    assert set(after) <= set(before)


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
        runtime.reset()
        from triggers import http_intake, ops

        diag = ops.diagnostics.build().get_user_function()
        import azure.functions as func

        report = json.loads(diag(func.HttpRequest("GET", "/api/diagnostics", body=b""), Context()).get_body())
        assert report["status"] == "ok", report
        create = http_intake.create_case.build().get_user_function()
        body = json.dumps({"title": "Local", "customer": {"contactId": info["seed_contact_id"]}}).encode()
        resp = create(func.HttpRequest("POST", "/api/cases", body=body), Context())
        assert resp.status_code == 201
        rows = requests.get(f"{info['dataverse_url']}/_standin/records/incidents", verify=info["ca_path"],
                            timeout=5).json()["value"]
        assert [r["incidentid"] for r in rows] == [json.loads(resp.get_body())["id"]]
    finally:
        runtime.reset()
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
