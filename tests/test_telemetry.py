"""Telemetry through the real Azure Monitor exporter, into a local ingestion stand-in (issue 14).

The app runs in a child process (OpenTelemetry's providers are global, once per process) with
APPLICATIONINSIGHTS_CONNECTION_STRING pointing at devstack/standin/ingestion.py; cases and leads go
through the functions' own entry points against the Dataverse stand-in; then what was received is
compared with what the stand-in counted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from devstack.standin.ingestion import Ingestion

ROOT = Path(__file__).resolve().parent.parent
PERSONAL = ("Private.Person@example.com", "private.person@example.com", "+49 30 1234567", "+49301234567",
            "Privatus", "Secret Title 7781", "Confidential description 5521", "Leadson", "lead.person@example.com")

DRIVE = r'''
import json, logging, sys
logging.getLogger().setLevel(logging.INFO)  # as the Functions worker does with host.json's "Function": "Information"
import azure.functions as func
import function_app  # configures telemetry: the connection string is set
from shared import telemetry
from devstack.invocation import Context, Out
from azure.functions.queue import QueueMessage
from triggers import http_intake, queue_intake

contact = sys.argv[1]
case = http_intake.create_case.build().get_user_function()
lead = http_intake.create_lead.build().get_user_function()
queue = queue_intake.cases_queue.build().get_user_function()
statuses = []
def post(fn, body, route):
    resp = fn(func.HttpRequest("POST", "/api/" + route, body=json.dumps(body).encode()), Context())
    statuses.append(resp.status_code)
post(case, {"title": "Secret Title 7781", "description": "Confidential description 5521",
            "customer": {"email": "Private.Person@example.com", "firstName": "Privatus"}, "externalId": "t-1"}, "cases")
post(case, {"title": "Secret Title 7781", "description": "Confidential description 5521",
            "customer": {"email": "Private.Person@example.com", "firstName": "Privatus"}, "externalId": "t-1"}, "cases")
post(case, {"title": "Secret Title 7781", "customer": {"phone": "+49 30 1234567", "lastName": "Privatus"}}, "cases")
post(case, {"title": "", "customer": {"contactId": contact}}, "cases")
post(lead, {"lastName": "Leadson", "email": "lead.person@example.com"}, "leads")
message = json.dumps({"title": "Secret Title 7781", "customer": {"contactId": contact}}).encode()
queue(QueueMessage(id="m-1", body=message, dequeue_count=1), Out(), Context())
if len(sys.argv) > 2 and sys.argv[2] == "storm":  # Dataverse refuses one request for the request budget, then a burst
    import threading
    from shared import instance
    instance.intake().client.batches.engage(0.1)
    burst = [threading.Thread(target=post, args=(case, {"title": f"storm {i}", "customer": {"contactId": contact}},
                                                   "cases")) for i in range(8)]
    [t.start() for t in burst]
    [t.join() for t in burst]
telemetry.get().flush()
otel = sorted(m for m in sys.modules if m.startswith(("opentelemetry", "azure.monitor")))
print("RESULT " + json.dumps({"statuses": statuses, "enabled": telemetry.get().enabled, "otel_modules": otel[:3]}))
'''


def run_app(standin, extra_env: dict[str, str], *args: str) -> dict:
    env = {**os.environ, **standin.settings_env(), **extra_env, "PYTHONPATH": str(ROOT)}
    for name in ("APPLICATIONINSIGHTS_CONNECTION_STRING", "OTEL_EXPORTER_OTLP_ENDPOINT", "INTAKE_TELEMETRY_CONSOLE"):
        if name not in extra_env:
            env.pop(name, None)
    out = subprocess.run([sys.executable, "-c", DRIVE, standin.seed_contact_id, *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    result["stdout"] = out.stdout
    return result


def test_without_a_target_no_opentelemetry_module_is_imported(standin):
    result = run_app(standin, {})
    assert result["enabled"] is False
    assert result["otel_modules"] == []
    assert result["statuses"] == [201, 200, 201, 400, 201]


def test_console_telemetry_for_a_local_look(standin):
    result = run_app(standin, {"INTAKE_TELEMETRY_CONSOLE": "true"}, "storm")
    assert result["enabled"] is True
    assert '"name": "intake.http incident"' in result["stdout"]  # the invocation spans, printed
    assert '"intake.outcome": "created"' in result["stdout"]
    assert "private.person@example.com" not in result["stdout"].lower()
    batches = standin.counts["dataverse"].get(("POST", "batch"), 0)
    assert batches >= 1  # the storm's creates went in $batch requests...
    assert '"name": "intake.dataverse.batch_records"' in result["stdout"]  # ...and the operator sees it


def metric_sums(ingestion: Ingestion, name: str) -> Counter:
    sums: Counter = Counter()
    for env in ingestion.of_type("MetricData"):
        data = env["data"]["baseData"]
        for metric in data["metrics"]:
            if metric["name"] == name:
                props = data.get("properties", {})
                sums[(props.get("intake.trigger"), props.get("intake.outcome"))] += metric["value"]
    return sums


def test_traces_metrics_and_logs_reach_application_insights_without_personal_data(standin):
    si = standin
    with Ingestion(si.tls.cert_path, si.tls.key_path) as ingestion:
        result = run_app(si, {"APPLICATIONINSIGHTS_CONNECTION_STRING": ingestion.connection_string(),
                              "APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL": "true",
                              "OTEL_TRACES_SAMPLER": "always_on"})
        assert result["enabled"] is True and result["statuses"] == [201, 200, 201, 400, 201]
        dataverse_requests = si.counts["dataverse"]["total"]
        host = si.dataverse_url.split("://", 1)[1]
        deps = [e["data"]["baseData"] for e in ingestion.of_type("RemoteDependencyData")
                if host in e["data"]["baseData"].get("target", "") + e["data"]["baseData"].get("data", "")]
        assert len(deps) == dataverse_requests, (len(deps), dataverse_requests)
        assert all(d.get("properties", {}).get("dataverse.service_request_id") for d in deps), deps[:2]
        assert not [d for d in deps if "?" in d.get("data", "")], "a URL was recorded with its query string"
        created = len(si.records("incidents")) + len(si.records("leads"))
        sums = metric_sums(ingestion, "intake.records")
        assert sums[("http", "created")] + sums[("queue", "created")] == created == 4
        assert (sums[("http", "existed")], sums[("http", "rejected")]) == (1, 1)
        requests_ = ingestion.of_type("RequestData")
        outcomes = Counter(r["data"]["baseData"]["properties"].get("intake.outcome") for r in requests_)
        assert outcomes == {"created": 4, "existed": 1, "rejected": 1}, outcomes
        logs = [e["data"]["baseData"] for e in ingestion.of_type("MessageData")]
        done = [m for m in logs if m["message"].startswith("intake done")]
        assert done and all(m["properties"].get("intake.record_id") for m in done)
        failed = [m for m in logs if m["message"].startswith("intake failed")]
        assert [m["properties"]["intake.code"] for m in failed] == ["invalid_request"]
        everything = "\n".join(ingestion.raw)
        leaked = [p for p in (*PERSONAL, si.dynamics_secret, si.kv_secret, *si.issued_tokens) if p in everything]
        assert not leaked, leaked


FAILING = r'''
import json, logging, sys
logging.getLogger().setLevel(logging.INFO)
import azure.functions as func
import function_app
from shared import telemetry
from devstack.invocation import Context, TraceContext
from triggers import http_intake

case = http_intake.create_case.build().get_user_function()
host = TraceContext(trace_parent=sys.argv[1], trace_state="host=1") if len(sys.argv) > 1 else None
body = {"title": "t", "customer": {"email": "Private.Person@example.com", "firstName": "Privatus"}}
resp = case(func.HttpRequest("POST", "/api/cases", body=json.dumps(body).encode()), Context(trace_context=host))
telemetry.get().flush()
print("RESULT " + json.dumps({"status": resp.status_code, "code": json.loads(resp.get_body())["error"]["code"]
                              if resp.status_code >= 400 else None}))
'''
EMAIL_FORMS = ("private.person@example.com", "private.person%40example.com", "private.person%2540example.com",
               "%27private.person", "'private.person", "''private.person", "private.person\\u0040example")


def run_with_ingestion(si, script: str, *args: str) -> tuple[dict, Ingestion]:
    ingestion = Ingestion(si.tls.cert_path, si.tls.key_path)
    with ingestion:
        env = {**os.environ, **si.settings_env(), "PYTHONPATH": str(ROOT),
               "APPLICATIONINSIGHTS_CONNECTION_STRING": ingestion.connection_string(),
               "APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL": "true", "OTEL_TRACES_SAMPLER": "always_on"}
        for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "INTAKE_TELEMETRY_CONSOLE"):
            env.pop(name, None)
        out = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT ")), ingestion


def test_a_connection_error_on_a_contact_lookup_reaches_application_insights_without_the_email(standin):
    si = standin
    si.close_listener("dataverse")  # the token comes from Entra ID; the lookup meets a refused connection
    result, ingestion = run_with_ingestion(si, FAILING)
    assert result == {"status": 503, "code": "dynamics_unavailable"}
    exceptions = [x for e in ingestion.of_type("ExceptionData") for x in e["data"]["baseData"]["exceptions"]]
    assert any(x["typeName"].endswith("ConnectionError") for x in exceptions), exceptions  # still recorded...
    everything = "\n".join(ingestion.raw).lower()
    leaked = [form for form in EMAIL_FORMS if form.lower() in everything]
    assert not leaked, leaked  # ...without the email, in any encoding
    assert "privatus" not in everything
    assert any("/api/data/v9.2/contacts?[query removed]" in x["message"] for x in exceptions), exceptions


def test_the_invocation_continues_the_hosts_trace_with_its_dataverse_calls(standin):
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    result, ingestion = run_with_ingestion(standin, FAILING, f"00-{trace_id}-{parent_id}-01")
    assert result["status"] == 201
    (request,) = ingestion.of_type("RequestData")
    assert request["tags"]["ai.operation.id"] == trace_id  # one operation in Application Insights...
    assert request["tags"]["ai.operation.parentId"] == parent_id  # ...under the host's span
    host = standin.dataverse_url.split("://", 1)[1]
    deps = [e for e in ingestion.of_type("RemoteDependencyData") if e["data"]["baseData"].get("target") == host]
    assert len(deps) >= 3, len(deps)  # the lookup (in a single-flight thread), the contact and the case
    assert {d["tags"]["ai.operation.id"] for d in deps} == {trace_id}, [d["tags"] for d in deps]


def test_scrub_removes_queries_literals_and_emails_in_every_form():
    from shared.scrub import scrub

    texts = ("GET https://x.example/api/data/v9.2/contacts?%24filter=emailaddress1+eq+%27o%27%27brien%40ex.com%27"
             " failed",
             "lookup contacts $filter=telephone1 eq '+49 30 1234567' or emailaddress1 eq 'o''brien@ex.com'",
             "url: /contacts?$filter=mobilephone eq '+4930123' (Caused by X)", "mail O.Brien%40Ex.com")
    out = [scrub(t) for t in texts]
    assert not [o for o in out if any(p in o.lower() for p in ("brien", "1234567", "4930123", "%40"))], out
    assert out[0].startswith("GET https://x.example/api/data/v9.2/contacts?[query removed] failed")
    assert out[2].endswith("(Caused by X)")  # the rest of the message stays readable


FOLLOWUPS = r'''
import json, logging, sys
logging.getLogger().setLevel(logging.INFO)
import azure.functions as func
import function_app
from shared import telemetry
from devstack.invocation import Context
from triggers import followups_http, http_intake

def post(fn, body):
    fn = fn.build().get_user_function()
    return fn(func.HttpRequest("POST", "/api/x", body=json.dumps(body).encode()), Context()).status_code

ref = {"externalId": "t-9", "source": "tel"}
case = {"title": "Secret Title 7781", "customer": {"contactId": sys.argv[1]}, **ref}
statuses = [post(http_intake.create_case, case)]
note = {"case": ref, "noteId": "n-1", "text": "Confidential description 5521"}
statuses += [post(followups_http.case_note, note), post(followups_http.case_note, note)]
statuses += [post(followups_http.resolve_case, {"case": ref, "resolution": {"subject": "done"}})]
statuses += [post(followups_http.update_case, {"case": ref, "changes": {"priority": "low"}})]
telemetry.get().flush()
print("RESULT " + json.dumps({"statuses": statuses}))
'''


def test_follow_ups_are_counted_per_operation_and_outcome(standin):
    result, ingestion = run_with_ingestion(standin, FOLLOWUPS, standin.seed_contact_id)
    assert result["statuses"] == [201, 201, 200, 200, 409]
    sums: Counter = Counter()
    for env in ingestion.of_type("MetricData"):
        data = env["data"]["baseData"]
        for metric in data["metrics"]:
            if metric["name"] == "intake.records":
                props = data.get("properties", {})
                sums[(props.get("intake.entity"), props.get("intake.outcome"))] += metric["value"]
    assert {k: v for k, v in sums.items() if k[0] != "incident"} == {
        ("incident.note", "created"): 1, ("incident.note", "existed"): 1, ("incident.resolve", "created"): 1,
        ("incident.update", "rejected"): 1}, sums
    everything = "\n".join(ingestion.raw)
    assert "Confidential description 5521" not in everything and "Secret Title 7781" not in everything
