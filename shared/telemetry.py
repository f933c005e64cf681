"""Telemetry: OpenTelemetry traces, metrics and logs, to Application Insights or any OTLP backend.

Configured once at start-up, and only when asked for: APPLICATIONINSIGHTS_CONNECTION_STRING (the Azure
Monitor distro), OTEL_EXPORTER_OTLP_ENDPOINT (OTLP exporters) or INTAKE_TELEMETRY_CONSOLE=true (print to
the console, for a local look). Without any, nothing of OpenTelemetry is imported and every call here
is a no-op: importing function_app costs what it did before.

What is recorded never holds personal data or a secret: an invocation span carries the entity, the
trigger, the outcome, the code and the record id; each Dataverse call is a dependency span carrying
Dataverse's x-ms-service-request-id, its URL without the query string (a contact lookup's filter holds
an email or a phone); metrics carry entity, trigger, outcome and code only. On failure paths, exception
events, span status descriptions and log records are scrubbed of query strings too (shared/scrub.py).
An invocation span continues the host's trace (the traceparent in the invocation's context), so a
request and its Dataverse calls are one operation in Application Insights.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)
PREFIX = "intake"
OUTCOMES = ("created", "existed", "rejected", "conflict", "deferred", "poisoned", "failed")


def fields(**values: Any) -> dict[str, Any]:
    """`extra=` for a log record: structured fields (customDimensions in Application Insights), prefixed."""
    return {f"{PREFIX}.{k}": v for k, v in values.items() if v is not None}


def outcome_of(err: Any) -> str:
    """The `intake.outcome` of a classified failure an invocation answers or sets aside."""
    if err.code == "idempotency_conflict":
        return "conflict"
    return "rejected" if err.in_event else "failed"


def strip_query(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


class Invocation:
    """What one invocation ends with; the triggers fill it in, the telemetry records it."""

    def __init__(self, trigger: str, entity: str) -> None:
        self.trigger = trigger
        self.entity = entity
        self.outcome = "failed"
        self.code: str | None = None
        self.record_id: str | None = None
        self.attempt: int | None = None
        self.reason: str | None = None
        self.breaker: str | None = None  # "held" or "probe" while the breaker is open (shared/breaker.py)
        self.caller: str | None = None  # the calling application's id (INTAKE_CALLER_AUTH=entra), never a token
        self.started = time.perf_counter()

    def ended(self, outcome: str, *, code: str | None = None, record_id: str | None = None) -> None:
        self.outcome, self.code, self.record_id = outcome, code, record_id

    def attributes(self) -> dict[str, Any]:
        out = {f"{PREFIX}.trigger": self.trigger, f"{PREFIX}.entity": self.entity,
               f"{PREFIX}.outcome": self.outcome, f"{PREFIX}.code": self.code or "",
               f"{PREFIX}.record_id": self.record_id, f"{PREFIX}.attempt": self.attempt,
               f"{PREFIX}.deferral_reason": self.reason, f"{PREFIX}.breaker": self.breaker,
               f"{PREFIX}.caller_app_id": self.caller}
        return {k: v for k, v in out.items() if v is not None}


class _Off:
    """Telemetry not configured: every call costs nothing."""

    enabled = False

    @contextmanager
    def invocation(self, trigger: str, entity: str, context: Any = None) -> Iterator[Invocation]:
        yield Invocation(trigger, entity)

    def throttled(self, code: str | None) -> None:
        pass

    def batched(self, records: int) -> None:
        pass

    def held(self, entity: str, code: str) -> None:
        pass

    def observe_concurrency(self, read: Callable[[], int]) -> None:
        pass

    def flush(self) -> None:
        pass


class _On:
    """The OpenTelemetry instruments; built after the providers are configured."""

    enabled = True

    def __init__(self) -> None:
        from opentelemetry import metrics, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()
        self._tracer = trace.get_tracer(PREFIX)
        meter = metrics.get_meter(PREFIX)
        self._records = meter.create_counter(f"{PREFIX}.records", unit="{record}",
                                             description="Events by entity, trigger, outcome and code")
        self._duration = meter.create_histogram(f"{PREFIX}.duration", unit="ms",
                                                description="Invocation duration by trigger and entity")
        self._throttled = meter.create_counter(f"{PREFIX}.dataverse.throttled", unit="{response}",
                                               description="Dataverse 429 answers")
        self._batch = meter.create_histogram(f"{PREFIX}.dataverse.batch_records", unit="{record}",
                                             description="Records per Dataverse $batch request (batching engaged)")
        self._held = meter.create_counter(f"{PREFIX}.breaker.held", unit="{message}",
                                          description="Queue messages held by the breaker, by entity and code")
        self._concurrency: list[Callable[[], int]] = []
        meter.create_observable_gauge(f"{PREFIX}.dataverse.concurrency_limit", callbacks=[self._observe],
                                      description="This instance's limit of concurrent Dataverse requests")

    def _observe(self, _options: Any) -> Any:
        from opentelemetry.metrics import Observation

        return [Observation(read()) for read in self._concurrency]

    def _host_trace(self, context: Any) -> Any:
        """The host's trace from the invocation context's traceparent/tracestate (W3C), or None for the current
        one. Explicit, since the worker does not carry its context into the thread of a sync function."""
        trace_context = getattr(context, "trace_context", None)
        parent = getattr(trace_context, "trace_parent", None)
        if not parent:
            return None
        carrier = {"traceparent": str(parent)}
        state = getattr(trace_context, "trace_state", None)
        if state:
            carrier["tracestate"] = str(state)
        extracted = self._propagator.extract(carrier)
        return extracted if self._trace.get_current_span(extracted).get_span_context().is_valid else None

    @contextmanager
    def invocation(self, trigger: str, entity: str, context: Any = None) -> Iterator[Invocation]:
        """The invocation's span (a child of the host's, from `context`: the func.Context) and its metrics."""
        inv = Invocation(trigger, entity)
        with self._tracer.start_as_current_span(f"{PREFIX}.{trigger} {entity}", context=self._host_trace(context),
                                                kind=self._trace.SpanKind.SERVER) as span:
            try:
                yield inv
            finally:
                for key, value in inv.attributes().items():
                    span.set_attribute(key, value)
                if inv.outcome == "failed":
                    span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, inv.code or ""))
                ms = (time.perf_counter() - inv.started) * 1000
                # inv.entity: a follow-up names its operation once parsed ("incident.resolve"): counts per operation
                self._records.add(1, {f"{PREFIX}.entity": inv.entity, f"{PREFIX}.trigger": trigger,
                                      f"{PREFIX}.outcome": inv.outcome, f"{PREFIX}.code": inv.code or ""})
                self._duration.record(ms, {f"{PREFIX}.entity": inv.entity, f"{PREFIX}.trigger": trigger})

    def throttled(self, code: str | None) -> None:
        self._throttled.add(1, {f"{PREFIX}.code": code or ""})

    def batched(self, records: int) -> None:
        self._batch.record(records)

    def held(self, entity: str, code: str) -> None:
        self._held.add(1, {f"{PREFIX}.entity": entity, f"{PREFIX}.code": code})

    def observe_concurrency(self, read: Callable[[], int]) -> None:
        self._concurrency[:] = [read]  # the instance's one client (a reset replaces it)

    def flush(self) -> None:
        from opentelemetry import _logs, metrics, trace

        for provider in (trace.get_tracer_provider(), metrics.get_meter_provider(), _logs.get_logger_provider()):
            flush = getattr(provider, "force_flush", None)
            if flush is not None:
                flush()


_current: _Off | _On = _Off()


def get() -> _Off | _On:
    return _current


def _request_hook(span: Any, request: Any) -> None:
    """The URL without its query (a contact lookup's filter holds personal data)."""
    if span is not None and span.is_recording():
        url = strip_query(str(getattr(request, "url", "")))
        span.set_attribute("http.url", url)
        span.set_attribute("url.full", url)


def _response_hook(span: Any, request: Any, response: Any) -> None:
    """Dataverse's request id on its dependency, for Microsoft support."""
    rid = getattr(response, "headers", {}).get("x-ms-service-request-id")
    if span is not None and span.is_recording() and rid:
        span.set_attribute("dataverse.service_request_id", rid)


def configure(environ: dict[str, str] | None = None) -> bool:
    """Set up the exporters the environment asks for, once per process; False when none is asked for."""
    global _current
    env = os.environ if environ is None else environ
    if _current.enabled:
        return True
    connection = (env.get("APPLICATIONINSIGHTS_CONNECTION_STRING") or "").strip()
    otlp = (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "").strip()
    console = (env.get("INTAKE_TELEMETRY_CONSOLE") or "").strip().lower() in ("1", "true", "yes")
    if not (connection or otlp or console):
        return False
    # The exporter logs every transmission at INFO, through azure-core: exported as a log record, each one
    # would cause another transmission. Only warnings of the SDKs and the exporter itself are kept.
    for name in ("azure", "opentelemetry", "urllib3", "msal"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from shared.scrub import ScrubLogs, ScrubSpans  # first: exporters see the scrubbed span or record

        if connection:
            from azure.monitor.opentelemetry import configure_azure_monitor

            # requests is instrumented below with hooks; urllib3 beneath it would record every URL whole.
            configure_azure_monitor(connection_string=connection, credential=_ingestion_credential(env),
                                    logger_name="", enable_live_metrics=False,
                                    enable_performance_counters=False,
                                    instrumentation_options={"requests": {"enabled": False},
                                                             "urllib3": {"enabled": False},
                                                             "urllib": {"enabled": False}},
                                    span_processors=[ScrubSpans(), *_extra_span_processors(otlp, console)],
                                    log_record_processors=[ScrubLogs()],
                                    metric_readers=_extra_metric_readers(otlp, console))
        else:
            _configure_sdk(otlp, console, ScrubSpans())
        from opentelemetry.instrumentation.requests import RequestsInstrumentor

        RequestsInstrumentor().instrument(request_hook=_request_hook, response_hook=_response_hook)
    except ImportError as exc:  # an exporter package missing: say which, run without telemetry
        log.warning("telemetry not configured: %s is not installed", exc.name)
        return False
    _current = _On()
    return True


def _ingestion_credential(env: Any) -> Any:
    """Application Insights with local auth off takes Entra ID tokens: APPLICATIONINSIGHTS_AUTHENTICATION_STRING
    ("ClientId=<identity>;Authorization=AAD", set by the template) names the identity that sends them."""
    parts = dict(p.split("=", 1) for p in (env.get("APPLICATIONINSIGHTS_AUTHENTICATION_STRING") or "").split(";")
                 if "=" in p)
    if parts.get("Authorization", "").upper() != "AAD":
        return None
    from azure.identity import ManagedIdentityCredential

    return ManagedIdentityCredential(client_id=parts.get("ClientId") or None)


def _extra_span_processors(otlp: str, console: bool) -> list[Any]:
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    out: list[Any] = []
    if otlp:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        out.append(BatchSpanProcessor(OTLPSpanExporter()))
    if console:
        out.append(BatchSpanProcessor(ConsoleSpanExporter()))
    return out


def _extra_metric_readers(otlp: str, console: bool) -> list[Any]:
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader

    out: list[Any] = []
    if otlp:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        out.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    if console:
        out.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
    return out


def _configure_sdk(otlp: str, console: bool, scrub: Any) -> None:
    """OTLP and/or the console without Application Insights: the plain OpenTelemetry SDK."""
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider

    tracer_provider = TracerProvider()
    for processor in (scrub, *_extra_span_processors(otlp, console)):
        tracer_provider.add_span_processor(processor)
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=_extra_metric_readers(otlp, console)))
