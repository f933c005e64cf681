"""Deferral (issue 10): a message failing for a cause outside it spends no delivery and is never poisoned
by the host; past the age limit, or when nobody can classify its failure, the function sets it aside in
<queue>-poison as an envelope that replays under its original key: exactly one record, keyed or not."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime, timedelta

from azure.functions.queue import QueueMessage

from shared import breaker, deferral, instance
from shared.intake import record_id
from tests.hostsim import Context, Out, receive_all
from tools.queues import queue_client, replay
from triggers import queue_intake

CASES = queue_intake.cases_queue.build().get_user_function()


def case(si, **extra) -> bytes:
    return json.dumps({"title": "t", "customer": {"contactId": si.seed_contact_id}, **extra}).encode()


def test_throttled_message_is_deferred_for_retry_after_and_created_once_under_its_key(stack, storage_env,
                                                                                      monkeypatch):
    si = stack.si
    monkeypatch.setattr(queue_intake, "QUEUE_BUDGET", 0.5)
    si.fail_next("dataverse", 1, 429, retry_after=2)
    CASES(QueueMessage(id="m-1", body=case(si), dequeue_count=1), Out(), Context())  # returns: no delivery spent
    assert si.records("incidents") == []
    assert receive_all(storage_env, "cases") == []  # invisible until Retry-After has passed
    (copy,) = receive_all(storage_env, "cases", wait=6)
    body, envelope = deferral.unwrap(copy.content, copy.id)
    assert (envelope.key, envelope.attempt, envelope.reason["code"]) == ("m-1", 1, "dynamics_throttled")
    assert json.loads(body) == json.loads(case(si))  # the original body, unchanged
    time.sleep(0.5)
    monkeypatch.setattr(queue_intake, "QUEUE_BUDGET", 20.0)
    CASES(QueueMessage(id=copy.id, body=copy.content, dequeue_count=1), Out(), Context())
    CASES(QueueMessage(id="m-1", body=case(si), dequeue_count=2), Out(), Context())  # a crash left the original
    (row,) = si.records("incidents")
    assert row["incidentid"] == record_id("incident", queue_intake.KEY_SOURCE, "m-1")


def test_outage_defers_with_growing_backoff_not_poison(stack, storage_env, captured_logs):
    si = stack.si
    si.revoke_privilege("prvCreateIncident")  # a fault an operator will fix: not the message's
    body = case(si)
    for attempt in range(3):
        breaker.reset()  # the back-off of deferral itself, as each instance's first message meets it
        raw = body if attempt == 0 else deferral.wrap(body, deferral.Envelope("m-priv", datetime.now(UTC),
                                                                              attempt, streak=attempt)).encode()
        CASES(QueueMessage(id=f"copy-{attempt}", body=raw, dequeue_count=1), Out(), Context())  # never raises
    delays = [int(re.search(r"delay=(\d+)s", t).group(1)) for t in captured_logs.texts if "message deferred" in t]
    assert len(delays) == 3 and delays[0] < delays[2] <= deferral.BACKOFF_CAP, delays
    assert queue_client(storage_env, "cases").get_queue_properties().approximate_message_count == 3
    assert receive_all(storage_env, "cases-poison") == []


def test_too_old_or_unclassified_goes_to_poison_as_an_envelope_and_replays_exactly_once(stack, storage_env,
                                                                                       monkeypatch):
    si = stack.si
    si.revoke_privilege("prvCreateIncident")
    old = deferral.Envelope("m-old", datetime.now(UTC) - timedelta(hours=30), 40)
    unkeyed = case(si)  # no externalId: the message id is the key
    CASES(QueueMessage(id="copy-9", body=deferral.wrap(unkeyed, old).encode(), dequeue_count=1), Out(), Context())
    real_intake = instance.intake

    def broken():  # a failure nobody can classify
        raise RuntimeError("unexpected")

    monkeypatch.setattr(instance, "intake", broken)
    breaker.reset()  # the old envelope's fault opened it; this message must reach the intake
    poison = queue_client(storage_env, "cases-poison", binary=True)
    # Its first occurrence may be a transient nobody classified: deferred under its key, not poisoned.
    CASES(QueueMessage(id="m-crash", body=case(si, title="crash"), dequeue_count=1), Out(), Context())
    assert [deferral.unwrap(m.content, m.id)[1].key for m in poison.peek_messages(max_messages=32)] == ["m-old"]
    # The same failure again and again (the copy's envelope says so): set aside in -poison, kept.
    again = deferral.Envelope("m-crash", datetime.now(UTC), queue_intake.UNCLASSIFIED_TRIES - 1,
                              {"code": "internal_error"}, streak=queue_intake.UNCLASSIFIED_TRIES - 1)
    CASES(QueueMessage(id="copy-crash", body=deferral.wrap(case(si, title="crash"), again).encode(),
                       dequeue_count=1), Out(), Context())
    monkeypatch.setattr(instance, "intake", real_intake)
    peeked = [deferral.unwrap(m.content, m.id)[1] for m in poison.peek_messages(max_messages=32)]
    assert sorted(e.key for e in peeked) == ["m-crash", "m-old"]
    si.grant_privilege("prvCreateIncident")  # the operator fixes the cause
    assert replay(storage_env, "cases") == 2
    copies = queue_client(storage_env, "cases", binary=True).peek_messages(max_messages=32)
    assert all(deferral.unwrap(m.content, m.id)[1].replayed_at for m in copies)  # the age limit restarts
    for msg in receive_all(storage_env, "cases", wait=5):  # the host delivers the replayed copies
        CASES(QueueMessage(id=msg.id, body=msg.content, dequeue_count=1), Out(), Context())
    rows = {r["incidentid"] for r in si.records("incidents")}
    assert rows == {record_id("incident", queue_intake.KEY_SOURCE, k) for k in ("m-old", "m-crash")}
