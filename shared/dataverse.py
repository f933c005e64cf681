"""The Dataverse Web API client: one pooled session per instance, one retry policy, classified errors.

Retries are decided per request: a 401 is retried once with a fresh token; a 429 waits what
Retry-After says while the caller's time budget lasts; server errors and timeouts are retried with
backoff only when repeating the request cannot create a second record (reads and keyed creates).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from shared.auth import TokenSource
from shared.errors import IntakeError
from shared.settings import Settings

log = logging.getLogger(__name__)

_ODATA_HEADERS = {"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0"}
_JSON_HEADERS = {**_ODATA_HEADERS, "Content-Type": "application/json; charset=utf-8"}
_ENTITY_ID = re.compile(r"\(([0-9a-fA-F-]{36})\)\s*$")
_FORBIDDEN = {"0x80072560": "dynamics_app_user_missing", "0x80040225": "dynamics_app_user_disabled",
              "0x80040220": "dynamics_privilege_missing"}
MAX_ATTEMPTS = 4


def default_pool_size() -> int:
    """As many connections as the worker has threads, so no call waits for or discards a connection."""
    try:
        threads = int(os.environ.get("PYTHON_THREADPOOL_THREAD_COUNT") or 0)
    except ValueError:
        threads = 0
    return max(32, threads)


@dataclass(frozen=True)
class Created:
    id: str
    created: bool
    request_id: str | None


def _error_of(resp: requests.Response) -> tuple[str, str]:
    try:
        err = resp.json().get("error") or {}
        return str(err.get("code") or ""), str(err.get("message") or "")[:500]
    except (ValueError, AttributeError):
        return "", ""


def _retry_after(resp: requests.Response) -> float:
    try:
        return max(float(resp.headers.get("Retry-After", "1")), 0.0)
    except ValueError:
        return 1.0


class DataverseClient:
    """Thread-safe: `requests.Session` is shared by all threads of the instance, as is the token."""

    def __init__(self, settings: Settings, tokens: TokenSource, *, pool_size: int | None = None,
                 connect_timeout: float = 3.05, read_timeout: float = 30.0, backoff: float = 0.5) -> None:
        self._settings = settings
        self._tokens = tokens
        self._base = settings.api_base
        self._timeout = (connect_timeout, read_timeout)
        self._backoff = backoff
        size = pool_size or default_pool_size()
        self.session = requests.Session()
        # Read the environment's CA bundle and proxy once: with trust_env on, requests re-reads all of
        # os.environ (and stats .netrc) on every request, a fifth of this client's CPU per call.
        self.session.trust_env = False
        ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        if ca_bundle:
            self.session.verify = ca_bundle
        self.session.proxies = requests.utils.get_environ_proxies(self._base)
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=size, max_retries=0)
        self.session.mount("https://", adapter)

    def close(self) -> None:
        self.session.close()

    def _fail(self, resp: requests.Response) -> IntakeError:
        code, message = _error_of(resp)
        rid = resp.headers.get("x-ms-service-request-id")
        fix = self._settings.fix_args()
        status = resp.status_code
        if status == 403:
            ours = _FORBIDDEN.get(code, "dynamics_error")
            return IntakeError(ours, f"Dataverse answered 403 {code}: {message}", request_id=rid,
                               upstream_code=code or None, fix_args=fix)
        if status in (400, 404) and code and code != "0x80060888":
            return IntakeError("dynamics_payload_rejected", f"Dataverse answered {status} {code}: {message}",
                               request_id=rid, upstream_code=code, fix_args=fix)
        if status == 429:
            return IntakeError("dynamics_throttled", f"Dataverse answered 429 {code}: {message}", request_id=rid,
                               retry_after=_retry_after(resp), upstream_code=code or None, fix_args=fix)
        if status >= 500:
            return IntakeError("dynamics_unavailable", f"Dataverse answered {status} {code}".strip(), request_id=rid,
                               upstream_code=code or None, fix_args=fix)
        return IntakeError("dynamics_error", f"Dataverse answered {status} {code}: {message}".strip(),
                           request_id=rid, upstream_code=code or None, fix_args=fix)

    def _pause(self, attempt: int, deadline: float) -> bool:
        """Sleep before the next try with capped exponential backoff and jitter; False when out of budget."""
        wait = min(8.0, self._backoff * 2 ** attempt) * random.uniform(0.5, 1.0)
        if time.monotonic() + wait > deadline:
            return False
        time.sleep(wait)
        return True

    def request(self, method: str, path: str, *, body: Any = None, headers: dict[str, str] | None = None,
                params: dict[str, str] | None = None, idempotent: bool, budget: float = 20.0,
                ok: tuple[int, ...] = (200, 201, 204)) -> requests.Response:
        """Send one logical request; return the response if its status is in `ok`, else raise IntakeError."""
        deadline = time.monotonic() + budget
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        base = _ODATA_HEADERS if data is None else _JSON_HEADERS
        send_headers = {**base, **headers} if headers else dict(base)
        url = self._base + path
        reauthed = False
        for attempt in range(MAX_ATTEMPTS):
            token = self._tokens.token()
            send_headers["Authorization"] = "Bearer " + token
            try:
                resp = self.session.request(method, url, data=data, headers=send_headers, params=params,
                                            timeout=self._timeout)
            except requests.exceptions.ConnectionError as exc:
                # A refused or timed-out connect was never received: safe to retry even a plain POST.
                never_sent = isinstance(exc, requests.exceptions.ConnectTimeout) or "NewConnectionError" in repr(exc)
                if (idempotent or never_sent) and attempt + 1 < MAX_ATTEMPTS and self._pause(attempt, deadline):
                    continue
                code = "dynamics_unavailable" if idempotent or never_sent else "dynamics_outcome_unknown"
                raise IntakeError(code, f"Dataverse did not answer {method} {path.split('?', maxsplit=1)[0]}: "
                                        f"{type(exc).__name__}", fix_args=self._settings.fix_args()) from None
            except requests.exceptions.Timeout:
                if idempotent and attempt + 1 < MAX_ATTEMPTS and self._pause(attempt, deadline):
                    continue
                code = "dynamics_unavailable" if idempotent else "dynamics_outcome_unknown"
                raise IntakeError(code, f"Dataverse did not answer {method} {path.split('(', maxsplit=1)[0]} within "
                                        f"{self._timeout[1]:.0f}s", fix_args=self._settings.fix_args()) from None
            status = resp.status_code
            if status in ok:
                return resp
            if status == 401 and not reauthed:
                reauthed = True
                log.info("dataverse answered 401; refreshing the token and retrying once")
                self._tokens.refresh(token)
                continue
            if status == 401:
                raise IntakeError("dynamics_token_rejected", "Dataverse rejected a freshly acquired token.",
                                  request_id=resp.headers.get("x-ms-service-request-id"),
                                  fix_args=self._settings.fix_args())
            if status == 429 and attempt + 1 < MAX_ATTEMPTS:
                wait = _retry_after(resp)
                if time.monotonic() + wait <= deadline:
                    log.info("dataverse throttled; waiting %.1fs as Retry-After says", wait)
                    time.sleep(wait)
                    continue
            elif status >= 500 and idempotent and attempt + 1 < MAX_ATTEMPTS and self._pause(attempt, deadline):
                continue
            raise self._fail(resp)
        raise self._fail(resp)

    def create(self, entity_set: str, record: dict, *, record_id: str | None = None,
               budget: float = 20.0) -> Created:
        """Create a row. With `record_id`, create-only by key: a 412 means it already exists."""
        if record_id is None:
            resp = self.request("POST", entity_set, body=record, idempotent=False, budget=budget)
            match = _ENTITY_ID.search(resp.headers.get("OData-EntityId", ""))
            if not match:
                raise IntakeError("dynamics_error", "Dataverse created a row but sent no OData-EntityId.",
                                  request_id=resp.headers.get("x-ms-service-request-id"))
            return Created(match.group(1).lower(), True, resp.headers.get("x-ms-service-request-id"))
        resp = self.request("PATCH", f"{entity_set}({record_id})", body=record, headers={"If-None-Match": "*"},
                            idempotent=True, budget=budget, ok=(200, 201, 204, 412))
        return Created(record_id, resp.status_code != 412, resp.headers.get("x-ms-service-request-id"))

    def find_id(self, entity_set: str, key_column: str, filter_: str, budget: float = 20.0) -> str | None:
        """The key of the first row matching an OData filter the caller built with `odata_literal`."""
        resp = self.request("GET", entity_set, params={"$select": key_column, "$filter": filter_, "$top": "1"},
                            idempotent=True, budget=budget)
        rows = resp.json().get("value") or []
        return str(rows[0][key_column]).lower() if rows else None

    def get(self, path: str, budget: float = 10.0) -> dict:
        return self.request("GET", path, idempotent=True, budget=budget).json()


def odata_literal(value: str) -> str:
    """An OData string literal: single quotes doubled, so a value can never end the literal early."""
    return "'" + value.replace("'", "''") + "'"
