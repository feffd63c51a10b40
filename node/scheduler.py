"""Replica placement: the region's Raft leader decides where models run; every node enacts its share.

The leader reconciles desired replicas (registry catalog) against what it can use now: live members of its
region that hold the model, are not cordoned or draining, and have the memory for it, spreading replicas over
the least-placed nodes. It decides from one snapshot per round and writes with compare-and-set, so a round
that raced another leader's write is simply redone. Each node loads (pinned) what is placed on it and
unloads what no longer is once its in-flight requests have finished: that is how a drain completes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from omx.models.store import ModelNotFound
from omx.node.cluster import Cluster
from omx.node.config import NodeConfig
from omx.node.events import EventBus
from omx.node.inference import Inference
from omx.node.router import model_key
from omx.protocols.api import ApiError

log = logging.getLogger("omx.scheduler")

SELECTOR_PREFIX = "placement.selector."  # registry setting per model: node labels its replicas require
MEMORY_HEADROOM = 1.2  # weights plus KV cache and activations, as a factor of the model's size on disk


def place(snapshot: dict[str, Any], members: list[dict[str, Any]], region: str) -> dict[str, list[str]]:
    """New placements for the models whose placement should change (pure: easy to test at any scale).

    `members` are gossip views: {"id", "state", "meta"}; a node is eligible for a model when it is alive in
    `region`, not cordoned or draining in the registry, has the memory for it (or runs it already) and has
    not failed to load it. Nodes that hold the model come first; others fetch it from a holder (peer to
    peer) when placed, so a model survives the loss of every node that had it loaded."""
    nodes = snapshot.get("nodes", {})
    placements: dict[str, list[str]] = snapshot.get("placements", {})
    alive = {}
    for m in members:
        meta = m.get("meta") or {}
        rec = nodes.get(m["id"], {})
        if m.get("state") != "alive" or meta.get("region") != region or m["id"] not in nodes:
            continue
        if rec.get("cordoned") or rec.get("draining") or meta.get("cordoned") or meta.get("draining"):
            continue
        alive[m["id"]] = meta
    load = Counter(n for ns in placements.values() for n in ns if n in alive)
    changes: dict[str, list[str]] = {}
    settings = snapshot.get("settings", {})
    for key in sorted(snapshot.get("models", {})):
        rec = snapshot["models"][key]
        desired = int(rec.get("desired_replicas", 0))
        selector = settings.get(SELECTOR_PREFIX + key) or {}
        need = int(rec.get("size", 0)) * MEMORY_HEADROOM
        current = list(placements.get(key, []))
        held = any(key in ((m.get("meta") or {}).get("have") or []) for m in members if m.get("state") == "alive")

        def fits(nid: str, key: str = key, need: float = need, held: bool = held,
                 selector: dict[str, str] = selector) -> bool:
            meta = alive[nid]
            if key in (meta.get("load_failed") or []):
                return False
            labels = nodes.get(nid, {}).get("labels") or {}
            if any(labels.get(k) != v for k, v in selector.items()):
                return False
            if key not in (meta.get("have") or []) and not held:
                return False
            avail = int(meta.get("mem_avail") or 0)
            return avail == 0 or avail >= need or key in (meta.get("models") or [])

        keep = [n for n in current if n in alive and fits(n)][:desired]
        if len(keep) < desired:
            spare = sorted((n for n in alive if n not in keep and fits(n)),
                           key=lambda n: (key not in (alive[n].get("have") or []), load[n],
                                          -int(alive[n].get("mem_avail") or 0), n))
            for n in spare[: desired - len(keep)]:
                keep.append(n)
                load[n] += 1
        if keep != current:
            changes[key] = keep
    return changes


class Scheduler:
    def __init__(self, cfg: NodeConfig, cluster: Cluster, infer: Inference, events: EventBus,
                 fetch: Callable[[str], Awaitable[None]] | None = None) -> None:
        self.cfg = cfg
        self.cluster = cluster
        self.infer = infer
        self.fetch = fetch  # pulls a model from peers (omx.node.distribution.replicate)
        self.events = events
        self._pinned: set[str] = set()  # model keys this node loaded because they are placed here
        self._loading: dict[str, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._unsatisfied: dict[str, int] = {}

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="scheduler")

    async def stop(self) -> None:
        tasks = [t for t in [self._task, *self._loading.values()] if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.scheduler_interval)
            try:
                reg = self.cluster.registry
                if reg is not None and reg.is_leader and self.cluster.swim is not None:
                    await self.reconcile()
                await self.enact()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scheduler round failed")

    async def reconcile(self) -> None:
        """Leader duty: one snapshot, one decision per model, compare-and-set writes."""
        reg = self.cluster.registry
        assert reg is not None and self.cluster.swim is not None
        snap = reg.snapshot()
        members = [{"id": m.id, "state": m.state, "meta": m.meta or {}} for m in self.cluster.swim.members()]
        for key, nodes in place(snap, members, self.cfg.region).items():
            version = snap.get("placement_versions", {}).get(key, 0)
            res = await reg.write("set_placement", key, nodes, version)
            if not res.ok:
                log.info("placement of %s not written (%s); next round decides again", key, res.message)
                continue
            before = snap.get("placements", {}).get(key, [])
            log.info("placed %s on %s (was %s)", key, nodes, before)
            self.events.publish("scheduler.placed", model=key, nodes=nodes, previous=before)
        for key, rec in snap.get("models", {}).items():
            desired = int(rec.get("desired_replicas", 0))
            have = len(snap.get("placements", {}).get(key, []))
            short = max(0, desired - have)
            if short and self._unsatisfied.get(key) != short:
                self.events.publish("scheduler.unsatisfied", model=key, desired=desired, placed=have)
            self._unsatisfied[key] = short

    async def enact(self) -> None:
        """Every node: load what is placed here (pinned), release what is no longer placed here."""
        placements = self.cluster.reg.get("placements", {})
        mine = {key for key, nodes in placements.items() if self.cluster.id in nodes}
        for key in mine:
            if self._loaded(key):
                self._pinned.add(key)
                continue
            if key in self._loading:
                continue
            self._loading[key] = asyncio.create_task(self._load(key), name=f"place-{key}")
        for key in list(self._pinned - mine):
            self._pinned.discard(key)
            await self._release(key)

    def _loaded(self, key: str) -> bool:
        return any(model_key(r.spec.name) == key for r in self.infer.runners.live())

    async def _load(self, key: str) -> None:
        try:
            if self.fetch is not None and not self.infer.store.exists(key):
                log.info("fetching placed model %s from peers", key)
                await self.fetch(key)
            m = self.infer.resolve(key)
            spec = self.infer.load_spec(m)
            runner, secs = await self.infer.runners.acquire(spec)
            self.infer.runners.release(runner, math.inf)
            self._pinned.add(key)
            log.info("loaded placed replica of %s in %.1fs", key, secs)
            self.events.publish("scheduler.replica_ready", model=key, node=self.cluster.id, load_s=round(secs, 2))
        except (ApiError, ModelNotFound) as e:
            log.warning("cannot load placed model %s: %s", key, getattr(e, "message", e))
            self._failed(key, str(getattr(e, "message", e)))
        except Exception as e:
            log.exception("loading placed model %s failed", key)
            self._failed(key, type(e).__name__)
        finally:
            self._loading.pop(key, None)

    def _failed(self, key: str, why: str) -> None:
        """Tell the leader (through gossip) not to place this model here again until this node restarts."""
        failed = self.cluster.extra_meta.get("load_failed", [])
        if key not in failed:  # a new list: gossip compares metadata by value against the last one sent
            self.cluster.extra_meta["load_failed"] = [*failed, key]
        self.events.publish("scheduler.load_failed", model=key, node=self.cluster.id, reason=why)

    async def _release(self, key: str) -> None:
        """No longer placed here: unload after the in-flight requests finish (a drain loses nothing)."""
        for r in list(self.infer.runners.runners.values()):
            if model_key(r.spec.name) == key:
                await self.infer.runners.unload_key(r.spec.key)
                self.events.publish("scheduler.replica_released", model=key, node=self.cluster.id)


SCHEDULER = web.AppKey("scheduler", Scheduler)
