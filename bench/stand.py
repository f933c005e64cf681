"""The stand-in in a child process, so its CPU (and GIL) is its own; the parent steers it over a pipe.

The child counts, beside the stand-in's own counters, what the benchmark needs and the stand-in does not
split: tokens issued per audience (Dataverse scope vs vault scope) and answers per (service, method,
status) (a vault read is a GET answered 200; the 401 challenge before it is not a read).
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from collections import Counter
from multiprocessing.connection import Connection
from typing import Any

MAX_IDLE = 900.0  # the child stops by itself when the parent says nothing for this long


def _serve(conn: Connection, latency_entra: float, latency_dataverse: float, latency_vault: float) -> None:
    from devstack.standin import StandIn

    si = StandIn(latency_entra=latency_entra, latency_dataverse=latency_dataverse, latency_vault=latency_vault,
                 hold_seconds=2.0)
    lock = threading.Lock()
    tokens: Counter[str] = Counter()
    answers: Counter[str] = Counter()
    issue, record = si.directory.issue, si.state.metrics.record

    def counted_issue(client_id: str, audience: str) -> tuple[str, int]:
        with lock:
            tokens["dataverse" if audience == si.dataverse_url else "vault" if "vault" in audience else audience] += 1
        return issue(client_id, audience)

    def counted_record(service: str, method: str, path: str, status: int) -> None:
        with lock:
            answers[f"{service} {method} {status}"] += 1
        record(service, method, path, status)

    si.directory.issue = counted_issue  # type: ignore[method-assign]
    si.state.metrics.record = counted_record  # type: ignore[method-assign]
    si.start()
    try:
        conn.send({"env": si.settings_env(), "ca_path": si.ca_path, "api_url": si.api_url,
                   "entra_url": si.entra_url, "tenant_id": si.tenant_id, "client_id": si.dynamics_client_id,
                   "client_secret": si.dynamics_secret, "seed_contact_id": si.seed_contact_id,
                   "seed_account_id": si.seed_account_id})
        while conn.poll(MAX_IDLE):
            op, args = conn.recv()
            if op == "stop":
                conn.send(None)
                break
            if op == "snapshot":
                with lock:
                    mine = {"tokens": dict(tokens), "answers": dict(answers)}
                counts = {svc: {k if isinstance(k, str) else f"{k[0]} {k[1]}": v for k, v in c.items()}
                          for svc, c in si.counts.items()}
                conn.send({"counts": counts, "connections": si.connections, "cpu": time.process_time(),
                           "errors": len(si.errors), **mine})
            elif op == "reset":
                si.reset_counters()
                with lock:
                    tokens.clear()
                    answers.clear()
                conn.send(None)
            elif op == "add_records":
                entity_set, rows = args
                for key, values in rows:
                    si.add_record(entity_set, values, key=key)
                conn.send(len(rows))
            elif op == "set_latency":
                si.set_latency(*args)
                conn.send(None)
            else:
                conn.send(f"unknown op {op!r}")
    except (EOFError, OSError):
        pass
    finally:
        si.stop()


class RemoteStandIn:
    """The parent's handle on the child: its addresses and ids, and snapshot/reset/add_records."""

    def __init__(self, latency_entra: float, latency_dataverse: float, latency_vault: float = 0.0) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, latency_entra, latency_dataverse, latency_vault),
                                 name="bench-standin", daemon=True)
        self._proc.start()
        child.close()
        if not self._conn.poll(60):
            self._proc.kill()
            raise RuntimeError("the stand-in did not start within 60 s")
        self.info: dict[str, Any] = self._conn.recv()
        self.pid = self._proc.pid

    def _ask(self, op: str, *args: Any) -> Any:
        self._conn.send((op, args))
        if not self._conn.poll(60):
            raise RuntimeError(f"the stand-in did not answer {op!r} within 60 s")
        return self._conn.recv()

    def snapshot(self) -> dict[str, Any]:
        return self._ask("snapshot")

    def reset(self) -> None:
        self._ask("reset")

    def add_records(self, entity_set: str, rows: list[tuple[str, dict[str, Any]]]) -> int:
        return self._ask("add_records", entity_set, rows)

    def set_latency(self, service: str, seconds: float) -> None:
        self._ask("set_latency", service, seconds)

    def stop(self) -> None:
        try:
            self._ask("stop")
        except (OSError, EOFError, RuntimeError):
            pass
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)

    def __enter__(self) -> RemoteStandIn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def service_counts(snap: dict[str, Any]) -> dict[str, Any]:
    """A snapshot as the report's figures per service."""
    counts, answers, tokens = snap["counts"], snap["answers"], snap["tokens"]
    return {
        "dataverse": {"requests": counts["dataverse"].get("total", 0),
                      "by_kind": {k: v for k, v in counts["dataverse"].items() if k != "total"}},
        "entra": {"requests": counts["entra"].get("total", 0), "token_posts": counts["entra"].get("POST token", 0),
                  "tokens_dataverse": tokens.get("dataverse", 0), "tokens_vault": tokens.get("vault", 0),
                  "by_kind": {k: v for k, v in counts["entra"].items() if k != "total"}},
        "vault": {"requests": counts["vault"].get("total", 0), "reads": answers.get("vault GET 200", 0)},
        "connections": dict(snap["connections"]),
        "standin_errors": snap["errors"],
    }
