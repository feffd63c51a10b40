"""End-to-end latency of a non-streaming 1-token generate on the demo model (target: p50 < 20 ms).

Measures what a client sees: HTTP request, prompt templating, runner IPC, prefill, one sampled
token, response. The model is loaded first (load time is not part of the figure).
Usage: python scenarios/bench_latency.py [--requests 300]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from omx.node.launch import start_node


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=300)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        node = start_node(Path(tmp) / "node", env={"OMX_KEEP_ALIVE": "-1", "OMX_LOG_LEVEL": "WARNING"})
        try:
            with httpx.Client(base_url=node.url, timeout=60) as c:
                body = {"model": "omx-tiny", "prompt": "Why is the sky blue?", "stream": False,
                        "options": {"num_predict": 1}}
                for _ in range(20):  # load + warm up
                    c.post("/api/generate", json=body).raise_for_status()
                lat = []
                for _ in range(args.requests):
                    t0 = time.perf_counter()
                    r = c.post("/api/generate", json=body)
                    lat.append((time.perf_counter() - t0) * 1000)
                    r.raise_for_status()
                    assert r.json()["eval_count"] <= 1
        finally:
            node.stop()
    lat.sort()
    q = statistics.quantiles(lat, n=100)
    print(f"non-streaming 1-token generate on omx-tiny, {len(lat)} requests, one keep-alive connection")
    print(f"p50 {statistics.median(lat):.2f} ms   p90 {q[89]:.2f} ms   p99 {q[98]:.2f} ms   "
          f"min {lat[0]:.2f} ms   (target p50 < 20 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
