"""The followups queue (issue 22) under the host's queue semantics (tests/hostsim.py) on Azurite: a follow-up that
overtakes its create is deferred and applied once the record exists; redelivery applies nothing twice; a
follow-up the case's state refuses goes to followups-rejected."""

from __future__ import annotations

import base64
import json

import pytest
from azure.functions.queue import QueueMessage

from shared import deferral
from shared.followups import note_id
from shared.intake import record_id
from tests.hostsim import Context, Out, QueueHost
from tools.queues import queue_client, send
from triggers import followups_queue, http_intake

FOLLOWUPS = followups_queue.followups_queue.build().get_user_function()
QUEUES = ("followups", "followups-rejected", "followups-poison")
REF = {"externalId": "conv-77", "source": "genesys"}


@pytest.fixture
def storage_env(storage_env, monkeypatch):
    """The queues of QUEUES (conftest), with a first deferral of about a second."""
    monkeypatch.setattr(deferral, "BACKOFF_BASE", 1.0)
    return storage_env


def run(conn: str, seconds: float = 20.0, idle: float = 1.5):
    return QueueHost(conn, "followups", FOLLOWUPS, visibility_timeout=0.2).run(max_seconds=seconds,
                                                                             idle_seconds=idle)


def create_case(stack, ref=REF):
    status, got, _ = stack.call(http_intake.create_case, body={"title": "Call", "customer": {
        "contactId": stack.si.seed_contact_id}, **ref})
    assert status == 201, got
    return got["id"]


def rejected(conn: str) -> list[dict]:
    client = queue_client(conn, "followups-rejected")
    got = list(client.receive_messages(max_messages=32))
    return [json.loads(m.content) for m in got]


NOTE = {"op": "note", "entity": "case", "case": REF, "noteId": "wrap-77", "text": "Wrap-up: refund promised.",
        "attachment": {"fileName": "t.txt", "mimeType": "text/plain", "contentBase64": base64.b64encode(b"x").decode()}}
RESOLVE = {"op": "resolve", "entity": "case", "case": REF, "resolution": {"subject": "Refunded"}}


def test_follow_ups_that_overtake_their_create_are_deferred_then_applied_once(stack, storage_env):
    si = stack.si
    send(storage_env, "followups", NOTE)
    send(storage_env, "followups", RESOLVE)
    stats = run(storage_env, seconds=3, idle=0.5)  # before the create: each is deferred, none rejected or applied
    assert (stats.rejected, stats.poisoned, stats.failed_attempts) == (0, 0, 0)
    assert si.records("annotations") == [] and si.records("incidentresolutions") == []
    assert queue_client(storage_env, "followups").get_queue_properties().approximate_message_count == 2
    rid = create_case(stack)
    stats = run(storage_env, seconds=30)
    assert (stats.rejected, stats.poisoned, stats.errors) == (0, 0, [])
    (note,) = si.records("annotations")
    assert (note["annotationid"], note["_objectid_value"]) == (note_id(rid, "wrap-77"), rid)
    (case,) = si.records("incidents")
    assert (case["statecode"], len(si.records("incidentresolutions"))) == (1, 1)
    assert rejected(storage_env) == []
    # Redelivery (a crash before the host completed the message): nothing is applied twice.
    for body in (NOTE, RESOLVE):
        out = Out()
        FOLLOWUPS(QueueMessage(id="again", body=json.dumps(body).encode(), dequeue_count=2), out, Context())
        assert out.value is None
    assert len(si.records("annotations")) == 1 and len(si.records("incidentresolutions")) == 1


def test_a_follow_up_the_state_refuses_goes_to_rejected_not_deferral(stack, storage_env):
    rid = create_case(stack)
    send(storage_env, "followups", {"op": "cancel", "entity": "case", "case": {"id": rid}})
    assert run(storage_env).succeeded == 1
    send(storage_env, "followups", RESOLVE)
    send(storage_env, "followups", {"op": "update", "entity": "lead", "lead": REF, "changes": {"priority": "low"}})
    stats = run(storage_env)
    assert (stats.poisoned, stats.failed_attempts) == (0, 0)
    reasons = sorted(r["reason"]["code"] for r in rejected(storage_env))
    assert reasons == ["invalid_request", "record_state_conflict"]
    assert stack.si.records("incidentresolutions") == []
    assert queue_client(storage_env, "followups").get_queue_properties().approximate_message_count == 0
    assert record_id("incident", "genesys", "conv-77") == rid
