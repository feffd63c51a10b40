"""Runner supervision: one torch runner process per loaded model, with keep-alive, LRU unloading and queues."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from omx.protocols import frames
from omx.protocols.api import ApiError

log = logging.getLogger("omx.runners")

SERVER_BUSY = "server busy, please try again.  maximum pending requests exceeded"


@dataclass
class LoadSpec:
    """What a runner needs to load a model; `key` identifies the loaded instance (the manifest digest)."""

    key: str
    name: str
    kind: str  # "gguf" | "hf"
    dir: str
    file: str | None = None
    size: int = 0
    digest: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    num_ctx: int = 0


class RunnerDied(Exception):
    pass


class Runner:
    """A live runner process and the requests multiplexed over its pipe."""

    def __init__(self, spec: LoadSpec, proc: asyncio.subprocess.Process, num_parallel: int) -> None:
        self.spec = spec
        self.proc = proc
        self.num_parallel = num_parallel
        self.info: dict[str, Any] = {}
        self.pending: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self.inflight = 0
        self.keep_alive = 300.0
        self.expires_at = math.inf  # wall clock; inf while busy or kept forever
        self.last_used = time.monotonic()
        self.dead: str | None = None
        self.unload_when_idle = False  # asked to unload while busy: no request's keep_alive may undo that
        self.reader: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self._ids = itertools.count(1)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def queued(self) -> int:
        """Requests waiting for one of the runner's parallel slots."""
        return max(0, self.inflight - self.num_parallel)

    async def wait_ready(self, limit: float) -> None:
        assert self.proc.stdout is not None
        try:
            msg = await asyncio.wait_for(frames.read_async(self.proc.stdout), limit)
        except TimeoutError:
            raise RunnerDied(f"model load timed out after {limit:.0f}s") from None
        except frames.FrameError as e:
            raise RunnerDied(f"runner protocol error: {e}") from None
        if msg is None:
            code = await self.proc.wait()
            raise RunnerDied(f"llama runner process has terminated: exit status {code}")
        if msg.get("t") == "fatal":
            raise RunnerDied(f"unable to load model: {msg.get('error')}")
        if msg.get("t") != "ready":
            raise RunnerDied(f"runner protocol error: unexpected {msg.get('t')!r}")
        self.info = msg
        self.reader = asyncio.create_task(self._read_loop(), name=f"runner-{self.pid}")

    async def _read_loop(self) -> None:
        assert self.proc.stdout is not None
        reason = "runner closed its output"
        try:
            while True:
                msg = await frames.read_async(self.proc.stdout)
                if msg is None:
                    break
                q = self.pending.get(str(msg.get("id")))
                if q is not None:
                    q.put_nowait(msg)
        except (frames.FrameError, ConnectionError) as e:
            reason = f"runner protocol error: {e}"
        code = await self.proc.wait()
        self.dead = f"llama runner process has terminated: exit status {code}" if code else reason
        log.warning("runner %s for %s ended: %s", self.pid, self.spec.name, self.dead)
        for q in self.pending.values():
            q.put_nowait({"t": "error", "error": self.dead, "status": 500})

    def _send(self, obj: dict[str, Any]) -> None:
        if self.dead or self.proc.stdin is None or self.proc.stdin.is_closing():
            raise RunnerDied(self.dead or "runner is gone")
        self.proc.stdin.write(frames.encode(obj))

    async def request(self, op: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Send one op and yield the runner's frames for it until a terminal one; cancels on early exit."""
        rid = str(next(self._ids))
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.pending[rid] = q
        finished = False
        try:
            self._send({**op, "id": rid})
            while True:
                msg = await q.get()
                t = msg.get("t")
                if t in ("done", "error", "embeddings", "tokens"):
                    finished = True
                yield msg
                if finished:
                    return
        finally:
            self.pending.pop(rid, None)
            if not finished and not self.dead:
                with contextlib.suppress(RunnerDied, ConnectionError):
                    self._send({"op": "cancel", "id": rid})

    async def stop(self, grace: float = 5.0) -> None:
        if self.timer:
            self.timer.cancel()
        if self.proc.returncode is None:
            if self.proc.stdin:
                self.proc.stdin.close()  # the runner exits on EOF
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self.reader:
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader


class RunnerManager:
    """Loads models on demand, shares one runner per model, unloads on keep-alive expiry and LRU pressure."""

    def __init__(
        self,
        *,
        max_loaded: int,
        num_parallel: int,
        max_queue: int,
        default_keep_alive: float,
        load_timeout: float,
        device: str,
        dtype: str,
        log_dir: str | None = None,
    ) -> None:
        self.max_loaded = max_loaded
        self.num_parallel = num_parallel
        self.max_queue = max_queue
        self.default_keep_alive = default_keep_alive
        self.load_timeout = load_timeout
        self.device = device
        self.dtype = dtype
        self.log_dir = log_dir
        self.runners: dict[str, Runner] = {}
        self._loading: dict[str, asyncio.Future[Runner]] = {}
        self._lock = asyncio.Lock()

    # ---- what is loaded now ------------------------------------------------------------------
    def live(self) -> list[Runner]:
        """Runners whose process is up (a dead one stays listed until its last request is released)."""
        return [r for r in self.runners.values() if not r.dead]

    @property
    def inflight(self) -> int:
        """Requests running or queued on the live runners: this node's load, as gossip advertises it."""
        return sum(r.inflight for r in self.live())

    @property
    def queued(self) -> int:
        return sum(r.queued for r in self.live())

    # ---- loading ---------------------------------------------------------------------------
    async def acquire(self, spec: LoadSpec) -> tuple[Runner, float]:
        """A running runner for `spec` with one request slot reserved; returns (runner, load seconds)."""
        r = self.runners.get(spec.key)
        if r is not None and not r.dead:
            self._reserve(r)
            return r, 0.0
        t0 = time.perf_counter()
        fut = self._loading.get(spec.key)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._loading[spec.key] = fut
            try:
                r = await self._load(spec)
                fut.set_result(r)
            except BaseException as e:
                fut.set_exception(e)
                fut.exception()  # mark retrieved: other waiters may not exist
                raise
            finally:
                self._loading.pop(spec.key, None)
        else:
            r = await asyncio.shield(fut)
        self._reserve(r)
        return r, time.perf_counter() - t0

    def _reserve(self, r: Runner) -> None:
        if r.inflight >= r.num_parallel + self.max_queue:
            raise ApiError(503, SERVER_BUSY)
        r.inflight += 1
        r.last_used = time.monotonic()
        r.expires_at = math.inf
        if r.timer:
            r.timer.cancel()
            r.timer = None

    async def _load(self, spec: LoadSpec) -> Runner:
        async with self._lock:
            old = self.runners.pop(spec.key, None)
            if old is not None:
                await old.stop()
            while len(self.runners) >= self.max_loaded:
                idle = [r for r in self.runners.values() if r.inflight == 0]
                if not idle:
                    raise ApiError(503, SERVER_BUSY)
                victim = min(idle, key=lambda r: r.last_used)
                log.info("unloading %s to make room (max loaded models %d)", victim.spec.name, self.max_loaded)
                await self._unload(victim)
            load = {"kind": spec.kind, "dir": spec.dir, "file": spec.file, "device": self.device,
                    "dtype": self.dtype, "num_parallel": self.num_parallel}
            stderr: Any = None
            if self.log_dir:
                os.makedirs(self.log_dir, exist_ok=True)
                stderr = open(os.path.join(self.log_dir, "runner.log"), "ab")  # noqa: ASYNC230
            try:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "omx.models.runner", "--spec", json.dumps(load),
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr,
                    limit=frames.MAX_FRAME,
                )
            finally:
                if stderr is not None:
                    stderr.close()
            r = Runner(spec, proc, self.num_parallel)
            try:
                await r.wait_ready(self.load_timeout)
            except BaseException:
                await r.stop(grace=1.0)
                raise
            r.num_parallel = int(r.info.get("num_parallel", self.num_parallel))
            self.runners[spec.key] = r
            log.info("loaded %s in runner pid %d on %s", spec.name, r.pid, r.info.get("device"))
            return r

    # ---- release and expiry ------------------------------------------------------------------
    def release(self, r: Runner, keep_alive: float | None) -> None:
        """End of one request: schedule expiry once the runner is idle (keep_alive 0 unloads now)."""
        r.inflight = max(0, r.inflight - 1)
        r.last_used = time.monotonic()
        r.keep_alive = self.default_keep_alive if keep_alive is None else keep_alive
        if keep_alive is not None and math.isinf(keep_alive):
            r.unload_when_idle = False  # pinned again (placed here, or a client asked to keep it forever)
        if r.unload_when_idle:
            r.keep_alive = 0.0
        if r.dead:
            if self.runners.get(r.spec.key) is r and r.inflight == 0:
                self.runners.pop(r.spec.key, None)
            return
        if r.inflight == 0:
            self._schedule_expiry(r)

    def _schedule_expiry(self, r: Runner) -> None:
        if r.timer:
            r.timer.cancel()
            r.timer = None
        if math.isinf(r.keep_alive):
            r.expires_at = math.inf
            return
        r.expires_at = time.time() + r.keep_alive
        loop = asyncio.get_running_loop()
        r.timer = loop.call_later(max(0.0, r.keep_alive), lambda: asyncio.ensure_future(self._expire(r)))

    async def _expire(self, r: Runner) -> None:
        async with self._lock:
            if r.inflight == 0 and self.runners.get(r.spec.key) is r:
                await self._unload(r)

    async def _unload(self, r: Runner) -> None:
        self.runners.pop(r.spec.key, None)
        await r.stop()
        log.info("unloaded %s", r.spec.name)

    async def unload_key(self, key: str) -> None:
        async with self._lock:
            r = self.runners.get(key)
            if r is None:
                return
            if r.inflight == 0:
                await self._unload(r)
            else:
                r.keep_alive = 0.0  # unload when the last request finishes
                r.unload_when_idle = True

    def reap_dead(self) -> None:
        for key, r in list(self.runners.items()):
            if r.dead and r.inflight == 0:
                self.runners.pop(key, None)

    async def close(self) -> None:
        async with self._lock:
            for r in list(self.runners.values()):
                await self._unload(r)
