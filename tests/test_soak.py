"""Soak: many queue messages through Azurite and the host simulation while Dataverse misbehaves.

What is enqueued (seeded, `INTAKE_SOAK_SEED`, default 20250), with `tools.queues.send` (base64):

* N messages in all (`INTAKE_SOAK_N`, default 500), cases and leads, about half each;
* 10 % exact duplicates: the same body enqueued twice; every duplicated event has an externalId
  (an un-keyed exact duplicate cannot be told from a second event);
* about a quarter of the other events carry no externalId: they are keyed by their queue message id;
* 2 % malformed: not JSON, not an object, failing validation, or naming a column Dataverse lacks;
* customers by contactId, by accountId, by email (a pool of repeat callers, mixed case and blanks,
  the seed contact among them) and by phone (repeat callers in several spellings of one number).

Both queues are processed at once by `QueueHost` (batchSize and newBatchThreshold from host.json,
visibility timeout 1 s so retries happen within the run) while the stand-in injects: 5 % server
errors, 2 % writes applied but never answered (the client's read timeout is below the hold time),
a token revocation every few hundred Dataverse requests, bursts of 429 with Retry-After, and one
rotation of the client secret in the vault mid-run.

Follow-ups ride along on the `followups` queue (issue 22): a note for about 30 % of the keyed cases
(10 % of them sent twice) and a resolve for half of those, enqueued from the start, so many arrive
before their create. Here no queue storage is configured (the harness reads `-rejected` from the output
binding), so an overtaking follow-up is retried by the host (visibility 1 s, a dequeue limit high enough
to outwait its create) rather than deferred: tests/test_followups_queue.py covers deferral.

Asserted at the end: records created = unique valid events (exactly the expected ids), duplicates
created = 0, one note per planned noteId and one case resolution per planned resolve (none rejected
or poisoned), contacts created once per caller, malformed = messages in <queue>-rejected (each with
its reason and original body), poisoned = 0, lost = 0 (each message completed exactly once).
The figures are printed (`capsys.disabled()`, so they show without -s) and kept in `RESULTS`.

Large run (about 5 minutes on 2 cores; 10,000 messages, ~36 messages/s end to end):

    INTAKE_SOAK_N=10000 .venv/bin/python -m pytest tests/test_soak.py -q
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

from shared import instance
from shared.followups import note_id
from shared.intake import ENTITY_SETS, record_id
from tests.hostsim import QueueHost, drain
from tools.queues import ensure, queue_client, send
from triggers import followups_queue, queue_intake

N = int(os.environ.get("INTAKE_SOAK_N", "500"))
SEED = int(os.environ.get("INTAKE_SOAK_SEED", "20250"))
READ_TIMEOUT = 1.0  # the client's read timeout ...
HOLD_SECONDS = 2.0  # ... below the time the stand-in holds an applied write without answering
REVOKE_EVERY = 250  # Dataverse requests between token revocations
BURST_EVERY = 400  # Dataverse requests between 429 bursts
BURST_SECONDS = 1.0  # how long every Dataverse request answers 429 in one burst
WINDOW = 1000  # messages enqueued ahead of the consumers, at most
RESULTS: dict[str, Any] = {}


@dataclass
class Planned:
    queue: str  # "cases" | "leads"
    body: str
    kind: str  # event | duplicate | not_json | not_object | invalid | unknown_column
    entity: str
    event: int | None = None  # index of the valid event this message carries
    external_id: str | None = None
    source: str | None = None
    expect_code: str | None = None  # the reason a malformed message is rejected with
    message_id: str = ""


EMAILS = [f"caller{k}@example.com" for k in range(40)] + ["ada@example.com"]
PHONES = [f"+1555020{k:02d}" for k in range(15)]


def _email_variant(rng: random.Random, email: str) -> str:
    pick = rng.random()
    if pick < 0.2:
        return email.upper()
    if pick < 0.35:
        return f"  {email} "
    return email


def _phone_variant(rng: random.Random, phone: str) -> str:
    digits = phone[1:]
    return rng.choice([phone, f"+{digits[0]} {digits[1:4]} {digits[4:]}", f"+{digits[0]} ({digits[1:4]}) {digits[4:]}",
                       f"+{digits[0]}-{digits[1:4]}-{digits[4:]}"])


def _phone_key(phone: str) -> str:
    return ("+" if phone.strip().startswith("+") else "") + re.sub(r"\D", "", phone)


def _case(rng: random.Random, i: int, si: Any) -> dict:
    body: dict[str, Any] = {"title": f"Soak case {i}"}
    way = rng.random()
    if way < 0.15:
        body["customer"] = {"contactId": si.seed_contact_id}
    elif way < 0.25:
        body["customer"] = {"accountId": si.seed_account_id.upper()}
    elif way < 0.8:
        body["customer"] = {"email": _email_variant(rng, rng.choice(EMAILS))}
    else:
        body["customer"] = {"phone": _phone_variant(rng, rng.choice(PHONES)), "lastName": "Caller"}
    if rng.random() < 0.5:
        body["priority"] = rng.choice(["high", "normal", "low", "HIGH"])
    if rng.random() < 0.5:
        body["origin"] = rng.choice(["phone", "email", "web"])
    if rng.random() < 0.3:
        body["description"] = "Line dead since the storm, quote: \"it's gone\" " * rng.randint(1, 3)
    if rng.random() < 0.2:
        body["attributes"] = {"new_customfield": f"v{i}"}
    return body


def _lead(rng: random.Random, i: int) -> dict:
    body: dict[str, Any] = {"lastName": f"Soak{i}"}
    if rng.random() < 0.7:
        body["firstName"] = rng.choice(["Ann", "Bo", "Chloé", "D'Arcy"])
    if rng.random() < 0.6:
        body["email"] = _email_variant(rng, rng.choice(EMAILS))
    if rng.random() < 0.5:
        body["company"] = rng.choice(["Acme", "Contoso", "Fabrikam & Sons"])
    if rng.random() < 0.3:
        body["phone"] = _phone_variant(rng, rng.choice(PHONES))
    if rng.random() < 0.2:
        body["attributes"] = {"new_customfield": f"v{i}"}
    return body


def _malformed(rng: random.Random, k: int, si: Any) -> Planned:
    queue = "cases" if k % 2 == 0 else "leads"
    entity = "incident" if queue == "cases" else "lead"
    kind = ["not_json", "not_object", "invalid", "unknown_column"][k % 4]
    if kind == "not_json":
        body, code = rng.choice(["title=outage&customer=me", "{\"title\": \"cut off", "\u00ff not json"]), \
            "unsupported_media_type"
    elif kind == "not_object":
        body, code = rng.choice(['["a case"]', '"a case"', "42", "null"]), "unsupported_media_type"
    elif kind == "invalid":
        body = json.dumps({"priority": "urgent", "customer": {"email": "nope"}} if queue == "cases"
                          else {"firstName": "NoLastName", "email": "x@"})
        code = "invalid_request"
    else:
        good = ({"title": f"bad column {k}", "customer": {"contactId": si.seed_contact_id}} if queue == "cases"
                else {"lastName": f"BadColumn{k}"})
        body, code = json.dumps({**good, "attributes": {"new_nosuchcolumn": "x"}}), "dynamics_payload_rejected"
    return Planned(queue, body, kind, entity, expect_code=code)


def plan(n: int, seed: int, si: Any) -> tuple[list[Planned], list[Planned]]:
    """(messages in enqueue order, the valid events); deterministic for a seed."""
    rng = random.Random(seed)
    n_dup = n // 10
    n_bad = max(n * 2 // 100, 4)
    n_unique = n - n_dup - n_bad
    events: list[Planned] = []
    for i in range(n_unique):
        is_case = rng.random() < 0.5
        body = _case(rng, i, si) if is_case else _lead(rng, i)
        ext = src = None
        if rng.random() < 0.75:
            ext = f"soak-{seed}-{i}"
            body["externalId"] = ext
            if rng.random() < 0.5:
                src = rng.choice(["genesys", "webform"])
                body["source"] = src
        events.append(Planned("cases" if is_case else "leads", json.dumps(body), "event",
                              "incident" if is_case else "lead", i, ext, src))
    keyed = [e for e in events if e.external_id]
    assert len(keyed) >= n_dup, "not enough keyed events to duplicate"
    dups = [Planned(e.queue, e.body, "duplicate", e.entity, e.event, e.external_id, e.source)
            for e in rng.sample(keyed, n_dup)]
    bad = [_malformed(rng, k, si) for k in range(n_bad)]
    messages = events + dups + bad
    rng.shuffle(messages)
    return messages, events


FOLLOWUP_SHARE = 0.3  # of the keyed case events, that get a note (and half of those a resolve)


def plan_followups(events: list[Planned], seed: int) -> list[Planned]:
    """Notes and resolves on keyed cases, in random order: many arrive before their create."""
    rng = random.Random(seed + 2)
    out: list[Planned] = []
    for e in events:
        if e.entity != "incident" or not e.external_id or rng.random() >= FOLLOWUP_SHARE:
            continue
        ref = {"externalId": e.external_id, **({"source": e.source} if e.source else {})}
        note = json.dumps({"op": "note", "entity": "case", "case": ref, "noteId": f"note-{e.event}",
                           "text": f"Wrap-up of call {e.event}: \"callback\" promised"})
        out.append(Planned("followups", note, "note", "incident", e.event, e.external_id, e.source))
        if rng.random() < 0.1:
            out.append(Planned("followups", note, "note", "incident", e.event, e.external_id, e.source))
        if rng.random() < 0.5:
            resolve = json.dumps({"op": "resolve", "entity": "case", "case": ref,
                                  "resolution": {"subject": f"Resolved {e.event}"}})
            out.append(Planned("followups", resolve, "resolve", "incident", e.event, e.external_id, e.source))
    rng.shuffle(out)
    return out


class Chaos:
    """Token revocations, 429 bursts and one secret rotation, paced by the Dataverse request count."""

    def __init__(self, si: Any, completed: Any, rotate_at: int, seconds: float) -> None:
        self.si = si
        self.completed = completed
        self.rotate_at = rotate_at
        self.seconds = seconds
        self.stop = threading.Event()
        self.revocations = 0
        self.bursts = 0
        self.rotated_at: int | None = None
        self.vault_reads_at_rotation = 0
        self.thread = threading.Thread(target=self._run, name="soak-chaos", daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.seconds
        next_revoke, next_burst = REVOKE_EVERY, BURST_EVERY // 2
        while not self.stop.is_set() and time.monotonic() < deadline:
            total = self.si.counts["dataverse"]["total"]
            if self.rotated_at is None and self.completed() >= self.rotate_at:
                self.vault_reads_at_rotation = vault_reads(self.si)
                self.si.rotate_dynamics_secret()  # the old secret is removed in Entra ID
                self.si.revoke_tokens()  # so the next token must be acquired with the new one
                self.rotated_at = self.completed()
                self.revocations += 1
            if total >= next_revoke:
                self.si.revoke_tokens()
                self.revocations += 1
                next_revoke = total + REVOKE_EVERY
            if total >= next_burst:
                self.si.throttle_for(BURST_SECONDS)  # the user's window is spent: 429 until it frees
                self.bursts += 1
                next_burst = total + BURST_EVERY
            self.stop.wait(0.02)

    def __enter__(self) -> Chaos:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def vault_reads(si: Any) -> int:
    return si.counts["vault"].get(("GET", "secret_get"), 0)


def count_faults(si: Any) -> Counter:
    """Wrap the stand-in's fault picker to count what it really injected (so the soak proves it had faults)."""
    faults = si.state.faults
    original = faults.pick
    seen: Counter = Counter()
    lock = threading.Lock()

    def pick(service: str, method: str, path: str, rates: bool = True, in_batch: bool = False) -> Any:
        fault = original(service, method, path, rates=rates, in_batch=in_batch)
        if fault is not None:
            with lock:
                seen["hold" if fault.kind == "hold" else str(fault.status)] += 1
        return fault

    faults.pick = pick
    return seen


def throttled_answers(si: Any) -> Counter:
    """429s of the time-based bursts (Chaos: throttle_for), which answer without the fault picker."""
    return Counter({"429": sum(1 for svc, _, _, status in si.request_log if svc == "dataverse" and status == 429)})


def report(capsys: Any, figures: dict[str, Any]) -> str:
    text = "soak: " + ", ".join(f"{k}={v}" for k, v in figures.items())
    with capsys.disabled():
        print("\n" + text)
    return text


@pytest.mark.soak
def test_soak_queues_under_faults(stack, azurite, capsys):
    si = stack.si
    conn = azurite.connection_string
    tag = uuid.uuid4().hex[:8]
    names = {"cases": f"soak{tag}-cases", "leads": f"soak{tag}-leads", "followups": "followups"}
    messages, events = plan(N, SEED, si)
    followups = plan_followups(events, SEED)
    for q in ("followups", "followups-rejected", "followups-poison"):  # the trigger's own queue name
        ensure(queue_client(conn, q)).clear_messages()

    # Faults: rates for every Dataverse request, timeouts below the hold time.
    instance.reset(read_timeout=READ_TIMEOUT, backoff=0.05)
    si.set_hold_seconds(HOLD_SECONDS)
    si.fault_rates("dataverse", rate_5xx=0.05, rate_timeout_after_apply=0.02, retry_after=1)
    injected = count_faults(si)

    # Outages aimed at a few keyed events' own rows (never duplicated ones), so that some messages surely fail a
    # whole delivery and are retried by the host: 5 server errors, or 8 writes applied but never answered (a
    # create that went in a $batch whose answer is lost meets 4 of them there, the $batch being retried as a
    # whole, then 4 more sent alone: the stand-in's fault picker now sees batch parts, issue 22 fixed the soak's
    # counting wrapper that refused them).
    rng = random.Random(SEED + 1)
    counts = Counter(m.body for m in messages)
    targets = rng.sample([m for m in messages if m.kind == "event" and m.external_id and counts[m.body] == 1],
                         max(4, N // 100))
    for k, m in enumerate(targets):
        fault = 503 if k % 2 == 0 else "timeout_after_apply"
        rid = record_id(m.entity, m.source, m.external_id)
        # PATCH: the create itself, not a follow-up's read of the same row
        si.fail_next("dataverse", 5 if fault == 503 else 8, fault, method="PATCH",
                     path_contains=f"{ENTITY_SETS[m.entity]}({rid})")

    completions: Counter = Counter()
    deliveries: dict[str, int] = {}
    done = [0]
    lock = threading.Lock()

    def tracked(fn: Any) -> Any:
        def call(msg: Any, out: Any, ctx: Any) -> None:
            fn(msg, out, ctx)  # raises: the host retries; returns: the host completes the message
            with lock:
                completions[msg.id] += 1
                deliveries[msg.id] = msg.dequeue_count
                done[0] += 1
        return call

    def completed() -> int:
        with lock:
            return done[0]

    hosts = {q: QueueHost(conn, names[q], tracked(getattr(queue_intake, f"{q}_queue").build().get_user_function()),
                          visibility_timeout=1)
             for q in ("cases", "leads")}
    # A follow-up before its create is retried by the host here (no queue storage configured: see above).
    hosts["followups"] = QueueHost(conn, "followups", tracked(followups_queue.followups_queue.build()
                                                              .get_user_function()),
                                   visibility_timeout=1, max_dequeue_count=200)
    max_seconds = 90 + N * 0.08
    deadline = time.monotonic() + max_seconds

    enqueued = threading.Semaphore(0)

    def produce() -> float:
        """Enqueue as producers do (tools.queues.send, base64, a few at once), at most WINDOW ahead of the
        consumers: a queue kept shallow is what a live system sees, and what Azurite handles at speed."""
        t0 = time.monotonic()
        sequence = followups + messages  # follow-ups first: a share surely overtakes its create
        with ThreadPoolExecutor(max_workers=4) as senders:
            futures = []
            for i, m in enumerate(sequence):
                while i - completed() > WINDOW and time.monotonic() < deadline:
                    time.sleep(0.01)
                futures.append(senders.submit(send, conn, names[m.queue], m.body))
                futures[-1].add_done_callback(lambda _: enqueued.release())
            for m, f in zip(sequence, futures, strict=True):
                m.message_id = f.result(timeout=max(deadline - time.monotonic(), 1))
        return time.monotonic() - t0

    started = time.monotonic()
    with Chaos(si, completed, rotate_at=N * 2 // 5, seconds=max_seconds) as chaos, \
            ThreadPoolExecutor(max_workers=4) as pool:
        producer = pool.submit(produce)
        for _ in range(min(N, 50)):  # the consumers start on a queue that has messages
            assert enqueued.acquire(timeout=60), producer.exception(timeout=1) if producer.done() else "stuck"

        def consume(h: QueueHost) -> Any:
            """The host's run, resumed if it went idle while the producer was still at work (a stall)."""
            while True:
                stats = h.run(idle_seconds=2.0, max_seconds=max(deadline - time.monotonic(), 1))
                if producer.done() or time.monotonic() >= deadline:
                    return stats

        runs = {q: pool.submit(consume, h) for q, h in hosts.items()}
        enqueue_s = producer.result(timeout=max_seconds + 30)
        stats = {q: f.result(timeout=max_seconds + 30) for q, f in runs.items()}
    elapsed = time.monotonic() - started
    follow_stats = stats.pop("followups")
    follow_host = hosts.pop("followups")
    si.clear_faults()
    ids = [m.message_id for m in messages]
    assert len(set(ids)) == N and all(ids)

    # What is left in each queue.
    leftover = {q: h.client.get_queue_properties().approximate_message_count for q, h in hosts.items()}
    poisoned = {q: len(drain(h.poison)) for q, h in hosts.items()}
    rejected_msgs = {q: drain(h.output) for q, h in hosts.items()}
    rejected = {json.loads(m.content)["messageId"]: json.loads(m.content)
                for msgs in rejected_msgs.values() for m in msgs}
    stack.bodies.extend(m.content for msgs in rejected_msgs.values() for m in msgs)  # leak check: queue path

    # Expected rows: one per unique valid event, keyed by externalId or by its queue message id.
    expected: dict[str, set[str]] = {"incident": set(), "lead": set()}
    planned_by_id: dict[str, Planned] = {}
    for m in messages:
        if m.kind != "event":
            continue
        key = (record_id(m.entity, m.source, m.external_id) if m.external_id
               else record_id(m.entity, queue_intake.KEY_SOURCE, m.message_id))
        expected[m.entity].add(key)
        planned_by_id[key] = m
    rows = {"incident": si.records("incidents"), "lead": si.records("leads")}
    got = {e: Counter(r["incidentid" if e == "incident" else "leadid"] for r in rs) for e, rs in rows.items()}
    created = sum(len(rs) for rs in rows.values())
    unexpected = sum(len(set(got[e]) - expected[e]) for e in got)
    missing = sum(len(expected[e] - set(got[e])) for e in got)
    malformed = [m for m in messages if m.kind not in ("event", "duplicate")]
    sent_ids = {m.message_id for m in messages}
    lost = sent_ids - set(completions)
    twice = [mid for mid, c in completions.items() if c > 1]

    contacts = si.records("contacts")
    by_email = Counter((c.get("emailaddress1") or "").lower() for c in contacts if c.get("emailaddress1"))
    by_phone = Counter(_phone_key(c["telephone1"]) for c in contacts
                       if c.get("telephone1") and not c.get("emailaddress1"))
    total_stats = {k: sum(getattr(s, k) for s in stats.values())
                   for k in ("succeeded", "failed_attempts", "rejected", "poisoned")}
    figures = {
        "messages": N, "unique_valid": len(events), "duplicates_sent": sum(m.kind == "duplicate" for m in messages),
        "malformed_sent": len(malformed), "records_created": created, "duplicates_created": unexpected,
        "missing": missing, "rejected": len(rejected), "poisoned": sum(poisoned.values()),
        "lost": len(lost) + sum(leftover.values()), "completed_twice": len(twice),
        "host_retries": total_stats["failed_attempts"], "redelivered": sum(d > 1 for d in deliveries.values()),
        "aimed_outages": len(targets), "contacts": len(contacts),
        "faults": dict(sorted((injected + throttled_answers(si)).items())), "revocations": chaos.revocations,
        "bursts_429": chaos.bursts,
        "rotated_after": chaos.rotated_at, "dataverse_requests": si.counts["dataverse"]["total"],
        "token_requests": si.counts["entra"].get(("POST", "token"), 0),
        "enqueue_s": round(enqueue_s, 1), "elapsed_s": round(elapsed, 1),
        "throughput_msg_s": round(N / elapsed, 1),
    }
    notes = si.records("annotations")
    resolutions = si.records("incidentresolutions")
    planned_notes = {note_id(record_id("incident", m.source, m.external_id), f"note-{m.event}")
                     for m in followups if m.kind == "note"}
    planned_resolves = {record_id("incident", m.source, m.external_id) for m in followups if m.kind == "resolve"}
    follow_left = follow_host.client.get_queue_properties().approximate_message_count
    follow_rejected = drain(follow_host.output)
    follow_poisoned = drain(follow_host.poison)
    figures.update({
        "followups_sent": len(followups), "notes_created": len(notes), "notes_planned": len(planned_notes),
        "resolutions": len(resolutions), "resolves_planned": len(planned_resolves),
        "followup_retries": follow_stats.failed_attempts, "followups_rejected": len(follow_rejected),
        "followups_poisoned": len(follow_poisoned) + follow_left})
    RESULTS.update(figures)
    text = report(capsys, figures)
    assert (follow_rejected, follow_poisoned, follow_left) == ([], [], 0), text
    assert Counter(n["annotationid"] for n in notes) == Counter(planned_notes), text  # each once, none extra
    assert sorted(r["_incidentid_value"] for r in resolutions) == sorted(planned_resolves), text
    assert all(r["statecode"] == 1 for r in rows["incident"] if r["incidentid"] in planned_resolves), text
    assert follow_stats.failed_attempts > 0, "no follow-up overtook its create: the mix proves nothing"

    assert all(n == 0 for n in leftover.values()), f"messages still queued: {leftover}; {text}"
    assert figures["poisoned"] == 0, f"faults were transient, nothing may be poisoned; {text}; " \
                                     f"{[s.errors[-3:] for s in stats.values()]}"
    assert not lost, f"{len(lost)} messages never completed; {text}"
    assert not twice, f"messages completed twice: {twice[:5]}; {text}"
    assert total_stats["succeeded"] == N, text
    assert unexpected == 0 and max(c for g in got.values() for c in g.values()) == 1, f"duplicates; {text}"
    assert missing == 0, f"events without a record; {text}"
    assert created == len(events), text

    # Malformed: each in <queue>-rejected once, with its reason and its original body.
    assert set(rejected) == {m.message_id for m in malformed}, text
    assert total_stats["rejected"] == len(malformed), text
    for m in malformed:
        rec = rejected[m.message_id]
        assert rec["reason"]["code"] == m.expect_code, (m.kind, rec["reason"])
        assert rec["reason"]["message"] and rec["reason"]["fix"]
        assert rec["body"] == m.body

    # The rows carry what was sent; each caller became one contact.
    for entity, rs in rows.items():
        for r in rs:
            body = json.loads(planned_by_id[r["incidentid" if entity == "incident" else "leadid"]].body)
            if entity == "incident":
                assert r["title"] == body["title"] and r["_customerid_value"], r
            else:
                assert r["lastname"] == body["lastName"], r
    assert all(n == 1 for n in by_email.values()), by_email.most_common(3)
    assert all(n == 1 for n in by_phone.values()), by_phone.most_common(3)
    assert by_email["ada@example.com"] == 1  # the seed contact was found, not created again

    # The faults did happen: otherwise this soak proves nothing.
    injected += throttled_answers(si)
    assert injected["503"] > 0 and injected["hold"] > 0 and injected["429"] > 0, injected
    assert chaos.rotated_at is not None and chaos.revocations >= 2, text
    assert all(deliveries[m.message_id] >= 2 for m in targets), [deliveries[m.message_id] for m in targets]
    assert total_stats["failed_attempts"] >= len(targets), text
    assert figures["token_requests"] >= chaos.revocations, text
    assert vault_reads(si) > chaos.vault_reads_at_rotation, "the rotated secret was never read from the vault"
