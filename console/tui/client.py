"""The console's only door to the cluster: an async HTTP client that fails over between known members.

`Source` is the contract the app depends on; `HttpSource` implements it over the node's public API, and
`omx.console.tui.frozen.FrozenSource` implements it with fixed data for snapshot tests and the benchmark.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

import httpx

from omx.console.tui.data import EventRow, Instance, Member, MetricPoint, MetricsSample, ModelInfo, Snapshot
from omx.protocols.hosts import parse_host

OPTIONAL_RETRY_S = 30.0  # re-probe an optional API that answered 404 this often (it may land after an upgrade)
PROM_MEMBERS_MAX = 32  # without the proxy metrics API, scrape at most this many members' /metrics
WRITE_TIMEOUT_S = 120.0  # cluster-wide writes (delete on every holder, loads) can take far longer than a read


PROM_LINE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)")


class ApiError(Exception):
    """A request the server refused or failed; `str()` is the server's own error text."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class Unreachable(ApiError):
    """No known member answered."""


class Source(Protocol):
    """What the app needs from a cluster; the only seam between the UI and the network."""

    url: str

    async def snapshot(self) -> Snapshot: ...
    def events(self, after: int) -> AsyncIterator[EventRow]: ...
    async def node_action(self, node: str, action: str) -> dict[str, Any]: ...
    async def remove_node(self, node: str, force: bool) -> dict[str, Any]: ...
    async def transfer_leader(self, to: str | None = None, region: str | None = None) -> dict[str, Any]: ...
    async def scale_model(self, model: str, replicas: int) -> dict[str, Any]: ...
    def pull_model(self, model: str) -> AsyncIterator[dict[str, Any]]: ...
    async def delete_model(self, model: str) -> dict[str, Any]: ...
    async def copy_model(self, source: str, destination: str) -> dict[str, Any]: ...
    async def load_model(self, model: str) -> dict[str, Any]: ...
    async def unload_model(self, model: str) -> dict[str, Any]: ...
    async def add_instance(self, url: str) -> dict[str, Any]: ...
    async def remove_instance(self, url: str) -> dict[str, Any]: ...
    def chat(self, model: str, messages: list[dict[str, str]]) -> AsyncIterator[dict[str, Any]]: ...
    async def close(self) -> None: ...


def normalize_url(url: str) -> str:
    return parse_host(url).url


def error_text(resp: httpx.Response) -> str:
    """The server's `{"error": ...}` message, or its plain body, or the status line."""
    try:
        body = resp.json()
        if isinstance(body, dict) and body.get("error"):
            return str(body["error"])
    except (ValueError, UnicodeDecodeError):
        pass
    text = resp.text.strip()
    return text[:300] if text else f"HTTP {resp.status_code} {resp.reason_phrase}"


def _reason(exc: BaseException) -> str:
    """The innermost cause ("Connection refused") says more than httpx's wrapper."""
    if isinstance(exc, httpx.TimeoutException):
        return "timed out waiting for an answer"
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return str(exc) or type(exc).__name__


class HttpSource:
    """httpx-based `Source`. Connection failures move to another member this client has seen alive."""

    def __init__(self, url: str, timeout: float = 10.0, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = normalize_url(url)
        self.origin = self.url
        self.known: list[str] = [self.url]  # every member API address seen, most recently alive first
        self.failovers: list[tuple[str, str, str]] = []  # (from, to, reason), read by the app to tell the operator
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=3.0), transport=transport)
        self._missing: dict[str, float] = {}  # optional path -> when it last answered 404
        self._prom_prev: dict[str, tuple[float, dict[str, Any]]] = {}

    async def close(self) -> None:
        await self._http.aclose()

    # ---- plumbing -------------------------------------------------------------------------------
    def _candidates(self) -> list[str]:
        return [self.url, *[u for u in self.known if u != self.url]]

    def _switch(self, url: str, reason: str) -> None:
        if url != self.url:
            self.failovers.append((self.url, url, reason))
            self.url = url

    async def _send(self, method: str, path: str, *, retry_read: bool, **kw: Any) -> httpx.Response:
        """One request, on the connected member or, when it cannot be reached, the next known one."""
        last = ""
        for url in self._candidates():
            try:
                resp = await self._http.request(method, url + path, **kw)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                last = f"{url}: {_reason(e)}"
                continue
            except (httpx.ReadError, httpx.RemoteProtocolError, httpx.ReadTimeout) as e:
                if not retry_read:  # the request may have been applied: never repeat a write
                    raise ApiError(f"{url}: {_reason(e)}") from None
                last = f"{url}: {_reason(e)}"
                continue
            self._switch(url, last)
            return resp
        raise Unreachable(f"no cluster member reachable ({last})")

    async def _json(self, method: str, path: str, body: Any = None, *, optional: bool = False,
                    read_timeout: float | None = None) -> Any:
        kw: dict[str, Any] = {}
        if body is not None:
            kw["json"] = body
        if read_timeout is not None or method != "GET":
            kw["timeout"] = httpx.Timeout(read_timeout or WRITE_TIMEOUT_S, connect=3.0)
        resp = await self._send(method, path, retry_read=method == "GET", **kw)
        if optional and resp.status_code in (404, 405):
            self._missing[path] = time.monotonic()
            return None
        if resp.status_code >= 400:
            raise ApiError(error_text(resp), resp.status_code)
        self._missing.pop(path, None)
        if not resp.content:
            return {}
        try:
            return resp.json()
        except ValueError:
            raise ApiError(f"{path}: the server answered something that is not JSON") from None

    def _skip(self, path: str) -> bool:
        t = self._missing.get(path)
        return t is not None and time.monotonic() - t < OPTIONAL_RETRY_S

    async def _optional(self, path: str) -> Any:
        if self._skip(path):
            return None
        try:
            return await self._json("GET", path, optional=True)
        except Unreachable:
            raise
        except ApiError:
            return None  # an optional panel failing must not blank the whole screen

    async def _stream(self, method: str, path: str, body: Any) -> AsyncIterator[dict[str, Any]]:
        """NDJSON lines; an `{"error": ...}` line or an error status raises ApiError with its text."""
        timeout = httpx.Timeout(None, connect=3.0)
        async with self._http.stream(method, self.url + path, json=body, timeout=timeout) as resp:
            if resp.status_code >= 400:
                await resp.aread()
                raise ApiError(error_text(resp), resp.status_code)
            async for line in resp.aiter_lines():
                if not line.strip():
                    continue
                obj = json.loads(line)
                if isinstance(obj, dict) and obj.get("error"):
                    raise ApiError(str(obj["error"]))
                yield obj

    # ---- reads --------------------------------------------------------------------------------
    async def snapshot(self) -> Snapshot:
        view = await self._json("GET", "/api/v1/cluster")
        members = tuple(Member.from_json(m) for m in view.get("members", []))
        alive = [normalize_url(m.api_addr) for m in members if m.api_addr and m.status == "alive"]
        self.known = list(dict.fromkeys([*alive, *self.known]))
        leaders = {r: str(v.get("id")) for r, v in (view.get("leaders") or {}).items() if isinstance(v, dict)}
        inst_j, models_j, metrics_j, proxy_j = await asyncio.gather(
            self._optional("/api/v1/proxy/instances"), self._optional("/api/v1/models"),
            self._optional("/api/v1/proxy/metrics"), self._optional("/api/v1/proxy/status"))
        missing = {p for p in self._missing if self._skip(p)}
        if inst_j is not None:
            instances = tuple(Instance.from_json(i) for i in inst_j.get("instances", []))
        else:
            instances = tuple(Instance.from_member(m) for m in members)
        models = (tuple(ModelInfo.from_json(m) for m in models_j.get("models", [])) if models_j is not None
                  else await self._models_fallback(members))
        metrics = proxy_metrics(metrics_j) if metrics_j is not None else await self._prom_metrics(members)
        return Snapshot(connected=self.url, self_id=str(view.get("self") or ""), region=str(view.get("region") or ""),
                        members=members, leaders=leaders, instances=instances, instances_derived=inst_j is None,
                        models=models, metrics=metrics, proxy=proxy_j, missing=frozenset(missing), ts=time.time())

    async def _models_fallback(self, members: tuple[Member, ...]) -> tuple[ModelInfo, ...]:
        """Without the scheduler's model API: the store's tags, placed where gossip says they are loaded."""
        tags = await self._optional("/api/tags") or {}
        where: dict[str, list[str]] = {}
        for m in members:
            if m.status == "alive":
                for name in m.models:
                    where.setdefault(name, []).append(m.id)
        out = []
        for t in tags.get("models", []):
            name = str(t.get("name"))
            nodes = where.get(name) or where.get(name.removesuffix(":latest")) or []
            out.append(ModelInfo(name=name, digest=str(t.get("digest") or ""), size=int(t.get("size") or 0),
                                 replicas=None, actual=len(nodes), nodes=tuple(sorted(nodes))))
        return tuple(out)

    async def _prom_metrics(self, members: tuple[Member, ...]) -> MetricsSample | None:
        """Rates and quantiles from counter deltas between two scrapes of each member's /metrics."""
        targets = [(m.id, normalize_url(m.api_addr)) for m in members if m.status == "alive" and m.api_addr]
        targets = targets[:PROM_MEMBERS_MAX]

        async def scrape(url: str) -> dict[str, Any] | None:
            try:
                r = await self._http.get(url + "/metrics", timeout=3.0)
                return parse_prometheus(r.text) if r.status_code == 200 else None
            except httpx.HTTPError:
                return None

        now = time.monotonic()
        results = await asyncio.gather(*(scrape(u) for _, u in targets))
        per_node: dict[str, MetricPoint] = {}
        for (nid, _), cur in zip(targets, results, strict=True):
            if cur is None:
                continue
            prev = self._prom_prev.get(nid)
            self._prom_prev[nid] = (now, cur)
            if prev is not None and now > prev[0]:
                per_node[nid] = prom_point(prev[1], cur, now - prev[0])
        if not per_node:
            return MetricsSample(source="prometheus")
        return MetricsSample(cluster=combine(per_node.values()), per_node=per_node, source="prometheus")

    async def events(self, after: int) -> AsyncIterator[EventRow]:  # type: ignore[override]
        """Server-sent events from the connected member; ends (or raises) when the connection does."""
        headers = {"Last-Event-ID": str(after), "Accept": "text/event-stream"}
        timeout = httpx.Timeout(5.0, read=45.0)  # the node sends a heartbeat comment every 15 s
        url = self.url
        try:
            async with self._http.stream("GET", url + "/api/v1/events", headers=headers, timeout=timeout) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    raise ApiError(error_text(resp), resp.status_code)
                data: list[str] = []
                async for line in resp.aiter_lines():
                    if line.startswith("data:"):
                        data.append(line[5:].lstrip())
                    elif not line and data:
                        try:
                            yield EventRow.from_json(json.loads("\n".join(data)), origin=url)
                        except ValueError:
                            pass
                        data = []
        except httpx.HTTPError as e:
            raise Unreachable(f"event stream from {url}: {_reason(e)}") from None

    # ---- node actions -------------------------------------------------------------------------
    async def node_action(self, node: str, action: str) -> dict[str, Any]:
        if action not in ("cordon", "uncordon", "drain"):
            raise ValueError(action)
        return await self._json("POST", f"/api/v1/nodes/{node}/{action}")

    async def remove_node(self, node: str, force: bool) -> dict[str, Any]:
        return await self._json("DELETE", f"/api/v1/nodes/{node}" + ("?force=true" if force else ""))

    async def transfer_leader(self, to: str | None = None, region: str | None = None) -> dict[str, Any]:
        body = {k: v for k, v in (("to", to), ("region", region)) if v}
        return await self._json("POST", "/api/v1/cluster/leader/transfer", body)

    # ---- models ---------------------------------------------------------------------------------
    async def scale_model(self, model: str, replicas: int) -> dict[str, Any]:
        return await self._json("POST", "/api/v1/models/scale", {"model": model, "replicas": replicas})

    def pull_model(self, model: str) -> AsyncIterator[dict[str, Any]]:
        return self._stream("POST", "/api/pull", {"model": model, "stream": True})

    async def delete_model(self, model: str) -> dict[str, Any]:
        return await self._json("DELETE", "/api/delete", {"model": model})

    async def copy_model(self, source: str, destination: str) -> dict[str, Any]:
        return await self._json("POST", "/api/copy", {"source": source, "destination": destination})

    async def load_model(self, model: str) -> dict[str, Any]:
        return await self._json("POST", "/api/generate", {"model": model, "stream": False}, read_timeout=600.0)

    async def unload_model(self, model: str) -> dict[str, Any]:
        return await self._json("POST", "/api/generate", {"model": model, "keep_alive": 0, "stream": False})

    # ---- instances ------------------------------------------------------------------------------
    async def add_instance(self, url: str) -> dict[str, Any]:
        return await self._json("POST", "/api/v1/proxy/instances", {"url": url})

    async def remove_instance(self, url: str) -> dict[str, Any]:
        return await self._json("DELETE", "/api/v1/proxy/instances", {"url": url})

    # ---- playground -----------------------------------------------------------------------------
    def chat(self, model: str, messages: list[dict[str, str]]) -> AsyncIterator[dict[str, Any]]:
        return self._stream("POST", "/api/chat", {"model": model, "messages": messages, "stream": True})


# ---- metrics helpers (pure functions, unit tested) -------------------------------------------------

def proxy_metrics(d: dict[str, Any]) -> MetricsSample:
    def q(obj: Any, key: str) -> float | None:
        v = (obj or {}).get(key) if isinstance(obj, dict) else None
        return None if v is None else float(v)

    cluster = MetricPoint(requests_per_s=q(d, "requests_per_s"), p50_ms=q(d.get("latency_ms"), "p50"),
                          p99_ms=q(d.get("latency_ms"), "p99"), ttft_p50_ms=q(d.get("ttft_ms"), "p50"),
                          ttft_p99_ms=q(d.get("ttft_ms"), "p99"), tokens_per_s=q(d, "tokens_per_s"))
    per = {str(k): MetricPoint(requests_per_s=q(v, "requests_per_s"), p50_ms=q(v.get("latency_ms"), "p50"),
                               p99_ms=q(v.get("latency_ms"), "p99"), tokens_per_s=q(v, "tokens_per_s"))
           for k, v in (d.get("instances") or {}).items() if isinstance(v, dict)}
    return MetricsSample(cluster=cluster, per_node=per, source="proxy")


def parse_prometheus(text: str) -> dict[str, Any]:
    """Sums of the counters the console charts, and histogram buckets by `le`, from exposition text."""
    out: dict[str, Any] = {"requests": 0.0, "tokens": 0.0, "latency": {}, "ttft": {}}
    for line in text.splitlines():
        m = PROM_LINE.match(line)
        if m is None:
            continue
        name, labels = m.group(1), m.group(2) or ""
        try:
            v = float(m.group(3))
        except ValueError:
            continue
        if name == "omx_requests_total":
            out["requests"] += v
        elif name == "omx_generated_tokens_total":
            out["tokens"] += v
        elif name in ("omx_request_duration_seconds_bucket", "omx_time_to_first_token_seconds_bucket"):
            le = next((p.split("=", 1)[1].strip('"') for p in labels.split(",") if p.startswith("le=")), None)
            if le is not None:
                key = "latency" if name.startswith("omx_request") else "ttft"
                out[key][float(le)] = out[key].get(float(le), 0.0) + v
    return out


def bucket_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative buckets, in milliseconds."""
    items = sorted(buckets.items())
    if not items or items[-1][1] <= 0:
        return None
    rank = q * items[-1][1]
    prev_le, prev_c = 0.0, 0.0
    for le, c in items:
        if c >= rank:
            if math.isinf(le):
                return prev_le * 1000.0
            span = c - prev_c
            frac = (rank - prev_c) / span if span > 0 else 1.0
            return (prev_le + (le - prev_le) * frac) * 1000.0
        prev_le, prev_c = le, c
    return prev_le * 1000.0


def prom_point(prev: dict[str, Any], cur: dict[str, Any], dt: float) -> MetricPoint:
    def delta(key: str) -> dict[float, float]:
        return {le: max(0.0, c - prev[key].get(le, 0.0)) for le, c in cur[key].items()}

    lat, ttft = delta("latency"), delta("ttft")
    return MetricPoint(requests_per_s=max(0.0, cur["requests"] - prev["requests"]) / dt,
                       p50_ms=bucket_quantile(0.5, lat), p99_ms=bucket_quantile(0.99, lat),
                       ttft_p50_ms=bucket_quantile(0.5, ttft), ttft_p99_ms=bucket_quantile(0.99, ttft),
                       tokens_per_s=max(0.0, cur["tokens"] - prev["tokens"]) / dt)


def combine(points: Any) -> MetricPoint:
    """Cluster-wide figure from per-node ones: rates add up, latencies take the worst node (an upper bound)."""
    pts = list(points)

    def total(attr: str) -> float | None:
        vals = [getattr(p, attr) for p in pts if getattr(p, attr) is not None]
        return sum(vals) if vals else None

    def worst(attr: str) -> float | None:
        vals = [getattr(p, attr) for p in pts if getattr(p, attr) is not None]
        return max(vals) if vals else None

    return MetricPoint(requests_per_s=total("requests_per_s"), p50_ms=worst("p50_ms"), p99_ms=worst("p99_ms"),
                       ttft_p50_ms=worst("ttft_p50_ms"), ttft_p99_ms=worst("ttft_p99_ms"),
                       tokens_per_s=total("tokens_per_s"))
