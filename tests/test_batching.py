"""Concurrent creates of one instance gathered into one $batch (shared/batching.py), against the stand-in.

Real requests over TLS to the stand-in's `$batch` (multipart/mixed, continue-on-error); what each caller
gets back, and how many requests and rows Dataverse sees, is counted where they arrive.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from devstack.standin.protection import Protection
from shared import instance
from shared.batching import decode
from shared.deadline import Deadline
from shared.errors import IntakeError
from shared.intake import record_id
from shared.validation import parse_case

N = 10


def count(si, method: str, kind: str) -> int:
    return si.counts["dataverse"].get((method, kind), 0)


def burst(si, events: list[dict], budget: float = 10.0) -> list:
    """Submit the events at once from as many threads; each result is an Outcome or the IntakeError."""
    intake = instance.intake()
    gate = threading.Barrier(len(events), timeout=20)

    def one(event: dict):
        gate.wait()
        try:
            return intake.submit(parse_case(event), budget=budget)
        except IntakeError as err:
            return err

    with ThreadPoolExecutor(len(events)) as pool:
        return list(pool.map(one, events, timeout=60))


def case(si, i: int, **extra) -> dict:
    return {"title": f"batched {i}", "customer": {"contactId": si.seed_contact_id}, **extra}


def warm(si, engage: bool = True) -> None:
    """Token and connection first, so the burst's creates arrive together; then, as in a storm, Dataverse
    refuses one request for the request budget, which engages batching."""
    instance.intake().submit(parse_case(case(si, -1)))
    if engage:
        si.fail_next("dataverse", 1, 429, code="0x80072322", retry_after=0.2, method="PATCH")
        instance.intake().submit(parse_case(case(si, -2)))
        assert instance.intake().client.batches.size == 2


def test_concurrent_creates_share_few_requests_and_each_gets_its_own_outcome(stack):
    si = stack.si
    warm(si)
    existing = record_id("incident", "t", "seen-before")
    instance.intake().submit(parse_case(case(si, 0, externalId="seen-before", source="t")))
    batches_before = count(si, "POST", "batch")
    events = [case(si, i, externalId=f"b-{i}", source="t") for i in range(1, N - 2)]
    events.append(case(si, 0, externalId="seen-before", source="t"))  # a repeat: already exists
    events.append({**case(si, 99), "attributes": {"new_nosuchcolumn": "x"}})  # Dataverse refuses this one
    results = burst(si, events)
    batches = count(si, "POST", "batch") - batches_before
    assert 1 <= batches <= N // 2  # ten creates arrived together: batches of two, not ten requests
    assert count(si, "PATCH", "patch") >= N  # each part counted as the create it holds
    assert all(not isinstance(r, IntakeError) for r in results[:-1]), results
    assert [r.created for r in results[:-2]] == [True] * (N - 3)
    assert results[-2].id == existing and results[-2].created is False
    assert isinstance(results[-1], IntakeError) and results[-1].code == "dynamics_payload_rejected"
    assert results[-1].upstream_code == "0x80048d19"
    titles = [r["title"] for r in si.records("incidents")]
    assert sorted(titles) == sorted({*titles})  # exactly one row per event
    assert len(titles) == 2 + 1 + (N - 3)  # warm-up, seen-before, and the new ones


def test_a_lone_create_is_sent_alone(stack):
    si = stack.si
    warm(si)
    for i in range(3):
        instance.intake().submit(parse_case(case(si, i)))
    assert count(si, "POST", "batch") == 0
    assert instance.intake().client.batches.batches == 0


def test_batching_engages_only_on_the_request_budget_and_ends_after_the_window(stack, monkeypatch):
    """Batches relieve the request budget only; their parts run in order, so otherwise creates go alone."""
    from shared import batching

    si = stack.si
    warm(si, engage=False)
    gatherer = instance.intake().client.batches
    burst(si, [case(si, i) for i in range(N)])
    assert gatherer.size == 1 and count(si, "POST", "batch") == 0  # no throttling: every create alone
    si.fail_next("dataverse", 1, 429, code="0x80072321", retry_after=0.1, method="PATCH")
    instance.intake().submit(parse_case(case(si, 20)))
    assert gatherer.size == 1  # the execution-time budget counts every record: a batch would not help
    si.fail_next("dataverse", 1, 429, code="0x80072322", retry_after=0.1, method="PATCH")
    instance.intake().submit(parse_case(case(si, 21)))
    assert gatherer.size == 2
    burst(si, [case(si, 30 + i) for i in range(N)])
    assert count(si, "POST", "batch") >= 1
    time.sleep(0.15)
    si.fail_next("dataverse", 1, 429, code="0x80072322", retry_after=0.1, method="PATCH")
    instance.intake().submit(parse_case(case(si, 22)))
    assert gatherer.size == 4  # refused again after a Retry-After: bigger batches
    monkeypatch.setattr(batching, "ENGAGED_FOR", 0.0)
    si.fail_next("dataverse", 1, 429, code="0x80072322", retry_after=0.1, method="PATCH")
    instance.intake().submit(parse_case(case(si, 23)))
    before = count(si, "POST", "batch")
    burst(si, [case(si, 50 + i) for i in range(N)])
    assert gatherer.size == 1 and count(si, "POST", "batch") == before  # the storm is over: alone again
    assert len(si.records("incidents")) == 1 + 3 * N + 4


def test_a_part_answered_503_falls_back_to_a_single_create(stack):
    si = stack.si
    warm(si)
    si.fail_next("dataverse", 1, 503, method="PATCH", path_contains="incidents(")
    results = burst(si, [case(si, i) for i in range(N)])  # un-keyed: random ids, created by id all the same
    assert all(not isinstance(r, IntakeError) and r.created for r in results), results
    assert count(si, "POST", "batch") >= 1
    statuses = [s for svc, m, p, s in si.request_log if svc == "dataverse" and m == "PATCH" and "incidents(" in p]
    assert 503 in statuses  # the part did fail, and was sent again alone
    assert sorted(r["title"] for r in si.records("incidents")) == sorted(
        ["batched -1", "batched -2", *(f"batched {i}" for i in range(N))])


def test_a_batch_whose_answer_is_lost_creates_each_row_once(stack):
    si = stack.si
    warm(si)
    si.fail_next("dataverse", 1, "timeout_after_apply", method="POST", path_contains="$batch")
    results = burst(si, [case(si, i) for i in range(N)] + [case(si, 50 + i, externalId=f"k-{i}", source="t")
                                                          for i in range(4)], budget=12.0)
    assert all(not isinstance(r, IntakeError) for r in results), results
    assert all(r.created for r in results[:N])  # un-keyed: the 412 on resending is this call's own row
    titles = [r["title"] for r in si.records("incidents")]
    assert len(titles) == len(set(titles)) == 2 + N + 4


def test_a_throttled_batch_waits_retry_after_then_goes_through(stack):
    si = stack.si
    warm(si)
    si.fail_next("dataverse", 1, 429, code="0x80072321", retry_after=0.5, method="POST", path_contains="$batch")
    results = burst(si, [case(si, i) for i in range(N)])
    assert all(not isinstance(r, IntakeError) for r in results), results
    assert len(si.records("incidents")) == 2 + N
    assert instance.intake().client.gate.waits >= 1  # the instance held its requests for Retry-After


def test_standin_batch_follows_the_documented_wire_format(stack):
    """A $batch written as Microsoft's page shows it, sent raw; the answer read by the app's decoder."""
    si = stack.si
    token = instance.intake().client.transport._tokens.token(Deadline.of(10))
    new_id, bad_id = str(uuid.uuid4()), str(uuid.uuid4())
    bind = f'"customerid_contact@odata.bind":"/contacts({si.seed_contact_id})"'
    body = (
        "--batch_AAA123\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
        f"PATCH /api/data/v9.2/incidents({new_id}) HTTP/1.1\r\nContent-Type: application/json; type=entry\r\n"
        "If-None-Match: *\r\n\r\n"
        f'{{"title":"from a raw batch",{bind}}}\r\n'
        "--batch_AAA123\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
        f"PATCH {si.state.urls['dataverse']}/api/data/v9.2/incidents({bad_id}) HTTP/1.1\r\n"
        "Content-Type: application/json; type=entry\r\nIf-None-Match: *\r\n\r\n"
        f'{{"title":"x","nosuchcolumn":1,{bind}}}\r\n'
        "--batch_AAA123\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
        f"PATCH incidents({new_id}) HTTP/1.1\r\nContent-Type: application/json; type=entry\r\n"
        "If-None-Match: *\r\n\r\n"
        f'{{"title":"from a raw batch",{bind}}}\r\n'
        "--batch_AAA123--\r\n")
    headers = {"Authorization": f"Bearer {token}", "OData-MaxVersion": "4.0", "OData-Version": "4.0",
               "Accept": "application/json", "Content-Type": "multipart/mixed; boundary=batch_AAA123"}
    url = f"{si.state.urls['dataverse']}/api/data/v9.2/$batch"

    on = requests.post(url, data=body, headers={**headers, "Prefer": "odata.continue-on-error"},
                       verify=si.ca_path, timeout=10)
    assert on.status_code == 200 and on.headers["Content-Type"].startswith("multipart/mixed; boundary=")
    assert "odata.continue-on-error" in on.headers.get("Preference-Applied", "")
    parts = decode(on.headers["Content-Type"], on.content)
    assert [p.status for p in parts] == [204, 400, 412]  # created, refused, already exists
    assert json.loads(parts[1].body)["error"]["code"] == "0x80048d19"
    assert parts[0].headers["odata-entityid"].endswith(f"/incidents({new_id})")

    body2 = body.replace(new_id, str(uuid.uuid4()))
    off = requests.post(url, data=body2, headers=headers, verify=si.ca_path, timeout=10)
    assert [p.status for p in decode(off.headers["Content-Type"], off.content)] == [204, 400]  # stops there

    bad = requests.post(url, data=b"{}", headers={**headers, "Content-Type": "application/json"},
                        verify=si.ca_path, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["code"]


def test_execution_budget_counts_each_record_of_a_batch():
    """One $batch is one request, but its records' execution time is what the other budget counts."""
    p = Protection(window=60, max_requests=100, max_execution=1.0, cost=0.1)
    assert p.admit(1, records=10) is None  # ten records: one request, 1.0 s of execution
    refused = p.admit(1, records=1)
    assert refused is not None and refused[0] == "0x80072321" and 59 < refused[1] <= 60
    q = Protection(window=60, max_requests=2, max_execution=100.0, cost=0.1)
    assert q.admit(1, records=500) is None and q.admit(1, records=500) is None
    assert q.admit(1)[0] == "0x80072322"  # the request budget counts batches as one each


@pytest.mark.parametrize("raw", [
    # Microsoft's documented answer shape: CRLF, a 204 part and a 400 part with a JSON body
    ("--batchresponse_1\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
     "HTTP/1.1 204 No Content\r\nOData-Version: 4.0\r\n\r\n\r\n"
     "--batchresponse_1\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
     "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json; odata.metadata=minimal\r\n\r\n"
     '{"error":{"code":"0x80040216","message":"m"}}\r\n--batchresponse_1--\r\n'),
    # the same with bare LF line ends
    ("--batchresponse_1\nContent-Type: application/http\nContent-Transfer-Encoding: binary\n\n"
     "HTTP/1.1 204 No Content\nOData-Version: 4.0\n\n\n"
     "--batchresponse_1\nContent-Type: application/http\nContent-Transfer-Encoding: binary\n\n"
     "HTTP/1.1 400 Bad Request\nContent-Type: application/json\n\n"
     '{"error":{"code":"0x80040216","message":"m"}}\n--batchresponse_1--\n'),
], ids=["crlf", "lf"])
def test_decoder_reads_each_part(raw):
    parts = decode("multipart/mixed; boundary=batchresponse_1", raw.encode())
    assert [p.status for p in parts] == [204, 400]
    assert json.loads(parts[1].body)["error"]["code"] == "0x80040216"


def test_decoder_refuses_what_is_not_a_batch_answer():
    with pytest.raises(ValueError):
        decode("application/json", b'{"value":[]}')
