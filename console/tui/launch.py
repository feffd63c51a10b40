"""Command line for `omx-console`: the terminal app, or `--web` to serve the same app to browsers."""

from __future__ import annotations

import argparse
import ipaddress
import os
import shlex
import sys

DEFAULT_URL = "http://127.0.0.1:11434"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="omx-console", description="Live operator console for an omx cluster.")
    p.add_argument("--api-url", default=os.environ.get("OMX_HOST") or DEFAULT_URL,
                   help="any cluster member's API address (default: $OMX_HOST or %(default)s)")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between polls (events wake it sooner)")
    p.add_argument("--no-events", action="store_true", help="poll only; do not follow the event stream")
    p.add_argument("--web", action="store_true", help="serve the console to browsers instead of this terminal")
    p.add_argument("--host", default="127.0.0.1", help="--web bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8080, help="--web port (default: %(default)s)")
    p.add_argument("--public-url", default=None, help="--web: the URL browsers use, when behind a proxy")
    return p.parse_args(argv)


def serve_web(args: argparse.Namespace) -> int:
    from textual_serve.server import Server

    if not is_loopback(args.host):
        print(f"omx-console: WARNING: serving on {args.host}:{args.port}, reachable from other machines. Anyone "
              "who can open it can drain, remove and delete; put an authenticating proxy in front of it.",
              file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "omx.console.tui", "--api-url", args.api_url, "--poll", str(args.poll)]
    if args.no_events:
        cmd.append("--no-events")
    server = Server(shlex.join(cmd), host=args.host, port=args.port, title="omx-console", public_url=args.public_url)
    print(f"omx-console: serving on http://{args.host}:{args.port}", flush=True)
    server.serve()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.web:
        return serve_web(args)
    from omx.console.tui.app import OmxConsole
    from omx.console.tui.client import HttpSource

    app = OmxConsole(HttpSource(args.api_url), poll_interval=args.poll, live_events=not args.no_events)
    app.run()
    return 0
