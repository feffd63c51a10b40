"""Client of registries speaking the Ollama/OCI distribution protocol (registry.ollama.ai, Docker's registry).

Pull: `GET /v2/<ns>/<model>/manifests/<tag>` then blobs through `transfer` (the registry is one more ranged
source). Push: for each blob `HEAD`, else `POST /v2/<ns>/<model>/blobs/uploads/` and a monolithic
`PUT <location>?digest=`, then `PUT` the manifest bytes unchanged (so its digest is the same everywhere).
Anonymous bearer tokens (`WWW-Authenticate: Bearer realm=...`) are fetched when a registry asks for them.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import aiohttp

from omx.models.manifest import MEDIA_TYPE_MANIFEST, Manifest
from omx.models.names import DEFAULT_HOST, ModelName
from omx.models.store import Store
from omx.models.transfer import PROGRESS_EVERY, Source, TransferError, blob_order, progress_line

DEFAULT_REGISTRY = f"https://{DEFAULT_HOST}"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_UPLOAD_PIECE = 1 << 20
REGISTRY_STREAMS = 4  # requests in flight to one registry (see `source`)
# Small answers (manifests, tokens) are read whole, so they are bounded: a registry that drips or never ends
# must hold neither the pull nor the node's memory. Docker's registry refuses manifests over 4 MiB too.
MANIFEST_LIMIT = 4 << 20
TOKEN_LIMIT = 1 << 20
REPLY_TIMEOUT = 60.0


class RegistryError(TransferError):
    """The registry refused or failed; `status` is its HTTP status (0 when unreachable)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def registry_bases(name: ModelName, mirrors: Sequence[str], insecure: bool) -> list[str]:
    """Base URLs to try for a name: the configured list for the default host, else the name's own host.

    Plain HTTP needs `insecure` (as in Ollama), except for registries the operator configured.
    """
    if name.host.lower() == DEFAULT_HOST:
        return [m.rstrip("/") for m in mirrors] or [DEFAULT_REGISTRY]
    if name.scheme == "http" and not insecure:
        raise RegistryError("insecure protocol http", 400)
    return [f"{'http' if insecure else 'https'}://{name.host}"]


def _repo(name: ModelName) -> str:
    return f"{name.namespace}/{name.model}"


_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')


class RegistryClient:
    """One registry base URL and repository, with the bearer token it handed out (if any)."""

    def __init__(self, session: aiohttp.ClientSession, base: str, name: ModelName) -> None:
        self.session = session
        self.base = base
        self.name = name
        self.headers: dict[str, str] = {}

    def url(self, path: str) -> str:
        return f"{self.base}/v2/{_repo(self.name)}/{path}"

    async def _token(self, challenge: str, push: bool) -> None:
        scheme, _, params = challenge.partition(" ")
        if scheme.lower() != "bearer":
            raise RegistryError(f"{self.base} wants {scheme} authentication, which omx does not support", 401)
        fields = dict(_CHALLENGE.findall(params))
        realm = fields.pop("realm", "")
        if not realm:
            raise RegistryError(f"{self.base} sent an authentication challenge without a realm", 401)
        scope = fields.get("scope") or f"repository:{_repo(self.name)}:{'pull,push' if push else 'pull'}"
        query = urlencode({k: v for k, v in {"service": fields.get("service"), "scope": scope}.items() if v})
        try:
            async with self.session.get(f"{realm}?{query}") as r:
                if r.status != 200:
                    raise RegistryError(f"{self.base}: token request failed (HTTP {r.status})", r.status)
                data = await self._small_body(r, TOKEN_LIMIT, "token")
        except (aiohttp.ClientError, TimeoutError, OSError, UnicodeError, ValueError) as e:
            raise RegistryError(f"{self.base}: token request to {realm!r} failed: {e or type(e).__name__}",
                                502) from None
        try:
            body = json.loads(data)
        except ValueError:
            raise RegistryError(f"{self.base}: the token response is not JSON", 502) from None
        token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not token:
            raise RegistryError(f"{self.base}: token response without a token", 401)
        self.headers["Authorization"] = f"Bearer {token}"

    async def _small_body(self, r: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
        """A whole answer of at most `limit` bytes, within REPLY_TIMEOUT; raises RegistryError."""
        if r.content_length is not None and r.content_length > limit:
            raise RegistryError(f"{what}: {self.base} sent {r.content_length} bytes, more than {limit} allowed", 502)
        buf = bytearray()
        try:
            async with asyncio.timeout(REPLY_TIMEOUT):
                async for piece in r.content.iter_chunked(1 << 16):
                    buf += piece
                    if len(buf) > limit:
                        raise RegistryError(f"{what}: {self.base} sent more than {limit} bytes", 502)
        except TimeoutError:
            raise RegistryError(f"{what}: {self.base} did not finish answering in {REPLY_TIMEOUT:.0f}s", 504) from None
        except (aiohttp.ClientError, OSError) as e:
            raise RegistryError(f"{what}: {self.base}: {e or type(e).__name__}", 502) from None
        return bytes(buf)

    async def request(self, method: str, url: str, *, push: bool = False, **kw: Any) -> aiohttp.ClientResponse:
        """One request, retried once with a token after a 401 challenge; the caller releases the response."""
        headers = {**kw.pop("headers", {})}
        for attempt in range(2):
            try:
                r = await self.session.request(method, url, headers={**self.headers, **headers}, **kw)
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                raise RegistryError(f"cannot reach the registry {self.base}: {e or type(e).__name__}") from None
            except (UnicodeError, ValueError) as e:  # a host name IDNA refuses (a label over 63 characters, ...)
                raise RegistryError(f"invalid registry address {self.base}: {e}", 400) from None
            if r.status == 401 and attempt == 0 and "WWW-Authenticate" in r.headers:
                challenge = r.headers["WWW-Authenticate"]
                r.release()
                await self._token(challenge, push)
                continue
            return r
        raise AssertionError("unreachable")

    # ---- pull ----------------------------------------------------------------------------------------
    async def manifest(self) -> bytes:
        url = self.url(f"manifests/{self.name.tag}")
        r = await self.request("GET", url, headers={"Accept": f"{MEDIA_TYPE_MANIFEST}, {OCI_MANIFEST}"})
        async with r:
            if r.status == 404:
                raise RegistryError("pull model manifest: file does not exist", 404)
            if r.status != 200:
                raise RegistryError(f"pull model manifest: {self.base} answered HTTP {r.status}", r.status)
            data = await self._small_body(r, MANIFEST_LIMIT, "pull model manifest")
        Manifest.from_bytes(data)  # raises InvalidManifest
        return data

    def source(self) -> Source:
        # a registry is usually across a WAN, where one TCP stream is held back by its window over the round
        # trip; Ollama's own client downloads parts in parallel for the same reason
        # bad bytes mark the source for a while: scoped to this repository, so one corrupt blob does not stop
        # every pull from the registry
        return Source(id=f"{self.base}/{_repo(self.name)}", blob_prefix=self.url("blobs/"),
                      headers=dict(self.headers), streams=REGISTRY_STREAMS)

    # ---- push ----------------------------------------------------------------------------------------
    async def _has_blob(self, digest: str) -> bool:
        r = await self.request("HEAD", self.url(f"blobs/{digest}"), push=True)
        async with r:
            return r.status == 200

    async def _upload(self, store: Store, digest: str, size: int, sent: list[int]) -> None:
        r = await self.request("POST", self.url("blobs/uploads/"), push=True)
        async with r:
            if r.status not in (201, 202):
                raise RegistryError(f"push: starting the upload of {digest} failed (HTTP {r.status})", r.status)
            location = r.headers.get("Location", "")
        if not location:
            raise RegistryError("push: the registry gave no upload location", 502)
        try:
            location = urljoin(self.url("blobs/uploads/"), location)
            sep = "&" if urlsplit(location).query else "?"
        except ValueError:  # "http://[::1" and the like
            raise RegistryError(f"push: the registry gave an upload location that is no URL: {location!r}",
                                502) from None
        path = store.blob_path(digest)

        async def body() -> AsyncIterator[bytes]:
            f = await asyncio.to_thread(path.open, "rb")
            try:
                while piece := await asyncio.to_thread(f.read, _UPLOAD_PIECE):
                    sent[0] += len(piece)
                    yield piece
            finally:
                f.close()

        r = await self.request("PUT", f"{location}{sep}digest={digest}", push=True, data=body(),
                               headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)})
        async with r:
            if r.status not in (201, 204):
                text = (await r.text())[:300]
                raise RegistryError(f"push: uploading {digest} failed (HTTP {r.status}): {text}", r.status)

    async def push(self, store: Store) -> AsyncIterator[dict[str, Any]]:
        """Ollama's push stream: `retrieving manifest`, `pushing <12hex>` per blob, `pushing manifest`, `success`."""
        yield {"status": "retrieving manifest"}
        data = await asyncio.to_thread(store.manifest_bytes, self.name)
        m = Manifest.from_bytes(data)
        for layer in blob_order(m):
            status = f"pushing {layer.hex[:12]}"
            if await self._has_blob(layer.digest):
                yield progress_line(status, layer.digest, layer.size, layer.size)
                continue
            yield progress_line(status, layer.digest, layer.size, 0)
            sent = [0]
            task = asyncio.create_task(self._upload(store, layer.digest, layer.size, sent))
            try:
                last = 0
                while not task.done():
                    await asyncio.wait([task], timeout=PROGRESS_EVERY)
                    if sent[0] != last and not task.done():
                        last = sent[0]
                        yield progress_line(status, layer.digest, layer.size, last)
                task.result()
            finally:
                task.cancel()
            yield progress_line(status, layer.digest, layer.size, layer.size)
        yield {"status": "pushing manifest"}
        r = await self.request("PUT", self.url(f"manifests/{self.name.tag}"), push=True, data=data,
                               headers={"Content-Type": m.media_type or MEDIA_TYPE_MANIFEST})
        async with r:
            if r.status not in (200, 201):
                text = (await r.text())[:300]
                raise RegistryError(f"push: the registry refused the manifest (HTTP {r.status}): {text}", r.status)
        yield {"status": "success"}


async def resolve(
    session: aiohttp.ClientSession, name: ModelName, mirrors: Sequence[str], insecure: bool,
) -> tuple[RegistryClient, bytes]:
    """The first registry that has the manifest, and its bytes; raises RegistryError (404 when none has it)."""
    errors: list[RegistryError] = []
    for base in registry_bases(name, mirrors, insecure):
        client = RegistryClient(session, base, name)
        try:
            return client, await client.manifest()
        except RegistryError as e:
            errors.append(e)
    if errors and all(e.status == 404 for e in errors):
        raise errors[0]
    raise next((e for e in errors if e.status != 404), RegistryError("no registry configured", 400))
