"""Routing-layer management over HTTP: proxy status, instances, metrics, external instances, model replicas,
Raft leadership. The `omx proxy` / `omx model` CLI and the console are clients of these routes."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from omx.node.app import cluster_tags, json_response
from omx.node.router import ROUTER, Router, Target, UpstreamError, model_key
from omx.node.scheduler import SELECTOR_PREFIX
from omx.protocols.api import ApiError, load_json

MAX_EXTERNALS = 64


def _router(request: web.Request) -> Router:
    r = request.app[ROUTER]
    if r.cluster.swim is None:
        raise ApiError(503, "this node is not part of a cluster yet")
    return r


async def proxy_status(request: web.Request) -> web.Response:
    r = _router(request)
    inst = r.instances()
    healthy = sum(1 for i in inst if i["status"] == "healthy")
    return json_response({
        "node": r.cluster.id, "region": r.cfg.region, "policy": r.cfg.routing_policy,
        "instances": {"total": len(inst), "healthy": healthy, "unhealthy": len(inst) - healthy},
        "requests": {"total": r.requests_total, "inflight": r.inflight, "retries": r.retries_total,
                     "resumes": r.resumes_total},
    })


async def proxy_instances(request: web.Request) -> web.Response:
    return json_response({"instances": _router(request).instances()})


async def proxy_metrics(request: web.Request) -> web.Response:
    return json_response(_router(request).metrics())


def _url_arg(body: Any) -> str:
    url = body.get("url") if isinstance(body, dict) else None
    if not isinstance(url, str) or not url.strip():
        raise ApiError(400, "expected {\"url\": \"http://HOST:PORT\"}")
    url = url.strip().rstrip("/")
    if any(c.isspace() or not c.isprintable() for c in url):  # urlsplit silently drops tabs and newlines
        raise ApiError(400, f"{url!r} is not a valid URL: it contains whitespace or control characters")
    try:
        parts = urlsplit(url)
    except ValueError as e:  # e.g. an unclosed IPv6 bracket: "http://[::1"
        raise ApiError(400, f"{url!r} is not a valid URL: {e}") from None
    if (parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query
            or parts.fragment):
        raise ApiError(400, f"{url!r} is not an instance base URL like http://HOST:11434")
    try:
        _ = parts.port
    except ValueError:
        raise ApiError(400, f"{url!r} has an invalid port") from None
    try:  # urlsplit takes any text as a host; one DNS cannot carry would only ever fail the health checks
        (parts.hostname or "").encode("idna")
    except UnicodeError:
        raise ApiError(400, f"{url!r} has an invalid host name") from None
    return url


async def add_instance(request: web.Request) -> web.Response:
    """Register an existing Ollama server; the list lives in the registry so every node routes to it."""
    r = _router(request)
    url = _url_arg(load_json(await request.read()))
    urls = r.external_urls()
    if url in urls:
        return json_response({"url": url, "added": False, "instances": urls})
    if len(urls) >= MAX_EXTERNALS:
        raise ApiError(400, f"at most {MAX_EXTERNALS} external instances")
    if any(url == m.get("url") for m in r.instances() if m["kind"] == "node"):
        raise ApiError(400, f"{url} is a member of this cluster already")
    urls = [*urls, url]
    await r.cluster.registry_write("set_setting", "external_instances", urls)
    r.cluster.reg.setdefault("settings", {})["external_instances"] = urls
    await r._check_external(url)
    ext = r.externals.get(url)
    return json_response({"url": url, "added": True, "healthy": bool(ext and ext.healthy),
                          "models": ext.models if ext else [], "error": ext.last_error if ext else None})


async def remove_instance(request: web.Request) -> web.Response:
    r = _router(request)
    raw = await request.read()
    body = load_json(raw) if raw.strip() else {"url": request.query.get("url")}
    url = _url_arg(body)
    urls = r.external_urls()
    if url not in urls:
        raise ApiError(404, f"no external instance {url}")
    urls = [u for u in urls if u != url]
    await r.cluster.registry_write("set_setting", "external_instances", urls or None)
    r.cluster.reg.setdefault("settings", {})["external_instances"] = urls
    r.externals.pop(url, None)
    return json_response({"url": url, "removed": True})


async def list_models(request: web.Request) -> web.Response:
    """The cluster's models with desired replicas (registry) and where each is loaded now (gossip)."""
    r = _router(request)
    catalog = r.cluster.reg.get("models", {})
    placements = r.cluster.reg.get("placements", {})
    loaded_on: dict[str, list[str]] = {}
    fetching: dict[str, list[dict[str, Any]]] = {}
    for m in r.cluster.swim.members() if r.cluster.swim else []:
        if m.state == "alive":
            meta = m.meta or {}
            for name in meta.get("models") or []:
                loaded_on.setdefault(model_key(name), []).append(m.id)
            f = meta.get("fetching")
            for key, fig in (f.items() if isinstance(f, dict) else ()):
                if isinstance(fig, list) and len(fig) == 2 and all(isinstance(x, int) for x in fig):
                    fetching.setdefault(key, []).append({"node": m.id, "completed": fig[0], "total": fig[1]})
    out = []
    for tag in await cluster_tags(request):
        key = model_key(tag["name"])
        rec = catalog.get(key, {})
        out.append({"name": tag["name"], "digest": tag.get("digest"), "size": tag.get("size"),
                    "replicas": int(rec.get("desired_replicas", 0)), "actual": len(loaded_on.get(key, [])),
                    "nodes": sorted(loaded_on.get(key, [])), "placed": placements.get(key, []),
                    "labels": r.cluster.reg.get("settings", {}).get(SELECTOR_PREFIX + key) or {},
                    "transfers": sorted(fetching.pop(key, []), key=lambda t: t["node"])})
    for key, transfers in sorted(fetching.items()):  # being pulled from a registry: in no store yet
        out.append({"name": key, "digest": None, "size": transfers[0]["total"], "replicas": 0, "actual": 0,
                    "nodes": [], "placed": placements.get(key, []), "labels": {},
                    "transfers": sorted(transfers, key=lambda t: t["node"])})
    return json_response({"models": out})


async def scale_model(request: web.Request) -> web.Response:
    """Desired replicas for a model; the region leader's scheduler places them (0 = load on demand)."""
    r = _router(request)
    body = load_json(await request.read())
    name = body.get("model") if isinstance(body, dict) else None
    replicas = body.get("replicas") if isinstance(body, dict) else None
    if not isinstance(name, str) or not name:
        raise ApiError(400, "expected {\"model\": NAME, \"replicas\": N}")
    if isinstance(replicas, bool) or not isinstance(replicas, int) or not 0 <= replicas <= 64:
        raise ApiError(400, "'replicas' must be an integer from 0 to 64")
    selector = body.get("labels")
    if selector is not None and (not isinstance(selector, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in selector.items())):
        raise ApiError(400, "'labels' must be an object of string node labels the replicas require")
    key = model_key(name)
    tag = next((t for t in await cluster_tags(request) if model_key(t["name"]) == key), None)
    if tag is None:
        raise ApiError(404, f"model '{name}' not found")
    digest = str(tag.get("digest", ""))
    info = {"digest": digest if digest.startswith("sha256:") else f"sha256:{digest}",
            "size": int(tag.get("size") or 0), "desired_replicas": replicas}
    if selector is not None:  # {} clears it
        skey = SELECTOR_PREFIX + key
        if selector or skey in r.cluster.reg.get("settings", {}):
            await r.cluster.registry_write("set_setting", skey, selector or None)
    res = await r.cluster.registry_write("put_model", key, info)
    r.cluster.reg.setdefault("models", {})[key] = {**info, "version": res.get("version")}
    r.events.publish("model.scaled", model=key, replicas=replicas)
    return json_response({"model": key, "replicas": replicas, "labels": selector or {}, **res})


TRANSFER_TRIES = 4  # × 5 s: how long the leader keeps offering leadership to a voter that is catching up


async def transfer_leader(request: web.Request) -> web.Response:
    """Move the region's Raft leadership (before maintenance on the leader), optionally to a given node."""
    r = _router(request)
    c = r.cluster
    raw = await request.read()
    body = load_json(raw) if raw.strip() else {}
    if not isinstance(body, dict):
        raise ApiError(400, "expected {\"region\": R, \"to\": NODE_ID} (both optional)")
    region = body.get("region") or c.cfg.region
    to = body.get("to")
    if not isinstance(region, str) or (to is not None and not isinstance(to, str)):
        raise ApiError(400, "'region' and 'to' must be strings")
    leader = c.leaders().get(region)
    if leader is None:
        raise ApiError(503, f"region {region!r} has no Raft leader right now")
    to_addr = None
    if to:
        m = c.swim.get(to) if c.swim else None
        raft = ((m.meta or {}).get("raft") or {}) if m else {}
        if m is None or (m.meta or {}).get("region") != region or not raft.get("addr"):
            raise ApiError(400, f"{to} is not a Raft voter of region {region!r}")
        if to == leader["id"]:
            return json_response({"region": region, "leader": to, "moved": False})
        to_addr = raft["addr"]
    if leader["id"] != c.id:
        if r.is_routed(request):
            raise ApiError(503, "leadership is moving; try again")  # never bounce between stale views
        t = Target(leader["id"], leader["api_addr"], "node", leader["id"], region, False, 0.0)
        try:
            return json_response(await r.call(t, "POST", "/api/v1/cluster/leader/transfer",
                                              {"region": region, "to": to}, limit_s=TRANSFER_TRIES * 5.0 + 10.0))
        except UpstreamError as e:
            raise ApiError(e.status if e.status < 500 else 502, e.message) from None
    if c.registry is None or not c.registry.is_leader:
        raise ApiError(503, "leadership is moving already; try again")
    # pysyncobj only hands over to a voter that has caught up; a busy one may need another try
    for _ in range(TRANSFER_TRIES):
        if await c.registry.transfer_leadership(to_addr, timeout=5.0) or not c.registry.is_leader:
            break
    new = c.registry.status().get("leader")
    if not c.registry.is_leader and to_addr is not None and new not in (None, to_addr) and not body.get("again"):
        # We stepped down, but a third voter's election timer fired before the target's (a busy machine): ask
        # the new leader, once, to hand over to the target.
        moved = await _ask_again(r, region, to, new)
        if moved is not None:
            return json_response(moved)
    if c.registry.is_leader or (to_addr is not None and new != to_addr):
        raise ApiError(503, f"the leader could not hand over to {to_addr or 'another voter'} within "
                            f"{TRANSFER_TRIES * 5} s "
                            f"(no caught-up voter?); leader now {new}")
    c.events.publish("raft.leader_transfer", region=region, from_=c.id, to=new)
    return json_response({"region": region, "moved": True, "leader_raft_addr": new})


async def _ask_again(r: Router, region: str, to: str, leader_addr: str) -> dict[str, Any] | None:
    """The transfer request, sent once to the voter that won instead of the target; None if it cannot be asked
    or fails (the caller then answers with its own error)."""
    c = r.cluster
    nid = c._id_of_raft(leader_addr)
    m = c.swim.get(nid) if nid and c.swim else None
    api = (m.meta or {}).get("api") if m else None
    if not nid or not isinstance(api, str):
        return None
    t = Target(nid, api, "node", nid, region, False, 0.0)
    try:
        return await r.call(t, "POST", "/api/v1/cluster/leader/transfer", {"region": region, "to": to, "again": True},
                            limit_s=TRANSFER_TRIES * 5.0 + 10.0)
    except UpstreamError:
        return None


def add_proxy_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/v1/proxy/status", proxy_status)
    r.add_get("/api/v1/proxy/instances", proxy_instances)
    r.add_post("/api/v1/proxy/instances", add_instance)
    r.add_delete("/api/v1/proxy/instances", remove_instance)
    r.add_get("/api/v1/proxy/metrics", proxy_metrics)
    r.add_get("/api/v1/models", list_models)
    r.add_post("/api/v1/models/scale", scale_model)
    r.add_post("/api/v1/cluster/leader/transfer", transfer_leader)
