"""Scrubbing what failure paths hand to telemetry: query strings and the personal data they carry.

A contact lookup's URL holds an email or a phone in its `$filter`. The hooks on the requests
instrumentation strip it from a dependency's URL, but a failed call also records the exception: a
connection error's text is urllib3's "Max retries exceeded with url: /contacts?$filter=..." and it
reaches a span's exception event (message and stacktrace), its status description and any log record
with exc_info. These processors rewrite those texts before any exporter sees them. Imported only where
telemetry is configured (it imports the OpenTelemetry SDK).
"""

from __future__ import annotations

import re
from typing import Any

from opentelemetry.sdk._logs import LogRecordProcessor
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor
from opentelemetry.trace import Status

_QUERY = re.compile(r"\?[^\s\"'<>]+")  # a URL's query: requests percent-encodes it, so it ends at a space or quote
_LITERAL = re.compile(r"(\b(?:eq|ne|contains|startswith|endswith)(?:\s+|\+|%20)\(?)('(?:[^']|'')*'|%27.*?%27)",
                      re.IGNORECASE)  # an OData filter written inline, encoded or not
_EMAIL = re.compile(r"[\w.+-]+(?:@|%40)[\w-]+(?:\.[\w-]+)+", re.IGNORECASE)
QUERY_MARK = "?[query removed]"


def scrub(text: str) -> str:
    """`text` without URL query strings, OData string literals or email addresses."""
    if not text:
        return text
    text = _QUERY.sub(QUERY_MARK, text)
    text = _LITERAL.sub(r"\1'[removed]'", text)
    return _EMAIL.sub("[email removed]", text)


def _scrub_value(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, tuple | list) and any(isinstance(v, str) for v in value):
        return tuple(scrub(v) if isinstance(v, str) else v for v in value)
    return value


class ScrubSpans(SpanProcessor):
    """Rewrites an ended span's event attributes (exception.message, exception.stacktrace) and its status
    description. Registered before the exporting processors: they are handed the same ended-span snapshot
    after this one. The snapshot has no public setter, so its two fields are replaced, not the live span."""

    def on_end(self, span: ReadableSpan) -> None:
        if span.events:
            span._events = tuple(  # noqa: SLF001 - see the class docstring
                Event(e.name, {k: _scrub_value(v) for k, v in (e.attributes or {}).items()}, e.timestamp)
                for e in span.events)
        description = span.status.description
        if description:
            span._status = Status(span.status.status_code, scrub(description))  # noqa: SLF001

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class ScrubLogs(LogRecordProcessor):
    """Rewrites a log record's body and string attributes (exception.message/stacktrace of exc_info
    among them) before the exporting processor; OpenTelemetry hands processors a writable record."""

    def on_emit(self, log_record: Any) -> None:
        record = log_record.log_record
        if isinstance(record.body, str):
            record.body = scrub(record.body)
        attributes = record.attributes
        if attributes:
            for key, value in list(attributes.items()):
                scrubbed = _scrub_value(value)
                if scrubbed != value:
                    attributes[key] = scrubbed

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True
