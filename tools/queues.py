"""Producer and operator helpers for the intake queues, with azure-storage-queue.

The Functions host expects base64 message bodies (host.json `messageEncoding: base64`), so every
client here uses TextBase64EncodePolicy: a plain-text message would never reach the function.

    python -m tools.queues send cases '{"title": "Outage", "customer": {"email": "a@example.com"}}'
    python -m tools.queues replay cases            # <queue>-poison -> <queue>, after fixing the cause
    python -m tools.queues replay cases --rejected # resend the original bodies kept in <queue>-rejected

The connection string comes from AZURE_STORAGE_CONNECTION_STRING (default: the local Azurite).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

AZURITE = "UseDevelopmentStorage=true"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def azurite_connection_string(queue_port: int = 10001, host: str = "127.0.0.1") -> str:
    return (f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={AZURITE_KEY};"
            f"QueueEndpoint=http://{host}:{queue_port}/devstoreaccount1;")


def queue_client(conn_str: str, queue: str, *, binary: bool = False) -> Any:
    """A QueueClient that writes base64, as the Functions host reads; reads base64 back to text or bytes."""
    from azure.storage.queue import (
        BinaryBase64DecodePolicy,
        BinaryBase64EncodePolicy,
        QueueClient,
        TextBase64DecodePolicy,
        TextBase64EncodePolicy,
    )

    if conn_str == AZURITE:
        conn_str = azurite_connection_string()
    if binary:
        return QueueClient.from_connection_string(conn_str, queue, message_encode_policy=BinaryBase64EncodePolicy(),
                                                  message_decode_policy=BinaryBase64DecodePolicy())
    return QueueClient.from_connection_string(conn_str, queue, message_encode_policy=TextBase64EncodePolicy(),
                                              message_decode_policy=TextBase64DecodePolicy())


def ensure(client: Any) -> Any:
    from azure.core.exceptions import ResourceExistsError

    try:
        client.create_queue()
    except ResourceExistsError:
        pass
    return client


def send(conn_str: str, queue: str, event: dict | str) -> str:
    """Enqueue one event (a dict is sent as JSON); returns the message id."""
    body = event if isinstance(event, str) else json.dumps(event)
    return ensure(queue_client(conn_str, queue)).send_message(body).id


def replay(conn_str: str, queue: str, *, rejected: bool = False, limit: int = 10_000,
           seconds: float = 300.0) -> int:
    """Move messages from <queue>-poison (or the bodies kept in <queue>-rejected) back to <queue>.

    Each message is sent before it is deleted, so a crash in between duplicates a message (which the
    intake's idempotency absorbs for keyed events) rather than losing one.
    """
    source = queue_client(conn_str, f"{queue}-{'rejected' if rejected else 'poison'}")
    target = ensure(queue_client(conn_str, queue))
    moved = 0
    deadline = time.monotonic() + seconds
    while moved < limit and time.monotonic() < deadline:
        batch = list(source.receive_messages(messages_per_page=32, max_messages=32, visibility_timeout=60))
        if not batch:
            break
        for msg in batch:
            body = msg.content
            if rejected:
                body = json.loads(body).get("body")
                if body is None:  # the original was not UTF-8 text: leave it for the operator
                    continue
            target.send_message(body)
            source.delete_message(msg)
            moved += 1
    return moved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_send = sub.add_parser("send", help="enqueue one JSON event")
    p_send.add_argument("queue", choices=["cases", "leads"])
    p_send.add_argument("body", help="the event as JSON")
    p_replay = sub.add_parser("replay", help="move <queue>-poison (or -rejected bodies) back to <queue>")
    p_replay.add_argument("queue", choices=["cases", "leads"])
    p_replay.add_argument("--rejected", action="store_true", help="resend bodies kept in <queue>-rejected")
    p_replay.add_argument("--limit", type=int, default=10_000)
    args = parser.parse_args(argv)
    conn = os.environ.get("AZURE_STORAGE_CONNECTION_STRING", AZURITE)
    if args.command == "send":
        print(send(conn, args.queue, json.loads(args.body)))
    else:
        print(f"moved {replay(conn, args.queue, rejected=args.rejected, limit=args.limit)} message(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
