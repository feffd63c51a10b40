"""/api/create: validate the request up front (so errors keep their status), then stream the store's progress."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

from omx.models.gotemplate import TemplateError
from omx.models.names import InvalidDigest, InvalidModelName, ModelName, parse_digest
from omx.models.prompt import parse_template
from omx.models.store import BlobNotFound, InvalidModelInput, ModelNotFound, Store, StoreError
from omx.protocols.api import ApiError, CreateRequest, normalize_options


def _store_error(e: StoreError) -> ApiError:
    if isinstance(e, ModelNotFound | BlobNotFound):
        return ApiError(404, str(e))
    if isinstance(e, InvalidModelInput):
        return ApiError(400, str(e))
    return ApiError(500, str(e))


def _check(req: CreateRequest) -> ModelName:
    try:
        name = ModelName.parse(req.ref)
    except InvalidModelName:
        raise ApiError(400, "invalid model name") from None
    for digest in (req.files or {}).values():
        try:
            parse_digest(digest)
        except (InvalidDigest, ValueError):
            raise ApiError(400, "invalid digest format") from None
    if req.from_ is not None and req.from_ != "":
        try:
            ModelName.parse(req.from_)
        except InvalidModelName:
            raise ApiError(400, f'invalid model name in "from": "{req.from_}"') from None
    if req.template:
        try:
            parse_template(req.template)  # Ollama only parses at create time; rendering needs real data
        except TemplateError as e:
            raise ApiError(400, f"template error: {e}") from None
    if req.license is not None and not (
        isinstance(req.license, str) or (isinstance(req.license, list) and all(isinstance(x, str) for x in req.license))
    ):
        raise ApiError(400, "license must be a string or a list of strings")
    if not req.files and not req.from_:
        raise ApiError(400, "neither 'from' nor 'files' was specified")
    return name


async def create(store: Store, req: CreateRequest) -> AsyncIterator[dict[str, Any]]:
    name = _check(req)
    params = normalize_options(req.parameters) if req.parameters else None
    try:
        progress: Iterator[dict[str, Any]] = store.create(
            name,
            from_model=req.from_ or None,
            files=req.files or None,
            template=req.template,
            system=req.system,
            parameters=params,
            license=req.license,
            messages=[m.model_dump(exclude_none=True) for m in req.messages] if req.messages else None,
        )
    except StoreError as e:
        raise _store_error(e) from None
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    started = False
    try:
        while True:
            try:
                item = await asyncio.to_thread(next, progress, None)
            except StoreError as e:
                if not started:
                    raise _store_error(e) from None
                yield {"error": str(e)}
                return
            if item is None:
                return
            started = True
            yield item
    finally:
        # a client that goes away mid-create must not leave half-made state behind
        await asyncio.to_thread(progress.close)
