"""Blob transfer throughput on loopback, side by side: the plain-socket ceiling, omx from one and three seeders.

The ceiling is a plain TCP copy of the file (sendfile on one side, recv_into + write on the other) with no
HTTP and no verification. omx pulls the same blob through real node processes' peer route (GET
/api/v1/internal/blobs, Range chunks) into a fresh store, verifying sha256 as the bytes arrive; the CPU
seconds spent hashing and the bytes hashed are reported (bytes hashed == blob size: no second pass).
A pulled blob only becomes visible once it is on disk (fsync before the rename), so the same plain copy
followed by fsync is shown too, and the last column compares against it: where the disk is slower than
loopback TCP, that is the real ceiling.
Targets: one seeder >= 0.7x the ceiling; hashing is a single pass over the data.

Usage: python scenarios/bench_transfer.py [--size 1GiB] [--runs 1]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import resource
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from omx.models.store import Store
from omx.models.transfer import Fetcher, Source
from omx.node.config import parse_bytes
from omx.node.launch import NodeProc, start_node


def make_blob(path: Path, size: int) -> str:
    """Random-ish data written once (hashed while writing); returns the hex digest."""
    h = hashlib.sha256()
    block = os.urandom(1 << 20)
    with path.open("wb") as f:
        left = size
        i = 0
        while left:
            piece = (block[i % 251:] + block[: i % 251])[: min(left, len(block))]
            f.write(piece)
            h.update(piece)
            left -= len(piece)
            i += 1
    return h.hexdigest()


def cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def plain_copy(src: Path, dst: Path, durable: bool = False) -> float:
    """Seconds for a raw loopback TCP copy of src into dst (the ceiling); `durable` adds the fsync."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve() -> None:
        conn, _ = srv.accept()
        with conn, src.open("rb") as f:
            conn.sendfile(f)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            while n := s.recv_into(view):
                os.write(fd, view[:n])
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
    dt = time.perf_counter() - t0
    t.join()
    srv.close()
    return dt


async def omx_pull(store: Store, hexd: str, size: int, seeders: list[NodeProc]) -> tuple[float, float, int, float]:
    """(seconds, hash CPU seconds, bytes hashed, process CPU seconds) for one pull into `store`."""
    f = Fetcher(store)
    sources = [Source(id=n.id, blob_prefix=f"{n.url}/api/v1/internal/blobs/") for n in seeders]
    pins: set[str] = set()
    c0 = cpu()
    t0 = time.perf_counter()
    try:
        await f.fetch(hexd, size, sources, pins)
    finally:
        dt = time.perf_counter() - t0
        store._unpin_all(pins)
        await f.close()
    return dt, f.hash_cpu_s, f.hashed_bytes, cpu() - c0


def run(coro: Any) -> Any:
    """On uvloop when installed, like a node."""
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1GiB", help="blob size (1GiB, 256MiB, ...)")
    ap.add_argument("--runs", type=int, default=1, help="runs of each, best kept")
    args = ap.parse_args()
    size = parse_bytes(args.size)
    with tempfile.TemporaryDirectory(prefix="omx-bench-") as tmp:
        base = Path(tmp)
        src = base / "blob"
        print(f"writing a {size / 2**30:.2f} GiB blob ...", flush=True)
        hexd = make_blob(src, size)
        nodes: list[NodeProc] = []
        try:
            for i in range(3):
                d = base / f"seeder{i}"
                (d / "blobs").mkdir(parents=True)
                os.link(src, d / "blobs" / f"sha256-{hexd}")  # same bytes, no copy
                nodes.append(start_node(d, "--no-demo", env={"OMX_ALLOW_ANONYMOUS_BLOBS": "1",
                                                             "OMX_LOG_LEVEL": "WARNING"}))
            rows: list[tuple[str, float, str]] = []
            for label, durable in (("plain loopback socket copy (ceiling)", False), ("  the same + fsync", True)):
                best = float("inf")
                for _ in range(args.runs):
                    best = min(best, plain_copy(src, base / "copy", durable))
                    (base / "copy").unlink()
                rows.append((label, best, "-"))
            for label, seeders in (("omx transfer, 1 seeder", nodes[:1]), ("omx transfer, 3 seeders", nodes)):
                results = []
                for r in range(args.runs):
                    dest = base / f"dest-{label[-9:].strip()}-{r}"
                    store = Store(dest)
                    res = run(omx_pull(store, hexd, size, seeders))
                    assert store.has_blob(hexd)
                    results.append(res)
                    shutil.rmtree(dest)
                dt, hash_s, hashed, proc_s = min(results)
                note = (f"hash {hash_s:.2f} CPU s over {hashed / size:.2f}x the data; "
                        f"receiver CPU {proc_s:.2f} s")
                rows.append((label, dt, note))
        finally:
            for n in nodes:
                n.stop()
    ceiling, durable_ceiling = rows[0][1], rows[1][1]
    print(f"\nblob {size / 2**30:.2f} GiB, best of {args.runs}, {os.cpu_count()} CPUs")
    print(f"{'':40} {'seconds':>8} {'MB/s':>8} {'x ceiling':>10} {'x +fsync':>9}  notes")
    for label, dt, note in rows:
        print(f"{label:40} {dt:8.2f} {size / dt / 1e6:8.0f} {ceiling / dt:10.2f} {durable_ceiling / dt:9.2f}  {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
