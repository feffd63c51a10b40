"""Node assembly and lifetime: build the app from a config, provision the demo model, serve, drain on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from omx.models.store import Store
from omx.node import distribution
from omx.node.app import CONFIG, INFER, RUNNERS, STORE, add_native_routes, errors_mw, make_host_check
from omx.node.cluster import Cluster, ClusterStartError
from omx.node.cluster_routes import CLUSTER, EVENTS, add_cluster_routes
from omx.node.config import ConfigError, NodeConfig, load_config
from omx.node.distribution import add_distribution_routes
from omx.node.events import EventBus
from omx.node.inference import Inference
from omx.node.metrics import Metrics, StateCollector
from omx.node.openai import add_openai_routes
from omx.node.proxy_routes import add_proxy_routes
from omx.node.router import ROUTER, Router
from omx.node.runners import RunnerManager
from omx.node.scheduler import SCHEDULER, Scheduler

log = logging.getLogger("omx.node")


def build_app(cfg: NodeConfig) -> web.Application:
    metrics = Metrics()
    app = web.Application(middlewares=[metrics.middleware(), errors_mw, make_host_check(cfg)],
                          client_max_size=cfg.max_body_bytes)
    store = Store(cfg.data_dir)
    runners = RunnerManager(
        max_loaded=cfg.max_loaded_models,
        num_parallel=cfg.num_parallel,
        max_queue=cfg.max_queue,
        default_keep_alive=cfg.keep_alive_effective,
        load_timeout=cfg.load_timeout,
        device=cfg.device,
        dtype=cfg.dtype,
        log_dir=str(cfg.data_dir / "logs"),
    )
    app[CONFIG] = cfg
    app[STORE] = store
    app[RUNNERS] = runners
    app[INFER] = Inference(store=store, runners=runners, context_length=cfg.context_length)
    add_native_routes(app)
    add_openai_routes(app)
    app[EVENTS] = EventBus()
    app[CLUSTER] = Cluster(cfg, app[EVENTS], runners, store)
    app[ROUTER] = Router(cfg, app[CLUSTER], runners, app[EVENTS])
    app[SCHEDULER] = Scheduler(cfg, app[CLUSTER], app[INFER], app[EVENTS],
                               fetch=lambda name: distribution.replicate(app, name))
    add_cluster_routes(app)
    add_distribution_routes(app)
    add_proxy_routes(app)
    metrics.add_collector(StateCollector(lambda: _live_state(app)))
    app.router.add_get("/metrics", metrics.handler)
    app.cleanup_ctx.append(_runners_ctx)
    app.cleanup_ctx.append(_router_ctx)
    return app


def _live_state(app: web.Application) -> dict[str, object]:
    runners = app[RUNNERS]
    state: dict[str, object] = {
        "inflight": {r.spec.name: r.inflight for r in runners.runners.values()},
        "loaded": len(runners.live()),
    }
    cluster = app[CLUSTER]
    if cluster.swim is not None:
        state["members"] = cluster.member_counts()
        state["local_health"] = cluster.swim.local_health
        state["dropped"] = cluster.swim.stats().get("dropped_total", 0)
    router = app[ROUTER]
    state["router"] = {
        "retries": router.retries_total, "resumes": router.resumes_total, "inflight": router.inflight,
        "queue": {r.spec.name: r.queued for r in runners.runners.values()},
        "circuits": {tid: b.state for tid, b in router.breakers.items()},
    }
    if cluster.registry is not None:
        state["raft"] = cluster.registry.status()
    return state


async def _router_ctx(app: web.Application) -> AsyncIterator[None]:
    await app[ROUTER].start()
    yield
    await app[ROUTER].stop()


async def _runners_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[RUNNERS].close()  # after in-flight requests drained: stop every runner process


def provision_demo(store: Store) -> bool:
    """Give an empty store the demo model, so a fresh node can answer a request at once."""
    from omx.models.demo import ensure_demo_model

    if any(True for _ in store.list_models()):
        return False
    ensure_demo_model(store)
    return True


async def serve(cfg: NodeConfig) -> None:
    # handlers first: a launcher may signal us the moment we print our address
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        app = build_app(cfg)
    except ClusterStartError as e:
        raise SystemExit(f"omx: {e}") from None
    if cfg.provision_demo:
        if await asyncio.to_thread(provision_demo, app[STORE]):
            log.info("provisioned the demo model omx-tiny:latest")
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=cfg.shutdown_grace,
                           access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port, reuse_address=True)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()  # closes the router's client session: no "Unclosed client session" at exit
        raise SystemExit(f"omx: cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
    port = runner.addresses[0][1] if runner.addresses else cfg.port
    api_url = f"http://{cfg.advertise_host}:{port}"
    cluster = app[CLUSTER]
    try:
        await cluster.start(api_url)
    except ClusterStartError as e:
        await cluster.stop()
        await runner.cleanup()
        raise SystemExit(f"omx: {e}") from None
    assert cluster.swim is not None
    app[SCHEDULER].start()
    # What startup made (torch's and transformers' modules among it: ~250k objects) lives as long as the node.
    # Frozen, the collector no longer walks it: a full collection took 175 ms, a stall for every request.
    gc.collect()
    gc.freeze()
    # one parseable line so launchers and tests know where we listen (port 0 picks a free one)
    print(f"omx node listening on {api_url} gossip={cluster.swim.address} id={cluster.id} "
          f"region={cfg.region} role={cfg.role} data_dir={cfg.data_dir}", flush=True)
    await stop.wait()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # a second signal must not kill us halfway through the drain (nor after the loop closes)
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
    # leave first: peers see a graceful departure (never a failure) and stop sending us work
    await cluster.leave()
    await app[SCHEDULER].stop()
    log.info("shutting down: draining in-flight requests (grace %.0fs)", cfg.shutdown_grace)
    await runner.cleanup()
    await cluster.stop()


def _malformed_request_in_one_line(record: logging.LogRecord) -> bool:
    """aiohttp logs each request it cannot parse (a bad Content-Length, broken chunking) at ERROR with a
    traceback: any client could fill the log. It already answered 400; one INFO line says what was wrong."""
    exc = record.exc_info[1] if record.exc_info else None
    if not isinstance(exc, HttpProcessingError):
        return True
    what = " ".join(str(exc.message or type(exc).__name__).split())[:200]  # aiohttp's text spans lines
    record.msg, record.args = "malformed HTTP request (%s): answered 400", (what,)
    record.exc_info, record.exc_text, record.levelno, record.levelname = None, None, logging.INFO, "INFO"
    return logging.getLogger().isEnabledFor(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="omx node start", description="Start an omx node.")
    ap.add_argument("--config", type=Path, help="TOML or JSON settings file")
    ap.add_argument("--host", help="bind address, OLLAMA_HOST forms (default 127.0.0.1:11434, env OMX_HOST)")
    ap.add_argument("--port", type=int)
    # a str, not a Path: Path("") would turn an empty value into the working directory before it is checked
    ap.add_argument("--data-dir", help="model store and state (default ~/.omx, env OMX_HOME)")
    ap.add_argument("--no-demo", action="store_true", help="do not provision the demo model on an empty store")
    ap.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR or CRITICAL (default INFO, env OMX_LOG_LEVEL)")
    cl = ap.add_argument_group("cluster")
    cl.add_argument("--region", help="region name (default 'default', env OMX_REGION)")
    cl.add_argument("--role", choices=["control", "worker"], help="control nodes are the region's Raft voters")
    cl.add_argument("--join", help="HOST:PORT[,...] gossip addresses of members to join")
    cl.add_argument("--cluster-key-file", type=Path, help="shared cluster key (standalone nodes make their own)")
    cl.add_argument("--gossip-port", type=int, help="SWIM port, UDP and TCP (default 7946; 0 picks one)")
    cl.add_argument("--raft-port", type=int, help="Raft port of a control node (default 7947)")
    cl.add_argument("--raft-peers", help="HOST:PORT[,...] Raft addresses of the region's other voters")
    cl.add_argument("--gossip-profile", choices=["lan", "local"], help="protocol timings (local: one host)")
    args = ap.parse_args(argv)
    level_text = args.log_level or os.environ.get("OMX_LOG_LEVEL") or "INFO"
    level = logging.getLevelNamesMapping().get(level_text.strip().upper())
    if level is None:
        print(f"omx: {'--log-level' if args.log_level else 'OMX_LOG_LEVEL'} {level_text!r} is not a log level: "
              "use DEBUG, INFO, WARNING, ERROR or CRITICAL", file=sys.stderr)
        return 2
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("aiohttp.server").addFilter(_malformed_request_in_one_line)
    overrides: dict[str, object] = {"port": args.port, "data_dir": args.data_dir}
    if args.host:
        from omx.protocols.hosts import HostError, parse_host

        try:
            addr = parse_host(args.host)
        except HostError as e:
            print(f"omx: --host: {e}", file=sys.stderr)
            return 2
        overrides["host"] = addr.host
        if args.port is None and (":" in args.host.split("://")[-1] or "://" in args.host):
            overrides["port"] = addr.port
    if args.no_demo:
        overrides["provision_demo"] = False
    for key in ("region", "role", "join", "cluster_key_file", "gossip_port", "raft_port", "raft_peers",
                "gossip_profile"):
        overrides[key] = getattr(args, key)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"omx: {e}", file=sys.stderr)
        return 2
    try:
        # here, not at the first write deep in startup, so the error names the directory, not a listen failure
        if cfg.data_dir.exists() and not cfg.data_dir.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(cfg.data_dir, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as e:
        print(f"omx: data_dir {cfg.data_dir}: {e.strerror or e}", file=sys.stderr)
        return 2
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(serve(cfg))
    except OSError as e:  # listen failures are reported by serve(); this is anything else the OS refused
        print(f"omx: {f'{e.filename}: ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 1
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return 0
