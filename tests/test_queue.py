"""The queue contract through Azurite: produced as the README tells producers, consumed as the host does."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.functions.queue import QueueMessage

from shared.intake import record_id
from tests.hostsim import Context, Out, QueueHost
from tools.queues import queue_client, send
from triggers import queue_intake

CASES = queue_intake.cases_queue.build().get_user_function()
LEADS = queue_intake.leads_queue.build().get_user_function()


@pytest.fixture
def queues(azurite, stack):
    """Fresh queue names per test, so tests never see each other's messages."""
    suffix = uuid.uuid4().hex[:8]
    names = {"cases": f"cases{suffix}", "leads": f"leads{suffix}"}
    yield names
    for base in names.values():
        for q in (base, f"{base}-rejected", f"{base}-poison"):
            try:
                queue_client(azurite.connection_string, q).delete_queue()
            except ResourceNotFoundError:
                pass


def drain(conn: str, queue: str) -> list[dict]:
    client = queue_client(conn, queue)
    out = []
    for _ in range(20):
        batch = list(client.receive_messages(messages_per_page=32, max_messages=32))
        if not batch:
            break
        out += [json.loads(m.content) for m in batch]
        for m in batch:
            client.delete_message(m)
    return out


def host(azurite, name: str, fn, **kw) -> QueueHost:
    return QueueHost(azurite.connection_string, name, fn, visibility_timeout=kw.pop("visibility_timeout", 0.2), **kw)


def test_message_creates_one_case_keyed_by_message_id(azurite, stack, queues):
    si = stack.si
    msg_id = send(azurite.connection_string, queues["cases"],
                  {"title": "From the queue", "customer": {"email": "caller@example.com", "lastName": "C"}})
    stats = host(azurite, queues["cases"], CASES).run(max_seconds=30)
    assert (stats.succeeded, stats.rejected, stats.poisoned) == (1, 0, 0)
    (row,) = si.records("incidents")
    assert row["incidentid"] == record_id("incident", queue_intake.KEY_SOURCE, msg_id)
    left = queue_client(azurite.connection_string, queues["cases"]).get_queue_properties()
    assert left.approximate_message_count == 0


def test_redelivered_message_creates_no_second_record(stack):
    si = stack.si
    body = json.dumps({"title": "t", "customer": {"contactId": si.seed_contact_id}}).encode()
    outs = []
    for dequeue_count in (1, 2):
        out = Out()
        CASES(QueueMessage(id="msg-1", body=body, dequeue_count=dequeue_count), out, Context())
        outs.append(out.value)
    assert outs == [None, None]
    assert len(si.records("incidents")) == 1


def test_external_id_wins_over_message_id(stack):
    si = stack.si
    body = json.dumps({"lastName": "Doe", "externalId": "crm-7", "source": "form"}).encode()
    for mid in ("m-1", "m-2"):  # the producer sent the same event twice
        LEADS(QueueMessage(id=mid, body=body, dequeue_count=1), Out(), Context())
    (row,) = si.records("leads")
    assert row["leadid"] == record_id("lead", "form", "crm-7")


@pytest.mark.parametrize(("body", "code"), [
    (b"not json at all", "unsupported_media_type"),
    (b"\xff\xfe\x00binary", "unsupported_media_type"),
    (json.dumps({"title": "", "customer": {}}).encode(), "invalid_request"),
])
def test_message_that_can_never_succeed_is_rejected_with_reason_and_body(azurite, stack, queues, body, code):
    client = queue_client(azurite.connection_string, queues["cases"], binary=True)
    client.create_queue()
    msg_id = client.send_message(body).id
    stats = host(azurite, queues["cases"], CASES).run(max_seconds=30)
    assert (stats.succeeded, stats.rejected, stats.poisoned, stats.failed_attempts) == (1, 1, 0, 0)
    (kept,) = drain(azurite.connection_string, f"{queues['cases']}-rejected")
    assert kept["reason"]["code"] == code
    assert kept["messageId"] == msg_id and kept["queue"] == "cases"
    original = kept["body"].encode() if "body" in kept else __import__("base64").b64decode(kept["bodyBase64"])
    assert original == body
    assert stack.si.counts["dataverse"]["total"] == 0


def test_payload_rejected_by_dataverse_is_rejected_not_retried(azurite, stack, queues):
    si = stack.si
    send(azurite.connection_string, queues["cases"], {"title": "t", "customer": {"contactId": si.seed_contact_id},
                                                      "attributes": {"new_missing": "x"}})
    stats = host(azurite, queues["cases"], CASES).run(max_seconds=30)
    assert (stats.rejected, stats.poisoned, stats.failed_attempts) == (1, 0, 0)
    (kept,) = drain(azurite.connection_string, f"{queues['cases']}-rejected")
    assert (kept["reason"]["code"], kept["reason"]["upstreamCode"]) == ("dynamics_payload_rejected", "0x80048d19")
    assert kept["reason"]["requestId"]
    assert json.loads(kept["body"])["attributes"] == {"new_missing": "x"}


def test_failure_outside_the_message_is_retried_then_poisoned(azurite, stack, queues):
    si = stack.si
    si.revoke_privilege("prvCreateLead")
    send(azurite.connection_string, queues["leads"], {"lastName": "Doe"})
    stats = host(azurite, queues["leads"], LEADS, max_dequeue_count=3).run(max_seconds=60)
    assert (stats.failed_attempts, stats.poisoned, stats.rejected) == (3, 1, 0)
    assert all("dynamics_privilege_missing" in e for e in stats.errors)
    (poisoned,) = drain(azurite.connection_string, f"{queues['leads']}-poison")
    assert poisoned == {"lastName": "Doe"}
    assert drain(azurite.connection_string, f"{queues['leads']}-rejected") == []


def test_throttling_beyond_the_budget_raises_where_nothing_can_defer_it(stack, monkeypatch):
    """Without queue storage to defer to (a bare harness), the host's retry is the fallback."""
    si = stack.si
    monkeypatch.delenv("AzureWebJobsStorage", raising=False)
    monkeypatch.setattr(queue_intake, "QUEUE_BUDGET", 0.5)
    si.fail_next("dataverse", 1, 429, retry_after=1)
    body = json.dumps({"title": "t", "customer": {"contactId": si.seed_contact_id}}).encode()
    with pytest.raises(Exception, match="dynamics_throttled"):
        CASES(QueueMessage(id="m-throttled", body=body, dequeue_count=1), Out(), Context())
    time.sleep(1.2)  # the instance holds its Dataverse requests until Retry-After has passed
    CASES(QueueMessage(id="m-throttled", body=body, dequeue_count=2), Out(), Context())
    assert len(si.records("incidents")) == 1


def test_transient_failures_recover_within_retries(azurite, stack, queues):
    si = stack.si
    for i in range(6):
        send(azurite.connection_string, queues["cases"], {"title": f"t{i}", "externalId": f"e{i}",
                                                          "customer": {"accountId": si.seed_account_id}})
    si.fail_next("dataverse", 12, 503)
    stats = host(azurite, queues["cases"], CASES).run(max_seconds=60)
    assert (stats.poisoned, stats.rejected) == (0, 0)
    assert len(si.records("incidents")) == 6
