"""OpenAI-compatible `/v1` routes, translated onto the native inference generators (as Ollama's middleware does)."""

from __future__ import annotations

import base64
import json
import random
import struct
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from aiohttp import web

from omx.models.names import InvalidModelName, ModelName
from omx.node import inference
from omx.node.app import (
    INFER,
    cluster_tags,
    collect,
    failure_response,
    has_model,
    json_response,
    merge_chat,
    merge_generate,
    route_chat,
    route_generate,
)
from omx.node.metrics import MODEL_KEY
from omx.node.router import ROUTER, model_key
from omx.protocols.api import ApiError, ChatRequest, GenerateRequest, load_json

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error"}


def openai_error(status: int, message: str) -> web.Response:
    return json_response(
        {"error": {"message": message, "type": _ERROR_TYPES.get(status, "api_error"), "param": None, "code": None}},
        status,
    )


def openai_route(fn: Handler) -> Handler:
    """Every failure in OpenAI's error shape (clients parse `error.message`), as errors_mw does for the native one."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await fn(request)
        except Exception as e:
            return failure_response(request, e, openai_error)

    return wrapped


def _body(raw: bytes) -> dict[str, Any]:
    data = load_json(raw)
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    return data


def _typed(data: dict[str, Any], key: str, types: type | tuple[type, ...], what: str) -> Any:
    v = data.get(key)
    if v is None:
        return None
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ApiError(400, f"'{key}' must be {what}")
    if not isinstance(v, types):
        raise ApiError(400, f"'{key}' must be {what}")
    return v


def _options(data: dict[str, Any], top_p_zero_is_one: bool = False) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    max_tokens = _typed(data, "max_tokens", int, "an integer")
    if max_tokens is None:
        max_tokens = _typed(data, "max_completion_tokens", int, "an integer")
    if max_tokens is not None:
        opts["num_predict"] = max_tokens
    for key in ("seed",):
        v = _typed(data, key, int, "an integer")
        if v is not None:
            opts[key] = v
    stop = data.get("stop")
    if isinstance(stop, str):
        opts["stop"] = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        opts["stop"] = stop
    elif stop is not None:
        raise ApiError(400, "'stop' must be a string or a list of strings")
    temp = _typed(data, "temperature", (int, float), "a number")
    opts["temperature"] = 1.0 if temp is None else float(temp)
    top_p = _typed(data, "top_p", (int, float), "a number")
    opts["top_p"] = 1.0 if top_p is None or (top_p_zero_is_one and top_p == 0) else float(top_p)
    for key in ("frequency_penalty", "presence_penalty"):
        v = _typed(data, key, (int, float), "a number")
        if v is not None:
            opts[key] = float(v)
    return opts


def _format(data: dict[str, Any]) -> Any:
    rf = data.get("response_format")
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise ApiError(400, "'response_format' must be an object")
    kind = rf.get("type")
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict):
            raise ApiError(400, "response_format.json_schema must be an object with a 'schema' object")
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise ApiError(400, "response_format.json_schema.schema must be an object")
        return schema
    if kind in (None, "text"):
        return None
    raise ApiError(400, f"invalid response_format type {kind!r}")


def _messages(raw: object) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise ApiError(400, "'messages' must be a list")
    if not raw:
        raise ApiError(400, "[] is too short - 'messages'")
    out = []
    for m in raw:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, "each message must be an object with a string 'role'")
        content = m.get("content")
        text_parts: list[str] = []
        if content is None:
            pass
        elif isinstance(content, str):
            text_parts.append(content)
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    raise ApiError(400, "invalid message content part")
                if part.get("type") == "text":
                    if not isinstance(part.get("text"), str):
                        raise ApiError(400, "a message content part of type 'text' needs a string 'text'")
                    text_parts.append(part["text"])
                elif part.get("type") == "image_url":
                    raise ApiError(400, "image input is not supported by this model")
                else:
                    raise ApiError(400, f"invalid message content type: {part.get('type')!r}")
        else:
            raise ApiError(400, "invalid message content")
        msg: dict[str, Any] = {"role": m["role"], "content": "".join(text_parts)}
        out.append(msg)
    return out


def _usage(final: dict[str, Any]) -> dict[str, int]:
    p, c = int(final.get("prompt_eval_count", 0)), int(final.get("eval_count", 0))
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _finish(reason: str | None) -> str | None:
    return {"stop": "stop", "length": "length"}.get(reason or "", "stop" if reason else None)


def _chat_logprobs(c: dict[str, Any]) -> dict[str, Any]:
    """Chat completions carry Ollama's entries as they are (the shapes match) under `content`."""
    return {"logprobs": {"content": c["logprobs"]}} if c.get("logprobs") else {}


def _completion_logprobs(c: dict[str, Any], offset: list[int]) -> dict[str, Any]:
    """Legacy completions' columns; `offset` carries the text position from chunk to chunk."""
    entries = c.get("logprobs")
    if not entries:
        return {}
    starts, tops = [], []
    for e in entries:
        starts.append(offset[0])
        offset[0] += len(e["token"])
        top: dict[str, float] = {}
        for t in e.get("top_logprobs") or ():  # most likely first: where two tokens read alike, the likelier stays
            top.setdefault(t["token"], t["logprob"])
        tops.append(top)
    return {"logprobs": {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                         "top_logprobs": tops, "text_offset": starts}}


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


async def _stream_sse(
    request: web.Request, first: dict[str, Any], rest: Any, shape: Callable[[dict[str, Any]], list[Any]]
) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    try:
        chunk: dict[str, Any] | None = first
        while chunk is not None:
            if "error" in chunk:
                await resp.write(_sse({"error": {"message": chunk["error"], "type": "api_error",
                                                 "param": None, "code": None}}))
                break
            for ev in shape(chunk):
                await resp.write(_sse(ev))
            chunk = await anext(rest, None)
    finally:
        await rest.aclose()
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


@openai_route
async def chat_completions(request: web.Request) -> web.StreamResponse:
    data = _body(await request.read())
    model = _typed(data, "model", str, "a string") or ""
    messages = _messages(data.get("messages"))
    stream = bool(_typed(data, "stream", bool, "a boolean"))
    include_usage = bool(isinstance(data.get("stream_options"), dict) and data["stream_options"].get("include_usage"))
    request[MODEL_KEY] = model
    native = ChatRequest.model_validate(
        {"model": model, "messages": messages, "stream": stream, "options": _options(data),
         "format": _format(data), "logprobs": bool(_typed(data, "logprobs", bool, "a boolean")),
         "top_logprobs": _typed(data, "top_logprobs", int, "an integer") or 0}
    )
    first, rest = await inference.first_and_rest(route_chat(request, native))
    if first is None:
        raise ApiError(500, "no response from model")
    cid, created = f"chatcmpl-{random.randint(0, 998)}", int(time.time())
    base = {"id": cid, "created": created, "model": model, "system_fingerprint": "fp_ollama"}
    if not stream:
        final = await collect(first, rest, merge_chat)
        return json_response({**base, "object": "chat.completion", "choices": [
            {"index": 0, "message": final["message"], "finish_reason": _finish(final.get("done_reason")),
             **_chat_logprobs(final)}], "usage": _usage(final)})

    def shape(c: dict[str, Any]) -> list[Any]:
        obj = {**base, "object": "chat.completion.chunk"}
        if not c.get("done"):
            return [{**obj, "choices": [{"index": 0, "delta": {"role": "assistant",
                     "content": c["message"]["content"]}, "finish_reason": None, **_chat_logprobs(c)}]}]
        out: list[Any] = [{**obj, "choices": [{"index": 0, "delta": {},
                                               "finish_reason": _finish(c.get("done_reason"))}]}]
        if include_usage:
            out.append({**obj, "choices": [], "usage": _usage(c)})
        return out

    return await _stream_sse(request, first, rest, shape)


@openai_route
async def completions(request: web.Request) -> web.StreamResponse:
    data = _body(await request.read())
    model = _typed(data, "model", str, "a string") or ""
    prompt = data.get("prompt", "")
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string")
    stream = bool(_typed(data, "stream", bool, "a boolean"))
    opts = data.get("stream_options")
    include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
    request[MODEL_KEY] = model
    top = _typed(data, "logprobs", int, "an integer")  # legacy completions: how many alternatives per token
    native = GenerateRequest.model_validate(
        {"model": model, "prompt": prompt, "stream": stream, "options": _options(data, top_p_zero_is_one=True),
         "suffix": _typed(data, "suffix", str, "a string") or "", "logprobs": top is not None,
         "top_logprobs": top or 0}
    )
    if not prompt:
        raise ApiError(400, "'prompt' must not be empty")
    first, rest = await inference.first_and_rest(route_generate(request, native))
    if first is None:
        raise ApiError(500, "no response from model")
    cid, created = f"cmpl-{random.randint(0, 998)}", int(time.time())
    base = {"id": cid, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": "fp_ollama"}
    if not stream:
        final = await collect(first, rest, merge_generate)
        return json_response({**base, "choices": [{"text": final["response"], "index": 0,
                              "finish_reason": _finish(final.get("done_reason")),
                              **_completion_logprobs(final, [0])}], "usage": _usage(final)})
    zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    offset = [0]  # where the next token starts in the text streamed so far

    def shape(c: dict[str, Any]) -> list[Any]:
        extra = {"usage": zero} if include_usage else {}
        if not c.get("done"):
            return [{**base, "choices": [{"text": c["response"], "index": 0, "finish_reason": None,
                                          **_completion_logprobs(c, offset)}], **extra}]
        out: list[Any] = [{**base, "choices": [{"text": "", "index": 0,
                                                "finish_reason": _finish(c.get("done_reason"))}], **extra}]
        if include_usage:
            out.append({**base, "choices": [], "usage": _usage(c)})
        return out

    return await _stream_sse(request, first, rest, shape)


@openai_route
async def embeddings(request: web.Request) -> web.Response:
    data = _body(await request.read())
    model = _typed(data, "model", str, "a string") or ""
    raw = data.get("input")
    if isinstance(raw, str):
        inputs = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
        inputs = raw
    else:
        raise ApiError(400, "invalid input")
    enc = data.get("encoding_format")
    enc = "float" if enc is None or enc == "" else enc
    if not isinstance(enc, str) or enc not in ("float", "base64"):
        raise ApiError(400, f"invalid encoding_format {enc!r}; expected \"float\" or \"base64\"")
    dims = _typed(data, "dimensions", int, "an integer")
    if dims is not None and dims < 1:
        raise ApiError(400, "dimensions must be a positive integer")
    eng = request.app[INFER]
    request[MODEL_KEY] = model

    async def local() -> dict[str, Any]:
        m = eng.resolve(model)
        res = await inference.embed_vectors(eng, m, inputs, eng.options_for(m, None), True, None)
        vectors = [inference.l2_normalize(v[:dims] if dims else v) for v in res["embeddings"]]
        return {"embeddings": vectors, "prompt_eval_count": res.get("prompt_eval_count", 0)}

    native = {"model": model, "input": inputs, **({"dimensions": dims} if dims else {})}
    res = await request.app[ROUTER].forward_json(model, "/api/embed", native,
                                                 has_model(request, model, routing=True), local)
    out = []
    for i, v in enumerate(res.get("embeddings") or []):
        emb: Any = base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if enc == "base64" else v
        out.append({"object": "embedding", "embedding": emb, "index": i})
    n = int(res.get("prompt_eval_count", 0))
    return json_response({"object": "list", "data": out, "model": model,
                          "usage": {"prompt_tokens": n, "total_tokens": n}})


def _model_obj(tag: dict[str, Any], ident: str | None = None) -> dict[str, Any]:
    try:
        created = int(datetime.fromisoformat(str(tag.get("modified_at"))).timestamp())
    except ValueError:
        created = 0
    try:
        owner = ModelName.parse(tag["name"]).namespace
    except InvalidModelName:
        owner = "library"
    return {"id": ident or tag["name"], "object": "model", "created": created, "owned_by": owner}


@openai_route
async def list_models(request: web.Request) -> web.Response:
    return json_response({"object": "list", "data": [_model_obj(t) for t in await cluster_tags(request)]})


@openai_route
async def get_model(request: web.Request) -> web.Response:
    ident = request.match_info["model"]
    try:
        name = ModelName.parse(ident)
    except InvalidModelName:
        raise ApiError(404, f"model '{ident}' not found") from None
    for tag in await cluster_tags(request):
        if model_key(tag["name"]).lower() == name.display_shortest().lower():
            return json_response(_model_obj(tag, ident))
    raise ApiError(404, f"model '{ident}' not found")


def add_openai_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/chat/completions", chat_completions)
    r.add_post("/v1/completions", completions)
    r.add_post("/v1/embeddings", embeddings)
    r.add_get("/v1/models", list_models)
    r.add_get("/v1/models/{model}", get_model)
