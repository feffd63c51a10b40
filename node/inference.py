"""Inference on this node: from a validated request to a stream of Ollama response chunks.

Native and OpenAI routes both call these generators, so the two APIs cannot drift apart. A
generator raises ApiError before its first chunk (the route answers with that status) and
yields `{"error": ...}` after it (Ollama's in-stream error line).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from omx.models.constrain import FormatError, validate_format
from omx.models.gotemplate import TemplateError
from omx.models.manifest import InvalidManifest
from omx.models.names import InvalidModelName, ModelName
from omx.models.prompt import render_chat, render_generate
from omx.models.store import BlobNotFound, ModelNotFound, ResolvedModel, Store
from omx.node.runners import LoadSpec, RunnerManager
from omx.protocols.api import (
    ApiError,
    ChatRequest,
    EmbeddingsRequest,
    EmbedRequest,
    GenerateRequest,
    keep_alive_seconds,
    normalize_options,
    rfc3339,
)

IDS_FIELD = "_omx_ids"  # token ids in a chunk: read (and removed) by the router, never sent to a client


@dataclass
class Resume:
    """A generation another replica started: continue after `text`, and report counters for the whole of it."""

    text: str = ""
    tokens: int = 0
    eval_ns: int = 0
    elapsed_ns: int = 0
    ids: list[int] | None = None  # the generated token ids, when the replica reported them (omx runners do)

    @classmethod
    def from_json(cls, obj: object) -> Resume | None:
        if not isinstance(obj, dict):
            return None
        try:
            ids = obj.get("ids")
            if ids is not None and not (isinstance(ids, list) and all(type(t) is int for t in ids)):
                return None
            return cls(text=str(obj.get("text", "")), tokens=max(0, int(obj.get("tokens", 0))),
                       eval_ns=max(0, int(obj.get("eval_ns", 0))), elapsed_ns=max(0, int(obj.get("elapsed_ns", 0))),
                       ids=ids)
        except (TypeError, ValueError):
            return None

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "tokens": self.tokens, "eval_ns": self.eval_ns, "elapsed_ns": self.elapsed_ns,
                "ids": self.ids}

    def apply(self, op: dict[str, Any]) -> None:
        """Continue after what was generated: exactly from its token ids when known (no re-tokenising), else
        from its text; `num_predict` shrinks by what was already generated."""
        opts = op["options"]
        n = opts.get("num_predict")
        if isinstance(n, int) and n > 0:
            opts["num_predict"] = max(1, n - self.tokens)
        if self.ids is not None:
            op["resume_ids"] = self.ids
            op["skip_chars"] = len(self.text)
        else:
            op["prompt"] += self.text

    def fix_final(self, final: dict[str, Any]) -> None:
        final["eval_count"] = int(final.get("eval_count", 0)) + self.tokens
        final["prompt_eval_count"] = max(0, int(final.get("prompt_eval_count", 0)) - self.tokens)
        final["eval_duration"] = int(final.get("eval_duration", 0)) + self.eval_ns
        final["total_duration"] = int(final.get("total_duration", 0)) + self.elapsed_ns


@dataclass
class Inference:
    """What inference needs from the node: its store, its runners and its defaults."""

    store: Store
    runners: RunnerManager
    context_length: int

    # ---- model resolution ------------------------------------------------------------------------
    def resolve(self, raw: str, missing_status: int = 404, missing_msg: str | None = None) -> ResolvedModel:
        if not raw:
            raise ApiError(missing_status, missing_msg or "model '' not found")
        try:
            name = ModelName.parse(raw)
        except InvalidModelName:
            raise ApiError(400, "invalid model name") from None
        try:
            return self.store.load(name)
        except ModelNotFound:
            raise ApiError(404, f"model '{raw}' not found") from None
        except (InvalidManifest, BlobNotFound) as e:  # damaged on disk: say so, and how to repair it
            raise ApiError(500, f"model '{raw}' cannot be used: {e}; pull or create it again") from None

    def load_spec(self, m: ResolvedModel) -> LoadSpec:
        kind, d, f = self.store.runner_files(m)
        return LoadSpec(key=m.digest, name=m.name.display_shortest(), kind=kind, dir=str(d),
                        file=f, size=m.size, digest=m.digest, details=m.details,
                        num_ctx=self.num_ctx(normalize_options(m.params)))

    def options_for(self, m: ResolvedModel, request_opts: dict[str, Any] | None) -> dict[str, Any]:
        opts = normalize_options(m.params)
        opts.update(normalize_options(request_opts))
        return opts

    def num_ctx(self, opts: dict[str, Any]) -> int:
        return int(opts.get("num_ctx") or self.context_length)

    async def load_or_unload(self, m: ResolvedModel, keep_alive: float | None) -> tuple[str, float]:
        """Ollama's empty-request load/unload: returns (done_reason, load seconds)."""
        spec = self.load_spec(m)
        if keep_alive == 0:
            await self.runners.unload_key(spec.key)
            return "unload", 0.0
        try:
            runner, load_s = await self.runners.acquire(spec)
        except Exception as e:
            raise _load_error(e) from None
        self.runners.release(runner, keep_alive)
        return "load", load_s

    # ---- generation -------------------------------------------------------------------------------
    async def stream_tokens(
        self, m: ResolvedModel, op: dict[str, Any], keep_alive: float | None
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield runner frames (token..., done) with `load_duration` and `total_duration` added to done."""
        t0 = time.perf_counter()
        try:
            runner, load_s = await self.runners.acquire(self.load_spec(m))
        except ApiError:
            raise
        except Exception as e:
            raise _load_error(e) from None
        started = False
        try:
            async for msg in runner.request(op):
                t = msg.get("t")
                if t == "error":
                    if not started:
                        raise ApiError(int(msg.get("status") or 500), str(msg.get("error")))
                    yield {"error": str(msg.get("error"))}
                    return
                started = True
                if t == "done":
                    msg["load_duration"] = int(load_s * 1e9)
                    msg["total_duration"] = int((time.perf_counter() - t0) * 1e9)
                yield msg
        finally:
            self.runners.release(runner, keep_alive)


def _load_error(e: Exception) -> ApiError:
    if isinstance(e, ApiError):
        return e
    return ApiError(500, str(e) or type(e).__name__)


async def _check_format(fmt: object) -> object:
    """A schema is checked off the event loop: a large one (up to validate_format's limits) takes a while."""
    try:
        return await asyncio.to_thread(validate_format, fmt) if isinstance(fmt, dict) else validate_format(fmt)
    except FormatError as e:
        raise ApiError(400, str(e)) from None


def _check_think(m: ResolvedModel, raw: str, think: object) -> None:
    if think is None or think is False:
        return
    if think is not True and think not in ("low", "medium", "high", "max"):
        raise ApiError(400, f"invalid think value: {think!r} (must be true, false, \"low\", \"medium\", or \"high\")")
    if "thinking" not in m.capabilities:
        raise ApiError(400, f'"{raw}" does not support thinking')


def _check_images(m: ResolvedModel, raw: str, has_images: bool) -> None:
    """Images sent to a text-only model are an error, not silently dropped."""
    if has_images and "vision" not in m.capabilities:
        raise ApiError(400, f'"{raw}" does not support image input')


async def generate(eng: Inference, req: GenerateRequest, resume: Resume | None = None
                   ) -> AsyncIterator[dict[str, Any]]:
    """/api/generate as a stream of native chunks (the first chunk is final for load/unload)."""
    raw = req.model or ""
    logprobs = _logprobs(req)
    m = eng.resolve(raw)
    keep_alive = keep_alive_seconds(req.keep_alive)
    fmt = await _check_format(req.format)
    if req.raw and (req.template or req.system or req.context):
        raise ApiError(400, "raw mode does not support template, system, or context")
    _check_think(m, raw, req.think)
    if "completion" not in m.capabilities:
        raise ApiError(400, f'"{raw}" does not support generate')
    if req.suffix and "insert" not in m.capabilities:
        raise ApiError(400, f'"{raw}" does not support insert')
    _check_images(m, raw, bool(req.images))
    opts = eng.options_for(m, req.options)
    if not req.prompt and not req.images:
        reason, _ = await eng.load_or_unload(m, keep_alive)
        yield {"model": raw, "created_at": rfc3339(), "response": "", "done": True, "done_reason": reason}
        return
    if req.raw:
        prompt = req.prompt
    else:
        try:
            prompt = render_generate(
                req.template if req.template is not None else m.template,
                system=req.system or m.system,
                prompt=req.prompt,
                suffix=req.suffix or None,
            )
        except TemplateError as e:
            raise ApiError(400, f"template error: {e}") from None
    op = {"op": "generate", "prompt": prompt, "raw": req.raw, "options": opts, "num_ctx": eng.num_ctx(opts),
          "format": fmt, "context": req.context or None, "logprobs": logprobs}
    if resume is not None:
        resume.apply(op)
    async for msg in eng.stream_tokens(m, op, keep_alive):
        if "error" in msg:
            yield msg
            return
        if msg["t"] == "token":
            yield _with_logprobs({"model": raw, "created_at": rfc3339(), "response": msg["text"], "done": False,
                                  IDS_FIELD: msg.get("ids")}, msg)
        elif msg["t"] == "done":
            final: dict[str, Any] = {"model": raw, "created_at": rfc3339(), "response": "", "done": True,
                                     "done_reason": msg["done_reason"]}
            if not req.raw:
                final["context"] = msg.get("context", [])
            final.update(_metrics(msg))
            if resume is not None:
                resume.fix_final(final)
            yield final


async def chat(eng: Inference, req: ChatRequest, resume: Resume | None = None) -> AsyncIterator[dict[str, Any]]:
    raw = req.model or ""
    logprobs = _logprobs(req)
    m = eng.resolve(raw, missing_status=400, missing_msg="model is required")
    keep_alive = keep_alive_seconds(req.keep_alive)
    fmt = await _check_format(req.format)
    _check_think(m, raw, req.think)
    if "completion" not in m.capabilities:
        raise ApiError(400, f'"{raw}" does not support chat')
    if req.tools and "tools" not in m.capabilities:
        raise ApiError(400, f"{m.name.display_shortest()} does not support tools")
    opts = eng.options_for(m, req.options)
    messages = [msg.model_dump(exclude_none=True) for msg in req.messages or []]
    _check_images(m, raw, any(msg.get("images") for msg in messages))
    for msg in messages:
        msg["role"] = msg.get("role", "").lower()
    if not messages:
        reason, _ = await eng.load_or_unload(m, keep_alive)
        yield {"model": raw, "created_at": rfc3339(), "message": {"role": "assistant", "content": ""},
               "done_reason": reason, "done": True}
        return
    try:
        prompt = render_chat(m.template, messages=m.messages + messages, system=m.system, tools=req.tools)
    except TemplateError as e:
        raise ApiError(400, f"template error: {e}") from None
    op = {"op": "generate", "prompt": prompt, "raw": False, "options": opts, "num_ctx": eng.num_ctx(opts),
          "format": fmt, "logprobs": logprobs}
    if resume is not None:
        resume.apply(op)
    async for msg in eng.stream_tokens(m, op, keep_alive):
        if "error" in msg:
            yield msg
            return
        if msg["t"] == "token":
            yield _with_logprobs({"model": raw, "created_at": rfc3339(),
                                  "message": {"role": "assistant", "content": msg["text"]}, "done": False,
                                  IDS_FIELD: msg.get("ids")}, msg)
        elif msg["t"] == "done":
            final: dict[str, Any] = {"model": raw, "created_at": rfc3339(),
                                     "message": {"role": "assistant", "content": ""},
                                     "done_reason": msg["done_reason"], "done": True}
            final.update(_metrics(msg))
            if resume is not None:
                resume.fix_final(final)
            yield final


def _logprobs(req: GenerateRequest | ChatRequest) -> int:
    """What the runner is asked for: -1 (none), else the number of alternatives per token."""
    if not 0 <= req.top_logprobs <= 20:
        raise ApiError(400, "top_logprobs must be between 0 and 20")
    return req.top_logprobs if req.logprobs else -1


def _with_logprobs(chunk: dict[str, Any], msg: dict[str, Any]) -> dict[str, Any]:
    if msg.get("logprobs"):
        chunk["logprobs"] = msg["logprobs"]
    return chunk


def _metrics(msg: dict[str, Any]) -> dict[str, int]:
    return {k: int(msg.get(k, 0)) for k in ("total_duration", "load_duration", "prompt_eval_count",
                                            "prompt_eval_duration", "eval_count", "eval_duration")}


def _embed_inputs(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(x, str) for x in value):
        return list(value)
    raise ApiError(400, "invalid input type")


async def embed_vectors(
    eng: Inference, m: ResolvedModel, inputs: list[str], opts: dict[str, Any], truncate: bool,
    keep_alive: float | None,
) -> dict[str, Any]:
    """Raw (mean-pooled, unnormalised) vectors and counters from the runner."""
    op = {"op": "embed", "inputs": inputs, "truncate": truncate, "num_ctx": eng.num_ctx(opts)}
    async for msg in eng.stream_tokens(m, op, keep_alive):
        if "error" in msg:
            raise ApiError(500, msg["error"])
        if msg.get("t") == "embeddings":
            return msg
    raise ApiError(500, "runner returned no embeddings")


def l2_normalize(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v] if n > 0 else v


async def embed(eng: Inference, req: EmbedRequest) -> dict[str, Any]:
    raw = req.model or ""
    m = eng.resolve(raw)
    keep_alive = keep_alive_seconds(req.keep_alive)
    inputs = _embed_inputs(req.input)
    if req.dimensions is not None and req.dimensions < 1:
        raise ApiError(400, "dimensions must be a positive integer")
    opts = eng.options_for(m, req.options)
    t0 = time.perf_counter()
    if not inputs:
        await eng.load_or_unload(m, keep_alive if keep_alive != 0 else None)
        return {"model": raw, "embeddings": []}
    res = await embed_vectors(eng, m, inputs, opts, req.truncate is not False, keep_alive)
    vectors = [l2_normalize(v) for v in res["embeddings"]]
    if req.dimensions:
        vectors = [l2_normalize(v[: req.dimensions]) for v in vectors]
    return {"model": raw, "embeddings": vectors, "total_duration": int((time.perf_counter() - t0) * 1e9),
            "load_duration": int(res.get("load_duration", 0)), "prompt_eval_count": res.get("prompt_eval_count", 0)}


async def embeddings_legacy(eng: Inference, req: EmbeddingsRequest) -> dict[str, Any]:
    raw = req.model or ""
    if not raw:
        raise ApiError(400, "model is required")
    try:
        m = eng.resolve(raw)
    except ApiError as e:
        if e.status == 404:
            raise ApiError(404, f'model "{raw}" not found, try pulling it first') from None
        raise
    keep_alive = keep_alive_seconds(req.keep_alive)
    opts = eng.options_for(m, req.options)
    if not req.prompt:
        await eng.load_or_unload(m, keep_alive if keep_alive != 0 else None)
        return {"embedding": []}
    res = await embed_vectors(eng, m, [req.prompt], opts, True, keep_alive)
    return {"embedding": res["embeddings"][0]}


async def first_and_rest(
    gen: AsyncIterator[dict[str, Any]],
) -> tuple[dict[str, Any] | None, AsyncIterator[dict[str, Any]]]:
    """Pull the first chunk so errors before any output become a proper HTTP status."""
    try:
        first = await gen.__anext__()
    except StopAsyncIteration:
        return None, gen
    return first, gen

