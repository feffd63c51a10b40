"""Start node processes and wait until they listen: used by tests, benchmarks and local launchers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

LISTEN_RE = re.compile(r"omx node listening on (http://\S+)")


@dataclass
class NodeProc:
    """A running node process; `log` collects its output for error messages."""

    proc: subprocess.Popen[str]
    url: str
    data_dir: Path
    log: list[str] = field(default_factory=list)

    @property
    def host(self) -> str:
        return self.url.removeprefix("http://")

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def start_node(
    data_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    timeout: float = 120.0,
) -> NodeProc:
    """Run `python -m omx.node start` (port 0 picks a free port) and wait for its listening line."""
    data_dir.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("OMX_HOST", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "omx.node", "start", "--host", host, "--port", str(port),
         "--data-dir", str(data_dir), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
    )
    lines: list[str] = []
    found: dict[str, str] = {}
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            m = LISTEN_RE.search(line)
            if m and not ready.is_set():
                found["url"] = m.group(1)
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.1):
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("node did not start in time:\n" + "".join(lines))
    if "url" not in found:
        proc.wait(5)
        raise RuntimeError(f"node exited with {proc.returncode}:\n" + "".join(lines))
    return NodeProc(proc=proc, url=found["url"], data_dir=data_dir, log=lines)
