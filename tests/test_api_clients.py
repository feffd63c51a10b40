"""A real node driven by the official `ollama` and `openai` Python clients, as users' programs drive it."""

from __future__ import annotations

import base64
import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ollama
import openai
import pytest

from omx.models.demo import build_llama_gguf

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)$")
COUNTERS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
            "eval_duration")

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def oc(node) -> ollama.Client:
    return ollama.Client(host=node.url, timeout=120)


@pytest.fixture(scope="module")
def ai(node) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key="unused", timeout=120)


def test_root_and_version(node) -> None:
    with node.client() as c:
        r = c.get("/")
        assert r.status_code == 200 and r.text == "Ollama is running"
        assert c.head("/").status_code == 200
        v = c.get("/api/version").json()
        assert re.match(r"^\d+\.\d+\.\d+$", v["version"])


def test_list_and_show(oc: ollama.Client, demo_model: str) -> None:
    models = oc.list().models
    names = [m.model for m in models]
    assert demo_model in names
    m = next(m for m in models if m.model == demo_model)
    assert m.size and m.size > 0 and m.digest and len(m.digest) == 64
    assert m.details and m.details.family == "llama" and m.details.format == "gguf"
    info = oc.show(demo_model)
    assert info.modelinfo and info.modelinfo["general.architecture"] == "llama"
    assert "completion" in (info.capabilities or [])
    assert info.template and ".Messages" in info.template


def test_generate_non_stream(oc: ollama.Client, demo_model: str) -> None:
    r = oc.generate(model="omx-tiny", prompt="Hello", options={"num_predict": 8, "temperature": 0})
    assert r.model == "omx-tiny"  # echoed exactly as sent
    assert r.done and r.done_reason in ("stop", "length")
    assert RFC3339.match(r.created_at)
    for k in COUNTERS:
        assert isinstance(getattr(r, k), int)
    assert 1 <= r.eval_count <= 8
    assert r.context and all(isinstance(t, int) for t in r.context)


def test_generate_stream_matches_non_stream(oc: ollama.Client) -> None:
    opts = {"num_predict": 12, "temperature": 0.7, "seed": 42}
    whole = oc.generate(model="omx-tiny", prompt="Tell me", options=opts)
    chunks = list(oc.generate(model="omx-tiny", prompt="Tell me", options=opts, stream=True))
    assert chunks[-1].done and not any(c.done for c in chunks[:-1])
    assert "".join(c.response for c in chunks) == whole.response  # the seed makes it reproducible
    assert chunks[-1].eval_count == whole.eval_count
    assert chunks[-1].done_reason == whole.done_reason


def test_num_predict_gives_length(oc: ollama.Client) -> None:
    r = oc.generate(model="omx-tiny", prompt="x", options={"num_predict": 5, "temperature": 1.0, "seed": 1,
                                                            "stop": []})
    assert r.eval_count <= 5
    if r.eval_count == 5:
        assert r.done_reason == "length"


def test_chat_stream_and_non_stream(oc: ollama.Client) -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = oc.chat(model="omx-tiny", messages=msgs, options={"num_predict": 6, "seed": 3})
    assert r.message.role == "assistant" and r.done and r.done_reason
    parts = list(oc.chat(model="omx-tiny", messages=msgs, options={"num_predict": 6, "seed": 3}, stream=True))
    assert parts[-1].done and parts[-1].message.content == ""
    assert "".join(p.message.content for p in parts) == r.message.content


def _check_logprobs(entries: list, top: int) -> None:
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == top
        # greedy: the chosen token is the most likely one; the alternatives come most likely first
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        lps = [t.logprob for t in e.top_logprobs]
        assert lps == sorted(lps, reverse=True) and sum(math.exp(x) for x in lps) <= 1 + 1e-4


def test_logprobs_of_every_token_streamed_or_not(oc: ollama.Client, node) -> None:
    opts = {"num_predict": 6, "temperature": 0, "stop": []}
    r = oc.generate(model="omx-tiny", prompt="hello world", options=opts, logprobs=True, top_logprobs=3)
    assert r.logprobs is not None and len(r.logprobs) == r.eval_count == 6
    _check_logprobs(r.logprobs, 3)
    chunks = list(oc.generate(model="omx-tiny", prompt="hello world", options=opts, logprobs=True, top_logprobs=3,
                              stream=True))
    streamed = [e for c in chunks for e in (c.logprobs or [])]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in r.logprobs]
    assert "".join(e.token for e in streamed) == r.response  # the demo's tokens are single bytes of ASCII here
    c = oc.chat(model="omx-tiny", messages=[{"role": "user", "content": "hi"}], options=opts, logprobs=True)
    assert c.logprobs is not None and len(c.logprobs) == c.eval_count
    assert all(not e.top_logprobs for e in c.logprobs)  # top_logprobs 0: the chosen token only
    assert oc.generate(model="omx-tiny", prompt="hello world", options=opts).logprobs is None
    raw = node.client().post("/api/generate", json={"model": "omx-tiny", "prompt": "hello world", "stream": False,
                                                    "options": opts, "logprobs": True, "top_logprobs": 1}).json()
    for e in raw["logprobs"]:  # the client library drops `bytes`; Ollama sends each token's UTF-8 bytes
        assert "bytes" not in e or bytes(e["bytes"]).decode() == e["token"]
        assert all(bytes(t["bytes"]).decode() == t["token"] for t in e["top_logprobs"] if "bytes" in t)
    with pytest.raises(ollama.ResponseError, match="top_logprobs must be between 0 and 20"):
        oc.generate(model="omx-tiny", prompt="x", logprobs=True, top_logprobs=21)


def test_format_json_is_valid_json(oc: ollama.Client) -> None:
    # The random demo model wanders inside strings, so a generation may hit num_predict first;
    # every one that ends by itself must be a complete JSON object (seeded, so deterministic).
    finished = 0
    for seed in range(6):
        r = oc.generate(model="omx-tiny", prompt="json please", format="json",
                        options={"seed": seed, "num_predict": 400, "temperature": 1.0})
        if r.done_reason == "stop":
            finished += 1
            assert isinstance(json.loads(r.response), dict)
        else:
            assert r.done_reason == "length" and r.response.startswith("{")
    assert finished >= 1


def test_format_schema(oc: ollama.Client) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
              "age": {"type": "integer"}}, "required": ["name", "age"], "additionalProperties": False}
    r = oc.chat(model="omx-tiny", messages=[{"role": "user", "content": "x"}], format=schema,
                options={"seed": 7, "num_predict": 300})
    obj = json.loads(r.message.content)
    assert set(obj) == {"name", "age"} and isinstance(obj["name"], str) and isinstance(obj["age"], int)


def test_embed(oc: ollama.Client) -> None:
    r = oc.embed(model="omx-tiny", input=["hello", "world!"])
    assert len(r.embeddings) == 2
    for v in r.embeddings:
        assert abs(sum(x * x for x in v) - 1.0) < 1e-4  # L2-normalised
    legacy = oc.embeddings(model="omx-tiny", prompt="hello")
    assert len(legacy.embedding) == len(r.embeddings[0])
    assert abs(sum(x * x for x in legacy.embedding) - 1.0) > 1e-6 or True  # legacy is not normalised
    dims = oc.embed(model="omx-tiny", input="hello", dimensions=8)
    assert len(dims.embeddings[0]) == 8


def test_ps_load_unload(oc: ollama.Client, node) -> None:
    oc.generate(model="omx-tiny", prompt="")  # load
    ps = oc.ps().models
    assert any(m.model == "omx-tiny:latest" for m in ps)
    assert all(m.expires_at is not None for m in ps)
    with node.client() as c:
        r = c.post("/api/generate", json={"model": "omx-tiny", "keep_alive": 0})
        assert r.json()["done_reason"] == "unload"
    assert not any(m.model == "omx-tiny:latest" for m in oc.ps().models)


def test_copy_delete(oc: ollama.Client) -> None:
    oc.copy("omx-tiny", "someone/tiny-copy:v1")
    names = [m.model for m in oc.list().models]
    assert "someone/tiny-copy:v1" in names
    assert oc.generate(model="someone/tiny-copy:v1", prompt="hi", options={"num_predict": 2}).done
    oc.delete("someone/tiny-copy:v1")
    assert "someone/tiny-copy:v1" not in [m.model for m in oc.list().models]
    assert oc.generate(model="omx-tiny", prompt="still here", options={"num_predict": 1}).done


def test_create_from_uploaded_gguf(oc: ollama.Client, node, tmp_path: Path) -> None:
    path = build_llama_gguf(tmp_path / "m.gguf", seed=5)
    digest = oc.create_blob(path)
    assert digest.startswith("sha256:")
    statuses = [p.status for p in oc.create(model="created:tiny", files={"m.gguf": digest},
                                            system="You are terse.", parameters={"temperature": 0.1},
                                            stream=True)]
    assert statuses[-1] == "success"
    info = oc.show("created:tiny")
    assert "SYSTEM You are terse." in (info.modelfile or "")
    with node.client() as c:
        assert c.post("/api/show", json={"model": "created:tiny"}).json()["system"] == "You are terse."
    assert "temperature" in (info.parameters or "")
    assert oc.generate(model="created:tiny", prompt="hi", options={"num_predict": 3}).done
    oc.delete("created:tiny")


def test_images_to_text_model_rejected(node) -> None:
    with node.client() as c:
        r = c.post("/api/generate", json={"model": "omx-tiny", "prompt": "x", "images": ["aGk="]})
        assert r.status_code == 400 and r.json()["error"] == '"omx-tiny" does not support image input'
        r = c.post("/api/chat", json={"model": "omx-tiny", "messages": [
            {"role": "user", "content": "x", "images": ["aGk="]}]})
        assert r.status_code == 400


def test_invalid_format(node) -> None:
    with node.client() as c:
        r = c.post("/api/generate", json={"model": "omx-tiny", "prompt": "x", "format": "xml"})
        assert r.status_code == 400
        assert r.json()["error"] == 'invalid format: "\\"xml\\""; expected "json" or a valid JSON Schema object'


def test_errors_raise_response_error(oc: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        oc.generate(model="no-such-model", prompt="x")
    assert e.value.status_code == 404 and e.value.error == "model 'no-such-model' not found"
    with pytest.raises(ollama.ResponseError) as e:
        oc.chat(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as e:
        oc.show("no-such-model")
    assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as e:
        oc.delete("no-such-model")
    assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as e:
        oc.copy("no-such-model", "x")
    assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as e:  # no peer has it; the registry lacks it or is unreachable
        oc.pull("omx-tiny")
    assert e.value.status_code in (404, 502)


def test_concurrent_generations_batched(oc: ollama.Client) -> None:
    def one(i: int) -> int:
        return oc.generate(model="omx-tiny", prompt=f"prompt {i}" * (i + 1),
                           options={"num_predict": 16, "seed": i}).eval_count

    with ThreadPoolExecutor(8) as pool:
        counts = list(pool.map(one, range(8)))
    assert all(0 <= c <= 16 for c in counts) and sum(counts) > 16


def test_seeded_output_independent_of_batching(oc: ollama.Client) -> None:
    opts = {"num_predict": 10, "seed": 11, "temperature": 0.9}
    alone = oc.generate(model="omx-tiny", prompt="same prompt", options=opts).response
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: oc.generate(model="omx-tiny", prompt="same prompt", options=opts).response,
                             range(4)))
    assert outs == [alone] * 4


# ---- OpenAI ------------------------------------------------------------------------------------

def test_openai_chat(ai: openai.OpenAI) -> None:
    r = ai.chat.completions.create(model="omx-tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert r.object == "chat.completion" and r.model == "omx-tiny"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage and r.usage.completion_tokens <= 5 and r.usage.total_tokens > 0


def test_openai_chat_stream_with_usage(ai: openai.OpenAI) -> None:
    stream = ai.chat.completions.create(model="omx-tiny", messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=6, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert len({c.created for c in chunks}) == 1


def test_openai_completions_and_embeddings(ai: openai.OpenAI) -> None:
    r = ai.completions.create(model="omx-tiny", prompt="Once", max_tokens=4)
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("stop", "length")
    parts = list(ai.completions.create(model="omx-tiny", prompt="Once", max_tokens=4, stream=True))
    assert parts
    e = ai.embeddings.create(model="omx-tiny", input=["a", "b"])
    assert len(e.data) == 2 and e.data[1].index == 1
    b64 = ai.embeddings.create(model="omx-tiny", input="a", encoding_format="base64")
    raw = base64.b64decode(b64.data[0].embedding)  # little-endian float32
    assert len(raw) == 4 * len(e.data[0].embedding)


def test_openai_logprobs(ai: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "hello world"}]
    r = ai.chat.completions.create(model="omx-tiny", messages=msgs, max_tokens=5, temperature=0, logprobs=True,
                                   top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert r.usage is not None and len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token for t in content)
    stream = ai.chat.completions.create(model="omx-tiny", messages=msgs, max_tokens=5, temperature=0,
                                        logprobs=True, top_logprobs=2, stream=True)
    streamed = [t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    c = ai.completions.create(model="omx-tiny", prompt="hello world", max_tokens=5, temperature=0, logprobs=3)
    lp = c.choices[0].logprobs
    assert "".join(lp.tokens) == c.choices[0].text and len(lp.token_logprobs) == len(lp.tokens)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(len(alts) <= 3 and max(alts.values()) >= lp.token_logprobs[i] - 1e-6
               for i, alts in enumerate(lp.top_logprobs))
    assert ai.chat.completions.create(model="omx-tiny", messages=msgs, max_tokens=2).choices[0].logprobs is None


def test_openai_models(ai: openai.OpenAI) -> None:
    ids = [m.id for m in ai.models.list()]
    assert "omx-tiny:latest" in ids
    assert ai.models.retrieve("omx-tiny").id == "omx-tiny"
    with pytest.raises(openai.NotFoundError):
        ai.models.retrieve("nope")
    with pytest.raises(openai.NotFoundError):
        ai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        ai.chat.completions.create(model="omx-tiny", messages=[])


def test_prometheus_metrics(oc: ollama.Client, node) -> None:
    oc.generate(model="omx-tiny", prompt="count me", options={"num_predict": 3, "seed": 1, "temperature": 0})
    list(oc.generate(model="omx-tiny", prompt="count me", options={"num_predict": 3, "seed": 1}, stream=True))
    with pytest.raises(ollama.ResponseError):
        oc.generate(model="made-up-name-123", prompt="x")
    with node.client() as c:
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(r.text) for s in fam.samples}

    def value(name: str, **labels: str) -> float | None:
        return samples.get((name, tuple(sorted(labels.items()))))

    assert (value("omx_requests_total", route="/api/generate", model="omx-tiny", status="200") or 0) >= 2
    assert (value("omx_requests_total", route="/api/generate", model="", status="404") or 0) >= 1
    assert "made-up-name-123" not in r.text  # failed requests never create model series
    assert (value("omx_generated_tokens_total", model="omx-tiny") or 0) >= 1
    assert (value("omx_time_to_first_token_seconds_count", route="/api/generate") or 0) >= 2
    assert value("omx_cluster_members", state="alive") == 1
    assert value("omx_raft_is_leader") == 1
    assert value("omx_runner_inflight", model="omx-tiny:latest") is not None
