"""Follow-ups over HTTP (issue 22): notes, resolve, cancel and update on the record an event made, each exactly
once, through the functions' entry points against the stand-in over HTTPS."""

from __future__ import annotations

import base64

import pytest

from shared import instance
from shared.followups import note_id, resolution_id
from shared.intake import record_id
from tests.test_http import assert_error
from triggers import followups_http as F
from triggers import http_intake

REF = {"externalId": "call-1", "source": "genesys"}


def make_case(stack, ref=REF, **extra):
    body = {"title": "Printer on fire", "customer": {"contactId": stack.si.seed_contact_id}, **ref, **extra}
    status, got, _ = stack.call(http_intake.create_case, body=body)
    assert status in (200, 201), got
    return got["id"]


def case_row(stack, rid):
    (row,) = [r for r in stack.si.records("incidents") if r["incidentid"] == rid]
    return row


def note(**extra):
    return {"case": REF, "noteId": "wrap-1", "subject": "Wrap-up", "text": "Customer called back.", **extra}


FILE = {"fileName": "transcript.txt", "mimeType": "text/plain", "contentBase64": base64.b64encode(b"hi there").decode()}


def test_note_by_key_is_created_once_and_a_different_one_under_its_id_conflicts(stack):
    rid = make_case(stack)
    status, first, _ = stack.call(F.case_note, route="api/cases/notes", body=note(attachment=FILE))
    assert status == 201, first
    assert first == {"id": note_id(rid, "wrap-1"), "entity": "annotation", "created": True, "recordId": rid}
    status, again, _ = stack.call(F.case_note, route="api/cases/notes", body=note(attachment=FILE))
    assert (status, again["id"], again["created"]) == (200, first["id"], False)
    (row,) = stack.si.records("annotations")
    assert (row["_objectid_value"], row["notetext"], row["filename"], row["filesize"]) == (
        rid, "Customer called back.", "transcript.txt", 8)
    for other in (note(text="Something else."), note(attachment={**FILE, "fileName": "other.txt"}),
                  note(attachment={**FILE, "contentBase64": base64.b64encode(b"hi there!").decode()}), note()):
        status, body, _ = stack.call(F.case_note, route="api/cases/notes", body=other)
        assert assert_error(status, body, 409, "idempotency_conflict")["recordId"] == first["id"]
    by_id = {**note(attachment=FILE), "case": {"id": rid}}  # the same note named by the record's id
    status, body, _ = stack.call(F.case_note, route="api/cases/notes", body=by_id)
    assert (status, body["id"]) == (200, first["id"])
    assert len(stack.si.records("annotations")) == 1


def test_note_on_a_missing_record_is_404_and_lead_notes_work(stack):
    status, body, _ = stack.call(F.case_note, route="api/cases/notes", body=note())
    assert assert_error(status, body, 404, "record_not_found")["recordId"] == record_id("incident", "genesys", "call-1")
    assert stack.si.records("annotations") == []
    status, lead, _ = stack.call(http_intake.create_lead, route="api/leads",
                                 body={"lastName": "Doe", "externalId": "form-9"})
    status, got, _ = stack.call(F.lead_note, route="api/leads/notes",
                                body={"lead": {"externalId": "form-9"}, "noteId": "n1", "text": "Asked for a demo."})
    assert status == 201, got
    (row,) = stack.si.records("annotations")
    assert (row["_objectid_value"], row["objecttypecode"]) == (lead["id"], "lead")


def test_attachment_limits_ours_before_any_call_and_dataverses_own_codes(stack, monkeypatch):
    make_case(stack)
    monkeypatch.setenv("INTAKE_NOTE_MAX_BYTES", "12")
    instance.reset(read_timeout=1.0, backoff=0.05)
    instance.settings()  # the token and settings are not what is measured
    stack.si.reset_counters()
    big = {**FILE, "contentBase64": base64.b64encode(b"0123456789abc").decode()}  # 20 characters
    status, body, _ = stack.call(F.case_note, route="api/cases/notes", body=note(attachment=big))
    assert_error(status, body, 413, "attachment_too_large")
    assert stack.si.counts["dataverse"]["total"] == 0
    monkeypatch.setenv("INTAKE_NOTE_MAX_BYTES", "5242880")
    instance.reset(read_timeout=1.0, backoff=0.05)
    stack.si.set_max_upload(10)  # the organization's maxuploadfilesize is lower than the app's setting
    status, body, _ = stack.call(F.case_note, route="api/cases/notes", body=note(attachment=big))
    assert assert_error(status, body, 413, "dynamics_attachment_too_large")["upstreamCode"] == "0x80044a02"
    stack.si.set_max_upload(5_242_880)
    status, body, _ = stack.call(F.case_note, route="api/cases/notes",
                                 body=note(noteId="n2", attachment={**FILE, "fileName": "setup.exe"}))
    assert assert_error(status, body, 415, "dynamics_attachment_blocked")["upstreamCode"] == "0x80043e09"
    assert stack.si.records("annotations") == []


def test_resolve_twice_is_one_resolution_and_cancel_then_conflicts(stack):
    rid = make_case(stack)
    body = {"case": REF, "resolution": {"subject": "Fixed", "description": "Replaced the fuser."}}
    status, got, _ = stack.call(F.resolve_case, route="api/cases/resolve", body=body)
    assert (status, got) == (200, {"id": rid, "entity": "incident", "state": "resolved", "changed": True})
    status, got, _ = stack.call(F.resolve_case, route="api/cases/resolve", body=body)
    assert (status, got["changed"]) == (200, False)
    (res,) = stack.si.records("incidentresolutions")
    assert (res["activityid"], res["_incidentid_value"], res["subject"]) == (resolution_id(rid), rid, "Fixed")
    assert (case_row(stack, rid)["statecode"], case_row(stack, rid)["statuscode"]) == (1, 5)
    status, got, _ = stack.call(F.cancel_case, route="api/cases/cancel", body={"case": REF})
    assert "resolved" in assert_error(status, got, 409, "record_state_conflict")["message"]
    status, got, _ = stack.call(F.update_case, route="api/cases/update",
                                body={"case": REF, "changes": {"priority": "high"}})
    assert_error(status, got, 409, "record_state_conflict")


def test_cancel_twice_then_resolve_conflicts_deciding_on_statecode(stack):
    rid = make_case(stack)
    for _ in range(2):
        status, got, _ = stack.call(F.cancel_case, route="api/cases/cancel", body={"case": {"id": rid}})
        assert (status, got["state"]) == (200, "cancelled")
    assert (case_row(stack, rid)["statecode"], case_row(stack, rid)["statuscode"]) == (2, 6)
    status, got, _ = stack.call(F.resolve_case, route="api/cases/resolve",
                                body={"case": {"id": rid}, "resolution": {"subject": "x"}})
    assert "cancelled" in assert_error(status, got, 409, "record_state_conflict")["message"]
    assert stack.si.records("incidentresolutions") == []


def test_resolve_whose_answer_was_lost_is_applied_once(stack):
    rid = make_case(stack)
    stack.si.fail_next("dataverse", 1, "timeout_after_apply", path_contains="CloseIncident")
    status, got, _ = stack.call(F.resolve_case, route="api/cases/resolve",
                                body={"case": REF, "resolution": {"subject": "Fixed"}})
    assert (status, got["state"]) == (200, "resolved"), got
    assert len(stack.si.records("incidentresolutions")) == 1 and case_row(stack, rid)["statecode"] == 1


@pytest.mark.parametrize("op, code, message, rule", [
    ("resolve", "0x8003F452", "Close active child case before closing parent case.", "CloseActiveChildCaseFirst"),
    ("resolve", "0x80040203", "Because of the status transition rules, you can't resolve a case in the current "
                              "status.", "status transition rules"),
    ("cancel", "0x8004440e", "The incident can not be cancelled because there are open activities for this incident.",
     "open activities")])
def test_a_rule_that_refuses_a_resolve_or_cancel_is_a_409_naming_it(stack, op, code, message, rule):
    rid = make_case(stack)
    stack.si.fail_next("dataverse", 1, 400, code=code, message=message,
                       path_contains="CloseIncident" if op == "resolve" else f"incidents({rid})", method="POST"
                       if op == "resolve" else "PATCH")
    body = {"case": REF, "resolution": {"subject": "x"}} if op == "resolve" else {"case": REF}
    status, got, _ = stack.call(getattr(F, f"{op}_case"), route=f"api/cases/{op}", body=body)
    assert rule in assert_error(status, got, 409, "record_state_conflict")["message"]
    assert case_row(stack, rid)["statecode"] == 0


def test_update_changes_the_row_and_never_creates_one(stack):
    rid = make_case(stack)
    status, got, _ = stack.call(F.update_case, route="api/cases/update",
                                body={"case": REF, "changes": {"priority": "high", "description": "Now smoking."}})
    assert (status, got["state"]) == (200, "active"), got
    assert (case_row(stack, rid)["prioritycode"], case_row(stack, rid)["description"]) == (1, "Now smoking.")
    missing = {"case": {"externalId": "call-404", "source": "genesys"}, "changes": {"priority": "low"}}
    status, got, _ = stack.call(F.update_case, route="api/cases/update", body=missing)
    assert_error(status, got, 404, "record_not_found")
    assert len(stack.si.records("incidents")) == 1
    status, got, _ = stack.call(F.update_case, route="api/cases/update", body={"case": REF, "changes": {"title": "x"}})
    assert assert_error(status, got, 400, "invalid_request")["details"][0]["field"] == "changes.title"


def test_default_customer_account_files_a_case_without_customer(stack, monkeypatch):
    status, got, _ = stack.call(http_intake.create_case, body={"title": "Anonymous caller"})
    assert {"field": "customer", "problem": "required"} in assert_error(status, got, 400, "invalid_request")["details"]
    monkeypatch.setenv("INTAKE_DEFAULT_CUSTOMER_ACCOUNT_ID", stack.si.seed_account_id)
    instance.reset(read_timeout=1.0, backoff=0.05)
    status, got, _ = stack.call(http_intake.create_case, body={"title": "Anonymous caller"})
    assert status == 201, got
    assert case_row(stack, got["id"])["_customerid_value"] == stack.si.seed_account_id


def test_a_note_whose_record_appeared_after_the_bind_was_refused_is_created(stack):
    """The race the soak found: the note's bind is refused (0x80040217), the create lands, the read finds it."""
    rid = make_case(stack)
    stack.si.fail_next("dataverse", 1, 404, code="0x80040217", message=f"incident With Id = {rid} Does Not Exist",
                       path_contains="annotations(")
    status, got, _ = stack.call(F.case_note, route="api/cases/notes", body=note())
    assert (status, got["recordId"]) == (201, rid), got
    assert len(stack.si.records("annotations")) == 1
