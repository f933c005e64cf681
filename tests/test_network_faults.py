"""Every failure the network can produce, injected at the stand-in over real sockets, through the entry points.

A dropped body, a truncated or HTML 2xx (a gateway page), a gateway's own 502 page, a malformed $batch
part, a lost answer followed by a refusal: each ends as exactly one record or a classified answer,
never a 500, never a poisoned message, and an un-keyed create whose outcome is unknown is a 504 with
its record id.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from azure.functions.queue import QueueMessage

from shared import instance
from shared.batching import MIN_LEFT, UNSENT, Answer, Gatherer, Op
from shared.deadline import Deadline
from shared.errors import IntakeError
from shared.throttle import Gate
from tests.hostsim import Context, Out
from triggers import http_intake, queue_intake

CASES_QUEUE = queue_intake.cases_queue.build().get_user_function()
MANGLES = ("drop_body", "truncated_2xx", "html_2xx", "gateway_502")


def case(si, **extra) -> dict:
    return {"title": "Caller reports outage", "customer": {"contactId": si.seed_contact_id}, **extra}


def patches(si) -> list[int]:
    return [s for svc, m, _, s in si.request_log if svc == "dataverse" and m == "PATCH"]


@pytest.mark.parametrize("how", MANGLES)
@pytest.mark.parametrize("keyed", [True, False])
def test_a_damaged_answer_to_a_create_makes_one_record_and_no_500(stack, how, keyed):
    si = stack.si
    si.fail_next("dataverse", 1, how, method="PATCH")
    body = case(si, externalId="call-77") if keyed else case(si)
    status, out, _ = stack.call(http_intake.create_case, body=body)
    assert status in (200, 201), out
    assert len(si.records("incidents")) == 1
    assert out["id"] == si.records("incidents")[0]["incidentid"]
    assert len(patches(si)) >= 2  # the damaged answer was retried by the same id


@pytest.mark.parametrize("how", ("drop_body", "truncated_2xx", "html_2xx"))
def test_a_damaged_answer_to_a_lookup_is_retried(stack, how):
    si = stack.si
    si.fail_next("dataverse", 1, how, method="GET", path_contains="contacts")
    status, out, _ = stack.call(http_intake.create_case,
                                body={"title": "t", "customer": {"email": "ada@example.com"}})
    assert status == 201, out
    assert len(si.records("incidents")) == 1


@pytest.mark.parametrize("how", ("drop_body", "truncated_2xx", "html_2xx"))
def test_a_queue_message_is_not_poisoned_by_a_damaged_answer(stack, how):
    """Without a deferral queue the host would retry, and five retries end in -poison: the create itself
    must come through on its first delivery."""
    si = stack.si
    si.fail_next("dataverse", 1, how, method="PATCH")
    out = Out()
    CASES_QUEUE(QueueMessage(id="msg-damaged", body=json.dumps(case(si)).encode(), dequeue_count=1), out, Context())
    assert out.value is None
    assert len(si.records("incidents")) == 1


def test_an_unkeyed_create_whose_answer_was_lost_then_refused_is_a_504_with_its_record_id(stack):
    """Lost answer (applied), then a 401 whose refresh fails at Entra ID: the row may exist, and the caller
    must not be told to simply send again (that would make a second case)."""
    si = stack.si
    stack.call(http_intake.create_case, body=case(si))  # the token is cached
    si.fail_next("dataverse", 1, "timeout_after_apply", method="PATCH")
    si.fail_next("dataverse", 1, 401, method="PATCH")
    si.fail_next("entra", 20, 503)
    status, out, _ = stack.call(http_intake.create_case, body=case(si))
    assert status == 504, out
    assert out["error"]["code"] == "dynamics_outcome_unknown"
    rows = {r["incidentid"] for r in si.records("incidents")}
    assert out["error"]["recordId"] in rows  # the lost answer's row, under the id the caller is given


def test_an_unkeyed_create_whose_answer_was_lost_then_held_by_the_gate_is_a_504(stack):
    """Lost answer, then another request of the instance meets a 429 with a Retry-After past the deadline:
    the next attempt is refused before sending, and that must not hide the possibly created row."""
    si = stack.si
    stack.call(http_intake.create_case, body=case(si))
    si.fail_next("dataverse", 1, "timeout_after_apply", method="PATCH")
    si.fail_next("dataverse", 1, 429, retry_after=60, method="GET")
    result: dict = {}

    def create() -> None:
        result["answer"] = stack.call(http_intake.create_case, body=case(si))

    worker = threading.Thread(target=create)
    worker.start()
    time.sleep(0.3)  # the create is out, its answer will be lost after the stand-in's hold
    with pytest.raises(IntakeError):
        instance.intake().client.get("WhoAmI", budget=5)  # meets the 429: the gate holds the instance 60 s
    worker.join(20)
    status, out, _ = result["answer"]
    assert status == 504, out
    assert out["error"]["code"] == "dynamics_outcome_unknown"
    assert out["error"]["recordId"] in {r["incidentid"] for r in si.records("incidents")}


def test_a_retry_after_that_leaves_no_time_for_the_request_is_answered_at_once(stack):
    si = stack.si
    stack.call(http_intake.create_case, body=case(si))
    si.fail_next("dataverse", 1, 429, retry_after=14.8, method="PATCH")
    started = time.monotonic()
    status, out, resp = stack.call(http_intake.create_case, body=case(si, externalId="late-1"))
    elapsed = time.monotonic() - started
    assert (status, out["error"]["code"]) == (503, "dynamics_throttled")
    assert int(resp.headers["Retry-After"]) >= 14
    assert elapsed < 3, elapsed  # refused before waiting, not sent after the deadline with 50 ms timeouts


@pytest.mark.parametrize("how", ("malformed_batch", "drop_body", "truncated_2xx", "html_2xx"))
def test_a_damaged_batch_answer_gives_each_create_its_own_outcome(stack, how):
    si = stack.si
    stack.call(http_intake.create_case, body=case(si))
    instance.intake().client.batches.engage(0.1)
    instance.intake().client.batches.engage(0.1)
    si.fail_next("dataverse", 1, how, method="POST", path_contains="$batch")
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: stack.call(http_intake.create_case, body=case(si, externalId=f"b-{i}")),
                                range(6)))
    # A keyed create whose batch answer was lost finds its row on the resend (412): 200, the same id.
    assert all(a[0] in (200, 201) for a in answers), [a[1] for a in answers]
    assert len(si.records("incidents")) == 7
    assert {a[1]["id"] for a in answers} <= {r["incidentid"] for r in si.records("incidents")}
    assert len({a[1]["id"] for a in answers}) == 6
    assert si.counts["dataverse"].get(("POST", "batch"), 0) >= 1


def test_a_429_inside_a_batch_part_holds_the_instance_before_the_part_is_sent_again(stack):
    si = stack.si
    stack.call(http_intake.create_case, body=case(si))
    client = instance.intake().client
    client.batches.engage(0.1)
    si.fail_next("dataverse", 1, 429, code="0x80072321", retry_after=1.0, method="PATCH", in_batch=True)
    waits = client.gate.waits
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: stack.call(http_intake.create_case, body=case(si, externalId=f"p-{i}")),
                                range(6)))
    assert sorted(a[0] for a in answers) == [201] * 6, [a[1] for a in answers]
    assert 429 in [s for svc, m, _, s in si.request_log if svc == "dataverse" and m == "PATCH"]
    assert si.counts["dataverse"].get(("POST", "batch"), 0) >= 1
    assert client.gate.waits > waits  # the part's 429 held the instance; its resend waited Retry-After


def test_a_short_member_of_a_batch_does_not_fail_the_long_ones():
    """The batch is refused for a cause that passes (throttled past its shortest deadline): the members
    with time of their own go on alone instead of sharing that failure."""
    def send(ops, deadline, call):
        raise IntakeError("dynamics_throttled", "held past the deadline", retry_after=30)

    gatherer = Gatherer(send, window=0.2, size=4)
    gatherer.engage(0.1)
    gatherer.engage(0.1)
    deadlines = [Deadline(MIN_LEFT + 0.5), Deadline(60), Deadline(60)]
    with ThreadPoolExecutor(3) as pool:
        futures = []
        for d in deadlines:
            futures.append(pool.submit(gatherer.submit, Op("incidents(x)", b"{}"), d))
            time.sleep(0.02)
        results = [f.result(timeout=5) for f in futures]
    assert results[1:] == [UNSENT, UNSENT]


def test_a_create_with_too_little_time_left_is_never_held_for_a_batch():
    gatherer = Gatherer(lambda ops, deadline, call: [], window=0.5, size=4)
    gatherer.engage(0.1)
    gatherer._busy = 3  # others in flight
    started = time.monotonic()
    assert gatherer.submit(Op("incidents(x)", b"{}"), Deadline(MIN_LEFT - 0.5)) is UNSENT
    assert time.monotonic() - started < 0.1


def test_a_failure_while_accounting_never_leaks_a_gate_slot(stack, monkeypatch):
    si = stack.si
    instance.reset(read_timeout=1.0, backoff=0.05, concurrency=1)
    stack.call(http_intake.create_case, body=case(si))
    gate = instance.intake().client.gate
    calls = {"n": 0}
    original = gate.hint

    def broken_hint(dop: int) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("accounting failed")
        original(dop)

    monkeypatch.setattr(gate, "hint", broken_hint)
    status, _, _ = stack.call(http_intake.create_case, body=case(si, externalId="leak-1"))
    assert status == 500
    assert gate.active == 0
    started = time.monotonic()
    status, out, _ = stack.call(http_intake.create_case, body=case(si, externalId="leak-2"))
    assert status == 201, out
    assert time.monotonic() - started < 5


def test_creates_waiting_at_a_full_gate_go_out_together_when_a_slot_frees():
    """One slot per instance (the template's topology): the creates that wait for it ride in one $batch."""
    gate = Gate(1)
    sent: list[int] = []

    def send(ops, deadline, call):
        sent.append(len(ops))
        return [Answer(204, {}, b"") for _ in ops]

    gatherer = Gatherer(send, window=0.02, size=10, gate=gate)
    gate.enter(Deadline(5))  # another request holds the only slot
    with ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(gatherer.submit, Op(f"incidents({i})", b"{}"), Deadline(30)) for i in range(5)]
        time.sleep(0.3)
        assert sent == []  # nobody sends while the slot is taken
        gate.leave(204)
        results = [f.result(timeout=5) for f in futures]
    # The first create found nothing else in flight and went alone; the four that waited went as one batch.
    assert sent == [4]
    assert sum(isinstance(r, Answer) for r in results) == 4


def test_an_instance_with_one_slot_sends_its_waiting_creates_as_batches(stack):
    si = stack.si
    instance.reset(read_timeout=2.0, backoff=0.05, concurrency=1)
    si.set_latency("dataverse", 0.05)
    stack.call(http_intake.create_case, body=case(si))
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: stack.call(http_intake.create_case, body=case(si, externalId=f"g-{i}")),
                                range(16)))
    assert sorted(a[0] for a in answers) == [201] * 16, [a[1] for a in answers]
    assert len(si.records("incidents")) == 17
    gatherer = instance.intake().client.batches
    sent_alone = si.counts["dataverse"].get(("PATCH", "patch"), 0) - gatherer.batched  # a part counts as a PATCH
    requests = sent_alone + si.counts["dataverse"].get(("POST", "batch"), 0)
    assert requests <= 8, (requests, si.counts["dataverse"])  # 17 creates in fewer requests: they rode together
