"""Membership benchmark: our SWIM (``omx.protocols.swim``) against ``swim-protocol``, then ours at scale.

Part 1 — real UDP/TCP sockets on 127.0.0.1, all members in one process, same timings (1 s probe
interval): time to converge from a single seed, time until every member suspects / declares a
killed member, packets sent, resident memory. Part 2 — ours alone in the virtual-time simulator
at 1,000 and 10,000 members with 1 % packet loss: how fast a failure reaches everyone, message
rate per member, false dead verdicts, memory per member.

Every measurement runs in its own subprocess so memory figures do not mix. Convergence of ours
is measured ``--runs`` times (one full run with the kill, the rest converge-only) and reported as
the median, with the machine's load average, since one process of N members on a shared machine
is noisy.

    python scenarios/bench_membership.py               # 50 and 200 real members; 1k and 10k simulated
    python scenarios/bench_membership.py --quick       # 50 real members; 1k simulated
    python scenarios/bench_membership.py --omx-only    # ours on real sockets only (convergence runs)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from contextlib import AsyncExitStack

CAP = 60.0  # seconds we wait for any one phase of a real-socket run


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def _until(cond, cap: float = CAP) -> float | None:
    t0 = time.perf_counter()
    while not cond():
        if time.perf_counter() - t0 > cap:
            return None
        await asyncio.sleep(0.05)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- ours, real sockets


async def run_omx(n: int, kill: bool = True) -> dict:
    from omx.protocols.swim import ALIVE, DEAD, SUSPECT, SwimConfig, SwimNode

    m0 = rss_mb()
    key = os.urandom(32)
    nodes = [SwimNode(f"m{i:04d}", "127.0.0.1", 0, key, meta={"role": "worker"}, config=SwimConfig())
             for i in range(n)]
    for node in nodes:
        await node.start()
    ids = {x.id for x in nodes}

    def converged() -> bool:
        # The poll runs on the members' own event loop, so it must be cheap or it slows what it measures:
        # each node's O(1) alive count first; the full scan (every member sees every id alive) only
        # confirms a candidate, so the figure stays exactly "all n see all n alive".
        return (all(x.num_alive == n for x in nodes)
                and all({m.id for m in x.members() if m.state == ALIVE} == ids for x in nodes))

    t0 = time.perf_counter()
    cpu0 = time.process_time()
    await asyncio.gather(*(x.join([nodes[0].address]) for x in nodes[1:]))
    joined = time.perf_counter() - t0
    conv = await _until(converged)
    conv = None if conv is None else time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    if not kill:
        for x in nodes:
            await x.stop()
        return {"converge_s": conv, "joined_s": joined, "cpu_s": cpu, "load": os.getloadavg()[0]}
    victim = nodes[-1]
    others = nodes[:-1]
    await victim.stop()
    sus = await _until(lambda: all((m := x.get(victim.id)) is not None and m.state in (SUSPECT, DEAD)
                                   for x in others))
    dead = await _until(lambda: all((m := x.get(victim.id)) is not None and m.state == DEAD for x in others))
    if sus is not None and dead is not None:
        dead += sus
    pkts = sum(x.stats().get("udp_sent", 0) for x in nodes)
    mem = rss_mb() - m0
    for x in others:
        await x.stop()
    assert len(ids) == n
    return {"converge_s": conv, "suspect_all_s": sus, "dead_all_s": dead, "packets": pkts, "mem_mb": mem,
            "joined_s": joined, "cpu_s": cpu, "load": os.getloadavg()[0]}


# --------------------------------------------------------------------------- swim-protocol, real sockets


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    while len(ports) < n:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        p = s.getsockname()[1]
        t = socket.socket()
        try:
            t.bind(("127.0.0.1", p))
        except OSError:
            s.close()
            t.close()
            continue
        socks += [s, t]
        ports.append(p)
    for s in socks:
        s.close()
    return ports


async def run_swimprotocol(n: int) -> dict:
    from swimprotocol.members import Members
    from swimprotocol.status import Status
    from swimprotocol.udp import UdpTransport
    from swimprotocol.udp.config import UdpConfig
    from swimprotocol.udp.pack import UdpPack
    from swimprotocol.worker import Worker

    sent = [0]
    orig = UdpPack.pack

    def counting_pack(self, packet):
        sent[0] += 1
        return orig(self, packet)

    UdpPack.pack = counting_pack  # count packets without touching its send path
    m0 = rss_mb()
    ports = _free_ports(n)
    names = [f"127.0.0.1:{p}" for p in ports]
    cluster = []
    t0 = time.perf_counter()
    for i, name in enumerate(names):
        cfg = UdpConfig(local_name=name, peers=[names[0]] if i else [], secret="bench-secret",
                        local_metadata={"role": b"worker"}, ping_interval=1.0)
        members = Members(cfg)
        worker = Worker(cfg, members)
        stack = AsyncExitStack()
        await stack.enter_async_context(UdpTransport(cfg, worker))
        await stack.enter_async_context(worker)
        cluster.append((members, stack))

    def converged() -> bool:
        return all(sum(1 for m in ms.non_local if m.status == Status.ONLINE) == n - 1 for ms, _ in cluster)

    conv = await _until(converged)
    conv = None if conv is None else time.perf_counter() - t0
    victim = names[-1]
    await cluster[-1][1].aclose()
    others = cluster[:-1]

    def status_of(ms: Members) -> Status | None:
        for m in ms.non_local:
            if m.name == victim:
                return m.status
        return None

    sus = await _until(lambda: all((s := status_of(ms)) is not None and s & Status.UNAVAILABLE for ms, _ in others))
    dead = await _until(lambda: all(status_of(ms) == Status.OFFLINE for ms, _ in others))
    if sus is not None and dead is not None:
        dead += sus
    mem = rss_mb() - m0
    for _, stack in others:
        await stack.aclose()
    return {"converge_s": conv, "suspect_all_s": sus, "dead_all_s": dead, "packets": sent[0], "mem_mb": mem}


# --------------------------------------------------------------------------- ours, simulated


def run_sim(n: int, loss: float) -> dict:
    from omx.protocols.swim import SimNetwork, SwimConfig
    from omx.protocols.swim.core import suspicion_timeout

    cfg = SwimConfig()
    victim = f"n{n // 2:05d}"
    first: dict[tuple[str, str], float] = {}
    false_dead = [0]

    def on_event(t: float, obs: str, kind: str, m) -> None:
        if m.id == victim:
            first.setdefault((kind, obs), t)
        elif kind == "dead":
            false_dead[0] += 1

    m0 = rss_mb()
    wall0 = time.perf_counter()
    net = SimNetwork(seed=42, loss=loss, delay=(0.0005, 0.005), record_events=False, on_event=on_event)
    net.add_nodes(n, config=cfg, full=True,
                  meta=lambda i: {"region": "eu", "role": "worker", "api": f"{i}:11434", "slots": 4})
    warm = 10.0
    net.run_until(warm / 2)
    s_half = net.counters["sent"]
    net.run_until(warm)
    steady_rate = (net.counters["sent"] - s_half) / n / (warm / 2)
    s_kill = net.counters["sent"]
    net.kill(victim)
    lo = suspicion_timeout(cfg.suspicion_mult, n, cfg.probe_interval)
    horizon = lo + 12.0
    net.run_until(warm + horizon)
    mem = rss_mb() - m0
    sus = sorted(t for (k, _), t in first.items() if k == "suspect")
    dead = sorted(t for (k, _), t in first.items() if k == "dead")
    return {
        "n": n, "loss": loss, "wall_s": time.perf_counter() - wall0,
        "suspect_first_s": sus[0] - warm if sus else None,
        "suspect_all_s": sus[-1] - sus[0] if len(sus) == n - 1 else None,
        "suspect_all_rounds": (sus[-1] - sus[0]) / cfg.probe_interval if len(sus) == n - 1 else None,
        "suspicion_min_s": lo,
        "dead_all_after_timeout_s": dead[-1] - (sus[0] + lo) if len(dead) == n - 1 else None,
        "dead_spread_s": dead[-1] - dead[0] if len(dead) == n - 1 else None,
        "observers_dead": len(dead),
        "steady_msgs_per_member_s": steady_rate,
        "failure_msgs_per_member_s": (net.counters["sent"] - s_kill) / n / horizon,
        "false_dead": false_dead[0],
        "mem_mb": mem, "kb_per_member": mem * 1024 / n,
    }


# --------------------------------------------------------------------------- driver


def _sub(args: list[str], timeout: float) -> dict:
    try:
        out = subprocess.run([sys.executable, __file__, "--one", *args], capture_output=True, text=True,
                             timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1][:120]}


def _load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg()) + " (1/5/15 min)"


def _f(v: object, unit: str = "", nd: int = 2) -> str:
    if v is None or v == float("inf"):
        return f">{CAP:.0f}s" if unit == "s" else "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}{unit}"
    return f"{v}{unit}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="50 real members and 1,000 simulated only")
    ap.add_argument("--runs", type=int, default=5, help="convergence runs of ours per size (median reported)")
    ap.add_argument("--omx-only", action="store_true", help="ours on real sockets only: no swim-protocol, no sim")
    ap.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        kind, n = a.one[0], int(a.one[1])
        if kind in ("omx", "omx-converge"):
            res = asyncio.run(run_omx(n, kill=kind == "omx"))
        elif kind == "swim-protocol":
            res = asyncio.run(run_swimprotocol(n))
        else:
            res = run_sim(n, float(a.one[2]))
        print(json.dumps(res))
        return

    sizes = [50] if a.quick else [50, 200]
    print(f"Real UDP/TCP on 127.0.0.1, one process, 1 s probe interval (lower is better); "
          f"{os.cpu_count()} CPUs, load average {_load()} at start")
    hdr = (f"{'members':>7}  {'impl':<14}{'converge':>10}{'all suspect':>13}{'all dead':>10}"
           f"{'packets':>10}{'memory':>10}")
    print(hdr)
    print("-" * len(hdr))
    runs: dict[int, list[dict]] = {}
    for n in sizes:
        for impl in ("omx",) if a.omx_only else ("omx", "swim-protocol"):
            r = {} if a.omx_only else _sub([impl, str(n)], timeout=4 * CAP + 30)
            if impl == "omx":
                runs[n] = [r] if r and "error" not in r else []
                while len(runs[n]) < max(1, a.runs):
                    runs[n].append(_sub(["omx-converge", str(n)], timeout=2 * CAP + 30))
                conv = [x.get("converge_s") for x in runs[n]]
                r = {**r, "converge_s": statistics.median(c if c is not None else float("inf") for c in conv)}
            if "error" in r:
                print(f"{n:>7}  {impl:<14}{r['error']}")
                continue
            if a.omx_only:
                print(f"{n:>7}  {impl:<14}{_f(r['converge_s'], 's'):>10}")
                continue
            print(f"{n:>7}  {impl:<14}{_f(r['converge_s'], 's'):>10}{_f(r['suspect_all_s'], 's'):>13}"
                  f"{_f(r['dead_all_s'], 's'):>10}{r['packets']:>10}{_f(r['mem_mb'], ' MB', 1):>10}")
    print("  (all suspect: kill → every member suspects it; all dead: kill → every member declared it dead.\n"
          "   swim-protocol's 'dead' is OFFLINE after its fixed 5 s suspect_timeout; ours scales with log N.)")
    for n, rs in runs.items():
        ok = [x for x in rs if x.get("converge_s") is not None]
        print(f"  ours, {n} members: converge is the median of {len(rs)} runs: "
              + ", ".join(_f(x.get("converge_s"), "s") if "error" not in x else x["error"] for x in rs)
              + (f"; joins done after {statistics.median(x['joined_s'] for x in ok):.2f} s, CPU "
                 f"{statistics.median(x['cpu_s'] for x in ok):.2f} s, load average "
                 f"{statistics.median(x['load'] for x in ok):.1f} (medians)" if ok else ""))
    if a.omx_only:
        return

    print("\nOurs in the simulator (virtual time, 1 s probe interval, 1 % packet loss, one member killed)")
    for n in [1000] if a.quick else [1000, 10_000]:
        r = _sub(["sim", str(n), "0.01"], timeout=1800)
        if "error" in r:
            print(f"  {n:>6} members: {r['error']}")
            continue
        print(f"  {n:>6} members  (wall {r['wall_s']:.0f} s)\n"
              f"    first suspicion {_f(r['suspect_first_s'], ' s')} after the kill; reached all "
              f"{n - 1} others {_f(r['suspect_all_s'], ' s')} later "
              f"({_f(r['suspect_all_rounds'], '', 1)} probe rounds)\n"
              f"    suspicion timeout (min) {r['suspicion_min_s']:.1f} s; dead verdict at all "
              f"{_f(r['dead_all_after_timeout_s'], ' s')} after it (spread {_f(r['dead_spread_s'], ' s')}, "
              f"{r['observers_dead']} observers)\n"
              f"    messages/member/s: steady {r['steady_msgs_per_member_s']:.2f}, during failure "
              f"{r['failure_msgs_per_member_s']:.2f}; false dead verdicts: {r['false_dead']}\n"
              f"    memory {r['mem_mb']:.0f} MB ({r['kb_per_member']:.1f} KB/member)")


if __name__ == "__main__":
    main()
