"""Model distribution on a real 3-node cluster: pull from peers (one and two seeders, a seeder killed
midway, a corrupt seeder), the disk budget, peer-route auth, the official client's pull, and pull/push
against a loopback OCI registry (Debian's docker-registry)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from conftest import cluster_view, routed_headers

from omx.models.names import ModelName
from omx.node.launch import NodeProc, free_ports, start_cluster, wait_until

pytestmark = pytest.mark.timeout(300)

MB = 1_000_000
BIG = 30 * MB  # two 16 MiB chunks, one from each seeder: enough to kill a seeder halfway through
ENV = {
    "OMX_LOG_LEVEL": "INFO",
    "OMX_BANDWIDTH_LIMIT": "15MB",  # a 30 MB pull takes ~2 s: time to kill a seeder midway
    "OMX_DISK_BUDGET": "100MB",
    "OMX_MAX_BODY_BYTES": str(150 * MB),
    "OMX_REGISTRIES": "http://127.0.0.1:9",  # never the internet
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NodeProc]]:
    nodes = start_cluster(tmp_path_factory.mktemp("dist"), 3, 1, env=ENV)
    try:
        ids = {n.id for n in nodes}
        wait_until(lambda: all({m["id"] for m in cluster_view(n)["members"] if m["status"] == "alive"} == ids
                               for n in nodes), 60, what="3 alive members everywhere")
        yield nodes
    finally:
        for n in nodes:
            n.stop(signal.SIGKILL)


def digest(node: NodeProc, name: str) -> str | None:
    """The manifest digest in this node's own store (/api/tags answers for the whole cluster)."""
    try:
        return hashlib.sha256(manifest_path(node, name).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def create(node: NodeProc, name: str, **body: object) -> None:
    r = httpx.post(node.url + "/api/create", json={"model": name, "from": "omx-tiny", "stream": False, **body},
                   timeout=120)
    assert r.status_code == 200, r.text


def pull(node: NodeProc, name: str, **body: object) -> tuple[int, list[dict]]:
    with httpx.stream("POST", node.url + "/api/pull", json={"model": name, **body}, timeout=120) as r:
        r.read()
        if r.status_code != 200:
            return r.status_code, [r.json()]
        return 200, [json.loads(line) for line in r.text.splitlines() if line.strip()]


def blobs_dir(node: NodeProc) -> Path:
    return node.data_dir / "blobs"


def blob_of(node: NodeProc, name: str, size: int) -> Path:
    m = json.loads(manifest_path(node, name).read_bytes())
    digest = next(layer["digest"] for layer in m["layers"] if layer["size"] == size)
    return blobs_dir(node) / digest.replace(":", "-")


def manifest_path(node: NodeProc, name: str) -> Path:
    return node.data_dir / "manifests" / ModelName.parse(name).manifest_relpath()


def check_stream(lines: list[dict]) -> None:
    statuses = [x["status"] for x in lines]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"], statuses
    for x in lines[1:-3]:
        assert x["status"] == "pulling " + x["digest"][7:19] and x["total"] > 0
        assert "completed" not in x or 0 < x["completed"] <= x["total"]


def test_pull_from_a_peer_verified_by_digest(cluster: list[NodeProc]) -> None:
    a, _, c = cluster
    create(a, "peer-a:latest", system="You are replicated.")
    code, lines = pull(c, "peer-a")
    assert code == 200, lines
    check_stream(lines)
    assert digest(c, "peer-a") == digest(a, "peer-a") is not None  # the same manifest bytes
    r = httpx.post(c.url + "/api/pull", json={"model": "peer-a", "stream": False}, timeout=60)
    assert r.json() == {"status": "success"}  # already here: every blob is a cache hit


def test_peer_routes_need_the_cluster_token(cluster: list[NodeProc]) -> None:
    a = cluster[0]
    m = json.loads(manifest_path(a, "omx-tiny:latest").read_bytes())
    digest = m["layers"][0]["digest"]
    assert httpx.get(f"{a.url}/api/v1/internal/blobs/{digest}", timeout=5).status_code in (401, 403)
    r = httpx.get(f"{a.url}/api/v1/internal/manifests", params={"model": "omx-tiny"}, timeout=5,
                  headers={"Authorization": "Bearer wrong"})
    assert r.status_code in (401, 403)


def test_official_client_pull(cluster: list[NodeProc]) -> None:
    import ollama

    a, b, _ = cluster
    create(a, "peer-client:latest", system="Pulled by the official client.")
    progress = list(ollama.Client(host=b.url).pull("peer-client", stream=True))
    assert progress[0].status == "pulling manifest" and progress[-1].status == "success"
    assert any(p.total and p.digest for p in progress)
    assert ollama.Client(host=b.url).pull("peer-client").status == "success"
    assert digest(b, "peer-client") == digest(a, "peer-client") is not None


def omx_cli(*args: str) -> str:
    """The CLI in a fresh process, as a user runs it; returns stderr (where progress goes)."""
    res = subprocess.run([sys.executable, "-m", "omx.console.cli", *args], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    return res.stderr


def test_cli_pull_and_import_from_ollama(cluster: list[NodeProc], tmp_path: Path) -> None:
    from omx.models.demo import ensure_demo_model
    from omx.models.store import Store

    a, b, _ = cluster
    create(a, "peer-cli:latest", system="Pulled by omx pull.")
    assert "success" in omx_cli("--host", b.url, "pull", "peer-cli")
    assert digest(b, "peer-cli") == digest(a, "peer-cli") is not None
    ollama_dir = tmp_path / "ollama"  # an Ollama store: same layout as ours
    src = Store(ollama_dir)
    ensure_demo_model(src, "imported/tiny:v2")
    want = hashlib.sha256(src.manifest_bytes("imported/tiny:v2")).hexdigest()
    assert "imported 1 of 1" in omx_cli("--host", b.url, "model", "import", "--from-ollama", str(ollama_dir))
    assert digest(b, "imported/tiny:v2") == want
    r = httpx.post(b.url + "/api/show", json={"model": "imported/tiny:v2"}, timeout=30)
    assert r.status_code == 200 and r.json()["details"]["format"] == "gguf"


def test_full_budget_is_a_clear_error_and_leaves_nothing(cluster: list[NodeProc]) -> None:
    a, _, c = cluster
    create(a, "huge:latest", license=["x" * (55 * MB), "y" * (55 * MB)])
    before = sorted(p.name for p in blobs_dir(c).iterdir())
    code, body = pull(c, "huge")
    assert code == 507 and "not enough space" in body[0]["error"] and "budget" in body[0]["error"], body
    assert sorted(p.name for p in blobs_dir(c).iterdir()) == before  # no blob, no partial file
    assert digest(c, "huge") is None and digest(c, "peer-a") is not None  # nothing evicted for nothing


def test_corrupt_seeder_is_detected_and_nothing_corrupt_lands(cluster: list[NodeProc]) -> None:
    a, b, c = cluster
    create(a, "bent:latest", license="z" * (20 * MB))
    assert pull(b, "bent")[0] == 200
    path = blob_of(b, "bent:latest", 20 * MB)
    with path.open("r+b") as f:  # bit rot on b's disk, after b verified it: one bad byte in every chunk
        for off in range(0, 20 * MB, 2 * MB):
            f.seek(off)
            f.write(b"Q")
    code, lines = pull(c, "bent")
    assert code == 200 and lines[-1] == {"status": "success"}, (code, lines[-3:])
    good = blob_of(c, "bent:latest", 20 * MB)
    assert hashlib.sha256(good.read_bytes()).hexdigest() == good.name.removeprefix("sha256-")
    marked = [line for line in c.log if "marking source" in line]
    assert marked and b.id in marked[0], "".join(c.log[-20:])
    # the only seeder is corrupt: the pull fails, and no byte of it lands
    create(a, "bent2:latest", license="w" * (9 * MB))
    assert pull(b, "bent2")[0] == 200
    path = blob_of(b, "bent2:latest", 9 * MB)
    with path.open("r+b") as f:
        f.write(b"Q")
    # only a's copy goes (a routed request acts on its node alone; a plain /api/delete removes the model from
    # every holder, b too, once gossip says b holds it)
    assert httpx.request("DELETE", a.url + "/api/delete", json={"model": "bent2"}, headers=routed_headers(a),
                         timeout=30).status_code == 200
    code, lines = pull(c, "bent2")
    errors = [x["error"] for x in lines if "error" in x]
    assert errors and ("digest mismatch" in errors[0] or "no usable source" in errors[0]), lines[-2:]
    assert not [p for p in blobs_dir(c).iterdir() if path.name.removeprefix("sha256-") in p.name]
    assert digest(c, "bent2") is None


def test_two_seeders_and_one_killed_midway(cluster: list[NodeProc]) -> None:
    a, b, c = cluster
    create(a, "twin:latest", license="t" * BIG)
    assert pull(b, "twin")[0] == 200
    wait_until(lambda: all("twin:latest" in (m.get("meta", {}).get("have") or ["twin:latest"])
                           for m in cluster_view(c)["members"] if m["id"] != c.id), 20, what="both seeders advertised")
    killed = seen_fetching = False
    lines: list[dict] = []
    with httpx.stream("POST", c.url + "/api/pull", json={"model": "twin"}, timeout=120) as r:
        assert r.status_code == 200
        for raw in r.iter_lines():
            if not raw.strip():
                continue
            x = json.loads(raw)
            lines.append(x)
            if not seen_fetching and x.get("completed"):  # operators see the transfer: node and progress
                models = httpx.get(c.url + "/api/v1/models", timeout=10).json()["models"]
                twin = next((m for m in models if m["name"] == "twin:latest"), {})
                seen_fetching = any(t["node"] == c.id and 0 <= t["completed"] <= t["total"] and t["total"] >= BIG
                                    for t in twin.get("transfers", []))
            if not killed and x.get("total") == BIG and x.get("completed", 0) > 4 * MB:
                b.stop(signal.SIGKILL)  # a seeder dies mid-transfer
                killed = True
    assert killed, lines
    check_stream(lines)
    assert seen_fetching, "the pull never showed in GET /api/v1/models"
    good = blob_of(c, "twin:latest", BIG)
    assert hashlib.sha256(good.read_bytes()).hexdigest() == good.name.removeprefix("sha256-")
    assert digest(c, "twin") == digest(a, "twin") is not None
    assert not [p for p in blobs_dir(c).iterdir() if p.name.startswith(".omx-partial-")]
    wait_until(lambda: not any(m.get("transfers") for m in httpx.get(c.url + "/api/v1/models", timeout=10).json()
                               ["models"]), 20, what="finished transfers to leave the models view")


# ---- a real OCI registry on loopback --------------------------------------------------------------

@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    exe = shutil.which("docker-registry")
    if exe is None:
        pytest.skip("docker-registry is not installed (apt-get install docker-registry; .ci/run installs it)")
    root = tmp_path_factory.mktemp("registry")
    port = free_ports(1)[0]
    cfg = root / "config.yml"
    cfg.write_text(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
                   f"  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n")
    proc = subprocess.Popen([exe, "serve", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=2).status_code == 200, 30,
                   what="docker-registry to listen")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_push_and_pull_through_a_registry(cluster: list[NodeProc], registry: str) -> None:
    a, _, c = cluster
    name = f"{registry}/library/tiny:v1"
    assert httpx.post(a.url + "/api/copy", json={"source": "omx-tiny", "destination": name},
                      timeout=30).status_code == 200
    r = httpx.post(a.url + "/api/push", json={"model": name}, timeout=60)  # plain http needs insecure
    assert r.status_code == 200 and "error" in r.text.splitlines()[-1], r.text
    r = httpx.post(a.url + "/api/push", json={"model": name, "insecure": True}, timeout=60)
    lines = [json.loads(x) for x in r.text.splitlines()]
    statuses = [x["status"] for x in lines if "status" in x]
    assert statuses[0] == "retrieving manifest" and statuses[-2:] == ["pushing manifest", "success"], lines
    assert any(s.startswith("pushing ") and x.get("total") for s, x in zip(statuses, lines, strict=False))
    want = digest(a, name)
    # only the registry has it now, so c pulls from there
    assert httpx.request("DELETE", a.url + "/api/delete", json={"model": name}, timeout=30).status_code == 200
    code, lines = pull(c, name, insecure=True)
    assert code == 200, lines
    check_stream(lines)
    assert digest(c, name) == want is not None  # manifest bytes unchanged through push and pull
    code, body = pull(c, f"{registry}/library/nothing:here", insecure=True)
    assert code == 404 and body[0]["error"] == "pull model manifest: file does not exist"


async def test_blob_route_serves_ranges_with_sendfile(tmp_path: Path) -> None:
    """The peer blob route's sendfile path: whole file, ranges, HEAD, errors, and keep-alive reuse."""
    import os

    import aiohttp
    from aiohttp import web

    from omx.node.distribution import send_file

    data = os.urandom(3_000_000)
    path = tmp_path / "blob"
    path.write_bytes(data)

    async def handle(request: web.Request) -> web.StreamResponse:
        with path.open("rb") as f:
            return await send_file(request, f)

    app = web.Application()
    app.router.add_get("/b", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/b"
    n = len(data)
    try:
        async with aiohttp.ClientSession() as c:
            cases: list[tuple[str | None, int, bytes, str | None]] = [
                (None, 200, data, None),
                ("bytes=0-99", 206, data[:100], f"bytes 0-99/{n}"),
                ("bytes=100-", 206, data[100:], f"bytes 100-{n - 1}/{n}"),
                ("bytes=-10", 206, data[-10:], f"bytes {n - 10}-{n - 1}/{n}"),
                (f"bytes={n - 5}-{n + 100}", 206, data[-5:], f"bytes {n - 5}-{n - 1}/{n}"),
                (f"bytes={n}-", 416, b"", f"bytes */{n}"),
                ("nonsense", 416, b"", f"bytes */{n}"),
            ]
            for rng, status, body, content_range in cases:
                async with c.get(url, headers={"Range": rng} if rng else {}) as r:
                    assert (r.status, await r.read(), r.headers.get("Content-Range")) == (status, body, content_range)
            async with c.head(url) as r:
                assert r.status == 200 and r.headers["Content-Length"] == str(n)
            for i in range(20):  # one kept-alive connection, response after response
                async with c.get(url, headers={"Range": f"bytes={i * 1000}-{i * 1000 + 999_999}"}) as r:
                    assert await r.read() == data[i * 1000:i * 1000 + 1_000_000]
    finally:
        await runner.cleanup()


# ---- a hostile registry ----------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HostileRegistry:
    """An OCI registry on loopback whose answers the test picks per repository (`/v2/<ns>/<repo>/...`)."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}  # repo -> what answers its manifests, blobs and tokens
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        self.port = free_ports(1)[0]
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        parts = request.path.strip("/").split("/")
        repo = parts[2] if len(parts) > 2 else parts[0]
        handler = self.routes.get(repo)
        return await handler(request) if handler else web.Response(status=404)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileRegistry]:
    reg = HostileRegistry()
    try:
        yield reg
    finally:
        reg.close()


def _manifest(config: tuple[str, int], *layers: tuple[str, int]) -> bytes:
    def ref(d: tuple[str, int], mt: str) -> dict:
        return {"mediaType": mt, "digest": d[0], "size": d[1]}

    return json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                       "config": ref(config, "application/vnd.docker.container.image.v1+json"),
                       "layers": [ref(x, "application/vnd.ollama.image.model") for x in layers]}).encode()


def test_a_hostile_registry_gets_clear_errors_and_the_node_pulls_on(node, hostile: HostileRegistry) -> None:
    tiny = json.loads((node.data_dir / "manifests/registry.ollama.ai/library/omx-tiny/latest").read_bytes())
    gguf = next(x for x in tiny["layers"] if x["mediaType"].endswith("model"))
    config = b'{"model_format":"gguf"}'
    config_d = ("sha256:" + hashlib.sha256(config).hexdigest(), len(config))
    junk = b"this is not json"
    junk_d = ("sha256:" + hashlib.sha256(junk).hexdigest(), len(junk))

    def manifest_of(body: bytes) -> Handler:
        async def h(request: web.Request) -> web.StreamResponse:
            if "/blobs/" in request.path:
                blob = {config_d[0]: config, junk_d[0]: junk}.get(request.path.rsplit("/", 1)[1])
                return web.Response(body=blob) if blob is not None else web.Response(status=404)
            return web.Response(body=body, content_type="application/vnd.docker.distribution.manifest.v2+json")
        return h

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(10_000):  # far past any manifest; the node must stop reading long before
            await resp.write(b" " * 65536)
        return resp

    async def bad_token(request: web.Request) -> web.StreamResponse:
        if request.path.startswith("/token"):
            return web.Response(text="<html>not json</html>")
        return web.Response(status=401, headers={
            "WWW-Authenticate": f'Bearer realm="http://127.0.0.1:{hostile.port}/token",service="x"'})

    hostile.routes.update({
        "giant": manifest_of(_manifest(config_d, (gguf["digest"], 10**21))),  # sizes are Go int64s
        "liar": manifest_of(_manifest(config_d, (gguf["digest"], 12345))),  # a blob we hold, another size
        "huge": manifest_of(b" " * (5 << 20) + _manifest(config_d)),
        "endless": endless,
        "token": bad_token,
        "junkconfig": manifest_of(_manifest(junk_d, (gguf["digest"], gguf["size"]))),
    })
    base = f"127.0.0.1:{hostile.port}/ns"
    cases = {
        "giant": "less than 9223372036854775808",
        "liar": f"is {gguf['size']} bytes, not the 12345",
        "huge": "more than 4194304",
        "endless": "more than 4194304",
        "token": "not JSON",
    }
    with node.client(timeout=120) as c:
        before = sorted(m["name"] for m in c.get("/api/tags").json()["models"])
        for repo, needle in cases.items():
            r = c.post("/api/pull", json={"model": f"{base}/{repo}:x", "insecure": True, "stream": False})
            assert r.status_code == 502 and needle in r.json()["error"], (repo, r.status_code, r.text)
        # a config blob that verifies but is no config: an error line, and no model under the name
        r = c.post("/api/pull", json={"model": f"{base}/junkconfig:x", "insecure": True})
        lines = [json.loads(x) for x in r.text.splitlines() if x.strip()]
        assert "invalid config blob" in lines[-1].get("error", ""), lines
        assert sorted(m["name"] for m in c.get("/api/tags").json()["models"]) == before
        # the node pulls on: nothing of the above stuck (its gossip figures, its transfers)
        r = c.post("/api/pull", json={"model": f"{base}/nothing:x", "insecure": True, "stream": False})
        assert r.status_code == 404, r.text
        r = c.post("/api/generate", json={"model": "omx-tiny", "prompt": "hi", "stream": False,
                                          "options": {"num_predict": 2}})
        assert r.status_code == 200, r.text
