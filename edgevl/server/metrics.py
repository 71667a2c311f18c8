"""Prometheus metrics: requests, latency, tokens, queue, caches and the thermal governor."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from edgevl.types import Histogram as Counts

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("edgevl_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.ttft = Histogram("edgevl_time_to_first_token_seconds", "time from request to first token",
                              ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("edgevl_request_duration_seconds", "whole generation time", ["endpoint"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("edgevl_prompt_tokens", "prompt tokens processed", registry=r)
        self.generated_tokens = Counter("edgevl_generated_tokens", "tokens generated", registry=r)
        self.finish = Counter("edgevl_finished", "generations by finish reason", ["reason"], registry=r)
        self.vision_cache_hits = Counter("edgevl_vision_cache_hits", "images served from the embedding cache",
                                         registry=r)
        self.prefix_reused = Counter("edgevl_prefix_reused_tokens", "prompt tokens served from the KV cache",
                                     registry=r)
        self.queue_wait = Histogram("edgevl_queue_wait_seconds",
                                    "time from prepared to admitted (a batch place and KV memory)",
                                    buckets=_LATENCY_BUCKETS, registry=r)

    def gauge(self, name: str, doc: str, fn: Callable[[], float]) -> None:
        """A gauge read at scrape time (queue depth, cache sizes, temperature)."""
        g = Gauge(name, doc, registry=self.registry)
        g.set_function(fn)

    def counter(self, name: str, doc: str, fn: Callable[[], float]) -> None:
        """A counter the engine keeps itself, read at scrape time (exposed as `name`_total)."""
        self.registry.register(_CounterCollector(name, doc, fn))

    def state_gauge(self, name: str, doc: str, states: tuple[str, ...], fn: Callable[[], dict[str, int]]) -> None:
        """A gauge per state, read at scrape time: `fn()` → {state: count}."""
        g = Gauge(name, doc, ["state"], registry=self.registry)
        for s in states:
            g.labels(s).set_function(lambda s=s: fn().get(s, 0))

    def histograms(self, fn: Callable[[], dict[str, dict[int, int]]], docs: dict[str, str]) -> None:
        """Histograms the engine counts itself (sequences per decoder step, prefill chunk sizes), read at
        scrape time: `fn()` → {name: {upper bound: count}}."""
        self.registry.register(_CountsCollector(fn, docs))

    def run_histograms(self, fn: Callable[[], dict[str, dict[str, Counts]]], docs: dict[str, str]) -> None:
        """Histograms the engine records with their exact sums, read at scrape time: `fn()` →
        {name: {kind: histogram}}; a kind of "" is a histogram without the `kind` label."""
        self.registry.register(_RunsCollector(fn, docs))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CounterCollector(Collector):
    def __init__(self, name: str, doc: str, fn: Callable[[], float]):
        self.name, self.doc, self.fn = name, doc, fn

    def collect(self):
        yield CounterMetricFamily(self.name, self.doc, value=self.fn())


class _CountsCollector(Collector):
    def __init__(self, fn: Callable[[], dict[str, dict[int, int]]], docs: dict[str, str]):
        self.fn, self.docs = fn, docs

    def collect(self):
        for name, counts in self.fn().items():
            cum, buckets = 0, []
            for bound in sorted(counts):
                cum += counts[bound]
                buckets.append((str(float(bound)), cum))
            buckets.append(("+Inf", cum))
            total = float(sum(b * n for b, n in counts.items()))  # bucket bounds stand for the values
            yield HistogramMetricFamily(f"edgevl_{name}", self.docs.get(name, name), buckets=buckets, sum_value=total)


class _RunsCollector(Collector):
    def __init__(self, fn: Callable[[], dict[str, dict[str, Counts]]], docs: dict[str, str]):
        self.fn, self.docs = fn, docs

    def collect(self):
        for name, kinds in self.fn().items():
            labelled = any(kinds)
            family = HistogramMetricFamily(f"edgevl_{name}", self.docs.get(name, name),
                                           labels=["kind"] if labelled else None)
            for kind, h in sorted(kinds.items()):
                counts, cum, buckets = list(h.counts), 0, []
                for bound, n in zip([*map(str, map(float, h.bounds)), "+Inf"], counts):
                    cum += n
                    buckets.append((bound, cum))
                family.add_metric([kind] if labelled else [], buckets, h.total)
            yield family
