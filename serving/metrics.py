"""Prometheus metrics of the service (`GET /metrics`), and the middleware that times requests."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)  # histogram buckets


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "longer_request_seconds",
            "request latency",
            ["endpoint"],
            registry=self.registry,
            buckets=SECONDS,
        )
        self.user_state = Counter(
            "longer_user_state_total",
            "score requests by user-state outcome (hit, incremental, full, bypass)",
            ["result"],
            registry=self.registry,
        )
        for result in ("hit", "incremental", "full", "bypass"):  # every outcome shown, from 0
            self.user_state.labels(result)
        self.state_local = Counter(
            "longer_state_local_total",
            "cached user states read, by whether this process held the stored value decoded (hit: "
            "no state payload read, no decode) or read and decoded it (miss); LONGER_STATE_CACHE_MB",
            ["result"],
            registry=self.registry,
        )
        for result in ("hit", "miss"):
            self.state_local.labels(result)
        self.hit_reads = Counter(
            "longer_hit_reads_total",
            "/v1/score hit reads (store head, early score) by the thread they ran on: the event "
            "loop's, for a request alone in the server (LONGER_IDLE_INLINE), or a pool thread's",
            ["thread"],
            registry=self.registry,
        )
        for thread in ("event_loop", "pool"):
            self.hit_reads.labels(thread)
        self.state_local_bytes = Gauge(
            "longer_state_local_bytes",
            "bytes of decoded user states held in this process (LONGER_STATE_CACHE_MB)",
            registry=self.registry,
        )
        self.refresh = Counter(
            "longer_refresh_total",
            "near-line refreshes of a user's state by result (hit, incremental, full, error)",
            ["result"],
            registry=self.registry,
        )
        self.refresh_queue = Gauge(
            "longer_refresh_queue_depth", "users waiting for a near-line refresh", registry=self.registry
        )
        self.refresh_latency = Histogram(
            "longer_refresh_seconds",
            "near-line refresh latency (store reads, update or encode, write-back)",
            registry=self.registry,
            buckets=SECONDS,
        )
        self.refresh_dropped = Counter(
            "longer_refresh_dropped_total",
            "near-line refreshes dropped because the queue was full (LONGER_REFRESH_QUEUE)",
            registry=self.registry,
        )
        self.refresh_coalesced = Counter(
            "longer_refresh_coalesced_total",
            "near-line refreshes merged into one already queued or running for the user",
            registry=self.registry,
        )
        self.candidates = Counter(
            "longer_candidates_scored_total", "candidates scored", registry=self.registry
        )
        self.events = Counter(
            "longer_events_appended_total",
            "events appended (new ones only: a repeated event_id is not counted)",
            registry=self.registry,
        )
        self.redis_errors = Counter("longer_redis_errors_total", "failed Redis calls", registry=self.registry)
        self.bad_keys = Counter(
            "longer_bad_keys_total",
            "requests answered 503 for an unusable user key, by key kind (seq, ver, ids)",
            ["kind"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "longer_requests_rejected_total",
            "requests refused before routing (too_large, timeout)",
            ["reason"],
            registry=self.registry,
        )
        self.fill_ins = Counter(
            "longer_feature_fill_ins_total",
            "declared feature values a /v1/score request left out, filled in, by column and source",
            ["column", "source"],
            registry=self.registry,
        )
        self.model = Gauge("longer_model_info", "the loaded model", ["model_version"], registry=self.registry)


class Latency:
    """Pure ASGI: request latency per route into the histogram."""

    def __init__(self, app, histogram: Histogram):
        self.app, self.histogram = app, histogram

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            route = scope.get("route")
            self.histogram.labels(getattr(route, "path", "other")).observe(time.perf_counter() - t0)
