"""The Genesys Cloud data actions: their Velocity templates rendered (airspeed) for ordinary and hostile
inputs, posted to the functions, and the answers mapped through the action's own response config."""

from __future__ import annotations

import json
import re
from pathlib import Path

import airspeed
import jsonschema
import pytest

from shared import instance
from tests.test_callers import entra  # noqa: F401 - the entra caller mode fixture
from triggers import followups_http, http_intake

ROOT = Path(__file__).resolve().parent.parent
ACTIONS = {name: json.loads((ROOT / "integrations" / "genesys" / f"{name}.json").read_text())
           for name in ("create-case", "create-lead", "add-note-to-case")}
CONTRACT = json.loads((ROOT / "docs" / "contract.schema.json").read_text())
CREDENTIALS = {"functionAppHost": "intake.example.net", "functionKey": "k3y"}


class Esc:
    """Genesys' $esc.jsonString: the value escaped for use inside a JSON string literal."""

    def jsonString(self, value: object) -> str:  # noqa: N802 - the Velocity tool's name
        return json.dumps("" if value is None else str(value), ensure_ascii=False)[1:-1]


def render(template: str, **context: object) -> str:
    return airspeed.Template(template).merge({"esc": Esc(), "credentials": CREDENTIALS, **context})


def run_action(stack, action: dict, inputs: dict) -> tuple[int, dict]:
    """Render the request as Genesys would, call the function, map the answer as the action's config says."""
    request = action["config"]["request"]
    url = render(request["requestUrlTemplate"], input=inputs)
    headers = {k: render(v, input=inputs) for k, v in request["headers"].items()}
    body = render(request["requestTemplate"], input=inputs)
    template_only = body
    for value in inputs.values():  # an input may itself hold "$input": it is data, never evaluated
        template_only = template_only.replace(Esc().jsonString(value), "")
    assert "$input" not in template_only and "$esc" not in template_only, body
    event = json.loads(body)  # unescaped quotes or newlines would fail here, as they fail the action
    path = url.split("intake.example.net", 1)[1]
    kind = {"/api/cases": "case", "/api/leads": "lead", "/api/cases/notes": "caseNote"}[path]
    ref = {"$ref": f"#/$defs/{kind}", "$defs": CONTRACT["$defs"]}
    jsonschema.Draft202012Validator(ref).validate(event)
    assert headers["x-functions-key"] == CREDENTIALS["functionKey"]
    fn = {"case": http_intake.create_case, "lead": http_intake.create_lead, "caseNote": followups_http.case_note}[kind]
    status, answer, _ = stack.call(fn, route=path.lstrip("/"), raw=body.encode(), headers=headers)
    if status not in (200, 201):
        return status, answer
    response = action["config"]["response"]
    mapped = {name: json.dumps(answer[path.removeprefix("$.")]) for name, path in response["translationMap"].items()}
    output = json.loads(render(response["successTemplate"], **mapped))
    jsonschema.Draft4Validator(action["contract"]["output"]["successSchema"]).validate(output)
    return status, output


def test_exported_actions_follow_the_format():
    for action in ACTIONS.values():
        assert action["integrationType"] == "custom-rest-actions" and action["actionType"] == "custom"
        assert action["config"]["timeoutSeconds"] > http_intake.HTTP_BUDGET  # covers the app's whole budget
        assert 1 <= action["config"]["timeoutSeconds"] <= 60
        inputs = action["contract"]["input"]["inputSchema"]
        jsonschema.Draft4Validator.check_schema(inputs)
        for name, prop in inputs["properties"].items():
            assert re.match(r"^[A-Za-z]", name) and name not in ("orgId", "integrationId", "rawRequest")
            assert prop["type"] in ("string", "integer", "number", "boolean")  # flat, as Architect needs
        assert "${credentials.functionKey}" in action["config"]["request"]["headers"]["x-functions-key"]


HOSTILE = ['He said "no dial tone"', "back\\slash \\\" \\n", "line one\nline two\r\n\ttabbed",
           "Привет, 東京 — ünïcödé", "#if($x) $input.title ${y} #end", "'; DROP TABLE incidents; --"]


@pytest.mark.parametrize("text", ["Caller reports outage", *HOSTILE])
def test_case_action_with_ordinary_and_hostile_text(stack, text):
    inputs = {"title": text[:200], "description": text, "priority": "high", "customerEmail": "ada@example.com",
              "customerFirstName": text[:50], "conversationId": "c0nv-" + str(abs(hash(text)))}
    status, out = run_action(stack, ACTIONS["create-case"], inputs)
    assert status == 201, out
    (row,) = stack.si.records("incidents")
    assert row["title"] == text[:200].strip() and row["description"] == text.strip()
    assert out == {"caseId": row["incidentid"], "created": True}


def test_empty_optionals_render_as_absent(stack):
    inputs = {"title": "t", "description": "", "priority": "", "customerContactId": "", "customerEmail": "",
              "customerPhone": "+1 (555) 0100", "customerLastName": "Lovelace", "conversationId": "conv-2"}
    status, out = run_action(stack, ACTIONS["create-case"], inputs)
    assert status == 201, out
    (row,) = stack.si.records("incidents")
    assert row["_customerid_value"] == stack.si.seed_contact_id and row["prioritycode"] == 2
    status, out = run_action(stack, ACTIONS["create-case"], {"title": "t", "conversationId": "conv-3",
                                                             "customerContactId": stack.si.seed_contact_id})
    assert status == 201, out


def test_the_same_conversation_twice_is_one_case(stack):
    inputs = {"title": "Outage", "customerEmail": "ada@example.com", "conversationId": "conv-twice"}
    first = run_action(stack, ACTIONS["create-case"], inputs)
    second = run_action(stack, ACTIONS["create-case"], inputs)
    assert (first[0], second[0]) == (201, 200)
    assert first[1]["caseId"] == second[1]["caseId"] and second[1]["created"] is False
    assert len(stack.si.records("incidents")) == 1


def test_lead_action(stack):
    inputs = {"lastName": 'O"Brien', "firstName": "Séan", "email": "sean@example.com", "company": "",
              "subject": "Wants a quote\nfor 3 seats", "conversationId": "conv-lead"}
    status, out = run_action(stack, ACTIONS["create-lead"], inputs)
    assert status == 201, out
    (row,) = stack.si.records("leads")
    assert (row["lastname"], out["leadId"]) == ('O"Brien', row["leadid"])
    assert run_action(stack, ACTIONS["create-lead"], inputs)[0] == 200


# ---- the OAuth variant (INTAKE_CALLER_AUTH=entra): a "User Defined (OAuth)" credential ---------------------------
OAUTH = {name: json.loads((ROOT / "integrations" / "genesys" / "oauth" / f"{name}.json").read_text())
         for name in ("custom-auth", "create-case", "create-lead")}


class EscUrl(Esc):
    def url(self, value: object) -> str:
        from urllib.parse import quote

        return quote("" if value is None else str(value), safe="")


def test_oauth_actions_are_the_key_actions_with_a_bearer_token():
    for name in ("create-case", "create-lead"):
        keyed, oauth = ACTIONS[name]["config"]["request"], OAUTH[name]["config"]["request"]
        assert oauth["headers"] == {"Authorization": "Bearer ${authResponse.access_token}",
                                    "Content-Type": "application/json"}
        assert {k: v for k, v in oauth.items() if k != "headers"} == {k: v for k, v in keyed.items() if k != "headers"}
        assert OAUTH[name]["contract"] == ACTIONS[name]["contract"]


@pytest.mark.parametrize("name", ["create-case", "create-lead"])
def test_oauth_custom_auth_gets_a_token_from_entra_and_the_action_sends_it(entra, name):  # noqa: F811
    """The custom auth action rendered with the credential's fields and posted to the stand-in's Entra ID over its
    socket; its answer is ${authResponse}; the data action rendered with it is let in by the app (entra mode)."""
    import requests

    si = entra.si
    caller = si.add_caller(["Cases.Create", "Leads.Create"])
    credentials = {"loginHost": si.entra_url.removeprefix("https://"), "tenantId": si.tenant_id,
                   "clientId": caller["client_id"], "clientSecret": caller["secret"],
                   "apiClientId": si.api_client_id, "functionAppHost": "intake.example.net"}
    auth = OAUTH["custom-auth"]["config"]["request"]
    context = {"esc": EscUrl(), "credentials": credentials}
    url = airspeed.Template(auth["requestUrlTemplate"]).merge(context)
    form = airspeed.Template(auth["requestTemplate"]).merge(context)
    resp = requests.post(url, data=form, headers=auth["headers"], verify=si.ca_path, timeout=10)
    assert resp.status_code == 200, resp.text
    auth_response = resp.json()
    jsonschema.Draft4Validator(OAUTH["custom-auth"]["contract"]["output"]["successSchema"]).validate(auth_response)
    action = OAUTH[name]
    request = action["config"]["request"]
    inputs = ({"title": "Outage", "customerEmail": "ada@example.com", "conversationId": "conv-oauth"}
              if name == "create-case" else {"lastName": "Doe", "conversationId": "conv-oauth"})
    ctx = {"esc": Esc(), "credentials": credentials, "input": inputs, "authResponse": auth_response}
    headers = {k: airspeed.Template(v).merge(ctx) for k, v in request["headers"].items()}
    assert headers["Authorization"] == f"Bearer {auth_response['access_token']}"
    body = airspeed.Template(request["requestTemplate"]).merge(ctx)
    fn = http_intake.create_case if name == "create-case" else http_intake.create_lead
    status, answer, _ = entra.call(fn, route=f"api/{name.split('-')[1]}s", raw=body.encode(), headers=headers)
    assert status == 201, answer
    status, answer, _ = entra.call(fn, route=f"api/{name.split('-')[1]}s", raw=body.encode(),
                                   headers={"Content-Type": "application/json"})
    assert status == 401 and answer["error"]["code"] == "caller_token_missing"
def test_case_action_with_only_its_required_inputs_files_the_case_under_the_default_account(stack, monkeypatch):
    inputs = {"title": "Caller withheld the number", "conversationId": "conv-anon"}
    status, out = run_action(stack, ACTIONS["create-case"], inputs)
    assert status == 400 and out["error"]["details"] == [{"field": "customer", "problem": "required"}]
    monkeypatch.setenv("INTAKE_DEFAULT_CUSTOMER_ACCOUNT_ID", stack.si.seed_account_id)
    instance.reset(read_timeout=1.0, backoff=0.05)
    status, out = run_action(stack, ACTIONS["create-case"], inputs)
    assert status == 201, out
    (row,) = stack.si.records("incidents")
    assert (out["caseId"], row["_customerid_value"]) == (row["incidentid"], stack.si.seed_account_id)


@pytest.mark.parametrize("text", ["Refund promised; callback Friday.", *HOSTILE])
def test_add_note_action_adds_the_wrap_up_once(stack, text):
    case_inputs = {"title": "Outage", "customerEmail": "ada@example.com", "conversationId": "conv-note"}
    assert run_action(stack, ACTIONS["create-case"], case_inputs)[0] == 201
    inputs = {"conversationId": "conv-note", "noteId": "conv-note-wrapup", "subject": "", "text": text}
    status, out = run_action(stack, ACTIONS["add-note-to-case"], inputs)
    assert status == 201, out
    (row,) = stack.si.records("annotations")
    assert (out["noteId"], out["caseId"], out["created"]) == (row["annotationid"], row["_objectid_value"], True)
    assert row["notetext"] == text.strip() and row["subject"] == "Note"
    assert run_action(stack, ACTIONS["add-note-to-case"], inputs)[:1] == (200,)
    assert len(stack.si.records("annotations")) == 1
