"""Malformed and hostile input gets Ollama's status and an {"error": ...} body, and loses nothing."""

from __future__ import annotations

import hashlib
import json
import os

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.timeout(240)

JSON_ROUTES = [
    ("POST", "/api/generate"), ("POST", "/api/chat"), ("POST", "/api/embed"), ("POST", "/api/embeddings"),
    ("POST", "/api/show"), ("POST", "/api/copy"), ("DELETE", "/api/delete"), ("POST", "/api/create"),
    ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/embeddings"),
    ("PUT", "/api/v1/nodes/no-such-node/labels"), ("POST", "/api/v1/proxy/instances"),
    ("POST", "/api/v1/models/scale"), ("POST", "/api/pull"), ("POST", "/api/push"),
]


def _err(r: httpx.Response) -> str:
    body = r.json()
    if isinstance(body.get("error"), dict):  # OpenAI form
        return body["error"]["message"]
    return body["error"]


def _snapshot(node) -> tuple[list[str], list[str]]:
    """The store as files: manifests and blobs; bad input must never change it."""
    root = node.data_dir
    files = sorted(str(p.relative_to(root)) for p in (root / "manifests").rglob("*") if p.is_file())
    blobs = sorted(p.name for p in (root / "blobs").iterdir())
    return files, blobs


@pytest.mark.parametrize(("method", "path"), JSON_ROUTES)
def test_empty_and_malformed_bodies(node, method: str, path: str) -> None:
    with node.client() as c:
        r = c.request(method, path, content=b"")
        assert r.status_code == 400 and "missing request body" in _err(r)
        r = c.request(method, path, content=b"{not json")
        assert r.status_code == 400 and _err(r)
        r = c.request(method, path, content=b"[1,2]")
        assert r.status_code == 400 and _err(r)
        r = c.request(method, path, content=b"\xff\xfe\x00garbage")
        assert r.status_code == 400 and _err(r)


def test_wrong_types_get_go_style_messages(node) -> None:
    with node.client() as c:
        r = c.post("/api/generate", json={"model": "omx-tiny", "prompt": 5})
        assert r.status_code == 400
        assert _err(r) == "json: cannot unmarshal number into Go struct field GenerateRequest.prompt of type string"
        r = c.post("/api/chat", json={"model": "omx-tiny", "messages": "hi"})
        assert r.status_code == 400 and "ChatRequest.messages" in _err(r)
        r = c.post("/api/generate", json={"model": "omx-tiny", "prompt": "x", "stream": "yes"})
        assert r.status_code == 400 and "of type bool" in _err(r)
        r = c.post("/api/generate", json={"model": "omx-tiny", "prompt": "x", "options": {"temperature": "hot"}})
        assert r.status_code == 400 and "temperature" in _err(r)


def test_unknown_options_are_ignored(node) -> None:
    with node.client() as c:
        r = c.post("/api/generate", json={"model": "omx-tiny", "prompt": "x", "stream": False,
                                          "options": {"num_predict": 1, "mirostat": 2, "tfs_z": 1.0, "f16_kv": True}})
        assert r.status_code == 200 and r.json()["done"]


@pytest.mark.parametrize("name", ["../../etc/passwd", "/abs/path", "a/", "m:", "bad name", "x" * 400, "a/b/c/d/e"])
def test_invalid_model_names(node, name: str) -> None:
    before = _snapshot(node)
    with node.client() as c:
        assert c.post("/api/generate", json={"model": name, "prompt": "x"}).status_code in (400, 404)
        r = c.post("/api/copy", json={"source": "omx-tiny", "destination": name})
        assert r.status_code == 400 and _err(r) == f'destination "{name}" is invalid'
        r = c.request("DELETE", "/api/delete", json={"model": name})
        assert r.status_code == 400 and _err(r) == f'name "{name}" is invalid'
        r = c.post("/api/create", json={"model": name, "from": "omx-tiny"})
        assert r.status_code == 400
    assert _snapshot(node) == before


def test_missing_model(node) -> None:
    with node.client() as c:
        r = c.post("/api/generate", json={"prompt": "x"})
        assert r.status_code == 404 and _err(r) == "model '' not found"
        r = c.post("/api/chat", json={"messages": []})
        assert r.status_code == 400 and _err(r) == "model is required"
        r = c.post("/api/embeddings", json={"model": "nope", "prompt": "x"})
        assert r.status_code == 404 and _err(r) == 'model "nope" not found, try pulling it first'


def test_unknown_routes_and_methods(node) -> None:
    with node.client() as c:
        r = c.get("/api/nothing")
        assert r.status_code == 404 and r.text == "404 page not found"
        r = c.get("/api/generate")
        assert r.status_code == 405
        r = c.post("/api/tags")
        assert r.status_code == 405


@pytest.mark.parametrize("keep_alive", ["-1", "5 minutes", "abc", [], {"a": 1}, True])
def test_invalid_keep_alive(node, keep_alive: object) -> None:
    with node.client() as c:
        r = c.post("/api/generate", json={"model": "omx-tiny", "prompt": "x", "keep_alive": keep_alive})
        assert r.status_code == 400
        if keep_alive == "-1":
            assert _err(r) == 'time: missing unit in duration "-1"'


def test_body_over_limit_is_413(node) -> None:
    with node.client() as c:
        big = json.dumps({"model": "omx-tiny", "prompt": "x" * (33 * 1024 * 1024)})
        r = c.post("/api/generate", content=big)
        assert r.status_code == 413 and "too large" in _err(r)
        assert c.get("/api/version").status_code == 200


@pytest.mark.parametrize("digest", ["sha256:abc", "md5:" + "0" * 64, "sha256-" + "g" * 64, "..%2f..%2fetc"])
def test_invalid_digests(node, digest: str) -> None:
    with node.client() as c:
        r = c.head(f"/api/blobs/{digest}")
        assert r.status_code == 400
        r = c.post(f"/api/blobs/{digest}", content=b"data")
        assert r.status_code == 400 and _err(r) == "invalid digest format"


def test_garbage_blob_upload_leaves_nothing(node) -> None:
    before = _snapshot(node)
    data = os.urandom(4096)
    wrong = hashlib.sha256(b"something else").hexdigest()
    with node.client() as c:
        r = c.post(f"/api/blobs/sha256:{wrong}", content=data)
        assert r.status_code == 400 and _err(r).startswith("digest mismatch")
        assert c.head(f"/api/blobs/sha256:{wrong}").status_code == 404
        right = hashlib.sha256(data).hexdigest()
        assert c.post(f"/api/blobs/sha256:{right}", content=data).status_code == 201
        assert c.post(f"/api/blobs/sha256:{right}", content=data).status_code == 200
    after = _snapshot(node)
    assert after[0] == before[0]
    assert set(after[1]) - set(before[1]) == {f"sha256-{right}"}


def test_create_with_bad_files(node) -> None:
    with node.client() as c:
        r = c.post("/api/create", json={"model": "x:y", "files": {"m.gguf": ""}})
        assert r.status_code == 400 and _err(r) == "invalid digest format"
        r = c.post("/api/create", json={"model": "x:y", "files": {"m.gguf": "sha256:" + "0" * 64}})
        assert r.status_code in (400, 404)
        r = c.post("/api/create", json={"model": "x:y", "files": {"../evil": "sha256:" + "0" * 64}})
        assert r.status_code == 400
        r = c.post("/api/create", json={"model": "x:y", "from": "nope"})
        assert r.status_code in (400, 404)
    assert "x:y" not in [m["name"] for m in httpx.get(node.url + "/api/tags").json()["models"]]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(["labels", "peers", "model", "prompt", "messages", "stream", "options", "format",
                               "keep_alive", "input", "source", "destination", "files", "from", "raw", "context",
                               "think", "template", "system", "name", "suffix", "images", "tools", "max_tokens"])
bodies = st.dictionaries(field_names, json_values, max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(route=st.sampled_from(JSON_ROUTES), body=bodies)
def test_random_bodies_never_break_the_node(node, route: tuple[str, str], body: dict) -> None:
    method, path = route
    # never let a random body load something slow or delete the shared model
    if isinstance(body.get("model"), str) and body["model"].lower().startswith("omx-tiny"):
        body["model"] = "fuzz-" + body["model"]
    with node.client(timeout=60) as c:
        before = _snapshot(node)
        r = c.request(method, path, content=json.dumps(body))
        assert r.status_code < 500, (r.status_code, r.text)
        if r.status_code >= 400:
            assert _err(r)
        if path != "/api/create":
            assert _snapshot(node)[0] == before[0]
        assert c.get("/api/version").status_code == 200


@pytest.mark.parametrize(("path", "body", "needle"), [
    ("/api/v1/proxy/instances", {"url": "ftp://example.com"}, "base URL"),
    ("/api/v1/proxy/instances", {"url": "http://127.0.0.1:99999"}, "invalid port"),
    ("/api/v1/proxy/instances", {"url": "http://h:1/path"}, "base URL"),
    ("/api/v1/proxy/instances", {"url": 7}, "expected"),
    ("/api/v1/models/scale", {"model": 5, "replicas": 1}, "expected"),
    ("/api/v1/models/scale", {"model": "omx-tiny", "replicas": -1}, "replicas"),
    ("/api/v1/models/scale", {"model": "omx-tiny", "replicas": True}, "replicas"),
    ("/api/v1/models/scale", {"model": "omx-tiny", "replicas": 1, "labels": [1]}, "labels"),
    ("/api/v1/cluster/leader/transfer", {"to": 5}, "must be strings"),
    ("/api/v1/cluster/leader/transfer", {"to": "n-nobody"}, "not a Raft voter"),
])
def test_management_routes_reject_bad_values(node, path: str, body: dict, needle: str) -> None:
    with node.client() as c:
        r = c.post(path, json=body)
        assert r.status_code == 400 and needle in _err(r), r.text
        assert c.get("/api/version").status_code == 200


def test_routed_header_without_credentials_is_refused(node) -> None:
    with node.client() as c:
        r = c.post("/api/generate", json={"model": "omx-tiny", "prompt": "x"}, headers={"X-Omx-Routed": "x",
                                                                                        "Authorization": "Bearer no"})
        assert r.status_code == 403 and "credentials" in _err(r)
        r = c.get("/api/v1/internal/blobs/sha256:" + "0" * 64)
        assert r.status_code == 403
