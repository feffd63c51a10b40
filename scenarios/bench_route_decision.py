"""Cost of one routing decision (replica choice) with a region of simulated members.

    python scenarios/bench_route_decision.py [--members 10000] [--models 50] [--replicas 20]

Builds the router over a membership view of N members (gossip metadata as real nodes advertise it) and
times `Router.targets()` — what every routed request pays before its first byte leaves the node — both
for a model with R replicas and for an unknown model, plus one holder-index rebuild (done at most every
250 ms, off the per-request path).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from types import SimpleNamespace

from omx.node.config import NodeConfig
from omx.node.events import EventBus
from omx.node.router import Router


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=10_000)
    ap.add_argument("--models", type=int, default=50)
    ap.add_argument("--replicas", type=int, default=20)
    ap.add_argument("--decisions", type=int, default=20_000)
    args = ap.parse_args()
    rnd = random.Random(0)
    names = [f"model-{i}:latest" for i in range(args.models)]
    holders: dict[int, list[str]] = {i: [] for i in range(args.members)}
    for name in names:
        for i in rnd.sample(range(args.members), args.replicas):
            holders[i].append(name)
    members = [SimpleNamespace(id=f"n-{i:05d}", state="alive", meta={
        "region": "r1", "api": f"http://10.0.{i // 250}.{i % 250}:11434", "have": holders[i],
        "models": holders[i][:1], "inflight": rnd.randint(0, 8), "slots": 12}) for i in range(args.members)]
    swim = SimpleNamespace(members=lambda: members, get=lambda nid: None)
    cluster = SimpleNamespace(id="n-self", swim=swim, reg={}, api_url="http://127.0.0.1:11434")
    runners = SimpleNamespace(runners={})
    router = Router(NodeConfig(region="r1"), cluster, runners, EventBus())  # type: ignore[arg-type]

    t0 = time.perf_counter()
    router._holders_index(fresh=True)
    rebuild_ms = (time.perf_counter() - t0) * 1000
    times = []
    for i in range(args.decisions):
        name = names[i % len(names)]
        t0 = time.perf_counter()
        ts = router.targets(name, False)
        times.append((time.perf_counter() - t0) * 1e6)
        assert len(ts) == args.replicas
    unknown = []
    for _ in range(1000):
        t0 = time.perf_counter()
        router.targets("nope:latest", True)
        unknown.append((time.perf_counter() - t0) * 1e6)
    times.sort()
    print(f"{args.members} members, {args.models} models x {args.replicas} replicas")
    print(f"routing decision: p50 {statistics.median(times):.1f} us, p99 {times[int(.99 * len(times))]:.1f} us")
    print(f"unknown model:    p50 {statistics.median(unknown):.1f} us")
    print(f"holder index rebuild (every 250 ms at most): {rebuild_ms:.1f} ms")


if __name__ == "__main__":
    main()
