"""A network partition of a real 5-node region, each node in its own network namespace on a private bridge.

3 Raft voters and 2 workers. Leadership is moved to node 0, then {node 0, node 3} are cut off from
{node 1, node 2, node 4} (blackhole routes inside each namespace; the test process still reaches all).
The majority elects a new leader and keeps taking writes and serving models; the cut-off old leader's
writes fail with an error instead of hanging or applying; after the partition heals, all five see each
other again, one leader remains, and every registry holds the majority's write and not the minority's.
Needs root (network namespaces); skipped elsewhere.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from omx.node.launch import NodeProc, spawn_node, wait_until
from omx.protocols.clusterkey import generate_key_file

pytestmark = pytest.mark.timeout(420)

SUBNET = "10.213.77"
API, GOSSIP, RAFT = 11434, 7946, 7947
MINORITY, MAJORITY = (0, 3), (1, 2, 4)
http = httpx.Client(timeout=30, trust_env=False)


def ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")


class Net:
    """A bridge in this namespace, one namespace per node with a veth on the bridge."""

    def __init__(self, n: int) -> None:
        tag = str(os.getpid() % 100000)
        self.bridge = f"omxb{tag}"
        self.ns = [f"omxp{tag}n{i}" for i in range(n)]
        self.addr = [f"{SUBNET}.{11 + i}" for i in range(n)]
        self.made: list[str] = []

    def up(self) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        self.made.append("bridge")
        ip("addr", "add", f"{SUBNET}.1/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for i, ns in enumerate(self.ns):
            host_if, peer = f"{self.bridge}h{i}", f"{self.bridge}c{i}"
            ip("netns", "add", ns)
            self.made.append(ns)
            ip("link", "add", host_if, "type", "veth", "peer", "name", peer)
            ip("link", "set", peer, "netns", ns)
            ip("netns", "exec", ns, "ip", "addr", "add", f"{self.addr[i]}/24", "dev", peer)
            ip("netns", "exec", ns, "ip", "link", "set", peer, "up")
            ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
            ip("link", "set", host_if, "master", self.bridge)
            ip("link", "set", host_if, "up")

    def _routes(self, action: str, a: tuple[int, ...], b: tuple[int, ...]) -> None:
        for x, y in [(i, j) for i in a for j in b] + [(j, i) for i in a for j in b]:
            ip("netns", "exec", self.ns[x], "ip", "route", action, "blackhole", f"{self.addr[y]}/32")

    def cut(self, a: tuple[int, ...], b: tuple[int, ...]) -> None:
        self._routes("add", a, b)

    def heal(self, a: tuple[int, ...], b: tuple[int, ...]) -> None:
        self._routes("del", a, b)

    def down(self) -> None:
        for name in reversed(self.made):
            args = ("link", "del", self.bridge) if name == "bridge" else ("netns", "del", name)
            subprocess.run(["ip", *args], capture_output=True)


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    n = Net(5)
    try:
        n.up()
    except (RuntimeError, FileNotFoundError) as e:
        n.down()
        pytest.skip(f"cannot build network namespaces here: {e}")
    try:
        yield n
    finally:
        n.down()


@pytest.fixture(scope="module")
def nodes(net: Net, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NodeProc]]:
    base = tmp_path_factory.mktemp("partition")
    key = base / "cluster.key"
    generate_key_file(key)
    procs: list[NodeProc] = []
    try:
        for i, addr in enumerate(net.addr):
            args = ["--cluster-key-file", str(key), "--role", "control" if i < 3 else "worker"]
            if i < 3:
                args += ["--raft-peers", ",".join(f"{net.addr[j]}:{RAFT}" for j in range(3) if j != i)]
            if i:
                args += ["--join", f"{net.addr[0]}:{GOSSIP}"]
            procs.append(spawn_node(base / f"node{i}", *args, host=addr, port=API, gossip_port=GOSSIP,
                                    raft_port=RAFT, env={"OMX_LOG_LEVEL": "INFO"},
                                    wrap=("ip", "netns", "exec", net.ns[i])))
            if i == 0:
                procs[0].wait_ready(120)
        for p in procs:
            p.wait_ready(120)
        ids = {p.id for p in procs}
        wait_until(lambda: all(alive(p) == ids for p in procs), 90, what="5 alive members everywhere")
        yield procs
    finally:
        for p in procs:
            p.stop(signal.SIGKILL)


def get(node: NodeProc, path: str) -> dict:
    return http.get(node.url + path).json()


def alive(node: NodeProc) -> set[str]:
    return {m["id"] for m in get(node, "/api/v1/cluster")["members"] if m["status"] == "alive"}


def leader(node: NodeProc) -> str | None:
    r = http.get(node.url + "/api/v1/cluster/leader")
    return r.json().get("id") if r.status_code == 200 else None


def cordoned(node: NodeProc, nid: str) -> bool:
    return bool(get(node, "/api/v1/registry")["state"]["nodes"].get(nid, {}).get("cordoned"))


def test_majority_keeps_serving_minority_fails_fast_and_the_cluster_heals(net: Net, nodes: list[NodeProc]) -> None:
    n0, n1, n2, n3, n4 = nodes
    wait_until(lambda: leader(n0) is not None, 60, what="a Raft leader")
    r = http.post(n0.url + "/api/v1/cluster/leader/transfer", json={"to": n0.id})
    assert r.status_code == 200, r.text
    wait_until(lambda: all(leader(n) == n0.id for n in nodes), 30, what="node 0 to lead")

    net.cut(MINORITY, MAJORITY)
    cut_at = time.monotonic()
    # the majority elects a leader of its own within the recovery target
    wait_until(lambda: leader(n1) in (n1.id, n2.id), 30, what="a leader on the majority side")
    recovered = time.monotonic() - cut_at
    assert recovered < 30, recovered
    # ... and takes writes
    wait_until(lambda: http.post(n1.url + f"/api/v1/nodes/{n4.id}/cordon").status_code == 200, 30,
               what="a registry write on the majority side")
    assert cordoned(n2, n4.id)
    # ... and serves the model
    body = {"model": "omx-tiny", "prompt": "hello world", "stream": False,
            "options": {"temperature": 0, "num_predict": 3}}
    for n in (n4, n1):
        r = http.post(n.url + "/api/generate", json=body, timeout=120)
        assert r.status_code == 200, r.text
    # the cut-off old leader answers a write with an error, within bounded time, and never applies it
    t0 = time.monotonic()
    r = http.post(n0.url + f"/api/v1/nodes/{n3.id}/cordon", timeout=60)
    assert r.status_code >= 500 and "error" in r.json(), r.text
    assert time.monotonic() - t0 < 30
    # membership: each side sees the other as failed
    wait_until(lambda: alive(n1) == {n1.id, n2.id, n4.id}, 60, what="the majority to see the minority fail")
    wait_until(lambda: alive(n0) == {n0.id, n3.id}, 60, what="the minority to see the majority fail")

    net.heal(MINORITY, MAJORITY)
    ids = {n.id for n in nodes}
    wait_until(lambda: all(alive(n) == ids for n in nodes), 90, what="all five to see each other after healing")
    wait_until(lambda: len({leader(n) for n in nodes}) == 1 and leader(n0) in (n1.id, n2.id), 60,
               what="one leader, from the majority side, everywhere")
    wait_until(lambda: cordoned(n0, n4.id), 30, what="the majority's write to reach the old leader")
    assert not any(cordoned(n, n3.id) for n in nodes[:3])  # the minority's write was never applied

