"""In-memory network with a virtual clock that runs many :class:`SwimCore` s in one process.

Deterministic (one seeded RNG drives the network and every core) and fast: messages are
passed as tuples unless ``wire=True``, which sends every packet through the real
:class:`Codec` (optionally encrypted) to exercise the wire path. One global event heap holds
deliveries and node wake-ups; each node keeps at most one live wake-up entry.

With ``add_nodes(..., full=True)`` all nodes start knowing each other through one shared
:class:`BaseTable`; each node then stores only what it learned since, which is what lets
10,000 members fit in a few hundred MB instead of 10⁸ member records.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from heapq import heappop, heappush
from random import Random
from typing import Any

from .codec import ALIVE, Codec, Member
from .core import BaseTable, SwimConfig, SwimCore

_DELIVER, _WAKE, _STREAM_REQ, _STREAM_REP = range(4)
_INF = math.inf
_EPOCH = 1_700_000_000.0  # virtual wall clock for codec timestamps


class SimNode:
    """One simulated member: its core plus the I/O hooks the core calls."""

    __slots__ = ("addr", "alive", "buffer", "codec", "core", "id", "idx", "net", "paused", "wake_at")

    def __init__(self, net: SimNetwork, idx: int, node_id: str) -> None:
        self.net, self.idx, self.id = net, idx, node_id
        self.addr = (node_id, 7946)
        self.alive = True
        self.paused = False
        self.buffer: list[tuple] = []
        self.wake_at = _INF
        self.codec: Codec | None = None
        self.core: SwimCore = None  # type: ignore[assignment]  # set by SimNetwork.add_nodes

    def send(self, addr: tuple[str, int], msg: tuple) -> None:
        self.net._send(self, addr, msg)

    def stream(self, addr: tuple[str, int], msg: tuple) -> None:
        self.net._stream(self, addr, msg)

    def event(self, kind: str, m: Member) -> None:
        self.net._event(self.id, kind, m)


class SimNetwork:
    """Virtual-time network: loss, delay, partitions, killed and paused members, counters."""

    def __init__(self, seed: int = 0, *, loss: float = 0.0, delay: tuple[float, float] = (0.001, 0.005),
                 wire: bool = False, key: bytes | None = None, record_events: bool = True,
                 on_event: Callable[[float, str, str, Member], None] | None = None,
                 buffer_limit: int = 512) -> None:
        self.rng = Random(seed)
        self.loss = loss
        self.delay = delay
        self.wire = wire
        self.key = key
        self.record_events = record_events
        self.on_event = on_event
        self.buffer_limit = buffer_limit
        self.now = 0.0
        self.nodes: list[SimNode] = []
        self.by_id: dict[str, SimNode] = {}
        self.by_addr: dict[tuple[str, int], SimNode] = {}
        self.events: list[tuple[float, str, str, str, int]] = []
        self.counters: Counter[str] = Counter()
        self._groups: dict[str, int] | None = None
        self._heap: list[tuple[float, int, int, int, Any, Any]] = []
        self._seq = 0

    # ------------------------------------------------------------------ building

    def add_nodes(self, n: int, *, config: SwimConfig | None = None, prefix: str = "n",
                  meta: Mapping[str, Any] | Callable[[str], Mapping[str, Any]] | None = None,
                  full: bool = False, start: bool = True) -> list[str]:
        """Create ``n`` members. ``full`` = all of them (and only them) start fully joined."""
        cfg = config or SwimConfig()
        first = len(self.nodes)
        ids = [f"{prefix}{first + i:05d}" for i in range(n)]
        metas = [dict(meta(i)) if callable(meta) else dict(meta or {}) for i in ids]
        base = None
        if full:
            base = BaseTable([Member(i, i, 7946, 0, ALIVE, m, 0) for i, m in zip(ids, metas, strict=True)])
        for i, m in zip(ids, metas, strict=True):
            node = SimNode(self, len(self.nodes), i)
            if self.wire:
                node.codec = Codec(i, self.key, clock=self._wall)
            node.core = SwimCore(i, i, 7946, io=node, config=cfg, rng=self.rng, meta=m, on_event=node.event,
                                 base=base)
            self.nodes.append(node)
            self.by_id[i] = node
            self.by_addr[node.addr] = node
            if start:
                node.core.start(self.now)
                self._resched(node)
        return ids

    def join(self, node_id: str, seed_id: str) -> None:
        """Start a push-pull join from ``node_id`` to ``seed_id`` (completes after two delays)."""
        node = self.by_id[node_id]
        self._stream(node, self.by_id[seed_id].addr, node.core.make_push_pull(join=True))

    # ------------------------------------------------------------------ faults

    def partition(self, groups: Iterable[Iterable[str]]) -> None:
        """Split the network; members not named form one more group."""
        g: dict[str, int] = {}
        for gi, ids in enumerate(groups, start=1):
            for i in ids:
                g[i] = gi
        self._groups = {n.id: g.get(n.id, 0) for n in self.nodes}

    def heal(self) -> None:
        self._groups = None

    def kill(self, node_id: str) -> None:
        """Crash: the member stops sending and receiving for good."""
        self.by_id[node_id].alive = False

    def pause(self, node_id: str) -> None:
        """Like SIGSTOP: timers stop, inbound datagrams queue up (to a socket-buffer limit)."""
        self.by_id[node_id].paused = True

    def resume(self, node_id: str) -> None:
        node = self.by_id[node_id]
        node.paused = False
        buf, node.buffer = node.buffer, []
        for src, payload in buf:
            self._deliver(node, src, payload)
        node.core.tick(self.now)
        self._resched(node)

    # ------------------------------------------------------------------ running

    def run_until(self, t_end: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= t_end:
            t, _, kind, idx, a, b = heappop(heap)
            self.now = t
            node = self.nodes[idx]
            if kind == _WAKE:
                if node.wake_at != t:
                    continue
                node.wake_at = _INF
                if not node.alive or node.paused:
                    continue
                node.core.tick(t)
            elif kind == _DELIVER:
                if not node.alive:
                    self.counters["to_dead"] += 1
                    continue
                if node.paused:
                    if len(node.buffer) < self.buffer_limit:
                        node.buffer.append((a, b))
                    else:
                        self.counters["overflow"] += 1
                    continue
                self._deliver(node, a, b)
            elif kind == _STREAM_REQ:
                if not node.alive or node.paused:
                    continue
                src = self.nodes[a]
                msg = self._unwrap(node, b, stream=True)
                if msg is None:
                    continue
                reply = node.core.on_push_pull(t, msg)
                self._push(t + self._delay(), _STREAM_REP, src.idx, None, self._wrap(node, reply))
            else:  # _STREAM_REP
                if not node.alive or node.paused:
                    continue
                msg = self._unwrap(node, b, stream=True)
                if msg is not None:
                    node.core.on_push_pull_reply(t, msg)
            self._resched(node)
        self.now = max(self.now, t_end)

    def run_for(self, dt: float) -> None:
        self.run_until(self.now + dt)

    # ------------------------------------------------------------------ inspection

    def core(self, node_id: str) -> SwimCore:
        return self.by_id[node_id].core

    def live_ids(self) -> list[str]:
        return [n.id for n in self.nodes if n.alive]

    def view(self, node_id: str) -> dict[str, str]:
        return {m.id: m.state for m in self.by_id[node_id].core.members()}

    def states_of(self, target: str, observers: Iterable[str] | None = None) -> Counter[str]:
        """How the observers (default: every live member but the target) see ``target``."""
        obs = observers if observers is not None else (n.id for n in self.nodes if n.alive and n.id != target)
        c: Counter[str] = Counter()
        for o in obs:
            m = self.by_id[o].core.get(target)
            c[m.state if m is not None else "unknown"] += 1
        return c

    def run_until_converged(self, within: float, step: float = 1.0) -> bool:
        """Advance in `step`s of virtual time until `converged()`, for at most `within` seconds."""
        end = self.now + within
        while not self.converged() and self.now < end:
            self.run_until(min(end, self.now + step))
        return self.converged()

    def converged(self, ids: Iterable[str] | None = None) -> bool:
        """Every live member in ``ids`` sees exactly the others in ``ids`` as alive."""
        want = sorted(ids if ids is not None else self.live_ids())
        wanted = set(want)
        for i in want:
            core = self.by_id[i].core
            if core.num_members < len(want):
                return False
            alive = {m.id for m in core.members() if m.state == ALIVE}
            if not wanted <= alive:
                return False
        return True

    # ------------------------------------------------------------------ internals

    def _wall(self) -> float:
        return _EPOCH + self.now

    def _delay(self) -> float:
        lo, hi = self.delay
        return lo + (hi - lo) * self.rng.random()

    def _push(self, t: float, kind: int, idx: int, a: Any, b: Any) -> None:
        self._seq += 1
        heappush(self._heap, (t, self._seq, kind, idx, a, b))

    def _resched(self, node: SimNode) -> None:
        d = node.core.next_deadline()
        if d is not None and d < node.wake_at:
            node.wake_at = d
            self._push(d, _WAKE, node.idx, None, None)

    def _wrap(self, src: SimNode, msg: tuple) -> Any:
        if src.codec is None:
            return msg
        data = src.codec.encode(msg)
        self.counters["bytes"] += len(data)
        return data

    def _unwrap(self, dst: SimNode, payload: Any, *, stream: bool = False) -> tuple | None:
        if dst.codec is None:
            return payload
        res = dst.codec.decode(payload, stream=stream)
        return None if res is None else res[1]

    def _cut(self, a: SimNode, b: SimNode) -> bool:
        g = self._groups
        return g is not None and g[a.id] != g[b.id]

    def _send(self, src: SimNode, addr: tuple[str, int], msg: tuple) -> None:
        c = self.counters
        c["sent"] += 1
        dst = self.by_addr.get(addr)
        if dst is None:
            c["unroutable"] += 1
            return
        if self.loss and self.rng.random() < self.loss:
            c["lost"] += 1
            return
        if self._groups is not None and self._cut(src, dst):
            c["cut"] += 1
            return
        self._push(self.now + self._delay(), _DELIVER, dst.idx, src.addr, self._wrap(src, msg))

    def _deliver(self, node: SimNode, src: tuple[str, int], payload: Any) -> None:
        msg = self._unwrap(node, payload)
        if msg is None:
            return
        self.counters["delivered"] += 1
        node.core.on_message(self.now, src, msg)

    def _stream(self, src: SimNode, addr: tuple[str, int], msg: tuple) -> None:
        self.counters["streams"] += 1
        dst = self.by_addr.get(addr)
        if dst is None or self._cut(src, dst):
            return
        self._push(self.now + self._delay(), _STREAM_REQ, dst.idx, src.idx, self._wrap(src, msg))

    def _event(self, observer: str, kind: str, m: Member) -> None:
        if self.record_events:
            self.events.append((self.now, observer, kind, m.id, m.incarnation))
        if self.on_event is not None:
            self.on_event(self.now, observer, kind, m)
