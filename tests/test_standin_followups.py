"""The Dataverse stand-in's follow-up surface (issue 22), over HTTPS as a client sees it: notes by id with their
attachment rules, CloseIncident and its incidentresolution, the incident's state rules and their error codes."""

from __future__ import annotations

import base64
import uuid

import requests

from tests.test_standin import dv_headers, dv_token, session, standin  # noqa: F401  (fixtures)


def _patch(s, sess, path, body, **headers):
    h = {**dv_headers(dv_token(s, sess)), "Content-Type": "application/json", **headers}
    return sess.patch(f"{s.api_url}/{path}", json=body, headers=h, timeout=5)


def _post(s, sess, path, body):
    h = {**dv_headers(dv_token(s, sess)), "Content-Type": "application/json"}
    return sess.post(f"{s.api_url}/{path}", json=body, headers=h, timeout=5)


def _case(s) -> str:
    return s.add_record("incidents", {"title": "t", "_customerid_value": s.seed_contact_id})


def _code(r: requests.Response) -> str:
    return r.json()["error"]["code"]


def test_note_by_id_with_attachment_then_412_and_the_attachment_rules(standin, session):  # noqa: F811
    s, case = standin, _case(standin)
    nid = str(uuid.uuid4())
    body = {"subject": "wrap-up", "notetext": "called back", "filename": "a.txt", "mimetype": "text/plain",
            "documentbody": base64.b64encode(b"hello").decode(), "objectid_incident@odata.bind": f"/incidents({case})"}
    r = _patch(s, session, f"annotations({nid})", body, **{"If-None-Match": "*"})
    assert r.status_code == 204, r.text
    (note,) = s.records("annotations")
    assert (note["_objectid_value"], note["objecttypecode"], note["filesize"], note["isdocument"]) == (
        case, "incident", 5, True)
    r = _patch(s, session, f"annotations({nid})", body, **{"If-None-Match": "*"})
    assert (r.status_code, _code(r)) == (412, "0x80040237")
    r = _patch(s, session, f"annotations({uuid.uuid4()})", {**body, "objectid_incident@odata.bind":
                                                             f"/incidents({uuid.uuid4()})"}, **{"If-None-Match": "*"})
    assert (r.status_code, _code(r)) == (404, "0x80040217")
    s.set_max_upload(4)
    r = _patch(s, session, f"annotations({uuid.uuid4()})", body, **{"If-None-Match": "*"})
    assert (r.status_code, _code(r)) == (400, "0x80044a02")
    s.set_max_upload(5_242_880)
    r = _patch(s, session, f"annotations({uuid.uuid4()})", {**body, "filename": "run.EXE"}, **{"If-None-Match": "*"})
    assert (r.status_code, _code(r)) == (400, "0x80043e09")
    assert len(s.records("annotations")) == 1


def test_close_incident_resolves_once_and_read_only_rules_follow(standin, session):  # noqa: F811
    s, case = standin, _case(standin)
    rid = str(uuid.uuid4())
    action = {"IncidentResolution": {"subject": "done", "activityid": rid,
                                     "incidentid@odata.bind": f"/incidents({case})",
                                     "@odata.type": "Microsoft.Dynamics.CRM.incidentresolution"}, "Status": 5}
    r = _post(s, session, "CloseIncident", action)
    assert r.status_code == 204, r.text
    (row,) = [r for r in s.records("incidents") if r["incidentid"] == case]
    assert (row["statecode"], row["statuscode"]) == (1, 5)
    (res,) = s.records("incidentresolutions")
    assert (res["activityid"], res["_incidentid_value"]) == (rid, case)
    r = _post(s, session, "CloseIncident", action)
    assert (r.status_code, _code(r)) == (400, "0x800404cf")
    r = _patch(s, session, f"incidents({case})", {"description": "x"}, **{"If-Match": "*"})
    assert (r.status_code, _code(r)) == (400, "0x800404cf")  # resolved cases are read-only
    r = _patch(s, session, f"incidents({case})", {"statecode": 2, "statuscode": 6}, **{"If-Match": "*"})
    assert (r.status_code, _code(r)) == (400, "0x800404cf")
    r = _patch(s, session, f"incidents({case})", {"statecode": 0, "statuscode": 1}, **{"If-Match": "*"})
    assert r.status_code == 204  # reopened
    h = dv_headers(dv_token(s, session))
    got = session.get(f"{s.api_url}/incidentresolutions", params={"$filter": f"_incidentid_value eq {case}"},
                      headers=h, timeout=5)
    assert [v["activityid"] for v in got.json()["value"]] == [rid]


def test_cancel_by_setstate_and_its_refusals(standin, session):  # noqa: F811
    s, case = standin, _case(standin)
    r = _patch(s, session, f"incidents({case})", {"statecode": 1, "statuscode": 5}, **{"If-Match": "*"})
    assert (r.status_code, _code(r)) == (400, "0x80040203")  # resolve only through CloseIncident
    r = _patch(s, session, f"incidents({case})", {"statecode": 2, "statuscode": 5}, **{"If-Match": "*"})
    assert (r.status_code, _code(r)) == (400, "0x80048408")
    r = _patch(s, session, f"incidents({case})", {"statecode": 2, "statuscode": 6}, **{"If-Match": "*"})
    assert r.status_code == 204
    action = {"IncidentResolution": {"subject": "x", "incidentid@odata.bind": f"/incidents({case})"}, "Status": 5}
    r = _post(s, session, "CloseIncident", action)
    assert (r.status_code, _code(r)) == (400, "0x800404cf")  # the same code as a resolved case: read statecode
    r = _patch(s, session, f"incidents({uuid.uuid4()})", {"description": "x"}, **{"If-Match": "*"})
    assert (r.status_code, _code(r)) == (404, "0x80040217")
    assert s.records("incidentresolutions") == []
