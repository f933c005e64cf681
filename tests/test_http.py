"""The HTTP contract, one test per line of it, through func.HttpRequest against the stand-in."""

from __future__ import annotations

import pytest

from shared import instance
from shared.intake import record_id
from triggers import http_intake, ops

CASE = http_intake.create_case
LEAD = http_intake.create_lead


def a_case(si, **extra) -> dict:
    return {"title": "Caller reports outage", "customer": {"contactId": si.seed_contact_id}, **extra}


def assert_error(status, body, want_status, code):
    assert status == want_status, body
    err = body["error"]
    assert err["code"] == code
    assert err["message"] and err["fix"]
    assert err["correlationId"]
    assert "Traceback" not in str(body)
    return err


def test_create_case_201_with_id_and_columns(stack):
    si = stack.si
    status, body, _ = stack.call(CASE, body=a_case(si, description="No dial tone", priority="high", origin="phone",
                                                   attributes={"new_customfield": "x"}))
    assert status == 201
    assert body == {"id": body["id"], "entity": "incident", "created": True}
    (row,) = si.records("incidents")
    assert row["incidentid"] == body["id"]
    assert (row["title"], row["description"], row["prioritycode"], row["caseorigincode"], row["new_customfield"]) == (
        "Caller reports outage", "No dial tone", 1, 1, "x")
    assert row["_customerid_value"] == si.seed_contact_id


def test_repeat_of_external_id_and_source_is_200_same_id(stack):
    si = stack.si
    s1, b1, _ = stack.call(CASE, body=a_case(si, externalId="call-8812", source="genesys"))
    s2, b2, _ = stack.call(CASE, body=a_case(si, externalId="call-8812", source="genesys"))
    assert (s1, s2) == (201, 200)
    assert b1["id"] == b2["id"] == record_id("incident", "genesys", "call-8812")
    assert b2["created"] is False
    assert len(si.records("incidents")) == 1


def test_idempotency_key_header(stack):
    si = stack.si
    s1, b1, _ = stack.call(CASE, body=a_case(si), headers={"Idempotency-Key": "req-77"})
    s2, b2, _ = stack.call(CASE, body=a_case(si), headers={"Idempotency-Key": "req-77"})
    assert (s1, s2, b1["id"]) == (201, 200, b2["id"])
    assert len(si.records("incidents")) == 1


def test_without_a_key_every_call_creates(stack):
    si = stack.si
    ids = {stack.call(CASE, body=a_case(si))[1]["id"] for _ in range(2)}
    assert len(ids) == 2


def test_customer_by_account(stack):
    si = stack.si
    status, body, _ = stack.call(CASE, body={"title": "t", "customer": {"accountId": si.seed_account_id}})
    assert status == 201
    assert si.records("incidents")[0]["_customerid_value"] == si.seed_account_id


def test_400_lists_every_problem(stack):
    status, body, _ = stack.call(CASE, body={"priority": "urgent", "customer": {"email": "nope"}})
    err = assert_error(status, body, 400, "invalid_request")
    assert {d["field"] for d in err["details"]} == {"title", "priority", "customer.email"}
    assert all(set(d) == {"field", "problem"} for d in err["details"])
    assert stack.si.counts["dataverse"]["total"] == 0


def test_415_for_a_body_that_is_not_json(stack):
    status, body, _ = stack.call(CASE, raw=b"title=outage")
    assert_error(status, body, 415, "unsupported_media_type")


def test_413_past_64_kib(stack):
    status, body, _ = stack.call(CASE, raw=b"{" + b" " * (64 * 1024) + b"}")
    assert_error(status, body, 413, "payload_too_large")


@pytest.mark.parametrize(("attrs", "field"), [({"title": "x"}, "attributes.title"),
                                              ({"customerid_account@odata.bind": "/accounts(x)"},
                                               "attributes.customerid_account@odata.bind"),
                                              ({"New_Field": 1}, "attributes.New_Field"),
                                              ({"new_x": {"nested": 1}}, "attributes.new_x")])
def test_attributes_rules(stack, attrs, field):
    status, body, _ = stack.call(CASE, body=a_case(stack.si, attributes=attrs))
    err = assert_error(status, body, 400, "invalid_request")
    assert [d["field"] for d in err["details"]] == [field]


def test_unknown_column_is_502_payload_rejected_with_request_id(stack):
    status, body, _ = stack.call(CASE, body=a_case(stack.si, attributes={"new_nosuchcolumn": "x"}))
    err = assert_error(status, body, 502, "dynamics_payload_rejected")
    assert err["upstreamCode"] == "0x80048d19"
    assert err["requestId"]


def test_unknown_contact_is_502_payload_rejected(stack):
    body = {"title": "t", "customer": {"contactId": "00000000-0000-4000-8000-000000000999"}}
    status, out, _ = stack.call(CASE, body=body)
    assert assert_error(status, out, 502, "dynamics_payload_rejected")["upstreamCode"] == "0x80040217"


def test_missing_privilege_is_502(stack):
    stack.si.revoke_privilege("prvCreateIncident")
    status, body, _ = stack.call(CASE, body=a_case(stack.si))
    err = assert_error(status, body, 502, "dynamics_privilege_missing")
    assert "prvCreateIncident" in err["message"]


def test_throttled_is_503_with_retry_after(stack):
    stack.si.fail_next("dataverse", 1, 429, retry_after=120)
    status, body, resp = stack.call(CASE, body=a_case(stack.si))
    err = assert_error(status, body, 503, "dynamics_throttled")
    assert resp.headers["Retry-After"] == "120"
    assert err["retryAfter"] == 120


def test_key_vault_unreachable_is_503(stack, monkeypatch):
    from tests.azurite import free_port

    monkeypatch.setenv("KEY_VAULT_URL", f"https://127.0.0.1:{free_port()}")
    instance.reset(read_timeout=1.0)
    status, body, resp = stack.call(CASE, body=a_case(stack.si))
    assert_error(status, body, 503, "keyvault_unreachable")
    assert int(resp.headers["Retry-After"]) >= 1


@pytest.mark.parametrize("where", ["/openid-configuration", "/token"])
def test_entra_transient_failure_is_503(stack, where):
    si = stack.si
    assert stack.call(CASE, body=a_case(si))[0] == 201
    si.revoke_tokens()
    si.fail_next("entra", 5, 503, code="temporarily_unavailable", path_contains=where)
    status, body, resp = stack.call(CASE, body=a_case(si))
    assert_error(status, body, 503, "entra_unavailable")
    assert "Retry-After" in resp.headers


def test_missing_setting_is_503_naming_it(stack, monkeypatch):
    monkeypatch.delenv("DYNAMICS_TENANT_ID")
    instance.reset()
    status, body, _ = stack.call(CASE, body=a_case(stack.si))
    err = assert_error(status, body, 503, "config_invalid")
    assert "DYNAMICS_TENANT_ID is required" in err["message"]


def test_unexpected_error_is_500_without_trace(stack, monkeypatch):
    def broken():
        raise RuntimeError("secret-looking internals")

    monkeypatch.setattr(instance, "intake", broken)
    status, body, _ = stack.call(CASE, body=a_case(stack.si))
    assert_error(status, body, 500, "internal_error")
    assert "internals" not in str(body)


def test_create_lead_with_readable_subject(stack):
    status, body, _ = stack.call(LEAD, body={"lastName": "Doe", "firstName": "John", "email": "john@example.com",
                                             "company": "Acme", "externalId": "form-1", "source": "web"})
    assert (status, body["entity"], body["created"]) == (201, "lead", True)
    (row,) = stack.si.records("leads")
    assert (row["leadid"], row["subject"], row["companyname"], row["emailaddress1"]) == (
        body["id"], "John Doe (Acme)", "Acme", "john@example.com")
    status, again, _ = stack.call(LEAD, body={"lastName": "Doe", "externalId": "form-1", "source": "web"})
    assert (status, again["id"], again["created"]) == (200, body["id"], False)


def test_lead_requires_last_name(stack):
    status, body, _ = stack.call(LEAD, route="api/leads", body={"firstName": "J"})
    assert assert_error(status, body, 400, "invalid_request")["details"] == [{"field": "lastName",
                                                                              "problem": "required"}]


def test_health_makes_no_outbound_call(stack):
    status, body, _ = stack.call(ops.health, method="GET", route="api/health")
    assert status == 200
    assert body["status"] == "ok" and body["version"]
    assert set(body) == {"status", "version"}
    assert all(stack.si.counts[s]["total"] == 0 for s in ("entra", "vault", "dataverse"))
