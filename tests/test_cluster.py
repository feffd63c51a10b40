"""A real 5-node cluster on loopback: convergence, failure detection, refutation, leave, Raft failover, restart.

Three control nodes form the region's Raft group; two workers join through the first node. The
suspicion multiplier is raised so a paused node has a few seconds to come back and refute on busy
CI machines, which is the behaviour under test (a short pause is not a failure).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from conftest import cluster_view, members

from omx.node.launch import NodeProc, start_cluster, wait_until

pytestmark = pytest.mark.timeout(300)


def status_of(node: NodeProc, target: NodeProc) -> str | None:
    for m in members(node):
        if m["id"] == target.id:
            return m["status"]
    return None


def agreed_leader(controls: list[NodeProc]) -> NodeProc:
    """The Raft leader once every voter names the same one (gossip metadata may lag an election)."""
    found: list[NodeProc] = []

    def agree() -> bool:
        st = [httpx.get(n.url + "/api/v1/node/status", timeout=5).json()["raft"] for n in controls]
        leaders = {s["leader"] for s in st}
        if len(leaders) != 1 or None in leaders:
            return False
        found[:] = [n for n, s in zip(controls, st, strict=True) if s["self"] == s["leader"]]
        return len(found) == 1

    wait_until(agree, 30, what="the voters to agree on a leader")
    return found[0]


def everyone_sees(nodes: list[NodeProc], target: NodeProc, states: set[str]) -> bool:
    return all(status_of(n, target) in states for n in nodes)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("cluster")
    nodes = start_cluster(base, 5, 1, "--no-demo", env={"OMX_SUSPICION_MULT": "12", "OMX_LOG_LEVEL": "INFO"})
    try:
        yield nodes
    finally:
        for n in nodes:
            if n.proc.poll() is None:
                n.proc.send_signal(signal.SIGCONT)
                n.stop(signal.SIGKILL)


def test_five_nodes_converge(cluster: list[NodeProc]) -> None:
    ids = {n.id for n in cluster}
    wait_until(lambda: all({m["id"] for m in members(n) if m["status"] == "alive"} == ids for n in cluster),
               60, what="all 5 nodes to see 5 alive members")
    worker_view = members(cluster[3])  # a worker shows the whole cluster too

    def worker_reads_registry() -> bool:  # a worker holds no replica: it reads through a control node
        reg = httpx.get(cluster[3].url + "/api/v1/registry", timeout=10).json()
        return reg["status"]["has_quorum"] and set(reg["state"]["nodes"]) == {n.id for n in cluster}

    wait_until(worker_reads_registry, 30, what="the registry to list all 5 nodes, read from a worker")
    roles = sorted(m["role"] for m in worker_view)
    assert roles == ["control", "control", "control", "worker", "worker"]
    # the leader is elected and advertised in gossip metadata within a refresh period or two
    wait_until(lambda: httpx.get(cluster[4].url + "/api/v1/cluster/leader", timeout=5).status_code == 200, 30,
               what="a worker to learn the Raft leader")
    leader = httpx.get(cluster[4].url + "/api/v1/cluster/leader", timeout=5).json()
    assert leader["id"] in {n.id for n in cluster[:3]}
    wait_until(lambda: httpx.get(cluster[0].url + "/api/v1/node/status", timeout=5).json()["raft"]["has_quorum"],
               30, what="quorum")
    st = httpx.get(cluster[0].url + "/api/v1/node/status", timeout=5).json()
    assert st["membership"] == "alive" and st["members"] == {"alive": 5}


def test_wrong_key_join_fails_with_one_clear_message(cluster: list[NodeProc], tmp_path: Path) -> None:
    from omx.node.launch import spawn_node
    from omx.protocols.clusterkey import generate_key_file

    key = tmp_path / "other.key"
    generate_key_file(key)
    alive = next(n for n in cluster if n.proc.poll() is None)
    n = spawn_node(tmp_path / "intruder", "--no-demo", "--role", "worker", "--cluster-key-file", str(key),
                   "--join", alive.gossip)
    assert n.proc.wait(60) != 0
    out = "".join(n.log)
    assert "cluster key" in out and "Traceback" not in out
    bad = spawn_node(tmp_path / "badaddr", "--no-demo", "--role", "worker", "--cluster-key-file", str(key),
                     "--join", "127.0.0.1:1", env={"OMX_JOIN_TIMEOUT": "1"})
    assert bad.proc.wait(60) != 0
    assert "could not join" in "".join(bad.log) and "Traceback" not in "".join(bad.log)
    # a second Raft group in the same region would split the registry: refused
    good_key = cluster[0].argv[cluster[0].argv.index("--cluster-key-file") + 1]
    rogue = spawn_node(tmp_path / "rogue", "--no-demo", "--role", "control", "--cluster-key-file", good_key,
                       "--join", alive.gossip)
    assert rogue.proc.wait(60) != 0
    out = "".join(rogue.log)
    assert "config mismatch" in out and "Traceback" not in out
    # ... and it never became a voter (one nobody can reach would count against quorum from then on)
    three = sorted(httpx.get(n.url + "/api/v1/node/status", timeout=5).json()["raft"]["self"] for n in cluster[:3])
    assert sorted(httpx.get(cluster[0].url + "/api/v1/node/status", timeout=5).json()["raft"]["voters"]) == three


def test_node_actions_through_any_node(cluster: list[NodeProc]) -> None:
    worker, target = cluster[3], cluster[1]
    with worker.client() as c:  # a worker forwards registry writes to the region's control nodes
        assert c.post(f"/api/v1/nodes/{target.id}/drain").status_code == 200
        assert c.put(f"/api/v1/nodes/{target.id}/labels", json={"labels": {"gpu": "h100"}}).status_code == 200
        r = c.put(f"/api/v1/nodes/{target.id}/labels", json={"labels": {"gpu": 1}})
        assert r.status_code == 400 and "labels" in r.json()["error"]
        assert c.post("/api/v1/nodes/no-such-node/cordon").status_code == 404
        assert c.delete(f"/api/v1/nodes/{target.id}").status_code == 409  # alive: leave first

    def record(n: NodeProc) -> dict:  # a follower applies a committed write a moment after the leader
        return httpx.get(n.url + "/api/v1/registry", timeout=5).json()["state"]["nodes"][target.id]

    wait_until(lambda: all(record(n)["draining"] and record(n)["labels"] == {"gpu": "h100"} for n in cluster[:3]),
               10, what="the drain and labels on every replica")
    wait_until(lambda: next(m for m in members(cluster[2]) if m["id"] == target.id)["draining"], 10,
               what="the cluster view to show the drain")
    assert httpx.post(f"{cluster[2].url}/api/v1/nodes/{target.id}/uncordon", timeout=10).status_code == 200
    wait_until(lambda: not any(record(n)["cordoned"] or record(n)["draining"] for n in cluster[:3]), 10,
               what="the uncordon on every replica")
    with worker.client() as c:
        r = c.post("/api/v1/internal/registry", json={"op": "remove_node", "args": [target.id]})
        assert r.status_code == 403  # internal route needs the cluster credentials


def test_paused_node_is_suspected_then_refutes(cluster: list[NodeProc]) -> None:
    target, others = cluster[3], [n for n in cluster if n is not cluster[3]]
    os.kill(target.proc.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: any(status_of(n, target) == "suspect" for n in others), 30, 0.05,
                   what="a member to suspect the paused node")
    finally:
        os.kill(target.proc.pid, signal.SIGCONT)
    wait_until(lambda: everyone_sees(others, target, {"alive"}), 30, what="the node to refute and be alive")
    events = httpx.get(cluster[0].url + "/api/v1/events/recent", timeout=5).json()["events"]
    assert not [e for e in events if e["kind"] == "member.dead" and e["data"]["id"] == target.id]


def test_killed_node_is_detected_by_all(cluster: list[NodeProc]) -> None:
    victim, others = cluster[4], cluster[:4]
    victim.proc.kill()
    victim.proc.wait(10)
    wait_until(lambda: everyone_sees(others, victim, {"dead"}), 60, what="every node to declare the killed node dead")
    # the region leader records the verdict in the registry
    wait_until(lambda: httpx.get(cluster[0].url + "/api/v1/registry", timeout=5).json()["state"]["nodes"]
               .get(victim.id, {}).get("state") == "dead", 30, what="the registry to mark the node dead")


def test_graceful_leave_is_not_a_failure(cluster: list[NodeProc]) -> None:
    leaver, others = cluster[3], cluster[:3]
    r = httpx.post(leaver.url + "/api/v1/node/leave", timeout=10)
    assert r.status_code == 200
    wait_until(lambda: everyone_sees(others, leaver, {"left"}), 30, what="every node to see the node left")
    events = httpx.get(cluster[0].url + "/api/v1/events/recent", timeout=5).json()["events"]
    assert not [e for e in events if e["kind"] == "member.dead" and e["data"]["id"] == leaver.id]
    assert leaver.stop() == 0


def _cordon_somewhere(nodes: list[NodeProc], target_id: str, answers: list[str] | None = None) -> bool:
    """True once one node commits the write; `answers` collects the refusals (they say why: quorum, leader)."""
    for n in nodes:
        try:
            r = httpx.post(f"{n.url}/api/v1/nodes/{target_id}/cordon", timeout=2)
        except httpx.HTTPError as e:
            if answers is not None:
                answers.append(f"{n.id}: {type(e).__name__}")
            continue
        if r.status_code == 200:
            return True
        if answers is not None:
            answers.append(f"{n.id}: HTTP {r.status_code} {r.text[:400]}")
    return False


def test_leader_killed_writes_resume_quickly_then_full_restart_keeps_registry(cluster: list[NodeProc]) -> None:
    controls = cluster[:3]
    # (when this test runs first, the registry may still be electing its first leader)
    wait_until(lambda: _cordon_somewhere(controls, controls[0].id), 60, what="a first registry write")
    leader = agreed_leader(controls)
    survivors = [n for n in controls if n is not leader]
    t0 = time.monotonic()
    leader.proc.kill()
    leader.proc.wait(10)
    answers: list[str] = []
    try:
        wait_until(lambda: _cordon_somewhere(survivors, survivors[0].id, answers), 30, 0.05,
                   what="a write after leader loss")
    except TimeoutError as e:
        raise AssertionError(f"{e}; the last answers: {answers[-2:]}") from None
    resumed = time.monotonic() - t0
    print(f"\nwrites resumed {resumed:.2f}s after the Raft leader was killed")
    assert resumed < 3.0

    def voter_down_reported() -> bool:
        events = httpx.get(survivors[0].url + "/api/v1/events/recent", timeout=5).json()["events"]
        return any(e["kind"] == "raft.voter_down" and e["data"]["id"] == leader.id for e in events)

    wait_until(voter_down_reported, 60, what="the lost voter to be reported")
    # stop every voter, restart them all on the same data dirs and ports: nothing committed is lost
    before = httpx.get(survivors[0].url + "/api/v1/registry", timeout=5).json()["state"]
    for n in survivors:
        assert n.stop() == 0
    restarted = [n.restart() for n in controls]
    try:
        for n in restarted:
            n.wait_ready(120)

        def state(n: NodeProc) -> dict:
            return httpx.get(n.url + "/api/v1/registry", timeout=5).json()["state"]

        # the voter killed earlier catches up from the others' journals
        wait_until(lambda: all(state(n)["revision"] >= before["revision"] for n in restarted), 60,
                   what="every restarted voter to hold every committed entry")
        for n in restarted:
            after = state(n)
            for nid in (controls[0].id, survivors[0].id):
                assert after["nodes"][nid]["cordoned"] is True
    finally:
        for n in restarted:
            n.stop(signal.SIGKILL)


def test_two_regions_one_gossip_cluster_two_raft_groups(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    nodes = start_cluster(tmp_path, 4, 2, "--no-demo")
    try:
        regions = {n.id: n.argv[n.argv.index("--region") + 1] for n in nodes}
        wait_until(lambda: all(len([m for m in members(n) if m["status"] == "alive"]) == 4 for n in nodes),
                   60, what="4 alive members everywhere")
        wait_until(lambda: set(cluster_view(nodes[0])["leaders"]) == {"region-1", "region-2"}, 60,
                   what="a Raft leader in each region")
        for n in nodes:
            wait_until(lambda n=n: set(httpx.get(n.url + "/api/v1/registry", timeout=5).json()["state"]["nodes"])
                       == {i for i, r in regions.items() if r == regions[n.id]}, 30,
                       what="each region's registry to hold exactly its own nodes")
        # the CLI shows the same, as JSON for scripts
        env = {**os.environ, "OMX_HOST": nodes[1].host}
        out = subprocess.run([sys.executable, "-m", "omx.console.cli", "node", "status", "--json"], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        st = json.loads(out.stdout)
        assert st["id"] == nodes[1].id and st["region"] == "region-2" and st["raft"]["raft_state"] in (
            "leader", "follower")
        out = subprocess.run([sys.executable, "-m", "omx.console.cli", "cluster", "--json"], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and len(json.loads(out.stdout)["members"]) == 4
    finally:
        for n in nodes:
            n.stop(signal.SIGKILL)


@pytest.mark.timeout(240)
def test_omx_up_starts_a_cluster_and_stops_it_on_ctrl_c(tmp_path: Path) -> None:
    import re
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "omx.console.cli", "up", "--nodes", "3", "--port", "0",
                             "--data-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    urls: list[str] = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            urls += re.findall(r"(http://127\.0\.0\.1:\d+)", line)
            if "Ctrl-C" in line:
                break
        assert len(urls) == 3
        wait_until(lambda: httpx.get(urls[0] + "/api/v1/cluster", timeout=5).json()["counts"] == {"alive": 3}, 60,
                   what="3 alive members")
        proc.send_signal(signal.SIGINT)
        rest = proc.stdout.read()
        assert proc.wait(60) == 0, rest
        assert "stopped" in rest
        for u in urls:
            with pytest.raises(httpx.HTTPError):
                httpx.get(u + "/api/version", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_gpu_figures_parse_nvidia_smi_and_skip_what_they_cannot_read() -> None:
    from omx.node.cluster import gpu_view, parse_gpus

    out = "4000, 81559, 30\n0, 40960, [N/A]\ngarbage line\n5, 4, 1\n1, 2\n"
    assert parse_gpus(out) == [[4000, 81559, 30], [0, 40960, -1]]  # used > total and short lines skipped
    assert gpu_view({"gpu": [[4000, 81559, 30], [0, 40960, -1], "bad", [1, 2]]}) == [
        {"memory_used": 4000 << 20, "memory_total": 81559 << 20, "utilization": 30},
        {"memory_used": 0, "memory_total": 40960 << 20, "utilization": None}]
    assert gpu_view({}) == []


def _raft(node: NodeProc) -> dict:
    return httpx.get(node.url + "/api/v1/node/status", timeout=5).json()["raft"]


def _events(node: NodeProc, kind: str) -> list[dict]:
    events = httpx.get(node.url + "/api/v1/events/recent", timeout=5).json()["events"]
    return [e["data"] for e in events if e["kind"] == kind]


def test_replace_a_dead_control_node_at_runtime(tmp_path: Path) -> None:
    """kill -9 a voter, `DELETE /api/v1/nodes/{id}` drops its vote, a fresh control node joins as a voter."""
    from omx.node.launch import free_ports, spawn_node

    controls = start_cluster(tmp_path, 3, 1, "--no-demo", env={"OMX_LOG_LEVEL": "INFO"})
    fresh: NodeProc | None = None
    try:
        leader = agreed_leader(controls)
        victim = next(n for n in controls if n is not leader)
        survivors = [n for n in controls if n is not victim]
        follower = next(n for n in survivors if n is not leader)
        victim_addr = _raft(victim)["self"]
        assert sorted(_raft(leader)["voters"]) == sorted(_raft(n)["self"] for n in controls)

        victim.proc.kill()
        victim.proc.wait(10)
        wait_until(lambda: everyone_sees(survivors, victim, {"dead"}), 60, what="the killed voter to be dead")
        # an operator acts later than gossip remembers the dead (reaped after 5 s here, 60 s on a LAN)
        wait_until(lambda: status_of(follower, victim) is None, 30, what="gossip to reap the dead voter")
        # the leader itself can't be removed without handing over first; nothing changes
        r = httpx.delete(f"{follower.url}/api/v1/nodes/{leader.id}?force=true", timeout=30)
        assert r.status_code == 409 and "transfer leadership" in r.json()["error"], r.text
        # removing the dead voter through a follower: forwarded to the leader, committed, then the record goes
        r = httpx.delete(f"{follower.url}/api/v1/nodes/{victim.id}", timeout=30)
        assert r.status_code == 200, r.text
        two = sorted(_raft(n)["self"] for n in survivors)
        assert r.json()["removed_voter"] == victim_addr and sorted(r.json()["voters"]) == two
        wait_until(lambda: all(sorted(_raft(n)["voters"]) == two for n in survivors), 10,
                   what="both survivors to drop the dead voter")
        wait_until(lambda: any(e["raft_addr"] == victim_addr for e in _events(follower, "raft.voter_removed")), 10,
                   what="the raft.voter_removed event")
        assert victim.id not in httpx.get(leader.url + "/api/v1/registry", timeout=5).json()["state"]["nodes"]

        # a fresh control node that names one current voter joins and is made a voter by the leader
        gossip_port, raft_port = free_ports(2)
        key = str(tmp_path / "cluster.key")
        fresh = spawn_node(tmp_path / "fresh", "--no-demo", "--region", "default", "--role", "control",
                           "--cluster-key-file", key, "--raft-peers", _raft(follower)["self"], "--join",
                           follower.gossip, env={"OMX_LOG_LEVEL": "INFO"}, gossip_port=gossip_port,
                           raft_port=raft_port).wait_ready(120)
        fresh_addr = f"127.0.0.1:{raft_port}"
        # it opened its registry only after the leader had added it, with the whole voter set as partners
        seat = _events(fresh, "raft.voter_seat")
        assert len(seat) == 1 and sorted(seat[0]["voters"]) == sorted([*two, fresh_addr])
        three = sorted([*two, fresh_addr])
        group = [*survivors, fresh]
        wait_until(lambda: all(sorted(_raft(n)["voters"]) == three for n in group), 30,
                   what="every voter to list the new one")
        wait_until(lambda: any(e["raft_addr"] == fresh_addr for e in _events(leader, "raft.voter_added")), 10,
                   what="the raft.voter_added event")
        # a write through the registry reaches the new node's replica
        assert httpx.post(f"{follower.url}/api/v1/nodes/{leader.id}/cordon", timeout=10).status_code == 200

        def fresh_has_it() -> bool:
            nodes = httpx.get(fresh.url + "/api/v1/registry", timeout=5).json()["state"]["nodes"]
            return nodes.get(leader.id, {}).get("cordoned") is True and fresh.id in nodes

        wait_until(fresh_has_it, 30, what="the new voter's replica to hold the write")
        # the new node really votes: with the other old voter gone, the leader still commits with its ack
        lead = agreed_leader(group)
        other = next(n for n in survivors if n is not lead)
        other.proc.kill()
        other.proc.wait(10)
        wait_until(lambda: _cordon_somewhere([n for n in group if n is not other], other.id), 30,
                   what="a write committed by the leader and the new voter")
    finally:
        for n in [*controls, *([fresh] if fresh else [])]:
            n.stop(signal.SIGKILL)


def test_a_waiting_control_node_takes_a_dead_voters_seat_and_the_dead_one_can_come_back(tmp_path: Path) -> None:
    """With one of 3 voters dead, a 4th seat can't commit (3 of 4 needed, 2 up): without help the replacement
    times out. The leader drops a voter dead for replace_dead_voters_after, then seats the newcomer."""
    from omx.node.launch import free_ports, spawn_node

    env = {"OMX_LOG_LEVEL": "INFO", "OMX_REPLACE_DEAD_VOTERS_AFTER": "3"}
    controls = start_cluster(tmp_path, 3, 1, "--no-demo", env=env)
    nodes = list(controls)
    try:
        leader = agreed_leader(controls)
        victim = next(n for n in controls if n is not leader)
        survivors = [n for n in controls if n is not victim]
        victim_addr = _raft(victim)["self"]
        victim.proc.kill()
        victim.proc.wait(10)

        gossip_port, raft_port = free_ports(2)
        fresh = spawn_node(tmp_path / "fresh", "--no-demo", "--region", "default", "--role", "control",
                           "--cluster-key-file", str(tmp_path / "cluster.key"), "--raft-peers",
                           _raft(leader)["self"], "--join", leader.gossip, env=env, gossip_port=gossip_port,
                           raft_port=raft_port)
        nodes.append(fresh)
        fresh.wait_ready(120)
        fresh_addr = f"127.0.0.1:{raft_port}"
        three = sorted([*(_raft(n)["self"] for n in survivors), fresh_addr])
        assert sorted(_events(fresh, "raft.voter_seat")[0]["voters"]) == three
        group = [*survivors, fresh]
        wait_until(lambda: all(sorted(_raft(n)["voters"]) == three for n in group), 30,
                   what="every voter to list the newcomer instead of the dead one")
        replaced = _events(leader, "raft.dead_voter_replaced")
        assert len(replaced) == 1, replaced
        assert replaced[0]["raft_addr"] == victim_addr and replaced[0]["id"] == victim.id
        assert replaced[0]["replacement"] == fresh.id and replaced[0]["dead_for_s"] >= 3
        # the newcomer really votes: with the other old voter gone, the leader still commits with its ack
        other = next(n for n in survivors if n is not leader)
        other_addr = _raft(other)["self"]
        other.proc.kill()
        other.proc.wait(10)
        live = [leader, fresh]
        wait_until(lambda: _cordon_somewhere(live, other.id), 30, what="a write committed by the leader and the "
                   "newcomer")
        # the removed voter comes back on its old data dir: an alive control node without a seat, which takes the
        # seat of the voter that is dead now
        back = victim.restart().wait_ready(120)
        nodes.append(back)
        again = sorted([_raft(leader)["self"], fresh_addr, victim_addr])
        wait_until(lambda: all(sorted(_raft(n)["voters"]) == again for n in [*live, back]), 60,
                   what="the returning node to be a voter again")
        assert [e["raft_addr"] for e in _events(leader, "raft.dead_voter_replaced")] == [victim_addr, other_addr]

        def back_has_it() -> bool:
            return httpx.get(back.url + "/api/v1/registry", timeout=5).json()["state"]["nodes"] \
                .get(other.id, {}).get("cordoned") is True

        wait_until(back_has_it, 30, what="the returning voter's replica to catch up")
    finally:
        for n in nodes:
            n.stop(signal.SIGKILL)


async def test_a_control_node_that_cannot_run_never_asks_for_a_raft_seat(tmp_path: Path) -> None:
    """The leader adds any control node that advertises "joining" as a voter. A node that then refuses to run
    (its config contradicts the cluster's, its Raft port is taken) would stay a voter nobody can reach, and a
    3-voter region would lose quorum at the next failure."""
    import socket

    from omx.models.store import Store
    from omx.node.cluster import Cluster, ClusterStartError
    from omx.node.config import NodeConfig
    from omx.node.events import EventBus
    from omx.node.launch import free_ports
    from omx.node.runners import RunnerManager
    from omx.protocols.clusterkey import generate_key_file

    key = tmp_path / "cluster.key"
    generate_key_file(key)
    gossip, raft, rogue_gossip, rogue_raft, busy_gossip = free_ports(5)

    def make(name: str, **kw: object) -> Cluster:
        cfg = NodeConfig(data_dir=tmp_path / name, role="control", cluster_key_file=key, **kw)
        runners = RunnerManager(max_loaded=1, num_parallel=1, max_queue=1, default_keep_alive=0, load_timeout=1,
                                device="cpu", dtype="float32")
        return Cluster(cfg, EventBus(), runners, Store(cfg.data_dir))

    first = make("first", gossip_port=gossip, raft_port=raft)
    await first.start("http://127.0.0.1:1")
    rogue = make("rogue", gossip_port=rogue_gossip, raft_port=rogue_raft, join=[f"127.0.0.1:{gossip}"])
    try:
        # no --raft-peers naming the region's voter: it would start a second Raft group, so it refuses to run
        with pytest.raises(ClusterStartError, match="config mismatch"):
            await rogue.start("http://127.0.0.1:2")
        seen = first.swim.get(rogue.id) if first.swim else None
        assert seen is not None and seen.state == "alive"  # it did join gossip before its check
        assert (seen.meta or {}).get("raft") is None  # ... but never asked the leader for a seat
        # a node configured right whose Raft port another process holds finds out before it joins at all
        with socket.create_server(("127.0.0.1", 0)) as holder:
            busy = make("busy", gossip_port=busy_gossip, raft_port=holder.getsockname()[1],
                        join=[f"127.0.0.1:{gossip}"], raft_peers=[f"127.0.0.1:{raft}"])
            with pytest.raises(ClusterStartError, match="cannot listen for Raft on"):
                await busy.start("http://127.0.0.1:3")
        assert first.swim is not None and first.swim.get(busy.id) is None
    finally:
        await rogue.stop()
        await first.stop()
    # the first voter of a region, likewise: its Raft dir is not claimed for the busy address, so a retry on a
    # free port works
    with socket.create_server(("127.0.0.1", 0)) as holder:
        alone = make("alone", gossip_port=0, raft_port=holder.getsockname()[1])
        with pytest.raises(ClusterStartError, match="cannot listen for Raft on"):
            await alone.start("http://127.0.0.1:4")
    assert not (tmp_path / "alone" / "raft").exists()
    retry = make("alone", gossip_port=0, raft_port=free_ports(1)[0])
    await retry.start("http://127.0.0.1:4")
    await retry.stop()
