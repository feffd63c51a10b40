"""Malformed and hostile input gets Ollama's status and an {"error": ...} body, and loses nothing."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omx.models.constrain import FormatError, validate_format

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


LONG_NAME = "h" * 300 + "/ns/m"  # a valid name whose host part no file system holds as one file name


@pytest.mark.parametrize(("method", "path", "body", "message"), [
    ("POST", "/api/show", {"model": LONG_NAME}, f"model '{LONG_NAME}' not found"),
    ("POST", "/api/generate", {"model": LONG_NAME, "prompt": "x"}, f"model '{LONG_NAME}' not found"),
    ("POST", "/api/chat", {"model": LONG_NAME, "messages": []}, f"model '{LONG_NAME}' not found"),
    ("POST", "/api/embed", {"model": LONG_NAME, "input": "x"}, f"model '{LONG_NAME}' not found"),
    ("POST", "/api/embeddings", {"model": LONG_NAME, "prompt": "x"},
     f'model "{LONG_NAME}" not found, try pulling it first'),
    ("POST", "/api/copy", {"source": LONG_NAME, "destination": "x"}, f'model "{LONG_NAME}" not found'),
    ("DELETE", "/api/delete", {"model": LONG_NAME}, f"model '{LONG_NAME}' not found"),
    ("POST", "/v1/chat/completions", {"model": LONG_NAME, "messages": [{"role": "user", "content": "x"}]},
     f"model '{LONG_NAME}' not found"),
    ("POST", "/v1/embeddings", {"model": LONG_NAME, "input": "x"}, f"model '{LONG_NAME}' not found"),
])
def test_names_too_long_for_the_file_system_are_not_found(node, method: str, path: str, body: dict,
                                                          message: str) -> None:
    with node.client() as c:
        r = c.request(method, path, json=body)
        assert r.status_code == 404 and _err(r) == message, r.text


def test_names_too_long_for_the_file_system_cannot_be_created(node) -> None:
    before = _snapshot(node)
    with node.client() as c:
        r = c.post("/api/copy", json={"source": "omx-tiny", "destination": LONG_NAME})
        assert r.status_code == 400 and _err(r) == f'destination "{LONG_NAME}" is invalid'
        r = c.post("/api/create", json={"model": LONG_NAME, "from": "omx-tiny"})
        assert r.status_code == 400 and _err(r) == "invalid model name"
    assert _snapshot(node) == before


CHAT = {"model": "omx-tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}


@pytest.mark.parametrize(("response_format", "needle"), [
    ("json", "'response_format' must be an object"),
    ({"type": "json_schema", "json_schema": "x"}, "response_format.json_schema must be an object"),
    ({"type": "json_schema", "json_schema": [1]}, "response_format.json_schema must be an object"),
    ({"type": "json_schema"}, "response_format.json_schema must be an object"),
    ({"type": "json_schema", "json_schema": {"schema": 5}}, "response_format.json_schema.schema must be an object"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema must be an object"),
    ({"type": "json_schema", "json_schema": {"schema": {"$ref": "#"}}}, "refers back to itself"),
    ({"type": ["json_object"]}, "invalid response_format type"),
])
def test_openai_malformed_response_format(node, response_format: object, needle: str) -> None:
    with node.client() as c:
        r = c.post("/v1/chat/completions", json={**CHAT, "response_format": response_format})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error" and needle in _err(r)


def test_openai_routes_answer_unexpected_errors_in_openai_shape(caplog: pytest.LogCaptureFixture) -> None:
    """A bug behind /v1 still gets OpenAI's error object (clients read error.message), and its traceback is logged."""
    from aiohttp.test_utils import make_mocked_request

    from omx.node.openai import openai_route

    @openai_route
    async def broken(request):
        raise KeyError("bug")

    resp = asyncio.run(broken(make_mocked_request("POST", "/v1/chat/completions")))
    assert resp.status == 500
    assert json.loads(resp.body) == {"error": {"message": "internal error: KeyError", "type": "api_error",
                                               "param": None, "code": None}}
    assert "Traceback" in caplog.text and "KeyError: 'bug'" in caplog.text


@pytest.mark.parametrize("path", ["/api/generate", "/v1/chat/completions"])
@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_body_not_in_its_content_encoding(node, path: str, encoding: str) -> None:
    with node.client() as c:
        r = c.post(path, content=b'{"model": "omx-tiny"}', headers={"Content-Encoding": encoding})
        assert r.status_code == 400, r.text
        assert _err(r) == f"request body is not valid {encoding} data (Content-Encoding: {encoding})"
        assert c.get("/api/version").status_code == 200


def test_gzip_bodies_are_read(node) -> None:
    with node.client() as c:
        body = {"model": "omx-tiny", "prompt": "x", "stream": False, "options": {"num_predict": 1}}
        r = c.post("/api/generate", content=gzip.compress(json.dumps(body).encode()),
                   headers={"Content-Encoding": "gzip"})
        assert r.status_code == 200 and r.json()["done"], r.text
        r = c.post("/v1/chat/completions", content=gzip.compress(json.dumps(CHAT).encode()),
                   headers={"Content-Encoding": "gzip"})
        assert r.status_code == 200 and r.json()["object"] == "chat.completion", r.text


@pytest.mark.parametrize(("url", "needle"), [
    ("http://[::1", "is not a valid URL: Invalid IPv6 URL"),
    ("http://[nonsense]:1", "is not a valid URL"),
    ("http://a b:1", "whitespace or control characters"),
    ("http://h\t:1", "whitespace or control characters"),
    ("http://" + "h" * 64 + ":1", "invalid host name"),
    ("http://h:1#x", "base URL"),
])
def test_instance_urls_that_do_not_parse(node, url: str, needle: str) -> None:
    with node.client() as c:
        r = c.post("/api/v1/proxy/instances", json={"url": url})
        assert r.status_code == 400 and needle in _err(r), r.text
        r = c.request("DELETE", "/api/v1/proxy/instances", json={"url": url})
        assert r.status_code == 400 and needle in _err(r), r.text
        r = c.delete("/api/v1/proxy/instances", params={"url": url})
        assert r.status_code == 400 and needle in _err(r), r.text
        assert url.strip() not in [i["url"] for i in c.get("/api/v1/proxy/instances").json()["instances"]]


SELF_REFERENCING = [
    {"$ref": "#"},
    {"anyOf": [{"$ref": "#"}]},
    {"allOf": [{"$ref": "#"}]},
    {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"oneOf": [{"$ref": "#/$defs/a"}]}}},
    {"type": "object", "properties": {"x": {"$ref": "#/$defs/loop"}}, "$defs": {"loop": {"$ref": "#/$defs/loop"}}},
]


@pytest.mark.parametrize("schema", SELF_REFERENCING)
def test_self_referencing_schema_is_400_up_front(node, schema: dict) -> None:
    with node.client() as c:
        for stream in (False, True):
            r = c.post("/api/generate", json={"model": "omx-tiny", "prompt": "x", "stream": stream, "format": schema,
                                              "options": {"num_predict": 4}})
            assert r.status_code == 400 and "refers back to itself" in _err(r), r.text
        r = c.post("/api/chat", json={"model": "omx-tiny", "messages": [{"role": "user", "content": "x"}],
                                      "format": schema, "options": {"num_predict": 4}})
        assert r.status_code == 400 and "refers back to itself" in _err(r), r.text


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"next": {"$ref": "#"}}},  # a linked list: recursion that can end
    {"anyOf": [{"type": "null"}, {"type": "array", "items": {"$ref": "#"}}]},
])
def test_recursive_schemas_that_can_end_still_work(node, schema: dict) -> None:
    with node.client() as c:
        r = c.post("/api/generate", json={"model": "omx-tiny", "prompt": "x", "stream": False, "format": schema,
                                          "options": {"num_predict": 4}})
        assert r.status_code == 200 and r.json()["done"], r.text


def test_deep_ref_chain_is_400_and_the_node_lives(node) -> None:
    """llguidance compiles $refs recursively: a long chain used to overflow its stack and kill the node."""
    n = 3000
    chain = {f"a{i}": {"$ref": f"#/$defs/a{i + 1}"} for i in range(n)}
    schema = {"$ref": "#/$defs/a0", "$defs": {**chain, f"a{n}": {"type": "integer"}}}
    anchored = {f"a{i}": {"$anchor": f"a{i}", "$ref": f"#a{i + 1}"} for i in range(n)}
    by_anchor = {"$ref": "#a0", "$defs": {**anchored, f"a{n}": {"$anchor": f"a{n}", "type": "integer"}}}
    with node.client() as c:
        for fmt, needle in ((schema, "nested too deeply"), (by_anchor, "more than 512 objects")):
            r = c.post("/api/generate", json={"model": "omx-tiny", "prompt": "x", "stream": False, "format": fmt})
            assert r.status_code == 400 and needle in _err(r), r.text
        assert c.get("/api/version").status_code == 200


@pytest.mark.parametrize("schema", SELF_REFERENCING)
def test_validate_format_rejects_loops_without_an_exit(schema: dict) -> None:
    with pytest.raises(FormatError, match=r"^invalid JSON schema in format: \".*\" refers back to itself"):
        validate_format(schema)


@pytest.mark.parametrize("schema", [
    {"$ref": "#/$defs/v", "$defs": {"v": {"anyOf": [
        {"type": "string"}, {"type": "array", "items": {"$ref": "#/$defs/v"}},
        {"type": "object", "additionalProperties": {"$ref": "#/$defs/v"}}]}}},  # any JSON value
    {"anyOf": [{"$ref": "#"}, True]},
    {"type": "integer", "$defs": {"unused": {"$ref": "#/$defs/unused"}}},  # never compiled, never reached
    {"type": "object", "properties": {"a/b": {"type": "object", "properties": {"c": {"$ref": "#/properties/a~1b"}}}}},
])
def test_validate_format_keeps_recursion_that_can_end(schema: dict) -> None:
    assert validate_format(schema) is schema


GREEDY_2 = {"temperature": 0, "num_predict": 2}


def test_what_gos_decoder_accepts_works(node) -> None:
    """Lone surrogate escapes become U+FFFD and null leaves a field at its default, as in Ollama's Go decoder."""
    with node.client(timeout=120) as c:
        r = c.post("/api/generate", content=b'{"model":"omx-tiny","prompt":"a\\ud800b","stream":false,'
                                            b'"options":{"num_predict":2}}')
        assert r.status_code == 200, r.text
        r = c.post("/api/chat", content=b'{"model":"omx-tiny","stream":false,"options":{"num_predict":2},'
                                        b'"messages":[{"role":"user","content":"\\udfff x"}]}')
        assert r.status_code == 200, r.text
        r = c.post("/api/embed", content=b'{"model":"omx-tiny","input":["\\ud83d"]}')
        assert r.status_code == 200 and len(r.json()["embeddings"]) == 1, r.text
        r = c.post("/v1/chat/completions", content=b'{"model":"omx-tiny","max_tokens":2,'
                                                    b'"messages":[{"role":"user","content":"\\ud800"}]}')
        assert r.status_code == 200, r.text
        r = c.post("/api/generate", json={"model": "omx-tiny", "prompt": None, "raw": None, "suffix": None,
                                          "stream": False})
        assert r.status_code == 200 and r.json()["done_reason"] == "load", r.text
        r = c.post("/api/chat", json={"model": "omx-tiny", "stream": False, "options": GREEDY_2, "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": {}}}]},
            {"role": "tool", "content": "42"}, {"role": "user", "content": "and?", "images": None}]})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize(("body", "needle"), [
    (b'{"model":"omx-tiny","prompt":' + b"1" * 5000 + b"}", "too many digits"),
    (b"[" * 100_000, "nested too deeply"),
    (b'{"model":"omx-tiny","options":' + b'{"a":' * 5000 + b"1" + b"}" * 5001, "nested too deeply"),
])
@pytest.mark.parametrize(("method", "path"), [("POST", "/api/generate"), ("POST", "/api/chat"),
                                              ("DELETE", "/api/delete"), ("POST", "/api/v1/proxy/instances"),
                                              ("POST", "/v1/chat/completions")])
def test_json_python_cannot_hold_is_a_400(node, method: str, path: str, body: bytes, needle: str) -> None:
    with node.client() as c:
        r = c.request(method, path, content=body)
        assert r.status_code == 400 and needle in _err(r), r.text


def test_integer_options_must_fit_go_int(node) -> None:
    with node.client() as c:
        before = _snapshot(node)
        for opts in ({"seed": 2**64}, {"num_ctx": 1e30}, {"num_predict": -(2**63) - 1}):
            r = c.post("/api/generate", json={"model": "omx-tiny", "prompt": "x", "stream": False, "options": opts})
            assert r.status_code == 400 and "out of range" in _err(r), r.text
            r = c.post("/api/create", json={"model": "range-x", "from": "omx-tiny", "parameters": opts,
                                            "stream": False})
            assert r.status_code == 400 and "out of range" in _err(r), r.text
        assert _snapshot(node) == before
        r = c.post("/api/generate", json={"model": "omx-tiny", "prompt": "x", "stream": False,
                                          "options": {**GREEDY_2, "seed": 2**63 - 1}})
        assert r.status_code == 200, r.text


def test_a_host_name_no_file_system_or_dns_can_hold(node) -> None:
    long_host = "h" * 300 + "/ns/m"
    with node.client() as c:
        for path in ("/api/show", "/api/generate", "/api/embed"):
            r = c.post(path, json={"model": long_host, "input": "x"})
            assert r.status_code == 404 and "not found" in _err(r), (path, r.text)
        r = c.post("/api/pull", json={"model": "a" * 64 + ".example/ns/m", "stream": False})
        assert r.status_code == 400 and "invalid registry address" in _err(r), r.text


def test_embedding_an_empty_string(node) -> None:
    with node.client(timeout=120) as c:
        r = c.post("/api/embed", json={"model": "omx-tiny", "input": ["", "x"]})
        assert r.status_code == 200, r.text
        a, b = r.json()["embeddings"]
        assert len(a) == len(b) > 0 and abs(sum(v * v for v in a) - 1) < 1e-3
        r = c.post("/v1/embeddings", json={"model": "omx-tiny", "input": ""})
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == len(a), r.text


def test_a_manifest_whose_config_is_not_a_config_is_refused(node) -> None:
    with node.client() as c:
        before = _snapshot(node)
        data = b"hello, not a config"
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        assert c.post(f"/api/blobs/{digest}", content=data).status_code in (200, 201)
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                    "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": digest,
                               "size": len(data)}, "layers": []}
        r = c.put("/api/v1/manifests", params={"model": "badconfig"}, content=json.dumps(manifest))
        assert r.status_code == 400 and "invalid config blob" in _err(r), r.text
        assert _snapshot(node)[0] == before[0]
        assert c.post("/api/show", json={"model": "badconfig"}).status_code == 404


@pytest.mark.parametrize("context", [[-1], [2**63], [10**9], [1.5]])
def test_context_of_tokens_the_model_does_not_have(node, context: list) -> None:
    with node.client(timeout=120) as c:
        r = c.post("/api/generate", json={"model": "omx-tiny", "prompt": "x", "stream": False, "context": context,
                                          "options": GREEDY_2})
        assert r.status_code == 400, r.text
        assert "context" in _err(r) and "C long" not in _err(r) and "too small" not in _err(r), r.text


def test_malformed_http_is_a_400_and_one_log_line(node) -> None:
    """aiohttp answers these itself; each used to log a traceback at ERROR, so any client could fill the log."""
    import socket

    from omx.node.launch import wait_until

    before = len(node.log)
    for head in (b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -5\r\n\r\n",
                 b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"):
        with socket.create_connection((node.url.split("//")[1].split(":")[0], int(node.url.rsplit(":", 1)[1])),
                                      timeout=10) as s:
            s.sendall(head)
            assert b" 400 " in s.recv(4096).split(b"\r\n")[0]
    wait_until(lambda: sum("malformed HTTP request" in line for line in node.log[before:]) >= 2, 10,
               what="one log line per malformed request")
    assert not any("Traceback" in line or " ERROR " in line for line in node.log[before:]), node.log[before:]
    assert httpx.get(node.url + "/api/version", timeout=5).status_code == 200
