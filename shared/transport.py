"""One Dataverse request, attempted until it is answered, refused, or out of time; classified errors.

Every attempt ends one of three ways:
- answered: a status and a body this client can read (a 2xx whose body is not Dataverse's, such as a
  gateway's HTML page or a body cut short, is not an answer);
- refused before sending: the call's deadline, the instance's throttle hold, the token source;
- sent with its answer lost: a timeout, a connection dropped after the request went out, a body that
  could not be read.
A lost answer means the request may have been applied. That belongs to the call (`Call`), not to an
exception: whatever ends the call afterwards, its caller knows the row may exist. Every request this
app sends is safe to repeat (reads, and creates by id with If-None-Match: *), so server errors and lost
answers are retried until the deadline; a 401 is retried once with a fresh token; a 429 waits what
Retry-After says (the instance's gate holds every thread) while the deadline allows the wait and the
request after it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlencode

import requests
from requests.adapters import HTTPAdapter
from requests.cookies import RequestsCookieJar
from requests.structures import CaseInsensitiveDict
from requests.utils import get_encoding_from_headers, requote_uri

from shared import telemetry
from shared.deadline import RESERVE, Deadline
from shared.errors import IntakeError
from shared.settings import Settings
from shared.throttle import Gate
from shared.tokens import TokenSource

log = logging.getLogger(__name__)

_ODATA_HEADERS = {"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0"}
_JSON_HEADERS = {**_ODATA_HEADERS, "Content-Type": "application/json; charset=utf-8"}
_FORBIDDEN = {"0x80072560": "dynamics_app_user_missing", "0x80040225": "dynamics_app_user_disabled",
              "0x80040220": "dynamics_privilege_missing"}
MAX_ATTEMPTS = 4  # tries that met an error other than throttling
THROTTLE_ATTEMPTS = 16  # tries that met a 429, each after the gate held it for Retry-After
DEFAULT_RETRY_AFTER = 1.0
MAX_RETRY_AFTER = 900.0  # longer than Dataverse's 300 s window; anything beyond is a malformed header


def default_pool_size() -> int:
    """As many connections as the worker has threads, so no call waits for or discards a connection."""
    try:
        threads = int(os.environ.get("PYTHON_THREADPOOL_THREAD_COUNT") or 0)
    except ValueError:
        threads = 0
    return max(32, threads)


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


def error_in(body: bytes) -> tuple[str, str]:
    """(code, message) of a Dataverse error body, of a response or of one $batch part ("" when not one)."""
    try:
        err = json.loads(body.decode("utf-8")).get("error") or {}
        return str(err.get("code") or ""), str(err.get("message") or "")[:500]
    except (ValueError, AttributeError):
        return "", ""


@dataclass
class Call:
    """What one logical request learned across its attempts; the caller keeps it past any exception."""

    maybe_applied: bool = False  # an attempt went out and its answer was lost: the request may have run


@dataclass(frozen=True)
class Reply:
    """An answer this client could read: the status, the headers, the raw body and, for JSON, the object."""

    status: int
    headers: Mapping[str, str]
    content: bytes
    data: Any = None

    @property
    def request_id(self) -> str | None:
        return self.headers.get("x-ms-service-request-id") or None


class _Unreadable(Exception):
    """A 2xx whose body is not Dataverse's answer (a gateway page, a body cut short)."""


def _read(resp: requests.Response, expect: str) -> Any:
    """The parsed body of an accepted status, or _Unreadable. expect: "json", "none" or "multipart"."""
    content = resp.content
    kind = (resp.headers.get("Content-Type") or "").lower()
    if expect == "multipart":
        if not kind.startswith("multipart/mixed") or not content:
            raise _Unreadable("not a multipart/mixed answer")
        return None
    if expect == "none" and not content:
        return None
    if "json" not in kind:
        raise _Unreadable(f"a {resp.status_code} answer of type {kind.split(';')[0] or 'none'}")
    try:
        data = json.loads(content)
    except ValueError:
        raise _Unreadable(f"a {resp.status_code} answer whose JSON body is cut short or malformed") from None
    if expect == "json" and not isinstance(data, dict):
        raise _Unreadable("a JSON answer that is not an object")
    return data


def prepare(method: str, url: str, data: bytes | None, headers: Mapping[str, str],
            params: Mapping[str, str] | None = None) -> requests.PreparedRequest:
    """What `requests.Request(...).prepare()` makes of these arguments, without its general path.

    requests' prepare parses the URL twice, checks the body against runtime-checkable Protocols and builds
    a cookie jar and a cookie header for a request that has none: about a tenth of a create's CPU here.
    The URL is the same string (query encoded as requests encodes a dict, then requoted as it requotes);
    tests/test_lean_path.py compares the two field by field.
    """
    if params:
        url += ("&" if "?" in url else "?") + urlencode(params)
    prepared = requests.PreparedRequest()
    prepared.method = method.upper()
    prepared.url = requote_uri(url)
    prepared.headers = CaseInsensitiveDict(headers)
    prepared.body = data
    if data is not None:
        prepared.headers["Content-Length"] = str(len(data))
    elif prepared.method not in ("GET", "HEAD") and "Content-Length" not in prepared.headers:
        prepared.headers["Content-Length"] = "0"
    return prepared


class _NoCookies(RequestsCookieJar):
    """A jar that keeps nothing and reads no Set-Cookie: Dataverse's ARRAffinity cookie would pin a client to
    one web server, and its limits are per server."""

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None


class _Adapter(HTTPAdapter):
    """requests' adapter, less the Set-Cookie parsing of every response (this client keeps no cookie)."""

    def build_response(self, req: requests.PreparedRequest, resp: Any) -> requests.Response:
        # HTTPAdapter.build_response, without extract_cookies_to_jar: the same fields, an empty cookie jar.
        response = requests.Response()
        response.status_code = getattr(resp, "status", None)  # type: ignore[assignment]
        response.headers = CaseInsensitiveDict(getattr(resp, "headers", {}))
        response.encoding = get_encoding_from_headers(response.headers)
        response.raw = resp
        response.reason = resp.reason
        response.url = req.url.decode("utf-8") if isinstance(req.url, bytes) else req.url  # type: ignore[assignment]
        response.request = req
        response.connection = self
        return response


class Transport:
    """Thread-safe: one pooled `requests.Session`, one token source and one gate per instance."""

    def __init__(self, settings: Settings, tokens: TokenSource, gate: Gate, *, pool_size: int | None = None,
                 connect_timeout: float = 3.05, read_timeout: float = 30.0, backoff: float = 0.5,
                 on_throttle: Callable[[str | None, float], None] | None = None) -> None:
        self._settings = settings
        self._tokens = tokens
        self.gate = gate
        self._base = settings.api_base
        self._timeout = (connect_timeout, read_timeout)
        self._backoff = backoff
        self._on_throttle = on_throttle
        self.pool_size = pool_size or default_pool_size()
        self.session = requests.Session()
        # Read the environment's CA bundle and proxy once: with trust_env on, requests re-reads all of
        # os.environ (and stats .netrc) on every request, a fifth of this client's CPU per call.
        self.session.trust_env = False
        ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        self._verify: bool | str = ca_bundle or True
        self._proxies = requests.utils.get_environ_proxies(self._base)
        # Dataverse's ARRAffinity cookie pins a client to one web server, and its limits are per server:
        # requests are sent prepared (no cookie jar is merged in), and neither the session nor a response
        # parses the Set-Cookie it answers with.
        self.session.cookies = _NoCookies()
        self.session.mount("https://", _Adapter(pool_connections=1, pool_maxsize=self.pool_size, max_retries=0))

    @property
    def base(self) -> str:
        return self._base

    def close(self) -> None:
        self.session.close()

    # ---- classification -------------------------------------------------------------------------------
    def failure(self, status: int, code: str, message: str, rid: str | None,
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
        if status >= 500 or status in (408, 0):
            return IntakeError("dynamics_unavailable", f"Dataverse answered {status} {code}".strip(), request_id=rid,
                               upstream_code=code or None, fix_args=fix)
        return IntakeError("dynamics_error", f"Dataverse answered {status} {code}: {message}".strip(),
                           request_id=rid, upstream_code=code or None, fix_args=fix)

    def _lost(self, method: str, path: str, why: str) -> IntakeError:
        return IntakeError("dynamics_unavailable", f"Dataverse did not answer {method} "
                                                   f"{path.split('(', 1)[0].split('?', 1)[0]}: {why}",
                           fix_args=self._settings.fix_args())

    # ---- the gate ---------------------------------------------------------------------------------------
    def observe_throttle(self, code: str | None, retry_after: float) -> None:
        """A 429 seen anywhere (a request, or a part of a $batch): the instance's telemetry and batching learn it."""
        telemetry.get().throttled(code)
        if self._on_throttle is not None:
            self._on_throttle(code, retry_after)

    def _account(self, resp: requests.Response | None) -> None:
        """Release the gate slot this attempt held, telling the gate how it went (no answer: neither)."""
        status, code, retry_after = 599, None, None
        try:
            if resp is not None:
                status = resp.status_code
                hint = resp.headers.get("x-ms-dop-hint")
                if hint and hint.isdigit():
                    self.gate.hint(int(hint))
                if status == 429:
                    code = error_in(resp.content)[0] or None
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
        finally:
            self.gate.leave(status, code, retry_after)
        if status == 429:
            self.observe_throttle(code, retry_after if retry_after is not None else DEFAULT_RETRY_AFTER)

    def _pause(self, attempt: int, deadline: Deadline) -> bool:
        """Sleep before the next try (capped exponential backoff, jitter); False when the try would not fit."""
        wait = min(8.0, self._backoff * 2 ** attempt) * random.uniform(0.5, 1.0)
        if not deadline.allows(wait + RESERVE):
            return False
        time.sleep(wait)
        return True

    # ---- one logical request ----------------------------------------------------------------------------
    def request(self, method: str, path: str, *, deadline: Deadline, call: Call | None = None,
                data: bytes | None = None, headers: dict[str, str] | None = None,
                params: dict[str, str] | None = None, ok: tuple[int, ...] = (200, 201, 204),
                expect: str = "json", resend: bool = True) -> Reply:
        """The answer if its status is in `ok` and its body readable as `expect`, else raise IntakeError.

        `call` records whether an attempt may have been applied; it stays true whatever ends the call.
        `resend=False`: an attempt that may have been applied (answer lost, 5xx) ends the call at once; a
        `$batch` hands each of its creates back to be sent alone instead of sending them all again.
        """
        call = call if call is not None else Call()
        base = _ODATA_HEADERS if data is None else _JSON_HEADERS
        prepared = prepare(method, self._base + path, data, {**base, **headers} if headers else base, params)
        writes = method != "GET"
        reauthed = False
        failure: IntakeError | None = None
        throttles = 0
        for attempt in range(MAX_ATTEMPTS + THROTTLE_ATTEMPTS):
            tries = attempt - throttles
            if deadline.expired() or tries >= MAX_ATTEMPTS:
                break
            token = self._tokens.token(deadline)
            prepared.headers["Authorization"] = "Bearer " + token
            self.gate.enter(deadline)  # waits out this instance's throttling; raises when the deadline comes first
            resp = None
            try:
                timeout = (deadline.cap(self._timeout[0]), deadline.cap(self._timeout[1]))
                resp = self.session.send(prepared, timeout=timeout, allow_redirects=False, verify=self._verify,
                                         proxies=self._proxies, stream=False)
            except requests.RequestException as exc:
                # A refused or timed-out connect never reached Dataverse; anything else after sending may have.
                never_sent = isinstance(exc, requests.exceptions.ConnectTimeout) or "NewConnectionError" in repr(exc)
                call.maybe_applied = call.maybe_applied or (writes and not never_sent)
                why = (f"no answer within {timeout[1]:.1f}s" if isinstance(exc, requests.exceptions.ReadTimeout)
                       else type(exc).__name__)
                failure = self._lost(method, path, why)
                if (resend or never_sent) and self._pause(tries, deadline):
                    continue
                break
            finally:
                self._account(resp)
            status = resp.status_code
            if status in ok:
                try:
                    return Reply(status, resp.headers, resp.content, _read(resp, expect))
                except _Unreadable as exc:
                    call.maybe_applied = call.maybe_applied or writes
                    failure = self._lost(method, path, str(exc))
                    failure.request_id = resp.headers.get("x-ms-service-request-id") or None
                    log.info("dataverse answered %s with %s; treated as a lost answer", method, exc)
                    if resend and self._pause(tries, deadline):
                        continue
                    break
            if status == 401 and not reauthed:
                reauthed = True
                log.info("dataverse answered 401; refreshing the token and retrying once")
                self._tokens.refresh(token, deadline)
                continue
            rid = resp.headers.get("x-ms-service-request-id") or None
            if status == 401:
                failure = IntakeError("dynamics_token_rejected", "Dataverse rejected a freshly acquired token.",
                                      request_id=rid, fix_args=self._settings.fix_args())
                break
            code, message = error_in(resp.content)
            failure = self.failure(status, code, message, rid, parse_retry_after(resp.headers.get("Retry-After")))
            if status == 429:
                throttles += 1
                if deadline.allows((failure.retry_after or 0.0) + RESERVE):
                    log.info("dataverse throttled (%s); the instance holds its requests %.1fs as Retry-After says",
                             failure.upstream_code or "-", failure.retry_after or 0.0)
                    continue  # the gate holds the next try, and every other thread's, until Retry-After passed
                break
            if status >= 500 or status == 408:
                call.maybe_applied = call.maybe_applied or writes
                if resend and self._pause(tries, deadline):
                    continue
            break
        if failure is None:
            failure = self._lost(method, path, "the call's deadline passed")
        raise failure
