"""HTTP plumbing shared by the three listeners: request/response types, TLS server, request pipeline."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from .state import MANGLES, Fault, State

MAX_BODY = 8 * 1024 * 1024
JSON = "application/json; charset=utf-8"


@dataclass
class Request:
    """One parsed HTTP request (body fully read)."""

    method: str
    raw_path: str
    path: str
    query: dict[str, list[str]]
    headers: Message
    body: bytes

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name, default)

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))


@dataclass
class Response:
    """A response to write; ``hold`` means: do not answer, keep the socket open, then close it;
    ``drop`` means: send the head and part of the body, then close the connection."""

    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    hold: bool = False
    drop: bool = False

    def header(self, name: str, value: str) -> Response:
        self.headers.append((name, value))
        return self


class HttpError(Exception):
    """Raised by route handlers to answer with a prepared response."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


def json_response(status: int, obj: Any, content_type: str = JSON, headers: list | None = None) -> Response:
    body = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    return Response(status, body, [("Content-Type", content_type), *(headers or [])])


def format_retry_after(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


HandlerFn = Callable[[Request], Response]
Route = tuple[str, HandlerFn]


class Service(Protocol):
    """What a listener's service provides to the pipeline."""

    name: str
    state: State
    control: Callable[[Request], Response] | None

    def route(self, req: Request) -> Route: ...

    def fault_response(self, req: Request, fault: Fault) -> Response: ...

    def finalize(self, req: Request, resp: Response) -> None: ...


def bug_response(state: State, service: str) -> Response:
    state.errors.append(traceback.format_exc())
    return json_response(500, {"error": {"code": "StandInInternalError",
                                         "message": f"Unexpected error in the {service} stand-in."}})


def process(svc: Service, req: Request) -> Response:
    """Route, count, delay, inject faults, handle; never raises."""
    state = svc.state
    if svc.control is not None and req.path.startswith("/_standin/"):
        try:
            return svc.control(req)
        except HttpError as exc:
            return exc.response
        except Exception:
            return bug_response(state, "control")
    resp: Response
    try:
        kind, handler = svc.route(req)
    except HttpError as exc:
        kind, handler, resp = "unknown", None, exc.response
    except Exception:
        kind, handler, resp = "unknown", None, bug_response(state, svc.name)
    state.metrics.count(svc.name, req.method, kind)
    inflight = state.enter(svc.name)
    try:
        delay = state.latency.get(svc.name, 0.0)
        if delay > 0:
            state.stopping.wait(delay)
        limit = state.max_concurrent
        fault = state.faults.pick(svc.name, req.method, req.raw_path)
        if svc.name == "dataverse" and limit and inflight > limit:
            fault = Fault("error", 429, "0x80072326")
        if svc.name == "dataverse" and fault is None and handler is not None and state.throttle_until:
            left = state.throttle_until - time.monotonic()
            if left > 0:
                fault = Fault("error", 429, "0x80072322", retry_after=left)
        protection = state.protection
        if svc.name == "dataverse" and protection is not None and fault is None and handler is not None:
            from .batch import count_parts

            verdict = protection.admit(inflight, count_parts(req))
            if verdict is not None:
                fault = Fault("error", 429, verdict[0], retry_after=verdict[1])
        if fault is not None and fault.kind == "error":
            try:
                resp = svc.fault_response(req, fault)
            except Exception:
                resp = bug_response(state, svc.name)
        elif handler is not None:
            try:
                resp = handler(req)
            except HttpError as exc:
                resp = exc.response
            except Exception:
                resp = bug_response(state, svc.name)
            if fault is not None and fault.kind == "hold":
                resp.hold = True
        svc.finalize(req, resp)
        if fault is not None and fault.kind in MANGLES:
            resp = damaged(resp, fault.kind)
    finally:
        state.leave(svc.name)
    state.metrics.record(svc.name, req.method, req.raw_path, 0 if resp.hold else resp.status)
    return resp


GATEWAY_PAGE = (b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body><h1>Bad Gateway</h1>"
                b"<p>The proxy server received an invalid response from an upstream server.</p></body></html>")
CAPTIVE_PAGE = (b"<!DOCTYPE html><html><head><title>Sign in</title></head><body><p>Your session has expired. "
                b"Please sign in to continue.</p></body></html>")


def damaged(resp: Response, how: str) -> Response:
    """The answer as it arrives after the network damaged it (state.MANGLES says what each means)."""
    if how == "gateway_502":
        return Response(502, GATEWAY_PAGE, [("Content-Type", "text/html")])
    if how == "html_2xx":
        return Response(200, CAPTIVE_PAGE, [("Content-Type", "text/html")])
    body = resp.body or b'{"@odata.context":"$metadata#incidents/$entity","incidentid":"00000000"}'
    if how == "malformed_batch" and b"HTTP/1.1 " in resp.body:
        first = resp.body.find(b"HTTP/1.1 ")
        second = resp.body.find(b"HTTP/1.1 ", first + 1)
        at = second if second > 0 else first
        return Response(resp.status, resp.body[:at] + b"<html>upstream reset</html>\r\n"
                        + resp.body[resp.body.find(b"\r\n--", at):], resp.headers)
    headers = [(k, v) for k, v in resp.headers if k.lower() != "content-type"]
    headers.append(("Content-Type", next((v for k, v in resp.headers if k.lower() == "content-type"), JSON)))
    if how == "drop_body":
        return Response(200 if resp.status == 204 else resp.status, body, headers, drop=True)
    return Response(200 if resp.status == 204 else resp.status, body[: max(1, len(body) // 2)], headers)


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Handler(BaseHTTPRequestHandler):
    """Reads the whole request, runs the pipeline, writes one response with Content-Length."""

    protocol_version = "HTTP/1.1"
    server_version = "standin/1.0"
    sys_version = ""
    timeout = 60
    server: TlsServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Quiet: no per-request stderr logging."""

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol-level errors (bad request line, etc.) as a small JSON body."""
        self.close_connection = True
        self._write(json_response(code, {"error": {"code": str(code), "message": message or ""}}))

    def _dispatch(self) -> None:
        try:
            body = self._read_body()
        except _BadRequest as exc:
            self.send_error(exc.status, str(exc))
            return
        parts = urlsplit(self.path)
        req = Request(
            method=self.command, raw_path=self.path, path=unquote(parts.path),
            query=parse_qs(parts.query, keep_blank_values=True), headers=self.headers, body=body,
        )
        resp = process(self.server.service, req)
        if resp.hold:
            self.server.service.state.stopping.wait(self.server.service.state.hold_seconds)
            self.close_connection = True
            return
        if resp.drop:  # the head and half the body, then the connection is gone
            self.close_connection = True
            whole = resp.body
            resp.body = whole[: len(whole) // 2]
            self._write(resp, content_length=len(whole))
            return
        self._write(resp)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = _dispatch

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self._read_chunked()
        raw = self.headers.get("Content-Length")
        if raw is None:
            return b""
        try:
            length = int(raw)
        except ValueError:
            raise _BadRequest(400, "Invalid Content-Length") from None
        if length < 0 or length > MAX_BODY:
            raise _BadRequest(413 if length > 0 else 400, "Bad Content-Length")
        return self.rfile.read(length) if length else b""

    def _read_chunked(self) -> bytes:
        out = bytearray()
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _BadRequest(400, "Bad chunk size") from None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(out)
            out += self.rfile.read(size)
            self.rfile.readline(8)
            if len(out) > MAX_BODY:
                raise _BadRequest(413, "Body too large")

    def _write(self, resp: Response, content_length: int | None = None) -> None:
        try:
            reason = HTTPStatus(resp.status).phrase
        except ValueError:
            reason = "Status"
        lines = [f"HTTP/1.1 {resp.status} {reason}", f"Date: {formatdate(usegmt=True)}",
                 f"Server: {self.server_version}"]
        lines += [f"{k}: {v}" for k, v in resp.headers]
        lines.append(f"Content-Length: {len(resp.body) if content_length is None else content_length}")
        if self.close_connection and not resp.drop:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(head if self.command == "HEAD" else head + resp.body)


class TlsServer(ThreadingHTTPServer):
    """One HTTPS listener; the TLS handshake runs in the connection's own thread."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # the default 5 drops connections under a concurrent benchmark

    def __init__(self, address: tuple[str, int], service: Service, context: ssl.SSLContext) -> None:
        self.service = service
        self.context = context
        self._active: set[ssl.SSLSocket] = set()
        self._active_lock = threading.Lock()
        super().__init__(address, Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.service.state.metrics.connection(self.service.name)
        super().process_request(request, client_address)

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            request.settimeout(10)
            tls = self.context.wrap_socket(request, server_side=True)
        except (OSError, ValueError):
            return
        with self._active_lock:
            self._active.add(tls)
        try:
            self.RequestHandlerClass(tls, client_address, self)
        except (OSError, ValueError):
            pass
        finally:
            with self._active_lock:
                self._active.discard(tls)
            try:
                tls.close()
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet: client disconnects are normal."""

    def close_active(self) -> None:
        """Shut down open client connections (idle keep-alive ones included)."""
        with self._active_lock:
            active = list(self._active)
        for sock in active:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
