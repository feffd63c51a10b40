"""Blob transfer between stores: ranged chunks from several sources at once, verified as they arrive.

A blob is fetched in fixed-size chunks, spread over every usable source (omx peers or an OCI registry): each
worker asks its source for a run of consecutive chunks in one HTTP Range request, and reports every chunk as
soon as it is in. Chunks may arrive out of order; each is received straight into its place in a hidden
partial file, and fed to one running sha256 once the contiguous prefix reaches it. That is the only pass
over the data: when the last chunk is hashed the digest is known, and a matching blob is renamed into place
at once; the store journals it and fsyncs it in the background (see `Store.install_blob`), so no unverified
byte is ever visible, even after a crash. Workers run at most `window` chunks ahead of the hash.

The bytes never pass through the event loop: plain-HTTP sources are read in threads on blocking keep-alive
sockets (spliced from the socket into the page cache: the only copy), and the hash runs in a thread too,
reading the file through a memory mapping, so receiving and hashing overlap on different cores (both release
the GIL). The loop only hands out runs and counts chunks. TLS or redirecting sources go through aiohttp.

The whole-blob sha256 is the only ground truth (a source's own claims prove nothing), so a mismatch is
localized by refetching one contributing source's chunks from the others: if that fixes the digest, the
source served bad bytes and is marked bad. Partial files (`blobs/.omx-partial-<hex>`, with a JSON record of
the chunks written) survive interruption and are resumed (one that holds no chunk yet is removed: it would only hold
the declared size); they never look like blobs. Concurrent requests for one blob share one transfer, which
stops once none of them waits for it any more.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import fcntl
import functools
import hashlib
import http.client
import json
import logging
import mmap
import os
import select
import shutil
import socket
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from omx.models.manifest import Layer, Manifest
from omx.models.names import ModelName
from omx.models.store import BlobNotFound, ModelNotFound, Store, _atomic_write, _hex

log = logging.getLogger("omx.transfer")

PARTIAL_PREFIX = ".omx-partial-"
CHUNK = 4 << 20  # the unit of hashing, resuming and blame: the hash follows the receive this closely
RUN = 64 << 20  # the most one request asks for (consecutive chunks): a request costs a seeder ~2 ms of CPU
STREAMS_PER_SOURCE = 1  # one connection per source, busy with long runs; more only split the CPU further
MAX_STREAMS = 8
_HASH_BATCH = 16  # chunks hashed in one call at most, so that the window moves on in steps of a run or less
BAD_FOR_S = 600.0  # how long a source that served bad bytes is left out
_RECORD_EVERY_S = 1.0
_READ_PIECE = 1 << 20  # received per blocking read: progress and cancellation are checked between pieces
_RCVBUF = 4 << 20  # the usual net.core.rmem_max; the kernel doubles it
# Linux ≥ 5.14 (the mmap module names it only from Python 3.13)
_MADV_POPULATE_WRITE: int | None = getattr(mmap, "MADV_POPULATE_WRITE", 23) if sys.platform == "linux" else None
_F_SETPIPE_SZ: int = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux; named by fcntl from Python 3.10
_F_GETPIPE_SZ: int = getattr(fcntl, "F_GETPIPE_SZ", 1032)
# what splice(2) answers where it cannot be used (old kernels, some filesystems, seccomp sandboxes)
_NO_SPLICE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP})
_CONNECT_TIMEOUT = 10.0
MIN_RATE = 2048.0  # bytes/s a request must average over each `timeout` window, or its source is given up on
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_T = TypeVar("_T")


class TransferError(Exception):
    """A blob or manifest could not be fetched from any source; the message is for the user."""


class BudgetExceeded(TransferError):
    """Not enough disk budget (or free disk) for a pull, even after evicting what may be evicted."""


class SourceError(Exception):
    """One request to one source failed; `permanent` means the source cannot serve this blob at all."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class _DiskError(Exception):
    """Writing our own partial file failed: no other source can help."""

    def __init__(self, os_error: OSError) -> None:
        super().__init__(os_error.strerror or str(os_error))
        self.os_error = os_error


class _NotDirect(Exception):
    """The source redirects: fetch through aiohttp, which follows redirects and drops credentials across hosts."""


@dataclass(frozen=True)
class Source:
    """Somewhere blobs can be fetched from: `blob_prefix + "sha256:<hex>"` answers ranged GETs."""

    id: str
    blob_prefix: str
    headers: Mapping[str, str] = field(default_factory=dict)
    streams: int = 0  # requests to it at a time; 0: the fetcher's (one: peers on a LAN need no more)

    def url(self, hexd: str) -> str:
        return f"{self.blob_prefix}sha256:{hexd}"


class RateLimiter:
    """Token bucket shared by every transfer of a node (bytes per second; one second of burst).

    Takers reserve their bytes (the bucket may go into debt) and then sleep off their share, so it works the
    same from the event loop and from the receiving threads."""

    def __init__(self, rate: float) -> None:
        self.rate = float(rate)
        self._tokens = self.rate
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def _reserve(self, n: int) -> float:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.rate, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            return max(0.0, -self._tokens / self.rate)

    async def take(self, n: int) -> None:
        if delay := self._reserve(n):
            await asyncio.sleep(delay)

    def take_blocking(self, n: int, cancelled: threading.Event) -> None:
        if delay := self._reserve(n):
            cancelled.wait(delay)


class SourceHealth:
    """Sources that served bad bytes, left out of new transfers for a while."""

    def __init__(self, bad_for: float = BAD_FOR_S) -> None:
        self.bad_for = bad_for
        self._bad: dict[str, tuple[float, str]] = {}

    def mark_bad(self, source_id: str, reason: str) -> None:
        log.warning("marking source %s bad for %.0fs: %s", source_id, self.bad_for, reason)
        self._bad[source_id] = (time.monotonic() + self.bad_for, reason)

    def is_bad(self, source_id: str) -> bool:
        entry = self._bad.get(source_id)
        if entry is None:
            return False
        if entry[0] < time.monotonic():
            del self._bad[source_id]
            return False
        return True

    def bad(self) -> dict[str, str]:
        return {k: v[1] for k, v in self._bad.items() if self.is_bad(k)}

    def usable(self, sources: Iterable[Source]) -> list[Source]:
        return [s for s in sources if not self.is_bad(s.id)]


# --------------------------------------------------------------------------------------------------------
# Partial files


def partial_path(store: Store, hexd: str) -> Path:
    return store.blobs_dir / f"{PARTIAL_PREFIX}{hexd}"


def _record_path(store: Store, hexd: str) -> Path:
    return store.blobs_dir / f"{PARTIAL_PREFIX}{hexd}.json"


def remove_partial(store: Store, hexd: str) -> None:
    for p in (partial_path(store, hexd), _record_path(store, hexd)):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _load_record(store: Store, hexd: str, size: int, chunk: int) -> set[int]:
    """Chunks a previous transfer wrote; anything inconsistent starts the blob over."""
    path, rec = partial_path(store, hexd), _record_path(store, hexd)
    try:
        data = json.loads(rec.read_bytes())
        if data.get("size") != size or data.get("chunk") != chunk or path.stat().st_size != size:
            raise ValueError("record does not match")
        done = {int(i) for i in data.get("done", [])}
        if any(not 0 <= i < -(-size // chunk) for i in done):
            raise ValueError("chunk out of range")
        return done
    except (OSError, ValueError, TypeError, AttributeError):
        remove_partial(store, hexd)
        return set()


def partial_bytes(store: Store) -> int:
    total = 0
    with contextlib.suppress(OSError), os.scandir(store.blobs_dir) as it:
        for e in it:
            if e.name.startswith(PARTIAL_PREFIX):
                with contextlib.suppress(OSError):
                    total += e.stat(follow_symlinks=False).st_size
    return total


# --------------------------------------------------------------------------------------------------------
# Blocking I/O, run in the fetcher's threads (recv and sha256 release the GIL)


class _Conn:
    """One worker's keep-alive HTTP/1.1 connection for blocking fetches; `abort` wakes a thread blocked on it."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.http: http.client.HTTPConnection | None = None
        self.used = False  # has served a response: the server may have closed it since
        self.cancelled = threading.Event()
        self._sock: socket.socket | None = None  # kept: http.client drops its own after `Connection: close`
        self._pipe: tuple[int, int, int] | None = None

    def get(self, host: str, port: int | None) -> http.client.HTTPConnection:
        c = self.http
        if c is None or (c.host, c.port) != (host, port or 80):
            self.close()
            c = http.client.HTTPConnection(host, port, timeout=_CONNECT_TIMEOUT)
            c.connect()
            assert c.sock is not None
            # a fixed large buffer: with the autotuned one (128 KiB to start) each recv returns a sliver, and
            # the extra wakeups and syscalls on both ends cost more CPU than the copy itself
            with contextlib.suppress(OSError):
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
            c.sock.settimeout(self.timeout)
            c.timeout = self.timeout
            self.http, self.used, self._sock = c, False, c.sock
        return c

    def pipe(self) -> tuple[int, int, int]:
        """(read end, write end, capacity) of this connection's pipe for splice(2), one piece big where the
        system allows (/proc/sys/fs/pipe-max-size)."""
        if self._pipe is None:
            r, w = os.pipe()
            with contextlib.suppress(OSError):
                fcntl.fcntl(w, _F_SETPIPE_SZ, _READ_PIECE)
            self._pipe = (r, w, fcntl.fcntl(w, _F_GETPIPE_SZ))
        return self._pipe

    def close(self) -> None:
        c, self.http, self._sock = self.http, None, None
        if c is not None:
            c.close()
        p, self._pipe = self._pipe, None
        if p is not None:  # closed with the connection: a failed piece may have left bytes in it
            os.close(p[0])
            os.close(p[1])

    def abort(self) -> None:
        self.cancelled.set()
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


# --------------------------------------------------------------------------------------------------------
# One blob


@dataclass(eq=False)
class _Run:
    """Consecutive chunks asked of one source in one request. The receiving thread advances `received` (bytes,
    in order) and `done` (whole chunks); the loop hands done chunks to the hash (`marked`, `counted` bytes)."""

    chunks: list[int]
    src: str
    start: int  # byte offsets in the blob: [start, end)
    end: int
    received: int = 0
    done: int = 0
    marked: int = 0
    counted: int = 0


class _Signal:
    """Wakes every waiter at the next change. The transfer's state is only touched on the event loop, and never
    across an await, so it needs no lock: waiters re-check their condition after each wake-up."""

    def __init__(self) -> None:
        self._fut: asyncio.Future[None] | None = None

    def notify(self) -> None:
        fut, self._fut = self._fut, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def wait(self) -> None:
        if self._fut is None:
            self._fut = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._fut)  # a cancelled waiter must not cancel the others' future


class BlobTransfer:
    """The shared download of one blob; `completed` counts bytes on disk (resumed ones included)."""

    def __init__(self, fetcher: Fetcher, hexd: str, size: int, sources: Sequence[Source]) -> None:
        self.fetcher = fetcher
        self.hex = hexd
        self.size = size
        self.sources = list(sources)
        self._completed = 0  # bytes of whole chunks; those still arriving are counted in _runs
        self._runs: list[_Run] = []  # in flight
        self.task: asyncio.Task[None] | None = None
        self.pin_sets: list[set[str]] = []
        self.waiters = 0  # Fetcher.fetch calls waiting for it: the last one to leave stops it
        self.abandoned = False  # stopped for want of waiters, winding down
        # per attempt
        self._chunk = fetcher.chunk_size
        self._n = max(1, -(-size // self._chunk))
        self._changed = _Signal()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._todo: list[int] = []
        self._mem: dict[int, memoryview] = {}  # received, not yet hashed: chunk → its bytes in the mapping
        self._on_disk: set[int] = set()  # written by an earlier attempt or process, or already hashed
        self._by: dict[int, str] = {}  # chunk → source id that served it ("disk": an earlier process)
        self._written = 0
        self._hashed = 0
        self._hasher: Any = None
        self._live = 0
        self._workers = 0
        self._disk_error: OSError | None = None  # writing our partial file failed
        self._error: str | None = None
        self._fd = -1
        self._map: mmap.mmap | None = None
        self._allocated = False  # the partial file's blocks are allocated (posix_fallocate)
        self._view = memoryview(b"")  # the partial file, mapped: chunks are received straight into it
        self._last_record = 0.0
        self._recorder: asyncio.Task[None] | None = None

    @property
    def completed(self) -> int:
        """Bytes received so far (resumed ones included), for progress lines."""
        return self._completed + sum(r.received - r.counted for r in list(self._runs))

    async def wait(self) -> None:
        assert self.task is not None
        await asyncio.shield(self.task)

    # ---- the attempts ------------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            await self._run()
        except OSError as e:  # our own disk (opening, sizing, allocating, installing): the partial file goes too,
            # it would only hold space on a disk that is full or failing
            await asyncio.to_thread(remove_partial, self.fetcher.store, self.hex)
            raise TransferError(f"cannot store sha256:{self.hex}: {e.strerror or e}") from None
        finally:
            if self.fetcher._inflight.get(self.hex) is self:
                del self.fetcher._inflight[self.hex]

    async def _run(self) -> None:
        store = self.fetcher.store
        usable = self.fetcher.health.usable(self.sources)
        if not usable:
            raise TransferError(f"no usable source for sha256:{self.hex}")
        done = await asyncio.to_thread(_load_record, store, self.hex, self.size, self._chunk)
        by = dict.fromkeys(done, "disk")
        ok = await self._attempt(usable, by)
        suspects_tried: set[str] = set()
        while not ok:
            counts: dict[str, int] = {}
            for sid in self._by.values():
                counts[sid] = counts.get(sid, 0) + 1
            candidates = sorted((c for c in counts if c not in suspects_tried), key=lambda c: counts[c])
            if not candidates:
                break
            suspect = candidates[0]
            suspects_tried.add(suspect)
            others = [s for s in self.fetcher.health.usable(self.sources) if s.id != suspect]
            if not others:
                continue
            keep = {i: sid for i, sid in self._by.items() if sid != suspect}
            log.info("sha256:%s did not verify; refetching the %d chunks of %s from %s", self.hex[:12],
                     counts[suspect], suspect, ", ".join(s.id for s in others))
            ok = await self._attempt(others, keep)
            if ok and suspect != "disk":
                self.fetcher.health.mark_bad(suspect, f"served bytes that do not hash to sha256:{self.hex}")
        if not ok:
            contributors = set(self._by.values()) - {"disk"}
            if len(contributors) == 1:  # one source served every byte: it is the one that lied
                self.fetcher.health.mark_bad(contributors.pop(), f"served bytes that do not hash to sha256:{self.hex}")
            await asyncio.to_thread(remove_partial, store, self.hex)
            self.fetcher._hash_state.pop(self.hex, None)
            raise TransferError(f"digest mismatch, file must be downloaded again: want sha256:{self.hex}, "
                                f"got sha256:{self._got}")

    async def _attempt(self, sources: list[Source], keep: dict[int, str]) -> bool:
        """Fetch every chunk not in `keep`, hash the whole blob in order; True when it verified and landed."""
        store = self.fetcher.store
        path = partial_path(store, self.hex)
        self._todo = sorted(set(range(self._n)) - set(keep))
        self._by = dict(keep)
        self._on_disk = set(keep)
        self._mem = {}
        self._written = len(keep)
        self._error = None
        self._disk_error = None
        self._completed = sum(self._len(i) for i in keep)
        self._runs = []
        self._loop = asyncio.get_running_loop()
        cached = self.fetcher._hash_state.pop(self.hex, None)
        if cached is not None and all(i in keep for i in range(cached[1])):
            self._hasher, self._hashed = cached
        else:
            self._hasher, self._hashed = hashlib.sha256(), 0
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # (waited out even when cancelled: _leave_partial must not race the allocation or the first record)
            await self._blocking(None, self._map_partial)
            await self._blocking(None, self._write_record, self._record_data())
            want = [s.streams or self.fetcher.streams for s in sources]
            # round-robin: every source gets a worker before any gets a second, up to MAX_STREAMS in all, and
            # the first runs (a small blob's shares) go to different sources
            order = [s for k in range(max(want)) for s, w in zip(sources, want, strict=True) if k < w]
            workers = [asyncio.create_task(self._worker(s)) for s in order[:max(MAX_STREAMS, len(sources))]]
            self._live = self._workers = len(workers)
            hasher = asyncio.create_task(self._hash_loop())
            try:
                await hasher
            finally:
                for w in workers:
                    w.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
            if self._disk_error is not None:
                raise self._disk_error  # (see run)
            if self._error is not None:
                if self._hashed > 0:  # keep the running hash: an in-process retry resumes without re-reading
                    self.fetcher._hash_state[self.hex] = (self._hasher.copy(), self._hashed)
                await self._leave_partial()
                raise TransferError(self._error)
            got = self._hasher.hexdigest()
            if got != self.hex:
                self._got = got
                return False
            await self._record_done()  # before _install removes the record
            await self._blocking(None, self._install)
            return True
        except asyncio.CancelledError:  # the last waiter left, or the node is closing
            with contextlib.suppress(OSError):
                await self._leave_partial()
            raise
        finally:
            await self._record_done()
            self._unmap()
            os.close(self._fd)
            self._fd = -1

    _got = ""

    async def _leave_partial(self) -> None:
        """An attempt that did not finish: record the chunks that came in, for the next pull to resume; or, when
        none did (a 404, a refused connection, a source that never sent a byte), remove the partial file, which
        would otherwise hold the blob's whole declared size on disk for nothing."""
        await self._record_done()  # a background record written after the removal would be left behind
        await self._blocking(None, self._leave, self._record_data() if self._written else None)

    def _leave(self, record: bytes | None) -> None:
        """(thread) See _leave_partial; nothing is left once the blob was installed (a cancel that came late)."""
        if record is None:
            remove_partial(self.fetcher.store, self.hex)
        elif partial_path(self.fetcher.store, self.hex).exists():
            self._write_record(record)

    def _end(self, i: int) -> int:
        """The offset just past chunk `i` (the last one may be short)."""
        return min(self.size, (i + 1) * self._chunk)

    def _len(self, i: int) -> int:
        return self._end(i) - i * self._chunk

    def _map_partial(self) -> None:
        """(thread) Size the partial file, allocate its blocks, and map it.

        The hash reads the chunks through the mapping: the page cache the bytes were spliced into, no copy.
        Bodies splice cannot take (chunked, TLS, no splice here) are received into the mapping, which skips
        the copy from a buffer into the page cache; allocating the blocks up front is what makes that safe:
        a write fault on a full disk would be a SIGBUS (or an EFAULT from recv), not an error. Where
        allocation is not supported, `_populate` turns a full disk into an OSError per run.
        """
        if os.fstat(self._fd).st_size != self.size:
            os.ftruncate(self._fd, self.size)
        if self.size == 0:
            return  # nothing to map (mmap refuses empty files)
        try:
            os.posix_fallocate(self._fd, 0, self.size)
            self._allocated = True
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # not supported by this filesystem
                raise
            self._allocated = False
        self._map = mmap.mmap(self._fd, self.size)
        self._view = memoryview(self._map)

    def _unmap(self) -> None:
        for v in self._mem.values():
            v.release()
        self._mem = {}
        self._view.release()
        self._view = memoryview(b"")
        m, self._map = self._map, None
        if m is not None:
            with contextlib.suppress(BufferError):  # a view still referenced (a traceback): unmapped when freed
                m.close()

    def _slice(self, i: int) -> memoryview:
        """Chunk `i` of the mapped partial file."""
        return self._view[i * self._chunk:self._end(i)]

    def _populate(self, run: _Run, user_writes: bool = False) -> None:
        """(thread) Fault the run's pages in for writing in one call, so that a full disk (or any I/O error)
        is an OSError here rather than a SIGBUS or an EFAULT from recv later. Skipped for receives into
        allocated blocks: letting recv fault each page in just before it fills it cost half the CPU (the
        zeroed page is still in cache)."""
        if self._map is None or _MADV_POPULATE_WRITE is None or (self._allocated and not user_writes):
            return
        try:
            self._map.madvise(_MADV_POPULATE_WRITE, run.start, run.end - run.start)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOSYS):  # an older kernel: allocation was still done
                raise _DiskError(e) from None

    def _install(self) -> None:
        os.fchmod(self._fd, 0o644)
        store = self.fetcher.store
        path = partial_path(store, self.hex)
        # verified above; every waiter's pin set holds it, so GC leaves it alone until their manifests exist.
        # Not fsynced first: the store journals it and syncs it in the background (seconds for a big blob).
        sets = self.pin_sets or [set()]
        existed = store.install_blob(path, self.hex, sets[0], synced=False)
        for pins in sets[1:]:
            store.pin(self.hex, pins)
        if existed:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        with contextlib.suppress(FileNotFoundError):
            _record_path(store, self.hex).unlink()

    def _record_data(self) -> bytes:
        """(loop) The partial file's record: the chunks written so far."""
        self._last_record = time.monotonic()
        done = sorted(self._on_disk | set(self._mem))
        return json.dumps({"size": self.size, "chunk": self._chunk, "done": done}).encode()

    def _write_record(self, data: bytes) -> None:
        """(thread) Replace the record atomically but without fsync: under a busy writeback one fsync took a
        third of a second, stalling the hash. A record that is lost, or ahead of the data after a crash, only
        costs bytes: a resumed chunk that is not on disk fails the digest and is fetched again ("disk" is then
        the suspect source)."""
        path = _record_path(self.fetcher.store, self.hex)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def _record_later(self) -> None:
        """(loop) Refresh the record in the background, one write at a time, never holding up the hash."""
        if self._recorder is None or self._recorder.done():
            self._recorder = asyncio.create_task(asyncio.to_thread(self._write_record, self._record_data()))

    async def _record_done(self) -> None:
        """Wait for a background record write; a failed one is only logged (the record is an optimization)."""
        task, self._recorder = self._recorder, None
        if task is not None:
            try:
                await asyncio.shield(task)
            except OSError as e:
                log.info("cannot record the progress of sha256:%s: %s", self.hex[:12], e)

    # ---- workers -----------------------------------------------------------------------------------
    async def _worker(self, src: Source) -> None:
        failures = 0
        conn = _Conn(self.fetcher.timeout)
        try:
            while True:
                while True:
                    if self._error is not None or self._written >= self._n:
                        return
                    if (run := self._claim(src.id)) is not None:
                        break
                    await self._changed.wait()
                error: Exception | None = None
                try:
                    await self._fetch_watched(src, run, conn)
                except (_DiskError, SourceError, aiohttp.ClientError, http.client.HTTPException, OSError) as e:
                    error = e
                finally:
                    self._settle(run)  # also when cancelled: the receiving thread has ended by now
                if conn.cancelled.is_set():  # aborted for being too slow: the next request needs a new one
                    conn.close()
                    conn = _Conn(self.fetcher.timeout)
                if error is None:
                    failures = 0
                    continue
                if isinstance(error, _DiskError):  # our disk, not the source: no point trying elsewhere
                    self._error = str(error)
                    self._disk_error = error.os_error
                    self._changed.notify()
                    return
                failures = 1 if run.done else failures + 1  # chunks that came in count as progress
                permanent = isinstance(error, SourceError) and error.permanent
                log.info("chunks %d-%d of sha256:%s from %s failed after %d (%s)%s", run.chunks[0], run.chunks[-1],
                         self.hex[:12], src.id, run.done, error or type(error).__name__,
                         "" if failures < 3 and not permanent else "; dropping source")
                if permanent or failures >= 3:
                    return
                await asyncio.sleep(0.2 * failures)
        finally:
            conn.close()  # no thread uses it any more: _blocking waits for them
            self._live -= 1
            if self._live == 0 and self._written < self._n and self._error is None:
                self._error = f"no source could serve sha256:{self.hex} (tried {self._source_list()})"
            self._changed.notify()

    async def _fetch_watched(self, src: Source, run: _Run, conn: _Conn) -> None:
        """`_fetch`, given up when the run brings in less than `min_rate` over a `timeout` window: the per-read
        timeout alone lets a source that drips a byte every few seconds hold the run (and its chunks) for hours.
        Not under a bandwidth limit, which may itself make every stream that slow."""
        window, floor = self.fetcher.timeout, self.fetcher.min_rate * self.fetcher.timeout
        if floor <= 0 or self.fetcher.limiter is not None:
            return await self._fetch(src, run, conn)
        fetch = asyncio.create_task(self._fetch(src, run, conn))
        try:
            while True:
                before = run.received
                done, _ = await asyncio.wait([fetch], timeout=window)
                if done:
                    return fetch.result()
                if run.received - before < floor:
                    raise SourceError(f"too slow: {run.received - before} bytes in {window:g}s")
        finally:
            cancelled = False
            if not fetch.done():
                fetch.cancel()  # aborts the connection; its thread must end before the run is settled
                while not fetch.done():
                    try:
                        await asyncio.wait([fetch])
                    except asyncio.CancelledError:
                        cancelled = True  # ours to pass on once the request has ended, not to swallow
            if not fetch.cancelled():
                fetch.exception()  # retrieved: the aborted request's own error is expected
            if cancelled:
                raise asyncio.CancelledError

    def _claim(self, src: str) -> _Run | None:
        """(loop) The lowest chunks left, as one run: consecutive, inside the window, at most a run long, and at
        most this worker's share of what is left, so that a small blob still spreads over every source."""
        todo = self._todo
        window = self._hashed + self.fetcher.window
        if not todo or todo[0] >= window:
            return None
        # runs shorten with more workers: the hash follows one run at a time, at that source's share of the
        # bandwidth, so the bytes in flight stay about one run whatever the number of sources
        longest = max(1, self.fetcher.run_chunks // max(1, self._workers))
        share = max(1, min(longest, -(-len(todo) // max(1, self._live))))
        k = 1
        while k < min(share, len(todo)) and todo[k] == todo[0] + k and todo[k] < window:
            k += 1
        chunks = todo[:k]
        del todo[:k]
        run = _Run(chunks, src, chunks[0] * self._chunk, self._end(chunks[-1]))
        self._runs.append(run)
        return run

    def _arrived(self, run: _Run, got: int) -> None:
        """(thread) `got` bytes of the run are in, in order: count them, and tell the loop of whole chunks."""
        run.received = got
        done = run.done
        while done < len(run.chunks) and run.start + got >= self._end(run.chunks[done]):
            done += 1
        if done != run.done:
            run.done = done
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._collect)

    def _collect(self) -> None:
        """(loop) Hand the chunks that came in to the hash."""
        for run in self._runs:
            self._mark(run)
        self._changed.notify()

    def _mark(self, run: _Run) -> None:
        while run.marked < run.done:
            i = run.chunks[run.marked]
            self._mem[i] = self._slice(i)
            self._by[i] = run.src
            self._written += 1
            self._completed += self._len(i)
            run.counted += self._len(i)
            run.marked += 1

    def _settle(self, run: _Run) -> None:
        """(loop) A run ended, whole or not: keep what came in, and put the rest back."""
        self._mark(run)
        for i in run.chunks[run.done:]:
            bisect.insort(self._todo, i)
        self._runs.remove(run)
        self._changed.notify()

    def _source_list(self) -> str:
        return ", ".join(s.id for s in self.sources)

    async def _blocking(self, conn: _Conn | None, fn: Callable[..., _T], *args: Any) -> _T:
        """Run `fn` in the fetcher's threads; when cancelled, wake it (abort its connection) and wait for it
        to end, so no thread touches the partial file after the attempt closes it."""
        fut = asyncio.get_running_loop().run_in_executor(self.fetcher.executor(), functools.partial(fn, *args))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            if conn is not None:
                conn.abort()
            while not fut.done():  # even when cancelled again: the thread splices into our descriptors
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([fut])
            if not fut.cancelled():
                fut.exception()  # the aborted call's own error is expected; retrieved, so it is not logged
            raise

    async def _fetch(self, src: Source, run: _Run, conn: _Conn) -> None:
        """The run's chunks from `src` into their place in the partial file (not yet verified).

        Plain-HTTP sources are read on a blocking socket in a thread, spliced into the page cache with the GIL
        released. aiohttp's streaming body would copy every byte three more times (parser, StreamReader join,
        into the file) on the event loop, which is what kept the transfer at a third of a plain socket copy.
        Others (TLS, redirecting registries) go through aiohttp.
        """
        if src.blob_prefix.startswith("http://") and src.id not in self.fetcher._indirect:
            try:
                await self._blocking(conn, self._get_blocking, conn, src, run)
            except _NotDirect:
                log.info("source %s redirects; fetching through aiohttp", src.id)
                self.fetcher._indirect.add(src.id)
            else:
                return self._arrived(run, run.end - run.start)  # (a zero-byte blob has no piece to report)
        await self._blocking(None, self._populate, run, True)
        await self._fetch_run(src, run)
        self._arrived(run, run.end - run.start)

    def _range_headers(self, src: Source, run: _Run) -> dict[str, str]:
        headers = dict(src.headers)
        if not (run.start == 0 and run.end == self.size):
            headers["Range"] = f"bytes={run.start}-{run.end - 1}"
        return headers

    @staticmethod
    def _check_status(status: int, ranged: bool) -> None:
        if status in (401, 403, 404, 410, 416):
            raise SourceError(f"HTTP {status}", permanent=True)
        if status == 200 and ranged:
            raise SourceError("no Range support", permanent=True)
        if status not in (200, 206):
            raise SourceError(f"HTTP {status}")

    def _get_blocking(self, conn: _Conn, src: Source, run: _Run) -> None:
        """(thread) One ranged GET for the run on the worker's keep-alive connection, received piece by piece."""
        n = run.end - run.start
        u = urllib.parse.urlsplit(src.url(self.hex))
        headers = self._range_headers(src, run)
        target = u.path + (f"?{u.query}" if u.query else "")
        while True:
            if conn.cancelled.is_set():
                raise SourceError("cancelled")
            reused = conn.http is not None and conn.used
            c = conn.get(u.hostname or "", u.port)
            try:
                c.request("GET", target, headers=headers)
                r = c.getresponse()
                break
            except BaseException as e:
                conn.close()  # a request without its response (a timeout, a bad status line) blocks the next one
                retry = isinstance(e, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError))
                if not (retry and reused):  # a kept-alive connection the server closed meanwhile: one fresh try
                    raise
        ok = False
        try:
            if r.status in _REDIRECTS:
                raise _NotDirect()
            self._check_status(r.status, "Range" in headers)
            if r.length is not None and r.length != n:
                raise SourceError(f"{r.length} bytes for a {n}-byte range")
            if r.length is not None and not r.will_close and self.fetcher.splice:
                self._splice_body(conn, r, run)
            else:
                self._read_body(conn, r, run)
            ok = conn.used = True
        finally:
            if not ok:
                conn.close()  # a response left half read makes the connection useless

    def _read_body(self, conn: _Conn, r: http.client.HTTPResponse, run: _Run) -> None:
        """(thread) The body through http.client (any framing) into the run's place in the mapping."""
        self._populate(run)
        n = run.end - run.start
        limiter = self.fetcher.limiter
        got = 0
        while got < n:
            if conn.cancelled.is_set():
                raise SourceError("cancelled")
            with self._view[run.start + got:run.start + min(n, got + _READ_PIECE)] as piece:
                k = r.readinto(piece)
            if not k:
                raise SourceError(f"short read ({got} of {n} bytes)")
            got += k
            self._arrived(run, got)
            if limiter is not None:
                limiter.take_blocking(k, conn.cancelled)
        if r.length is None and r.read(1):
            raise SourceError("more bytes than asked for")

    def _splice_body(self, conn: _Conn, r: http.client.HTTPResponse, run: _Run) -> None:
        """(thread) A body of known length, spliced from the socket into the partial file.

        splice(2) moves the bytes from the socket into the page cache through a pipe, without passing them
        through user space. Receiving into the mapping instead made every page a write fault that zeroed
        the page first (readahead of the not-yet-written extent): that fault path cost more CPU than the
        hash. http.client has parsed the headers and may hold the first bytes of the body in its buffer;
        those are written first, then the rest is taken from the socket itself, and the response is closed
        (the connection stays open for the next request). Where splice is not supported, the chunk fails
        once and is fetched again through http.client.
        """
        n, start = run.end - run.start, run.start
        assert conn.http is not None and conn.http.sock is not None and r.fp is not None
        limiter = self.fetcher.limiter
        got = 0
        if n:
            head = r.fp.peek(1)[:n]  # what http.client buffered past the headers (one read when nothing)
            if head:
                data = memoryview(r.fp.read(len(head)))
                while got < len(data):
                    got += self._disk(os.pwrite, self._fd, data[got:], start + got)
                self._arrived(run, got)
                if limiter is not None:
                    limiter.take_blocking(got, conn.cancelled)
        sock = conn.http.sock.fileno()
        pipe_r, pipe_w, capacity = conn.pipe()
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        while got < n:
            if conn.cancelled.is_set():
                raise SourceError("cancelled")
            try:
                k = os.splice(sock, pipe_w, min(capacity, n - got))  # the socket is non-blocking (timeout mode)
            except BlockingIOError:
                if not poller.poll(conn.timeout * 1000):
                    raise TimeoutError(f"no data for {conn.timeout:.0f}s") from None
                continue
            except OSError as e:
                if e.errno not in _NO_SPLICE:
                    raise
                raise self._splice_refused() from None
            if not k:
                raise SourceError(f"short read ({got} of {n} bytes)")
            if limiter is not None:
                limiter.take_blocking(k, conn.cancelled)
            while k:  # the pipe into the file at its place; the pipe is empty again after this
                try:
                    m = os.splice(pipe_r, self._fd, k, offset_dst=start + got)
                except OSError as e:
                    if e.errno in _NO_SPLICE:
                        raise self._splice_refused() from None
                    raise _DiskError(e) from None
                got += m
                k -= m
            self._arrived(run, got)
        r.close()  # the body was taken from under it: it only lets go of its buffer, not of the socket

    def _splice_refused(self) -> SourceError:
        """splice(2) cannot be used here (socket or filesystem): the fetcher stops trying it, and the run is
        fetched again through http.client."""
        self.fetcher.splice = False
        return SourceError("splice(2) is not supported here; retrying without it")

    @staticmethod
    def _disk(fn: Callable[..., _T], *args: Any) -> _T:
        """A write to our own partial file: its errors are _DiskError (no other source can help)."""
        try:
            return fn(*args)
        except OSError as e:
            raise _DiskError(e) from None

    async def _fetch_run(self, src: Source, run: _Run) -> None:
        """One ranged GET for the run through aiohttp (TLS, redirects) into its place in the mapping."""
        n = run.end - run.start
        headers = self._range_headers(src, run)
        limiter = self.fetcher.limiter
        got = 0
        async with self.fetcher.session().get(src.url(self.hex), headers=headers) as r:
            self._check_status(r.status, "Range" in headers)
            while True:
                piece = await r.content.readany()
                if not piece:
                    break
                k = len(piece)
                if got + k > n:
                    raise SourceError("more bytes than asked for")
                self._view[run.start + got:run.start + got + k] = piece
                got += k
                self._arrived(run, got)
                if limiter is not None:
                    await limiter.take(k)
            if got != n:
                raise SourceError(f"short read ({got} of {n} bytes)")

    # ---- the single hashing pass -------------------------------------------------------------------
    def _hash(self, bufs: list[bytes | memoryview]) -> None:
        """(thread) In order, while later chunks are still arriving: hashlib releases the GIL on big updates."""
        t0 = time.thread_time()
        for buf in bufs:
            self._hasher.update(buf)
        self.fetcher._count_hash(time.thread_time() - t0, sum(len(b) for b in bufs))

    async def _hash_loop(self) -> None:
        """Every chunk in order, each consecutive stretch that is in at once: a round trip through the loop per
        chunk left the hash thread idle for a tenth of the transfer when the hash was the slower side."""
        while self._hashed < self._n:
            while True:
                if self._error is not None:
                    return
                i = self._hashed
                if i in self._mem or i in self._on_disk:
                    break
                await self._changed.wait()
            bufs: list[bytes | memoryview] = []
            while len(bufs) < _HASH_BATCH and (buf := self._mem.pop(i + len(bufs), None)) is not None:
                bufs.append(buf)
            if not bufs:  # resumed from an earlier process (or kept across an attempt): read it once
                # (pread, not the mapping: a read error there would be a SIGBUS, not an OSError)
                bufs.append(await self._blocking(None, os.pread, self._fd, self._len(i), i * self._chunk))
            await self._blocking(None, self._hash, bufs)
            for buf in bufs:
                if isinstance(buf, memoryview):
                    buf.release()
            self._hashed += len(bufs)
            self._on_disk.update(range(i, i + len(bufs)))
            self._changed.notify()
            if time.monotonic() - self._last_record > _RECORD_EVERY_S:
                self._record_later()


# --------------------------------------------------------------------------------------------------------
# The node-wide fetcher


class Fetcher:
    """One per node: the HTTP session, the bandwidth limit, source health, and the transfers in flight."""

    def __init__(
        self,
        store: Store,
        *,
        chunk_size: int = CHUNK,
        run_size: int = RUN,
        streams: int = STREAMS_PER_SOURCE,
        window: int = 0,
        rate_limit: float = 0,
        health: SourceHealth | None = None,
        timeout: float = 30.0,
        min_rate: float = MIN_RATE,
    ) -> None:
        self.store = store
        self.chunk_size = chunk_size
        self.run_chunks = max(1, run_size // chunk_size)  # chunks asked for in one request, at most
        self.streams = streams
        self.window = window or max(4 * self.run_chunks, MAX_STREAMS + 4)  # chunks received ahead of the hash
        self.limiter = RateLimiter(rate_limit) if rate_limit > 0 else None
        self.health = health or SourceHealth()
        self.timeout = timeout
        self.min_rate = min_rate  # bytes/s over each `timeout` window, per request (0: no floor)
        self.hash_cpu_s = 0.0  # CPU seconds spent hashing, and bytes hashed (== bytes fetched: one pass)
        self.hashed_bytes = 0
        self._session: aiohttp.ClientSession | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stats_lock = threading.Lock()
        self._inflight: dict[str, BlobTransfer] = {}
        self._hash_state: dict[str, tuple[Any, int]] = {}
        self._indirect: set[str] = set()  # sources that redirect: fetched through aiohttp
        self.splice = hasattr(os, "splice")  # Linux; off once a socket or the filesystem refuses it

    def executor(self) -> ThreadPoolExecutor:
        """Threads for blocking receives, writes and hashing; not the loop's default executor, which a few
        blocked receives would fill for the rest of the node."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=4 * MAX_STREAMS, thread_name_prefix="omx-fetch")
        return self._executor

    def _count_hash(self, cpu_s: float, n: int) -> None:
        with self._stats_lock:
            self.hash_cpu_s += cpu_s
            self.hashed_bytes += n

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.timeout),
                connector=aiohttp.TCPConnector(limit=64, limit_per_host=MAX_STREAMS + 2),
                auto_decompress=False,
                read_bufsize=4 << 20,  # the 64 KiB default pauses the socket every few pieces
            )
        return self._session

    async def close(self) -> None:
        tasks = [t.task for t in self._inflight.values() if t.task is not None]
        for t in self._inflight.values():
            if t.task is not None and not t.abandoned:  # (an abandoned one is cancelled already: once is enough)
                t.task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # their threads end with them
        if self._session is not None:
            await self._session.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    def in_flight(self, hexd: str) -> BlobTransfer | None:
        return self._inflight.get(_hex(hexd))

    def start(self, digest: str, size: int, sources: Sequence[Source]) -> BlobTransfer:
        """The transfer of this blob: the one already running (sharing it), or a new one."""
        hexd = _hex(digest)
        t = self._inflight.get(hexd)
        if t is not None:
            known = {s.id for s in t.sources}
            t.sources.extend(s for s in sources if s.id not in known)  # later attempts may use them
            return t
        t = BlobTransfer(self, hexd, size, sources)
        self._inflight[hexd] = t
        t.task = asyncio.create_task(t.run(), name=f"fetch-{hexd[:12]}")
        t.task.add_done_callback(lambda task: task.cancelled() or task.exception())  # no "never retrieved"
        return t

    async def fetch(self, digest: str, size: int, sources: Sequence[Source], pins: set[str]) -> None:
        """Fetch one blob unless the store has it, sharing a transfer already running; raises TransferError.

        The blob is added to `pins` (see Store pins) so garbage collection spares it until the caller's
        manifest refers to it; release with `store.unpin_all(pins)`.
        """
        hexd = _hex(digest)
        while True:
            with contextlib.suppress(BlobNotFound):
                self.store.pin_existing(hexd, pins)
                return
            old = self._inflight.get(hexd)
            if old is None or not old.abandoned:
                break
            # its last waiter left and it is winding down (waking its threads, recording what came in): a new
            # transfer starts after it, so that the two never share the partial file; it may have landed the blob
            assert old.task is not None
            await asyncio.wait([old.task])
        t = self.start(hexd, size, sources)
        t.pin_sets.append(pins)
        t.waiters += 1
        try:
            await t.wait()
        except asyncio.CancelledError:
            with contextlib.suppress(ValueError):
                t.pin_sets.remove(pins)  # gone before the blob landed: nothing to pin for us
            raise
        finally:
            t.waiters -= 1
            if t.waiters == 0 and t.task is not None and not t.task.done() and not t.abandoned:
                # nobody wants the blob any more: stop it rather than hold its sockets and threads (a source
                # that drips would hold them for hours); what came in stays for the next pull to resume
                t.abandoned = True
                t.task.cancel()


# --------------------------------------------------------------------------------------------------------
# Disk budget and eviction


class UseRecord:
    """When each model was last used (pulled, loaded), for LRU eviction; kept in `<store>/omx-lru.json`."""

    def __init__(self, store: Store) -> None:
        self.path = store.root / "omx-lru.json"
        self._data: dict[str, float] | None = None

    def _load(self) -> dict[str, float]:
        if self._data is None:
            try:
                raw = json.loads(self.path.read_bytes())
                self._data = {str(k): float(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
            except (OSError, ValueError, TypeError):
                self._data = {}
        return self._data

    def touch(self, name: ModelName | str) -> None:
        key = str(name if isinstance(name, ModelName) else ModelName.parse(name))
        data = self._load()
        data[key] = time.time()
        with contextlib.suppress(OSError):
            _atomic_write(self.path, json.dumps(data).encode())

    def last_used(self, name: ModelName, fallback: float) -> float:
        return self._load().get(str(name), fallback)


def _fmt(n: int) -> str:
    for unit, scale in (("GB", 1000**3), ("MB", 1000**2), ("KB", 1000)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def store_bytes(store: Store) -> int:
    """Bytes the store holds on disk: blobs plus partial downloads."""
    total = 0
    with contextlib.suppress(OSError), os.scandir(store.blobs_dir) as it:
        for e in it:
            if e.name.startswith("sha256-") or e.name.startswith(PARTIAL_PREFIX):
                with contextlib.suppress(OSError):
                    total += e.stat(follow_symlinks=False).st_size
    return total


def make_room(
    store: Store,
    need: int,
    *,
    budget: int,
    protected: set[ModelName],
    uses: UseRecord,
    keep_partials: Iterable[str] = (),
    reserve: int = 64 << 20,
) -> list[str]:
    """Ensure `need` more bytes fit the budget and the disk, evicting least recently used models that are
    neither protected (placed or loaded); partial files other than `keep_partials` (hex digests: the pull's own,
    about to be resumed, and those in flight) go first. Returns the evicted names; raises BudgetExceeded."""
    evicted: list[str] = []
    keep = set(keep_partials)

    def over() -> int:
        short = 0
        if budget > 0:
            short = store_bytes(store) + need - budget
        free = shutil.disk_usage(store.blobs_dir).free
        return max(short, need + reserve - free)

    if over() <= 0:
        return evicted
    # stale partial downloads go first: nobody is waiting for them
    with contextlib.suppress(OSError), os.scandir(store.blobs_dir) as it:
        stale = [e.name for e in it if e.name.startswith(PARTIAL_PREFIX) and not e.name.endswith(".json")]
    for name in stale:
        hexd = name[len(PARTIAL_PREFIX):]
        if hexd not in keep:
            remove_partial(store, hexd)
    models = store.list_models()
    refs: Counter[str] = Counter(h for e in models for h in e.manifest.digests())
    entries = [e for e in models if e.name not in protected]
    entries.sort(key=lambda e: uses.last_used(e.name, e.modified_at.timestamp()))
    # evict nothing when evicting everything allowed would still not be enough
    sizes = {layer.hex: layer.size for e in models for layer in (*e.manifest.layers, e.manifest.config)}
    left = Counter(refs)
    for e in entries:
        left.subtract(e.manifest.digests())
    freeable = sum(size for h, size in sizes.items() if left[h] <= 0 and store.has_blob(h))
    if over() > freeable:
        entries = []
    for e in entries:
        if over() <= 0:
            break
        mine = e.manifest.digests()
        if all(refs[h] > 1 for h in mine):
            continue  # every blob is shared with a model we keep: deleting it frees nothing
        refs.subtract(mine)
        try:
            store.delete(e.name)
        except ModelNotFound:
            continue
        log.info("evicted %s (least recently used) to make room", e.display)
        evicted.append(e.display)
    short = over()
    if short > 0:
        free = shutil.disk_usage(store.blobs_dir).free
        what = (f"disk budget {_fmt(budget)} (in use: {_fmt(store_bytes(store))})" if budget > 0
                and store_bytes(store) + need > budget else f"free disk space {_fmt(free)}")
        raise BudgetExceeded(
            f"not enough space to pull: {_fmt(need)} needed, exceeds the {what}; "
            f"{len(protected)} loaded or placed model(s) cannot be evicted"
        )
    return evicted


def missing_bytes(store: Store, sizes: Mapping[str, int]) -> int:
    """Bytes still to download for these blobs (hex → size), counting what partial files already hold."""
    need = 0
    for hexd, size in sizes.items():
        if store.has_blob(hexd):
            continue
        try:  # a partial file is allocated at full size, and store_bytes already counts it
            need += max(0, size - partial_path(store, hexd).stat().st_size)
        except OSError:
            need += size
    return need


# --------------------------------------------------------------------------------------------------------
# A whole model


PROGRESS_EVERY = 0.06  # Ollama's pull progress tick


@dataclass
class PullPlan:
    """What to pull: the manifest bytes exactly as the origin stores them, and where its blobs are."""

    name: ModelName
    manifest_bytes: bytes
    sources: list[Source]
    manifest: Manifest = field(init=False)

    def __post_init__(self) -> None:
        self.manifest = Manifest.from_bytes(self.manifest_bytes)

    def blobs(self) -> list[Layer]:
        return blob_order(self.manifest)

    def sizes(self) -> dict[str, int]:
        return {layer.hex: layer.size for layer in self.blobs()}


def blob_order(m: Manifest) -> list[Layer]:
    """Layers in manifest order, then the config blob (Ollama's progress order), each digest once."""
    seen: set[str] = set()
    out: list[Layer] = []
    for layer in (*m.layers, m.config):
        if layer.digest not in seen:
            seen.add(layer.digest)
            out.append(layer)
    return out


def progress_line(status: str, digest: str, total: int, completed: int) -> dict[str, Any]:
    """Ollama's api.ProgressResponse: digest/total/completed are omitempty."""
    line: dict[str, Any] = {"status": status, "digest": digest, "total": total}
    if completed:
        line["completed"] = completed
    return line


async def pull_model(
    store: Store, fetcher: Fetcher, plan: PullPlan, uses: UseRecord | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """Everything after `pulling manifest`: blob progress, `verifying sha256 digest`, `writing manifest`,
    `success`. Blobs download concurrently; raises TransferError (after some lines were yielded)."""
    pins: set[str] = set()
    blobs = plan.blobs()
    tasks = {layer.hex: asyncio.create_task(fetcher.fetch(layer.digest, layer.size, plan.sources, pins))
             for layer in blobs}
    try:
        sent: dict[str, int] = {}
        while True:
            for layer in blobs:
                t = tasks[layer.hex]
                if t.done() and not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
                tr = fetcher.in_flight(layer.hex)
                completed = layer.size if t.done() else (tr.completed if tr is not None else 0)
                if sent.get(layer.hex) != completed:
                    sent[layer.hex] = completed
                    yield progress_line(f"pulling {layer.hex[:12]}", layer.digest, layer.size, completed)
            pending = [t for t in tasks.values() if not t.done()]
            if not pending:
                break
            await asyncio.wait(pending, timeout=PROGRESS_EVERY, return_when=asyncio.FIRST_COMPLETED)
        yield {"status": "verifying sha256 digest"}  # done already, chunk by chunk as the bytes arrived
        yield {"status": "writing manifest"}
        await asyncio.to_thread(store.write_manifest, plan.name, plan.manifest_bytes)
        if uses is not None:
            await asyncio.to_thread(uses.touch, plan.name)
        yield {"status": "success"}
    finally:
        for t in tasks.values():
            t.cancel()  # our wait only: a shared transfer runs on for its other waiters
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        store.unpin_all(pins)
