"""The Dataverse client core against the stand-in, with requests counted where they arrive.

Real SecretClient, real azure-identity credentials, real requests over TLS on 127.0.0.1.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from shared import instance
from shared.errors import IntakeError
from shared.intake import record_id
from shared.proofs import proof_for
from shared.settings import load
from shared.tokens import TokenProvider
from shared.validation import parse_case, parse_lead


def count(si, service: str, method: str, kind: str) -> int:
    return si.counts[service].get((method, kind), 0)


def vault_reads(si) -> int:
    """Secret reads the vault answered (each read starts with an unauthenticated 401 challenge)."""
    return sum(1 for svc, method, path, status in si.request_log
               if svc == "vault" and method == "GET" and "/secrets/" in path and status == 200)


def case(contact: str, **extra) -> dict:
    return {"title": "Caller reports outage", "customer": {"contactId": contact}, **extra}


def test_many_creates_cost_one_vault_read_and_one_token(stack):
    si = stack.si
    intake = instance.intake()
    for i in range(25):
        intake.submit(parse_case(case(si.seed_contact_id, externalId=f"call-{i}")))
    assert vault_reads(si) == 1
    assert count(si, "entra", "POST", "token") == 2  # one for the vault reader, one for Dataverse
    assert count(si, "dataverse", "PATCH", "patch") == 25
    assert si.connections["dataverse"] == 1
    assert len(si.records("incidents")) == 25


def test_revoked_token_costs_exactly_one_refresh_and_one_retry(stack):
    si = stack.si
    intake = instance.intake()
    intake.submit(parse_case(case(si.seed_contact_id)))
    tokens_before = count(si, "entra", "POST", "token")
    creates_before = count(si, "dataverse", "PATCH", "patch")
    si.revoke_tokens()
    out = intake.submit(parse_case(case(si.seed_contact_id)))
    assert out.created
    assert count(si, "entra", "POST", "token") == tokens_before + 1
    assert count(si, "dataverse", "PATCH", "patch") == creates_before + 2  # the 401, then the retry
    statuses = [status for service, method, _, status in si.request_log if service == "dataverse" and method == "PATCH"]
    assert statuses[-2:] == [401, 204]
    assert vault_reads(si) == 1  # a 401 is not a reason to re-read the vault


def test_second_401_is_not_retried(stack):
    si = stack.si
    intake = instance.intake()
    intake.submit(parse_case(case(si.seed_contact_id)))
    tokens_before = count(si, "entra", "POST", "token")
    si.fail_next("dataverse", 5, 401, method="PATCH")
    with pytest.raises(IntakeError) as caught:
        intake.submit(parse_case(case(si.seed_contact_id)))
    assert caught.value.code == "dynamics_token_rejected"
    assert count(si, "entra", "POST", "token") == tokens_before + 1
    assert [s for svc, m, _, s in si.request_log if svc == "dataverse" and m == "PATCH"][-2:] == [401, 401]
    assert len(si.records("incidents")) == 1


def test_missing_privilege_is_not_retried(stack):
    si = stack.si
    intake = instance.intake()
    intake.submit(parse_case(case(si.seed_contact_id)))
    tokens_before = count(si, "entra", "POST", "token")
    si.revoke_privilege("prvCreateIncident")
    with pytest.raises(IntakeError) as caught:
        intake.submit(parse_case(case(si.seed_contact_id, externalId="x-1")))
    err = caught.value
    assert (err.code, err.status, err.upstream_code) == ("dynamics_privilege_missing", 502, "0x80040220")
    assert "prvCreateIncident" in err.detail
    assert err.request_id  # the x-ms-service-request-id, for Microsoft support
    assert count(si, "dataverse", "PATCH", "patch") == 2  # the first create, then one refused try: no retry
    assert count(si, "entra", "POST", "token") == tokens_before  # a fresh token would not help


@pytest.mark.parametrize(("fault", "code"), [("remove_app_user", "dynamics_app_user_missing"),
                                              ("disable_app_user", "dynamics_app_user_disabled")])
def test_app_user_faults_are_classified(stack, fault, code):
    getattr(stack.si, fault)()
    with pytest.raises(IntakeError) as caught:
        instance.intake().submit(parse_case(case(stack.si.seed_contact_id)))
    assert caught.value.code == code
    assert count(stack.si, "dataverse", "PATCH", "patch") == 1


def test_rotated_secret_is_picked_up_without_restart(stack):
    si = stack.si
    intake = instance.intake()
    intake.submit(parse_case(case(si.seed_contact_id)))
    si.rotate_dynamics_secret()  # new secret at Entra ID and in the vault; the old one removed
    si.revoke_tokens()
    out = intake.submit(parse_case(case(si.seed_contact_id)))
    assert out.created
    assert vault_reads(si) == 2
    entra = [s for svc, m, p, s in si.request_log if svc == "entra" and m == "POST"]
    assert entra[-2:] == [401, 200]  # AADSTS7000215 with the old secret, then the new one


def test_expired_secret_without_rotation_fails_with_that_diagnosis(stack):
    si = stack.si
    si.expire_secret(si.dynamics_client_id, si.dynamics_secret)
    with pytest.raises(IntakeError) as caught:
        instance.intake().submit(parse_case(case(si.seed_contact_id)))
    err = caught.value
    assert (err.code, err.upstream_code) == ("entra_secret_expired", "AADSTS7000222")
    assert "new version of the vault secret dynamics-client-secret" in err.fix
    assert vault_reads(si) == 2  # read once more, found the same value: stop


def test_same_external_id_gives_one_record(stack):
    si = stack.si
    intake = instance.intake()
    first = intake.submit(parse_case(case(si.seed_contact_id, externalId="call-8812", source="genesys")))
    again = intake.submit(parse_case(case(si.seed_contact_id, externalId="call-8812", source="genesys")))
    other_source = intake.submit(parse_case(case(si.seed_contact_id, externalId="call-8812", source="web")))
    assert (first.created, again.created, other_source.created) == (True, False, True)
    assert first.id == again.id == record_id("incident", "genesys", "call-8812")
    assert other_source.id != first.id
    assert len(si.records("incidents")) == 2


def test_concurrent_creates_share_one_token_and_stay_in_the_pool(stack, captured_logs):
    si = stack.si
    intake = instance.intake()
    barrier = threading.Barrier(32, timeout=20)

    def one(i: int) -> bool:
        barrier.wait()
        return intake.submit(parse_lead({"lastName": f"Doe{i}", "externalId": f"lead-{i}"})).created

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(128), timeout=60))
    assert all(results)
    assert count(si, "entra", "POST", "token") == 2
    assert vault_reads(si) == 1
    assert 1 <= si.connections["dataverse"] <= 32
    assert not [t for t in captured_logs.texts if "Connection pool is full" in t]
    assert len(si.records("leads")) == 128


def test_throttling_waits_retry_after_within_budget(stack):
    si = stack.si
    intake = instance.intake()
    si.fail_next("dataverse", 1, 429, retry_after=1, method="PATCH")
    started = time.monotonic()
    out = intake.submit(parse_case(case(si.seed_contact_id, externalId="t-1")), budget=5)
    assert out.created
    assert time.monotonic() - started >= 1.0
    si.fail_next("dataverse", 1, 429, retry_after=30, method="PATCH")
    started = time.monotonic()
    with pytest.raises(IntakeError) as caught:
        intake.submit(parse_case(case(si.seed_contact_id, externalId="t-2")), budget=5)
    assert time.monotonic() - started < 2  # gave up at once: the wait does not fit the budget
    assert (caught.value.code, caught.value.retry_after, caught.value.status) == ("dynamics_throttled", 30, 503)


def test_throttled_unkeyed_create_is_retried(stack):
    si = stack.si
    si.fail_next("dataverse", 1, 429, retry_after=0.2, method="PATCH")
    out = instance.intake().submit(parse_case(case(si.seed_contact_id)))
    assert out.created
    assert len(si.records("incidents")) == 1


def test_server_errors_are_retried_for_every_create_since_every_create_is_by_id(stack):
    si = stack.si
    intake = instance.intake()
    si.fail_next("dataverse", 2, 503, method="PATCH")
    assert intake.submit(parse_case(case(si.seed_contact_id, externalId="k-1"))).created
    assert count(si, "dataverse", "PATCH", "patch") == 3
    si.fail_next("dataverse", 2, 502, method="PATCH")
    assert intake.submit(parse_case(case(si.seed_contact_id))).created  # no key: a random id, retried safely
    assert count(si, "dataverse", "PATCH", "patch") == 6
    assert count(si, "dataverse", "POST", "create") == 0  # nothing is created without an id any more
    assert len(si.records("incidents")) == 2


def test_timeout_after_write_finds_the_record_keyed_or_not(stack):
    si = stack.si
    intake = instance.intake()
    si.fail_next("dataverse", 1, "timeout_after_apply", method="PATCH")
    out = intake.submit(parse_case(case(si.seed_contact_id, externalId="lost-answer")))
    assert out.created is False  # the retry met the row the first try wrote
    assert out.id == record_id("incident", None, "lost-answer")
    si.fail_next("dataverse", 1, "timeout_after_apply", method="PATCH")
    out = intake.submit(parse_case(case(si.seed_contact_id)))
    assert out.created is True  # no key: the 412 can only be this call's own first try, so the row is new
    assert len(si.records("incidents")) == 2


def test_customer_by_email_is_looked_up_once_and_created_once(stack):
    si = stack.si
    intake = instance.intake()
    barrier = threading.Barrier(8, timeout=20)

    def first_call(i: int) -> str:
        barrier.wait()
        return intake.submit(parse_case({"title": f"t{i}", "customer": {"email": "new.caller@example.com",
                                                                         "lastName": "Caller"}})).id

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(first_call, range(8), timeout=30))
    contacts = [c for c in si.records("contacts") if c.get("emailaddress1") == "new.caller@example.com"]
    assert len(contacts) == 1
    queries = count(si, "dataverse", "GET", "query")
    assert queries == 1  # eight concurrent first calls, one lookup
    assert count(si, "dataverse", "PATCH", "patch") == 9  # one contact create and the eight cases
    for i in range(5):
        intake.submit(parse_case({"title": f"again{i}", "customer": {"email": "New.Caller@example.com"}}))
    assert count(si, "dataverse", "GET", "query") == queries  # the resolved contact is cached
    customers = {r["_customerid_value"] for r in si.records("incidents")}
    assert customers == {contacts[0]["contactid"]}


def test_existing_contact_is_found_by_email(stack):
    si = stack.si
    instance.intake().submit(parse_case({"title": "t", "customer": {"email": "ADA@example.com"}}))
    (incident,) = si.records("incidents")
    assert incident["_customerid_value"] == si.seed_contact_id
    assert len(si.records("contacts")) == 1


def test_quotes_in_email_stay_one_literal(stack):
    si = stack.si
    email = "o'brien' or emailaddress1 ne 'x@example.com"
    instance.intake().submit(parse_case({"title": "t", "customer": {"email": "o'brien@example.com"}}))
    assert si.queries[-1] == [("emailaddress1", "o'brien@example.com")]
    with pytest.raises(IntakeError):  # not an email: refused before any query
        instance.intake().submit(parse_case({"title": "t", "customer": {"email": email}}))


def test_deleted_cached_contact_is_resolved_again(stack):
    si = stack.si
    intake = instance.intake()
    first = intake.submit(parse_case({"title": "a", "customer": {"email": "gone@example.com", "lastName": "G"}}))
    assert first.created
    contact_id = si.records("contacts")[-1]["contactid"]
    assert si.delete_record("contacts", contact_id)
    out = intake.submit(parse_case({"title": "b", "customer": {"email": "gone@example.com", "lastName": "G"}}))
    assert out.created
    statuses = [s for svc, m, p, s in si.request_log if svc == "dataverse" and m == "PATCH" and "incidents" in p]
    assert statuses[-2:] == [404, 204]  # the bind to the deleted contact, then the create after re-resolving
    assert [c["contactid"] for c in si.records("contacts") if c.get("emailaddress1") == "gone@example.com"] == [
        contact_id]  # re-created under the same derived id


def test_token_is_refreshed_before_expiry_not_after(stack):
    s = load()
    now = [time.time()]
    tokens = TokenProvider(s, proof_for(s), clock=lambda: now[0])
    first = tokens.token()
    assert tokens.token() == first
    now[0] += 3599 - 301  # outside the 5-minute window: still the cached token
    assert tokens.token() == first
    assert tokens.acquisitions == 1
    now[0] += 2  # inside the window, token still valid: one refresh, in the background
    assert tokens.token() == first  # nobody waits for it
    for _ in range(200):  # bounded: 10 s
        second = tokens.token()
        if second != first:
            break
        time.sleep(0.05)
    assert second != first
    assert tokens.acquisitions == 2


def test_stale_token_is_fetched_once_by_many_threads(stack):
    si = stack.si
    si.set_latency("entra", 0.3)
    s = load()
    tokens = TokenProvider(s, proof_for(s))
    barrier = threading.Barrier(16, timeout=20)

    def get(_: int) -> str:
        barrier.wait()
        return tokens.token()

    with ThreadPoolExecutor(16) as pool:
        values = set(pool.map(get, range(16), timeout=30))
    assert len(values) == 1
    assert tokens.acquisitions == 1


def test_azure_sdk_request_logs_are_quiet(stack, captured_logs):
    instance.intake().submit(parse_case(case(stack.si.seed_contact_id)))
    assert logging.getLogger("azure.core.pipeline.policies.http_logging_policy").getEffectiveLevel() >= logging.WARNING
