"""`python -m tools.queues`: a user's mistake gets one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.azurite import cli_as, signed_in, token_account

ROOT = Path(__file__).resolve().parent.parent
STORAGE = "https://storage.azure.com"  # the audience of a token for Azure Storage


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


# ---- --account-url: the deployed account, whose shared keys are off, reached with an Entra ID token -----------

def test_replay_with_account_url_moves_poison_back_with_an_entra_token(standin, oauth_azurite):
    from tools.queues import ensure, queue_client

    si = standin
    seeded = token_account(si, oauth_azurite.queue_url)
    bodies = [json.dumps({"title": f"poisoned {i}", "externalId": f"acct-{i}"}) for i in range(3)]
    poison = ensure(queue_client(seeded, "cases-poison", connection_verify=si.ca_path))
    for body in bodies:
        poison.send_message(body)
    before = si.directory.issued_to(STORAGE)

    code, out, err, took = cli_as(signed_in(si), "replay", "cases", "--account-url", oauth_azurite.queue_url)
    assert (code, out.strip()) == (0, "moved 3 message(s)"), err
    assert si.directory.issued_to(STORAGE) > before  # the CLI's own token, from DefaultAzureCredential
    cases = queue_client(seeded, "cases", connection_verify=si.ca_path)
    assert sorted(m.content for m in cases.peek_messages(max_messages=32)) == sorted(bodies)
    assert poison.get_queue_properties().approximate_message_count == 0
    assert not [t for t in si.issued_tokens if t in out + err]
    assert took < 30, took


def test_oauth_azurite_refuses_a_token_of_another_issuer(standin, oauth_azurite):
    """Azurite checks what a token claims: the replay above got in by the stand-in's token, not waved through."""
    from azure.core.credentials import AccessToken
    from azure.core.exceptions import ClientAuthenticationError

    from tools.queues import Account, queue_client

    class Forged:
        def get_token(self, *scopes, **kw):  # a token of another issuer: Azurite checks it
            import base64

            claims = {"aud": STORAGE, "iss": "https://evil.example/", "iat": 0, "nbf": 0, "exp": 4_000_000_000}
            part = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
            return AccessToken(f"eyJhbGciOiJub25lIn0.{part}.", 4_000_000_000)

    client = queue_client(Account(oauth_azurite.queue_url, Forged()), "cases", connection_verify=standin.ca_path)
    with pytest.raises(ClientAuthenticationError) as caught:
        client.create_queue()
    assert caught.value.status_code in (401, 403)


@pytest.mark.parametrize(("url", "says"), [
    ("http://127.0.0.1:10001/devstoreaccount1", "https queue endpoint"),
    ("https://acct.blob.core.windows.net", "https queue endpoint"),
    ("https://acct.queue.core.windows.net?sv=2024&sig=x", "without a query"),
    ("", "https queue endpoint"),
])
def test_account_url_mistake_is_one_line(standin, url, says):
    code, _, err, _ = cli_as(signed_in(standin), "replay", "cases", "--account-url", url)
    assert says in one_line_error(code, err)
    assert standin.directory.issued_to(STORAGE) == 0


def test_account_url_sign_in_refused_is_one_line_naming_az_login(standin, oauth_azurite):
    env = signed_in(standin, AZURE_CLIENT_SECRET="not-the-secret")
    code, _, err, took = cli_as(env, "replay", "cases", "--account-url", oauth_azurite.queue_url)
    line = one_line_error(code, err)
    assert "no Entra ID token" in line and "AADSTS7000215" in line and "az login" in line, line
    assert "not-the-secret" not in err
    assert took < 20, took


def test_account_url_unreachable_is_one_line_within_seconds(standin):
    from tests.azurite import free_port

    url = f"https://127.0.0.1:{free_port()}/devstoreaccount1"
    code, _, err, took = cli_as(signed_in(standin), "send", "cases", '{"title": "t"}', "--account-url", url)
    assert f"cannot be reached: the storage account at {url}" in one_line_error(code, err)
    assert took < 15, took


@pytest.mark.parametrize(("queue_url", "blob_url"), [
    ("https://stabc.queue.core.windows.net", "https://stabc.blob.core.windows.net"),
    ("https://stabc.queue.core.usgovcloudapi.net/", "https://stabc.blob.core.usgovcloudapi.net/"),
    ("https://127.0.0.1:10001/devstoreaccount1", None),
])
def test_account_blob_endpoint_is_derived_from_the_queue_endpoint(queue_url, blob_url):
    from tools.queues import Account

    assert Account(queue_url, None).blob_url == blob_url
