"""Plain data the screens render: built from the node's JSON, tolerant of fields a node does not send yet.

Screens only ever see these objects, never raw HTTP, so snapshot tests and the benchmark feed them frozen data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


def _int(v: Any, default: int = 0) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return default


def _float(v: Any) -> float | None:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f}"


def memory_text(memory: Any, gpus: Any) -> str:
    """"used/total GB" of RAM, then "gpu used/total GB util%" summed over the node's GPUs (cluster view)."""
    parts = []
    if isinstance(memory, dict):
        total, avail = _int(memory.get("total")), _int(memory.get("available"))
        if total > 0:
            parts.append(f"{_gb(total - avail)}/{_gb(total)} GB")
    elif memory:
        parts.append(str(memory))  # an older node's free-form figure
    if isinstance(gpus, list) and gpus:
        good = [g for g in gpus if isinstance(g, dict)]
        used = sum(_int(g.get("memory_used")) for g in good)
        total = sum(_int(g.get("memory_total")) for g in good)
        utils = [u for g in good if (u := _float(g.get("utilization"))) is not None]
        count = f"{len(good)}× " if len(good) > 1 else ""
        util = f" {sum(utils) / len(utils):.0f}%" if utils else ""
        parts.append(f"gpu {count}{_gb(used)}/{_gb(total)} GB{util}")
    return " · ".join(parts)


@dataclass(frozen=True)
class Member:
    id: str
    status: str  # alive | suspect | dead | left
    region: str = ""
    role: str = ""
    api_addr: str = ""
    gossip_addr: str = ""
    raft_state: str = ""
    raft_term: int | None = None
    models: tuple[str, ...] = ()
    inflight: int = 0
    slots: int = 0
    cordoned: bool = False
    draining: bool = False
    memory: str = ""
    is_self: bool = False

    @classmethod
    def from_json(cls, m: dict[str, Any]) -> Member:
        meta = m.get("meta") or {}
        raft = m.get("raft") or {}
        return cls(
            id=str(m.get("id", "?")), status=str(m.get("status", "unknown")), region=str(m.get("region") or ""),
            role=str(m.get("role") or ""), api_addr=str(m.get("api_addr") or meta.get("api") or ""),
            gossip_addr=str(m.get("gossip_addr") or ""), raft_state=str(raft.get("state") or ""),
            raft_term=raft.get("term"), models=tuple(m.get("models") or meta.get("models") or ()),
            inflight=_int(m.get("inflight", meta.get("inflight"))), slots=_int(m.get("slots", meta.get("slots"))),
            cordoned=bool(m.get("cordoned")), draining=bool(m.get("draining")),
            memory=memory_text(m.get("memory"), m.get("gpus")), is_self=bool(m.get("self")))

    @property
    def sched(self) -> str:
        """Scheduling state from the registry: draining implies cordoned."""
        return "draining" if self.draining else "cordoned" if self.cordoned else "schedulable"


@dataclass(frozen=True)
class Instance:
    id: str
    url: str = ""
    node: str = ""
    region: str = ""
    kind: str = "node"  # node | external
    status: str = "healthy"
    circuit: str = "closed"
    models: tuple[str, ...] = ()
    loaded: tuple[str, ...] = ()
    inflight: int = 0
    slots: int = 0
    queue: int = 0
    latency_ms: float | None = None
    tokens_per_s: float | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Instance:
        return cls(
            id=str(d.get("id") or d.get("url") or "?"), url=str(d.get("url") or ""), node=str(d.get("node") or ""),
            region=str(d.get("region") or ""), kind=str(d.get("kind") or "node"),
            status=str(d.get("status") or "unknown"), circuit=str(d.get("circuit") or "closed"),
            models=tuple(d.get("models") or ()), loaded=tuple(d.get("loaded") or ()),
            inflight=_int(d.get("inflight")), slots=_int(d.get("slots")), queue=_int(d.get("queue")),
            latency_ms=_float(d.get("latency_ms")), tokens_per_s=_float(d.get("tokens_per_s")))

    @classmethod
    def from_member(cls, m: Member) -> Instance:
        """Before the proxy API exists, every node is the one instance serving its loaded models."""
        status = {"alive": "healthy", "suspect": "suspect"}.get(m.status, m.status)
        if status == "healthy" and m.sched != "schedulable":
            status = m.sched
        return cls(id=m.id, url=m.api_addr, node=m.id, region=m.region, kind="node", status=status,
                   models=m.models, loaded=m.models, inflight=m.inflight, slots=m.slots)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    digest: str = ""
    size: int = 0
    replicas: int | None = None  # desired; None when the registry does not track it (no scheduler API)
    actual: int = 0
    nodes: tuple[str, ...] = ()
    transfers: tuple[tuple[str, int, int], ...] = ()  # (node, bytes completed, bytes total) fetching it now

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelInfo:
        rep = d.get("replicas")
        transfers = tuple((str(t.get("node") or "?"), _int(t.get("completed")), _int(t.get("total")))
                          for t in d.get("transfers") or () if isinstance(t, dict))
        return cls(name=str(d.get("name") or d.get("model") or "?"), digest=str(d.get("digest") or ""),
                   size=_int(d.get("size")), replicas=None if rep is None else _int(rep),
                   actual=_int(d.get("actual"), len(d.get("nodes") or ())), nodes=tuple(d.get("nodes") or ()),
                   transfers=transfers)

    @property
    def transfer_text(self) -> str:
        """The cluster's fetches of this model, e.g. "node-2 42%, node-3 7%"."""
        return ", ".join(f"{node} {done * 100 // total if total else 0}%" for node, done, total in self.transfers)


@dataclass(frozen=True)
class MetricPoint:
    """One reading of the serving figures; None where the source has no data for it."""

    requests_per_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    tokens_per_s: float | None = None

    SERIES = ("requests_per_s", "p50_ms", "p99_ms", "ttft_p50_ms", "ttft_p99_ms", "tokens_per_s")


@dataclass(frozen=True)
class MetricsSample:
    cluster: MetricPoint = field(default_factory=MetricPoint)
    per_node: dict[str, MetricPoint] = field(default_factory=dict)
    source: str = ""  # "proxy" or "prometheus"


@dataclass(frozen=True)
class EventRow:
    seq: int
    kind: str
    ts: float
    data: dict[str, Any]
    origin: str = ""  # the node whose stream delivered it

    @classmethod
    def from_json(cls, d: dict[str, Any], origin: str = "") -> EventRow:
        return cls(seq=_int(d.get("seq")), kind=str(d.get("kind") or "?"), ts=_float(d.get("ts")) or time.time(),
                   data=dict(d.get("data") or {}), origin=origin)

    @property
    def summary(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.data.items() if v is not None)


@dataclass(frozen=True)
class Snapshot:
    """Everything one poll learned; `missing` names the optional APIs this node does not offer."""

    connected: str
    self_id: str = ""
    region: str = ""
    members: tuple[Member, ...] = ()
    leaders: dict[str, str] = field(default_factory=dict)  # region -> leader node id
    instances: tuple[Instance, ...] = ()
    instances_derived: bool = False
    models: tuple[ModelInfo, ...] = ()
    metrics: MetricsSample | None = None
    proxy: dict[str, Any] | None = None
    missing: frozenset[str] = frozenset()
    ts: float = 0.0

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.members:
            out[m.status] = out.get(m.status, 0) + 1
        return out

    def is_leader(self, member: Member) -> bool:
        return self.leaders.get(member.region) == member.id
