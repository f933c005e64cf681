"""The intake contract: every rule, every problem at once, mapping to Dataverse columns."""

import json

import pytest

from shared.errors import IntakeError
from shared.validation import MAX_BODY, parse_case, parse_json, parse_lead

CONTACT = "8a1b2c3d-0000-4000-8000-000000000001"


def problems(fn, data):
    with pytest.raises(IntakeError) as caught:
        fn(data)
    assert caught.value.code == "invalid_request"
    return {(d["field"], d["problem"]) for d in caught.value.details}


def test_case_maps_to_incident_columns():
    ev = parse_case({"title": " Outage ", "description": "d", "priority": "HIGH", "origin": "phone",
                     "customer": {"contactId": CONTACT.upper()}, "externalId": "call-1", "source": "genesys",
                     "attributes": {"new_customfield": "x"}})
    assert ev.entity == "incident"
    assert ev.columns == {"title": "Outage", "description": "d", "prioritycode": 1, "caseorigincode": 1,
                          "new_customfield": "x"}
    assert ev.customer.contact_id == CONTACT
    assert (ev.external_id, ev.source) == ("call-1", "genesys")


def test_case_priority_defaults_to_normal():
    ev = parse_case({"title": "t", "customer": {"accountId": CONTACT}})
    assert ev.columns["prioritycode"] == 2
    assert "caseorigincode" not in ev.columns


def test_case_reports_every_problem_at_once():
    found = problems(parse_case, {"title": "x" * 201, "priority": "urgent", "origin": "fax",
                                  "customer": {"contactId": "nope"}, "attributes": {"Bad-Key": 1},
                                  "extra": True})
    fields = {f for f, _ in found}
    assert fields == {"title", "priority", "origin", "customer.contactId", "attributes.Bad-Key", "extra"}


def test_case_requires_title_and_customer():
    assert problems(parse_case, {}) == {("title", "required"), ("customer", "required")}


@pytest.mark.parametrize("customer", [
    {"contactId": CONTACT, "accountId": CONTACT},
    {"contactId": CONTACT, "email": "a@b.co"},
    {},
    "a@b.co",
])
def test_customer_must_be_exactly_one_way(customer):
    fields = {f for f, _ in problems(parse_case, {"title": "t", "customer": customer})}
    assert fields == {"customer"}


def test_customer_by_email_is_normalised():
    ev = parse_case({"title": "t", "customer": {"email": " Ada@Example.COM ", "firstName": "Ada"}})
    assert ev.customer.email == "ada@example.com"
    assert ev.customer.first_name == "Ada"


def test_customer_by_phone_needs_last_name():
    assert problems(parse_case, {"title": "t", "customer": {"phone": "+15551234567"}}) == {
        ("customer.lastName", "required when the customer is given by phone")}
    ev = parse_case({"title": "t", "customer": {"phone": "+1 555 123 4567", "lastName": "Doe"}})
    assert ev.customer.phone == "+15551234567"  # one normal form for lookup, the derived id and a new contact
    assert ev.customer.phone_as_typed == "+1 555 123 4567"


@pytest.mark.parametrize("phone", ["---", "(.)", "+-()", "12345", "+1 (5) 5", "1" * 18])
def test_phone_with_too_few_or_too_many_digits_is_refused(phone):
    assert ("customer.phone", "must hold 6 to 17 digits") in problems(
        parse_case, {"title": "t", "customer": {"phone": phone, "lastName": "Doe"}})


@pytest.mark.parametrize(("typed", "normal"), [("+1 (555) 0100", "+15550100"), ("0043 1 234-5678", "004312345678"),
                                               (" 555.010.0199 ", "5550100199"),
                                               ("+44 (0)20 7946 0000", "+442079460000"),
                                               ("+1 650-253-0000", "+16502530000")])
def test_phone_normal_form(typed, normal):
    ev = parse_case({"title": "t", "customer": {"phone": typed, "lastName": "Doe"}})
    assert ev.customer.phone == normal


@pytest.mark.parametrize("email", ["no-at-sign", "a@b", "a@@b.co", "a b@c.d"])
def test_bad_email_is_refused(email):
    fields = {f for f, _ in problems(parse_case, {"title": "t", "customer": {"email": email}})}
    assert "customer.email" in fields


@pytest.mark.parametrize("key", ["incidentid", "title", "customerid_contact@odata.bind", "prioritycode"])
def test_attributes_may_not_override_contract_fields(key):
    assert problems(parse_case, {"title": "t", "customer": {"contactId": CONTACT}, "attributes": {key: "x"}}) == {
        (f"attributes.{key}", "is set by the contract and may not be overridden")}


def test_attribute_bind_key_is_allowed():
    ev = parse_case({"title": "t", "customer": {"contactId": CONTACT},
                     "attributes": {"new_site@odata.bind": "/new_sites(1)", "new_n": 3}})
    assert ev.columns["new_site@odata.bind"] == "/new_sites(1)"


def test_lead_subject_is_built_from_name_and_company():
    ev = parse_lead({"lastName": "Doe", "firstName": "John", "company": "Acme", "email": "John@Example.com"})
    assert ev.columns == {"lastname": "Doe", "firstname": "John", "companyname": "Acme",
                          "emailaddress1": "john@example.com", "subject": "John Doe (Acme)"}
    assert parse_lead({"lastName": "Doe"}).columns["subject"] == "Doe"
    assert parse_lead({"lastName": "Doe", "subject": "Hi"}).columns["subject"] == "Hi"


def test_lead_requires_last_name():
    assert problems(parse_lead, {"firstName": "J"}) == {("lastName", "required")}


@pytest.mark.parametrize("key", ["has space", "", "é"])
def test_external_id_must_be_printable_ascii(key):
    fields = {f for f, _ in problems(parse_lead, {"lastName": "D", "externalId": key or 5})}
    assert fields == {"externalId"}


def test_body_must_be_a_json_object():
    for body, code in ((b"not json", "unsupported_media_type"), (b"[1]", "unsupported_media_type"),
                       (b"\xff\xfe", "unsupported_media_type"), (b" " * (MAX_BODY + 1), "payload_too_large")):
        with pytest.raises(IntakeError) as caught:
            parse_json(body)
        assert caught.value.code == code
    assert parse_json(json.dumps({"a": 1}).encode()) == {"a": 1}


@pytest.mark.parametrize("body", [b'{"title": "t", "attributes": {"new_x": NaN}}', b'{"a": Infinity}',
                                  b'{"a": -Infinity}'])
def test_nan_and_infinity_are_not_json(body):
    with pytest.raises(IntakeError) as caught:
        parse_json(body)
    assert caught.value.code == "unsupported_media_type"


def test_idempotency_key_header_rule():
    from shared.validation import idempotency_key

    assert idempotency_key(None) is None
    assert idempotency_key("req-77") == "req-77"
    assert idempotency_key(" req-77 ") == "req-77"  # surrounding whitespace is trimmed, as for externalId
    for bad in ("", " ", "a b", "req 77", "k" * 201, "é", "a\tb"):  # the externalId rule: no spaces
        with pytest.raises(IntakeError) as caught:
            idempotency_key(bad)
        assert caught.value.details[0]["field"] == "Idempotency-Key"


@pytest.mark.parametrize("ch", ["\x00", "\x08", "\x0b", "\x0c", "\x0e", "\x1b", "\x1f"])
def test_control_characters_are_refused(ch):
    assert problems(parse_case, {"title": f"a{ch}b", "customer": {"contactId": CONTACT}}) == {
        ("title", "must not contain control characters")}


def test_tab_and_line_breaks_are_kept():
    ev = parse_case({"title": "t", "description": "one\ttwo\r\nthree\nfour \x7f\x80é",
                     "customer": {"contactId": CONTACT}})
    assert ev.columns["description"] == "one\ttwo\r\nthree\nfour \x7f\x80é"
