"""The request router: any node answers for any model in the cluster, and a failed replica costs no request.

A request that names a model is served by the best replica: this node's runner or a peer's, chosen from
gossip metadata (what each node holds and has loaded, its outstanding work, cordon/drain state) and from
what this node observed itself (its own outstanding requests to each peer, failures, latency). Peers are
called on the same public route with `X-Omx-Routed` and the cluster's internal token, which makes them
serve locally: a request is routed at most once, so routing loops cannot happen.

Failover: before the first byte, another replica is tried (bounded attempts). After it, the stream is
resumed on another replica from the prompt plus the text already streamed (`_omx_resume` in the routed
body), so the client sees one uninterrupted stream whose final counters cover the whole generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from omx.models.names import InvalidModelName, ModelName
from omx.node.cluster import Cluster
from omx.node.config import NodeConfig
from omx.node.events import EventBus
from omx.node.inference import IDS_FIELD, Resume
from omx.node.runners import SERVER_BUSY, RunnerManager
from omx.protocols.api import ApiError

log = logging.getLogger("omx.router")

ROUTED_HEADER = "X-Omx-Routed"
RESUME_FIELD = "_omx_resume"
RETRY_AFTER_S = 1


def model_key(raw: str) -> str:
    """One spelling per model, as gossip advertises it ("omx-tiny" and "omx-tiny:latest" are one model)."""
    # Asked several times per routed request, and names repeat; a client's long string is not kept.
    return _model_key(raw) if len(raw) <= 256 else _parse_model_key(raw)


def _parse_model_key(raw: str) -> str:
    try:
        return ModelName.parse(raw).display_shortest()
    except InvalidModelName:
        return raw


_model_key = functools.lru_cache(maxsize=1024)(_parse_model_key)


@dataclass
class Breaker:
    """Circuit breaker for one target: open after N consecutive failures. After a cooldown a liveness probe
    moves it to half-open, where one real request decides: success closes it, failure reopens it for twice
    as long (a node whose API answers but whose models fail stays out of rotation)."""

    failures: int = 0
    state: str = "closed"  # closed | open | half_open
    opened_at: float = 0.0
    cooldown: float = 5.0
    trial: bool = False  # a half-open trial request is under way

    def allows(self) -> bool:
        return self.state == "closed" or (self.state == "half_open" and not self.trial)

    def success(self, base_cooldown: float) -> None:
        self.failures = 0
        self.state = "closed"
        self.cooldown = base_cooldown
        self.trial = False

    def failure(self, threshold: int) -> bool:
        """Record a failure; True when this one opened the breaker."""
        self.failures += 1
        self.trial = False
        if self.state == "half_open":
            self.state, self.opened_at = "open", time.monotonic()
            self.cooldown = min(self.cooldown * 2, 60.0)
            return False
        if self.state == "closed" and self.failures >= threshold:
            self.state, self.opened_at = "open", time.monotonic()
            return True
        return False

    def probe_due(self) -> bool:
        return self.state == "open" and time.monotonic() - self.opened_at >= self.cooldown


@dataclass
class TargetStats:
    """What this node saw of one target: outstanding work, outcomes, latency and token rate."""

    outstanding: int = 0
    requests: int = 0
    errors: int = 0
    latency_ms: deque[float] = field(default_factory=lambda: deque(maxlen=256))
    tokens: deque[tuple[float, int, float]] = field(default_factory=lambda: deque(maxlen=256))  # (t, n, secs)

    def tokens_per_s(self) -> float | None:
        if not self.tokens:
            return None
        n = sum(x[1] for x in self.tokens)
        secs = sum(x[2] for x in self.tokens)
        return round(n / secs, 2) if secs > 0 else None


@dataclass
class Target:
    """One place a request can be served."""

    id: str
    url: str
    kind: str  # local | node | external
    node: str | None
    region: str | None
    loaded: bool
    load: float  # outstanding work / slots, as last advertised plus what we sent since


@dataclass
class External:
    """An Ollama-API server an operator registered; health-checked and routed to like a node."""

    url: str
    healthy: bool = False
    models: list[str] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    last_error: str | None = None
    checked_at: float = 0.0
    latency_ms: float | None = None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], 2)


class UpstreamError(Exception):
    """A replica failed; `retry` says whether another replica may succeed where it did not."""

    def __init__(self, status: int, message: str, retry: bool) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry = retry


class Router:
    def __init__(self, cfg: NodeConfig, cluster: Cluster, runners: RunnerManager, events: EventBus) -> None:
        self.cfg = cfg
        self.cluster = cluster
        self.runners = runners
        self.events = events
        self.breakers: dict[str, Breaker] = {}
        self.stats: dict[str, TargetStats] = {}
        self.externals: dict[str, External] = {}
        self.session: aiohttp.ClientSession | None = None
        self.requests_total = 0
        self.retries_total = 0
        self.resumes_total = 0
        self.inflight = 0
        self.latency_ms: deque[float] = deque(maxlen=1024)
        self.ttft_ms: deque[float] = deque(maxlen=1024)
        self.finished: deque[tuple[float, int, float]] = deque(maxlen=4096)  # (t, tokens, seconds)
        self._tasks: list[asyncio.Task[None]] = []
        self._holders: dict[str, list[Any]] = {}
        self._holders_at = -1.0

    # ---- lifetime ---------------------------------------------------------------------------------
    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30), auto_decompress=False)
        self._tasks.append(asyncio.create_task(self._health_loop(), name="router-health"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self.session is not None:
            await self.session.close()

    # ---- is this request already routed? ----------------------------------------------------------
    def is_routed(self, request: web.Request) -> bool:
        """A peer routed this request here: serve it locally. Only cluster members may say so."""
        if ROUTED_HEADER not in request.headers:
            return False
        self.cluster.check_internal_auth(request.headers.get("Authorization"))
        return True

    def _headers(self, t: Target) -> dict[str, str]:
        if t.kind == "external":
            return {}  # never hand the cluster's credentials to a server outside it
        return {ROUTED_HEADER: self.cluster.id, "Authorization": f"Bearer {self.cluster.http_token}"}

    # ---- the cluster's view of targets ---------------------------------------------------------------
    def _members(self) -> list[Any]:
        swim = self.cluster.swim
        return [] if swim is None else swim.members()

    def breaker(self, tid: str) -> Breaker:
        b = self.breakers.get(tid)
        if b is None:
            b = self.breakers[tid] = Breaker(cooldown=self.cfg.breaker_cooldown)
        return b

    def stat(self, tid: str) -> TargetStats:
        s = self.stats.get(tid)
        if s is None:
            s = self.stats[tid] = TargetStats()
        return s

    def _local_target(self, key: str, has_local: bool) -> Target | None:
        if not has_local:
            return None
        loaded = any(model_key(r.spec.name) == key for r in self.runners.live())
        slots = self.cfg.num_parallel * self.cfg.max_loaded_models
        return Target(self.cluster.id, self.cluster.api_url, "local", self.cluster.id, self.cfg.region, loaded,
                      self.runners.inflight / max(1, slots))

    def targets(self, raw_model: str, has_local: bool, prefix: str = "") -> list[Target]:
        """Every replica that can serve the model now, best first (the policy's order)."""
        key = model_key(raw_model)
        out: list[Target] = []
        local = self._local_target(key, has_local)
        holders = self._holders_index().get(key)
        if not holders and not has_local:  # a model nobody held a moment ago may have just appeared
            holders = self._holders_index(fresh=True).get(key)
        for m in holders or ():
            meta = m.meta or {}
            if meta.get("cordoned") or meta.get("draining"):
                continue
            if not self.breaker(m.id).allows():
                continue
            slots = max(1, int(meta.get("slots") or 1))
            load = (int(meta.get("inflight") or 0) + self.stat(m.id).outstanding) / slots
            out.append(Target(m.id, meta["api"], "node", m.id, meta.get("region"),
                              key in (meta.get("models") or []), load))
        for ext in self.externals.values():
            if ext.healthy and key in ext.models and self.breaker(ext.url).allows():
                out.append(Target(ext.url, ext.url, "external", None, None, key in ext.loaded,
                                  self.stat(ext.url).outstanding / 4))
        return self._order(out, local, prefix)

    def _holders_index(self, fresh: bool = False) -> dict[str, list[Any]]:
        """Live peers by model they hold, rebuilt at most every 250 ms: a request looks at the model's holders,
        not at every member (gossip is only eventually consistent anyway; our own outstanding counts are live)."""
        now = time.monotonic()
        if now - self._holders_at > (0.05 if fresh else 0.25):
            idx: dict[str, list[Any]] = {}
            me = self.cluster.id
            for m in self._members():
                meta = m.meta or {}
                if m.id != me and m.state == "alive" and meta.get("api"):
                    for key in meta.get("have") or ():
                        idx.setdefault(key, []).append(m)
            self._holders, self._holders_at = idx, now
        return self._holders

    def _order(self, peers: list[Target], local: Target | None, prefix: str) -> list[Target]:
        region = self.cfg.region
        me_busy = local is not None and local.load >= 1.0
        mine_draining = bool(self.cluster.reg.get("nodes", {}).get(self.cluster.id, {}).get("cordoned"))

        def tier(t: Target) -> tuple[int, int]:
            return (0 if t.region in (region, None) else 1, 0 if t.loaded else 1)

        # A local replica with free slots and the model loaded wins: no network hop at all.
        if local is not None and local.loaded and not me_busy and not mine_draining:
            return [local, *sorted(peers, key=lambda t: (tier(t), t.load))]
        pool = peers + ([local] if local is not None else [])
        if not pool:
            return []
        best = min(tier(t) for t in pool)
        top = [t for t in pool if tier(t) == best]
        rest = sorted((t for t in pool if tier(t) != best), key=lambda t: (tier(t), t.load))
        if mine_draining and local is not None and len(pool) > 1:
            top = [t for t in top if t is not local] or top
            rest = [t for t in rest if t is not local] + ([local] if local not in top else [])
        first = self._pick(top, prefix)
        return [first, *sorted((t for t in top if t is not first), key=lambda t: t.load), *rest]

    def _pick(self, top: list[Target], prefix: str) -> Target:
        """Power of two choices on load; the prefix policy first tries the replica the prefix hashes to
        (rendezvous hashing, so adding a replica moves only the prefixes it wins)."""
        if self.cfg.routing_policy == "prefix" and prefix:
            ranked = sorted(top, key=lambda t: hashlib.blake2b((prefix + t.id).encode(), digest_size=8).digest())
            if ranked[0].load < 1.0:
                return ranked[0]
        if len(top) == 1:
            return top[0]
        a, b = random.sample(top, 2)
        if a.load == b.load and b.kind == "local":
            return b
        return a if a.load <= b.load else b

    # ---- generation: route, fail over, resume --------------------------------------------------------
    async def stream(
        self,
        path: str,
        body: dict[str, Any],
        raw_model: str,
        has_local: bool,
        local: Callable[[Resume | None], AsyncIterator[dict[str, Any]]],
        text_of: Callable[[dict[str, Any]], str],
        prefix: str = "",
    ) -> AsyncIterator[dict[str, Any]]:
        """Native chunks from the best replica; on failure the next one continues where it stopped."""
        t_start = time.perf_counter()
        self.requests_total += 1
        self.inflight += 1
        tried: set[str] = set()
        text: list[str] = []
        ids: list[int] | None = []
        tokens = 0
        attempts = 0
        resumes = 0
        first_at: float | None = None
        last_err: UpstreamError | None = None
        can_resume = not body.get("format")  # a grammar cannot be resumed mid-way: its state is not carried
        try:
            while True:
                cands = [t for t in self.targets(raw_model, has_local, prefix) if t.id not in tried]
                if first_at is not None:
                    cands = [t for t in cands if t.kind != "external"]  # only omx nodes understand a resume
                if not cands:
                    if first_at is None:
                        if last_err is None:
                            async for c in local(None):  # no replica at all: the local path gives Ollama's error
                                yield c
                            return
                        raise ApiError(last_err.status, last_err.message)
                    yield {"error": f"generation failed and no replica could continue it: "
                                    f"{last_err.message if last_err else 'no replica'}"}
                    return
                t = cands[0]
                tried.add(t.id)
                resume = None
                if first_at is not None:
                    resume = Resume(text="".join(text), tokens=tokens, ids=ids,
                                    elapsed_ns=int((time.perf_counter() - t_start) * 1e9))
                    resumes += 1
                    self.resumes_total += 1
                    self.events.publish("router.resumed", model=raw_model, target=t.id, tokens=tokens)
                elif attempts:
                    self.retries_total += 1
                    self.events.publish("router.retried", model=raw_model, target=t.id,
                                        reason=last_err.message if last_err else "")
                attempts += 1
                b = self.breakers.get(t.id)
                if b is not None and b.state == "half_open":
                    b.trial = True
                st = self.stat(t.id)
                st.outstanding += 1
                st.requests += 1
                t0 = time.perf_counter()
                n_before = tokens
                try:
                    gen = local(resume) if t.kind == "local" else self._remote(t, path, body, resume)
                    async with contextlib.aclosing(gen) as chunks:
                        async for c in chunks:
                            got = c.pop(IDS_FIELD, None)
                            if "error" in c:
                                raise UpstreamError(500, str(c["error"]), True)
                            if first_at is None:
                                first_at = time.perf_counter()
                                self.ttft_ms.append((first_at - t_start) * 1000)
                            if c.get("done"):
                                self._ok(t, t0, tokens - n_before)
                                self._finished(t_start, c)
                                yield c
                                return
                            if isinstance(got, list) and ids is not None:
                                ids.extend(got)
                                tokens += len(got)
                            else:
                                ids = None  # a replica that does not report ids: resume from text
                                tokens += 1
                            text.append(text_of(c))
                            yield c
                    raise UpstreamError(502, f"{t.id} ended the stream without a final chunk", True)
                except ApiError as e:
                    # raised before this target's first chunk: client errors pass through, the rest fail over
                    if e.status < 500 and e.status not in (404, 429):
                        raise
                    last_err = UpstreamError(e.status, e.message, True)
                    if e.status >= 500 and e.status != 503:
                        self._fail(t, e.message)
                except UpstreamError as e:
                    if not e.retry:
                        if first_at is None:
                            raise ApiError(e.status, e.message) from None
                        yield {"error": e.message}
                        return
                    last_err = e
                    if e.status != 503:
                        self._fail(t, e.message)
                finally:
                    st.outstanding -= 1
                if first_at is None and attempts >= self.cfg.route_attempts:
                    raise ApiError(last_err.status if last_err else 503, last_err.message if last_err else SERVER_BUSY)
                if first_at is not None and (not can_resume or resumes >= self.cfg.route_resumes):
                    yield {"error": last_err.message if last_err else "generation failed"}
                    return
        finally:
            self.inflight -= 1

    async def _remote(self, t: Target, path: str, body: dict[str, Any], resume: Resume | None
                      ) -> AsyncIterator[dict[str, Any]]:
        """The target's NDJSON stream as chunks; errors before the first chunk keep their HTTP status."""
        assert self.session is not None
        payload = dict(body)
        payload["stream"] = True
        if resume is not None:
            payload[RESUME_FIELD] = resume.to_json()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.route_connect_timeout)
        try:
            resp = await self.session.post(t.url + path, json=payload, headers=self._headers(t), timeout=timeout)
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise UpstreamError(502, f"{t.id}: {_reason(e)}", True) from None
        async with resp:
            if resp.status != 200:
                msg = await _error_text(resp)
                raise ApiError(resp.status, msg)
            first = True
            while True:
                limit = self.cfg.load_timeout if first else self.cfg.route_stall_timeout
                try:
                    async with asyncio.timeout(limit):  # (wait_for would wrap each line's read in a task)
                        line = await resp.content.readline()
                except TimeoutError:
                    raise UpstreamError(504, f"{t.id} sent nothing for {limit:.0f}s", True) from None
                except (aiohttp.ClientError, OSError, ValueError) as e:
                    raise UpstreamError(502, f"{t.id}: {_reason(e)}", True) from None
                if not line:
                    return
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    raise UpstreamError(502, f"{t.id} sent a line that is not JSON", True) from None
                if not isinstance(obj, dict):
                    raise UpstreamError(502, f"{t.id} sent a line that is not a JSON object", True)
                first = False
                yield obj

    def _ok(self, t: Target, t0: float, n_tokens: int) -> None:
        st = self.stat(t.id)
        secs = time.perf_counter() - t0
        st.latency_ms.append(secs * 1000)
        if n_tokens:
            st.tokens.append((time.time(), n_tokens, secs))
        b = self.breakers.get(t.id)
        if b is not None and (b.failures or b.state != "closed"):
            if b.state != "closed":
                log.info("%s served a request again; back in rotation", t.id)
                self.events.publish("router.circuit_closed", target=t.id)
            b.success(self.cfg.breaker_cooldown)

    def _fail(self, t: Target, why: str) -> None:
        if t.kind == "local":
            return
        self.stat(t.id).errors += 1
        if self.breaker(t.id).failure(self.cfg.breaker_failures):
            log.warning("taking %s out of rotation after %d failures: %s", t.id, self.cfg.breaker_failures, why)
            self.events.publish("router.circuit_open", target=t.id, reason=why)

    def _finished(self, t_start: float, final: dict[str, Any]) -> None:
        secs = time.perf_counter() - t_start
        self.latency_ms.append(secs * 1000)
        n = int(final.get("eval_count") or 0)
        ev = int(final.get("eval_duration") or 0) / 1e9
        self.finished.append((time.time(), n, ev))

    # ---- plain JSON requests (embeddings, show) -------------------------------------------------------
    async def forward_json(self, raw_model: str, path: str, body: dict[str, Any], has_local: bool,
                           local: Callable[[], Any]) -> Any:
        """One JSON answer from the best replica, trying the next one on failures a replica can cause."""
        self.requests_total += 1
        last: UpstreamError | None = None
        tried = 0
        for t in self.targets(raw_model, has_local):
            if tried >= self.cfg.route_attempts:
                break
            if tried:
                self.retries_total += 1
            tried += 1
            if t.kind == "local":
                try:
                    return await local()
                except ApiError as e:
                    if e.status < 500 and e.status != 404:
                        raise
                    last = UpstreamError(e.status, e.message, True)  # 404: our store lost it; a holder may serve
                    continue
            try:
                return await self.call(t, "POST", path, body)
            except UpstreamError as e:
                last = e
                if not e.retry:
                    raise ApiError(e.status, e.message) from None
        if last is None:
            return await local()
        raise ApiError(last.status, last.message)

    async def call(self, t: Target, method: str, path: str, body: Any = None, limit_s: float = 60.0) -> Any:
        """One JSON request to a target; 4xx (but 404/429) are final, the rest may succeed elsewhere."""
        assert self.session is not None
        st = self.stat(t.id)
        st.outstanding += 1
        t0 = time.perf_counter()
        try:
            async with self.session.request(
                method, t.url + path, json=body, headers=self._headers(t),
                timeout=aiohttp.ClientTimeout(total=limit_s, sock_connect=self.cfg.route_connect_timeout),
            ) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    msg = _error_from(raw, resp.status)
                    retry = resp.status >= 500 or resp.status in (404, 429)
                    if resp.status >= 500 and resp.status != 503:
                        self._fail(t, msg)
                    raise UpstreamError(resp.status, msg, retry)
                self._ok(t, t0, 0)
                return json.loads(raw) if raw.strip() else {}
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
            self._fail(t, _reason(e))
            raise UpstreamError(502, f"{t.id}: {_reason(e)}", True) from None
        finally:
            st.outstanding -= 1

    # ---- cluster-wide fan-out -----------------------------------------------------------------------
    def peers(self) -> list[Target]:
        """Every other live omx node (for cluster-wide listings and actions)."""
        out = []
        for m in self._members():
            meta = m.meta or {}
            if m.id != self.cluster.id and m.state == "alive" and meta.get("api"):
                out.append(Target(m.id, meta["api"], "node", m.id, meta.get("region"), False, 0.0))
        return out

    def holders(self, raw_model: str, field_name: str = "have") -> list[Target]:
        """The peers whose gossip `field_name` lists the model: holding it (have) or having it loaded (models)."""
        key = model_key(raw_model)
        return [t for t in self.peers() if key in (self.meta_of(t.id).get(field_name) or [])]

    def covering(self, field_name: str) -> list[Target]:
        """The fewest peers whose gossip `field_name` lists (have / models) cover every name any peer lists:
        a cluster-wide listing asks these, not every node (10,000 nodes must not mean 10,000 calls)."""
        peers = self.peers()
        names: dict[str, set[str]] = {t.id: set(self.meta_of(t.id).get(field_name) or []) for t in peers}
        missing = set().union(*names.values()) if names else set()
        chosen: list[Target] = []
        while missing:
            best = max(peers, key=lambda t: len(names[t.id] & missing))
            gain = names[best.id] & missing
            if not gain:
                break
            chosen.append(best)
            missing -= gain
        return chosen

    def meta_of(self, nid: str) -> dict[str, Any]:
        swim = self.cluster.swim
        m = swim.get(nid) if swim is not None else None
        return dict(m.meta or {}) if m is not None else {}

    async def fanout(self, targets: list[Target], method: str, path: str, body: Any = None,
                     limit_s: float = 5.0) -> list[tuple[Target, Any, UpstreamError | None]]:
        """The same request to many nodes at once; each answer or error, never an exception."""
        async def one(t: Target) -> tuple[Target, Any, UpstreamError | None]:
            try:
                return t, await self.call(t, method, path, body, limit_s=limit_s), None
            except UpstreamError as e:
                return t, None, e

        return list(await asyncio.gather(*(one(t) for t in targets)))

    async def on_holders(self, raw_model: str, field_name: str, method: str, path: str, body: Any = None,
                         limit_s: float = 30.0) -> tuple[list[Any], list[tuple[Target, UpstreamError]]]:
        """The same request to every peer `holders(raw_model, field_name)` names: the answers of those that
        succeeded, and each failed peer with its error."""
        answers: list[Any] = []
        errors: list[tuple[Target, UpstreamError]] = []
        for t, res, err in await self.fanout(self.holders(raw_model, field_name), method, path, body, limit_s):
            if err is None:
                answers.append(res)
            else:
                errors.append((t, err))
        return answers, errors

    # ---- external instances --------------------------------------------------------------------------
    def external_urls(self) -> list[str]:
        urls = self.cluster.reg.get("settings", {}).get("external_instances") or []
        return [u for u in urls if isinstance(u, str)]

    async def _health_loop(self) -> None:
        """Probe open breakers and external instances; never overlaps itself."""
        next_ext = 0.0
        while True:
            await asyncio.sleep(0.5)
            try:
                await self._probe_breakers()
                if time.monotonic() >= next_ext:
                    next_ext = time.monotonic() + self.cfg.external_check_interval
                    await self._check_externals()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("router health check failed")

    async def _probe_breakers(self) -> None:
        due = [tid for tid, b in self.breakers.items() if b.probe_due()]
        for tid in due:
            url = tid if tid in self.externals else self.meta_of(tid).get("api")
            b = self.breakers[tid]
            if not url:
                continue
            if await self._ping(url):
                b.state, b.trial = "half_open", False  # alive: the next request to it decides
            else:
                b.opened_at = time.monotonic()
                b.cooldown = min(b.cooldown * 2, 60.0)

    async def _ping(self, url: str) -> bool:
        assert self.session is not None
        try:
            async with self.session.get(url + "/api/version", timeout=aiohttp.ClientTimeout(total=2)) as r:
                return r.status == 200
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False

    async def _check_externals(self) -> None:
        urls = self.external_urls()
        for gone in set(self.externals) - set(urls):
            del self.externals[gone]
        await asyncio.gather(*(self._check_external(u) for u in urls))

    async def _check_external(self, url: str) -> None:
        assert self.session is not None
        ext = self.externals.get(url)
        if ext is None:
            ext = self.externals[url] = External(url)
        t0 = time.perf_counter()
        try:
            timeout = aiohttp.ClientTimeout(total=3)
            async with self.session.get(url + "/api/tags", timeout=timeout) as r:
                tags = await r.json(content_type=None) if r.status == 200 else None
            async with self.session.get(url + "/api/ps", timeout=timeout) as r:
                ps = await r.json(content_type=None) if r.status == 200 else {"models": []}
            if not isinstance(tags, dict):
                raise ValueError("GET /api/tags did not answer with a model list")
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
            was = ext.healthy
            ext.healthy, ext.last_error, ext.checked_at = False, _reason(e), time.time()
            if was:
                self.events.publish("router.external_unhealthy", url=url, reason=ext.last_error)
            return
        was = ext.healthy
        ext.models = sorted({model_key(str(m.get("name") or m.get("model") or "")) for m in tags.get("models") or []
                             if isinstance(m, dict)})
        ext.loaded = sorted({model_key(str(m.get("name") or m.get("model") or "")) for m in ps.get("models") or []
                             if isinstance(m, dict)})
        ext.healthy, ext.last_error, ext.checked_at = True, None, time.time()
        ext.latency_ms = round((time.perf_counter() - t0) * 1000, 2)
        if not was:
            self.events.publish("router.external_healthy", url=url, models=len(ext.models))

    # ---- views for /api/v1/proxy ----------------------------------------------------------------------
    def instances(self) -> list[dict[str, Any]]:
        reg_nodes = self.cluster.reg.get("nodes", {})
        out: list[dict[str, Any]] = []
        for m in sorted(self._members(), key=lambda m: m.id):
            meta = m.meta or {}
            reg = reg_nodes.get(m.id, {})
            b = self.breakers.get(m.id)
            st = self.stats.get(m.id)
            if m.state != "alive":
                status = m.state
            elif meta.get("draining") or reg.get("draining"):
                status = "draining"
            elif meta.get("cordoned") or reg.get("cordoned"):
                status = "cordoned"
            elif b is not None and b.state != "closed":
                status = "unhealthy"
            else:
                status = "healthy"
            out.append({
                "id": m.id, "url": meta.get("api"), "node": m.id, "region": meta.get("region"), "kind": "node",
                "status": status, "circuit": b.state if b else "closed",
                "models": list(meta.get("have") or []), "loaded": list(meta.get("models") or []),
                "inflight": int(meta.get("inflight") or 0), "slots": int(meta.get("slots") or 0),
                "queue": int(meta.get("queue") or 0),
                "latency_ms": percentile(list(st.latency_ms), 0.5) if st else None,
                "tokens_per_s": st.tokens_per_s() if st else None, "self": m.id == self.cluster.id,
            })
        for url in self.external_urls():
            ext = self.externals.get(url) or External(url)
            b = self.breakers.get(url)
            st = self.stats.get(url)
            healthy = ext.healthy and (b is None or b.state == "closed")
            out.append({
                "id": url, "url": url, "node": None, "region": None, "kind": "external",
                "status": "healthy" if healthy else "unhealthy", "circuit": b.state if b else "closed",
                "models": ext.models, "loaded": ext.loaded, "inflight": st.outstanding if st else 0, "slots": 0,
                "queue": 0, "latency_ms": ext.latency_ms, "tokens_per_s": st.tokens_per_s() if st else None,
                "last_error": ext.last_error, "self": False,
            })
        return out

    def metrics(self) -> dict[str, Any]:
        now = time.time()
        recent = [x for x in self.finished if now - x[0] <= 60]
        toks = sum(x[1] for x in recent)
        secs = sum(x[2] for x in recent)
        per: dict[str, Any] = {}
        for tid, st in self.stats.items():
            lat = list(st.latency_ms)
            per[tid] = {"requests_total": st.requests, "errors_total": st.errors, "outstanding": st.outstanding,
                        "latency_ms": {"p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99)},
                        "tokens_per_s": st.tokens_per_s()}
        lat = list(self.latency_ms)
        ttft = list(self.ttft_ms)
        return {
            "node": self.cluster.id, "requests_total": self.requests_total, "inflight": self.inflight,
            "requests_per_s": round(len(recent) / 60.0, 3),
            "latency_ms": {"p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99)},
            "ttft_ms": {"p50": percentile(ttft, 0.5), "p99": percentile(ttft, 0.99)},
            "tokens_per_s": round(toks / secs, 2) if secs > 0 else None,
            "retries_total": self.retries_total, "resumes_total": self.resumes_total, "instances": per,
        }


def _reason(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, aiohttp.ClientConnectorError):
        return f"cannot connect ({e.os_error.strerror or e.os_error})"
    return str(e) or type(e).__name__


def _error_from(raw: bytes, status: int) -> str:
    try:
        obj = json.loads(raw)
        if isinstance(obj, dict) and isinstance(obj.get("error"), str):
            return obj["error"]
    except ValueError:
        pass
    text = raw.decode(errors="replace").strip()
    return text[:300] or f"HTTP {status}"


async def _error_text(resp: aiohttp.ClientResponse) -> str:
    try:
        raw = await resp.read()
    except (aiohttp.ClientError, OSError):
        return f"HTTP {resp.status}"
    return _error_from(raw, resp.status)


ROUTER = web.AppKey("router", Router)
