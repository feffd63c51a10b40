"""`omx up`: a local cluster of real node processes on loopback, stopped cleanly on Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
from pathlib import Path

from omx.node.launch import NodeProc, start_cluster


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="omx up", description="Start a local omx cluster with the demo model.")
    ap.add_argument("--nodes", type=int, default=3, help="node processes to start (default 3)")
    ap.add_argument("--regions", type=int, default=1, help="regions to spread them over (default 1)")
    ap.add_argument("--data-dir", type=Path, help="where node data lives (default: a temporary directory)")
    ap.add_argument("--port", type=int, default=11434, help="API port of the first node; others follow (0: any)")
    args = ap.parse_args(argv)
    if not 1 <= args.nodes <= 64:
        ap.error("--nodes must be between 1 and 64")
    if not 1 <= args.regions <= args.nodes:
        ap.error("--regions must be between 1 and --nodes")
    tmp = None
    base = args.data_dir
    if base is None:
        tmp = tempfile.TemporaryDirectory(prefix="omx-up-")
        base = Path(tmp.name)
    ports = [args.port + i for i in range(args.nodes)] if args.port else None
    print(f"starting {args.nodes} nodes in {args.regions} region(s) under {base} ...", flush=True)
    try:
        nodes = start_cluster(base, args.nodes, args.regions, api_ports=ports)
    except RuntimeError as e:
        print(f"omx up: a node failed to start:\n{e}", file=sys.stderr)
        return 1
    _print_table(nodes)
    print("\neach node serves the Ollama API; `omx --host HOST:PORT ...` talks to one. Ctrl-C stops them all",
          flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.wait(0.5):
        dead = [n for n in nodes if n.proc.poll() is not None]
        if dead:
            for n in dead:
                print(f"node {n.id} exited with {n.proc.returncode}", file=sys.stderr)
            break
    print("stopping ...", flush=True)
    for n in nodes:
        if n.proc.poll() is None:
            n.proc.send_signal(signal.SIGTERM)
    codes = [n.wait_exit() for n in nodes]
    for n, code in zip(nodes, codes, strict=True):
        if code != 0:
            tail = "".join(n.log[-15:])
            print(f"node {n.id} exited with {code}; its last output:\n{tail}", file=sys.stderr)
    if tmp is not None:
        tmp.cleanup()
    print("stopped", flush=True)
    return 0 if all(c == 0 for c in codes) else 1


def _print_table(nodes: list[NodeProc]) -> None:
    print(f"\n{'node':<14}{'api':<28}{'gossip':<22}{'region/role':<22}data")
    for n in nodes:
        region = _arg(n.argv, "--region")
        role = _arg(n.argv, "--role")
        print(f"{n.id:<14}{n.url:<28}{n.gossip:<22}{region + '/' + role:<22}{n.data_dir}")


def _arg(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1] if flag in argv else "-"


if __name__ == "__main__":
    sys.exit(main())
