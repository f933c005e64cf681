"""What the Functions host does with a queue-triggered function, against a real queue in Azurite.

Receives in batches (batchSize, newBatchThreshold), hands each message to the function as a
`func.QueueMessage` with its dequeue count, writes the function's output-binding values after it
returns, deletes the message on success; on an exception makes it visible again after
visibilityTimeout, or moves it to <queue>-poison once the dequeue count reached maxDequeueCount.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from azure.functions.queue import QueueMessage

from devstack.invocation import Context, Out
from tools.queues import ensure, queue_client

__all__ = ["HOST_JSON", "Context", "Out", "QueueHost", "Stats", "drain"]

HOST_JSON = json.loads((Path(__file__).resolve().parent.parent / "host.json").read_text())["extensions"]["queues"]


def _seconds(hms: str) -> float:
    h, m, s = hms.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


@dataclass
class Stats:
    succeeded: int = 0
    failed_attempts: int = 0
    rejected: int = 0
    poisoned: int = 0
    errors: list[str] = field(default_factory=list)


class QueueHost:
    """Drives one queue-triggered function until the queue stays empty or the time runs out."""

    def __init__(self, conn_str: str, queue: str, fn: Any, *, batch_size: int | None = None,
                 new_batch_threshold: int | None = None, max_dequeue_count: int | None = None,
                 visibility_timeout: float | None = None, output_queue: str | None = None) -> None:
        self.queue = queue
        self.fn = fn
        self.batch_size = batch_size or HOST_JSON["batchSize"]
        self.threshold = HOST_JSON["newBatchThreshold"] if new_batch_threshold is None else new_batch_threshold
        self.max_dequeue = max_dequeue_count or HOST_JSON["maxDequeueCount"]
        self.visibility = (_seconds(HOST_JSON["visibilityTimeout"]) if visibility_timeout is None
                           else visibility_timeout)
        # The host retries its storage calls quickly; azure-storage-queue's default waits 15 s, then 18 s...
        from azure.storage.queue import ExponentialRetry

        fast = {"retry_policy": ExponentialRetry(initial_backoff=0.2, increment_base=2, retry_total=6)}
        self.client = ensure(queue_client(conn_str, queue, binary=True, **fast))
        self.poison = ensure(queue_client(conn_str, f"{queue}-poison", **fast))
        self.output = ensure(queue_client(conn_str, output_queue or f"{queue}-rejected", **fast))
        self.stats = Stats()
        self._lock = threading.Lock()

    def _invoke(self, msg: Any) -> None:
        try:
            self._invoke_once(msg)
        except Exception as exc:  # the host's own storage calls failed: recorded, the message stays invisible
            with self._lock:
                self.stats.errors.append("host: " + type(exc).__name__ + ": " + str(exc)[:200])

    def _invoke_once(self, msg: Any) -> None:
        qm = QueueMessage(id=msg.id, body=msg.content, dequeue_count=msg.dequeue_count,
                               pop_receipt=msg.pop_receipt, insertion_time=msg.inserted_on,
                               expiration_time=msg.expires_on, time_next_visible=msg.next_visible_on)
        out = Out()
        try:
            self.fn(qm, out, Context())
        except Exception as exc:  # the host catches everything a function raises
            with self._lock:
                self.stats.failed_attempts += 1
                self.stats.errors.append(type(exc).__name__ + ": " + str(exc)[:200])
            if msg.dequeue_count >= self.max_dequeue:
                self.poison.send_message(msg.content.decode("utf-8", "replace"))
                self.client.delete_message(msg)
                with self._lock:
                    self.stats.poisoned += 1
            else:
                self.client.update_message(msg, visibility_timeout=int(self.visibility))
            return
        if out.value is not None:
            self.output.send_message(out.value)
            with self._lock:
                self.stats.rejected += 1
        self.client.delete_message(msg)
        with self._lock:
            self.stats.succeeded += 1

    def _empty(self) -> bool:
        """No message left, visible or waiting out its visibility timeout."""
        return self.client.get_queue_properties().approximate_message_count == 0

    def run(self, *, idle_seconds: float = 1.5, max_seconds: float = 120.0, threads: int | None = None) -> Stats:
        """Process until the queue has been empty (nothing visible, nothing in flight) for idle_seconds."""
        deadline = time.monotonic() + max_seconds
        in_flight: set = set()
        idle_since: float | None = None
        with ThreadPoolExecutor(max_workers=threads or self.batch_size + self.threshold) as pool:
            while time.monotonic() < deadline:
                in_flight = {f for f in in_flight if not f.done()}
                if len(in_flight) <= self.threshold:
                    batch = list(self.client.receive_messages(messages_per_page=self.batch_size,
                                                              max_messages=self.batch_size,
                                                              visibility_timeout=600))
                    for msg in batch:
                        in_flight.add(pool.submit(self._invoke, msg))
                    if not batch and not in_flight and self._empty():
                        idle_since = idle_since or time.monotonic()
                        if time.monotonic() - idle_since >= idle_seconds:
                            break
                    else:
                        idle_since = None
                    if not batch:
                        time.sleep(0.1)
                else:
                    time.sleep(0.01)
            for f in in_flight:
                f.result(timeout=max(deadline - time.monotonic(), 1))
        return self.stats


def drain(client: Any, seconds: float = 60.0, visibility_timeout: int = 300) -> list[Any]:
    """Every message now in a queue, received (so they stay invisible while the test inspects them)."""
    out: list[Any] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        batch = list(client.receive_messages(messages_per_page=32, max_messages=32,
                                             visibility_timeout=visibility_timeout))
        if not batch:
            break
        out += batch
    return out


def receive_all(conn: str, queue: str, wait: float = 0.0) -> list[Any]:
    """The messages visible within `wait` seconds (raw bytes), received and deleted: what the host would take."""
    deadline = time.monotonic() + wait
    client = queue_client(conn, queue, binary=True)
    while True:
        got = list(client.receive_messages(max_messages=32, visibility_timeout=60))
        if got or time.monotonic() >= deadline:
            for m in got:
                client.delete_message(m)
            return got
        time.sleep(0.2)
