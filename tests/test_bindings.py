"""The indexed functions: what the host (and the Python worker's indexing) sees."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_INDEXED: dict[str, dict] = {}


def indexed() -> dict[str, dict]:
    """The app's functions, indexed once (an app object may be indexed only once), as the host sees them."""
    if not _INDEXED:
        import importlib

        import function_app

        app = importlib.reload(function_app).app
        for fn in app.get_functions():
            _INDEXED[fn.get_function_name()] = {"fn": fn,
                                                "bindings": [b.get_dict_repr() for b in fn.get_bindings()]}
    return _INDEXED


def test_the_functions_are_indexed():
    assert sorted(indexed()) == ["alert", "cancel_case", "case_note", "cases_queue", "create_case", "create_lead",
                                 "diagnostics", "followups_queue", "health", "lead_note", "leads_queue", "openapi",
                                 "resolve_case", "update_case"]


def binding(functions: dict, name: str, type_: str) -> dict:
    (found,) = [b for b in functions[name]["bindings"] if b["type"] == type_]
    return found


def test_http_routes_methods_and_auth_levels():
    functions = indexed()
    expected = {"create_case": ("cases", ["POST"], "FUNCTION"), "create_lead": ("leads", ["POST"], "FUNCTION"),
                "diagnostics": ("diagnostics", ["GET"], "ADMIN"), "health": ("health", ["GET"], "ANONYMOUS"),
                "openapi": ("openapi.json", ["GET"], "ANONYMOUS"),
                "case_note": ("cases/notes", ["POST"], "FUNCTION"), "lead_note": ("leads/notes", ["POST"], "FUNCTION"),
                "resolve_case": ("cases/resolve", ["POST"], "FUNCTION"),
                "cancel_case": ("cases/cancel", ["POST"], "FUNCTION"),
                "update_case": ("cases/update", ["POST"], "FUNCTION"), "alert": ("alerts", ["POST"], "FUNCTION")}
    for name, (route, methods, level) in expected.items():
        trigger = binding(functions, name, "httpTrigger")
        assert trigger["route"] == route
        assert [str(getattr(m, "value", m)).upper() for m in trigger["methods"]] == methods
        assert str(trigger["authLevel"]).upper().endswith(level)


def test_queue_triggers_and_rejected_outputs():
    functions = indexed()
    for name, queue in (("cases_queue", "cases"), ("leads_queue", "leads"), ("followups_queue", "followups")):
        trigger = binding(functions, name, "queueTrigger")
        assert (trigger["queueName"], trigger["connection"], trigger["direction"].name) == (
            queue, "AzureWebJobsStorage", "IN")
        out = binding(functions, name, "queue")
        assert (out["queueName"], out["connection"], out["direction"].name) == (
            f"{queue}-rejected", "AzureWebJobsStorage", "OUT")


def test_every_parameter_matches_a_binding():
    """What the 3.13+ worker enforces at indexing: each argument is a binding's name, or `context`."""
    for name, info in indexed().items():
        fn = info["fn"]
        params = list(inspect.signature(fn.get_user_function()).parameters)
        names = {b["name"] for b in info["bindings"] if b["name"] != "$return"}
        assert set(params) - {"context"} == names, name
        assert not any(b.get("route", "").count("{") for b in info["bindings"]), "no route parameters"


def test_host_json_queue_settings_are_deliberate():
    host = json.loads((ROOT / "host.json").read_text())
    assert host["extensionBundle"] == {"id": "Microsoft.Azure.Functions.ExtensionBundle", "version": "[4.*, 5.0.0)"}
    queues = host["extensions"]["queues"]
    per_function = queues["batchSize"] + queues["newBatchThreshold"]
    assert 2 * per_function <= 52 - 4, "both queue functions together stay under Dataverse's 52 concurrent requests"
    assert queues["maxDequeueCount"] == 5
    assert queues["visibilityTimeout"] != "00:00:00"
    assert queues["messageEncoding"] == "base64"


def test_importing_the_app_loads_no_azure_sdk():
    import subprocess
    import sys

    code = ("import sys, function_app; heavy = [m for m in sys.modules if m.startswith(('azure.identity', "
            "'azure.keyvault', 'azure.core', 'msal', 'azure.storage'))]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
