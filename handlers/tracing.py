"""Traces: W3C `traceparent` taken from each request, a span for the request in the endpoint and one for each of its
stages (decode, model, encode; the batch it rode in as attributes), exported with OpenTelemetry's SDK over OTLP/HTTP.

On only when OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set; otherwise nothing is imported
and nothing runs. The SDK reads the standard OTEL_* variables itself (headers, service name, batch delay). This
module travels inside every .mar: OpenTelemetry is imported only when tracing is on, and a worker without it logs why
and serves untraced.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)

ENDPOINT_ENVS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
TRACEPARENT = "traceparent"
#: The service name spans carry when OTEL_SERVICE_NAME does not say otherwise.
SERVICE_NAME = "torchship"

#: (start, end) of a stage, in time.perf_counter() seconds.
Marks = Mapping[str, tuple[float, float]]


def _epoch_ns() -> Callable[[float], int]:
    """perf_counter seconds -> Unix nanoseconds, for spans recorded after the fact."""
    offset = time.time_ns() - int(time.perf_counter() * 1e9)
    return lambda pc: int(pc * 1e9) + offset


class Tracing:
    """A tracer of this process's own (the global provider, which an engine may have set, is left alone)."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer = provider.get_tracer("torchship")
        self.propagator = TraceContextTextMapPropagator()
        self._trace = trace

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Tracing | None:
        if not any(environ.get(name, "").strip() for name in ENDPOINT_ENVS):
            return None
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as exc:
            log.warning(
                "%s is set, but OpenTelemetry's SDK or OTLP exporter is missing here (%s): no traces", ENDPOINT_ENVS[0], exc
            )
            return None
        # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; service.name defaults to torchship.
        resource = Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME") or SERVICE_NAME})
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        return cls(provider)

    # -- the endpoint's spans, recorded once its batch is answered ----------------------------------------------------

    def record_batch(
        self,
        endpoint: str,
        headers: Sequence[Mapping[str, str]],
        statuses: Sequence[int],
        marks: Sequence[Marks],
        batch: tuple[float, float],
    ) -> None:
        """One span per request (child of its `traceparent`, when it sent one) over the batch call, with a child span
        per stage it went through."""
        from opentelemetry.trace import SpanKind, Status, StatusCode

        to_ns = _epoch_ns()
        for request_headers, status, stages in zip(headers, statuses, marks, strict=True):
            parent = self.propagator.extract(carrier=dict(request_headers))
            span = self.tracer.start_span(
                f"torchship {endpoint}",
                context=parent,
                kind=SpanKind.INTERNAL,
                start_time=to_ns(batch[0]),
                attributes={
                    "torchship.endpoint": endpoint,
                    "torchship.batch.requests": len(headers),
                    "http.response.status_code": status,
                },
            )
            inside = self._trace.set_span_in_context(span)
            for stage, (start, end) in stages.items():
                self.tracer.start_span(stage, context=inside, start_time=to_ns(start)).end(end_time=to_ns(end))
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            span.end(end_time=to_ns(batch[1]))

    # -- a server span around a call that continues elsewhere (the Ray ingress) ----------------------------------------

    def start_server_span(self, name: str, headers: dict[str, str]) -> Any:
        """A SERVER span, child of the caller's traceparent; headers' traceparent is replaced by this span's, so the
        process that answers continues the trace under it."""
        from opentelemetry.trace import SpanKind

        span = self.tracer.start_span(name, context=self.propagator.extract(carrier=headers), kind=SpanKind.SERVER)
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context=self._trace.set_span_in_context(span))
        headers.update(carrier)
        return span

    def end_server_span(self, span: Any, status: int) -> None:
        from opentelemetry.trace import Status, StatusCode

        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end()
