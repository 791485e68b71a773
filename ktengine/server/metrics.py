"""Prometheus text-format metrics: the server's latency histograms plus the engine's counters.

Latencies are measured here, at the edge a client sees; token and request counters come from
the engine's own snapshot so the two never disagree.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 30.0, 60.0)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


@dataclass
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; last is +Inf
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += times
        self.total += value * times
        self.count += times

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip(self.buckets, self.counts):
            cumulative += n
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {cumulative}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{self.name}_sum {self.total}")
        lines.append(f"{self.name}_count {self.count}")
        return lines


class Metrics:
    """Everything /metrics shows; one instance per server."""

    def __init__(self) -> None:
        self.ttft = Histogram("ktengine_time_to_first_token_seconds",
                              "Time from request arrival to its first output token.",
                              _LATENCY_BUCKETS)
        self.itl = Histogram("ktengine_inter_token_latency_seconds",
                             "Time between successive output tokens of a request.",
                             _LATENCY_BUCKETS)
        self.e2e = Histogram("ktengine_e2e_request_latency_seconds",
                             "Time from request arrival to its last output token.", _E2E_BUCKETS)
        self.http_errors: dict[int, int] = {}  # by status
        self.streams_open = 0  # SSE responses being written now

    def count_error(self, status: int) -> None:
        self.http_errors[status] = self.http_errors.get(status, 0) + 1

    def render(self, engine: Any | None) -> str:
        """The whole exposition; engine None while the model loads."""
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {_num(v)}" for labels, v in samples)

        stats = engine.snapshot() if engine is not None else None
        metric("ktengine_model_loaded", "gauge", "1 once the model is loaded and serving.",
               [("", 1 if engine is not None else 0)])
        metric("ktengine_num_requests_running", "gauge", "Requests in the running batch.",
               [("", stats.num_running if stats else 0)])
        metric("ktengine_num_requests_waiting", "gauge", "Requests queued for the batch.",
               [("", stats.num_waiting if stats else 0)])
        metric("ktengine_sse_streams_open", "gauge", "Streaming responses being written.",
               [("", self.streams_open)])
        reasons = dict(stats.requests_total) if stats else {}
        for reason in ("stop", "length", "abort"):
            reasons.setdefault(reason, 0)
        metric("ktengine_requests_total", "counter", "Finished engine requests by finish reason.",
               [(f'{{finish_reason="{r}"}}', n) for r, n in sorted(reasons.items())])
        metric("ktengine_prompt_tokens_total", "counter", "Prompt tokens prefilled.",
               [("", stats.prompt_tokens_total if stats else 0)])
        metric("ktengine_generation_tokens_total", "counter", "Tokens generated.",
               [("", stats.generation_tokens_total if stats else 0)])
        metric("ktengine_engine_steps_total", "counter", "Model forward steps.",
               [("", stats.steps_total if stats else 0)])
        metric("ktengine_engine_prefill_seconds_total", "counter",
               "Wall time of the steps that carried prompt tokens.",
               [("", stats.prefill_seconds_total if stats else 0.0)])
        metric("ktengine_gpu_expert_share", "gauge",
               "Share of routed expert work (token-expert pairs) done on the GPU.",
               [("", float(getattr(stats, "gpu_expert_share", 0.0) or 0.0))])
        metric("ktengine_http_errors_total", "counter", "Error answers by HTTP status.",
               [(f'{{status="{s}"}}', n) for s, n in sorted(self.http_errors.items())])
        for hist in (self.ttft, self.itl, self.e2e):
            lines.extend(hist.render())
        return "\n".join(lines) + "\n"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
