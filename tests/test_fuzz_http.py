"""Property-based bad input for POST /api/cases and /api/leads, the queue functions, and the published schema.

* No body (arbitrary JSON values, byte strings, deep nesting, near-valid bodies) gets a 500 or an
  uncaught exception; every error answer carries a machine-readable `error.code` whose HTTP status
  is the one in the errors table, a message, a fix and a `correlationId`.
* The queue functions never raise for a body that can never succeed: they set it aside in
  <queue>-rejected with the original bytes (a raise would mean five retries and the poison queue).
* Quotes and OData syntax in an email or phone cannot change the lookup the stand-in receives:
  each lookup is exactly one `(column, value)` comparison per column, the value being the input
  normalised (trimmed; email in lower case).
* `docs/contract.schema.json` accepts exactly the bodies the validator accepts.

Seeded (`derandomize`), bounded (`INTAKE_FUZZ_EXAMPLES`, default 150 per property); no example database.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from azure.functions.queue import QueueMessage
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from devstack.standin.state import Identities
from shared import instance
from shared.errors import CODES, IntakeError
from shared.intake import ContactCache
from shared.validation import normalise_phone, parse_case, parse_json, parse_lead
from tests.hostsim import Context, Out
from triggers import http_intake, queue_intake

EXAMPLES = int(os.environ.get("INTAKE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.filter_too_much, HealthCheck.data_too_large])
ROUTES = {"cases": http_intake.create_case, "leads": http_intake.create_lead}
IN_EVENT = {"invalid_request", "unsupported_media_type", "payload_too_large", "dynamics_payload_rejected"}
IDS = Identities.from_seed(0)  # the stand-in's seeded ids (StandIn's default seed)
MESSAGE_IDS = itertools.count()
SCHEMA = json.loads((Path(__file__).resolve().parent.parent / "docs" / "contract.schema.json").read_text())

# ---- strategies ---------------------------------------------------------------------------------------------

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=10), kids, max_size=4), max_leaves=12)

EDGE_TEXT = ["", " ", "\n", "\t x \t", "x\n", "\x00", "x\x0by", "\x1c", "\x7f", "\u00a0x\u00a0", "\u2028", "é",
             "high", "HIGH", "High ", "phone", "Web", "normal\n", "a" * 50, "a" * 51, "a" * 200, "a" * 201,
             " " + "a" * 200 + " ", "\ud800", "'", "' or 1 eq 1 or '", ")", "%27", "$filter=", "null"]
INJECT = ["'", "''", "' or 1 eq 1 or '", ")", "(", "%27", "%2527", "$filter=", "&$top=5000", "#", "?", "/", "\\",
          "eq", "or", "+", ",", ";", "=", "*", "~", "\"", "\u00e9", "\u202e", "%00", "{", "}", "[", "]"]
text_like = st.sampled_from(EDGE_TEXT) | st.text(max_size=30) | st.builds(
    lambda pre, core, post: pre + core + post, st.sampled_from(["", " ", "\n", "\t"]),
    st.text(max_size=12), st.sampled_from(["", " ", "\n", "\x0b"]))


def _pad(s: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.builds(lambda pre, core, post: pre + core + post, st.sampled_from(["", "", " ", "\n "]), s,
                     st.sampled_from(["", "", " ", "\n", "\t"]))


local_part = st.lists(st.sampled_from(INJECT) | st.text("abcXYZ019._-+", min_size=1, max_size=4),
                      min_size=1, max_size=5).map("".join)
emails = _pad(st.builds(lambda a, b, c: f"{a}@{b}.{c}", local_part, local_part, st.sampled_from(["com", "io", "x'"]))
              | st.builds(lambda a: a.upper() + "@EXAMPLE.COM", st.text("abc'()", min_size=1, max_size=8))
              | text_like)
phones = _pad(st.text("0123456789 ()./-+", min_size=0, max_size=44) | st.builds(
    lambda a, b: a + b, st.text("0123456789 ()", min_size=3, max_size=12), st.sampled_from(INJECT)))
guid_like = st.sampled_from([IDS.seed_contact_id, IDS.seed_contact_id.upper(), IDS.seed_contact_id + "\n",
                             "{" + IDS.seed_contact_id + "}", " " + IDS.seed_contact_id, "not-a-guid", "",
                             "00000000-0000-4000-8000-000000000999"]) | json_values
attr_keys = st.sampled_from(["new_customfield", "new_customfield@odata.bind", "new_nosuch", "statecode",
                             "versionnumber", "title", "lastname", "customerid_contact@odata.bind",
                             "parentcustomerid_account@odata.bind", "New_X", "new_x\n", "_x", "a" * 101,
                             "title@odata.bind", "x y"]) | st.text(max_size=12)
attr_values = st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=120) | st.sampled_from(
    [0.5, 10**20, "/contacts(" + IDS.seed_contact_id + ")", "x" * 150]) | json_values
mixed = st.sampled_from([text_like, json_values]).flatmap(lambda s: s)


@st.composite
def customers(draw: Any) -> Any:
    way = draw(st.sampled_from(["contact", "account", "email", "phone", "mixed", "any"]))
    if way == "contact":
        out = {"contactId": draw(guid_like)}
    elif way == "account":
        out = {"accountId": draw(st.sampled_from([IDS.seed_account_id]) | guid_like)}
    elif way == "email":
        out = {"email": draw(emails)}
    elif way == "phone":
        out = {"phone": draw(phones), "lastName": draw(text_like)}
    elif way == "mixed":
        keys = draw(st.lists(st.sampled_from(["contactId", "accountId", "email", "phone", "firstName", "lastName",
                                              "other"]), min_size=1, max_size=4, unique=True))
        values = {"contactId": guid_like, "accountId": guid_like, "email": emails, "phone": phones}
        out = {k: draw(values.get(k, text_like) | st.sampled_from([None, ""])) for k in keys}
    else:
        return draw(json_values)
    for extra in ("firstName", "lastName"):
        if way in ("email", "phone") and draw(st.booleans()):
            out[extra] = draw(text_like)
    return out


@st.composite
def near_valid(draw: Any, kind: str) -> dict:
    """A valid body with a few fields made odd, added or dropped."""
    if kind == "cases":
        body: dict[str, Any] = {"title": "Caller reports outage", "customer": draw(customers())}
        optional = {"description": text_like, "priority": st.sampled_from(["high", "LOW", "Normal", "urgent", "",
                                                                           " high", None]) | mixed,
                    "origin": st.sampled_from(["phone", "EMAIL", "web", "fax", None]) | mixed}
    else:
        body = {"lastName": "Doe"}
        optional = {"firstName": text_like, "email": emails, "company": text_like, "phone": phones,
                    "subject": text_like, "description": text_like}
    optional.update(externalId=_pad(st.text(st.characters(min_codepoint=32, max_codepoint=127), max_size=8))
                    | st.sampled_from(["a" * 200, "a" * 201, "has space", "é"]) | mixed,
                    source=st.sampled_from(["genesys", "web form", "x" * 101, None]) | mixed,
                    attributes=st.dictionaries(attr_keys, attr_values, max_size=3) | json_values)
    for name in draw(st.lists(st.sampled_from(sorted(optional)), max_size=4, unique=True)):
        body[name] = draw(optional[name])
    required = "title" if kind == "cases" else "lastName"
    change = draw(st.sampled_from(["none", "required", "drop", "unknown"]))
    if change == "required":
        body[required] = draw(mixed)
    elif change == "drop":
        body.pop(draw(st.sampled_from(sorted(body))))
    elif change == "unknown":
        body[draw(st.text(max_size=10))] = draw(json_values)
    return body


deep = st.builds(lambda n, opener: (opener * n + (b"]" * n if opener == b"[" else b"")),
                 st.integers(min_value=100, max_value=30_000), st.sampled_from([b"[", b'{"a":', b'{"title":[']))
raw_bodies = st.binary(max_size=300) | deep | st.builds(
    lambda v: json.dumps(v).encode(), json_values) | st.sampled_from(
    [b"", b"null", b"[]", b"{}", b"\xef\xbb\xbf{}", b'{"title": NaN}', b"\xff\xfe{}", b'{"a":1}' * 10,
     b"{" + b" " * (64 * 1024) + b"}"])

# ---- checks -------------------------------------------------------------------------------------------------


def check_answer(status: int, body: dict) -> None:
    assert status != 500, body
    if status in (200, 201):
        assert set(body) == {"id", "entity", "created"} and body["created"] == (status == 201), body
        return
    err = body["error"]
    assert err["code"] in IN_EVENT, body  # no fault is injected: every failure lies in the body
    assert CODES[err["code"]].status == status, body
    assert err["correlationId"] and err["message"] and err["fix"], body
    assert "Traceback" not in json.dumps(body)


def call(stack: Any, route: str, raw: bytes, headers: dict | None = None) -> tuple[int, dict]:
    status, body, _ = stack.call(ROUTES[route], route=f"api/{route}", raw=raw, headers=headers)
    check_answer(status, body)
    return status, body


def validator_accepts(kind: str, body: Any) -> bool:
    try:
        data = parse_json(json.dumps(body).encode())
        # The schema describes the app with INTAKE_DEFAULT_CUSTOMER_ACCOUNT_ID set: a case's customer optional.
        parse_case(data, default_account=IDS.seed_account_id) if kind == "cases" else parse_lead(data)
    except IntakeError as err:
        assert err.code in ("invalid_request", "unsupported_media_type"), err.code
        return False
    return True


# ---- HTTP ---------------------------------------------------------------------------------------------------


@pytest.fixture(params=["function_key", "entra"])
def stack(stack, request, monkeypatch):  # noqa: F811 - the conftest stack, in each caller mode
    """Every test here runs under function keys and under entra (each call then carries a valid token)."""
    if request.param == "entra":
        from tests.test_callers import use_entra, with_token

        with_token(stack, use_entra(stack, monkeypatch))
    yield stack
    from shared import caller_tokens

    caller_tokens.reset()



@FUZZ
@given(route=st.sampled_from(sorted(ROUTES)), value=json_values)
def test_any_json_value_gets_a_classified_answer(stack, route, value):
    call(stack, route, json.dumps(value).encode())


@FUZZ
@given(route=st.sampled_from(sorted(ROUTES)), raw=raw_bodies)
def test_any_bytes_get_a_classified_answer(stack, route, raw):
    status, _ = call(stack, route, raw)
    if len(raw) > 64 * 1024:
        assert status == 413


@FUZZ
@given(data=st.data())
def test_near_valid_bodies_get_a_classified_answer(stack, data):
    route = data.draw(st.sampled_from(sorted(ROUTES)))
    body = data.draw(near_valid(route))
    headers = data.draw(st.none() | st.builds(lambda k: {"Idempotency-Key": k}, st.text(max_size=210)))
    status, answer = call(stack, route, json.dumps(body).encode(), headers)
    if status in (200, 201):
        assert validator_accepts(route, body)


@FUZZ
@given(email=emails)
def test_email_cannot_change_the_lookup(stack, email):
    si = stack.si
    instance.intake().contacts = ContactCache()  # every example looks the contact up
    before = len(si.queries)
    status, answer = call(stack, "cases", json.dumps({"title": "t", "customer": {"email": email}}).encode())
    queries = si.queries[before:]
    if status == 400:
        assert queries == [], queries
        return
    assert status == 201, answer
    assert queries == [[("emailaddress1", email.strip().lower())]], (email, queries)
    found = [c for c in si.records("contacts") if (c.get("emailaddress1") or "").lower() == email.strip().lower()]
    assert len(found) == 1, found


@FUZZ
@given(phone=phones)
def test_phone_cannot_change_the_lookup(stack, phone):
    si = stack.si
    instance.intake().contacts = ContactCache()
    before = len(si.queries)
    body = {"title": "t", "customer": {"phone": phone, "lastName": "Caller"}}
    status, answer = call(stack, "cases", json.dumps(body).encode())
    queries = si.queries[before:]
    if status == 400:
        assert queries == [], queries
        return
    assert status == 201, answer
    typed = phone.strip()
    normal = normalise_phone(typed)  # its own cases are in tests/test_validation.py
    forms = [normal] if typed == normal else [normal, typed]
    # One literal per form and column: the normalised number, then the number as typed.
    assert queries == [[(col, form) for form in forms for col in ("telephone1", "mobilephone")]], (phone, queries)


@pytest.mark.parametrize("value", ["o'neil@example.com", "x'or'1'eq'1@example.com", "a')or(emailaddress1@x.com",
                                   "a%27@example.com", "a$filter=x@example.com", "a&$top=9@example.com",
                                   "a%2527@example.com", "a'@x'.com"])
def test_injection_shaped_emails_stay_one_literal(stack, value):
    si = stack.si
    status, answer = call(stack, "cases", json.dumps({"title": "t", "customer": {"email": value}}).encode())
    assert status == 201, answer
    assert si.queries == [[("emailaddress1", value.lower())]]


# ---- queue functions -----------------------------------------------------------------------------------------


@FUZZ
@given(queue=st.sampled_from(["cases", "leads"]), raw=raw_bodies | st.builds(
    lambda v: json.dumps(v).encode(), json_values))
def test_queue_functions_reject_what_can_never_succeed_and_keep_the_bytes(stack, queue, raw):
    fn = getattr(queue_intake, f"{queue}_queue").build().get_user_function()
    out = Out()
    msg = QueueMessage(id=f"fuzz-{next(MESSAGE_IDS)}", body=raw, dequeue_count=1)
    fn(msg, out, Context())  # must not raise: a raise means retries, then the poison queue
    if out.value is None:
        return  # a valid event: its row was created
    record = json.loads(out.value)
    assert record["reason"]["code"] in IN_EVENT, record
    kept = record["body"].encode() if "body" in record else base64.b64decode(record["bodyBase64"])
    assert kept == raw


# ---- the published schema ------------------------------------------------------------------------------------


def schema_accepts(kind: str, body: Any) -> bool:
    ref = {"$defs": SCHEMA["$defs"], "$ref": f"#/$defs/{'case' if kind == 'cases' else 'lead'}"}
    return jsonschema.Draft202012Validator(ref).is_valid(body)


def test_schema_is_a_valid_2020_12_schema_and_accepts_the_documented_examples():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert schema_accepts("cases", {"title": "Outage", "customer": {"email": "a@example.com"}, "priority": "high"})
    assert schema_accepts("cases", {"title": "t", "customer": {"phone": "+1 555 0100", "lastName": "Doe"}})
    assert schema_accepts("leads", {"lastName": "Doe", "externalId": "form-1", "attributes": {"new_x": 1}})
    assert not schema_accepts("cases", {"title": "t", "customer": {"phone": "+1 555 0100"}})


@settings(FUZZ, max_examples=EXAMPLES * 4)
@given(pair=st.sampled_from(["cases", "leads"]).flatmap(lambda k: st.tuples(st.just(k), near_valid(k) | json_values)))
@example(pair=("cases", {"title": "t", "customer": {"contactId": IDS.seed_contact_id + "\n"}}))
@example(pair=("cases", {"title": "t", "customer": {"accountId": IDS.seed_account_id.upper()}, "priority": "LOW"}))
@example(pair=("cases", {"title": "t", "customer": {"contactId": IDS.seed_contact_id}, "attributes": {"title\n": 1}}))
@example(pair=("leads", {"lastName": "x", "attributes": {"new_x\n": "v"}}))
@example(pair=("leads", {"lastName": " x ", "email": " A@B.CO\n", "phone": "\t+1 (555) 0100 "}))
@example(pair=("cases", {"title": "t", "customer": {"phone": "123", "lastName": "\x1c"}}))
def test_schema_accepts_exactly_what_the_validator_accepts(pair):
    kind, body = pair
    by_validator, by_schema = validator_accepts(kind, body), schema_accepts(kind, body)
    assert by_validator == by_schema, (kind, body, f"validator={by_validator}", f"schema={by_schema}")


@pytest.mark.parametrize("customer", [{"email": "  "}, {"phone": " "}, {"email": "\n", "lastName": "Doe"}])
def test_blank_contact_details_are_a_400(customer):
    with pytest.raises(IntakeError) as caught:
        parse_case({"title": "t", "customer": customer})
    assert caught.value.code == "invalid_request"


@FUZZ
@given(header=st.text(max_size=210) | st.sampled_from([" ", "a b", " k-1 ", "k" * 200, "k" * 201, "é", "a\tb"]))
def test_idempotency_key_rule_is_the_schema_s(header):
    """One rule for keys, stated once in the schema: the header check accepts exactly what it describes."""
    import re

    from shared.validation import idempotency_key

    try:
        idempotency_key(header)
        by_validator = True
    except IntakeError:
        by_validator = False
    by_schema = re.search(SCHEMA["$defs"]["idempotencyKey"]["pattern"], header) is not None
    assert by_validator == by_schema, (header, by_validator, by_schema)
    ext = SCHEMA["$defs"]["externalId"]["pattern"]
    assert by_schema == (re.search(ext, header) is not None and header.strip() != ""), header
