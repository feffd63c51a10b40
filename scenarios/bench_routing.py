"""Routing overhead: the same 1-token request sent to the node that holds the model, and to a node that
routes it there, interleaved, on a real 2-node cluster on loopback.

    python scenarios/bench_routing.py [--requests 300] [--concurrency 1]

Prints latency percentiles for both paths and their difference (the cost of one routed hop: metadata
lookup, replica choice, a keep-alive HTTP call to the peer, NDJSON pass-through). The target is a
routing overhead well under 100 ms (we aim for ~1 ms).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from omx.models.demo import ensure_demo_model
from omx.models.store import Store
from omx.node.launch import start_cluster, wait_until
from omx.node.router import percentile

BODY = {"model": "solo", "prompt": "hello world", "stream": False, "options": {"num_predict": 1, "temperature": 0}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        ensure_demo_model(Store(base / "node1"), "solo:latest")  # only the first node holds the model
        nodes = start_cluster(base, 2, 1, "--no-demo", env={"OMX_LOG_LEVEL": "WARNING"})
        try:
            holder, router = nodes

            def advertised() -> bool:
                ms = httpx.get(router.url + "/api/v1/cluster", timeout=5).json()["members"]
                return any(m["id"] == holder.id and "solo:latest" in (m["meta"].get("have") or []) for m in ms)

            wait_until(advertised, 60, what="the holder to advertise the model")
            with httpx.Client(timeout=60) as c:
                for url in (holder.url, router.url) * 5:  # warm up: load the model, open keep-alive connections
                    c.post(url + "/api/generate", json=BODY).raise_for_status()
            times: dict[str, list[float]] = {"direct": [], "routed": []}

            def one(which: str, client: httpx.Client) -> None:
                url = holder.url if which == "direct" else router.url
                t0 = time.perf_counter()
                r = client.post(url + "/api/generate", json=BODY)
                dt = (time.perf_counter() - t0) * 1000
                r.raise_for_status()
                times[which].append(dt)

            clients = [httpx.Client(timeout=60) for _ in range(args.concurrency)]
            order = ["direct", "routed"] * args.requests
            with ThreadPoolExecutor(args.concurrency) as pool:
                list(pool.map(lambda i: one(order[i], clients[i % args.concurrency]), range(len(order))))
            for c in clients:
                c.close()
            print(f"{args.requests} requests per path, concurrency {args.concurrency}, 1-token generate (ms)")
            print(f"{'path':8} {'p50':>8} {'p90':>8} {'p99':>8} {'mean':>8}")
            # every path has args.requests samples, so no percentile is None
            pcts = {k: [percentile(xs, q) or 0.0 for q in (.5, .9, .99)] for k, xs in times.items()}
            for k, (p50, p90, p99) in pcts.items():
                print(f"{k:8} {p50:8.2f} {p90:8.2f} {p99:8.2f} {statistics.mean(times[k]):8.2f}")
            d50 = pcts["routed"][0] - pcts["direct"][0]
            print(f"routing overhead (p50 routed - p50 direct): {d50:.2f} ms")
        finally:
            for n in nodes:
                n.stop()


if __name__ == "__main__":
    main()
