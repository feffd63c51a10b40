"""Model distribution routes: peers serve manifests and blobs to each other; /api/pull and /api/push.

`/api/pull` replicates a model from the peers that hold it (chosen from their gossiped `have` lists, or by
asking every alive member when a member does not advertise one) and falls back to an upstream registry.
The peer routes need the cluster's internal token unless `allow_anonymous_blobs` is set, so a node's public
port never hands out model data to strangers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, BinaryIO

import aiohttp
from aiohttp import web

from omx.models import oci
from omx.models.manifest import MEDIA_TYPE_MANIFEST, InvalidManifest
from omx.models.names import InvalidModelName, ModelName, parse_digest
from omx.models.store import BlobNotFound, ModelNotFound, Store
from omx.models.transfer import (
    BudgetExceeded,
    Fetcher,
    PullPlan,
    Source,
    TransferError,
    UseRecord,
    make_room,
    missing_bytes,
    pull_model,
)
from omx.node.app import CONFIG, RUNNERS, STORE, json_response, respond_progress
from omx.node.cluster import Cluster
from omx.node.cluster_routes import CLUSTER
from omx.node.config import NodeConfig
from omx.node.router import model_key
from omx.protocols.api import ApiError, ModelRef

log = logging.getLogger("omx.distribution")

ADVERTISE_EVERY = 0.5  # seconds between updates of the gossip `fetching` figures
MAX_ADVERTISED = 4  # models whose progress gossip carries (metadata is small)
MAX_NAME = 64
PEER_TIMEOUT = 5.0  # seconds for a peer to answer a manifest request
MIN_SEEDERS = 3  # fewer advertised holders than this: ask every alive member (up to MAX_ASKED)
MAX_ASKED = 32


class Distribution:
    """The node's fetcher (shared transfers, bandwidth limit, bad-source memory), LRU use record, and the
    models it is fetching now with their progress (advertised in gossip as `fetching`, for operators)."""

    def __init__(self, cfg: NodeConfig, store: Store) -> None:
        self.cfg = cfg
        self.store = store
        self.fetcher = Fetcher(store, rate_limit=cfg.bandwidth_limit)
        self.uses = UseRecord(store)
        self.fetching: dict[str, list[int]] = {}  # model key -> [bytes completed, bytes total]
        self._advertised_at = 0.0

    def advertise(self, cluster: Cluster | None, now: float, force: bool = False) -> None:
        """Put the fetching figures into this node's gossip metadata, at most every ADVERTISE_EVERY s."""
        if cluster is None or (not force and now - self._advertised_at < ADVERTISE_EVERY):
            return
        self._advertised_at = now
        items = sorted(self.fetching.items())[:MAX_ADVERTISED]
        cluster.extra_meta["fetching"] = {k[:MAX_NAME]: list(v) for k, v in items}
        cluster.publish_meta()

    async def close(self) -> None:
        await self.fetcher.close()


DIST = web.AppKey("distribution", Distribution)


async def _tracked(app: web.Application, name: ModelName, plan: PullPlan,
                   lines: AsyncGenerator[dict[str, Any], None]) -> AsyncIterator[dict[str, Any]]:
    """Pass a pull's progress lines through, keeping the node's `fetching` figure for the model current."""
    dist, cluster = app[DIST], app.get(CLUSTER)
    key = model_key(name.display_shortest())
    done: dict[str, int] = {}
    total = sum(plan.sizes().values())
    try:  # the entry goes in the finally's reach: one left behind is gossiped forever
        dist.fetching[key] = [0, total]
        dist.advertise(cluster, time.monotonic(), force=True)
        async with contextlib.aclosing(lines):
            async for line in lines:
                if "digest" in line and "total" in line:
                    done[str(line["digest"])] = int(line.get("completed") or 0)
                    dist.fetching[key] = [min(total, sum(done.values())), total]
                    dist.advertise(cluster, time.monotonic())
                yield line
    finally:
        dist.fetching.pop(key, None)
        dist.advertise(cluster, time.monotonic(), force=True)


# ---- peer routes -----------------------------------------------------------------------------------

def _check_peer(request: web.Request) -> None:
    if request.app[CONFIG].allow_anonymous_blobs:
        return
    cluster = request.app.get(CLUSTER)
    if cluster is None:
        raise ApiError(403, "model data is only served to cluster members")
    cluster.check_internal_auth(request.headers.get("Authorization"))


def _name(raw: str | None) -> ModelName:
    if not raw:
        raise ApiError(400, "model is required")
    try:
        return ModelName.parse(raw)
    except InvalidModelName:
        raise ApiError(400, "invalid model name") from None


async def peer_manifest(request: web.Request) -> web.Response:
    """`GET /api/v1/internal/manifests?model=NAME`: the manifest bytes exactly as stored."""
    _check_peer(request)
    name = _name(request.query.get("model"))
    try:
        data = await asyncio.to_thread(request.app[STORE].manifest_bytes, name)
    except ModelNotFound:
        raise ApiError(404, f"model '{name.display_shortest()}' not found") from None
    return web.Response(body=data, content_type=MEDIA_TYPE_MANIFEST,
                        headers={"Docker-Content-Digest": "sha256:" + hashlib.sha256(data).hexdigest()})


async def peer_blob(request: web.Request) -> web.StreamResponse:
    """`GET|HEAD /api/v1/internal/blobs/sha256:<hex>`, with Range, sent with sendfile(2)."""
    _check_peer(request)
    try:
        hexd = parse_digest(request.match_info["digest"])
    except ValueError:
        raise ApiError(400, "invalid digest format") from None
    store = request.app[STORE]
    try:
        f = await asyncio.to_thread(open, store.blob_path(hexd), "rb")
    except FileNotFoundError:
        raise ApiError(404, f'blob "sha256:{hexd}" not found') from None
    try:
        return await send_file(request, f)
    finally:
        f.close()


_SEND_PIECE = 1 << 20
_SNDBUF = 4 << 20  # the usual net.core.wmem_max; the kernel doubles it
_SEND_STALL_S = 60.0  # a receiver that takes nothing for this long is gone


async def send_file(request: web.Request, f: BinaryIO) -> web.StreamResponse:
    """Answer GET/HEAD with the file, or the one byte range asked for, zero-copy with sendfile(2) from a thread.

    aiohttp's FileResponse cannot use sendfile under uvloop (its loop has no `sendfile`) and falls back to
    read() + write() of 1 MiB pieces through the event loop: two extra copies and Python work per MiB, which
    on a busy node costs the seeder more CPU than the receiver spends on sha256.
    """
    size = os.fstat(f.fileno()).st_size
    headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
    try:
        rng = request.http_range
    except ValueError:  # malformed, or several ranges: not something a peer asks for
        rng = slice(size, None)
    ranged = rng.start is not None or rng.stop is not None
    start, end = 0, size
    if ranged:
        start = max(0, size + rng.start) if rng.start is not None and rng.start < 0 else rng.start or 0
        end = size if rng.stop is None else min(rng.stop, size)
        if start >= end:
            headers["Content-Range"] = f"bytes */{size}"
            return web.Response(status=416, headers=headers)
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    resp = web.StreamResponse(status=206 if ranged else 200, headers=headers)
    resp.content_length = end - start
    await resp.prepare(request)
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if request.method == "HEAD" or end == start:
        pass
    elif (sock is None or transport is None or transport.get_extra_info("sslcontext") is not None
          or transport.get_write_buffer_size()):  # no plain socket, or headers still queued ahead of the body
        for off in range(start, end, _SEND_PIECE):
            await resp.write(await asyncio.to_thread(os.pread, f.fileno(), min(_SEND_PIECE, end - off), off))
    else:
        out = os.dup(sock.fileno())  # ours: the transport may close its fd while the thread still sends
        with contextlib.suppress(OSError):
            # the autotuned buffer starts at 16 KiB: sendfile then wakes for every sliver the receiver takes
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
        stop = threading.Event()
        try:
            await asyncio.to_thread(_sendfile, out, f.fileno(), start, end - start, stop)
        except OSError as e:  # the receiver went away (or stalled): a disconnect, not a server error
            raise ConnectionResetError(f"blob send ended: {e}") from None
        finally:
            stop.set()  # cancelled: the thread gives up at its next wait
            os.close(out)
    await resp.write_eof()
    return resp


def _sendfile(out: int, src: int, offset: int, count: int, stop: threading.Event) -> None:
    """Blocking sendfile of `count` bytes into a non-blocking socket, waiting with poll() when it is full."""
    poller = select.poll()
    poller.register(out, select.POLLOUT)
    idle = 0.0
    while count > 0:
        try:
            sent = os.sendfile(out, src, offset, count)
        except BlockingIOError:
            sent = -1
        if sent == 0:
            raise OSError(f"file ended {count} bytes early")
        if sent > 0:
            offset += sent
            count -= sent
            idle = 0.0
            continue
        if stop.is_set():
            raise ConnectionResetError("response abandoned")
        if not poller.poll(1000):
            idle += 1.0
            if idle >= _SEND_STALL_S:
                raise TimeoutError("receiver stalled")


async def put_manifest(request: web.Request) -> web.Response:
    """`PUT /api/v1/manifests?model=NAME`: install manifest bytes verbatim once every blob is uploaded
    (`omx model import` keeps digests unchanged this way)."""
    name = _name(request.query.get("model"))
    data = await request.read()
    store = request.app[STORE]
    try:
        digest = await asyncio.to_thread(store.write_manifest, name, data)
    except InvalidManifest as e:
        raise ApiError(400, str(e)) from None
    except BlobNotFound as e:
        raise ApiError(400, f"manifest refers to a missing blob {e.digest}: upload it to /api/blobs first") from None
    _store_changed(request.app)
    return json_response({"model": name.display_shortest(), "digest": digest})


# ---- pull ------------------------------------------------------------------------------------------

def _store_changed(app: web.Application) -> None:
    cluster = app.get(CLUSTER)
    notify = getattr(cluster, "store_changed", None)
    if notify is not None:
        notify()


def _auth_headers(cluster: Cluster) -> dict[str, str]:
    return {"Authorization": f"Bearer {cluster.http_token}"}


async def peer_plan(app: web.Application, name: ModelName) -> PullPlan | None:
    """The model as the cluster holds it: the manifest most holders agree on, and those holders as sources."""
    cluster = app.get(CLUSTER)
    if cluster is None or cluster.swim is None:
        return None
    short = name.display_shortest()
    alive: list[tuple[str, str]] = []
    candidates: list[tuple[str, str]] = []
    for m in cluster.swim.members():
        meta = m.meta or {}
        if m.id == cluster.id or m.state != "alive" or not meta.get("api"):
            continue
        alive.append((m.id, str(meta["api"]).rstrip("/")))
        have = meta.get("have")
        if have is None or short in have:
            candidates.append(alive[-1])
    # `have` lags a store change by up to a refresh period: with few advertised holders, ask everyone
    if len(candidates) < MIN_SEEDERS:
        candidates = alive[:MAX_ASKED]
    if not candidates:
        return None
    headers = _auth_headers(cluster)
    session = app[DIST].fetcher.session()

    async def ask(api: str) -> bytes | None:
        try:
            async with session.get(f"{api}/api/v1/internal/manifests", params={"model": str(name)},
                                   headers=headers, timeout=aiohttp.ClientTimeout(total=PEER_TIMEOUT)) as r:
                return await r.read() if r.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None

    answers = await asyncio.gather(*(ask(api) for _, api in candidates))
    by_digest: dict[str, bytes] = {}
    votes: Counter[str] = Counter()
    holders: dict[str, list[Source]] = {}
    for (mid, api), data in zip(candidates, answers, strict=True):
        if data is None:
            continue
        d = hashlib.sha256(data).hexdigest()
        by_digest[d] = data
        votes[d] += 1
        holders.setdefault(d, []).append(Source(id=mid, blob_prefix=f"{api}/api/v1/internal/blobs/",
                                                headers=headers))
    if not votes:
        return None
    best = votes.most_common(1)[0][0]
    try:
        return PullPlan(name, by_digest[best], holders[best])
    except InvalidManifest as e:
        log.warning("peers sent an invalid manifest for %s: %s", short, e)
        return None


async def protected_models(app: web.Application) -> set[ModelName]:
    """Models eviction must keep: loaded here, or placed on this node by the scheduler."""
    names: set[ModelName] = set()
    for r in app[RUNNERS].runners.values():
        n = ModelName.try_parse(r.spec.name)
        if n is not None:
            names.add(n)
    cluster = app.get(CLUSTER)
    if cluster is not None and cluster.swim is not None:
        with contextlib.suppress(Exception):
            reg = await asyncio.wait_for(cluster.registry_read(), 5.0)
            for model, nodes in ((reg.get("state") or {}).get("placements") or {}).items():
                n = ModelName.try_parse(model)
                if n is not None and cluster.id in (nodes or []):
                    names.add(n)
    return names


async def plan_pull(app: web.Application, name: ModelName, insecure: bool) -> PullPlan:
    """Peers first, then the registries; raises ApiError (the response has not started yet)."""
    plan = await peer_plan(app, name)
    if plan is not None:
        return plan
    cfg = app[CONFIG]
    try:
        client, data = await oci.resolve(app[DIST].fetcher.session(), name, cfg.registries, insecure)
    except oci.RegistryError as e:
        raise ApiError(e.status if 400 <= e.status < 600 else 502, str(e)) from None
    except InvalidManifest as e:
        raise ApiError(502, f"pull model manifest: {e}") from None
    return PullPlan(name, data, [client.source()])


async def reserve_space(app: web.Application, plan: PullPlan) -> None:
    """Budget and free-disk check before any byte is written (evicting LRU models if allowed)."""
    store, dist, cfg = app[STORE], app[DIST], app[CONFIG]
    if sum(plan.sizes().values()) >= 1 << 63:
        raise ApiError(502, "pull model manifest: it declares more than 8 EiB of blobs")
    try:
        await asyncio.to_thread(store.check_sizes, plan.manifest)
    except InvalidManifest as e:
        raise ApiError(502, f"pull model manifest: {e}") from None
    need = await asyncio.to_thread(missing_bytes, store, plan.sizes())
    if need == 0:
        return
    protected = await protected_models(app) | {plan.name}
    keep = set(plan.sizes()) | set(dist.fetcher._inflight)
    try:
        evicted = await asyncio.to_thread(make_room, store, need, budget=cfg.disk_budget, protected=protected,
                                          uses=dist.uses, keep_partials=keep)
    except BudgetExceeded as e:
        raise ApiError(507, str(e)) from None
    if evicted:
        _store_changed(app)


async def pull(app: web.Application, name: ModelName, insecure: bool = False) -> AsyncIterator[dict[str, Any]]:
    """Ollama's pull progress for one model; errors before the first line raise ApiError, later ones are lines."""
    plan = await plan_pull(app, name, insecure)
    await reserve_space(app, plan)
    yield {"status": "pulling manifest"}
    try:
        async for line in _tracked(app, name, plan, pull_model(app[STORE], app[DIST].fetcher, plan, app[DIST].uses)):
            if line.get("status") == "success":
                _store_changed(app)
            yield line
    except TransferError as e:
        yield {"error": str(e)}
    except InvalidManifest as e:  # verified bytes, but not a model: nothing is written under the name
        yield {"error": f"pull model manifest: {e}"}


async def replicate(app: web.Application, name: ModelName | str) -> None:
    """Fetch a model from the peers that hold it, without progress (for placements); raises ApiError."""
    n = name if isinstance(name, ModelName) else _name(name)
    plan = await peer_plan(app, n)
    if plan is None:
        raise ApiError(404, f"no peer holds model '{n.display_shortest()}'")
    await reserve_space(app, plan)
    try:
        async for _ in _tracked(app, n, plan, pull_model(app[STORE], app[DIST].fetcher, plan, app[DIST].uses)):
            pass
    except (TransferError, InvalidManifest) as e:
        raise ApiError(502, str(e)) from None
    _store_changed(app)


def touch_model(app: web.Application, name: ModelName | str) -> None:
    """Record a use (for LRU eviction); the inference path calls this when it loads a model."""
    with contextlib.suppress(Exception):
        app[DIST].uses.touch(name)


async def api_pull(request: web.Request) -> web.StreamResponse:
    req = ModelRef.parse(await request.read())
    name = _name(req.ref)
    return await respond_progress(request, pull(request.app, name, req.insecure), req.stream is not False)


# ---- push ------------------------------------------------------------------------------------------

async def push(app: web.Application, name: ModelName, insecure: bool) -> AsyncIterator[dict[str, Any]]:
    store = app[STORE]
    if not await asyncio.to_thread(store.exists, name):
        raise ApiError(404, f"model '{name.display_shortest()}' not found")
    try:
        base = oci.registry_bases(name, app[CONFIG].registries, insecure)[0]
    except oci.RegistryError as e:
        raise ApiError(e.status or 400, str(e)) from None
    client = oci.RegistryClient(app[DIST].fetcher.session(), base, name)
    try:
        async for line in client.push(store):
            yield line
    except (TransferError, ModelNotFound, BlobNotFound, InvalidManifest) as e:
        yield {"error": str(e)}


async def api_push(request: web.Request) -> web.StreamResponse:
    req = ModelRef.parse(await request.read())
    name = _name(req.ref)
    return await respond_progress(request, push(request.app, name, req.insecure), req.stream is not False)


# ---- wiring ----------------------------------------------------------------------------------------

async def _dist_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[DIST].close()


def add_distribution_routes(app: web.Application) -> None:
    app[DIST] = Distribution(app[CONFIG], app[STORE])
    r = app.router
    r.add_post("/api/pull", api_pull)
    r.add_post("/api/push", api_push)
    r.add_get("/api/v1/internal/manifests", peer_manifest)
    r.add_get("/api/v1/internal/blobs/{digest}", peer_blob)  # add_get answers HEAD too
    r.add_put("/api/v1/manifests", put_manifest)
    app.cleanup_ctx.append(_dist_ctx)
