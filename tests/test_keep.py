"""Nothing lost on the queue side (issue 20, items 2 and 6): what the function sets aside never expires,
envelopes fit the queue (or carry a claim check) and are checked like any input, and a fault only an
operator can fix holds messages behind a breaker instead of re-running the path for each one.
Through the functions' entry points, Azurite and the stand-in over real sockets."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime, timedelta

import pytest
from azure.functions.queue import QueueMessage

from shared import breaker, claims, deferral, diagnostics
from shared.intake import record_id
from tests.hostsim import Context, Out, receive_all
from tools.queues import queue_client, replay
from triggers import queue_intake

CASES = queue_intake.cases_queue.build().get_user_function()
LEADS = queue_intake.leads_queue.build().get_user_function()
QUEUES = ("cases", "cases-poison", "cases-rejected", "leads")
JP = "障害が発生しました。至急対応をお願いします。"  # 22 characters, 3 bytes each in UTF-8


def japanese_case(si, size: int) -> bytes:
    """A valid case of about `size` bytes of UTF-8, nearly all of it Japanese."""
    si.add_column("incidents", "new_notes", 20_000)
    description = (JP * 100)[:2000]
    doc = {"title": "障害", "description": description, "customer": {"contactId": si.seed_contact_id},
           "attributes": {"new_notes": ""}}
    room = size - len(json.dumps(doc, ensure_ascii=False).encode())
    doc["attributes"]["new_notes"] = (JP * 2000)[:room // 3]
    return json.dumps(doc, ensure_ascii=False).encode()


def test_everything_set_aside_never_expires(stack, storage_env, monkeypatch):
    si = stack.si
    monkeypatch.setattr(queue_intake, "QUEUE_BUDGET", 0.5)
    si.fail_next("dataverse", 1, 429, retry_after=30)
    CASES(QueueMessage(id="k-deferred", body=b'{"title": "t", "customer": {"contactId": "%s"}}'
                       % si.seed_contact_id.encode(), dequeue_count=1), Out(), Context())
    CASES(QueueMessage(id="k-rejected", body=b"not json", dequeue_count=1), Out(), Context())
    old = deferral.Envelope("k-old", datetime.now(UTC) - timedelta(hours=30), 40)
    si.fail_next("dataverse", 1, 503)
    CASES(QueueMessage(id="k-poison", body=deferral.wrap(b'{"title": "t", "customer": {"contactId": "%s"}}'
                                                         % si.seed_contact_id.encode(), old).encode(),
                       dequeue_count=1), Out(), Context())
    for queue in ("cases", "cases-poison", "cases-rejected"):
        (kept,) = queue_client(storage_env, queue).peek_messages(max_messages=5) if queue != "cases" else \
            [m for m in queue_client(storage_env, queue).receive_messages(visibility_timeout=1, max_messages=5)] or \
            [None]
        if kept is None:  # the deferred copy is invisible for Retry-After: read its expiry once it shows
            (kept,) = receive_all(storage_env, queue, wait=40)
        assert kept.expires_on.year == 9999, (queue, kept.expires_on)


def test_japanese_case_defers_compactly_and_is_created_once(stack, storage_env, monkeypatch):
    si = stack.si
    body = japanese_case(si, 34_000)
    assert 33_000 < len(body) < 35_000
    monkeypatch.setattr(queue_intake, "QUEUE_BUDGET", 0.5)
    si.fail_next("dataverse", 1, 429, retry_after=1)
    CASES(QueueMessage(id="jp-1", body=body, dequeue_count=1), Out(), Context())  # deferred, not raised
    (copy,) = receive_all(storage_env, "cases", wait=8)
    text = copy.content
    assert len(text) < len(body) + 1024  # the body once, unescaped (json.dumps default: about 69 KB)
    assert len(base64.b64encode(text)) < 64 * 1024
    got, envelope = deferral.unwrap(text, copy.id)
    assert got.decode() == body.decode() and envelope.claim is None and envelope.key == "jp-1"
    monkeypatch.setattr(queue_intake, "QUEUE_BUDGET", 20.0)
    CASES(QueueMessage(id=copy.id, body=text, dequeue_count=1), Out(), Context())
    (row,) = si.records("incidents")
    assert row["incidentid"] == record_id("incident", queue_intake.KEY_SOURCE, "jp-1")
    assert row["new_notes"] == json.loads(body)["attributes"]["new_notes"]


def test_body_near_the_producer_limit_is_deferred_by_claim_check_and_replays_once(stack, storage_env, monkeypatch):
    si = stack.si
    body = japanese_case(si, 48 * 1024 - 200)  # a producer's largest: base64 of it just fits 64 KiB
    assert len(base64.b64encode(body)) < 64 * 1024
    si.revoke_privilege("prvCreateIncident")
    old = deferral.Envelope("big-1", datetime.now(UTC) - timedelta(hours=30), 3)
    CASES(QueueMessage(id="big-1", body=body, dequeue_count=1), Out(), Context())  # deferred by claim check
    (copy,) = receive_all(storage_env, "cases", wait=10)
    doc = json.loads(copy.content)
    assert "body" not in doc and doc["claim"] == claims.name("cases", "big-1") and len(copy.content) < 2048
    # Past the age limit it is poisoned, still by claim; replay brings it back; once fixed, one record.
    breaker.reset()
    old.claim = doc["claim"]
    CASES(QueueMessage(id=copy.id, body=deferral.wrap(b"", old).encode(), dequeue_count=1), Out(), Context())
    (poisoned,) = queue_client(storage_env, "cases-poison", binary=True).peek_messages()
    assert json.loads(poisoned.content)["claim"] == old.claim
    si.grant_privilege("prvCreateIncident")
    breaker.reset()
    assert replay(storage_env, "cases") == 1
    (back,) = receive_all(storage_env, "cases", wait=5)
    CASES(QueueMessage(id=back.id, body=back.content, dequeue_count=1), Out(), Context())
    CASES(QueueMessage(id=back.id, body=back.content, dequeue_count=2), Out(), Context())  # a twin: no second row
    (row,) = si.records("incidents")
    assert row["incidentid"] == record_id("incident", queue_intake.KEY_SOURCE, "big-1")
    assert claims.get(old.claim) is None  # deleted once the record was done
    (twin,) = receive_all(storage_env, "cases-rejected")  # the twin came after: its claim was gone, kept with why
    assert json.loads(twin.content)["reason"]["code"] == "envelope_invalid"


@pytest.mark.parametrize(("change", "why"), [
    ({"key": "a\nb"}, "key"), ({"key": ""}, "key"), ({"attempt": -1}, "attempt"), ({"streak": 10**9}, "streak"),
    ({"firstSeen": "2999-01-01T00:00:00+00:00"}, "future"), ({"firstSeen": "2026-01-01T00:00:00"}, "time zone"),
    ({"body": None, "claim": "../etc/passwd"}, "claim-check name"), ({"body": None}, "neither"),
    ({"claim": "cases/" + "0" * 64}, "both"),
])
def test_forged_envelope_is_rejected_with_its_reason(stack, storage_env, captured_logs, change, why):
    si = stack.si
    doc = json.loads(deferral.wrap(b'{"title": "t", "customer": {"contactId": "%s"}}' % si.seed_contact_id.encode(),
                                   deferral.Envelope("k-1", datetime.now(UTC), 0)))
    doc.update(change)
    doc = {k: v for k, v in doc.items() if v is not None}
    raw = json.dumps(doc).encode()
    CASES(QueueMessage(id="forged-1", body=raw, dequeue_count=1), Out(), Context())
    (kept,) = receive_all(storage_env, "cases-rejected")
    record = json.loads(kept.content)
    assert record["reason"]["code"] == "envelope_invalid" and why in record["reason"]["message"]
    assert record["body"].encode() == raw and record["messageId"] == "forged-1"
    assert si.records("incidents") == [] and si.counts["dataverse"]["total"] == 0
    assert not any("a\nb" in t for t in captured_logs.texts)


def test_operator_fault_opens_the_breaker_probing_one_at_a_time(stack, storage_env, monkeypatch):
    si = stack.si
    monkeypatch.setattr(breaker, "BASE", 1.0)
    si.revoke_privilege("prvCreateIncident")
    bodies = {f"br-{i}": b'{"title": "b%d", "customer": {"contactId": "%s"}}' % (i, si.seed_contact_id.encode())
              for i in range(6)}
    ids = list(bodies)
    CASES(QueueMessage(id=ids[0], body=bodies[ids[0]], dequeue_count=1), Out(), Context())
    per_try = si.counts["dataverse"]["total"]
    assert per_try >= 1
    for mid in ids[1:]:
        CASES(QueueMessage(id=mid, body=bodies[mid], dequeue_count=1), Out(), Context())
    assert si.counts["dataverse"]["total"] == per_try  # held without a request
    (opened,) = breaker.state()
    assert (opened["scope"], opened["code"]) == ("incident", "dynamics_privilege_missing")
    LEADS(QueueMessage(id="lead-1", body=b'{"lastName": "Doe"}', dequeue_count=1), Out(), Context())
    assert len(si.records("leads")) == 1  # leads hold their privileges: not stopped
    report = diagnostics.run()
    assert report["breaker"] == breaker.state() and report["status"] != "ok"
    # While the fault lasts: each back-off lets one message probe; the rest are held again.
    baseline = si.counts["dataverse"]["total"]
    deliveries, started = 0, time.monotonic()
    while time.monotonic() - started < 4.0:
        for m in receive_all(storage_env, "cases"):
            CASES(QueueMessage(id=m.id, body=m.content, dequeue_count=1), Out(), Context())
            deliveries += 1
        time.sleep(0.1)
    probes = (si.counts["dataverse"]["total"] - baseline) // per_try
    assert deliveries > probes >= 1 and probes <= 3, (deliveries, probes)  # back-offs of 1 s, 2 s, 4 s
    assert si.records("incidents") == []
    # The operator grants the privilege: the next probe succeeds, the breaker closes, each is created once.
    si.grant_privilege("prvCreateIncident")
    deadline = time.monotonic() + 40
    while len(si.records("incidents")) < len(ids) and time.monotonic() < deadline:
        for m in receive_all(storage_env, "cases"):
            CASES(QueueMessage(id=m.id, body=m.content, dequeue_count=1), Out(), Context())
        time.sleep(0.2)
    rows = {r["incidentid"] for r in si.records("incidents")}
    assert rows == {record_id("incident", queue_intake.KEY_SOURCE, k) for k in ids}
    assert breaker.state() == [] and receive_all(storage_env, "cases-poison") == []
    assert receive_all(storage_env, "cases-rejected") == []
