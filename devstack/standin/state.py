"""Shared state of the stand-in: seeded identities, fault injection, latency and counters."""

from __future__ import annotations

import random
import string
import threading
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

SERVICES = ("entra", "vault", "dataverse")
_ALIASES = {
    "entra": "entra", "aad": "entra", "entra_id": "entra",
    "vault": "vault", "keyvault": "vault", "key_vault": "vault", "kv": "vault",
    "dataverse": "dataverse", "dynamics": "dataverse", "dv": "dataverse",
}
TIMEOUT_AFTER_APPLY = "timeout_after_apply"
# Answers a real network produces between Dataverse and the client, besides a lost answer. Each is applied
# first (the request ran), then its answer is damaged on the way, except the gateway's own 502 page:
#   drop_body      the status line and headers arrive, the connection drops while the body is read
#   truncated_2xx  a 200 JSON answer cut short (Content-Length agrees with what was sent)
#   html_2xx       a 200 text/html page from a gateway or captive proxy instead of Dataverse's answer
#   gateway_502    a load balancer's HTML 502 page; the request did not reach Dataverse
#   malformed_batch a $batch answer whose second part holds no HTTP response
MANGLES = ("drop_body", "truncated_2xx", "html_2xx", "gateway_502", "malformed_batch")


def service_name(name: str) -> str:
    """Canonical service name ("entra", "vault" or "dataverse") for a name or alias."""
    try:
        return _ALIASES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown service {name!r}; use one of {SERVICES}") from None


def seeded_guid(rng: random.Random) -> str:
    """A version-4 GUID string drawn from ``rng``."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def secret_value(rng: random.Random) -> str:
    """A random-looking Entra client secret value (40 chars, ``xxxNQ~...`` like the portal's)."""
    alnum = string.ascii_letters + string.digits
    tail = alnum + "~._-"
    head = "".join(rng.choice(alnum) for _ in range(3)) + rng.choice(string.digits) + "Q~"
    return head + "".join(rng.choice(tail) for _ in range(34))


@dataclass(frozen=True)
class Identities:
    """Deterministic ids and secrets seeded into the three services."""

    tenant_id: str
    dynamics_client_id: str
    dynamics_secret: str
    kv_client_id: str
    kv_secret: str
    systemuserid: str
    business_unit_id: str
    organization_id: str
    seed_contact_id: str
    seed_account_id: str

    @classmethod
    def from_seed(cls, seed: int) -> Identities:
        rng = random.Random(f"standin-ids-{seed}")
        g = lambda: seeded_guid(rng)  # noqa: E731
        return cls(
            tenant_id=g(), dynamics_client_id=g(), dynamics_secret=secret_value(rng),
            kv_client_id=g(), kv_secret=secret_value(rng), systemuserid=g(),
            business_unit_id=g(), organization_id=g(), seed_contact_id=g(), seed_account_id=g(),
        )


@dataclass
class FailRule:
    """A ``fail_next`` rule: answer the next ``remaining`` matching requests with an error."""

    service: str
    remaining: int
    status: int | str
    code: str | int | None = None
    message: str | None = None
    retry_after: float | None = None
    method: str | None = None
    path_contains: str | None = None
    in_batch: bool | None = None  # True: only a part of a $batch; False: only a request of its own

    def matches(self, service: str, method: str, path: str, in_batch: bool = False) -> bool:
        if self.remaining <= 0 or self.service != service:
            return False
        if self.in_batch is not None and self.in_batch != in_batch:
            return False
        if self.method and self.method.upper() != method.upper():
            return False
        return not self.path_contains or self.path_contains in path


@dataclass(frozen=True)
class Fault:
    """A fault chosen for one request: ``kind`` is "error", "hold" (apply, then never answer) or one of
    MANGLES (apply, then damage the answer)."""

    kind: str
    status: int = 0
    code: str | int | None = None
    message: str | None = None
    retry_after: float | None = None


@dataclass
class Rates:
    rate_5xx: float = 0.0
    rate_timeout_after_apply: float = 0.0
    rate_429: float = 0.0
    retry_after: float = 1
    status_5xx: int = 503


class Faults:
    """Thread-safe fault selection; random draws come from a seeded generator."""

    def __init__(self, seed: int) -> None:
        self._lock = threading.Lock()
        self._rng = random.Random(f"standin-faults-{seed}")
        self._rules: list[FailRule] = []
        self._rates: dict[str, Rates] = {}

    def add_rule(self, rule: FailRule) -> None:
        with self._lock:
            self._rules.append(rule)

    def set_rates(self, service: str, rates: Rates) -> None:
        with self._lock:
            self._rates[service] = rates

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()
            self._rates.clear()

    def pending(self) -> int:
        with self._lock:
            return sum(r.remaining for r in self._rules)

    def pick(self, service: str, method: str, path: str, rates: bool = True, in_batch: bool = False) -> Fault | None:
        """First matching ``fail_next`` rule (FIFO) wins; otherwise one random draw against the rates.

        A $batch part meets the rules only: the rates draw once for the whole request.
        """
        with self._lock:
            for rule in self._rules:
                if rule.matches(service, method, path, in_batch):
                    rule.remaining -= 1
                    self._rules = [r for r in self._rules if r.remaining > 0]
                    if rule.status == TIMEOUT_AFTER_APPLY:
                        return Fault("hold")
                    if rule.status in MANGLES:
                        return Fault(str(rule.status))
                    return Fault("error", int(rule.status), rule.code, rule.message, rule.retry_after)
            r = self._rates.get(service) if rates else None
            if r is None:
                return None
            draw = self._rng.random()
        if draw < r.rate_429:
            return Fault("error", 429, retry_after=r.retry_after)
        draw -= r.rate_429
        if draw < r.rate_5xx:
            return Fault("error", r.status_5xx, retry_after=r.retry_after)
        draw -= r.rate_5xx
        if draw < r.rate_timeout_after_apply and method.upper() != "GET":
            return Fault("hold")
        return None


class Metrics:
    """Request counts per (method, route kind), TCP connections accepted, and a bounded request log."""

    def __init__(self, log_size: int = 2000) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, Counter[Any]] = {s: Counter() for s in SERVICES}
        self._connections: dict[str, int] = {s: 0 for s in SERVICES}
        self.log: deque[tuple[str, str, str, int]] = deque(maxlen=log_size)

    def count(self, service: str, method: str, kind: str) -> None:
        with self._lock:
            c = self._counts[service]
            c[(method, kind)] += 1
            c["total"] += 1

    def connection(self, service: str) -> None:
        with self._lock:
            self._connections[service] += 1

    def record(self, service: str, method: str, path: str, status: int) -> None:
        self.log.append((service, method, path, status))

    def counts(self) -> dict[str, dict[Any, int]]:
        with self._lock:
            return {s: {"total": 0, **dict(c)} for s, c in self._counts.items()}

    def connections(self) -> dict[str, int]:
        with self._lock:
            return dict(self._connections)

    def reset(self) -> None:
        with self._lock:
            for s in SERVICES:
                self._counts[s].clear()
                self._connections[s] = 0
            self.log.clear()


class State:
    """Everything the three listeners share."""

    def __init__(
        self,
        seed: int = 0,
        latency: dict[str, float] | None = None,
        hold_seconds: float = 5.0,
        max_concurrent: int | None = None,
    ) -> None:
        self.lock = threading.RLock()
        self.ids = Identities.from_seed(seed)
        self.rng = random.Random(f"standin-values-{seed}")
        self.faults = Faults(seed)
        self.metrics = Metrics()
        self.latency: dict[str, float] = {s: 0.0 for s in SERVICES}
        self.latency.update(latency or {})
        self.hold_seconds = hold_seconds
        self.max_concurrent = max_concurrent
        self.dop_hint = 32  # what Dataverse recommends as a client's degree of parallelism (x-ms-dop-hint)
        self.protection: Any = None  # service protection limits (devstack/standin/protection.py), when set
        self.affinity_cookies = 0  # Dataverse requests that sent back the ARRAffinity cookie
        self.throttle_until = 0.0  # monotonic time until which every Dataverse request answers 429
        self.inflight: dict[str, int] = {s: 0 for s in SERVICES}
        self.urls: dict[str, str] = {}
        self.stopping = threading.Event()
        self.errors: list[str] = []

    def enter(self, service: str) -> int:
        """Mark a request in flight; returns the number now in flight."""
        with self.lock:
            self.inflight[service] += 1
            return self.inflight[service]

    def leave(self, service: str) -> None:
        with self.lock:
            self.inflight[service] -= 1
