"""Blob transfer against in-process seeders: parallel ranged chunks, bad bytes, dying seeders, resume,
shared transfers, disk budget and eviction, the pull progress stream."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import itertools
import os
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from omx.models.demo import ensure_demo_model
from omx.models.names import ModelName
from omx.models.store import Store
from omx.models.transfer import (
    PARTIAL_PREFIX,
    STREAMS_PER_SOURCE,
    BudgetExceeded,
    Fetcher,
    PullPlan,
    Source,
    TransferError,
    UseRecord,
    make_room,
    missing_bytes,
    pull_model,
    store_bytes,
)

pytestmark = pytest.mark.timeout(120)

CHUNK = 64 << 10


@dataclass
class Seeder:
    """An aiohttp server holding blobs; can corrupt bytes, die after a number of bytes, or go slowly."""

    blobs: dict[str, bytes]
    corrupt_at: set[int] = field(default_factory=set)  # absolute offsets whose byte is flipped
    die_after: int | None = None  # bytes served before every further request fails
    delay: float = 0.0
    chunked: bool = False  # bodies in chunked encoding (no Content-Length), as some registries send them
    served: int = 0
    requests: list[tuple[int, int]] = field(default_factory=list)
    inflight: int = 0
    peak: int = 0  # the most requests it was answering at once
    gate: int = 0  # hold requests until this many were in at once (or 10 s passed)
    url: str = ""
    runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        hexd = request.match_info["digest"].removeprefix("sha256:")
        data = self.blobs.get(hexd)
        if data is None:
            raise web.HTTPNotFound()
        start, end = 0, len(data) - 1
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", request.headers.get("Range", ""))
        if m:
            start, end = int(m.group(1)), min(int(m.group(2)), len(data) - 1)
        self.requests.append((start, end))
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        try:
            for _ in range(1000):
                if self.peak >= self.gate:
                    break
                await asyncio.sleep(0.01)
            if self.delay:
                await asyncio.sleep(self.delay)
        finally:
            self.inflight -= 1
        body = bytearray(data[start:end + 1])
        for off in self.corrupt_at:
            if start <= off <= end:
                body[off - start] ^= 0xFF
        status = 206 if m else 200
        headers = {"Content-Range": f"bytes {start}-{end}/{len(data)}"} if m else {}
        if self.die_after is not None and self.served + len(body) > self.die_after:
            # send part of the body, then drop the connection
            resp = web.StreamResponse(status=status, headers=headers)
            resp.content_length = len(body)
            await resp.prepare(request)
            keep = max(0, self.die_after - self.served)
            await resp.write(bytes(body[: min(keep, len(body) // 2)]))
            self.served = self.die_after
            assert request.transport is not None
            request.transport.close()
            return resp
        self.served += len(body)
        if self.chunked:
            resp = web.StreamResponse(status=status, headers=headers)
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for off in range(0, len(body), 10_000):
                await resp.write(bytes(body[off:off + 10_000]))
            await resp.write_eof()
            return resp
        return web.Response(body=bytes(body), status=status, headers=headers)

    async def redirect(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPTemporaryRedirect(f"/blobs/{request.match_info['digest']}")

    async def start(self) -> Seeder:
        app = web.Application()
        app.router.add_get("/blobs/{digest}", self.handle)
        app.router.add_get("/moved/{digest}", self.redirect)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    def source(self, sid: str) -> Source:
        return Source(id=sid, blob_prefix=f"{self.url}/blobs/")

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def blob(n: int, seed: int = 1) -> tuple[str, bytes]:
    data = hashlib.sha256(str(seed).encode()).digest() * (n // 32) + os.urandom(n % 32)
    return hashlib.sha256(data).hexdigest(), data


@pytest.fixture
async def seeders() -> AsyncIterator[list[Seeder]]:
    made: list[Seeder] = []
    yield made
    for s in made:
        await s.stop()


async def seeder(made: list[Seeder], blobs: dict[str, bytes], **kw: object) -> Seeder:
    s = await Seeder(blobs, **kw).start()  # type: ignore[arg-type]
    made.append(s)
    return s


needs_splice = pytest.mark.skipif(not hasattr(os, "splice"), reason="splice(2) is Linux-only")


@pytest.fixture
def splices(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes moved by each splice(2) from a pipe into a file: the receive path bodies of known length take."""
    moved: list[int] = []
    real = os.splice

    def counting(src: int, dst: int, count: int, **kw: int | None) -> int:
        n = real(src, dst, count, **kw)
        if kw.get("offset_dst") is not None:
            moved.append(n)
        return n

    monkeypatch.setattr(os, "splice", counting)
    return moved


def tiles(size: int, *served: Seeder) -> bool:
    """The seeders' requested ranges cover the blob exactly once (no byte asked for twice, none left out)."""
    ranges = sorted(r for s in served for r in s.requests)
    return bool(ranges) and ranges[0][0] == 0 and ranges[-1][1] == size - 1 and all(
        a[1] + 1 == b[0] for a, b in itertools.pairwise(ranges))


def visible(store: Store) -> list[str]:
    return sorted(p.name for p in store.blobs_dir.iterdir())


def partials(store: Store) -> list[str]:
    return [n for n in visible(store) if n.startswith(PARTIAL_PREFIX)]


async def fetch(f: Fetcher, hexd: str, size: int, sources: list[Source]) -> None:
    pins: set[str] = set()
    try:
        await f.fetch(hexd, size, sources, pins)
    finally:
        f.store.unpin_all(pins)


async def resume_from_fresh_seeder(f: Fetcher, seeders: list[Seeder], hexd: str, data: bytes) -> Seeder:
    """Finish an interrupted fetch from a new, healthy seeder (then close the fetcher); returns the seeder."""
    fresh = await seeder(seeders, {hexd: data})
    try:
        await fetch(f, hexd, len(data), [fresh.source("fresh")])
    finally:
        await f.close()
    return fresh


@needs_splice
async def test_one_seeder_ranged_chunks(tmp_path: Path, seeders: list[Seeder], splices: list[int]) -> None:
    """Runs of consecutive chunks, one request each: 11 chunks in runs of at most 4, spliced into the file."""
    hexd, data = blob(10 * CHUNK + 123)
    s = await seeder(seeders, {hexd: data})
    store = Store(tmp_path)
    f = Fetcher(store, chunk_size=CHUNK, run_size=4 * CHUNK)
    try:
        await fetch(f, hexd, len(data), [s.source("a")])
    finally:
        await f.close()
    assert store.blob_path(hexd).read_bytes() == data
    assert len(s.requests) == 3 and all(e - b + 1 <= 4 * CHUNK for b, e in s.requests) and tiles(len(data), s)
    # (what http.client had buffered past the headers is written first; the rest is spliced)
    assert f.splice and len(data) - 3 * 8192 <= sum(splices) < len(data)  # (its buffer holds 8 KiB)
    assert partials(store) == []


async def test_empty_blob(tmp_path: Path, seeders: list[Seeder]) -> None:
    hexd, data = hashlib.sha256(b"").hexdigest(), b""
    s = await seeder(seeders, {hexd: data})
    store = Store(tmp_path)
    f = Fetcher(store, chunk_size=CHUNK)
    try:
        await fetch(f, hexd, 0, [s.source("a")])
    finally:
        await f.close()
    assert store.blob_path(hexd).read_bytes() == b""
    assert partials(store) == []


@needs_splice
async def test_full_disk_while_splicing_is_a_clear_error(
    tmp_path: Path, seeders: list[Seeder], monkeypatch: pytest.MonkeyPatch,
) -> None:
    hexd, data = blob(6 * CHUNK)
    s = await seeder(seeders, {hexd: data})
    real = os.splice

    def full(src: int, dst: int, count: int, **kw: int | None) -> int:
        if kw.get("offset_dst") is not None:  # into the file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst, count, **kw)

    monkeypatch.setattr(os, "splice", full)
    store = Store(tmp_path)
    f = Fetcher(store, chunk_size=CHUNK)
    try:
        with pytest.raises(TransferError, match=f"cannot store sha256:{hexd}: No space left on device"):
            await fetch(f, hexd, len(data), [s.source("a")])
        assert not f.health.bad()  # our disk, not the source
    finally:
        await f.close()
    assert visible(store) == []  # no blob, and no partial file holding space on a full disk


@needs_splice
@pytest.mark.parametrize("how", ["splice refused", "splice off", "chunked body"])
async def test_bodies_splice_cannot_take_are_received_into_the_mapping(
    tmp_path: Path, seeders: list[Seeder], monkeypatch: pytest.MonkeyPatch, how: str,
) -> None:
    """Bodies of known length are spliced from the socket into the file; a kernel or filesystem that refuses
    splice(2) costs one retried chunk, and bodies without a length (chunked) go through http.client."""
    hexd, data = blob(6 * CHUNK + 77)
    s = await seeder(seeders, {hexd: data}, chunked=how == "chunked body")
    refused: list[int] = []
    if how == "splice refused":
        def refuse(*args: object, **kw: object) -> int:
            refused.append(1)
            raise OSError(errno.EINVAL, "Invalid argument")

        monkeypatch.setattr(os, "splice", refuse)
    store = Store(tmp_path)
    f = Fetcher(store, chunk_size=CHUNK)
    f.splice = how != "splice off"
    try:
        await fetch(f, hexd, len(data), [s.source("a")])
    finally:
        await f.close()
    assert store.blob_path(hexd).read_bytes() == data
    assert partials(store) == []
    if how == "splice refused":
        # asked once per worker that was already receiving (one per stream), then never again
        assert 1 <= len(refused) <= STREAMS_PER_SOURCE and not f.splice
    assert f.splice == (how == "chunked body")


async def test_blob_is_visible_before_its_fsync_and_synced_in_the_background(
    tmp_path: Path, seeders: list[Seeder], held_blob_sync: threading.Event,
) -> None:
    """The pull returns once the blob verified and was renamed; the fsync (seconds for a big blob) comes
    after, and a journal entry covers the gap (see test_store's crash recovery)."""
    hexd, data = blob(5 * CHUNK)
    s = await seeder(seeders, {hexd: data})
    store = Store(tmp_path)
    release = held_blob_sync
    f = Fetcher(store, chunk_size=CHUNK)
    try:
        await fetch(f, hexd, len(data), [s.source("a")])
    finally:
        await f.close()
    assert store.blob_path(hexd).read_bytes() == data
    assert os.listdir(store.unsynced_dir) == [f"sha256-{hexd}"]
    release.set()
    assert await asyncio.to_thread(store.wait_synced, 30)
    assert os.listdir(store.unsynced_dir) == []


async def test_two_seeders_share_the_chunks(tmp_path: Path, seeders: list[Seeder]) -> None:
    hexd, data = blob(40 * CHUNK)
    a = await seeder(seeders, {hexd: data}, delay=0.01)
    b = await seeder(seeders, {hexd: data}, delay=0.01)
    store = Store(tmp_path)
    f = Fetcher(store, chunk_size=CHUNK)
    try:
        await fetch(f, hexd, len(data), [a.source("a"), b.source("b")])
    finally:
        await f.close()
    assert store.blob_path(hexd).read_bytes() == data
    assert a.requests and b.requests and tiles(len(data), a, b)


@pytest.mark.parametrize("streams", [0, 3])
async def test_requests_in_flight_per_source(tmp_path: Path, seeders: list[Seeder], streams: int) -> None:
    """One request at a time to a peer (runs keep it busy); a source may ask for more (registries do)."""
    hexd, data = blob(12 * CHUNK)
    s = await seeder(seeders, {hexd: data}, gate=streams)  # held until `streams` requests are in at once
    store = Store(tmp_path)
    f = Fetcher(store, chunk_size=CHUNK, run_size=CHUNK)
    try:
        await fetch(f, hexd, len(data), [Source(id="s", blob_prefix=f"{s.url}/blobs/", streams=streams)])
    finally:
        await f.close()
    assert store.blob_path(hexd).read_bytes() == data and tiles(len(data), s)
    assert s.peak == (streams or 1)


async def test_corrupt_seeder_is_found_and_its_chunks_refetched(tmp_path: Path, seeders: list[Seeder]) -> None:
    hexd, data = blob(20 * CHUNK)
    good = await seeder(seeders, {hexd: data}, delay=0.01)
    # slower: it gets the fewer chunks (its first share only), so it is the first suspect
    # a flipped byte in every chunk: whichever chunks the bad seeder gets to serve (timing decides) are bad
    bad = await seeder(seeders, {hexd: data}, delay=0.3, corrupt_at={5, *(k * CHUNK + 9 for k in range(1, 20))})
    store = Store(tmp_path)
    f = Fetcher(store, chunk_size=CHUNK)
    try:
        await fetch(f, hexd, len(data), [good.source("good"), bad.source("bad")])
        assert f.health.is_bad("bad") and not f.health.is_bad("good")
        # the bad seeder's chunks were fetched again from the good one, not the whole blob
        assert good.served == len(data) and 0 < bad.served < len(data) // 2
    finally:
        await f.close()
    assert hashlib.sha256(store.blob_path(hexd).read_bytes()).hexdigest() == hexd
    assert partials(store) == []


async def test_only_a_corrupt_seeder_lands_nothing(tmp_path: Path, seeders: list[Seeder]) -> None:
    hexd, data = blob(5 * CHUNK)
    bad = await seeder(seeders, {hexd: data}, corrupt_at={100})
    store = Store(tmp_path)
    f = Fetcher(store, chunk_size=CHUNK)
    try:
        with pytest.raises(TransferError, match="digest mismatch"):
            await fetch(f, hexd, len(data), [bad.source("bad")])
        assert f.health.is_bad("bad")
    finally:
        await f.close()
    assert visible(store) == []  # no blob, no partial, no record


async def test_seeder_dies_midway_the_other_finishes(tmp_path: Path, seeders: list[Seeder]) -> None:
    hexd, data = blob(30 * CHUNK)
    dying = await seeder(seeders, {hexd: data}, die_after=5 * CHUNK, delay=0.005)
    steady = await seeder(seeders, {hexd: data}, delay=0.005)
    store = Store(tmp_path)
    f = Fetcher(store, chunk_size=CHUNK)
    try:
        await fetch(f, hexd, len(data), [dying.source("dying"), steady.source("steady")])
    finally:
        await f.close()
    assert store.blob_path(hexd).read_bytes() == data
    assert partials(store) == []


@pytest.mark.parametrize("same_process", [True, False])
async def test_resume_after_interruption(tmp_path: Path, seeders: list[Seeder], same_process: bool) -> None:
    hexd, data = blob(24 * CHUNK)
    dying = await seeder(seeders, {hexd: data}, die_after=10 * CHUNK)
    store = Store(tmp_path)
    f = Fetcher(store, chunk_size=CHUNK, streams=1)
    with pytest.raises(TransferError, match="no source could serve"):
        await fetch(f, hexd, len(data), [dying.source("dying")])
    assert not store.has_blob(hexd)
    assert sorted(partials(store)) == [f"{PARTIAL_PREFIX}{hexd}", f"{PARTIAL_PREFIX}{hexd}.json"]
    assert missing_bytes(store, {hexd: len(data)}) == 0  # the partial file already holds its space
    if not same_process:
        await f.close()
        store = Store(tmp_path)  # a restarted node: the running hash is gone, the partial file is not
        f = Fetcher(store, chunk_size=CHUNK, streams=1)
    fresh = await resume_from_fresh_seeder(f, seeders, hexd, data)
    assert store.blob_path(hexd).read_bytes() == data
    assert fresh.served <= len(data) - 9 * CHUNK  # only what was missing
    assert partials(store) == []


async def test_resume_whose_record_is_ahead_of_the_data(tmp_path: Path, seeders: list[Seeder]) -> None:
    """Progress records are not fsynced, so after a crash one may list a chunk the disk never got: the digest
    fails, the chunks from "disk" are refetched, and the blob still lands."""
    hexd, data = blob(24 * CHUNK)
    dying = await seeder(seeders, {hexd: data}, die_after=10 * CHUNK)
    store = Store(tmp_path)
    f = Fetcher(store, chunk_size=CHUNK, streams=1)
    with pytest.raises(TransferError):
        await fetch(f, hexd, len(data), [dying.source("dying")])
    await f.close()
    fd = os.open(tmp_path / "blobs" / f"{PARTIAL_PREFIX}{hexd}", os.O_WRONLY)
    os.pwrite(fd, bytes(CHUNK), 3 * CHUNK)  # a recorded chunk lost in the crash
    os.close(fd)
    store = Store(tmp_path)
    f = Fetcher(store, chunk_size=CHUNK, streams=1)
    fresh = await resume_from_fresh_seeder(f, seeders, hexd, data)
    assert store.blob_path(hexd).read_bytes() == data
    assert not f.health.bad()  # the disk was at fault, not the source
    assert fresh.served > 20 * CHUNK  # the chunks resumed from disk were fetched again
    assert partials(store) == []


async def test_redirecting_source_is_fetched_through_aiohttp(tmp_path: Path, seeders: list[Seeder]) -> None:
    hexd, data = blob(6 * CHUNK + 5)
    s = await seeder(seeders, {hexd: data})
    store = Store(tmp_path)
    f = Fetcher(store, chunk_size=CHUNK)
    try:
        await fetch(f, hexd, len(data), [Source(id="moved", blob_prefix=f"{s.url}/moved/")])
        assert f._indirect == {"moved"}  # the plain-socket path handed it over instead of failing
    finally:
        await f.close()
    assert store.blob_path(hexd).read_bytes() == data
    assert partials(store) == []


async def test_close_mid_transfer_stops_the_receiving_threads(tmp_path: Path, seeders: list[Seeder]) -> None:
    hexd, data = blob(40 * CHUNK)
    s = await seeder(seeders, {hexd: data}, delay=0.2)
    store = Store(tmp_path)
    f = Fetcher(store, chunk_size=CHUNK, run_size=CHUNK, streams=3)  # three slow requests at a time
    task = asyncio.create_task(fetch(f, hexd, len(data), [s.source("slow")]))
    for _ in range(500):
        if len(s.requests) >= 3:
            break
        await asyncio.sleep(0.01)
    t0 = time.monotonic()
    await f.close()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - t0 < 2  # blocked receives were woken, not waited out
    for _ in range(100):
        if not any(t.name.startswith("omx-fetch") for t in threading.enumerate()):
            break
        await asyncio.sleep(0.02)
    assert not any(t.name.startswith("omx-fetch") for t in threading.enumerate())
    assert not store.has_blob(hexd)


async def test_concurrent_requests_share_one_transfer(tmp_path: Path, seeders: list[Seeder]) -> None:
    hexd, data = blob(16 * CHUNK)
    s = await seeder(seeders, {hexd: data}, delay=0.01)
    store = Store(tmp_path)
    f = Fetcher(store, chunk_size=CHUNK)
    try:
        await asyncio.gather(*(fetch(f, hexd, len(data), [s.source("s")]) for _ in range(4)))
    finally:
        await f.close()
    assert s.served == len(data)
    assert store.blob_path(hexd).read_bytes() == data
    assert not store._pins  # every waiter released its pin


async def test_bandwidth_limit(tmp_path: Path, seeders: list[Seeder]) -> None:
    hexd, data = blob(8 * CHUNK)  # 512 KiB at 1 MB/s: at least ~0.5 s after the first second's burst... or so
    s = await seeder(seeders, {hexd: data})
    store = Store(tmp_path)
    f = Fetcher(store, chunk_size=CHUNK, rate_limit=256_000)
    t0 = time.monotonic()
    try:
        await fetch(f, hexd, len(data), [s.source("s")])
    finally:
        await f.close()
    assert time.monotonic() - t0 > 0.9  # 524 KB at 256 KB/s with a one-second burst: > 1 s


def _make_model(store: Store, name: str, size: int, seed: int) -> None:
    """A model with one distinct blob of `size` bytes (enough for the budget arithmetic)."""
    ensure_demo_model(store)
    _, data = blob(size, seed)
    digest = store.put_blob_bytes(data)
    m = store.read_manifest("omx-tiny:latest")
    extra = m.layers[0].model_copy(update={"media_type": "application/vnd.ollama.image.license",
                                           "digest": digest, "size": size})
    store.write_manifest(name, m.model_copy(update={"layers": [*m.layers, extra]}))


def test_budget_evicts_lru_unprotected_models(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _make_model(store, "old:latest", 300_000, 1)
    _make_model(store, "loaded:latest", 300_000, 2)
    _make_model(store, "recent:latest", 300_000, 3)
    uses = UseRecord(store)
    uses.touch("old:latest")
    uses.touch("recent:latest")
    from omx.models.transfer import store_bytes

    used = store_bytes(store)
    protected = {ModelName.parse("loaded:latest")}
    evicted = make_room(store, 200_000, budget=used + 150_000, protected=protected, uses=uses)
    assert evicted == ["old:latest"]
    assert store.exists("loaded:latest") and store.exists("recent:latest")
    with pytest.raises(BudgetExceeded, match="disk budget"):
        make_room(store, 10 << 20, budget=used, protected=protected | {ModelName.parse("recent:latest")}, uses=uses)


async def test_pull_progress_stream_and_budget(tmp_path: Path, seeders: list[Seeder]) -> None:
    src = Store(tmp_path / "src")
    _make_model(src, "big:latest", 5 * CHUNK + 7, 9)
    data = src.manifest_bytes("big:latest")
    m = src.read_manifest("big:latest")
    s = await seeder(seeders, {h: src.blob_path(h).read_bytes() for h in m.digests()})
    dst = Store(tmp_path / "dst")
    f = Fetcher(dst, chunk_size=CHUNK)
    plan = PullPlan(ModelName.parse("big:latest"), data, [s.source("s")])
    try:
        lines = [x async for x in pull_model(dst, f, plan, UseRecord(dst))]
    finally:
        await f.close()
    statuses = [x["status"] for x in lines]
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    big = next(layer for layer in m.layers if layer.size == 5 * CHUNK + 7)
    mine = [x for x in lines if x.get("digest") == big.digest]
    assert mine[0]["status"] == f"pulling {big.hex[:12]}" and mine[0]["total"] == big.size
    assert mine[-1]["completed"] == big.size
    assert all("completed" not in x or x["completed"] > 0 for x in lines)  # omitempty like Ollama
    assert dst.manifest_bytes("big:latest") == data  # byte for byte: the same digest
    assert not dst._pins
    need = missing_bytes(Store(tmp_path / "empty"), plan.sizes())
    assert need == sum(plan.sizes().values())
    with pytest.raises(BudgetExceeded):
        make_room(Store(tmp_path / "empty"), need, budget=need // 2, protected=set(), uses=UseRecord(dst))
    assert visible(Store(tmp_path / "empty")) == []


async def wait_until(cond: Callable[[], bool], within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


@dataclass
class Staller:
    """A raw HTTP server that answers a blob request's headers, then drips `drip` bytes every `every` seconds
    (0: nothing at all) and never finishes: a hostile or broken registry. Counts its open connections."""

    size: int  # the blob's, for a request without a Range
    drip: int = 0
    every: float = 0.2
    open: int = 0
    accepted: int = 0
    url: str = ""
    server: asyncio.base_events.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        self.accepted += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            m = re.search(rb"Range: bytes=(\d+)-(\d+)", head, re.IGNORECASE)
            n = int(m.group(2)) - int(m.group(1)) + 1 if m else self.size
            writer.write(b"HTTP/1.1 206 Partial Content\r\nContent-Length: %d\r\n\r\n" % n)
            await writer.drain()
            while True:  # until the client hangs up (a read sees EOF) or the server is stopped
                if self.drip:
                    writer.write(b"x" * self.drip)
                    await writer.drain()
                with contextlib.suppress(TimeoutError):
                    if not await asyncio.wait_for(reader.read(1), self.every):
                        break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def start(self) -> Staller:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def source(self, sid: str) -> Source:
        return Source(id=sid, blob_prefix=f"{self.url}/blobs/")

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def stallers() -> AsyncIterator[list[Staller]]:
    made: list[Staller] = []
    yield made
    for s in made:
        await s.stop()


@pytest.mark.parametrize("how", ["404", "refused"])
async def test_failure_before_any_chunk_leaves_no_partial(
    tmp_path: Path, seeders: list[Seeder], how: str,
) -> None:
    """A manifest may declare a huge layer whose blob never comes: the space reserved for it is given back
    at once, since there is nothing to resume."""
    size = 64 << 20
    hexd = hashlib.sha256(b"declared, never served").hexdigest()
    if how == "404":
        s = await seeder(seeders, {})
        src = s.source("a")
    else:
        with socket.socket() as sock:  # a port nobody listens on
            sock.bind(("127.0.0.1", 0))
            src = Source(id="a", blob_prefix=f"http://127.0.0.1:{sock.getsockname()[1]}/blobs/")
    store = Store(tmp_path)
    f = Fetcher(store, chunk_size=CHUNK)
    try:
        with pytest.raises(TransferError, match="no source could serve"):
            await fetch(f, hexd, size, [src])
    finally:
        await f.close()
    assert visible(store) == [] and store_bytes(store) == 0


@pytest.mark.parametrize("drip", [0, 100])
async def test_transfer_nobody_waits_for_stops(tmp_path: Path, stallers: list[Staller], drip: int) -> None:
    """A client that goes away stops the transfer it alone waited for: its connections close and its threads
    end, instead of a stalled (or dripping) source holding them for hours; with no chunk in, nothing is left."""
    s = await Staller(8 * CHUNK, drip=drip).start()
    stallers.append(s)
    hexd = hashlib.sha256(b"stalled").hexdigest()
    store = Store(tmp_path)
    f = Fetcher(store, chunk_size=CHUNK, streams=2)
    try:
        task = asyncio.create_task(fetch(f, hexd, 8 * CHUNK, [s.source("slow")]))
        assert await wait_until(lambda: s.open == 2)
        t = f.in_flight(hexd)
        assert t is not None and t.task is not None
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await wait_until(lambda: t.task.done() and s.open == 0 and f.in_flight(hexd) is None)
        assert visible(store) == []  # no chunk came in: nothing to resume
    finally:
        await f.close()


async def test_shared_transfer_runs_on_for_the_remaining_waiter(tmp_path: Path, seeders: list[Seeder]) -> None:
    hexd, data = blob(16 * CHUNK)
    s = await seeder(seeders, {hexd: data}, delay=0.2)
    store = Store(tmp_path)
    f = Fetcher(store, chunk_size=CHUNK, run_size=2 * CHUNK)
    try:
        leaving = asyncio.create_task(fetch(f, hexd, len(data), [s.source("s")]))
        staying = asyncio.create_task(fetch(f, hexd, len(data), [s.source("s")]))
        assert await wait_until(lambda: len(s.requests) >= 1)
        leaving.cancel()
        await asyncio.wait_for(staying, 30)
    finally:
        await f.close()
    assert s.served == len(data)  # one transfer, not cancelled and not started over
    assert store.blob_path(hexd).read_bytes() == data


async def test_pull_after_an_abandoned_transfer_completes_from_a_working_source(
    tmp_path: Path, seeders: list[Seeder], stallers: list[Staller],
) -> None:
    """A new request for a blob whose abandoned transfer is still winding down waits for it (the two never
    share the partial file), then completes from a source that works."""
    hexd, data = blob(8 * CHUNK)
    stuck = await Staller(len(data)).start()
    stallers.append(stuck)
    store = Store(tmp_path)
    f = Fetcher(store, chunk_size=CHUNK)
    try:
        task = asyncio.create_task(fetch(f, hexd, len(data), [stuck.source("stuck")]))
        assert await wait_until(lambda: stuck.open == 1)
        task.cancel()
        good = await seeder(seeders, {hexd: data})
        await asyncio.wait_for(fetch(f, hexd, len(data), [good.source("good")]), 30)
    finally:
        await f.close()
    assert store.blob_path(hexd).read_bytes() == data
    assert partials(store) == [] and stuck.open == 0


@pytest.mark.parametrize("with_good", [False, True])
async def test_dripping_source_is_given_up_on(
    tmp_path: Path, seeders: list[Seeder], stallers: list[Staller], with_good: bool,
) -> None:
    """A source that sends a few bytes now and then (never slow enough for the per-read timeout) fails its
    requests once they average under the minimum rate: another source takes its chunks over, or the pull
    fails instead of hanging."""
    hexd, data = blob(8 * CHUNK)
    drip = await Staller(len(data), drip=50, every=0.1).start()
    stallers.append(drip)
    sources = [drip.source("drip")]
    if with_good:
        sources.append((await seeder(seeders, {hexd: data})).source("good"))
    store = Store(tmp_path)
    f = Fetcher(store, chunk_size=CHUNK, timeout=0.5)  # the window the minimum rate is measured over
    try:
        if with_good:
            await asyncio.wait_for(fetch(f, hexd, len(data), sources), 30)
            assert store.blob_path(hexd).read_bytes() == data
        else:
            with pytest.raises(TransferError, match="no source could serve"):
                await asyncio.wait_for(fetch(f, hexd, len(data), sources), 30)
            assert visible(store) == []
        assert drip.accepted >= 1 and await wait_until(lambda: drip.open == 0)
    finally:
        await f.close()
