"""asyncio driver: runs a :class:`SwimCore` over real UDP (probes, gossip) and TCP (push-pull, joins).

Everything that crosses the network goes through :class:`Codec`, so a hostile or misconfigured
peer can only make a packet be dropped and counted (see :meth:`SwimNode.stats`). TCP frames are
a 4-byte big-endian length followed by one codec frame; a server answers one push-pull per
connection and closes it without a word when the request fails authentication.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from random import Random
from typing import Any

from .codec import PUSH_PULL, PUSH_PULL_REPLY, Codec, Member
from .core import SwimConfig, SwimCore

log = logging.getLogger(__name__)

_UNSET: Any = object()
_MAX_UDP = 65_507
_MAX_STREAM = 32 * 1024 * 1024
_MAX_STREAM_CONNS = 512  # open push-pull connections before we refuse outright
_STREAM_WORKERS = 16  # served at once; the rest wait (a mass join queues instead of being reset)
_MAX_PENDING_STREAMS = 8


@dataclass(frozen=True, slots=True)
class MemberEvent:
    """A membership change seen by this node: ``kind`` is one of joined, suspect, alive, dead,
    left, meta_updated, reaped."""

    kind: str
    member: Member


class JoinError(ConnectionError):
    """No seed accepted our join. ``reasons`` maps each seed to what went wrong."""

    def __init__(self, message: str, reasons: Mapping[str, str], key_rejected: bool) -> None:
        super().__init__(message)
        self.reasons = dict(reasons)
        self.key_rejected = key_rejected


class _Rejected(Exception):
    """The peer was reachable but did not accept our packets (usually: a different cluster key)."""


def parse_addr(s: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); raises ValueError on anything else."""
    host, sep, port = s.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {s!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


_READ_BATCH = 256  # datagrams drained per wake-up


class SwimNode:
    """A SWIM member on real sockets.

    ``key`` is the 32-byte cluster key (or a keyring list, first key used to send); it has no
    default — pass ``key=None`` explicitly to run unencrypted. ``bind_port=0`` picks a free port
    (TCP and UDP share it). ``advertise_host`` is the address others reach us at (defaults to
    ``bind_host``, which then must not be a wildcard).
    """

    def __init__(self, node_id: str, bind_host: str = "127.0.0.1", bind_port: int = 0,
                 key: bytes | Sequence[bytes] | None = _UNSET, meta: Mapping[str, Any] | None = None,
                 config: SwimConfig | None = None, *, advertise_host: str | None = None,
                 on_event: Callable[[MemberEvent], None] | None = None) -> None:
        if key is _UNSET:
            raise TypeError("SwimNode needs key=<32-byte cluster key>; pass key=None to run unencrypted")
        self.id = node_id
        self.bind_host = bind_host
        self.bind_port = bind_port
        self.advertise_host = advertise_host or bind_host
        if self.advertise_host in ("0.0.0.0", "::", ""):
            raise ValueError("binding a wildcard address needs advertise_host")
        self.config = config or SwimConfig()
        self.codec = Codec(node_id, key, max_packet=_MAX_UDP)
        self.on_event = on_event
        self._meta = dict(meta or {})
        SwimCore(node_id, "x", 0, io=self, config=self.config, meta=self._meta)  # validates meta early
        self.core: SwimCore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._udp: socket.socket | None = None
        self._server: asyncio.Server | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._subs: set[asyncio.Queue[MemberEvent]] = set()
        self._conns = 0
        self._stream_slots = asyncio.Semaphore(_STREAM_WORKERS)
        self._closing = False
        self._net: Counter[str] = Counter()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        for _ in range(20):
            # A deep accept backlog: with asyncio's default (100) a mass join overflows it and the
            # kernel drops SYNs, which clients only retry after a whole second.
            server = await asyncio.start_server(self._serve_stream, self.bind_host, self.bind_port,
                                                backlog=_MAX_STREAM_CONNS)
            port = server.sockets[0].getsockname()[1]
            try:
                udp = self._bind_udp(port)
            except OSError:
                server.close()
                await server.wait_closed()
                if self.bind_port:
                    raise
                continue
            break
        else:
            raise OSError("could not bind one port for both TCP and UDP")
        self._server, self._udp, self.port = server, udp, port  # type: ignore[assignment]
        loop.add_reader(udp.fileno(), self._read_ready)
        # Incarnations start at boot time, so a restarted node outranks gossip about its previous life.
        self.core = SwimCore(self.id, self.advertise_host, port, io=self, config=self.config, rng=Random(),
                             meta=self._meta, incarnation=int(time.time()), on_event=self._core_event)
        self.core.start(loop.time())
        self._pump()

    async def join(self, seeds: Sequence[str]) -> int:
        """Push-pull with every seed; returns how many answered. Raises :class:`JoinError` if none did."""
        core = self._core()
        reasons: dict[str, str] = {}
        targets: list[tuple[str, tuple[str, int]]] = []
        for s in seeds:
            try:
                addr = parse_addr(s)
            except ValueError as e:
                reasons[s] = f"bad address: {e}"
                continue
            if addr != (self.advertise_host, self.port):
                targets.append((s, addr))
        results = await asyncio.gather(
            *(self._exchange(addr, core.make_push_pull(join=True), self.config.join_timeout) for _, addr in targets),
            return_exceptions=True)
        ok = 0
        rejected = 0
        for (s, _), res in zip(targets, results, strict=True):
            if isinstance(res, _Rejected):
                rejected += 1
                reasons[s] = str(res)
            elif isinstance(res, BaseException):
                reasons[s] = f"unreachable: {type(res).__name__}: {res}".rstrip(": ")
            else:
                ok += 1
        if ok == 0 and seeds:
            if rejected:
                msg = "join failed: no member accepted our packets; check the cluster key"
            else:
                msg = "join failed: no seed could be reached"
            detail = "; ".join(f"{k}: {v}" for k, v in reasons.items())
            raise JoinError(f"{msg} ({detail})", reasons, key_rejected=rejected > 0)
        return ok

    async def leave(self, timeout: float = 2.0) -> bool:  # noqa: ASYNC109 - the documented API
        """Gossip our departure; returns True when the news had been fully sent before ``timeout``."""
        core = self._core()
        core.leave(self._now())
        self._pump()
        deadline = self._now() + timeout
        while not core.leave_done and self._now() < deadline:  # noqa: ASYNC110 - polls the sans-IO core
            await asyncio.sleep(0.01)
        return core.leave_done

    async def stop(self) -> None:
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        udp, self._udp = self._udp, None
        if udp is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(udp.fileno())
            udp.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    # ------------------------------------------------------------------ queries and updates

    def members(self) -> list[Member]:
        return self._core().members()

    def get(self, member_id: str) -> Member | None:
        return self._core().get(member_id)

    @property
    def num_alive(self) -> int:
        """Members this node sees as alive, itself included; O(1), cheap enough to poll."""
        return self._core().num_alive

    def set_meta(self, meta: Mapping[str, Any]) -> None:
        """Replace our metadata (owner only); raises ValueError over ``config.meta_max_bytes``."""
        if self.core is None:
            SwimCore(self.id, "x", 0, io=self, config=self.config, meta=meta)
            self._meta = dict(meta)
            return
        self.core.set_meta(self._now(), meta)
        self._pump()

    @property
    def local_health(self) -> int:
        """Lifeguard awareness score: 0 is healthy; probe interval and timeout scale by (score+1)."""
        return self.core.awareness if self.core else 0

    @property
    def address(self) -> str:
        return f"{self.advertise_host}:{self.port}"

    def stats(self) -> dict[str, Any]:
        core = self._core()
        return {"members": core.num_members, "local_health": core.awareness, "accepted": self.codec.accepted,
                "dropped": dict(self.codec.drops), "dropped_total": sum(self.codec.drops.values()),
                **self._net, **core.stats}

    async def events(self) -> AsyncIterator[MemberEvent]:
        """Membership events from the first ``__anext__`` on (bounded queue; overflow is counted)."""
        q: asyncio.Queue[MemberEvent] = asyncio.Queue(maxsize=10_000)
        self._subs.add(q)
        try:
            while True:
                yield await q.get()
        finally:
            self._subs.discard(q)

    # ------------------------------------------------------------------ CoreIO

    def send(self, addr: tuple[str, int], msg: tuple) -> None:
        if self._udp is None or self._closing:
            return
        data = self.codec.encode(msg)
        if len(data) > _MAX_UDP:
            self._net["udp_too_big"] += 1
            return
        self._net["udp_sent"] += 1
        try:
            self._udp.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self._net["udp_send_full"] += 1  # a full socket buffer loses the datagram, as the network could
        except OSError:
            self._net["udp_errors"] += 1

    def stream(self, addr: tuple[str, int], msg: tuple) -> None:
        if self._closing or len(self._tasks) >= _MAX_PENDING_STREAMS:
            return
        task = asyncio.get_running_loop().create_task(self._stream_task(addr, msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ internals

    def _core(self) -> SwimCore:
        if self.core is None:
            raise RuntimeError("SwimNode is not started")
        return self.core

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _pump(self) -> None:
        """(Re)arm the single loop timer at the core's next deadline."""
        if self.core is None or self._closing or self._loop is None:
            return
        d = self.core.next_deadline()
        if d is None or (self._timer is not None and self._timer_at <= d):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = d
        self._timer = self._loop.call_at(d, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.core is not None and not self._closing:
            self.core.tick(self._now())
            self._pump()

    def _core_event(self, kind: str, m: Member) -> None:
        if self.on_event is None and not self._subs:
            return  # nobody listens: a join burst makes ~N² events
        ev = MemberEvent(kind, m)
        if self.on_event is not None:
            try:
                self.on_event(ev)
            except Exception:
                log.exception("on_event callback failed")
        for q in self._subs:
            try:
                q.put_nowait(ev)
            except asyncio.QueueFull:
                self._net["events_overflow"] += 1

    def _bind_udp(self, port: int) -> socket.socket:
        """A plain non-blocking UDP socket; we read it ourselves (see :meth:`_read_ready`)."""
        family, _, _, _, sockaddr = socket.getaddrinfo(self.bind_host, port, type=socket.SOCK_DGRAM)[0]
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind(sockaddr)
        except OSError:
            sock.close()
            raise
        return sock

    def _read_ready(self) -> None:
        """Drain the socket, not one datagram per wake-up as asyncio's datagram transport does.

        With many members on one loop (or any busy loop) a one-per-wake-up reader leaves acks queued
        behind other datagrams while the probe-timeout timer runs first: a slow loop then looks like
        dead peers. Draining handles everything that arrived before the timers of the same round.
        """
        sock = self._udp
        for _ in range(_READ_BATCH):
            if sock is None or self._closing:
                return
            try:
                data, addr = sock.recvfrom(_MAX_UDP + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._net["udp_errors"] += 1
                return
            self._on_datagram(data, addr)

    def _on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        self._net["udp_recv"] += 1
        if self.core is None or self._closing:
            return
        res = self.codec.decode(data)
        if res is None:
            return
        try:
            self.core.on_message(self._now(), (addr[0], addr[1]), res[1])
        except Exception:  # a bug must not take the member down; count it and carry on
            self._net["handler_errors"] += 1
            log.exception("SWIM message handler failed")
        self._pump()

    async def _stream_task(self, addr: tuple[str, int], msg: tuple) -> None:
        try:
            await self._exchange(addr, msg, self.config.stream_timeout)
        except (_Rejected, OSError, TimeoutError, asyncio.IncompleteReadError):
            self._net["stream_errors"] += 1

    async def _exchange(self, addr: tuple[str, int], msg: tuple, limit: float) -> None:
        """One push-pull as the client: send our state, merge the reply."""
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_connection(addr[0], addr[1])
            try:
                data = self.codec.encode(msg)
                writer.write(len(data).to_bytes(4, "big") + data)
                await writer.drain()
                try:
                    n = int.from_bytes(await reader.readexactly(4), "big")
                except asyncio.IncompleteReadError as e:
                    if not e.partial:
                        raise _Rejected("the member closed the connection without answering: it did not accept "
                                        "our packets (no member accepted our packets; check the cluster key)") from None
                    raise
                if n > _MAX_STREAM:
                    raise _Rejected("reply too large")
                body = await reader.readexactly(n)
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
        self.codec.last_drop = ""
        res = self.codec.decode(body, stream=True)
        if res is None or res[1][0] != PUSH_PULL_REPLY:
            why = self.codec.last_drop or "unexpected reply"
            if why == "key":
                raise _Rejected("the reply failed authentication; check the cluster key")
            raise _Rejected(f"the reply was dropped ({why})")
        self._net["streams_out"] += 1
        self._core().on_push_pull_reply(self._now(), res[1])
        self._pump()

    async def _serve_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._conns >= _MAX_STREAM_CONNS or self.core is None:
            self._net["streams_refused"] += 1
            writer.close()
            return
        self._conns += 1
        try:
            async with self._stream_slots, asyncio.timeout(self.config.stream_timeout):
                n = int.from_bytes(await reader.readexactly(4), "big")
                if n > _MAX_STREAM:
                    self.codec.drops["oversized"] += 1
                    return
                body = await reader.readexactly(n)
                res = self.codec.decode(body, stream=True)
                if res is None or res[1][0] != PUSH_PULL:
                    return  # silence: an unauthenticated peer learns nothing
                reply = self.core.on_push_pull(self._now(), res[1])
                self._pump()
                data = self.codec.encode(reply)
                writer.write(len(data).to_bytes(4, "big") + data)
                await writer.drain()
                self._net["streams_in"] += 1
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError):
            self._net["stream_errors"] += 1
        except Exception:
            self._net["handler_errors"] += 1
            log.exception("push-pull handler failed")
        finally:
            self._conns -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
