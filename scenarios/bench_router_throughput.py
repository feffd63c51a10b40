"""Router throughput: requests/s one omx node routes, side by side with nginx proxying the same backend.

The backend is an nginx that answers like a fast Ollama server (a one-line `/api/generate` answer, `/api/tags`,
`/api/ps`, `/api/version`), so the backend costs next to nothing and what is measured is the proxy. The same
wrk load (non-streamed `/api/generate` POSTs on keep-alive connections) is sent, in interleaved rounds, to:
  - the backend directly (the ceiling of this machine with this load generator),
  - nginx with `proxy_pass` and upstream keep-alive (the peer: a plain reverse proxy, no decisions),
  - an omx node that knows the backend as an external instance (`omx proxy add`): it parses the request,
    picks a replica (health, circuit, load), forwards it, reads the NDJSON answer and merges it,
  - the floor of omx's own stack: an aiohttp server on uvloop that forwards each POST through one keep-alive
    aiohttp client session and returns the answer as it came (no parsing, no decisions, no metrics).
All proxies run one worker process, so the figures are per core. A region with N routers scales
with N (routers share nothing on the request path); the 10,000 req/s per region target is the product.

Needs nginx and wrk on PATH (Debian: apt-get install nginx wrk). Prints medians over the rounds: req/s, and
the p50 and p99 latency wrk measured.

    .venv/bin/python scenarios/bench_router_throughput.py [--seconds 8] [--rounds 3] [--connections 32]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from omx.node.launch import free_ports, start_node, wait_until

MODEL = "fake:latest"
ANSWER = json.dumps({"model": MODEL, "created_at": "2026-01-01T00:00:00Z", "response": "hi", "done": True,
                     "done_reason": "stop", "total_duration": 1000, "eval_count": 1, "prompt_eval_count": 1})
TAGS = json.dumps({"models": [{"name": MODEL, "model": MODEL, "size": 1, "digest": "0" * 64,
                               "modified_at": "2026-01-01T00:00:00Z", "details": {}}]})
PS = json.dumps({"models": [{"name": MODEL, "model": MODEL, "size": 1, "digest": "0" * 64}]})
BODY = json.dumps({"model": MODEL, "prompt": "hello", "stream": False})


def nginx_conf(tmp: Path, name: str, server_block: str) -> Path:
    conf = tmp / f"{name}.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}.err warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/{name}-body;
    proxy_temp_path {tmp}/{name}-proxy;
    fastcgi_temp_path {tmp}/{name}-fcgi;
    uwsgi_temp_path {tmp}/{name}-uwsgi;
    scgi_temp_path {tmp}/{name}-scgi;
    keepalive_requests 1000000;
    {server_block}
}}
""")
    return conf


def start_nginx(conf: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(conf.parent)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/api/version", timeout=2).status_code == 200, 20,
               what=f"nginx on {port}")
    return proc


def _ms(out: str, pct: str) -> float:
    m = re.search(rf"{pct}%\s+([\d.]+)(us|ms|s)", out)
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)] if m else float("nan")


def wrk(url: str, seconds: int, connections: int, script: Path) -> tuple[float, float, float]:
    """(requests/s, p50 and p99 latency ms) of one wrk run; non-2xx answers fail the run."""
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"{url} answered errors:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return rps, _ms(out, "50"), _ms(out, "99")


def serve_plain_aiohttp(backend_url: str, port: int) -> None:
    """The plain aiohttp proxy row: what the same libraries cost with nothing of omx on top."""
    import asyncio

    import uvloop
    from aiohttp import ClientSession, TCPConnector, web

    async def run() -> None:
        session = ClientSession(connector=TCPConnector(limit=0))

        async def forward(request: web.Request) -> web.Response:
            async with session.post(backend_url + request.path, data=await request.read(),
                                    headers={"Content-Type": "application/json"}) as r:
                return web.Response(body=await r.read(), status=r.status, content_type="application/json")

        app = web.Application()
        app.router.add_post("/api/generate", forward)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    uvloop.run(run())


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-plain-aiohttp":
        serve_plain_aiohttp(sys.argv[2], int(sys.argv[3]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=32)
    args = ap.parse_args()
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            print(f"{tool} is not on PATH (Debian: apt-get install nginx wrk)")
            return 2
    with tempfile.TemporaryDirectory(prefix="omx-bench-rt-") as d:
        tmp = Path(d)
        backend_port, proxy_port, plain_port = free_ports(3)
        backend = start_nginx(nginx_conf(tmp, "backend", f"""
    server {{
        listen 127.0.0.1:{backend_port};
        default_type application/json;
        location = /api/generate {{ return 200 '{ANSWER}\\n'; }}
        location = /api/tags {{ return 200 '{TAGS}'; }}
        location = /api/ps {{ return 200 '{PS}'; }}
        location = /api/version {{ return 200 '{{"version":"0.5.0"}}'; }}
    }}"""), backend_port)
        proxy = start_nginx(nginx_conf(tmp, "proxy", f"""
    upstream backend {{ server 127.0.0.1:{backend_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{proxy_port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""), proxy_port)
        backend_url = f"http://127.0.0.1:{backend_port}"
        node = start_node(tmp / "node", "--no-demo", env={"OMX_LOG_LEVEL": "WARNING"})
        plain = subprocess.Popen([sys.executable, __file__, "--serve-plain-aiohttp", backend_url, str(plain_port)])
        try:
            r = httpx.post(node.url + "/api/v1/proxy/instances", json={"url": backend_url}, timeout=10)
            r.raise_for_status()
            wait_until(lambda: httpx.post(node.url + "/api/generate", content=BODY, timeout=5).status_code == 200,
                       60, what="the node routing to the external instance")
            script = tmp / "post.lua"
            script.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(BODY)}\n'
                              'wrk.headers["Content-Type"] = "application/json"\n')
            targets = {"backend (ceiling)": backend_url, "nginx proxy_pass": f"http://127.0.0.1:{proxy_port}",
                       "omx router": node.url, "plain aiohttp proxy": f"http://127.0.0.1:{plain_port}"}
            wait_until(lambda: httpx.post(targets["plain aiohttp proxy"] + "/api/generate", content=BODY,
                                          timeout=5).status_code == 200, 30, what="the plain aiohttp proxy")
            for url in targets.values():  # warm up connections, caches and the node's holder index
                wrk(url + "/api/generate", 1, args.connections, script)
            results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in targets}
            for _ in range(args.rounds):
                for name, url in targets.items():
                    results[name].append(wrk(url + "/api/generate", args.seconds, args.connections, script))
            print(f"router throughput: non-streamed /api/generate, wrk 1 thread, {args.connections} connections, "
                  f"{args.seconds} s x {args.rounds} rounds, one worker process per server; "
                  f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
            print(f"{'target':>20} {'req/s p50':>10} {'latency p50 ms':>15} {'latency p99 ms':>15}")
            med = {k: statistics.median(r for r, _, _ in v) for k, v in results.items()}
            for name, vals in results.items():
                print(f"{name:>20} {med[name]:>10.0f} {statistics.median(p for _, p, _ in vals):>15.2f} "
                      f"{statistics.median(p for _, _, p in vals):>15.2f}")
            ratio = med["omx router"] / med["nginx proxy_pass"]
            print(f"omx router / nginx proxy_pass: {ratio:.2f}x; omx router / plain aiohttp proxy: "
                  f"{med['omx router'] / med['plain aiohttp proxy']:.2f}x; routers for 10,000 req/s at this rate: "
                  f"{-(-10000 // max(1, int(med['omx router'])))}")
        finally:
            node.stop()
            for p in (plain, proxy, backend):
                p.terminate()
                p.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
