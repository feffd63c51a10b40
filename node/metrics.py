"""Prometheus metrics for `/metrics`: request counts and latencies, tokens, runners, membership and Raft.

Labels stay bounded: routes are the router's templates, and a model label is only set on requests
that succeeded (a client inventing model names cannot grow the series without limit).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MODEL_KEY = "omx_model"  # request key: the model a handler served
TTFT_KEY = "omx_ttft"  # request key: seconds to the first streamed chunk
TOKENS_KEY = "omx_tokens"  # request key: (prompt tokens, generated tokens)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("omx_requests", "HTTP requests served", ["route", "model", "status"], registry=r)
        self.latency = Histogram("omx_request_duration_seconds", "Time to the last byte", ["route"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("omx_time_to_first_token_seconds", "Time to the first streamed chunk", ["route"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("omx_prompt_tokens", "Prompt tokens evaluated", ["model"], registry=r)
        self.gen_tokens = Counter("omx_generated_tokens", "Tokens generated", ["model"], registry=r)
        self._children: dict[tuple[Any, ...], Any] = {}  # as bounded as the labels (see above)

    def _child(self, metric: Counter | Histogram, *labels: str) -> Any:
        """`metric.labels(*labels)`, remembered: prometheus_client validates and locks on every call."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)

    def middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        @web.middleware
        async def metrics_mw(request: web.Request, handler: Handler) -> web.StreamResponse:
            t0 = time.perf_counter()
            status = 500
            try:
                resp = await handler(request)
                status = resp.status
                return resp
            except web.HTTPException as e:
                status = e.status
                raise
            finally:
                info = request.match_info.route.resource
                route = info.canonical if info is not None else "unmatched"
                model = str(request.get(MODEL_KEY, "")) if status < 400 else ""
                self._child(self.requests, route, model, str(status)).inc()
                self._child(self.latency, route).observe(time.perf_counter() - t0)
                if TTFT_KEY in request:
                    self._child(self.ttft, route).observe(request[TTFT_KEY])
                if TOKENS_KEY in request and model:
                    p, g = request[TOKENS_KEY]
                    self._child(self.prompt_tokens, model).inc(p)
                    self._child(self.gen_tokens, model).inc(g)

        return metrics_mw

    async def handler(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})


class StateCollector(Collector):
    """Gauges read at scrape time from live objects, so they are never stale."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self.read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self.read()
        runners = GaugeMetricFamily("omx_runner_inflight", "Requests in flight or queued per loaded model",
                                    labels=["model"])
        for model, n in s.get("inflight", {}).items():
            runners.add_metric([model], n)
        yield runners
        yield GaugeMetricFamily("omx_runners_loaded", "Runner processes with a loaded model",
                                value=s.get("loaded", 0))
        members = GaugeMetricFamily("omx_cluster_members", "Members by SWIM state as this node sees them",
                                    labels=["state"])
        for state, n in s.get("members", {}).items():
            members.add_metric([state], n)
        yield members
        yield GaugeMetricFamily("omx_gossip_local_health", "Lifeguard local health (0 is healthy)",
                                value=s.get("local_health", 0))
        yield GaugeMetricFamily("omx_gossip_dropped_packets", "Gossip packets dropped (bad key, replay, garbage)",
                                value=s.get("dropped", 0))
        if "router" in s:
            r = s["router"]
            yield CounterMetricFamily("omx_router_retries", "Requests retried on another replica before the first "
                                      "byte", value=r["retries"])
            yield CounterMetricFamily("omx_router_resumptions", "Streams resumed on another replica mid-way",
                                      value=r["resumes"])
            yield GaugeMetricFamily("omx_router_inflight", "Requests this node is routing now", value=r["inflight"])
            queue = GaugeMetricFamily("omx_queue_depth", "Requests waiting for a runner slot", labels=["model"])
            for model, n in r["queue"].items():
                queue.add_metric([model], n)
            yield queue
            circuit = GaugeMetricFamily("omx_router_circuit_open", "1 while a target's circuit breaker keeps it out "
                                        "of rotation", labels=["target"])
            for target, state in r["circuits"].items():
                circuit.add_metric([target], 1 if state != "closed" else 0)
            yield circuit
        if "raft" in s:
            raft = s["raft"]
            yield GaugeMetricFamily("omx_raft_is_leader", "1 if this node leads its region's Raft group",
                                    value=1 if raft.get("is_leader") else 0)
            yield GaugeMetricFamily("omx_raft_term", "Raft term", value=raft.get("term") or 0)
            yield GaugeMetricFamily("omx_raft_commit_index", "Raft commit index", value=raft.get("commit_index") or 0)
            yield GaugeMetricFamily("omx_raft_has_quorum", "1 if the region's Raft group has a leader in reach",
                                    value=1 if raft.get("has_quorum") else 0)
