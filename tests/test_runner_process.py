"""Runner processes: a crash ends only its requests, the next request reloads; full queues answer 503."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
from pathlib import Path

import httpx
import pytest

from omx.node.launch import start_node, wait_until

pytestmark = pytest.mark.timeout(240)

# Greedy decoding of the demo model's fixed random weights cycles without ever emitting its end
# token, so these requests reliably outlive the events the tests inject (a sampled stream could
# end early by chance and make the tests flaky).
GREEDY_LONG = {"temperature": 0, "num_predict": 5000, "stop": []}


def runner_pids(node_pid: int) -> list[int]:
    """Runner processes are the node's children running omx.models.runner."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == node_pid and b"omx.models.runner" in cmd:
            pids.append(int(d.name))
    return pids


def test_killed_runner_ends_request_and_next_request_reloads(node) -> None:
    with node.client(timeout=120) as c:
        assert c.post("/api/generate", json={"model": "omx-tiny", "prompt": "", "keep_alive": -1}).status_code == 200
        wait_until(lambda: runner_pids(node.proc.pid), 60, what="a runner process")
        (pid,) = runner_pids(node.proc.pid)
        lines: list[dict] = []
        with c.stream("POST", "/api/generate", json={
            "model": "omx-tiny", "prompt": "hello world", "options": GREEDY_LONG}) as r:
            assert r.status_code == 200
            for raw in r.iter_lines():
                if not raw:
                    continue
                lines.append(json.loads(raw))
                if len(lines) == 5:
                    os.kill(pid, signal.SIGKILL)
        assert "error" in lines[-1] and "terminated" in lines[-1]["error"]
        assert not any(line.get("done") for line in lines)
        # the node is fine, and the next request starts a fresh runner
        r = c.post("/api/generate", json={"model": "omx-tiny", "prompt": "again", "stream": False,
                                          "options": {"num_predict": 3}})
        assert r.status_code == 200 and r.json()["done"]
        assert runner_pids(node.proc.pid) and pid not in runner_pids(node.proc.pid)


def test_full_queue_answers_503(tmp_path: Path) -> None:
    n = start_node(tmp_path / "busy", env={"OMX_NUM_PARALLEL": "1", "OMX_MAX_QUEUE": "0"})
    try:
        with httpx.Client(base_url=n.url, timeout=120) as c:
            assert c.post("/api/generate", json={"model": "omx-tiny", "prompt": ""}).status_code == 200
            started = threading.Event()

            def long_request() -> None:
                with c.stream("POST", "/api/generate", json={
                        "model": "omx-tiny", "prompt": "hello world", "options": GREEDY_LONG}) as r:
                    for _ in r.iter_lines():
                        started.set()

            t = threading.Thread(target=long_request)
            t.start()
            assert started.wait(60)
            r = c.post("/api/generate", json={"model": "omx-tiny", "prompt": "y", "stream": False})
            assert r.status_code == 503
            assert r.json()["error"] == "server busy, please try again.  maximum pending requests exceeded"
            t.join(120)
            r = c.post("/api/generate", json={"model": "omx-tiny", "prompt": "y", "stream": False,
                                              "options": {"num_predict": 2}})
            assert r.status_code == 200
    finally:
        assert n.stop() == 0


def test_sigterm_drains_in_flight_request(tmp_path: Path) -> None:
    n = start_node(tmp_path / "drain")
    with httpx.Client(base_url=n.url, timeout=120) as c:
        assert c.post("/api/generate", json={"model": "omx-tiny", "prompt": ""}).status_code == 200
        got: list[dict] = []
        started = threading.Event()

        def request() -> None:
            with c.stream("POST", "/api/generate", json={
                    "model": "omx-tiny", "prompt": "hello world", "options": {**GREEDY_LONG, "num_predict": 300}}) as r:
                for raw in r.iter_lines():
                    if raw:
                        got.append(json.loads(raw))
                        started.set()

        t = threading.Thread(target=request)
        t.start()
        assert started.wait(60)
        n.proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert got[-1].get("done") is True, got[-1]
        assert n.proc.wait(60) == 0
    assert not runner_pids(n.proc.pid)


def test_lru_unload_and_keep_alive_zero(tmp_path: Path) -> None:
    from omx.models.demo import build_llama_gguf

    n = start_node(tmp_path / "lru", env={"OMX_MAX_LOADED_MODELS": "1"})
    try:
        with httpx.Client(base_url=n.url, timeout=120) as c:
            other = build_llama_gguf(tmp_path / "other.gguf", seed=9)
            data = other.read_bytes()
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            assert c.post(f"/api/blobs/{digest}", content=data).status_code == 201
            r = c.post("/api/create", json={"model": "other", "files": {"other.gguf": digest}, "stream": False})
            assert r.status_code == 200 and r.json()["status"] == "success"

            def loaded() -> list[str]:
                return [m["name"] for m in c.get("/api/ps").json()["models"]]

            gen = {"prompt": "hi", "stream": False, "options": {"num_predict": 2}}
            assert c.post("/api/generate", json={"model": "omx-tiny", **gen}).status_code == 200
            assert loaded() == ["omx-tiny:latest"]
            assert c.post("/api/generate", json={"model": "other", **gen}).status_code == 200
            assert loaded() == ["other:latest"]  # the idle least recently used model made room
            assert len(runner_pids(n.proc.pid)) == 1
            # keep_alive 0 with a prompt: answer, then unload
            r = c.post("/api/generate", json={"model": "other", "keep_alive": 0, **gen})
            assert r.status_code == 200 and r.json()["done"]
            wait_until(lambda: loaded() == [], 60, what="the model to unload")
            wait_until(lambda: not runner_pids(n.proc.pid), 60, what="the runner to exit")
            # negative keep_alive keeps it loaded with an expiry far away
            c.post("/api/generate", json={"model": "other", "keep_alive": -1, **gen})
            (entry,) = c.get("/api/ps").json()["models"]
            assert entry["expires_at"] > "2030"
    finally:
        assert n.stop() == 0


def test_a_frame_larger_than_the_pipe_arrives_whole() -> None:
    """The runner reads frames from an unbuffered pipe, which hands out at most what has arrived (64 KiB)."""
    from omx.protocols import frames

    r, w = os.pipe()
    big = {"t": "generate", "prompt": "x" * 600_000 + "é"}

    def write() -> None:
        with os.fdopen(w, "wb") as out:
            out.write(frames.encode(big))
            out.write(frames.encode({"t": "next"}))

    t = threading.Thread(target=write)
    t.start()
    with os.fdopen(r, "rb", buffering=0) as inp:
        assert frames.read_sync(inp) == big
        assert frames.read_sync(inp) == {"t": "next"}
        assert frames.read_sync(inp) is None
    t.join(10)


def test_a_prompt_of_a_megabyte_is_truncated_not_fatal(node) -> None:
    """Ollama keeps the end of a prompt longer than the context; the runner (and its other requests) live on."""
    with node.client(timeout=120) as c:
        assert c.post("/api/generate", json={"model": "omx-tiny", "prompt": "", "keep_alive": -1}).status_code == 200
        wait_until(lambda: runner_pids(node.proc.pid), 60, what="a runner process")
        before = runner_pids(node.proc.pid)
        r = c.post("/api/generate", json={"model": "omx-tiny", "prompt": "why " * 250_000, "stream": False,
                                          "options": {"num_predict": 2}})
        assert r.status_code == 200, r.text
        assert 0 < r.json()["prompt_eval_count"] <= 4096
        assert runner_pids(node.proc.pid) == before
