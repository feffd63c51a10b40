"""Sans-IO SWIM + Lifeguard state machine (``hashicorp/memberlist`` is the reference design).

The core never touches sockets or clocks: a driver passes ``now`` into every entry point,
feeds it decoded messages (:meth:`SwimCore.on_message`, :meth:`SwimCore.on_push_pull`), calls
:meth:`SwimCore.tick` at :meth:`SwimCore.next_deadline`, and implements :class:`CoreIO` to carry
the messages the core sends. The asyncio driver (``net.py``) and the simulator (``sim.py``) run
this same code.

Memory is kept O(members) per node and shareable across simulated nodes: member records are
immutable tuples, a :class:`MemberTable` can sit on a read-only :class:`BaseTable` shared by many
nodes (each node stores only its differences), and the randomised round-robin probe order is an
affine permutation of table indices rather than a per-node shuffled list.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from heapq import heappop, heappush
from operator import itemgetter
from random import Random
from typing import Any, Protocol

from .codec import (
    ACK,
    ALIVE,
    DEAD,
    GOSSIP,
    LEFT,
    NACK,
    PACKET_OVERHEAD,
    PING,
    PING_REQ,
    PUSH_PULL,
    PUSH_PULL_REPLY,
    SUSPECT,
    Member,
    packed_size,
    update_size,
)

# Membership event kinds passed to ``on_event(kind, member)``.
JOINED, EV_SUSPECT, EV_ALIVE, EV_DEAD, EV_LEFT, META_UPDATED, REAPED = (
    "joined", "suspect", "alive", "dead", "left", "meta_updated", "reaped")

_T_PROBE, _T_PROBE_TIMEOUT, _T_RELAY_TIMEOUT, _T_SUSPECT, _T_GOSSIP, _T_PUSH_PULL, _T_REAP, _T_SYNC = range(8)
_MISS = object()
_UPDATE_OF = itemgetter(2)  # a BroadcastQueue item's update
_SIZE_OF = itemgetter(3)  # and its encoded size
_MIN_UPDATE = 24  # smaller than any encoded update: stop filling a packet below this


@dataclass(frozen=True, slots=True)
class SwimConfig:
    """Protocol timing and limits. Defaults follow memberlist's LAN profile."""

    probe_interval: float = 1.0
    probe_timeout: float = 0.5
    indirect_checks: int = 3
    suspicion_mult: int = 4
    suspicion_max_mult: int = 6
    retransmit_mult: int = 4
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    push_pull_interval: float = 30.0  # 0 disables periodic anti-entropy
    dead_reap_after: float = 60.0
    awareness_max: int = 8
    packet_budget: int = 1400  # UDP payload bytes we aim to stay under
    meta_max_bytes: int = 2048
    tombstones: int = 1024  # reaped ids remembered, so stale gossip cannot resurrect them
    reconnect_for: float = 24 * 3600.0  # how long a failed member's address is retried after it is reaped
    join_timeout: float = 3.0
    stream_timeout: float = 5.0

    @classmethod
    def lan(cls) -> SwimConfig:
        return cls()

    @classmethod
    def local(cls, **kw: Any) -> SwimConfig:
        """Fast timings for loopback tests and single-host clusters."""
        base = cls(probe_interval=0.2, probe_timeout=0.1, gossip_interval=0.05, push_pull_interval=2.0,
                   dead_reap_after=5.0, join_timeout=1.0, stream_timeout=2.0)
        return replace(base, **kw)


class CoreIO(Protocol):
    """What a driver provides: fire-and-forget datagrams and a push-pull stream exchange."""

    def send(self, addr: tuple[str, int], msg: tuple) -> None: ...

    def stream(self, addr: tuple[str, int], msg: tuple) -> None:
        """Deliver ``msg`` reliably; hand the reply to :meth:`SwimCore.on_push_pull_reply`."""


def suspicion_timeout(mult: int, n: int, interval: float) -> float:
    """memberlist: the base suspicion time grows with log10 of the cluster size."""
    return mult * max(1.0, math.log10(max(1, n))) * interval


def remaining_suspicion(n_conf: int, k: int, elapsed: float, lo: float, hi: float) -> float:
    """Lifeguard: start at ``hi`` and shrink towards ``lo`` as independent confirmations arrive."""
    frac = math.log(n_conf + 1.0) / math.log(k + 1.0) if k > 0 else 1.0
    return max(lo, hi - frac * (hi - lo)) - elapsed


def retransmit_limit(mult: int, n: int) -> int:
    return mult * math.ceil(math.log10(n + 1))


# --------------------------------------------------------------------------- member table


class BaseTable:
    """A read-only set of member records that many (simulated) nodes share copy-on-write."""

    __slots__ = ("alive", "ids", "recs")

    def __init__(self, members: list[Member]) -> None:
        self.recs: dict[str, Member] = {m.id: m for m in members}
        self.ids: list[str] = list(self.recs)
        self.alive = sum(1 for m in self.recs.values() if m.state == ALIVE)


class MemberTable:
    """Members by id: an optional shared base plus this node's own overlay of differences.

    Records are addressable by index ``0..size()-1`` (base ids, then extra ids) so probe
    order and random peer choice need no per-node list. Removed base members leave a ``None``
    in the overlay; removed extras are swap-deleted, so ``size()`` may shrink. ``live`` counts
    present records and ``alive`` those in state alive, kept on every write so that "does this
    node see everyone alive?" is O(1) instead of a scan.
    """

    __slots__ = ("_bids", "_brecs", "_extra", "_extra_pos", "_over", "alive", "live")

    def __init__(self, base: BaseTable | None = None) -> None:
        self._brecs: dict[str, Member] = base.recs if base else {}
        self._bids: list[str] = base.ids if base else []
        self._over: dict[str, Member | None] = {}
        self._extra: list[str] = []
        self._extra_pos: dict[str, int] = {}
        self.live = len(self._bids)
        self.alive = base.alive if base else 0

    def get(self, mid: str) -> Member | None:
        r = self._over.get(mid, _MISS)
        if r is _MISS:
            return self._brecs.get(mid)
        return r  # type: ignore[return-value]

    def put(self, rec: Member) -> None:
        mid = rec.id
        cur = self._over.get(mid, _MISS)
        if cur is _MISS:
            cur = self._brecs.get(mid)
            if cur is None:
                self._extra_pos[mid] = len(self._extra)
                self._extra.append(mid)
                self.live += 1
        elif cur is None:
            self.live += 1
        self._over[mid] = rec
        self.alive += (rec.state == ALIVE) - (cur is not None and cur.state == ALIVE)

    def remove(self, mid: str) -> None:
        cur = self.get(mid)
        if cur is not None and cur.state == ALIVE:
            self.alive -= 1
        if mid in self._brecs:
            self._over[mid] = None
        else:
            del self._over[mid]
            pos = self._extra_pos.pop(mid)
            last = self._extra.pop()
            if last != mid:
                self._extra[pos] = last
                self._extra_pos[last] = pos
        self.live -= 1

    def size(self) -> int:
        return len(self._bids) + len(self._extra)

    def at(self, i: int) -> Member | None:
        nb = len(self._bids)
        return self.get(self._bids[i] if i < nb else self._extra[i - nb])

    def __iter__(self) -> Iterator[Member]:
        return iter(self.records())

    def records(self) -> list[Member]:
        """Every present record, in index order (a snapshot list)."""
        over = self._over
        extra = list(map(over.__getitem__, self._extra))  # extras are always present in the overlay
        if not self._bids:
            return extra
        brecs = self._brecs
        out = [r for r in map(over.get, self._bids, map(brecs.get, self._bids)) if r is not None]
        out.extend(extra)
        return out


# --------------------------------------------------------------------------- broadcast queue


class BroadcastQueue:
    """memberlist's TransmitLimitedQueue: least-transmitted, then newest, first; one item per member.

    Items sit in one bucket per transmit count, each bucket sorted by age (newest last), so a
    take walks buckets upward and each bucket from its end. A newer update for a member
    replaces the queued one at once. Item: ``[seq, key, update, size]``.
    """

    __slots__ = ("_buckets", "_live", "_seq", "_sizes")

    def __init__(self) -> None:
        self._buckets: list[list[list[Any]]] = [[]]
        self._live: dict[str, list[Any]] = {}
        self._sizes: dict[int, int] = {}  # encoded size -> live items of that size
        self._seq = 0

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: str) -> bool:
        return key in self._live

    def push(self, key: str, update: tuple[Member, str], size: int) -> None:
        self._seq += 1
        item = [self._seq, key, update, size]
        sizes = self._sizes
        old = self._live.get(key)
        if old is not None:
            # Replacing a queued update is rare next to taking: find its bucket here rather than
            # keep a transmit count in every item up to date on each take.
            for b in self._buckets:
                pos = bisect_left(b, old)  # seq numbers are unique, so this finds exactly ``old``
                if pos < len(b) and b[pos] is old:
                    del b[pos]
                    break
            _uncount(sizes, old[3])
        sizes[size] = sizes.get(size, 0) + 1
        self._live[key] = item
        self._buckets[0].append(item)  # the newest of all: bucket 0 stays sorted

    def take(self, budget: int, limit: int, *, allow_oversize: bool = False) -> list[tuple[Member, str]]:
        buckets, live, sizes = self._buckets, self._live, self._sizes
        out: list[tuple[Member, str]] = []
        if not sizes:
            return out
        # Nothing smaller than ``lim`` is queued, so a walk stops once the budget is below it: the
        # items it would still look at could not fit. (An oversize item first needs the plain walk.)
        # Nothing is larger than ``top``, so while ``k * top`` fits, the next ``k`` items are taken as
        # one slice without looking at each: most of a packet, when updates are of similar size.
        lim = max(_MIN_UPDATE, min(sizes))
        top = max(sizes)
        if budget < lim:
            if not allow_oversize:
                return out
            lim = _MIN_UPDATE
        moved: list[tuple[int, list[list[Any]]]] = []  # still live: one bucket up, after the walk
        room = 64  # items looked at, at most
        for t, b in enumerate(buckets):
            if budget < lim or room <= 0:
                break
            if not b:
                continue
            i = n = len(b)
            stop = n - room if n > room else 0
            k = min(budget // top, i - stop)
            if k > 0:
                took = b[i - k:i]
                budget -= sum(map(_SIZE_OF, took))
                took.reverse()  # newest first, as the walk below appends them
                i -= k
            else:
                took = []
            kept: list[list[Any]] | None = None  # looked at but too big for what is left
            while i > stop and budget >= lim:
                i -= 1
                item = b[i]
                size = item[3]
                if size <= budget:
                    budget -= size
                    took.append(item)
                elif allow_oversize and not out and not took:
                    # Larger than one packet budget (big metadata): it travels alone in a gossip packet.
                    budget = 0
                    took.append(item)
                else:
                    if kept is None:
                        kept = []
                    kept.append(item)
            room -= n - i
            if kept is None:
                del b[i:]
            else:
                kept.reverse()
                b[i:] = kept
            if not took:
                continue
            out += map(_UPDATE_OF, took)
            if t + 1 >= limit:
                for item in took:
                    del live[item[1]]
                    _uncount(sizes, item[3])
            else:
                moved.append((t + 1, took))
        for t, took in moved:
            if len(buckets) <= t:
                buckets.append([])
            took.reverse()  # oldest first, like the bucket
            b = buckets[t]
            if not b or b[-1][0] < took[0][0]:
                b += took
                continue
            pos = bisect_left(b, took[0])
            if b[pos][0] > took[-1][0]:  # no bucket item falls between them: one splice
                b[pos:pos] = took
            else:
                for item in took:
                    insort(b, item)
        return out


def _uncount(sizes: dict[int, int], size: int) -> None:
    n = sizes[size] - 1
    if n:
        sizes[size] = n
    else:
        del sizes[size]


# --------------------------------------------------------------------------- pending state


class _Probe:
    __slots__ = ("acked", "expected_nacks", "inc", "indirect", "nacks", "seq", "start", "target")

    def __init__(self, seq: int, target: str, inc: int, start: float) -> None:
        self.seq, self.target, self.inc, self.start = seq, target, inc, start
        self.acked = self.indirect = False
        self.expected_nacks = self.nacks = 0


class _Relay:
    __slots__ = ("requester", "seq")

    def __init__(self, requester: tuple[str, int], seq: int) -> None:
        self.requester, self.seq = requester, seq


class _Suspicion:
    __slots__ = ("confirmers", "deadline", "hi", "incarnation", "k", "lo", "n", "start")

    def __init__(self, frm: str, incarnation: int, k: int, lo: float, hi: float, start: float) -> None:
        self.confirmers = {frm}
        self.incarnation, self.k, self.lo, self.hi, self.start = incarnation, k, lo, hi, start
        self.n = 0
        self.deadline = start + hi

    def confirm(self, frm: str) -> bool:
        if self.n >= self.k or frm in self.confirmers:
            return False
        self.confirmers.add(frm)
        self.n += 1
        self.deadline = self.start + remaining_suspicion(self.n, self.k, 0.0, self.lo, self.hi)
        return True


# --------------------------------------------------------------------------- the core


class SwimCore:
    """One member's view of the cluster and its failure detector."""

    def __init__(self, node_id: str, host: str, port: int, *, io: CoreIO, config: SwimConfig | None = None,
                 rng: Random | None = None, meta: Mapping[str, Any] | None = None, incarnation: int = 0,
                 on_event: Callable[[str, Member], None] | None = None, base: BaseTable | None = None) -> None:
        self.id = node_id
        self.cfg = config or SwimConfig()
        self.io = io
        self.rng = rng or Random()
        self.on_event = on_event
        meta = dict(meta or {})
        self._check_meta(meta)
        me = Member(node_id, host, port, incarnation, ALIVE, meta, 0)
        if base is not None and base.recs.get(node_id) is not None:
            me = base.recs[node_id]
        self.me = me
        self.table = MemberTable(base)
        if self.table.get(node_id) is not me:
            self.table.put(me)
        self.awareness = 0
        self.leaving = False
        self.started = False
        self.now = 0.0
        self._heap: list[tuple[float, int, int, Any]] = []
        self._tseq = 0
        self._seq = 0
        self._acks: dict[int, _Probe | _Relay] = {}
        self._probe: _Probe | None = None
        self._perm = [0, 0, 0, 0]  # a, b, m, i — affine permutation of table indices for this round
        self._susp: dict[str, _Suspicion] = {}
        self._reap_at: dict[str, float] = {}
        self._tombs: dict[str, tuple[int, float]] = {}
        # failed (not left) members reaped from the table: address and until when reconnects are tried
        self._lost: dict[str, tuple[tuple[str, int], float]] = {}
        self._bq = BroadcastQueue()
        self._gossip_at: float | None = None
        self.stats: dict[str, int] = dict.fromkeys(
            ("pings_sent", "acks_recv", "ping_reqs_sent", "nacks_recv", "relayed", "suspected", "declared_dead",
             "refuted", "gossip_sent", "push_pull", "reconnects", "misdirected", "stale_updates", "unknown_ack"), 0)

    # ------------------------------------------------------------------ driver entry points

    def start(self, now: float) -> None:
        """Arm the periodic timers, each with random jitter so members do not synchronise."""
        self.now = now
        self.started = True
        self._at(now + self.rng.random() * self.cfg.probe_interval, _T_PROBE, None)
        if self.cfg.push_pull_interval > 0:
            self._at(now + self.rng.random() * self._push_pull_interval(), _T_PUSH_PULL, None)
        self._ensure_gossip()

    def next_deadline(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def tick(self, now: float) -> None:
        """Run every timer due at ``now``."""
        self.now = now
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, kind, arg = heappop(heap)
            if kind == _T_PROBE:
                self._probe_tick()
            elif kind == _T_PROBE_TIMEOUT:
                self._probe_timeout(arg)
            elif kind == _T_RELAY_TIMEOUT:
                rel = self._acks.pop(arg, None)
                if isinstance(rel, _Relay):
                    self.io.send(rel.requester, (NACK, rel.seq, self._piggyback()))
            elif kind == _T_SUSPECT:
                self._suspicion_expired(arg)
            elif kind == _T_GOSSIP:
                self._gossip_tick()
            elif kind == _T_PUSH_PULL:
                self._push_pull_tick()
            elif kind == _T_REAP:
                self._reap(arg)
            elif kind == _T_SYNC:
                self._sync_once()

    def on_message(self, now: float, src: tuple[str, int], msg: tuple) -> None:
        """Handle one datagram message from ``src`` (already decoded and validated)."""
        self.now = now
        t = msg[0]
        if t == PING:
            _, seq, target, ups = msg
            self._apply_updates(ups)
            if target != self.id:
                self.stats["misdirected"] += 1
                return
            self.io.send(src, (ACK, seq, self._piggyback()))
        elif t == ACK:
            self._apply_updates(msg[2])
            self._on_ack(msg[1])
        elif t == NACK:
            self._apply_updates(msg[2])
            p = self._acks.get(msg[1])
            if isinstance(p, _Probe):
                p.nacks += 1
                self.stats["nacks_recv"] += 1
        elif t == PING_REQ:
            _, seq, target, host, port, ups = msg
            self._apply_updates(ups)
            lseq = self._next_seq()
            self._acks[lseq] = _Relay(src, seq)
            self.stats["relayed"] += 1
            self.io.send((host, port), (PING, lseq, target, self._piggyback()))
            self._at(now + self.cfg.probe_timeout, _T_RELAY_TIMEOUT, lseq)
        elif t == GOSSIP:
            self._apply_updates(msg[1])

    def make_push_pull(self, join: bool = False) -> tuple:
        return (PUSH_PULL, self.id, join, self.table.records())

    def on_push_pull(self, now: float, msg: tuple) -> tuple:
        """Serve a push-pull: merge the remote state and return ours."""
        self.now = now
        reply = (PUSH_PULL_REPLY, self.id, self.table.records())
        self._merge(msg[1], msg[3])
        return reply

    def on_push_pull_reply(self, now: float, msg: tuple) -> None:
        self.now = now
        fresh = self.table.live == 1
        self._merge(msg[1], msg[2])
        if fresh and self.started and self.table.live > 1:
            # We just joined, with the seed's view as of this moment. Members that join alongside us
            # are gossiped while few know us, so a rumour can run out of retransmissions before it
            # reaches us and we would wait for periodic anti-entropy (30 s+). One early push-pull
            # with a random member, once the burst has spread, closes that gap.
            self._at(now + (1.0 + 2.0 * self.rng.random()) * self.cfg.probe_interval, _T_SYNC, None)

    def set_meta(self, now: float, meta: Mapping[str, Any]) -> None:
        """Replace our metadata; bumps its version and gossips it. Raises ValueError if too large."""
        self.now = now
        meta = dict(meta)
        self._check_meta(meta)
        self.me = self.me._replace(meta=meta, meta_version=self.me.meta_version + 1)
        self.table.put(self.me)
        self._broadcast(self.me, self.id)

    def leave(self, now: float) -> None:
        """Announce a graceful leave: ``left`` with a bumped incarnation, gossiped at once."""
        self.now = now
        if self.leaving:
            return
        self.leaving = True
        self.me = self.me._replace(state=LEFT, incarnation=self.me.incarnation + 1)
        self.table.put(self.me)
        self._broadcast(self.me, self.id)
        if self._gossip_at is None or self._gossip_at > now:
            self._gossip_at = now
            self._at(now, _T_GOSSIP, None)

    @property
    def leave_done(self) -> bool:
        """True once the ``left`` update has used up its retransmissions."""
        return self.leaving and self.id not in self._bq

    def members(self) -> list[Member]:
        return self.table.records()

    def get(self, member_id: str) -> Member | None:
        return self.table.get(member_id)

    @property
    def num_members(self) -> int:
        return self.table.live

    @property
    def num_alive(self) -> int:
        """Members this node sees as alive, itself included (O(1): the table keeps the count)."""
        return self.table.alive

    @property
    def pending_broadcasts(self) -> int:
        return len(self._bq)

    # ------------------------------------------------------------------ timers

    def _at(self, when: float, kind: int, arg: Any) -> None:
        self._tseq += 1
        heappush(self._heap, (when, self._tseq, kind, arg))

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _scaled(self, t: float) -> float:
        return t * (self.awareness + 1)

    def _health(self, delta: int) -> None:
        self.awareness = min(max(self.awareness + delta, 0), self.cfg.awareness_max - 1)

    def _push_pull_interval(self) -> float:
        """memberlist's pushPullScale: fewer full syncs per member as the cluster grows."""
        n = self.table.live
        iv = self.cfg.push_pull_interval
        if n <= 32:
            return iv
        return iv * (math.ceil(math.log2(n) - math.log2(32)) + 1)

    # ------------------------------------------------------------------ probing

    def _probe_tick(self) -> None:
        now = self.now
        self._at(now + self._scaled(self.cfg.probe_interval), _T_PROBE, None)
        p = self._probe
        if p is not None:
            self._probe = None
            self._acks.pop(p.seq, None)
            if not p.acked:
                self._probe_failed(p)
        if self.leaving:
            return
        target = self._next_target()
        if target is None:
            return
        p = _Probe(self._next_seq(), target.id, target.incarnation, now)
        self._probe = p
        self._acks[p.seq] = p
        self.stats["pings_sent"] += 1
        self.io.send(target.addr, (PING, p.seq, target.id, self._piggyback()))
        self._at(now + self._scaled(self.cfg.probe_timeout), _T_PROBE_TIMEOUT, p.seq)

    def _next_target(self) -> Member | None:
        perm = self._perm
        table = self.table
        for _ in range(table.size() + 1):
            a, b, m, i = perm
            # A new round also when the table grew: a round is a permutation of the indices that
            # existed when it began, so members that joined since (a whole join burst) would not be
            # probed until it ends — up to N probe intervals. memberlist inserts newcomers at a
            # random position in its probe list for the same reason.
            if i >= m or table.size() > m:
                m = table.size()
                if m == 0:
                    return None
                a = self.rng.randrange(1, m) if m > 1 else 1
                while math.gcd(a, m) != 1:
                    a = self.rng.randrange(1, m)
                b = self.rng.randrange(m)
                i = 0
                perm[0], perm[1], perm[2] = a, b, m
            perm[3] = i + 1
            k = (a * i + b) % m
            if k >= table.size():
                continue
            r = table.at(k)
            if r is not None and r.id != self.id and (r.state is ALIVE or r.state is SUSPECT):
                return r
        return None

    def _probe_timeout(self, seq: int) -> None:
        p = self._probe
        if p is None or p.seq != seq or p.acked:
            return
        target = self.table.get(p.target)
        if target is None:
            return
        p.indirect = True
        peers = self._random_peers(self.cfg.indirect_checks, exclude=p.target, alive_only=True)
        p.expected_nacks = len(peers)
        for peer in peers:
            self.stats["ping_reqs_sent"] += 1
            self.io.send(peer.addr, (PING_REQ, seq, target.id, target.host, target.port, self._piggyback()))

    def _on_ack(self, seq: int) -> None:
        e = self._acks.pop(seq, None)
        if e is None:
            self.stats["unknown_ack"] += 1
        elif isinstance(e, _Probe):
            e.acked = True
            self.stats["acks_recv"] += 1
            if not e.indirect:
                self._health(-1)
        else:
            self.io.send(e.requester, (ACK, e.seq, self._piggyback()))

    def _probe_failed(self, p: _Probe) -> None:
        # Lifeguard: missing nacks mean *we* may be the slow one; no helpers → plain penalty.
        if p.expected_nacks > 0:
            self._health(max(0, p.expected_nacks - p.nacks))
        else:
            self._health(1)
        r = self.table.get(p.target)
        if r is not None and (r.state is ALIVE or r.state is SUSPECT):
            self._on_suspect(r._replace(state=SUSPECT, incarnation=p.inc), self.id)

    def _random_peers(self, k: int, exclude: str, alive_only: bool) -> list[Member]:
        table = self.table
        m = table.size()

        def ok(r: Member | None) -> bool:
            return (r is not None and r.id != self.id and r.id != exclude
                    and (r.state is ALIVE or (not alive_only and r.state is SUSPECT)))

        if m <= 64:
            cands = [r for r in table if ok(r)]
            return self.rng.sample(cands, min(k, len(cands)))
        out: list[Member] = []
        seen: set[str] = set()
        for _ in range(8 * k + 16):
            r = table.at(self.rng.randrange(m))
            if ok(r) and r.id not in seen:  # type: ignore[union-attr]
                seen.add(r.id)  # type: ignore[union-attr]
                out.append(r)  # type: ignore[arg-type]
                if len(out) >= k:
                    break
        return out

    # ------------------------------------------------------------------ dissemination

    def _piggyback(self, budget: int | None = None, *, allow_oversize: bool = False) -> list[tuple[Member, str]]:
        if not self._bq:
            return []
        if budget is None:
            budget = self.cfg.packet_budget - PACKET_OVERHEAD
        limit = retransmit_limit(self.cfg.retransmit_mult, self.table.live)
        return self._bq.take(budget, limit, allow_oversize=allow_oversize)

    def _broadcast(self, rec: Member, frm: str, key: str | None = None) -> None:
        self._bq.push(key or rec.id, (rec, frm), update_size(rec, frm))
        self._ensure_gossip()

    def _ensure_gossip(self) -> None:
        if self.started and self._bq and self._gossip_at is None:
            self._gossip_at = self.now + self.cfg.gossip_interval
            self._at(self._gossip_at, _T_GOSSIP, None)

    def _gossip_tick(self) -> None:
        if self._gossip_at is None or self._gossip_at > self.now:
            return  # superseded by an earlier tick
        self._gossip_at = None
        for peer in self._random_peers(self.cfg.gossip_nodes, exclude=self.id, alive_only=False):
            ups = self._piggyback(allow_oversize=True)
            if not ups:
                break
            self.stats["gossip_sent"] += 1
            self.io.send(peer.addr, (GOSSIP, ups))
        self._ensure_gossip()

    def _sync_once(self) -> None:
        peers = [] if self.leaving else self._random_peers(1, exclude=self.id, alive_only=True)
        if peers:
            self.stats["push_pull"] += 1
            self.io.stream(peers[0].addr, self.make_push_pull())

    def _push_pull_tick(self) -> None:
        self._at(self.now + self._push_pull_interval(), _T_PUSH_PULL, None)
        if self.leaving:
            return
        peers = self._random_peers(1, exclude=self.id, alive_only=True)
        if peers:
            self.stats["push_pull"] += 1
            self.io.stream(peers[0].addr, self.make_push_pull())
        # Also try one member we think failed (dead, or dead and already reaped; never one that left), as
        # Serf's reconnect does: after a partition both sides hold the other as failed and would otherwise
        # never talk again. The push-pull brings the other side's state, and ours to it, in one exchange.
        for mid in [mid for mid, (_, until) in self._lost.items() if until <= self.now]:
            del self._lost[mid]
        dead = [(mid, r.addr) for mid in self._reap_at if (r := self.table.get(mid)) is not None and r.state == DEAD]
        dead += [(mid, addr) for mid, (addr, _) in self._lost.items() if self.table.get(mid) is None]
        if dead:
            _, addr = self.rng.choice(dead)
            self.stats["reconnects"] += 1
            self.io.stream(addr, self.make_push_pull())

    # ------------------------------------------------------------------ state transitions

    def _emit(self, kind: str, m: Member) -> None:
        if self.on_event is not None:
            self.on_event(kind, m)

    def _apply_updates(self, ups: list[tuple[Member, str]]) -> None:
        # The very record we hold (a codec hands out one object per distinct update) is stale news:
        # most updates received are, so that check is MemberTable.get inlined.
        over_get, base_get = self.table._over.get, self.table._brecs.get
        for m, frm in ups:
            s = m.state
            if s == ALIVE:
                cur = over_get(m.id, _MISS)
                if cur is m or (cur is _MISS and base_get(m.id) is m):
                    self.stats["stale_updates"] += 1
                    continue
                self._on_alive(m)
            elif s == SUSPECT:
                self._on_suspect(m, frm)
            else:
                self._on_dead(m, frm, left=s == LEFT)

    def _merge(self, sender: str, members: list[Member]) -> None:
        """Anti-entropy merge; a remote ``dead`` only makes us *suspect*, so the member can refute."""
        for m in members:
            s = m.state
            if s == ALIVE:
                self._on_alive(m)
            elif s == LEFT:
                self._on_dead(m, sender, left=True)
            else:
                self._on_suspect(m._replace(state=SUSPECT), sender)

    def _on_alive(self, r: Member) -> None:
        if r.id == self.id:
            if r.incarnation > self.me.incarnation and not self.leaving:
                self._refute(r.incarnation)  # an older life of ours is still being gossiped
            return
        cur = self.table.get(r.id)
        if cur is None:
            tomb = self._tombs.get(r.id)
            if tomb is not None and r.incarnation <= tomb[0] and self.now < tomb[1]:
                self.stats["stale_updates"] += 1
                return
            rec = r if r.meta is not None else r._replace(meta={})
            self.table.put(rec)
            self._lost.pop(r.id, None)
            self._emit(JOINED, rec)
            # An alive update is vouched for by the member itself (its incarnation), never by the relay:
            # so every relay sends the same bytes, which receivers' codecs then decode only once.
            self._broadcast(rec, rec.id)
            return
        if r.incarnation > cur.incarnation:
            rec = r if r.meta_version >= cur.meta_version else r._replace(meta=cur.meta,
                                                                         meta_version=cur.meta_version)
            self.table.put(rec)
            self._susp.pop(r.id, None)
            self._reap_at.pop(r.id, None)
            if cur.state == SUSPECT:
                self._emit(EV_ALIVE, rec)
            elif cur.state in (DEAD, LEFT):
                self._emit(JOINED, rec)
            if rec.meta_version > cur.meta_version:
                self._emit(META_UPDATED, rec)
            self._broadcast(rec, rec.id)
        elif r.meta_version > cur.meta_version and r.meta is not None:
            rec = cur._replace(meta=r.meta, meta_version=r.meta_version)
            self.table.put(rec)
            self._emit(META_UPDATED, rec)
            if cur.state in (ALIVE, SUSPECT):
                # Own queue key, so a meta-only update never displaces a queued suspicion.
                self._broadcast(rec._replace(state=ALIVE), rec.id, key=r.id + "\0meta")
        else:
            self.stats["stale_updates"] += 1

    def _on_suspect(self, r: Member, frm: str) -> None:
        if r.id == self.id:
            if not self.leaving and r.incarnation >= self.me.incarnation:
                self._refute(r.incarnation)
            return
        cur = self.table.get(r.id)
        if cur is None or r.incarnation < cur.incarnation:
            return
        if cur.state == SUSPECT:
            s = self._susp.get(r.id)
            if s is not None and s.confirm(frm):
                self._at(s.deadline, _T_SUSPECT, r.id)
                self._broadcast(cur, frm)
            return
        if cur.state != ALIVE:
            return
        rec = cur._replace(state=SUSPECT, incarnation=r.incarnation)
        self.table.put(rec)
        n = self.table.live
        k = self.cfg.suspicion_mult - 2
        if n - 2 < k:
            k = 0
        lo = suspicion_timeout(self.cfg.suspicion_mult, n, self.cfg.probe_interval)
        s = _Suspicion(frm, r.incarnation, k, lo, lo * self.cfg.suspicion_max_mult, self.now)
        if k == 0:
            s.deadline = self.now + lo
        self._susp[r.id] = s
        self._at(s.deadline, _T_SUSPECT, r.id)
        if frm == self.id:
            self.stats["suspected"] += 1
        self._emit(EV_SUSPECT, rec)
        self._broadcast(rec, frm)

    def _suspicion_expired(self, mid: str) -> None:
        s = self._susp.get(mid)
        if s is None or s.deadline > self.now:
            return  # refuted, or pulled earlier/later by a newer deadline entry
        cur = self.table.get(mid)
        if cur is None or cur.state != SUSPECT or cur.incarnation != s.incarnation:
            self._susp.pop(mid, None)
            return
        self.stats["declared_dead"] += 1
        self._on_dead(cur._replace(state=DEAD), self.id, left=False)

    def _on_dead(self, r: Member, frm: str, *, left: bool) -> None:
        if r.id == self.id:
            if not self.leaving and r.incarnation >= self.me.incarnation:
                self._refute(r.incarnation)
            return
        cur = self.table.get(r.id)
        if cur is None or r.incarnation < cur.incarnation or cur.state == LEFT:
            return
        if cur.state == DEAD and not left:
            return
        rec = cur._replace(state=LEFT if left else DEAD, incarnation=r.incarnation)
        self.table.put(rec)
        self._susp.pop(r.id, None)
        when = self.now + self.cfg.dead_reap_after
        self._reap_at[r.id] = when
        self._at(when, _T_REAP, r.id)
        self._emit(EV_LEFT if left else EV_DEAD, rec)
        self._broadcast(rec, frm)

    def _refute(self, accused: int) -> None:
        self.me = self.me._replace(incarnation=max(accused, self.me.incarnation) + 1, state=ALIVE)
        self.table.put(self.me)
        self.stats["refuted"] += 1
        self._health(1)
        self._broadcast(self.me, self.id)

    def _reap(self, mid: str) -> None:
        when = self._reap_at.get(mid)
        if when is None or when > self.now:
            return  # re-declared later, or revived
        cur = self.table.get(mid)
        self._reap_at.pop(mid, None)
        if cur is None or cur.state not in (DEAD, LEFT):
            return
        self.table.remove(mid)
        self._tombs[mid] = (cur.incarnation, self.now + self.cfg.dead_reap_after)
        if len(self._tombs) > self.cfg.tombstones:
            del self._tombs[next(iter(self._tombs))]
        if cur.state == DEAD and self.cfg.reconnect_for > 0:
            self._lost[mid] = (cur.addr, self.now + self.cfg.reconnect_for)
            if len(self._lost) > self.cfg.tombstones:
                del self._lost[next(iter(self._lost))]
        self._emit(REAPED, cur)

    def _check_meta(self, meta: Mapping[str, Any]) -> None:
        size = packed_size(meta)
        if size > self.cfg.meta_max_bytes:
            raise ValueError(f"metadata is {size} bytes encoded; the limit is {self.cfg.meta_max_bytes}")
