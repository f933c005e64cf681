"""The Dataverse Web API client: one pooled session per instance, one retry policy, classified errors.

Retries are decided per request: a 401 is retried once with a fresh token; a 429 waits what
Retry-After says (plus jitter) while the call's deadline allows; server errors and lost answers are
retried with backoff, which is safe because every request is a read or a create by id.
"""

from __future__ import annotations

import http.cookiejar
import json
import logging
import math
import os
import random
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from shared import telemetry
from shared.auth import TokenSource
from shared.batching import UNCLEAR, Answer, Gatherer, Op, decode, encode
from shared.deadline import Deadline
from shared.errors import IntakeError
from shared.settings import Settings
from shared.throttle import REQUEST_BUDGET_CODE, Gate

log = logging.getLogger(__name__)

_ODATA_HEADERS = {"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0"}
_JSON_HEADERS = {**_ODATA_HEADERS, "Content-Type": "application/json; charset=utf-8"}
_ENTITY_ID = re.compile(r"\(([0-9a-fA-F-]{36})\)\s*$")
_FORBIDDEN = {"0x80072560": "dynamics_app_user_missing", "0x80040225": "dynamics_app_user_disabled",
              "0x80040220": "dynamics_privilege_missing"}
MAX_ATTEMPTS = 4  # tries that met an error other than throttling
THROTTLE_ATTEMPTS = 16  # tries that met a 429, each after the gate held it for Retry-After


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


def _error_in(body: bytes) -> tuple[str, str]:
    """(code, message) of a Dataverse error body, of a response or of one $batch part."""
    try:
        err = json.loads(body.decode("utf-8")).get("error") or {}
        return str(err.get("code") or ""), str(err.get("message") or "")[:500]
    except (ValueError, AttributeError):
        return "", ""


def _error_of(resp: requests.Response) -> tuple[str, str]:
    return _error_in(resp.content)


DEFAULT_RETRY_AFTER = 1.0
MAX_RETRY_AFTER = 900.0  # longer than Dataverse's 300 s window; anything beyond is a malformed header


def parse_retry_after(value: str | None, default: float = DEFAULT_RETRY_AFTER) -> float:
    """Seconds to wait from a Retry-After header: delay-seconds or an HTTP-date (RFC 9110 10.2.3).

    A missing, malformed, negative or non-finite value gets `default`; a date in the past means 0.
    """
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return default
        if when.tzinfo is None:
            return default
        seconds = max((when - datetime.now(UTC)).total_seconds(), 0.0)
    if not math.isfinite(seconds) or seconds < 0:
        return default
    return min(seconds, MAX_RETRY_AFTER)


def _retry_after(resp: requests.Response) -> float:
    return parse_retry_after(resp.headers.get("Retry-After"))


class DataverseClient:
    """Thread-safe: `requests.Session` is shared by all threads of the instance, as is the token."""

    def __init__(self, settings: Settings, tokens: TokenSource, *, pool_size: int | None = None,
                 connect_timeout: float = 3.05, read_timeout: float = 30.0, backoff: float = 0.5,
                 concurrency: int | None = None) -> None:
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
        # Dataverse's ARRAffinity cookie pins a client to one web server, and its limits are per server:
        # keeping no cookie spreads the requests over all of them.
        self.session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        self.gate = Gate(concurrency or settings.dataverse_concurrency)
        batch = settings.batch_size
        self.batches = Gatherer(self._send_batch, settings.batch_window_ms / 1000, batch) if batch > 1 else None
        self.pool_size = size
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=size, max_retries=0)
        self.session.mount("https://", adapter)

    @property
    def settings(self) -> Settings:
        return self._settings

    def close(self) -> None:
        self.session.close()

    def _fail(self, resp: requests.Response) -> IntakeError:
        code, message = _error_of(resp)
        return self._failure(resp.status_code, code, message, resp.headers.get("x-ms-service-request-id"),
                             _retry_after(resp))

    def _failure(self, status: int, code: str, message: str, rid: str | None,
                 retry_after: float = DEFAULT_RETRY_AFTER) -> IntakeError:
        """A Dataverse error answer (of a request or of one $batch part) as the app's classified error."""
        fix = self._settings.fix_args()
        if status == 403:
            ours = _FORBIDDEN.get(code, "dynamics_error")
            if ours == "dynamics_app_user_missing" and self._settings.auth == "managed_identity":
                ours = "managed_identity_not_app_user"
            return IntakeError(ours, f"Dataverse answered 403 {code}: {message}", request_id=rid,
                               upstream_code=code or None, fix_args=fix)
        if status in (400, 404) and code and code != "0x80060888":
            return IntakeError("dynamics_payload_rejected", f"Dataverse answered {status} {code}: {message}",
                               request_id=rid, upstream_code=code, fix_args=fix)
        if status == 429:
            return IntakeError("dynamics_throttled", f"Dataverse answered 429 {code}: {message}", request_id=rid,
                               retry_after=retry_after, upstream_code=code or None, fix_args=fix)
        if status >= 500:
            return IntakeError("dynamics_unavailable", f"Dataverse answered {status} {code}".strip(), request_id=rid,
                               upstream_code=code or None, fix_args=fix)
        return IntakeError("dynamics_error", f"Dataverse answered {status} {code}: {message}".strip(),
                           request_id=rid, upstream_code=code or None, fix_args=fix)

    def _pause(self, attempt: int, deadline: Deadline) -> bool:
        """Sleep before the next try with capped exponential backoff and jitter; False when out of time."""
        wait = min(8.0, self._backoff * 2 ** attempt) * random.uniform(0.5, 1.0)
        if not deadline.allows(wait):
            return False
        time.sleep(wait)
        return True

    def _account(self, resp: requests.Response | None) -> None:
        """Tell the instance's gate how the request went (no answer counts as neither success nor 429)."""
        if resp is None:
            self.gate.leave(599)
            return
        hint = resp.headers.get("x-ms-dop-hint")
        if hint and hint.isdigit():
            self.gate.hint(int(hint))
        if resp.status_code == 429:
            code, _ = _error_of(resp)
            telemetry.get().throttled(code or None)
            self.gate.leave(429, code or None, _retry_after(resp))
            if code == REQUEST_BUDGET_CODE and self.batches is not None:
                self.batches.engage(_retry_after(resp))
        else:
            self.gate.leave(resp.status_code)

    def _unanswered(self, method: str, path: str, why: str) -> IntakeError:
        return IntakeError("dynamics_unavailable", f"Dataverse did not answer {method} "
                                                   f"{path.split('(', 1)[0].split('?', 1)[0]}: {why}",
                           fix_args=self._settings.fix_args())

    def request(self, method: str, path: str, *, body: Any = None, headers: dict[str, str] | None = None,
                params: dict[str, str] | None = None, budget: float | Deadline = 20.0,
                ok: tuple[int, ...] = (200, 201, 204), data: bytes | None = None) -> requests.Response:
        """Send one logical request; return the response if its status is in `ok`, else raise IntakeError.

        Every request this client sends is safe to repeat (reads, and creates by id with If-None-Match: *),
        so server errors and lost answers are retried until the deadline. A raised error carries
        `maybe_applied`: whether an attempt may have reached Dataverse without its answer reaching us.
        """
        deadline = Deadline.of(budget)
        if data is None and body is not None:
            data = json.dumps(body, separators=(",", ":")).encode()
        base = _ODATA_HEADERS if data is None else _JSON_HEADERS
        send_headers = {**base, **headers} if headers else dict(base)
        url = self._base + path
        reauthed = False
        maybe_applied = False
        failure: IntakeError | None = None
        throttles = 0
        for attempt in range(MAX_ATTEMPTS + THROTTLE_ATTEMPTS):
            if deadline.expired() or attempt - throttles >= MAX_ATTEMPTS:
                break
            token = self._tokens.token(deadline)
            send_headers["Authorization"] = "Bearer " + token
            self.gate.enter(deadline)  # waits out this instance's throttling; raises when the deadline comes first
            timeout = (deadline.cap(self._timeout[0]), deadline.cap(self._timeout[1]))
            resp = None
            tries = attempt - throttles
            try:
                resp = self.session.request(method, url, data=data, headers=send_headers, params=params,
                                            timeout=timeout)
            except requests.exceptions.ConnectionError as exc:
                # A refused or timed-out connect was never received; anything else may have been.
                never_sent = isinstance(exc, requests.exceptions.ConnectTimeout) or "NewConnectionError" in repr(exc)
                maybe_applied = maybe_applied or not never_sent
                failure = self._unanswered(method, path, type(exc).__name__)
                if self._pause(tries, deadline):
                    continue
                break
            except requests.exceptions.Timeout:
                maybe_applied = True
                failure = self._unanswered(method, path, f"no answer within {timeout[1]:.1f}s")
                if self._pause(tries, deadline):
                    continue
                break
            finally:
                self._account(resp)
            status = resp.status_code
            if status in ok:
                return resp
            if status == 401 and not reauthed:
                reauthed = True
                log.info("dataverse answered 401; refreshing the token and retrying once")
                self._tokens.refresh(token, deadline)
                continue
            if status == 401:
                failure = IntakeError("dynamics_token_rejected", "Dataverse rejected a freshly acquired token.",
                                      request_id=resp.headers.get("x-ms-service-request-id"),
                                      fix_args=self._settings.fix_args())
                break
            failure = self._fail(resp)
            if status == 429:
                throttles += 1
                if deadline.allows(failure.retry_after or 0.0):
                    log.info("dataverse throttled (%s); the instance holds its requests %.1fs as Retry-After says",
                             failure.upstream_code or "-", failure.retry_after or 0.0)
                    continue  # the gate holds the next try, and every other thread's, until Retry-After passed
                break
            if status >= 500:
                maybe_applied = True
                if self._pause(tries, deadline):
                    continue
            break
        if failure is None:
            failure = self._unanswered(method, path, "the call's deadline passed")
        failure.maybe_applied = maybe_applied  # type: ignore[attr-defined]
        raise failure

    def create(self, entity_set: str, record: dict, *, record_id: str, keyed: bool,
               budget: float | Deadline = 20.0) -> Created:
        """Create-only by id (PATCH + If-None-Match: *), so every retry inside the call is safe.

        `keyed`: the id was derived from the event's key, and a 412 means the event's row already exists.
        Otherwise the id was generated for this call alone, and a 412 can only be this call's own earlier
        attempt, applied with its answer lost: the row is ours, created now.
        """
        deadline = Deadline.of(budget)
        path = f"{entity_set}({record_id})"
        data = json.dumps(record, separators=(",", ":")).encode()
        maybe_applied = False
        try:
            if self.batches is not None:
                got = self.batches.submit(Op(path, data), deadline)
                if isinstance(got, Answer):
                    rid = got.headers.get("x-ms-service-request-id") or None
                    if got.status in (200, 201, 204, 412):
                        return Created(record_id, got.status != 412 or not keyed, rid)
                    code, message = _error_in(got.body)
                    raise self._failure(got.status, code, message, rid)
                maybe_applied = got is UNCLEAR  # resent alone below: safe, it is create-only
            resp = self.request("PATCH", path, data=data, headers={"If-None-Match": "*"}, budget=deadline,
                                ok=(200, 201, 204, 412))
        except IntakeError as err:
            err.record_id = record_id
            if not keyed and (maybe_applied or getattr(err, "maybe_applied", False)):
                unknown = IntakeError("dynamics_outcome_unknown", f"{err.detail}; the row may exist as "
                                      f"{entity_set}({record_id}).", request_id=err.request_id,
                                      upstream_code=err.upstream_code, fix_args=err.fix_args, record_id=record_id)
                raise unknown from None
            raise
        finally:
            if self.batches is not None:
                self.batches.done()
        rid = resp.headers.get("x-ms-service-request-id")
        return Created(record_id, resp.status_code != 412 or not keyed, rid)

    def _send_batch(self, ops: list[Op], deadline: Deadline) -> list[Answer]:
        """One $batch of create-only parts, each answered on its own (continue-on-error)."""
        body, content_type = encode(ops, self._base)
        resp = self.request("POST", "$batch", data=body, budget=deadline, ok=(200,),
                            headers={"Content-Type": content_type, "Prefer": "odata.continue-on-error"})
        answers = decode(resp.headers.get("Content-Type") or "", resp.content)
        telemetry.get().batched(len(ops))
        rid = resp.headers.get("x-ms-service-request-id")
        return [a if "x-ms-service-request-id" in a.headers else
                Answer(a.status, {**a.headers, "x-ms-service-request-id": rid or ""}, a.body) for a in answers]

    def read(self, entity_set: str, record_id: str, columns: tuple[str, ...],
             budget: float | Deadline = 20.0) -> dict:
        """Selected columns of one row (used only to compare a repeated key's row with its new event)."""
        return self.request("GET", f"{entity_set}({record_id})", params={"$select": ",".join(columns)},
                            budget=budget).json()

    def find_id(self, entity_set: str, key_column: str, filter_: str,
                budget: float | Deadline = 20.0) -> str | None:
        """The key of the first row matching an OData filter the caller built with `odata_literal`."""
        resp = self.request("GET", entity_set, params={"$select": key_column, "$filter": filter_, "$top": "1"},
                            budget=budget)
        rows = resp.json().get("value") or []
        return str(rows[0][key_column]).lower() if rows else None

    def get(self, path: str, budget: float | Deadline = 10.0) -> dict:
        return self.request("GET", path, budget=budget).json()


def odata_literal(value: str) -> str:
    """An OData string literal: single quotes doubled, so a value can never end the literal early."""
    return "'" + value.replace("'", "''") + "'"
