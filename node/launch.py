"""Start node processes and wait until they listen: used by `omx up`, tests and benchmarks."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from omx.protocols.clusterkey import generate_key_file

LISTEN_RE = re.compile(r"omx node listening on (http://\S+) gossip=(\S+) id=(\S+)")


@dataclass
class NodeProc:
    """A node process; `log` collects its output for error messages. `argv` restarts it on the same ports."""

    proc: subprocess.Popen[str]
    data_dir: Path
    argv: list[str]
    env: dict[str, str]
    url: str = ""
    gossip: str = ""
    id: str = ""
    log: list[str] = field(default_factory=list)
    _ready: threading.Event = field(default_factory=threading.Event)

    @property
    def host(self) -> str:
        return self.url.removeprefix("http://")

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def wait_ready(self, timeout: float = 120.0) -> NodeProc:
        if not self._ready.wait(timeout):
            self.proc.kill()
            raise RuntimeError("node did not start in time:\n" + "".join(self.log))
        if not self.url:
            self.proc.wait(5)
            raise RuntimeError(f"node exited with {self.proc.returncode}:\n" + "".join(self.log))
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait_exit(timeout)

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait for the process to end (it was already signalled); kill it past `timeout`."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        return self.proc.returncode

    def restart(self) -> NodeProc:
        """Same arguments, ports and data dir: the node comes back as itself."""
        return _spawn(self.argv, self.data_dir, self.env)


def _spawn(argv: list[str], data_dir: Path, env: dict[str, str]) -> NodeProc:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    node = NodeProc(proc=proc, data_dir=data_dir, argv=argv, env=env)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            node.log.append(line)
            m = LISTEN_RE.search(line)
            if m and not node._ready.is_set():
                node.url, node.gossip, node.id = m.group(1), m.group(2), m.group(3)
                node._ready.set()
        node._ready.set()

    threading.Thread(target=pump, daemon=True).start()
    return node


def spawn_node(
    data_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    gossip_port: int = 0,
    raft_port: int = 0,
    profile: str = "local",
    wrap: Sequence[str] = (),
) -> NodeProc:
    """Run `python -m omx.node start` without waiting (port 0 picks a free port); `wrap` prefixes the command
    (`ip netns exec NS` runs the node in a network namespace)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("OMX_HOST", None)
    argv = [*wrap, sys.executable, "-m", "omx.node", "start", "--host", host, "--port", str(port),
            "--data-dir", str(data_dir), "--gossip-port", str(gossip_port), "--raft-port", str(raft_port),
            "--gossip-profile", profile, *args]
    return _spawn(argv, data_dir, full_env)


def start_node(data_dir: Path, *args: str, timeout: float = 120.0, **kw: object) -> NodeProc:
    """Run a node and wait for its listening line."""
    return spawn_node(data_dir, *args, **kw).wait_ready(timeout)  # type: ignore[arg-type]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """Distinct free ports (held open together so they differ); another process could still take one."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def plan_roles(nodes: int, regions: int) -> list[tuple[str, str]]:
    """(region, role) per node: regions round-robin; up to 3 voters per region, the rest workers."""
    out: list[tuple[str, str]] = []
    per_region: dict[str, int] = {}
    for i in range(nodes):
        region = "default" if regions == 1 else f"region-{i % regions + 1}"
        k = per_region.get(region, 0)
        per_region[region] = k + 1
        out.append((region, "control" if k < 3 else "worker"))
    return out


def start_cluster(
    base_dir: Path,
    nodes: int = 3,
    regions: int = 1,
    *extra: str,
    env: dict[str, str] | None = None,
    host: str = "127.0.0.1",
    api_ports: list[int] | None = None,
    timeout: float = 180.0,
) -> list[NodeProc]:
    """A local cluster of real node processes sharing one generated key; the first node is everyone's seed."""
    base_dir.mkdir(parents=True, exist_ok=True)
    key = base_dir / "cluster.key"
    if not key.exists():
        generate_key_file(key)
    plan = plan_roles(nodes, regions)
    ports = free_ports(nodes * 2, host)
    gossip = ports[:nodes]
    raft = ports[nodes:]
    procs: list[NodeProc] = []
    for i, (region, role) in enumerate(plan):
        args = ["--region", region, "--role", role, "--cluster-key-file", str(key), *extra]
        if role == "control":
            peers = [f"{host}:{raft[j]}" for j, (r, ro) in enumerate(plan)
                     if r == region and ro == "control" and j != i]
            if peers:
                args += ["--raft-peers", ",".join(peers)]
        if i > 0:
            args += ["--join", f"{host}:{gossip[0]}"]
        node = spawn_node(base_dir / f"node{i + 1}", *args, env=env, host=host,
                          port=api_ports[i] if api_ports else 0, gossip_port=gossip[i], raft_port=raft[i])
        procs.append(node)
        if i == 0:
            node.wait_ready(timeout)  # the seed must listen before the others join it
    try:
        for p in procs:
            p.wait_ready(timeout)
    except RuntimeError:
        for p in procs:
            p.stop(signal.SIGKILL)
        raise
    return procs


def wait_until(cond: object, timeout: float = 60.0, interval: float = 0.1, what: str = "condition") -> None:
    """Poll `cond()` until true; raises TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if cond():  # type: ignore[operator]
                return
        except (httpx.HTTPError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
