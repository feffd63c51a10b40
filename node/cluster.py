"""The node's place in the cluster: SWIM membership, the region's Raft registry, and the glue between them.

Membership is eventually consistent and says who is alive; the registry is strongly consistent and
holds what operators decided (cordon, drain, removal) and what the leader concluded from
membership (a node SWIM declared dead is marked dead). Only the region's Raft leader writes
membership conclusions, so two nodes never race to record the same fact.

Voters change at runtime: a fresh control node joins gossip first, checks that its settings agree with
the cluster's, then advertises its Raft address as "joining", and opens its registry only once the
region's leader has added it (with the full voter set the leader advertises as its partners; pysyncobj
voters refuse Raft connections from outside their set). The leader adds one such node at a time, and
only while the voters that are up can commit the change without it. `omx node remove` of a control node
drops its address from the voters.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import shutil
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

from omx.models.store import Store
from omx.node.config import NodeConfig
from omx.node.events import EventBus
from omx.node.identity import node_id
from omx.node.runners import RunnerManager
from omx.protocols.api import ApiError
from omx.protocols.clusterkey import ClusterKeyError, derive, generate_key_file, read_key_file
from omx.protocols.registry import (
    Registry,
    RegistryConfig,
    RegistryError,
    RegistryMembershipError,
    RegistryNotLeader,
    RegistryUnavailable,
)
from omx.protocols.swim import JoinError, Member, MemberEvent, SwimConfig, SwimNode

log = logging.getLogger("omx.cluster")

META_REFRESH = 1.0  # seconds between metadata refreshes (load counters, loaded models, raft role)
HOLDS_TTL = 1.0  # seconds a "do we hold this model" answer is reused for routing
HAVE_BUDGET = 900  # bytes of model names a node advertises in gossip (metadata is capped at 2 KB)
MAX_VOTERS = 5  # Raft voters per region (3 or 5 is the usual choice; each one more slows every write)
VOTER_SEAT_TIMEOUT = 60.0  # seconds a fresh control node waits for the region's leader to add it
BOOTSTRAP_SETTLE = 2.0  # seconds of gossip without any running voter before a fresh node forms the group


def _remembered_port(path: Path, host: str) -> int:
    """A free port picked once and kept, so a restarted single voter finds its journal under the same address."""
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        pass
    with socket.socket() as s:
        s.bind((host, 0))
        port = int(s.getsockname()[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(str(port))
    return port


def _check_port_free(host: str, port: int) -> None:
    """Fail before asking for a Raft seat (a voter that is seated and then cannot listen is a vote lost) and before
    the Raft dir is claimed for this address."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as pysyncobj binds it
        try:
            s.bind((host, port))
        except OSError as e:
            raise ClusterStartError(f"cannot listen for Raft on {host}:{port}: {e.strerror or e}") from None


def _meminfo(field: str) -> int:
    """Bytes from /proc/meminfo (MemAvailable: what new models can use; MemTotal); 0 when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


_MEM_TOTAL = _meminfo("MemTotal")
MIB = 1 << 20
GPU_QUERY = ("--query-gpu=memory.used,memory.total,utilization.gpu", "--format=csv,noheader,nounits")
GPU_EVERY = 10.0  # seconds between GPU probes (nvidia-smi costs tens of ms)
MAX_GPUS = 16  # gossip metadata carries at most this many


def parse_gpus(out: str) -> list[list[int]]:
    """[used MiB, total MiB, utilization %] per GPU from nvidia-smi's GPU_QUERY output; odd lines skipped.

    Compact lists, not objects: they ride in every gossip packet that carries this node's metadata.
    Utilization is -1 where the driver reports none ([N/A], e.g. on MIG slices).
    """
    gpus: list[list[int]] = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3:
            continue
        try:
            used, total = int(float(parts[0])), int(float(parts[1]))
        except ValueError:
            continue
        try:
            util = int(float(parts[2]))
        except ValueError:
            util = -1
        if 0 <= used <= total:
            gpus.append([used, total, util])
    return gpus[:MAX_GPUS]


async def probe_gpus(limit_s: float = 5.0) -> list[list[int]]:
    """This machine's NVIDIA GPUs as parse_gpus gives them; [] without nvidia-smi or when it fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        proc = await asyncio.create_subprocess_exec(exe, *GPU_QUERY, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.DEVNULL)
    except OSError as e:
        log.warning("cannot run %s: %s", exe, e)
        return []
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), limit_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        log.warning("nvidia-smi did not answer in %.0f s; GPU figures left out", limit_s)
        return []
    return parse_gpus(out.decode(errors="replace")) if proc.returncode == 0 else []


def gpu_view(meta: dict[str, Any]) -> list[dict[str, int | None]]:
    """A member's GPUs from its gossip metadata, in bytes, for the cluster view."""
    out: list[dict[str, int | None]] = []
    for g in meta.get("gpu") or []:
        if isinstance(g, list) and len(g) == 3 and all(isinstance(x, int) for x in g):
            out.append({"memory_used": g[0] * MIB, "memory_total": g[1] * MIB,
                        "utilization": g[2] if g[2] >= 0 else None})
    return out


class ClusterStartError(Exception):
    """The node cannot take its place in the cluster; the message is for the operator."""


def load_cluster_key(cfg: NodeConfig) -> bytes:
    """The configured key file; a standalone node with none makes its own (joining needs the shared one)."""
    path = cfg.cluster_key_file
    if path is None:
        if cfg.join:
            raise ClusterStartError("joining a cluster needs its key: pass --cluster-key-file FILE (the same file "
                                    "every member uses)")
        path = cfg.data_dir / "cluster.key"
        if not path.exists():
            generate_key_file(path)
    try:
        return read_key_file(Path(path))
    except ClusterKeyError as e:
        raise ClusterStartError(str(e)) from None


class Cluster:
    """Owns the SwimNode and (on control nodes) the Registry; exposes views for the HTTP API."""

    def __init__(self, cfg: NodeConfig, events: EventBus, runners: RunnerManager, store: Store) -> None:
        self.cfg = cfg
        self.events = events
        self.runners = runners
        self.store = store
        # The region's registry as last read: control nodes copy their replica, workers poll a control node.
        # Routing and placement decide from this snapshot; writes still go through Raft.
        self.reg: dict[str, Any] = {}
        self.extra_meta: dict[str, Any] = {}  # other components' gossip fields (the scheduler's load failures)
        self._have: list[str] = []
        self._holds: dict[str, tuple[bool, float]] = {}  # model name as asked -> (in our store, when checked)
        self._have_at = 0.0
        self.id = node_id(cfg.data_dir)
        self.key = load_cluster_key(cfg)
        self.http_token = derive(self.key, "internal http").hex()
        self.swim: SwimNode | None = None
        self.registry: Registry | None = None
        self.api_url = ""
        self.raft_addr: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._last_leader: str | None = None
        self._last_voters: set[str] | None = None
        self._add_refused: set[str] = set()  # raft addresses already reported as "can't add now"
        self._voter_gone_since: dict[str, float] = {}  # leader's view: voter address -> first seen dead
        # Node id -> Raft address of our region's control nodes as gossip showed them: outlives SWIM reaping a
        # dead member (60 s on a LAN), so `omx node remove` can still drop the vote of a node gone long ago.
        self._raft_addrs: dict[str, str] = {}
        self._left = False
        # A fresh control node asks the leader for a Raft seat (advertises "joining") only once its config
        # checked out: a node that is about to refuse to run must never become a voter nobody can reach.
        self._seat_wanted = False

    # ---- lifetime -----------------------------------------------------------------------------
    async def start(self, api_url: str) -> None:
        cfg = self.cfg
        self.api_url = api_url
        host = cfg.advertise_host
        seeds = list(dict.fromkeys([*cfg.join, *self._remembered_peers()]))
        joining = False
        if cfg.role == "control":
            raft_port = cfg.raft_port
            if raft_port == 0:
                if cfg.raft_peers:
                    raise ClusterStartError("--raft-port 0 only works for a single voter: its peers need to know it")
                raft_port = _remembered_port(cfg.data_dir / "raft_port", cfg.host)
            self.raft_addr = f"{host}:{raft_port}"
            # A fresh voter with somewhere to join learns the region's voter set (and its seat) from gossip first.
            joining = bool(seeds) and not (cfg.data_dir / "raft" / "raft.journal").exists()
            # One clear line, before a seat is asked for or the Raft dir records this address as its owner
            # (a retry on another port would then be refused).
            _check_port_free(cfg.host, raft_port)
            if not joining:
                await self._open_registry(list(cfg.raft_peers))
        await asyncio.to_thread(self._scan_store)
        await self._read_registry()
        profile = SwimConfig.local() if cfg.gossip_profile == "local" else SwimConfig.lan()
        if cfg.suspicion_mult:
            profile = dataclasses.replace(profile, suspicion_mult=cfg.suspicion_mult)
        self.swim = SwimNode(self.id, bind_host=cfg.host, bind_port=cfg.gossip_port, key=derive(self.key, "gossip"),
                             meta=self._meta(), config=profile, advertise_host=host, on_event=self._on_member)
        try:
            await self.swim.start()
        except OSError as e:
            raise ClusterStartError(f"cannot listen for gossip on {cfg.host}:{cfg.gossip_port}: "
                                    f"{e.strerror or e}") from None
        if seeds:
            await self._join_with_retry(seeds, explicit=bool(cfg.join))
            self._check_config_matches()
        if joining:
            self._seat_wanted = True
            self.publish_meta()
            await self._open_registry(await self._await_voter_seat())
            await self._read_registry()
            self.publish_meta()
        self._tasks.append(asyncio.create_task(self._refresh_loop(), name="cluster-refresh"))
        if shutil.which("nvidia-smi"):
            self._tasks.append(asyncio.create_task(self._gpu_loop(), name="cluster-gpus"))

    async def _open_registry(self, partners: list[str]) -> None:
        assert self.raft_addr is not None
        cfg = self.cfg
        port = self.raft_addr.rpartition(":")[2]
        try:
            self.registry = await Registry.open(
                RegistryConfig(self_addr=self.raft_addr, partners=tuple(partners), data_dir=cfg.data_dir / "raft",
                               password=derive(self.key, "raft").hex(), bind_addr=f"{cfg.host}:{port}"),
                on_change=self._on_registry_change_threadsafe(asyncio.get_running_loop()),
            )
        except RegistryError as e:
            raise ClusterStartError(f"cannot start the registry on {self.raft_addr}: {e}") from None

    def _advertised_voters(self) -> list[tuple[bool, int, list[str]]]:
        """(is leader, term, voter set) as each running voter of our region advertises it in gossip."""
        assert self.swim is not None
        out: list[tuple[bool, int, list[str]]] = []
        for m in self.swim.members():
            meta = m.meta or {}
            raft = meta.get("raft") or {}
            voters = raft.get("voters")
            if m.id == self.id or m.state != "alive" or meta.get("region") != self.cfg.region \
                    or meta.get("role") != "control" or not isinstance(voters, list):
                continue
            out.append((raft.get("state") == "leader", int(raft.get("term") or 0), [v for v in voters
                                                                                   if isinstance(v, str)]))
        return sorted(out, key=lambda t: (t[0], t[1]), reverse=True)

    def _voters_missing(self, voters: list[str]) -> bool:
        """Whether a voter of `voters` is not alive in gossip (the leader may give its seat away)."""
        assert self.swim is not None
        living = self._raft_addrs_in("alive")
        return self.cfg.replace_dead_voters_after > 0 and any(v not in living for v in voters)

    def _raft_addrs_in(self, *states: str) -> set[object]:
        """The Raft addresses advertised by gossip members in one of these states."""
        assert self.swim is not None
        return {((m.meta or {}).get("raft") or {}).get("addr") for m in self.swim.members() if m.state in states}

    async def _await_voter_seat(self) -> list[str]:
        """Partners for a fresh voter: the region's voter set once it holds us (the leader adds us).

        With no running voter in sight, the region is being formed: use --raft-peers as configured.
        """
        assert self.raft_addr is not None
        start = time.monotonic()
        while True:
            sets = self._advertised_voters()
            leader_sets = [v for is_leader, _, v in sets if is_leader]
            # The leader's set is authoritative; without a leader (the group is forming) any voter's will do.
            for voters in leader_sets[:1] or [v for _, _, v in sets]:
                if self.raft_addr in voters:
                    self.events.publish("raft.voter_seat", region=self.cfg.region, raft_addr=self.raft_addr,
                                        voters=voters)
                    return [v for v in voters if v != self.raft_addr]
            waited = time.monotonic() - start
            if leader_sets and len(leader_sets[0]) >= MAX_VOTERS and not self._voters_missing(leader_sets[0]):
                raise ClusterStartError(
                    f"region {self.cfg.region!r} has {len(leader_sets[0])} Raft voters already, the most it takes; "
                    "start this node as --role worker (or remove a voter first: omx node remove ID)")
            if not sets and waited > BOOTSTRAP_SETTLE:
                log.info("no voter of region %s runs yet; forming its Raft group from --raft-peers", self.cfg.region)
                return list(self.cfg.raft_peers)
            if waited > VOTER_SEAT_TIMEOUT:
                self._seat_wanted = False  # withdrawn before we go, so the leader does not seat us now
                self.publish_meta()
                current = ", ".join(leader_sets[0] if leader_sets else sorted({a for _, _, v in sets for a in v}))
                raise ClusterStartError(
                    f"the Raft leader of region {self.cfg.region!r} did not add this node ({self.raft_addr}) as a "
                    f"voter within {VOTER_SEAT_TIMEOUT:.0f}s (voters: {current or 'unknown'}). The leader adds a "
                    "control node only while enough current voters are up to commit the change without it, and "
                    "gives a dead voter's seat away only once it was dead for replace_dead_voters_after "
                    f"({self.cfg.replace_dead_voters_after:.0f}s; 0 is never): remove dead voters first "
                    "(omx node remove ID)")
            await asyncio.sleep(0.2)

    async def _gpu_loop(self) -> None:
        """GPU memory and utilization into gossip metadata, for operators and the console (every GPU_EVERY s)."""
        while True:
            try:
                self.extra_meta["gpu"] = await probe_gpus()
            except Exception:
                log.exception("GPU probe failed")
            await asyncio.sleep(GPU_EVERY)

    async def _join_with_retry(self, seeds: list[str], explicit: bool) -> None:
        """Whole-cluster restarts bring nodes up in any order: keep trying until `join_timeout`,
        except when a member answered and refused our key (retrying cannot fix that)."""
        assert self.swim is not None
        deadline = time.monotonic() + self.cfg.join_timeout
        delay = 0.2
        while True:
            try:
                n = await self.swim.join(seeds)
                self.events.publish("node.joined_cluster", peers=seeds, answered=n)
                return
            except JoinError as e:
                if e.key_rejected or time.monotonic() + delay > deadline:
                    if not explicit and not e.key_rejected:
                        log.warning("no remembered peer answered (%s); starting alone", e)
                        return
                    raise ClusterStartError(f"could not join {', '.join(seeds)}: {e}") from None
            except ValueError as e:
                raise ClusterStartError(f"could not join {', '.join(seeds)}: {e}") from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _check_config_matches(self) -> None:
        """Refuse to run with settings that contradict the cluster we joined (one clear line, not a split brain)."""
        assert self.swim is not None
        for m in self.swim.members():
            if m.id == self.id and (m.host, m.port) != (self.swim.advertise_host, self.swim.port) \
                    and m.state in ("alive", "suspect"):
                raise ClusterStartError(f"config mismatch: node id {self.id} is already in use by {m.host}:{m.port} "
                                        f"(was {self.cfg.data_dir} copied from another node?)")
        if self.cfg.role != "control":
            return
        # --raft-peers only has to reach the region's group (the leader adds us); it must not name another
        # region's voters, and must name at least one of ours, or this node would start a second group.
        peers = set(self.cfg.raft_peers)
        region_voters: set[str] = set()
        for m in self.swim.members():
            meta = m.meta or {}
            raft = meta.get("raft") or {}
            if m.id == self.id or m.state != "alive" or meta.get("role") != "control" or not raft.get("addr"):
                continue
            advertised = {raft["addr"], *(raft.get("voters") or [])} if raft.get("state") != "joining" else set()
            if meta.get("region") != self.cfg.region:
                clash = sorted(peers & (advertised | {raft["addr"]}))
                if clash:
                    raise ClusterStartError(
                        f"config mismatch: --raft-peers lists {', '.join(clash)}, a Raft voter of region "
                        f"{meta.get('region')!r}, but this node is in region {self.cfg.region!r}")
                continue
            region_voters |= advertised
        if region_voters and not region_voters & (peers | {self.raft_addr}):
            raise ClusterStartError(
                f"config mismatch: region {self.cfg.region!r} already has Raft voters "
                f"{', '.join(sorted(region_voters))} and --raft-peers ({', '.join(self.cfg.raft_peers) or 'none'}) "
                "lists none of them, so this node "
                "would start a second Raft group; list at least one current voter (the region's leader then adds "
                "this node as a voter), or start it as --role worker")

    def _peers_file(self) -> Path:
        return self.cfg.data_dir / "peers.json"

    def _remembered_peers(self) -> list[str]:
        try:
            peers = json.loads(self._peers_file().read_text())
        except (FileNotFoundError, ValueError):
            return []
        return [p for p in peers if isinstance(p, str)][:32] if isinstance(peers, list) else []

    def _remember_peers(self) -> None:
        """Known members' gossip addresses, so a restarted node can rejoin through any of them."""
        assert self.swim is not None
        peers = sorted(f"{m.host}:{m.port}" for m in self.swim.members() if m.id != self.id and m.state == "alive")
        if peers and peers != self._remembered_peers():
            tmp = self._peers_file().with_suffix(".tmp")
            tmp.write_text(json.dumps(peers))
            os.replace(tmp, self._peers_file())

    async def join(self, peers: list[str]) -> int:
        assert self.swim is not None
        try:
            n = await self.swim.join(peers)
        except JoinError as e:
            raise ClusterStartError(f"could not join {', '.join(peers)}: {e}") from None
        except ValueError as e:
            raise ClusterStartError(f"could not join {', '.join(peers)}: {e}") from None
        self.events.publish("node.joined_cluster", peers=peers, answered=n)
        return n

    async def leave(self) -> None:
        if self.swim is not None and not self._left:
            self._left = True
            with contextlib.suppress(Exception):
                await self.swim.leave()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.leave()
        if self.swim is not None:
            await self.swim.stop()
        if self.registry is not None:
            await self.registry.close()

    # ---- metadata and events --------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        cfg = self.cfg
        raft: dict[str, Any] | None = None
        if self.registry is not None:
            st = self.registry.status()
            raft = {"addr": self.raft_addr, "state": st.get("raft_state"), "leader": st.get("leader"),
                    "term": st.get("term"), "voters": st.get("voters")}
        elif self.raft_addr is not None and self._seat_wanted:  # a fresh control node waiting for its seat
            raft = {"addr": self.raft_addr, "state": "joining", "leader": None, "term": None}
        loaded = sorted(r.spec.name for r in self.runners.live())[:16]
        mine = self.reg.get("nodes", {}).get(self.id, {})
        return {"region": cfg.region, "role": cfg.role, "api": self.api_url, "raft": raft, "models": loaded,
                "have": self._have, "inflight": self.runners.inflight, "queue": self.runners.queued,
                "slots": cfg.num_parallel * cfg.max_loaded_models, "mem_avail": _meminfo("MemAvailable"),
                "mem_total": _MEM_TOTAL,
                "cordoned": bool(mine.get("cordoned")), "draining": bool(mine.get("draining")), **self.extra_meta}

    def _scan_store(self) -> None:
        """Model names in our store, as short as they print, within the gossip budget (routing reads them)."""
        names: list[str] = []
        used = 0
        for e in sorted(self.store.list_models(), key=lambda e: e.modified_at, reverse=True):
            n = e.name.display_shortest()
            if used + len(n) + 3 > HAVE_BUDGET:
                log.warning("store holds more models than gossip metadata can advertise; %s and older are "
                            "not advertised", n)
                break
            names.append(n)
            used += len(n) + 3
        self._have = sorted(names)
        self._have_at = time.monotonic()

    def store_changed(self) -> None:
        """Create/copy/delete/pull call this so peers learn within a second, not at the next rescan."""
        self._have_at = 0.0
        self._holds.clear()

    def holds(self, raw: str) -> bool:
        """Whether our store holds the model, remembered for up to HOLDS_TTL s (cleared by store_changed).

        The router asks on every request, and the store's answer costs a few directory scans (names match
        case-insensitively). A stale answer only moves a request (a local miss fails over to a holder).
        """
        now = time.monotonic()
        hit = self._holds.get(raw)
        if hit is not None and now - hit[1] < HOLDS_TTL:
            return hit[0]
        if len(self._holds) > 4096:
            self._holds.clear()
        held = self.store.exists(raw)
        self._holds[raw] = (held, now)
        return held

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(META_REFRESH)
            try:
                await self._read_registry()
                if time.monotonic() - self._have_at > 10.0:
                    await asyncio.to_thread(self._scan_store)
                self._refresh()
                self._remember_peers()
                if self.registry is not None and self.registry.is_leader:
                    await self._reconcile_membership()
                    await self._reconcile_voters()
                else:
                    self._voter_gone_since.clear()  # a new term as leader starts the clocks afresh
            except Exception:
                log.exception("cluster refresh failed")

    def publish_meta(self) -> None:
        """Gossip our metadata now if it changed (components call this after changing extra_meta)."""
        if self.swim is None:
            return
        meta = self._meta()
        me = self.swim.get(self.id)
        if me is None or dict(me.meta or {}) != meta:
            self.swim.set_meta(meta)

    def _refresh(self) -> None:
        assert self.swim is not None
        self.publish_meta()
        for m in self.swim.members():
            meta = m.meta or {}
            addr = (meta.get("raft") or {}).get("addr")
            if isinstance(addr, str) and meta.get("region") == self.cfg.region and meta.get("role") == "control":
                self._raft_addrs[m.id] = addr
        if self.registry is not None:
            leader = self.registry.status().get("leader")
            if leader != self._last_leader:
                self._last_leader = leader
                self.events.publish("raft.leader", region=self.cfg.region, leader=leader, by=self.id)
            voters = set(self.registry.voters())
            if self._last_voters is not None:
                for addr in sorted(voters - self._last_voters):
                    self.events.publish("raft.voter_added", region=self.cfg.region, raft_addr=addr,
                                        id=self._id_of_raft(addr), by=self.id)
                for addr in sorted(self._last_voters - voters):
                    self.events.publish("raft.voter_removed", region=self.cfg.region, raft_addr=addr,
                                        id=self._id_of_raft(addr), by=self.id)
            self._last_voters = voters

    def _id_of_raft(self, addr: str) -> str | None:
        """The node id that advertises Raft address `addr` in gossip (None if no member does)."""
        assert self.swim is not None
        for m in self.swim.members():
            if ((m.meta or {}).get("raft") or {}).get("addr") == addr:
                return m.id
        return None

    async def _read_registry(self) -> None:
        if self.registry is not None:
            self.reg = self.registry.snapshot()
            return
        if self.swim is None:
            return
        with contextlib.suppress(ApiError):
            self.reg = (await self.registry_read()).get("state", {})

    def _on_member(self, ev: MemberEvent) -> None:
        m = ev.member
        if ev.kind == "meta_updated":
            return  # load counters change every second; the cluster view shows them without an event each
        meta = m.meta or {}
        self.events.publish(f"member.{ev.kind}", id=m.id, address=f"{m.host}:{m.port}",
                            region=meta.get("region"), incarnation=m.incarnation)
        if ev.kind == "dead" and meta.get("role") == "control":
            # It keeps its seat (a partition looks the same) until a control node asks for one: _reconcile_voters.
            raft = meta.get("raft") or {}
            log.warning("Raft voter %s (%s) of region %s is dead; the region keeps quorum only while a majority "
                        "of its voters lives. If it is gone for good, start a replacement control node or run "
                        "omx node remove %s", m.id, raft.get("addr"), meta.get("region"), m.id)
            self.events.publish("raft.voter_down", id=m.id, region=meta.get("region"), raft_addr=raft.get("addr"))

    def _on_registry_change_threadsafe(self, loop: asyncio.AbstractEventLoop) -> Any:
        def on_change(revision: int, kind: str, key: str, value: Any) -> None:
            loop.call_soon_threadsafe(
                lambda: self.events.publish(f"registry.{kind}", revision=revision, key=key, value=value))

        return on_change

    async def _reconcile_membership(self) -> None:
        """Leader duty: record in the registry what membership concluded about this region's nodes."""
        assert self.swim is not None and self.registry is not None
        nodes = self.registry.snapshot().get("nodes", {})
        for m in self.swim.members():
            meta = m.meta or {}
            if meta.get("region") != self.cfg.region:
                continue
            rec = nodes.get(m.id)
            state = m.state if m.state in ("alive", "suspect", "dead", "left") else "alive"
            if rec is None:
                if state in ("alive", "suspect"):
                    await self.registry.write("upsert_node", m.id, {
                        "region": meta.get("region"), "role": meta.get("role"), "api_addr": meta.get("api"),
                        "state": "alive"})
            elif state in ("dead", "left") and rec.get("state") != state:
                await self.registry.write("set_node_fields", m.id, {"state": state})
            elif state == "alive" and rec.get("state") in ("dead", "left"):
                await self.registry.write("set_node_fields", m.id, {"state": "alive"})

    async def _reconcile_voters(self) -> None:
        """Leader duty: make an alive control node of this region a voter, one at a time, when safe.

        pysyncobj switches to the new set as soon as the change is logged, so the change must commit on a
        majority of the new set without the newcomer's help: add only while that many voters are connected.
        """
        assert self.swim is not None and self.registry is not None
        st = self.registry.status()
        voters = set(st.get("voters") or [])
        if not st.get("has_quorum") or not voters:
            self._voter_gone_since.clear()  # a clock kept without quorum (or from an earlier term) proves nothing
            return
        wanting = sorted((m.id, ((m.meta or {}).get("raft") or {}).get("addr")) for m in self.swim.members()
                         if m.state == "alive" and (m.meta or {}).get("region") == self.cfg.region
                         and (m.meta or {}).get("role") == "control")
        wanting = [(nid, addr) for nid, addr in wanting if isinstance(addr, str) and addr not in voters]
        gone = self._dead_voters(st, voters)
        if not wanting:
            return
        nid, addr = wanting[0]
        up = 1 + sum(1 for a, connected in st.get("partners", {}).items() if connected and a in voters)
        need = (len(voters) + 1) // 2 + 1
        if len(voters) >= MAX_VOTERS or up < need:
            if gone:
                await self._replace_dead_voter(gone[0], nid, addr)
                return  # the next round adds the newcomer, against the smaller set
            if self._voter_gone_since and addr not in self._add_refused:
                self._add_refused.add(addr)
                dead, since = min(self._voter_gone_since.items(), key=lambda kv: kv[1])
                wait = self.cfg.replace_dead_voters_after - (time.monotonic() - since)
                log.warning("%s (%s) waits for a Raft seat: voter %s is dead and gives up its seat in %.0f s",
                            nid, addr, dead, max(0.0, wait))
                self.events.publish("raft.voter_add_deferred", region=self.cfg.region, id=nid, raft_addr=addr,
                                    reason="replacing a dead voter", dead_voter=dead, in_s=round(max(0.0, wait), 1))
            if self._voter_gone_since:
                return
        if len(voters) >= MAX_VOTERS:  # more voters only slow every write; the rest serve as non-voters
            if addr not in self._add_refused:
                self._add_refused.add(addr)
                log.warning("not adding %s (%s) as a Raft voter: region %s has %d voters already (the most it "
                            "takes); start it as --role worker", nid, addr, self.cfg.region, len(voters))
                self.events.publish("raft.voter_add_deferred", region=self.cfg.region, id=nid, raft_addr=addr,
                                    voters=len(voters), reason="voter limit")
            return
        if up < need:
            if addr not in self._add_refused:
                self._add_refused.add(addr)
                log.warning("not adding %s (%s) as a Raft voter: only %d of %d voters are up, and the new set of %d "
                            "needs %d to commit; remove dead voters first (omx node remove ID)", nid, addr, up,
                            len(voters), len(voters) + 1, need)
                self.events.publish("raft.voter_add_deferred", region=self.cfg.region, id=nid, raft_addr=addr,
                                    voters_up=up, voters=len(voters))
            return
        self._add_refused.discard(addr)
        try:
            now = await self.registry.add_voter(addr, timeout=10.0)
        except RegistryError as e:
            log.warning("could not add %s (%s) as a Raft voter: %s", nid, addr, e)
            return
        log.info("added %s (%s) as a Raft voter of region %s; voters now %s", nid, addr, self.cfg.region,
                 ", ".join(now))

    def _dead_voters(self, st: dict[str, Any], voters: set[str]) -> list[str]:
        """Voters dead for `replace_dead_voters_after` s: unreachable over Raft and not alive or suspect in gossip.

        Only the leader keeps the clock, from when it first saw each one so; a new leader starts afresh.
        """
        assert self.swim is not None
        if self.cfg.replace_dead_voters_after <= 0:
            return []
        living = self._raft_addrs_in("alive", "suspect")
        partners = st.get("partners", {})
        now = time.monotonic()
        seen = {a for a in voters if a != self.raft_addr and not partners.get(a) and a not in living}
        for a in list(self._voter_gone_since):
            if a not in seen:
                del self._voter_gone_since[a]
        for a in seen:
            self._voter_gone_since.setdefault(a, now)
        return sorted(a for a in seen if now - self._voter_gone_since[a] >= self.cfg.replace_dead_voters_after)

    async def _replace_dead_voter(self, dead: str, nid: str, addr: str) -> None:
        """Give a dead voter's seat to a waiting control node: drop the dead one first (the set that is up can
        always commit that), then the next round adds the newcomer. A partitioned voter that comes back later is
        an alive control node without a seat, and is added like any other."""
        assert self.registry is not None
        gone_for = time.monotonic() - self._voter_gone_since[dead]
        try:
            now = await self.registry.remove_voter(dead, timeout=10.0)
        except RegistryError as e:
            log.warning("could not remove dead Raft voter %s to seat %s (%s): %s", dead, nid, addr, e)
            return
        self._voter_gone_since.pop(dead, None)
        dead_id = next((i for i, a in self._raft_addrs.items() if a == dead), None)
        log.warning("removed Raft voter %s (%s) of region %s, dead for %.0f s, to seat %s (%s); voters now %s",
                    dead_id or "?", dead, self.cfg.region, gone_for, nid, addr, ", ".join(now))
        self.events.publish("raft.dead_voter_replaced", region=self.cfg.region, raft_addr=dead, id=dead_id,
                            dead_for_s=round(gone_for, 1), replacement=nid, replacement_raft_addr=addr)

    async def remove_voter(self, addr: str) -> dict[str, Any]:
        """Drop a Raft address from the region's voters, through the leader (forwarded when not us)."""
        if self.registry is not None and self.registry.is_leader:
            return await self.remove_voter_here(addr)
        return await self._call_control("POST", "/api/v1/internal/voters", {"op": "remove", "addr": addr})

    async def remove_voter_here(self, addr: str) -> dict[str, Any]:
        """The leader's half of remove_voter; never forwards (a follower answers 503 so the caller moves on)."""
        if self.registry is None:
            raise ApiError(503, "this node holds no registry (it is a worker)")
        try:
            voters = await self.registry.remove_voter(addr, timeout=10.0)
        except RegistryMembershipError as e:
            raise ApiError(409, str(e)) from None
        except RegistryNotLeader as e:
            raise ApiError(503, str(e)) from None
        except RegistryError as e:
            raise ApiError(503, f"removing voter {addr} failed: {e}") from None
        log.info("removed %s from the Raft voters of region %s; voters now %s", addr, self.cfg.region,
                 ", ".join(voters))
        return {"removed_voter": addr, "voters": voters}

    def raft_addr_of(self, nid: str) -> str | None:
        """The Raft address a control node of our region advertised (None if this node never saw it)."""
        m = self.swim.get(nid) if self.swim is not None else None
        meta = (m.meta or {}) if m is not None else {}
        addr = (meta.get("raft") or {}).get("addr")
        if isinstance(addr, str) and meta.get("region") == self.cfg.region and meta.get("role") == "control":
            return addr
        return self._raft_addrs.get(nid)

    def region_voters(self) -> list[str]:
        """The region's voter set: our replica's, or (on a worker) the leader's as it advertises it."""
        if self.registry is not None:
            return self.registry.voters()
        sets = self._advertised_voters()
        return sets[0][2] if sets else []

    # ---- views ------------------------------------------------------------------------------------
    def member_view(self, m: Member, registry_nodes: dict[str, Any]) -> dict[str, Any]:
        meta = dict(m.meta or {})
        reg = registry_nodes.get(m.id, {})
        return {"id": m.id, "status": m.state, "region": meta.get("region"), "role": meta.get("role"),
                "gossip_addr": f"{m.host}:{m.port}", "api_addr": meta.get("api"), "incarnation": m.incarnation,
                "raft": meta.get("raft"), "models": meta.get("models", []), "inflight": meta.get("inflight", 0),
                "cordoned": bool(reg.get("cordoned", False)), "draining": bool(reg.get("draining", False)),
                "labels": reg.get("labels") or {},
                "memory": {"available": meta.get("mem_avail"), "total": meta.get("mem_total")},
                "gpus": gpu_view(meta),
                "meta": meta, "self": m.id == self.id}

    def registry_nodes(self) -> dict[str, Any]:
        return self.registry.snapshot().get("nodes", {}) if self.registry is not None else {}

    def view(self) -> dict[str, Any]:
        assert self.swim is not None
        nodes = self.registry_nodes()
        members = [self.member_view(m, nodes) for m in sorted(self.swim.members(), key=lambda m: m.id)]
        return {"self": self.id, "region": self.cfg.region, "members": members, "counts": self.member_counts(),
                "leaders": self.leaders()}

    def member_counts(self) -> dict[str, int]:
        """Members by SWIM state, as this node sees them."""
        assert self.swim is not None
        return dict(Counter(m.state for m in self.swim.members()))

    def leaders(self) -> dict[str, Any]:
        """Per region: the Raft leader as its voters advertise it in gossip."""
        assert self.swim is not None
        out: dict[str, Any] = {}
        members = [m for m in self.swim.members() if m.state in ("alive", "suspect")]
        by_raft = {(m.meta or {}).get("raft", {}).get("addr"): m for m in members if (m.meta or {}).get("raft")}
        for m in members:
            raft = (m.meta or {}).get("raft")
            if not raft:
                continue
            region = (m.meta or {}).get("region")
            leader_addr = raft.get("leader")
            leader = by_raft.get(leader_addr)
            cur = out.get(region)
            if leader is not None and (cur is None or (raft.get("term") or 0) > (cur.get("term") or 0)):
                out[region] = {"region": region, "id": leader.id, "raft_addr": leader_addr,
                               "api_addr": (leader.meta or {}).get("api"), "term": raft.get("term")}
        return out

    def status(self) -> dict[str, Any]:
        assert self.swim is not None
        me = self.swim.get(self.id)
        return {"id": self.id, "region": self.cfg.region, "role": self.cfg.role, "api_addr": self.api_url,
                "gossip_addr": self.swim.address, "membership": me.state if me else "unknown",
                "incarnation": me.incarnation if me else None, "local_health": self.swim.local_health,
                "members": self.member_counts(), "raft": self.registry.status() if self.registry else None,
                "gossip_stats": self.swim.stats(), "time": time.time()}

    # ---- registry writes from any node --------------------------------------------------------------
    async def registry_write(self, op: str, *args: Any) -> dict[str, Any]:
        """Write through this node's registry, or forward to a control node of the region."""
        if self.registry is not None:
            try:
                res = await self.registry.write(op, *args)
            except RegistryUnavailable as e:
                raise ApiError(503, f"registry unavailable: {e}") from None
            except RegistryError as e:
                raise ApiError(503, f"registry write failed: {e}") from None
            if not res.ok:
                status = {"not_found": 404, "conflict": 409, "invalid": 400}.get(res.error or "", 500)
                raise ApiError(status, res.message or str(res.error))
            return {"ok": True, "revision": res.revision, "version": res.version}
        return await self._call_control("POST", "/api/v1/internal/registry", {"op": op, "args": list(args)})

    async def registry_read(self) -> dict[str, Any]:
        """The region's registry: this node's replica, or (on a worker) a control node's."""
        if self.registry is not None:
            return {"status": self.registry.status(), "state": self.registry.snapshot()}
        return await self._call_control("GET", "/api/v1/registry", None)

    async def _call_control(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        """Workers hold no replica: ask the region's control nodes, the advertised leader first."""
        import aiohttp

        assert self.swim is not None
        targets = [m for m in self.swim.members() if m.state == "alive" and (m.meta or {}).get("role") == "control"
                   and (m.meta or {}).get("region") == self.cfg.region and (m.meta or {}).get("api")]
        targets.sort(key=lambda m: not (((m.meta or {}).get("raft") or {}).get("state") == "leader"))
        if not targets:
            raise ApiError(503, f"no control node of region {self.cfg.region!r} is reachable")
        last = "no answer"
        async with aiohttp.ClientSession() as s:
            for m in targets[:3]:
                url = (m.meta or {})["api"] + path
                try:
                    async with s.request(method, url, json=body, timeout=aiohttp.ClientTimeout(total=10),
                                         headers={"Authorization": f"Bearer {self.http_token}"}) as r:
                        body = await r.json(content_type=None)
                        if r.status == 200:
                            return body
                        if r.status < 500:
                            raise ApiError(r.status, body.get("error", f"HTTP {r.status}"))
                        last = body.get("error", f"HTTP {r.status}")
                except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                    last = str(e) or type(e).__name__
        raise ApiError(503, f"registry unavailable: {last}")

    def check_internal_auth(self, header: str | None) -> None:
        want = f"Bearer {self.http_token}"
        if not header or not hmac.compare_digest(header.encode(), want.encode()):
            raise ApiError(403, "internal route: missing or wrong cluster credentials")
