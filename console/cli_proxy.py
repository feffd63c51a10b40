"""`omx proxy ...` and `omx model scale`: the routing layer from the command line.

`--json` prints exactly the node's JSON (schema: the `/api/v1/proxy/*` routes, documented in README), so
scripts can pipe it to `jq`; without it, tables. `--watch` redraws in place until Ctrl-C.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.table import Table

ApiUrlOpt = Annotated[
    str | None,
    typer.Option("--api-url", help="Any node's API URL (default: --host / $OMX_HOST / 127.0.0.1:11434)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the node's JSON (stable schema) instead of a table.")]

cli: Any = None  # omx.console.cli as it runs (it may be __main__): register() sets it


proxy_app = typer.Typer(help="The cluster's routing layer: status, instances, metrics, external instances.",
                        no_args_is_help=True)


def _get(url: str | None, path: str, rows: dict[str, type] | None = None) -> Any:
    return cli._client(url).json("GET", path, rows=rows)


def _num(v: Any, unit: str = "", digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}{unit}"
    return f"{v}{unit}"


def status_table(st: dict[str, Any]) -> Table:
    inst = cli.obj(st.get("instances"))
    req = cli.obj(st.get("requests"))
    t = cli._table("FIELD", "VALUE")
    for k, v in (("node", st.get("node")), ("region", st.get("region")), ("policy", st.get("policy")),
                 ("instances", f"{inst.get('healthy', 0)} healthy of {inst.get('total', 0)}"),
                 ("requests", f"{req.get('total', 0)} total, {req.get('inflight', 0)} in flight"),
                 ("failover", f"{req.get('retries', 0)} retries, {req.get('resumes', 0)} mid-stream resumptions")):
        t.add_row(k, str(v))
    return t


def instances_table(data: dict[str, Any]) -> Table:
    t = cli._table("ID", "KIND", "STATUS", "CIRCUIT", "REGION", "URL", "LOADED", "INFLIGHT", "QUEUE", "P50",
                   "TOK/S")
    for i in data.get("instances") or []:
        ident = str(i.get("id"))
        if i.get("kind") == "node":
            ident = ident[:12] + (" *" if i.get("self") else "")
        t.add_row(ident, str(i.get("kind")), str(i.get("status")), str(i.get("circuit")),
                  str(i.get("region") or "-"), str(i.get("url") or "-"), cli.names(i.get("loaded")) or "-",
                  f"{i.get('inflight', 0)}/{i.get('slots', 0)}", str(i.get("queue", 0)),
                  _num(i.get("latency_ms"), " ms", 0), _num(i.get("tokens_per_s")))
    return t


def metrics_table(m: dict[str, Any]) -> Table:
    t = cli._table("SCOPE", "REQUESTS", "ERRORS", "P50", "P99", "TOK/S")
    lat = cli.obj(m.get("latency_ms"))
    t.add_row(f"node {str(m.get('node'))[:12]} (routed)", str(m.get("requests_total", 0)),
              f"{m.get('retries_total', 0)} retries / {m.get('resumes_total', 0)} resumes",
              _num(lat.get("p50"), " ms", 0), _num(lat.get("p99"), " ms", 0), _num(m.get("tokens_per_s")))
    for tid, s in sorted((m.get("instances") or {}).items()):
        sl = cli.obj(s.get("latency_ms"))
        t.add_row(f"  -> {tid[:40]}", str(s.get("requests_total", 0)), str(s.get("errors_total", 0)),
                  _num(sl.get("p50"), " ms", 0), _num(sl.get("p99"), " ms", 0), _num(s.get("tokens_per_s")))
    return t


def _show(fetch: Callable[[], Any], render: Callable[[Any], Table], as_json: bool, watch: bool,
          interval: float) -> None:
    if not watch:
        data = fetch()
        if as_json:
            cli._print_json(data)
        else:
            cli._print_table(render(data))
        return
    if not 0 < interval < math.inf:  # nan fails this too
        raise cli.CliError("--interval must be a positive, finite number of seconds")
    if as_json:  # one JSON document per line: a stream a script can read
        while True:
            sys.stdout.write(json.dumps(fetch(), separators=(",", ":")) + "\n")
            sys.stdout.flush()
            time.sleep(interval)
    with Live(render(fetch()), console=cli._stdout(), auto_refresh=False, transient=False) as live:
        while True:
            time.sleep(interval)
            live.update(render(fetch()), refresh=True)


@proxy_app.command("status")
def status(api_url: ApiUrlOpt = None, as_json: JsonOpt = False) -> None:
    """This node's routing layer: policy, instance health counts, requests, retries, resumptions."""
    _show(lambda: _get(api_url, "/api/v1/proxy/status"), status_table, as_json, False, 1.0)


@proxy_app.command("instances")
def instances(api_url: ApiUrlOpt = None, as_json: JsonOpt = False) -> None:
    """Every node and external instance requests can be routed to, with health and load."""
    _show(lambda: _get(api_url, "/api/v1/proxy/instances", {"instances": list}), instances_table, as_json, False, 1.0)


@proxy_app.command("metrics")
def metrics(
    api_url: ApiUrlOpt = None,
    as_json: JsonOpt = False,
    watch: Annotated[bool, typer.Option("--watch", help="Redraw in place until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between redraws with --watch.")] = 2.0,
) -> None:
    """Routing metrics of this node: requests, latency percentiles, tokens/s, per instance."""
    _show(lambda: _get(api_url, "/api/v1/proxy/metrics", {"instances": dict}), metrics_table, as_json, watch, interval)


@proxy_app.command("add")
def add(url: Annotated[str, typer.Argument(help="Base URL of an Ollama-API server, e.g. http://gpu7:11434.")],
        api_url: ApiUrlOpt = None) -> None:
    """Register an existing Ollama server as an instance: health-checked and routed to by every node."""
    res = cli._client(api_url).json("POST", "/api/v1/proxy/instances", {"url": url})
    if not res.get("added"):
        print(f"{res.get('url')} is registered already")
    elif res.get("healthy"):
        models = res.get("models")
        print(f"added {res.get('url')}: healthy, {len(models) if isinstance(models, list) else '?'} model(s)")
    else:
        print(f"added {res.get('url')}: not answering yet ({res.get('error')}); it is checked every few seconds")


@proxy_app.command("remove")
def remove(url: Annotated[str, typer.Argument(help="The instance URL as registered.")],
           api_url: ApiUrlOpt = None) -> None:
    """Stop routing to an external instance."""
    cli._client(api_url).json("DELETE", "/api/v1/proxy/instances", {"url": url})
    print(f"removed {url}")


def scale(model: Annotated[str, typer.Argument(help="Model name.")],
          replicas: Annotated[int, typer.Option("--replicas", help="Replicas to keep loaded (0 = on demand).")],
          label: Annotated[list[str] | None, typer.Option(
              "--label", help="KEY=VALUE node label the replicas require (repeat; --label '' clears).")] = None,
          api_url: ApiUrlOpt = None) -> None:
    """Set a model's desired replicas; the region leader places them on nodes and keeps them placed."""
    body: dict[str, Any] = {"model": model, "replicas": replicas}
    if label is not None:
        pairs = [x for x in label if x]
        bad = [x for x in pairs if "=" not in x or not x.split("=", 1)[0]]
        if bad:
            raise cli.CliError(f"--label takes KEY=VALUE, got {bad[0]!r}")
        body["labels"] = dict(x.split("=", 1) for x in pairs)
    res = cli._client(api_url).json("POST", "/api/v1/models/scale", body)
    where = ", ".join(f"{k}={v}" for k, v in cli.obj(res.get("labels")).items())
    print(f"{res.get('model')}: {res.get('replicas')} replica(s) desired" + (f" on nodes labelled {where}" if where
                                                                              else ""))


def register(module: Any, app: typer.Typer, model_app: typer.Typer) -> None:
    """cli.py calls this with itself: its helpers and errors must be the running copy's (it may be __main__)."""
    global cli
    cli = module
    app.add_typer(proxy_app, name="proxy")
    model_app.command("scale")(scale)
