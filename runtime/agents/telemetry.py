"""Per-step traces and agent metrics.

Spans use the OpenTelemetry API: the process's tracer provider decides where they go (tests
install an ``InMemorySpanExporter``; session actors export OTLP when
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set). Metrics are Ray metrics (Prometheus through Ray's
metrics agent) when running inside Ray, counters in memory otherwise; both are also visible as
``stats`` on each session record.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

TRACER_NAME = "raylane.agents"
_configured = False


def tracer():
    from opentelemetry import trace

    return trace.get_tracer(TRACER_NAME)


def configure_exporter() -> None:
    """In a session actor: record real spans (their ids go into the step log) and export them
    over OTLP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set. Leaves a provider someone else
    installed alone."""
    global _configured
    if _configured:
        return
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    _configured = True
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return
    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "raylane-agent")}))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


class AgentMetrics:
    """Tool success rate, steps per session and budget breaches, tagged by app."""

    def __init__(self, app: str):
        self.app = app
        self.counts: Counter[str] = Counter()
        self._ray = None
        try:
            import ray
            from ray.util import metrics

            if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
                self._ray = {
                    "tool_calls": metrics.Counter("raylane_agent_tool_calls", "Tool calls by outcome.",
                                                  tag_keys=("app", "tool", "ok")),
                    "steps": metrics.Histogram("raylane_agent_steps_per_session", "Steps when a session turn ends.",
                                               boundaries=[1, 2, 4, 8, 16, 32, 64], tag_keys=("app",)),
                    "breaches": metrics.Counter("raylane_agent_budget_breaches", "Sessions ended by a budget.",
                                                tag_keys=("app", "budget")),
                }
        except Exception:  # metrics are best effort; never fail a session on them
            self._ray = None

    def tool_call(self, tool: str, ok: bool) -> None:
        self.counts[f"tool_calls:{tool}:{'ok' if ok else 'failed'}"] += 1
        if self._ray:
            self._ray["tool_calls"].inc(1, tags={"app": self.app, "tool": tool, "ok": str(ok).lower()})

    def steps(self, n: int) -> None:
        self.counts["turns"] += 1
        self.counts["steps"] += n
        if self._ray:
            self._ray["steps"].observe(n, tags={"app": self.app})

    def breach(self, budget: str) -> None:
        self.counts[f"breach:{budget}"] += 1
        if self._ray:
            self._ray["breaches"].inc(1, tags={"app": self.app, "budget": budget})

    def snapshot(self) -> dict[str, Any]:
        ok = sum(v for k, v in self.counts.items() if k.startswith("tool_calls:") and k.endswith(":ok"))
        total = sum(v for k, v in self.counts.items() if k.startswith("tool_calls:"))
        return {**self.counts, "tool_success_rate": round(ok / total, 4) if total else None}
