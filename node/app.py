"""The node's aiohttp application: Ollama's native routes, the OpenAI layer, and the plumbing they share."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from omx.models.names import InvalidModelName, ModelName, parse_digest
from omx.models.store import DigestMismatch, ModelNotFound, Store
from omx.node import inference
from omx.node.config import NodeConfig
from omx.node.inference import Inference
from omx.node.metrics import MODEL_KEY, TOKENS_KEY, TTFT_KEY
from omx.node.runners import RunnerManager
from omx.protocols.api import (
    ApiError,
    ChatRequest,
    CopyRequest,
    CreateRequest,
    EmbeddingsRequest,
    EmbedRequest,
    GenerateRequest,
    ModelRef,
    rfc3339,
)

log = logging.getLogger("omx.node")

VERSION = "0.1.0"
OLLAMA_API_VERSION = "0.33.0"  # the Ollama release whose API we match; clients gate features on it

CONFIG = web.AppKey("config", NodeConfig)
STORE = web.AppKey("store", Store)
RUNNERS = web.AppKey("runners", RunnerManager)
INFER = web.AppKey("inference", Inference)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode(),
        status=status,
        content_type="application/json",
        charset="utf-8",
    )


def error_response(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status)


# ---- middlewares ---------------------------------------------------------------------------------

@web.middleware
async def errors_mw(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes Ollama's error shape; nothing reaches the client as a traceback."""
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(e.status, e.message)
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, f"request body too large (limit {request.app[CONFIG].max_body_bytes} bytes)")
    except web.HTTPNotFound:
        return web.Response(status=404, text="404 page not found")
    except web.HTTPMethodNotAllowed:
        return web.Response(status=405, text="405 method not allowed")
    except web.HTTPException:
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as e:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, f"internal error: {type(e).__name__}")


def _host_allowed(host_header: str) -> bool:
    host = host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header
    host = host.strip("[]").lower()
    if host in ("", "localhost", socket.gethostname().lower()):
        return True
    if host.endswith((".localhost", ".local", ".internal")):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private or ip.is_unspecified


def make_host_check(cfg: NodeConfig) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Ollama's DNS-rebinding guard: on a loopback bind, only local Host headers are served."""
    try:
        loopback = ipaddress.ip_address(cfg.host).is_loopback
    except ValueError:
        loopback = cfg.host == "localhost"

    @web.middleware
    async def host_check_mw(request: web.Request, handler: Handler) -> web.StreamResponse:
        if loopback and not _host_allowed(request.headers.get("Host", "")):
            return web.Response(status=403)
        return await handler(request)

    return host_check_mw


# ---- streaming helpers ---------------------------------------------------------------------------

async def respond_stream(
    request: web.Request, gen: AsyncIterator[dict[str, Any]], stream: bool, merge: Callable[..., dict[str, Any]]
) -> web.StreamResponse:
    """NDJSON when streaming, one merged object otherwise; errors before output keep their status."""
    t0 = time.perf_counter()
    first, rest = await inference.first_and_rest(gen)
    if first is None:
        raise ApiError(500, "no response from model")
    request[TTFT_KEY] = time.perf_counter() - t0
    if first.get("done") and first.get("done_reason") in ("load", "unload"):
        return json_response(first)  # Ollama answers load/unload with one object even when streaming
    if not stream:
        chunks = [first]
        async for c in rest:
            chunks.append(c)
            if "error" in c:
                return error_response(500, c["error"])
        if "error" in first:
            return error_response(500, first["error"])
        _count_tokens(request, chunks[-1])
        return json_response(merge(chunks))
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    try:
        await resp.write(_line(first))
        last = first
        async for c in rest:
            await resp.write(_line(c))
            last = c
        _count_tokens(request, last)
    finally:
        await rest.aclose()  # type: ignore[attr-defined]
    await resp.write_eof()
    return resp


def _count_tokens(request: web.Request, final: dict[str, Any]) -> None:
    if final.get("done"):
        request[TOKENS_KEY] = (int(final.get("prompt_eval_count", 0)), int(final.get("eval_count", 0)))


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def merge_generate(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(chunks[-1])
    out["response"] = "".join(c.get("response", "") for c in chunks)
    return out


def merge_chat(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(chunks[-1])
    content = "".join(c.get("message", {}).get("content", "") for c in chunks)
    out["message"] = {"role": "assistant", "content": content}
    return out


# ---- native routes -------------------------------------------------------------------------------

async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


async def version(request: web.Request) -> web.Response:
    return json_response({"version": OLLAMA_API_VERSION, "omx_version": VERSION})


async def api_generate(request: web.Request) -> web.StreamResponse:
    req = GenerateRequest.parse(await request.read())
    request[MODEL_KEY] = req.model
    gen = inference.generate(request.app[INFER], req)
    return await respond_stream(request, gen, req.stream is not False, merge_generate)


async def api_chat(request: web.Request) -> web.StreamResponse:
    req = ChatRequest.parse(await request.read())
    request[MODEL_KEY] = req.model
    gen = inference.chat(request.app[INFER], req)
    return await respond_stream(request, gen, req.stream is not False, merge_chat)


async def api_embed(request: web.Request) -> web.Response:
    req = EmbedRequest.parse(await request.read())
    request[MODEL_KEY] = req.model
    return json_response(await inference.embed(request.app[INFER], req))


async def api_embeddings(request: web.Request) -> web.Response:
    req = EmbeddingsRequest.parse(await request.read())
    return json_response(await inference.embeddings_legacy(request.app[INFER], req))


async def api_tags(request: web.Request) -> web.Response:
    store = request.app[STORE]
    entries = await asyncio.to_thread(store.list_models)
    return json_response({"models": [tag_entry(e) for e in entries]})


def tag_entry(e: Any) -> dict[str, Any]:
    name = e.name.display_shortest()
    return {"name": name, "model": name, "modified_at": rfc3339(e.modified_at, local=True), "size": e.size,
            "digest": e.digest, "details": e.details}


async def api_show(request: web.Request) -> web.Response:
    req = ModelRef.parse(await request.read())
    eng = request.app[INFER]
    m = eng.resolve(req.ref, missing_status=400, missing_msg="model is required")
    info = await asyncio.to_thread(request.app[STORE].show, m, req.verbose)
    info["modified_at"] = rfc3339(m.modified_at, local=True)
    return json_response(info)


async def api_ps(request: web.Request) -> web.Response:
    runners = request.app[RUNNERS]
    runners.reap_dead()
    out = []
    for r in runners.runners.values():
        expires = r.expires_at if r.expires_at != float("inf") else time.time() + 10 * 365 * 86400
        if r.inflight and r.expires_at == float("inf") and r.keep_alive != float("inf"):
            expires = time.time() + r.keep_alive
        vram = r.info.get("param_bytes", 0) if str(r.info.get("device", "cpu")).startswith("cuda") else 0
        out.append({"name": r.spec.name, "model": r.spec.name, "size": r.spec.size, "digest": r.spec.digest,
                    "details": r.spec.details, "expires_at": rfc3339(expires, local=True), "size_vram": vram,
                    "context_length": r.spec.num_ctx, "_expires": expires})
    out.sort(key=lambda x: x.pop("_expires"), reverse=True)
    return json_response({"models": out})


async def api_copy(request: web.Request) -> web.Response:
    req = CopyRequest.parse(await request.read())
    try:
        src = ModelName.parse(req.source)
    except InvalidModelName:
        raise ApiError(400, f'source "{req.source}" is invalid') from None
    try:
        dst = ModelName.parse(req.destination)
    except InvalidModelName:
        raise ApiError(400, f'destination "{req.destination}" is invalid') from None
    try:
        await asyncio.to_thread(request.app[STORE].copy, src, dst)
    except ModelNotFound:
        raise ApiError(404, f'model "{req.source}" not found') from None
    return web.Response(status=200)


async def api_delete(request: web.Request) -> web.Response:
    req = ModelRef.parse(await request.read())
    ref = req.ref
    try:
        name = ModelName.parse(ref)
    except InvalidModelName:
        raise ApiError(400, f'name "{ref}" is invalid') from None
    store = request.app[STORE]
    try:
        digest = await asyncio.to_thread(store.manifest_digest, name)
    except ModelNotFound:
        raise ApiError(404, f"model '{ref}' not found") from None
    await request.app[RUNNERS].unload_key(digest)
    try:
        await asyncio.to_thread(store.delete, name)
    except ModelNotFound:
        raise ApiError(404, f"model '{ref}' not found") from None
    return web.Response(status=200)


def _digest_param(request: web.Request) -> str:
    try:
        return parse_digest(request.match_info["digest"])
    except ValueError:
        raise ApiError(400, "invalid digest format") from None


async def blob_head(request: web.Request) -> web.Response:
    hexd = _digest_param(request)
    if request.app[STORE].has_blob(hexd):
        return web.Response(status=200)
    raise ApiError(404, f'blob "sha256:{hexd}" not found')


async def blob_post(request: web.Request) -> web.Response:
    hexd = _digest_param(request)
    store = request.app[STORE]
    if store.has_blob(hexd):
        await request.release()
        return web.Response(status=200)
    writer = await asyncio.to_thread(store.begin_blob, hexd)
    try:
        async for chunk in request.content.iter_chunked(1 << 20):
            await asyncio.to_thread(writer.write, chunk)
        await asyncio.to_thread(writer.commit)
    except DigestMismatch as e:
        raise ApiError(400, str(e)) from None
    finally:
        await asyncio.to_thread(writer.abort)
    return web.Response(status=201)


async def api_create(request: web.Request) -> web.StreamResponse:
    from omx.node import create as create_mod

    req = CreateRequest.parse(await request.read())
    gen = create_mod.create(request.app[STORE], req)
    return await respond_progress(request, gen, req.stream is not False)


async def respond_progress(
    request: web.Request, gen: AsyncIterator[dict[str, Any]], stream: bool
) -> web.StreamResponse:
    """Progress streams (create, pull): the last object alone when not streaming."""
    first, rest = await inference.first_and_rest(gen)
    if first is None:
        raise ApiError(500, "no progress")
    if not stream:
        last = first
        async for c in rest:
            last = c
            if "error" in c:
                break
        if "error" in last:
            return error_response(500, last["error"])
        return json_response(last)
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    await resp.write(_line(first))
    async for c in rest:
        await resp.write(_line(c))
    await resp.write_eof()
    return resp


async def api_not_yet(request: web.Request) -> web.Response:
    what = request.path.rsplit("/", 1)[-1]
    await request.read()
    raise ApiError(
        501,
        f"{what} is not available in this version of omx: model distribution between nodes and "
        "registries has not landed yet; create models with /api/create or `omx create`",
    )


def add_native_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/", root)  # add_get also answers HEAD
    r.add_get("/api/version", version)
    r.add_post("/api/generate", api_generate)
    r.add_post("/api/chat", api_chat)
    r.add_post("/api/embed", api_embed)
    r.add_post("/api/embeddings", api_embeddings)
    r.add_get("/api/tags", api_tags)
    r.add_post("/api/show", api_show)
    r.add_get("/api/ps", api_ps)
    r.add_post("/api/copy", api_copy)
    r.add_delete("/api/delete", api_delete)
    r.add_post("/api/create", api_create)
    r.add_post("/api/pull", api_not_yet)
    r.add_post("/api/push", api_not_yet)
    r.add_route("HEAD", "/api/blobs/{digest}", blob_head)
    r.add_post("/api/blobs/{digest}", blob_post)
