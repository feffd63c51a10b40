"""A real 3-node cluster serving as one: any node answers for a model another node holds, through the
official `ollama` and `openai` clients; cluster-wide listings; the proxy CLI's JSON; failover before the
first byte and mid-stream resumption after a `kill -9` of the serving node (tests at the end of the file,
since they kill a node of the shared cluster)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from conftest import members, routed_headers

from omx.node.launch import NodeProc, start_cluster, start_node, wait_until

pytestmark = pytest.mark.timeout(300)

GREEDY = {"temperature": 0, "num_predict": 1500, "stop": []}  # long enough to be mid-stream when killed


def advertised(nodes: list[NodeProc], holder: NodeProc, model: str) -> bool:
    """Every node's gossip view says `holder` holds `model` (routing reads exactly this)."""
    for n in nodes:
        m = next((m for m in members(n) if m["id"] == holder.id), None)
        if m is None or model not in (m["meta"].get("have") or []):
            return False
    return True


def create_from_demo(node: NodeProc, name: str, system: str) -> None:
    r = httpx.post(node.url + "/api/create", json={"model": name, "from": "omx-tiny", "system": system,
                                                   "stream": False}, timeout=120)
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("routing")
    nodes = start_cluster(base, 3, 1, env={"OMX_LOG_LEVEL": "INFO", "OMX_SUSPICION_MULT": "6"})
    # a fourth node that answers HTTP but cannot load any model (a broken GPU, say): alive in gossip, failing
    nodes.append(start_node(base / "broken", "--role", "worker", "--cluster-key-file", str(base / "cluster.key"),
                            "--join", nodes[0].gossip, env={"OMX_LOAD_TIMEOUT": "0.001", "OMX_LOG_LEVEL": "INFO"}))
    try:
        ids = {n.id for n in nodes}
        wait_until(lambda: all({m["id"] for m in members(n) if m["status"] == "alive"} == ids for n in nodes),
                   60, what="4 nodes to converge")
        n1, n2, _, broken = nodes
        create_from_demo(n1, "solo", "You are on node one only.")
        for n in (n1, n2):  # the same Modelfile on two nodes: one model (one digest), two holders
            create_from_demo(n, "duo", "You exist twice.")
        for n in (n2, broken):
            create_from_demo(n, "pair", "Half of me is broken.")
        wait_until(lambda: advertised(nodes, n1, "solo:latest") and advertised(nodes, n2, "duo:latest")
                   and advertised(nodes, n1, "duo:latest") and advertised(nodes, broken, "pair:latest"),
                   30, what="the new models to be advertised")
        yield nodes
    finally:
        for n in nodes:
            if n.proc.poll() is None:
                n.stop(signal.SIGKILL)


def ps_nodes(node: NodeProc, model: str) -> set[str]:
    ps = httpx.get(node.url + "/api/ps", timeout=10).json()["models"]
    return {m["node"] for m in ps if m["name"] in (model, f"{model}:latest")}


def test_model_on_one_node_served_through_the_others(cluster: list[NodeProc]) -> None:
    n1, n2, n3, _ = cluster
    for n in (n2, n3):
        c = ollama.Client(host=n.url, timeout=120)
        # greedy from "hello world" never ends by itself on the demo weights: exact counts are stable
        r = c.generate(model="solo", prompt="hello world", options={"num_predict": 4, "temperature": 0})
        assert r.model == "solo" and r.done and r.eval_count == 4
        chunks = list(c.generate(model="solo", prompt="hello world", stream=True,
                                 options={"num_predict": 5, "temperature": 0}))
        assert chunks[-1].done and chunks[-1].eval_count == 5 and all(x.model == "solo" for x in chunks)
        assert len([x for x in chunks if not x.done]) > 1  # passed through chunk by chunk, not merged
        r = c.chat(model="solo", messages=[{"role": "user", "content": "hello"}], options={"num_predict": 3})
        assert r.message.role == "assistant" and r.done and r.eval_count <= 3  # may sample EOS at once
        parts = list(c.chat(model="solo", messages=[{"role": "user", "content": "hello"}], stream=True,
                            options={"num_predict": 3}))
        assert parts[-1].done and parts[-1].eval_count <= 3
        e = c.embed(model="solo", input=["a", "b"])
        assert len(e.embeddings) == 2 and len(e.embeddings[0]) > 0

        oc = openai.OpenAI(base_url=n.url + "/v1", api_key="unused")
        cc = oc.chat.completions.create(model="solo", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert cc.model == "solo" and cc.usage.completion_tokens <= 3
        stream = oc.chat.completions.create(model="solo", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=4, stream=True)
        deltas = [ch for ch in stream]
        assert deltas[-1].choices[0].finish_reason in ("length", "stop")
        comp = oc.completions.create(model="solo", prompt="hello world", max_tokens=2, temperature=0)
        assert comp.usage.completion_tokens == 2
        emb = oc.embeddings.create(model="solo", input="hello")
        assert len(emb.data[0].embedding) > 0
    # only the holder ever loaded it: every request above was served by node 1
    assert ps_nodes(n3, "solo") == {n1.id}


def test_unknown_model_is_ollamas_404_from_any_node(cluster: list[NodeProc]) -> None:
    r = httpx.post(cluster[2].url + "/api/generate", json={"model": "nope", "prompt": "x"}, timeout=30)
    assert r.status_code == 404 and r.json() == {"error": "model 'nope' not found"}
    r = httpx.post(cluster[2].url + "/api/chat", json={"model": "nope", "messages": []}, timeout=30)
    assert r.status_code == 404
    bad = httpx.post(cluster[1].url + "/api/generate", json={"model": "solo", "prompt": "x", "format": "yaml"},
                     timeout=30)
    assert bad.status_code == 400 and "error" in bad.json()  # the serving node's client error passes through


def test_model_gone_from_this_nodes_store_is_served_by_a_holder(cluster: list[NodeProc]) -> None:
    """The store loses a model behind the node's back (disk budget eviction, an operator's rm) while a peer
    still holds it: requests keep succeeding, also in the second the node still believes it has it."""
    n1, n2, _, _ = cluster
    for n in (n1, n2):
        create_from_demo(n, "trio", "Two of me, then one.")
    wait_until(lambda: advertised(cluster, n1, "trio:latest") and advertised(cluster, n2, "trio:latest"), 30,
               what="trio on two nodes")
    body = {"model": "trio", "prompt": "hello world", "stream": False,
            "options": {"temperature": 0, "num_predict": 3}}
    first = httpx.post(n1.url + "/api/generate", json=body, timeout=120)
    assert first.status_code == 200, first.text
    (n1.data_dir / "manifests" / "registry.ollama.ai" / "library" / "trio" / "latest").unlink()
    again = httpx.post(n1.url + "/api/generate", json=body, timeout=120)
    assert again.status_code == 200, again.text
    assert again.json()["response"] == first.json()["response"]  # the same weights, greedy: the same text


def test_routed_header_needs_cluster_credentials(cluster: list[NodeProc]) -> None:
    r = httpx.post(cluster[0].url + "/api/generate", json={"model": "solo", "prompt": "x"},
                   headers={"X-Omx-Routed": "me"}, timeout=30)
    assert r.status_code == 403 and "credentials" in r.json()["error"]


def test_cluster_wide_model_routes(cluster: list[NodeProc]) -> None:
    n1, n2, n3, _ = cluster
    tags = {m["name"] for m in httpx.get(n3.url + "/api/tags", timeout=10).json()["models"]}
    assert {"solo:latest", "duo:latest", "omx-tiny:latest"} <= tags
    v1 = {m["id"] for m in httpx.get(n3.url + "/v1/models", timeout=10).json()["data"]}
    assert "solo:latest" in v1
    assert httpx.get(n3.url + "/v1/models/solo", timeout=10).status_code == 200
    show = httpx.post(n3.url + "/api/show", json={"model": "solo"}, timeout=30)
    assert show.status_code == 200 and "node one" in show.json()["system"]
    ps = httpx.get(n2.url + "/api/ps", timeout=10).json()["models"]
    assert any(m["name"] == "solo:latest" and m["node"] == n1.id for m in ps)

    assert httpx.post(n3.url + "/api/copy", json={"source": "solo", "destination": "solo-copy"},
                      timeout=30).status_code == 200
    wait_until(lambda: advertised(cluster, n1, "solo-copy:latest"), 30, what="the copy to be advertised")
    r = httpx.post(n2.url + "/api/generate", json={"model": "solo-copy", "prompt": "x", "stream": False,
                                                   "options": {"num_predict": 2}}, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == "solo-copy"
    assert httpx.request("DELETE", n3.url + "/api/delete", json={"model": "solo-copy"},
                         timeout=30).status_code == 200
    tags = {m["name"] for m in httpx.get(n2.url + "/api/tags", timeout=10).json()["models"]}
    assert "solo-copy:latest" not in tags
    assert httpx.request("DELETE", n3.url + "/api/delete", json={"model": "solo-copy"},
                         timeout=30).status_code == 404


def omx(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "omx.console.cli", *args], capture_output=True, text=True,
                          timeout=60)


def test_proxy_cli_json_works_with_jq(cluster: list[NodeProc]) -> None:
    n3 = cluster[2]
    out = omx("proxy", "instances", "--json", "--api-url", n3.url)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert {i["id"] for i in data["instances"]} == {n.id for n in cluster}
    healthy = subprocess.run(["jq", "-c", '.instances[] | select(.status=="healthy") | .id'], input=out.stdout,
                             capture_output=True, text=True, check=True).stdout.split()
    assert sorted(json.loads(x) for x in healthy) == sorted(n.id for n in cluster)
    grouped = subprocess.run(["jq", "-c", '.instances | group_by(.status) | map({status: .[0].status, '
                              'count: length})'], input=out.stdout, capture_output=True, text=True, check=True)
    assert json.loads(grouped.stdout) == [{"status": "healthy", "count": 4}]
    st = omx("proxy", "status", "--json", "--api-url", n3.url)
    assert st.returncode == 0 and json.loads(st.stdout)["instances"]["total"] == 4
    mt = omx("proxy", "metrics", "--json", "--api-url", cluster[1].url)
    assert mt.returncode == 0 and json.loads(mt.stdout)["requests_total"] >= 1
    table = omx("proxy", "instances", "--api-url", n3.url)
    assert table.returncode == 0 and cluster[0].id[:8] in table.stdout
    dead = omx("proxy", "status", "--api-url", "http://127.0.0.1:9")
    assert dead.returncode != 0 and len(dead.stderr.strip().splitlines()) == 1 and "Traceback" not in dead.stderr


def test_external_instance_is_health_checked_and_routed_to(cluster: list[NodeProc], tmp_path: Path) -> None:
    """Another Ollama-API server (here a standalone omx node outside the cluster) registered as an instance."""
    from omx.node.launch import start_node

    ext = start_node(tmp_path / "ext", "--no-demo", env={"OMX_LOG_LEVEL": "WARNING"})
    try:
        create_from_demo_ok = httpx.post(ext.url + "/api/create", json={"model": "outside", "from": "omx-tiny"},
                                         timeout=60)
        assert create_from_demo_ok.status_code == 404  # --no-demo: it has nothing yet
        from omx.models.demo import ensure_demo_model
        from omx.models.store import Store

        ensure_demo_model(Store(ext.data_dir), "outside:latest")
        n2 = cluster[1]
        add = omx("proxy", "add", ext.url, "--api-url", n2.url)
        assert add.returncode == 0, add.stderr

        def routed_everywhere() -> bool:
            insts = [httpx.get(n.url + "/api/v1/proxy/instances", timeout=5).json()["instances"] for n in cluster]
            return all(any(i["kind"] == "external" and i["status"] == "healthy" and "outside:latest" in i["models"]
                           for i in inst) for inst in insts[:3])

        wait_until(routed_everywhere, 30, what="every node to health-check the external instance")
        r = httpx.post(cluster[2].url + "/api/generate", json={"model": "outside", "prompt": "hello world",
                                                               "stream": False,
                                                               "options": {"num_predict": 2, "temperature": 0}},
                       timeout=60)
        assert r.status_code == 200 and r.json()["eval_count"] == 2
        assert "outside:latest" in {m["name"] for m in httpx.get(ext.url + "/api/ps", timeout=5).json()["models"]}
        rm = omx("proxy", "remove", ext.url, "--api-url", cluster[0].url)
        assert rm.returncode == 0, rm.stderr
        assert omx("proxy", "remove", ext.url, "--api-url", cluster[0].url).returncode != 0
    finally:
        ext.stop()


def _load_duo_on_node1_only(cluster: list[NodeProc], observer: NodeProc) -> None:
    """Unload duo everywhere, then load it on node 1 only (a router prefers a replica with the model loaded)."""
    n1, n2, n3, _ = cluster
    assert httpx.post(n3.url + "/api/generate", json={"model": "duo", "keep_alive": 0}, timeout=60).status_code == 200
    pinned = httpx.post(n1.url + "/api/generate", json={"model": "duo", "keep_alive": "10m"},
                        headers=routed_headers(n1), timeout=120)
    assert pinned.status_code == 200

    def loaded_per_gossip() -> dict[str, bool]:  # what the observer's router decides from
        return {m["id"]: "duo:latest" in (m["meta"].get("models") or []) for m in members(observer)}

    wait_until(lambda: ps_nodes(n3, "duo") == {n1.id} and loaded_per_gossip().get(n1.id)
               and not loaded_per_gossip().get(n2.id), 30, what="duo to be loaded on node 1 only")


def _stream(node: NodeProc, body: dict, each: Callable[[int], None]) -> list[dict]:
    """A streamed generation's chunks, calling `each(n)` once the n-th has arrived (to fail a replica then)."""
    received: list[dict] = []
    with httpx.stream("POST", node.url + "/api/generate", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line:
                received.append(json.loads(line))
                each(len(received))
    return received


def _assert_whole(received: list[dict], ref: dict) -> None:
    """The stream ended exactly as the uninterrupted greedy generation `ref` did."""
    assert not any("error" in c for c in received), received[-1]
    final = received[-1]
    assert final["done"] and final["eval_count"] == GREEDY["num_predict"]
    assert "".join(c.get("response", "") for c in received) == ref["response"]


def test_a_replica_that_stalls_midstream_is_resumed_elsewhere(cluster: list[NodeProc], tmp_path: Path) -> None:
    """A replica that stops sending but keeps its connection open (a hung process, a frozen VM: SIGSTOP here)
    gets `route_stall_timeout` seconds, then the client's stream continues from another replica."""
    n1, n2, _, _ = cluster
    body = {"model": "duo", "prompt": "once upon a time", "options": GREEDY}
    ref = httpx.post(n2.url + "/api/generate", json={**body, "stream": False}, timeout=120).json()
    conf = tmp_path / "router.toml"
    conf.write_text("route_stall_timeout = 2.0\n")
    key = n1.argv[n1.argv.index("--cluster-key-file") + 1]
    router = start_node(tmp_path / "router", "--config", str(conf), "--role", "worker", "--no-demo",
                        "--cluster-key-file", key, "--join", n2.gossip,
                        env={"OMX_LOG_LEVEL": "INFO", "OMX_SUSPICION_MULT": "6"})
    stopped_at: float | None = None
    try:
        wait_until(lambda: advertised([router], n1, "duo:latest") and advertised([router], n2, "duo:latest"), 30,
                   what="the new router to learn duo's holders")
        _load_duo_on_node1_only(cluster, router)

        def stall_node1(n: int) -> None:
            nonlocal stopped_at
            if n == 10:
                os.kill(n1.proc.pid, signal.SIGSTOP)
                stopped_at = time.monotonic()
            elif stopped_at is not None and time.monotonic() - stopped_at > 2.0:
                # (lines node 1 sent before it stopped may still arrive at once; these came after the stall
                # timer, from node 2)
                os.kill(n1.proc.pid, signal.SIGCONT)
                stopped_at = None

        _assert_whole(_stream(router, body, stall_node1), ref)
        metrics = httpx.get(router.url + "/api/v1/proxy/metrics", timeout=5).json()
        assert metrics["resumes_total"] >= 1
        events = httpx.get(router.url + "/api/v1/events/recent", timeout=5).json()["events"]
        assert next(e["data"]["target"] for e in events if e["kind"] == "router.resumed") == n2.id
    finally:
        os.kill(n1.proc.pid, signal.SIGCONT)
        router.stop()
    wait_until(lambda: all({m["id"]: m["status"] for m in members(n)}.get(n1.id) == "alive" for n in cluster[1:3]),
               60, what="node 1 to be alive again for the next tests")


def test_midstream_kill_resumes_on_another_replica(cluster: list[NodeProc]) -> None:
    """kill -9 of the node streaming a generation: the client's stream continues from another replica and
    ends exactly as an uninterrupted greedy generation would."""
    n1, n2, n3, _ = cluster
    body = {"model": "duo", "prompt": "once upon a time", "options": GREEDY}
    ref = httpx.post(n2.url + "/api/generate", json={**body, "stream": False}, timeout=120).json()
    assert ref["eval_count"] == GREEDY["num_predict"]
    _load_duo_on_node1_only(cluster, n3)

    killed = threading.Event()

    def kill_node1(n: int) -> None:
        if n == 10 and not killed.is_set():
            os.kill(n1.proc.pid, signal.SIGKILL)
            killed.set()

    received = _stream(n3, body, kill_node1)
    assert killed.is_set()
    _assert_whole(received, ref)
    metrics = httpx.get(n3.url + "/api/v1/proxy/metrics", timeout=5).json()
    assert metrics["resumes_total"] >= 1


def test_failover_before_first_byte_and_circuit_breaker(cluster: list[NodeProc]) -> None:
    """`pair` lives on node 2 and on the broken node, which fails every load with a 500 while gossip says it
    is alive: every request still succeeds (retried on node 2 before the first byte), and after a few
    failures the broken node is taken out of rotation by its circuit breaker."""
    _, n2, n3, broken = cluster
    body = {"model": "pair", "prompt": "x", "stream": False, "keep_alive": 0, "options": {"num_predict": 1}}

    def unloaded_on_node2() -> bool:
        return all("pair:latest" not in (m["meta"].get("models") or []) for m in members(n3) if m["id"] == n2.id)

    def breaker_opened() -> bool:
        # keep_alive 0 and waiting for gossip to say so: a loaded replica would win every time, and here both
        # replicas must stay equally attractive so the broken one keeps being tried
        wait_until(unloaded_on_node2, 30, what="node 2 to advertise pair as unloaded")
        r = httpx.post(n3.url + "/api/generate", json=body, timeout=60)
        assert r.status_code == 200, r.text
        events = httpx.get(n3.url + "/api/v1/events/recent", timeout=5).json()["events"]
        return any(e["kind"] == "router.circuit_open" and e["data"]["target"] == broken.id for e in events)

    wait_until(breaker_opened, 240, what="the broken node's circuit breaker to open")
    # its API still answers, so a probe lets one trial request through, which fails and reopens the breaker:
    # while it stays broken it is never "healthy" again
    inst = {i["id"]: i for i in httpx.get(n3.url + "/api/v1/proxy/instances", timeout=5).json()["instances"]}
    assert inst[broken.id]["status"] == "unhealthy" and inst[n2.id]["status"] == "healthy"
    m = httpx.get(n3.url + "/api/v1/proxy/metrics", timeout=5).json()
    assert m["retries_total"] >= 3 and m["instances"][broken.id]["errors_total"] >= 3
    text = httpx.get(n3.url + "/metrics", timeout=5).text
    assert "omx_router_retries_total" in text and "omx_router_circuit_open" in text


def test_dead_holder_is_a_clear_error(cluster: list[NodeProc]) -> None:
    """Node 1 was killed (mid-stream test): its only-copy model `solo` answers with an error, never a hang."""
    n1, n2, _, _ = cluster
    wait_until(lambda: all(m["status"] != "alive" for m in members(n2) if m["id"] == n1.id), 60,
               what="node 1 to be declared failed")
    r = httpx.post(n2.url + "/api/generate", json={"model": "solo", "prompt": "x", "stream": False}, timeout=60)
    assert r.status_code == 404 and r.json() == {"error": "model 'solo' not found"}


def test_scale_places_replicas_and_skips_a_node_that_cannot_load(cluster: list[NodeProc]) -> None:
    """`omx model scale`: the region leader places 2 replicas; the broken node (if chosen) fails to load, says
    so in gossip and is replaced; scaling to 0 releases them."""
    _, n2, n3, _ = cluster
    out = omx("model", "scale", "omx-tiny", "--replicas", "2", "--api-url", n3.url)
    assert out.returncode == 0, out.stderr

    def placed_and_loaded() -> bool:
        models = httpx.get(n2.url + "/api/v1/models", timeout=10).json()["models"]
        m = next(m for m in models if m["name"] == "omx-tiny:latest")
        return m["replicas"] == 2 and set(m["nodes"]) == {n2.id, n3.id} and set(m["placed"]) == {n2.id, n3.id}

    wait_until(placed_and_loaded, 120, what="2 replicas of omx-tiny placed and loaded on the healthy nodes")
    assert omx("model", "scale", "omx-tiny", "--replicas", "0", "--api-url", n2.url).returncode == 0
    wait_until(lambda: ps_nodes(n3, "omx-tiny") == set(), 60, what="the replicas to be released")
    bad = omx("model", "scale", "no-such-model", "--replicas", "1", "--api-url", n2.url)
    assert bad.returncode != 0 and "not found" in bad.stderr
