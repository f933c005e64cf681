"""`python -m tools.queues`: a user's mistake gets one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, conn: str) -> tuple[int, str, str, float]:
    env = {**os.environ, "AZURE_STORAGE_CONNECTION_STRING": conn}
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "tools.queues", *args], check=False, cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    return out.returncode, out.stdout, out.stderr, time.monotonic() - started


def one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize(("body", "says"), [("not json", "not valid JSON"), ("[1,2]", "JSON object, not list"),
                                            ("42", "JSON object, not int")])
def test_bad_event_is_refused_before_anything_is_sent(azurite, body, says):
    code, _, err, _ = cli("send", "cases", body, conn=azurite.connection_string)
    assert says in one_line_error(code, err)


def test_unreachable_storage_is_one_line_within_seconds():
    from tools.queues import azurite_connection_string

    code, _, err, took = cli("send", "cases", '{"title": "t"}', conn=azurite_connection_string(queue_port=9))
    assert "cannot be reached" in one_line_error(code, err)
    assert took < 8, took


def test_replay_before_anything_was_poisoned_moves_nothing(azurite):
    queue = "leads"
    code, out, err, _ = cli("replay", queue, conn=azurite.connection_string)
    assert (code, out.strip()) == (0, "moved 0 message(s)"), err
    code, out, err, _ = cli("replay", queue, "--rejected", conn=azurite.connection_string)
    assert (code, out.strip()) == (0, "moved 0 message(s)"), err


def test_send_creates_the_queue_and_prints_the_id(azurite):
    from tools.queues import queue_client

    code, out, err, _ = cli("send", "cases", '{"title": "t", "externalId": "cli-' + uuid.uuid4().hex + '"}',
                            conn=azurite.connection_string)
    assert code == 0 and out.strip(), err
    client = queue_client(azurite.connection_string, "cases")
    for msg in client.receive_messages(max_messages=32):
        client.delete_message(msg)
