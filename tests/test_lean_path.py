"""The lean per-request path (issue 20, item 10): what each create asks of requests, and nothing more.

The transport prepares its request by hand (shared.transport.prepare) instead of through requests' general
prepare; these tests hold it to requests' own result field by field, and check that no response's
Set-Cookie is parsed or kept while every request still goes through Session.send.
"""

from __future__ import annotations

import http.cookiejar

import pytest
import requests

from shared import instance
from shared.transport import prepare
from shared.validation import parse_case

BASE = "https://org.crm.dynamics.com/api/data/v9.2/"
GUID = "0b6c3f0e-5a7d-4a53-8d0e-3b1e2c9a7f10"
ODATA = {"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0"}
JSON = {**ODATA, "Content-Type": "application/json; charset=utf-8"}

CASES = [
    ("PATCH", f"incidents({GUID})", b'{"title":"t"}', {**JSON, "If-None-Match": "*"}, None),
    ("POST", "$batch", b"--b\r\n\r\n--b--\r\n", {**JSON, "Content-Type": "multipart/mixed; boundary=b",
                                                 "Prefer": "odata.continue-on-error"}, None),
    ("GET", "contacts", None, ODATA, {"$select": "contactid", "$filter": "emailaddress1 eq 'a+b@x.com'",
                                      "$top": "1"}),
    ("GET", f"incidents({GUID})", None, ODATA, {"$select": "title,description"}),
    ("GET", "contacts?$filter=lastname eq 'Zoë Ö'&$top=1", None, ODATA, None),
    ("GET", "contacts?$top=1", None, ODATA, {"$select": "lastname", "$filter": "lastname eq 'O''Neil & Co'"}),
    ("GET", "WhoAmI", None, ODATA, None),
    ("DELETE", f"incidents({GUID})", None, ODATA, None),
    ("patch", f"leads({GUID})", "é".encode(), JSON, None),
]


@pytest.mark.parametrize(("method", "path", "data", "headers", "params"), CASES)
def test_prepared_request_is_what_requests_prepares(method, path, data, headers, params):
    ours = prepare(method, BASE + path, data, headers, params)
    theirs = requests.Request(method, BASE + path, headers=headers, data=data, params=params).prepare()
    assert (ours.method, ours.url, ours.body) == (theirs.method, theirs.url, theirs.body)
    assert dict(ours.headers) == dict(theirs.headers)
    assert ours.hooks == theirs.hooks


def test_no_response_cookie_is_parsed_or_sent(stack, monkeypatch):
    si = stack.si
    parsed: list[int] = []
    make_cookies = http.cookiejar.CookieJar.make_cookies

    def counted(self, response, request):  # counts Dataverse's answers, then does what the library does
        if request.get_full_url().startswith(si.dataverse_url):
            parsed.append(1)
        return make_cookies(self, response, request)

    monkeypatch.setattr(http.cookiejar.CookieJar, "make_cookies", counted)
    sent: list[requests.PreparedRequest] = []
    intake = instance.intake()
    session = intake.client.session
    send = session.send
    monkeypatch.setattr(session, "send", lambda request, **kw: sent.append(request) or send(request, **kw))
    for i in range(3):
        assert intake.submit(parse_case({"title": f"t{i}", "customer": {"contactId": si.seed_contact_id}})).created
    assert len(sent) == 3  # every request went through Session.send (the telemetry hook wraps it)
    assert parsed == []  # the stand-in answers each with Set-Cookie: ARRAffinity=...; none was parsed
    assert len(session.cookies) == 0
    assert si.state.affinity_cookies == 0
    assert all("Cookie" not in r.headers for r in sent)
