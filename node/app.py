"""The node's aiohttp application: Ollama's native routes, the OpenAI layer, and the plumbing they share."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError, HttpProcessingError

from omx.models.names import InvalidModelName, ModelName, parse_digest
from omx.models.store import DigestMismatch, ModelNotFound, Store
from omx.node import inference
from omx.node.config import NodeConfig
from omx.node.inference import Inference, Resume
from omx.node.metrics import MODEL_KEY, TOKENS_KEY, TTFT_KEY
from omx.node.router import RESUME_FIELD, ROUTER, model_key
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
    keep_alive_seconds,
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
    except web.HTTPNotFound:
        return web.Response(status=404, text="404 page not found")
    except web.HTTPMethodNotAllowed:
        return web.Response(status=405, text="405 method not allowed")
    except Exception as e:
        return failure_response(request, e, error_response)


def failure_response(
    request: web.Request, e: Exception, shape: Callable[[int, str], web.Response],
) -> web.Response:
    """A handler's failure as an answer in `shape` (Ollama's, or OpenAI's for /v1); call it from the `except`
    block. What aiohttp answers itself (its HTTP exceptions) and a client that went away are raised again."""
    if isinstance(e, ApiError):
        resp = shape(e.status, e.message)
        if e.status == 503:
            resp.headers["Retry-After"] = "1"  # busy or no replica now: a client may retry shortly
        return resp
    if isinstance(e, web.HTTPRequestEntityTooLarge):
        return shape(413, f"request body too large (limit {request.app[CONFIG].max_body_bytes} bytes)")
    if isinstance(e, web.RequestPayloadError):
        resp = shape(400, payload_error_message(request, e))
        resp.force_close()
        return resp
    if isinstance(e, web.HTTPException | ConnectionResetError):
        raise e
    log.exception("unhandled error on %s %s", request.method, request.path)
    return shape(500, f"internal error: {type(e).__name__}")


def payload_error_message(request: web.Request, e: web.RequestPayloadError) -> str:
    """What was wrong with a body aiohttp could not read (bad gzip/deflate data, broken chunking): a 400.

    The rest of that body cannot be framed, so the caller closes the connection; marking the stream finished
    stops aiohttp from reading the broken body again after the answer (and logging that as unhandled).
    """
    request.content.feed_eof()
    cause = e.__cause__
    if isinstance(cause, ContentEncodingError):
        encoding = request.headers.get("Content-Encoding", "").strip()
        return f"request body is not valid {encoding} data (Content-Encoding: {encoding})"
    if isinstance(cause, HttpProcessingError) and cause.message:
        return f"invalid request body: {cause.message}"
    return "invalid request body"


NAME_MAX = 255  # bytes in one path component on Linux file systems: each part of a name is one


def storable(name: ModelName) -> bool:
    """Whether the store can hold a model of this name (a valid name's host may be longer than a file name)."""
    return all(len(part.encode()) <= NAME_MAX for part in name.parts())


@functools.lru_cache(maxsize=256)  # parsing an address costs more than the rest of a routed request's checks
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
        merged = await collect(first, rest, merge)
        _count_tokens(request, merged)
        return json_response(merged)
    resp, last = await write_ndjson(request, first, rest)
    _count_tokens(request, last)
    return resp


async def collect(
    first: dict[str, Any], rest: AsyncIterator[dict[str, Any]], merge: Callable[[list[dict[str, Any]]], dict[str, Any]]
) -> dict[str, Any]:
    """A generation's chunks as one answer (`merge_generate` / `merge_chat`); an error chunk fails it with a 500
    (native and OpenAI routes, when not streaming)."""
    chunks = [first]
    try:
        async for c in rest:
            chunks.append(c)
            if "error" in c:
                raise ApiError(500, c["error"])
    finally:
        await rest.aclose()  # type: ignore[attr-defined]
    if "error" in first:
        raise ApiError(500, first["error"])
    return merge(chunks)


async def write_ndjson(
    request: web.Request, first: dict[str, Any], rest: AsyncIterator[dict[str, Any]]
) -> tuple[web.StreamResponse, dict[str, Any]]:
    """Stream `first` and then `rest` as NDJSON, one object a line as it comes; returns the response and the
    last object written."""
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    last = first
    try:
        await resp.write(_line(first))
        async for c in rest:
            await resp.write(_line(c))
            last = c
    finally:
        await rest.aclose()  # type: ignore[attr-defined]
    await resp.write_eof()
    return resp, last


def _count_tokens(request: web.Request, final: dict[str, Any]) -> None:
    if final.get("done"):
        request[TOKENS_KEY] = (int(final.get("prompt_eval_count", 0)), int(final.get("eval_count", 0)))


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def merge_generate(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(chunks[-1])
    out["response"] = "".join(c.get("response", "") for c in chunks)
    return _join_logprobs(out, chunks)


def merge_chat(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(chunks[-1])
    content = "".join(c.get("message", {}).get("content", "") for c in chunks)
    out["message"] = {"role": "assistant", "content": content}
    return _join_logprobs(out, chunks)


def _join_logprobs(out: dict[str, Any], chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """Each chunk carries the entries of its own tokens; the whole answer carries them all, in order."""
    entries = [e for c in chunks for e in (c.get("logprobs") or ())]
    if entries:
        out["logprobs"] = entries
    return out


# ---- native routes -------------------------------------------------------------------------------

async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


async def version(request: web.Request) -> web.Response:
    return json_response({"version": OLLAMA_API_VERSION, "omx_version": VERSION})


def has_model(request: web.Request, raw: str | None, routing: bool = False) -> bool:
    """Whether this node's store holds the model; `routing`: a recent answer will do (see Cluster.holds)."""
    try:
        if routing:
            return bool(raw) and request.app[ROUTER].cluster.holds(raw or "")
        return bool(raw) and request.app[STORE].exists(raw or "")
    except (InvalidModelName, ValueError):
        return False


def _generate_text(c: dict[str, Any]) -> str:
    return str(c.get("response", ""))


def _chat_text(c: dict[str, Any]) -> str:
    return str((c.get("message") or {}).get("content", ""))


def route_generate(request: web.Request, req: GenerateRequest, raw: bytes | None = None
                   ) -> AsyncIterator[dict[str, Any]]:
    """/api/generate chunks from the best replica in the cluster (native and OpenAI routes share this)."""
    eng = request.app[INFER]
    router = request.app[ROUTER]
    if router.is_routed(request):
        return inference.generate(eng, req, _resume(raw))
    body = json.loads(raw) if raw is not None else req.model_dump(exclude_none=True, by_alias=True)
    if not req.prompt and not req.images and keep_alive_seconds(req.keep_alive) == 0:
        return unload_everywhere(request, "/api/generate", body, req.model or "",
                                 lambda: inference.generate(eng, req))
    return router.stream("/api/generate", body, req.model or "", has_model(request, req.model, routing=True),
                         lambda resume: inference.generate(eng, req, resume), _generate_text,
                         prefix=(req.system or "") + (req.prompt or "")[:512])


def route_chat(request: web.Request, req: ChatRequest, raw: bytes | None = None) -> AsyncIterator[dict[str, Any]]:
    eng = request.app[INFER]
    router = request.app[ROUTER]
    if router.is_routed(request):
        return inference.chat(eng, req, _resume(raw))
    body = json.loads(raw) if raw is not None else req.model_dump(exclude_none=True, by_alias=True)
    if not req.messages and keep_alive_seconds(req.keep_alive) == 0:
        return unload_everywhere(request, "/api/chat", body, req.model or "", lambda: inference.chat(eng, req))
    prefix = "".join(str(m.content or "") for m in (req.messages or [])[:4])[:512]
    return router.stream("/api/chat", body, req.model or "", has_model(request, req.model, routing=True),
                         lambda resume: inference.chat(eng, req, resume), _chat_text, prefix=prefix)


def _resume(raw: bytes | None) -> Resume | None:
    if raw is None:
        return None
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    return Resume.from_json(obj.get(RESUME_FIELD)) if isinstance(obj, dict) else None


async def unload_everywhere(
    request: web.Request, path: str, body: dict[str, Any], raw_model: str,
    local: Callable[[], AsyncIterator[dict[str, Any]]],
) -> AsyncIterator[dict[str, Any]]:
    """keep_alive 0 unloads the model on every node that has it loaded, not just the one asked."""
    answers, errors = await request.app[ROUTER].on_holders(raw_model, "models", "POST", path,
                                                           {**body, "stream": False})
    first: dict[str, Any] | None = None
    if has_model(request, raw_model) or not (answers or errors):  # no peer had it loaded: the local path answers
        async for c in local():
            first = first or c
    if first is None:
        first = next((a for a in answers if isinstance(a, dict)), None)
    if first is None:
        err = errors[0][1] if errors else None
        raise ApiError(err.status if err else 404, err.message if err else f"model '{raw_model}' not found")
    yield first


async def api_generate(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    req = GenerateRequest.parse(raw)
    request[MODEL_KEY] = req.model
    return await respond_stream(request, route_generate(request, req, raw), req.stream is not False, merge_generate)


async def api_chat(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    req = ChatRequest.parse(raw)
    request[MODEL_KEY] = req.model
    return await respond_stream(request, route_chat(request, req, raw), req.stream is not False, merge_chat)


async def api_embed(request: web.Request) -> web.Response:
    raw = await request.read()
    req = EmbedRequest.parse(raw)
    request[MODEL_KEY] = req.model
    eng = request.app[INFER]
    router = request.app[ROUTER]
    if router.is_routed(request):
        return json_response(await inference.embed(eng, req))
    res = await router.forward_json(req.model or "", "/api/embed", json.loads(raw),
                                    has_model(request, req.model, routing=True),
                                    lambda: inference.embed(eng, req))
    return json_response(res)


async def api_embeddings(request: web.Request) -> web.Response:
    raw = await request.read()
    req = EmbeddingsRequest.parse(raw)
    eng = request.app[INFER]
    router = request.app[ROUTER]
    if router.is_routed(request):
        return json_response(await inference.embeddings_legacy(eng, req))
    res = await router.forward_json(req.model or "", "/api/embeddings", json.loads(raw),
                                    has_model(request, req.model, routing=True),
                                    lambda: inference.embeddings_legacy(eng, req))
    return json_response(res)


async def _from_peers(request: web.Request, path: str, field_name: str) -> list[tuple[str, dict[str, Any]]]:
    """GET `path` from the peers whose gossip `field_name` covers the cluster (skipped when this request was
    itself routed here)."""
    router = request.app[ROUTER]
    if router.is_routed(request):
        return []
    out = []
    # tags: the fewest peers covering every advertised name; ps: every peer (gossip's "loaded" lags a second)
    targets = router.covering(field_name) if field_name == "have" else router.peers()
    for t, res, err in await router.fanout(targets, "GET", path):
        if err is None and isinstance(res, dict):
            out.append((t.id, res))
        else:
            log.info("%s %s: %s", t.id, path, err.message if err else "not a JSON object")
    return out


async def api_tags(request: web.Request) -> web.Response:
    return json_response({"models": await cluster_tags(request)})


async def cluster_tags(request: web.Request) -> list[dict[str, Any]]:
    """The cluster's models: every live node's store, one entry per name (the newest copy)."""
    store = request.app[STORE]
    entries = await asyncio.to_thread(store.list_models)
    by_name = {e["name"]: e for e in (tag_entry(e) for e in entries)}
    for _nid, res in await _from_peers(request, "/api/tags", "have"):
        for m in res.get("models") or []:
            if isinstance(m, dict) and isinstance(m.get("name"), str):
                cur = by_name.get(m["name"])
                if cur is None or str(m.get("modified_at", "")) > str(cur.get("modified_at", "")):
                    by_name[m["name"]] = m
    return sorted(by_name.values(), key=lambda m: str(m.get("modified_at", "")), reverse=True)


def tag_entry(e: Any) -> dict[str, Any]:
    name = e.name.display_shortest()
    return {"name": name, "model": name, "modified_at": rfc3339(e.modified_at, local=True), "size": e.size,
            "digest": e.digest, "details": e.details}


async def api_show(request: web.Request) -> web.Response:
    raw = await request.read()
    req = ModelRef.parse(raw)
    eng = request.app[INFER]
    router = request.app[ROUTER]

    async def local() -> dict[str, Any]:
        m = eng.resolve(req.ref, missing_status=400, missing_msg="model is required")
        info = await asyncio.to_thread(request.app[STORE].show, m, req.verbose)
        info["modified_at"] = rfc3339(m.modified_at, local=True)
        return info

    if router.is_routed(request) or has_model(request, req.ref) or not req.ref:
        return json_response(await local())
    return json_response(await router.forward_json(req.ref, "/api/show", json.loads(raw), False, local))


async def api_ps(request: web.Request) -> web.Response:
    """Models loaded on every live node; `node` names where (an omx extension)."""
    runners = request.app[RUNNERS]
    runners.reap_dead()
    me = request.app[ROUTER].cluster.id
    out = []
    for r in runners.runners.values():
        expires = r.expires_at if r.expires_at != float("inf") else time.time() + 10 * 365 * 86400
        if r.inflight and r.expires_at == float("inf") and r.keep_alive != float("inf"):
            expires = time.time() + r.keep_alive
        vram = r.info.get("param_bytes", 0) if str(r.info.get("device", "cpu")).startswith("cuda") else 0
        out.append({"name": r.spec.name, "model": r.spec.name, "size": r.spec.size, "digest": r.spec.digest,
                    "details": r.spec.details, "expires_at": rfc3339(expires, local=True), "size_vram": vram,
                    "context_length": r.spec.num_ctx, "node": me})
    for nid, res in await _from_peers(request, "/api/ps", "models"):
        for m in res.get("models") or []:
            if isinstance(m, dict):
                out.append({**m, "node": m.get("node") or nid})
    out.sort(key=lambda x: str(x.get("expires_at", "")), reverse=True)
    return json_response({"models": out})


async def _on_holders(request: web.Request, raw_model: str, method: str, path: str, body: dict[str, Any]
                      ) -> tuple[int, list[str]]:
    """Apply a store action on every other node holding the model: (successes, error messages)."""
    router = request.app[ROUTER]
    if router.is_routed(request):
        return 0, []
    answers, errors = await router.on_holders(raw_model, "have", method, path, body)
    return len(answers), [f"{t.id}: {err.message}" for t, err in errors if err.status != 404]


async def api_copy(request: web.Request) -> web.Response:
    """Copies the model on every node that holds it, so the new name is served wherever the old one is."""
    raw = await request.read()
    req = CopyRequest.parse(raw)
    try:
        src = ModelName.parse(req.source)
    except InvalidModelName:
        raise ApiError(400, f'source "{req.source}" is invalid') from None
    try:
        dst = ModelName.parse(req.destination)
    except InvalidModelName:
        raise ApiError(400, f'destination "{req.destination}" is invalid') from None
    if not storable(dst):
        raise ApiError(400, f'destination "{req.destination}" is invalid')
    local_ok = False
    if has_model(request, req.source):
        try:
            await asyncio.to_thread(request.app[STORE].copy, src, dst)
            local_ok = True
        except ModelNotFound:
            pass
    remote_ok, errors = await _on_holders(request, req.source, "POST", "/api/copy", json.loads(raw))
    if not local_ok and not remote_ok:
        if errors:
            raise ApiError(502, "; ".join(errors))
        raise ApiError(404, f'model "{req.source}" not found')
    request.app[ROUTER].cluster.store_changed()
    return web.Response(status=200)


async def api_delete(request: web.Request) -> web.Response:
    """Deletes the model from every node that holds it (and unloads it there first)."""
    raw = await request.read()
    req = ModelRef.parse(raw)
    ref = req.ref
    try:
        name = ModelName.parse(ref)
    except InvalidModelName:
        raise ApiError(400, f'name "{ref}" is invalid') from None
    store = request.app[STORE]
    local_ok = False
    try:
        digest = await asyncio.to_thread(store.manifest_digest, name)
        await request.app[RUNNERS].unload_key(digest)
        await asyncio.to_thread(store.delete, name)
        local_ok = True
    except ModelNotFound:
        pass
    remote_ok, errors = await _on_holders(request, ref, "DELETE", "/api/delete", json.loads(raw))
    if not local_ok and not remote_ok:
        if errors:
            raise ApiError(502, "; ".join(errors))
        raise ApiError(404, f"model '{ref}' not found")
    router = request.app[ROUTER]
    router.cluster.store_changed()
    if not router.is_routed(request) and model_key(ref) in router.cluster.reg.get("models", {}):
        try:
            await router.cluster.registry_write("delete_model", model_key(ref))
        except ApiError as e:
            log.warning("deleted %s from the nodes but not from the registry catalog: %s", ref, e.message)
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
    try:
        unstorable = not storable(ModelName.parse(req.ref))
    except InvalidModelName:
        unstorable = False  # create's own checks answer a name that does not parse
    if unstorable:
        raise ApiError(400, "invalid model name")  # create's words for a name it cannot parse
    gen = create_mod.create(request.app[STORE], req)
    return await respond_progress(request, _then(gen, request.app[ROUTER].cluster.store_changed),
                                  req.stream is not False)


async def _then(gen: AsyncIterator[dict[str, Any]], done: Callable[[], None]) -> AsyncIterator[dict[str, Any]]:
    """Pass a stream through, then tell `done` (a finished create must be advertised at once)."""
    async for c in gen:
        yield c
    done()


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
    resp, _last = await write_ndjson(request, first, rest)
    return resp


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
    r.add_route("HEAD", "/api/blobs/{digest}", blob_head)
    r.add_post("/api/blobs/{digest}", blob_post)
