"""Cluster HTTP API: membership and registry views, node actions, the event stream, internal writes."""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from omx.node.app import json_response
from omx.node.cluster import Cluster, ClusterStartError
from omx.node.events import EventBus
from omx.protocols.api import ApiError, load_json

CLUSTER = web.AppKey("cluster", Cluster)
EVENTS = web.AppKey("events", EventBus)

HEARTBEAT = 15.0  # seconds between SSE comments, so proxies keep idle streams open


def _cluster(request: web.Request) -> Cluster:
    c = request.app.get(CLUSTER)
    if c is None or c.swim is None:
        raise ApiError(503, "this node is not part of a cluster yet")
    return c


async def get_cluster(request: web.Request) -> web.Response:
    return json_response(_cluster(request).view())


async def get_leader(request: web.Request) -> web.Response:
    c = _cluster(request)
    leaders = c.leaders()
    region = request.query.get("region", c.cfg.region)
    if region not in leaders:
        raise ApiError(503, f"region {region!r} has no Raft leader right now")
    return json_response({**leaders[region], "regions": leaders})


async def node_status(request: web.Request) -> web.Response:
    return json_response(_cluster(request).status())


async def _node_action(request: web.Request, fields: dict[str, object]) -> web.Response:
    c = _cluster(request)
    nid = request.match_info["id"]
    res = await c.registry_write("set_node_fields", nid, fields)
    return json_response({"id": nid, **fields, **res})


async def cordon(request: web.Request) -> web.Response:
    return await _node_action(request, {"cordoned": True})


async def uncordon(request: web.Request) -> web.Response:
    return await _node_action(request, {"cordoned": False, "draining": False})


async def drain(request: web.Request) -> web.Response:
    return await _node_action(request, {"cordoned": True, "draining": True})


async def set_labels(request: web.Request) -> web.Response:
    body = load_json(await request.read())
    labels = body.get("labels") if isinstance(body, dict) else None
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise ApiError(400, "expected {\"labels\": {\"key\": \"value\", ...}} with string keys and values")
    return await _node_action(request, {"labels": labels})


async def remove(request: web.Request) -> web.Response:
    c = _cluster(request)
    nid = request.match_info["id"]
    assert c.swim is not None
    m = c.swim.get(nid)
    if m is not None and m.state in ("alive", "suspect") and request.query.get("force") != "true":
        raise ApiError(409, f"node {nid} is {m.state}; make it leave first (omx node leave) or pass ?force=true")
    # A control node of our region also gives up its Raft vote, first: a node record without a voter is
    # harmless, a voter nobody can see any more counts against quorum.
    raft_addr = request.query.get("raft_addr") or c.raft_addr_of(nid)
    voter: dict[str, object] = {}
    if raft_addr is None:
        record = c.reg.get("nodes", {}).get(nid) or {}
        if record.get("role") == "control" and record.get("region") == c.cfg.region:
            raise ApiError(409, f"{nid} is a control node, but this node never saw its Raft address; pass it: "
                                f"omx node remove {nid} --raft-addr HOST:PORT (?raft_addr=HOST:PORT)")
    elif raft_addr in c.region_voters():
        voter = await c.remove_voter(raft_addr)
    try:
        res = await c.registry_write("remove_node", nid)
    except ApiError as e:
        if e.status != 404 or not voter:
            raise
        res = {"ok": True}  # only the vote was left to remove
    return json_response({"id": nid, "removed": True, **voter, **res})


async def join(request: web.Request) -> web.Response:
    c = _cluster(request)
    body = load_json(await request.read())
    peers = body.get("peers") if isinstance(body, dict) else None
    if not isinstance(peers, list) or not peers or not all(isinstance(p, str) for p in peers):
        raise ApiError(400, "'peers' must be a non-empty list of HOST:PORT gossip addresses")
    try:
        n = await c.join(peers)
    except ClusterStartError as e:
        raise ApiError(502, str(e)) from None
    return json_response({"joined": n, "members": len(c.swim.members()) if c.swim else 0})


async def leave(request: web.Request) -> web.Response:
    c = _cluster(request)
    await c.leave()
    return json_response({"left": True, "id": c.id})


async def internal_registry(request: web.Request) -> web.Response:
    c = _cluster(request)
    c.check_internal_auth(request.headers.get("Authorization"))
    body = load_json(await request.read())
    if not isinstance(body, dict) or not isinstance(body.get("op"), str) or not isinstance(body.get("args"), list):
        raise ApiError(400, "expected {\"op\": str, \"args\": list}")
    if c.registry is None:
        raise ApiError(503, "this node holds no registry (it is a worker)")
    return json_response(await c.registry_write(body["op"], *body["args"]))


async def internal_voters(request: web.Request) -> web.Response:
    """The region leader's end of a voter removal forwarded by another node."""
    c = _cluster(request)
    c.check_internal_auth(request.headers.get("Authorization"))
    body = load_json(await request.read())
    if not isinstance(body, dict) or body.get("op") != "remove" or not isinstance(body.get("addr"), str):
        raise ApiError(400, "expected {\"op\": \"remove\", \"addr\": \"HOST:PORT\"}")
    return json_response(await c.remove_voter_here(body["addr"]))


async def events(request: web.Request) -> web.StreamResponse:
    bus = request.app[EVENTS]
    try:
        after = int(request.headers.get("Last-Event-ID") or request.query.get("after", "0"))
    except ValueError:
        raise ApiError(400, "Last-Event-ID must be an integer") from None
    kinds = [k for k in request.query.get("kinds", "").split(",") if k]
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    await resp.write(b": omx event stream\n\n")
    stream = bus.subscribe(after)
    try:
        while True:
            try:
                ev = await asyncio.wait_for(anext(stream), HEARTBEAT)
            except TimeoutError:
                await resp.write(b": keep-alive\n\n")
                continue
            except StopAsyncIteration:
                break
            if kinds and not any(ev.kind.startswith(k) for k in kinds):
                continue
            await resp.write(ev.sse())
    finally:
        with contextlib.suppress(Exception):
            await stream.aclose()
    return resp


async def registry_snapshot(request: web.Request) -> web.Response:
    return json_response(await _cluster(request).registry_read())


async def recent_events(request: web.Request) -> web.Response:
    bus = request.app[EVENTS]
    return json_response({"events": [e.to_json() for e in bus.history]})


def add_cluster_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/v1/cluster", get_cluster)
    r.add_get("/api/v1/cluster/leader", get_leader)
    r.add_post("/api/v1/cluster/join", join)
    r.add_get("/api/v1/node/status", node_status)
    r.add_post("/api/v1/node/leave", leave)
    r.add_post("/api/v1/nodes/{id}/cordon", cordon)
    r.add_post("/api/v1/nodes/{id}/uncordon", uncordon)
    r.add_post("/api/v1/nodes/{id}/drain", drain)
    r.add_delete("/api/v1/nodes/{id}", remove)
    r.add_put("/api/v1/nodes/{id}/labels", set_labels)
    r.add_get("/api/v1/events", events)
    r.add_get("/api/v1/events/recent", recent_events)
    r.add_get("/api/v1/registry", registry_snapshot)
    r.add_post("/api/v1/internal/registry", internal_registry)
    r.add_post("/api/v1/internal/voters", internal_voters)

