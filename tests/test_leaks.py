"""The leak check itself: it can fail, and it also covers what the queue path writes.

`tests/conftest.py` runs `check_no_leaks` after every test that uses `stack`, over every log record
(root at DEBUG) and every response body. Here it is shown to catch a token or a secret wherever it
turns up, without printing it, and it is run over the records the queue path keeps
(<queue>-rejected, <queue>-poison) and the errors the host would log.
"""

from __future__ import annotations

import json
import logging
import uuid

import pytest

from shared.intake import record_id
from tests.conftest import check_no_leaks, find_leaks
from tests.hostsim import QueueHost
from tools.queues import send
from triggers import http_intake, queue_intake

log = logging.getLogger("intake.test_leaks")


def test_the_leak_check_catches_a_token_or_secret_and_does_not_print_it(stack, captured_logs):
    si = stack.si
    status, _, _ = stack.call(http_intake.create_case, body={"title": "t", "customer": {"contactId":
                                                                                        si.seed_contact_id}})
    assert status == 201
    token = si.issued_tokens[-1]
    check_no_leaks(captured_logs.texts + stack.bodies, stack.secrets())  # the real traffic is clean

    log.debug("calling Dataverse with Authorization: Bearer %s", token)
    try:
        raise RuntimeError(f"sign-in failed for secret {si.dynamics_secret}")
    except RuntimeError:
        log.exception("token request failed")
    stack.bodies.append(json.dumps({"error": {"message": f"vault said {si.kv_secret}"}}))

    with pytest.raises(AssertionError) as caught:
        check_no_leaks(captured_logs.texts + stack.bodies, stack.secrets())
    leaked = find_leaks(captured_logs.texts + stack.bodies, stack.secrets())
    assert len(leaked) == 3
    message = str(caught.value)
    assert "3 texts" in message and "chars masked" in message
    assert all(v not in message for v in stack.secrets()), "the check must not print what it found"
    assert not find_leaks(leaked, stack.secrets())

    # A value split or only similar is not a finding: the check looks for whole values.
    assert not find_leaks([token[: len(token) // 2], token[::-1]], [token])

    # Take the planted texts out again, so the fixture's own check after this test passes.
    captured_logs.texts[:] = [t for t in captured_logs.texts if not find_leaks([t], stack.secrets())]
    stack.bodies[:] = [b for b in stack.bodies if not find_leaks([b], stack.secrets())]
    check_no_leaks(captured_logs.texts + stack.bodies, stack.secrets())


def test_queue_records_and_host_errors_hold_no_secret_or_token(stack, azurite):
    si, conn = stack.si, azurite.connection_string
    queue = f"lk{uuid.uuid4().hex[:10]}-cases"
    contact = si.seed_contact_id
    bad = [
        "not json at all",
        '["not", "an", "object"]',
        json.dumps({"priority": "urgent", "customer": {"email": "nope"}, "extra": 1}),
        json.dumps({"title": "t", "customer": {"contactId": contact}, "attributes": {"new_nosuchcolumn": "x"}}),
        json.dumps({"title": "t", "customer": {"contactId": str(uuid.uuid4())}}),
        json.dumps({"title": "t", "customer": {"contactId": contact}, "attributes": {"new_customfield": "x" * 150}}),
    ]
    for body in bad:
        send(conn, queue, body)
    send(conn, queue, {"title": "fine", "customer": {"contactId": contact}, "externalId": "lk-1"})
    # Tokens and secrets in play: a token revoked, the secret rotated (old one kept as forbidden), 401s.
    si.rotate_dynamics_secret()
    si.revoke_tokens()
    si.fail_next("dataverse", 2, 401, path_contains=f"incidents({record_id('incident', None, 'lk-1')})")

    fn = queue_intake.cases_queue.build().get_user_function()
    h = QueueHost(conn, queue, fn, visibility_timeout=1, max_dequeue_count=2)
    stats = h.run(idle_seconds=1.0, max_seconds=60)
    assert (stats.rejected, stats.poisoned, stats.succeeded) == (len(bad), 0, len(bad) + 1), stats
    assert any("dynamics_token_rejected" in e for e in stats.errors), stats.errors  # one delivery failed on 401s

    records = [m.content for m in h.output.peek_messages(max_messages=32)]
    assert len(records) == len(bad)
    codes = sorted(json.loads(r)["reason"]["code"] for r in records)
    assert codes == sorted(["unsupported_media_type"] * 2 + ["invalid_request"] + ["dynamics_payload_rejected"] * 3)
    forbidden = stack.secrets()
    assert len(si.issued_tokens) >= 3 and si.dynamics_secret in forbidden
    texts = records + stats.errors
    check_no_leaks(texts, forbidden)
    stack.bodies.extend(texts)  # and once more by the fixture, with the retired secret too
