"""`GET /metrics` in Prometheus' text format, the same from whichever API server answers.

The engine-wide figures (requests running, waiting, held and frozen, the pause, the weight
version, KV blocks, token totals and prefix-cache hits) are the core's, read when scraped, so
several frontends never count them twice. The latency histograms are measured in each frontend
(time to first token, and between outputs) and kept in prometheus_client's multiprocess files
(`PROMETHEUS_MULTIPROC_DIR`, which launch sets), which any frontend's scrape adds up.
"""

import os
from collections.abc import Iterator

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from frontend.http.app import HttpContext
from protocol.config import METRICS_DIR_ENV
from protocol.messages import EngineState

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class LatencyMetrics:
    """What a frontend's server observes of its requests (see `frontend.server.Timings`)."""

    def __init__(self) -> None:
        self.ttft = Histogram("zeroserve_time_to_first_token_seconds",
                              "Time from a request's arrival to its first token", buckets=LATENCY_BUCKETS)  # fmt: skip
        self.itl = Histogram("zeroserve_inter_token_latency_seconds", "Time between a request's outputs",
                             buckets=LATENCY_BUCKETS)  # fmt: skip

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def next_output(self, seconds: float) -> None:
        self.itl.observe(seconds)


def engine_metrics(state: EngineState) -> Iterator[Metric]:
    """The core's view, one sample each."""
    gauges = {
        "zeroserve_requests_running": ("Requests being generated", state.num_running),
        "zeroserve_requests_waiting": ("Requests waiting for a slot", state.num_waiting),
        "zeroserve_requests_held": ("Requests held by a pause", state.num_held),
        "zeroserve_requests_frozen": ("Running requests frozen by pause(keep)", state.num_frozen),
        "zeroserve_paused": ("1 while pausing or paused", int(state.state != "running")),
        "zeroserve_kv_blocks_used": ("KV cache blocks in use", state.num_total_blocks - state.num_free_blocks),
        "zeroserve_kv_blocks_free": ("KV cache blocks free", state.num_free_blocks),
    }
    for name, (documentation, value) in gauges.items():
        yield GaugeMetricFamily(name, documentation, value=value)
    version = GaugeMetricFamily("zeroserve_weight_version", "The weights' version label", labels=["version"])
    version.add_metric([state.weight_version], 1)
    yield version
    hit_rate = state.cached_prompt_tokens_total / state.prompt_tokens_total if state.prompt_tokens_total else 0.0
    yield GaugeMetricFamily("zeroserve_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache, of all",
                            value=hit_rate)  # fmt: skip
    counters = {
        "zeroserve_prompt_tokens": ("Prompt tokens of admitted requests", state.prompt_tokens_total),
        "zeroserve_prefix_cache_hit_tokens": ("Prompt tokens from the prefix cache", state.cached_prompt_tokens_total),
        "zeroserve_generation_tokens": ("Generated tokens", state.generation_tokens_total),
    }
    for name, (documentation, value) in counters.items():
        yield CounterMetricFamily(name, documentation, value=value)


class _Snapshot:
    """A collector of one engine state."""

    def __init__(self, state: EngineState) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        return engine_metrics(self._state)


def make_router(ctx: HttpContext) -> APIRouter:
    router = APIRouter()

    @router.get("/metrics")
    async def metrics() -> Response:
        registry = CollectorRegistry()
        if os.environ.get(METRICS_DIR_ENV):
            MultiProcessCollector(registry)
        registry.register(_Snapshot(await ctx.client.get_state()))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router
