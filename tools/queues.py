"""Producer and operator helpers for the intake queues, with azure-storage-queue.

The Functions host expects base64 message bodies (host.json `messageEncoding: base64`), so every
client here uses TextBase64EncodePolicy: a plain-text message would never reach the function.

    python -m tools.queues send cases '{"title": "Outage", "customer": {"email": "a@example.com"}}'
    python -m tools.queues replay cases            # <queue>-poison -> <queue>, after fixing the cause
    python -m tools.queues replay cases --rejected # resend the original bodies kept in <queue>-rejected

Locally the connection string comes from AZURE_STORAGE_CONNECTION_STRING (default: the local Azurite).
The deployed storage account refuses keys and SAS (shared keys are off), so there name its queue
endpoint and sign in with Entra ID (`az login`; DefaultAzureCredential), as a user the template granted
"Storage Queue Data Contributor" (azd provision does, for AZURE_PRINCIPAL_ID):

    python -m tools.queues replay cases --account-url https://<account>.queue.core.windows.net
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from shared import deferral

AZURITE = "UseDevelopmentStorage=true"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def azurite_connection_string(queue_port: int = 10001, blob_port: int | None = None, host: str = "127.0.0.1") -> str:
    """Azurite's well-known account on the given ports (blob too, for the Functions host)."""
    blob = f"BlobEndpoint=http://{host}:{blob_port}/devstoreaccount1;" if blob_port else ""
    return (f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={AZURITE_KEY};{blob}"
            f"QueueEndpoint=http://{host}:{queue_port}/devstoreaccount1;")


@dataclass(frozen=True)
class Account:
    """A storage account reached with Entra ID (its shared keys are off): its queue endpoint and a token
    credential. Wherever a connection string is taken, an Account may stand instead."""

    queue_url: str  # https://<account>.queue.core.windows.net (Azurite: https://127.0.0.1:<port>/<account>)
    credential: Any

    @property
    def blob_url(self) -> str | None:
        """The same account's blob endpoint (a claim-check body), or None where it cannot be derived."""
        parts = urlsplit(self.queue_url)
        labels = parts.netloc.split(".")
        if len(labels) < 3 or labels[1] != "queue":
            return None
        return parts._replace(netloc=".".join([labels[0], "blob", *labels[2:]])).geturl()


Storage = str | Account  # a connection string, or an account reached with Entra ID


def account(url: str) -> Account:
    """An Account for `--account-url`, signing in with DefaultAzureCredential (az login, environment,
    managed identity). Raises UsageError when the URL is not an https queue endpoint."""
    parts = urlsplit(url.strip())
    if parts.scheme != "https" or not parts.hostname or parts.query or ".blob." in parts.netloc:
        raise UsageError(f"--account-url must be the account's https queue endpoint without a query, e.g. "
                         f"https://<account>.queue.core.windows.net (got {parts.scheme or 'no'} scheme, "
                         f"host {parts.hostname or 'none'})")
    from azure.identity import DefaultAzureCredential

    from shared.settings import is_public_authority

    options: dict[str, Any] = {}
    if not is_public_authority(os.environ.get("AZURE_AUTHORITY_HOST")):
        options["disable_instance_discovery"] = True  # MSAL would ask login.microsoftonline.com about the host
    return Account(parts.geturl().rstrip("/"), DefaultAzureCredential(**options))


def queue_client(storage: Storage, queue: str, *, binary: bool = False, **options: Any) -> Any:
    """A QueueClient that writes base64, as the Functions host reads; reads base64 back to text or bytes.

    `storage` is a connection string or an Account. `options` go to the client (the command line
    passes short timeouts and few retries)."""
    from azure.storage.queue import (
        BinaryBase64DecodePolicy,
        BinaryBase64EncodePolicy,
        QueueClient,
        TextBase64DecodePolicy,
        TextBase64EncodePolicy,
    )

    if binary:
        options.update(message_encode_policy=BinaryBase64EncodePolicy(),
                       message_decode_policy=BinaryBase64DecodePolicy())
    else:
        options.update(message_encode_policy=TextBase64EncodePolicy(), message_decode_policy=TextBase64DecodePolicy())
    if isinstance(storage, Account):
        return QueueClient(storage.queue_url, queue, credential=storage.credential, **options)
    return QueueClient.from_connection_string(storage, queue, **options)


def ensure(client: Any) -> Any:
    from azure.core.exceptions import ResourceExistsError

    try:
        client.create_queue()
    except ResourceExistsError:
        pass
    return client


_senders: dict[tuple[str, str], Any] = {}
_senders_lock = threading.Lock()


def _sender(conn_str: str, queue: str) -> Any:
    """One client per queue for the process, the queue created on first use (clients are thread-safe)."""
    with _senders_lock:
        client = _senders.get((conn_str, queue))
        if client is None:
            client = _senders[(conn_str, queue)] = ensure(queue_client(conn_str, queue))
        return client


def send(conn_str: str, queue: str, event: dict | str) -> str:
    """Enqueue one event (a dict is sent as JSON, a str as is, base64-encoded); returns the message id."""
    body = event if isinstance(event, str) else json.dumps(event)
    return _sender(conn_str, queue).send_message(body).id


def _original_body(record: bytes) -> bytes | None:
    """The original message kept in a <queue>-rejected record, or None when it cannot be resent as is."""
    try:
        doc = json.loads(record)
    except (ValueError, UnicodeDecodeError):
        return None
    body = doc.get("body") if isinstance(doc, dict) else None
    return body.encode("utf-8") if isinstance(body, str) else None  # bodyBase64: not UTF-8, never valid


def replay(storage: Storage, queue: str, *, rejected: bool = False, limit: int = 10_000,
           seconds: float = 300.0, skipped: list[str] | None = None) -> int:
    """Move messages from <queue>-poison (or the bodies kept in <queue>-rejected) back to <queue>.

    Each message is sent before it is deleted, so a crash in between duplicates a message (which the
    intake's idempotency absorbs for keyed events) rather than losing one. Bodies are moved byte for
    byte. Only messages already there when the replay started are moved, so a message that fails
    again while the replay runs is not cycled a second time. A rejected record without a resendable
    body is left where it is (its id is added to `skipped`) and made visible again at the end.
    Returns the number of messages moved.
    """
    source = ensure(queue_client(storage, f"{queue}-{'rejected' if rejected else 'poison'}", binary=True,
                                 **_CLI_OPTIONS))
    target = ensure(queue_client(storage, queue, binary=True, **_CLI_OPTIONS))
    started = datetime.now(UTC).replace(microsecond=0)  # the service stamps insertion times in whole seconds
    moved = 0
    held: list[Any] = []
    deadline = time.monotonic() + seconds
    try:
        while moved < limit and time.monotonic() < deadline:
            room = min(32, limit - moved)
            batch = list(source.receive_messages(messages_per_page=room, max_messages=room,
                                                 visibility_timeout=max(30, int(seconds) + 30)))
            if not batch:
                break
            for msg in batch:
                # A deferral envelope keeps its key (exactly one record on replay) and restarts its age limit.
                body = _original_body(msg.content) if rejected else deferral.replayed(msg.content)
                late = msg.inserted_on is not None and msg.inserted_on > started
                if body is None or late:
                    held.append(msg)
                    if skipped is not None and not late:
                        skipped.append(msg.id)
                    continue
                target.send_message(body, time_to_live=-1)  # a replayed message is kept until processed
                source.delete_message(msg)
                moved += 1
    finally:
        from azure.core.exceptions import HttpResponseError

        for msg in held:  # leave them as they were: visible, for the operator or the next replay
            try:
                source.update_message(msg, visibility_timeout=0)
            except HttpResponseError:  # already visible again and taken by someone else: nothing to undo
                pass
    return moved


_CLI_OPTIONS: dict[str, Any] = {}  # set by main(): fail within seconds when storage is unreachable


class UsageError(Exception):
    """A mistake the user can fix: printed as one line, exit code 2."""


def _event(text: str) -> dict:
    try:
        event = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"the event is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(event, dict):
        raise UsageError(f"the event must be a JSON object, not {type(event).__name__}")
    return event


def _run(args: argparse.Namespace, storage: Storage) -> int:
    if args.command == "send":
        event = _event(args.body)
        client = ensure(queue_client(storage, args.queue, **_CLI_OPTIONS))
        print(client.send_message(json.dumps(event)).id)
        return 0
    skipped: list[str] = []
    moved = replay(storage, args.queue, rejected=args.rejected, limit=args.limit, seconds=args.seconds,
                   skipped=skipped)
    print(f"moved {moved} message(s)")
    if skipped:
        print(f"left {len(skipped)} record(s) without a resendable body in {args.queue}-rejected: "
              + ", ".join(skipped[:20]), file=sys.stderr)
    return 0


_AADSTS = re.compile(r"\bAADSTS\d+\b")


def _failure(exc: Exception, storage: Storage | None, account_url: str | None) -> str:
    """One line naming what failed and what to do; never a token, a key or a traceback."""
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ServiceRequestError

    by_token = account_url is not None
    source = "the storage account in AZURE_STORAGE_CONNECTION_STRING"
    if by_token:
        source = f"the storage account at {account_url}"
    elif storage == AZURITE:
        source = "the local Azurite (start it with ./scripts/run-local.sh)"
    if isinstance(exc, UsageError):
        return str(exc)
    if isinstance(exc, ServiceRequestError):
        return f"queue storage cannot be reached: {source}"
    if isinstance(exc, ClientAuthenticationError) and getattr(exc, "status_code", None) is None:
        # The credential gave no token (az login missing or expired, a refused client secret...).
        said = _AADSTS.search(str(exc))
        return ("no Entra ID token for storage (DefaultAzureCredential"
                + (f"; Entra ID answered {said.group(0)}" if said else "")
                + "): sign in with `az login` (or set AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_CLIENT_SECRET)")
    if isinstance(exc, HttpResponseError):
        answer = f"queue storage answered {exc.status_code} {getattr(exc, 'error_code', '') or ''}".rstrip()
        if by_token and exc.status_code in (401, 403):
            return (f"{answer}: the signed-in identity needs the role Storage Queue Data Contributor on the "
                    "storage account (azd provision grants it to AZURE_PRINCIPAL_ID)")
        if exc.status_code in (401, 403):
            return f"{answer}: queue storage refused the credentials in AZURE_STORAGE_CONNECTION_STRING"
        return answer
    if isinstance(exc, ValueError) and not by_token:
        return f"AZURE_STORAGE_CONNECTION_STRING is not usable: {exc}"
    return f"queue storage failed ({type(exc).__name__}): {source}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--account-url", metavar="URL",
                       help="the storage account's queue endpoint, https://<account>.queue.core.windows.net: "
                            "sign in with Entra ID (az login) instead of AZURE_STORAGE_CONNECTION_STRING; the "
                            "only way into the deployed account, whose shared keys are off")
    sub = parser.add_subparsers(dest="command", required=True)
    p_send = sub.add_parser("send", help="enqueue one JSON event", parents=[where])
    p_send.add_argument("queue", choices=["cases", "leads", "followups"])
    p_send.add_argument("body", help="the event as JSON")
    p_replay = sub.add_parser("replay", help="move <queue>-poison (or -rejected bodies) back to <queue>",
                              parents=[where])
    p_replay.add_argument("queue", choices=["cases", "leads", "followups"])
    p_replay.add_argument("--rejected", action="store_true", help="resend bodies kept in <queue>-rejected")
    p_replay.add_argument("--limit", type=int, default=10_000)
    p_replay.add_argument("--seconds", type=float, default=300.0, help="stop after this long")
    args = parser.parse_args(argv)
    from azure.core.exceptions import AzureError

    _CLI_OPTIONS.update(retry_total=0, connection_timeout=3, read_timeout=10)  # storage backs off 15 s per retry
    # The SDKs log a failed sign-in as a multi-line warning to stderr; the one line below says it instead.
    logging.getLogger("azure").addHandler(logging.NullHandler())
    storage: Storage | None = None
    try:
        storage = account(args.account_url) if args.account_url is not None else \
            os.environ.get("AZURE_STORAGE_CONNECTION_STRING", AZURITE)
        return _run(args, storage)
    except (UsageError, AzureError, ValueError) as exc:
        print(f"error: {_failure(exc, storage, args.account_url)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
