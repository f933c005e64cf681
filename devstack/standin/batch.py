"""Dataverse's `$batch` on the stand-in: multipart/mixed in, multipart/mixed out, one part per operation.

As execute-batch-operations-using-web-api.md shows it (platform-facts.md, bulk writes): `POST
/api/data/v9.2/$batch` with `Content-Type: multipart/mixed; boundary=batch_...`; each top-level part is
`Content-Type: application/http` holding one request (request line, headers, blank line, body), run in
order; the answer is `200` with a `multipart/mixed; boundary=batchresponse_...` body holding each part's
own response in the same order. With `Prefer: odata.continue-on-error` every part runs; without it the
batch stops after the first failed part. At most 1000 operations. Parts inherit the batch's
Authorization. Each part costs the listener's latency again (a batch runs its parts one after another),
and counts as one record toward the execution-time budget (devstack/standin/protection.py).
"""

from __future__ import annotations

import re
import uuid
from email.message import Message
from email.parser import BytesHeaderParser
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from .base import HttpError, Request, Response, bug_response
from .state import Fault

MAX_PARTS = 1000
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)


def boundary_of(content_type: str | None) -> str | None:
    ct = content_type or ""
    if not ct.lower().startswith("multipart/mixed"):
        return None
    m = _BOUNDARY.search(ct)
    return m.group(1) if m else None


def split_parts(body: bytes, boundary: str) -> list[bytes]:
    """The bodies of the top-level parts (RFC 2046: delimiter lines, preamble and epilogue ignored)."""
    delimiter = b"--" + boundary.encode("latin-1")
    chunks = body.split(delimiter)
    parts = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break  # the close delimiter
        parts.append(chunk.removeprefix(b"\r\n").removesuffix(b"\r\n"))
    return parts


def count_parts(req: Request) -> int:
    """How many operations a request carries (1 for anything but a $batch): its execution-time cost."""
    if not req.path.endswith("/$batch"):
        return 1
    boundary = boundary_of(req.header("Content-Type"))
    return max(1, len(split_parts(req.body, boundary))) if boundary else 1


def _head_and_body(raw: bytes) -> tuple[bytes, bytes]:
    for sep in (b"\r\n\r\n", b"\n\n"):
        if sep in raw:
            head, body = raw.split(sep, 1)
            return head, body
    return raw, b""


def parse_part(raw: bytes, outer: Request, api: str) -> Request:
    """One application/http part as a Request of its own (ValueError when it is not one)."""
    mime_head, inner = _head_and_body(raw)
    mime = BytesHeaderParser().parsebytes(mime_head + b"\r\n\r\n")
    if (mime.get("Content-Type") or "").split(";")[0].strip().lower() != "application/http":
        raise ValueError("a part's Content-Type must be application/http")
    head, body = _head_and_body(inner.lstrip(b"\r\n"))
    line, _, header_block = head.partition(b"\n")
    try:
        method, target, _version = line.decode("latin-1").strip().split(" ", 2)
    except ValueError:
        raise ValueError("a part's request line must be METHOD URL HTTP/1.1") from None
    headers: Message = BytesHeaderParser().parsebytes(header_block + b"\r\n\r\n")
    for name in ("Authorization", "CallerObjectId", "MSCRMCallerID"):
        if outer.header(name) and name not in headers:
            headers[name] = outer.header(name) or ""
    parts = urlsplit(target)
    path = unquote(parts.path)
    if not path.startswith("/"):
        path = f"{api}/{path}"  # relative to the service root
    raw_path = path + ("?" + parts.query if parts.query else "")
    return Request(method=method.upper(), raw_path=raw_path, path=path,
                   query=parse_qs(parts.query, keep_blank_values=True), headers=headers, body=body.rstrip(b"\r\n"))


def _encode_part(resp: Response) -> bytes:
    try:
        reason = HTTPStatus(resp.status).phrase
    except ValueError:
        reason = "Status"
    lines = [f"HTTP/1.1 {resp.status} {reason}", *(f"{k}: {v}" for k, v in resp.headers)]
    return (b"Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
            + ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + resp.body)


def encode_response(parts: list[Response]) -> Response:
    boundary = f"batchresponse_{uuid.uuid4()}"
    delimiter = f"--{boundary}\r\n".encode()
    body = b"".join(delimiter + _encode_part(p) + b"\r\n" for p in parts) + f"--{boundary}--\r\n".encode()
    return Response(200, body, [("Content-Type", f"multipart/mixed; boundary={boundary}")])


def _nested() -> Fault:
    return Fault("error", 400, "0x80048d19", "A batch cannot contain another batch.")


def run_batch(svc: Any, req: Request, api: str, fail: Any) -> Response:
    """Run each part through the service's own routes, in order; answer every part's response."""
    boundary = boundary_of(req.header("Content-Type"))
    if boundary is None:
        raise fail(400, "0x80048d19", "The batch request must have a multipart/mixed Content-Type with a boundary.")
    raw_parts = split_parts(req.body, boundary)
    if not raw_parts:
        raise fail(400, "0x80048d19", "The batch request must contain at least one part.")
    if len(raw_parts) > MAX_PARTS:
        raise fail(400, "0x80048d19", f"The number of operations in a batch may not exceed {MAX_PARTS}.")
    go_on = "odata.continue-on-error" in (req.header("Prefer") or "").lower()
    state = svc.state
    answers: list[Response] = []
    for i, raw in enumerate(raw_parts):
        if i:
            delay = state.latency.get(svc.name, 0.0)  # the parts run one after another
            if delay > 0:
                state.stopping.wait(delay)
        try:
            sub = parse_part(raw, req, api)
        except ValueError as exc:
            raise fail(400, "0x80048d19", f"Part {i + 1} of the batch cannot be read: {exc}") from None
        if sub.path.endswith("/$batch"):
            state.metrics.count(svc.name, sub.method, "batch")
            answers.append(svc.fault_response(sub, _nested()))
            if not go_on:
                break
            continue
        try:
            kind, handler = svc.route(sub)
        except HttpError as exc:
            kind, handler, resp = "unknown", None, exc.response
        state.metrics.count(svc.name, sub.method, kind)  # a part counts as the request it holds
        fault = state.faults.pick(svc.name, sub.method, sub.raw_path, rates=False, in_batch=True)
        if fault is not None and fault.status == 401:
            raise HttpError(svc.challenge())  # authentication is the batch's: a 401 answers all of it
        try:
            if fault is not None and fault.kind == "error":
                resp = svc.fault_response(sub, fault)
            elif handler is not None:
                resp = handler(sub)
                if fault is not None:  # "hold": applied, then the whole answer is lost
                    resp.hold = True
        except HttpError as exc:
            resp = exc.response
        except Exception:
            resp = bug_response(state, svc.name)
        state.metrics.record(svc.name, sub.method, sub.raw_path, resp.status)
        answers.append(resp)
        if resp.hold or (resp.status >= 400 and not go_on):
            break
    out = encode_response(answers)
    out.hold = any(a.hold for a in answers)
    if go_on:
        out.header("Preference-Applied", "odata.continue-on-error")
    return out
