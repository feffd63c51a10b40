"""The console's data layer without a cluster: failover, error text, optional APIs, SSE, metrics maths."""

from __future__ import annotations

import json

import httpx
import pytest

from omx.console.tui.client import (
    ApiError,
    HttpSource,
    Unreachable,
    bucket_quantile,
    parse_prometheus,
    prom_point,
)

pytestmark = pytest.mark.timeout(60)

A, B = "http://10.9.0.1:11434", "http://10.9.0.2:11434"


def view(*alive: str) -> dict:
    members = [{"id": f"n{i}", "status": "alive", "api_addr": u, "region": "default", "role": "control",
                "raft": {"state": "leader" if i == 0 else "follower", "term": 3}, "models": ["m:latest"],
                "meta": {"slots": 4}} for i, u in enumerate(alive)]
    return {"self": "n0", "region": "default", "members": members, "leaders": {"default": {"id": "n0"}}}


def transport(down: set[str], routes: dict[str, object]) -> httpx.MockTransport:
    def handler(req: httpx.Request) -> httpx.Response:
        base = f"{req.url.scheme}://{req.url.host}:{req.url.port}"
        if base in down:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=req)
        body = routes.get(f"{req.method} {req.url.path}")
        if body is None:
            return httpx.Response(404, text="404 page not found")
        if callable(body):
            return body(req)
        return httpx.Response(200, json=body)

    return httpx.MockTransport(handler)


async def test_snapshot_without_optional_apis_derives_instances_and_models() -> None:
    routes = {"GET /api/v1/cluster": view(A, B),
              "GET /api/tags": {"models": [{"name": "m:latest", "digest": "abc", "size": 10}]}}
    src = HttpSource(A, transport=transport(set(), routes))
    snap = await src.snapshot()
    assert [m.id for m in snap.members] == ["n0", "n1"] and snap.leaders == {"default": "n0"}
    assert snap.instances_derived and [i.id for i in snap.instances] == ["n0", "n1"]
    assert snap.models[0].name == "m:latest" and snap.models[0].actual == 2 and snap.models[0].replicas is None
    assert "/api/v1/proxy/instances" in snap.missing and src.known == [A, B]
    await src.close()


async def test_fails_over_to_a_known_member_and_records_it() -> None:
    down: set[str] = set()
    src = HttpSource(A, transport=transport(down, {"GET /api/v1/cluster": view(A, B)}))
    await src.snapshot()
    down.add(A)
    snap = await src.snapshot()
    assert src.url == B and snap.connected == B
    assert src.failovers and src.failovers[0][:2] == (A, B) and "refused" in src.failovers[0][2]
    down.add(B)
    with pytest.raises(Unreachable, match="no cluster member reachable"):
        await src.snapshot()
    await src.close()


async def test_action_errors_carry_the_server_text() -> None:
    def refuse(req: httpx.Request) -> httpx.Response:
        return httpx.Response(409, json={"error": "node n1 is alive; make it leave first"})

    src = HttpSource(A, transport=transport(set(), {"DELETE /api/v1/nodes/n1": refuse}))
    with pytest.raises(ApiError) as e:
        await src.remove_node("n1", force=False)
    assert str(e.value) == "node n1 is alive; make it leave first" and e.value.status == 409
    with pytest.raises(ApiError, match="404 page not found"):
        await src.node_action("n1", "cordon")
    await src.close()


async def test_event_stream_parsing_skips_comments() -> None:
    frames = (": omx event stream\n\n"
              "id: 4\nevent: member.dead\ndata: " + json.dumps({"seq": 4, "kind": "member.dead", "ts": 1.0,
                                                                 "data": {"id": "n2"}}) + "\n\n"
              ": keep-alive\n\n")

    def sse(req: httpx.Request) -> httpx.Response:
        assert req.headers["Last-Event-ID"] == "3"
        return httpx.Response(200, text=frames, headers={"Content-Type": "text/event-stream"})

    src = HttpSource(A, transport=transport(set(), {"GET /api/v1/events": sse}))
    rows = [e async for e in src.events(3)]
    assert [(e.seq, e.kind, e.data) for e in rows] == [(4, "member.dead", {"id": "n2"})]
    await src.close()


async def test_ndjson_error_line_raises() -> None:
    def pull(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text='{"status":"pulling manifest"}\n{"error":"pull model manifest: not found"}\n')

    src = HttpSource(A, transport=transport(set(), {"POST /api/pull": pull}))
    seen = []
    with pytest.raises(ApiError, match="manifest: not found"):
        async for p in src.pull_model("x"):
            seen.append(p)
    assert seen == [{"status": "pulling manifest"}]
    await src.close()


def test_prometheus_rates_and_quantiles() -> None:
    def text(n: float) -> str:
        return "\n".join([
            "# HELP omx_requests_total HTTP requests served",
            f'omx_requests_total{{route="/api/chat",model="m",status="200"}} {n}',
            f'omx_generated_tokens_total{{model="m"}} {10 * n}',
            f'omx_request_duration_seconds_bucket{{route="/api/chat",le="0.1"}} {n / 2}',
            f'omx_request_duration_seconds_bucket{{route="/api/chat",le="1.0"}} {n}',
            f'omx_request_duration_seconds_bucket{{route="/api/chat",le="+Inf"}} {n}'])

    p = prom_point(parse_prometheus(text(10)), parse_prometheus(text(30)), 2.0)
    assert p.requests_per_s == 10.0 and p.tokens_per_s == 100.0
    assert p.p50_ms == pytest.approx(100.0) and 100.0 < (p.p99_ms or 0) <= 1000.0
    assert bucket_quantile(0.5, {}) is None
