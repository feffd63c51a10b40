"""The content-addressed store: blobs, manifests, listing, delete/copy, create and GGUF metadata."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file

from omx.models.ggufmeta import GGUFError, human_number, read_gguf
from omx.models.manifest import (
    MEDIA_TYPE_CONFIG,
    MEDIA_TYPE_JSON,
    MEDIA_TYPE_MODEL,
    MEDIA_TYPE_PARAMS,
    MEDIA_TYPE_SYSTEM,
    MEDIA_TYPE_TEMPLATE,
    MEDIA_TYPE_TENSOR,
    InvalidManifest,
    Layer,
    Manifest,
)
from omx.models.names import InvalidDigest, InvalidModelName, ModelName
from omx.models.store import (
    TMP_PREFIX,
    BlobNotFound,
    DigestMismatch,
    InvalidModelInput,
    ModelNotFound,
    Store,
)
from omx.protocols.modelfile import parse_modelfile

VOCAB = 1500  # over Ollama's 1024-element limit, so model_info must hide the token array


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_gguf(path: Path, *, arch: str = "llama", embedding: bool = False, dim: int = 8) -> Path:
    """A tiny but well-formed GGUF: metadata plus two tensors (no model code needs to run it)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_context_length(256)
    w.add_embedding_length(dim)
    w.add_block_count(1)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_layer_norm_rms_eps(1e-5)
    if embedding:
        w.add_pooling_type(gguf.PoolingType.MEAN)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    w.add_chat_template("{{ messages }}")
    w.add_tensor("token_embd.weight", np.zeros((32, dim), dtype=np.float16))
    w.add_tensor("output_norm.weight", np.ones((dim,), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def build_hf_dir(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "max_position_embeddings": 128,
        "hidden_size": 8, "torch_dtype": "bfloat16",
    }))
    save_file({"model.embed_tokens.weight": np.zeros((16, 8), dtype=np.float16),
               "model.norm.weight": np.ones((8,), dtype=np.float16)}, str(path / "model.safetensors"))
    (path / "tokenizer.json").write_text("{}")
    (path / "tokenizer_config.json").write_text('{"chat_template": "x"}')
    (path / "README.md").write_text("not copied")
    (path / "pytorch_model.bin").write_bytes(b"not copied")
    (path / "sub").mkdir()
    (path / "sub" / "extra.json").write_text("[]")
    return path


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    return build_gguf(tmp_path / "tiny.gguf")


def visible_blobs(s: Store) -> list[str]:
    return sorted(os.listdir(s.blobs_dir))


def simple_manifest(s: Store, *texts: bytes) -> Manifest:
    layers = [Layer(media_type=MEDIA_TYPE_SYSTEM, digest=s.put_blob_bytes(t), size=len(t)) for t in texts]
    cfg = b'{"model_format":"gguf","model_family":"llama"}'
    return Manifest(config=Layer(media_type=MEDIA_TYPE_CONFIG, digest=s.put_blob_bytes(cfg), size=len(cfg)),
                    layers=layers)


# ---- blobs ------------------------------------------------------------------------------------------------


def test_put_blob_bytes_and_file(store: Store, tmp_path: Path) -> None:
    d = store.put_blob_bytes(b"hello")
    assert d == "sha256:" + sha(b"hello")
    p = store.blob_path(d)
    assert p.name == "sha256-" + sha(b"hello") and p.read_bytes() == b"hello"
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
    assert store.has_blob(d) and store.has_blob(d.replace(":", "-")) and store.blob_size(d) == 5
    src = tmp_path / "big.bin"
    data = os.urandom(3 * 1024 * 1024 + 17)
    src.write_bytes(data)
    digest, size = store.put_blob_file(src)
    assert (digest, size) == ("sha256:" + sha(data), len(data))
    assert store.blob_path(digest).read_bytes() == data
    assert not any(n.startswith(TMP_PREFIX) for n in visible_blobs(store))


def test_blob_writer_is_invisible_until_verified(store: Store) -> None:
    data = b"x" * 1000
    w = store.begin_blob("sha256-" + sha(data).upper())
    w.write(data[:500])
    assert not store.has_blob("sha256:" + sha(data))
    assert all(n.startswith(TMP_PREFIX) for n in visible_blobs(store))
    w.write(data[500:])
    assert w.commit() == "sha256:" + sha(data)
    assert visible_blobs(store) == ["sha256-" + sha(data)]


@pytest.mark.parametrize("given", ["sha256:" + "0" * 64, "sha256-" + "0" * 64, "0" * 64])
def test_digest_mismatch_leaves_nothing(store: Store, given: str) -> None:
    w = store.begin_blob(given)
    w.write(b"payload")
    with pytest.raises(DigestMismatch) as e:
        w.commit()
    shown = given if given.startswith("sha256") else "sha256:" + given
    assert str(e.value) == f'digest mismatch, expected "{shown}", got "sha256:{sha(b"payload")}"'
    assert e.value.got == "sha256:" + sha(b"payload")
    assert visible_blobs(store) == []


def test_bare_hex_digests_are_accepted_for_blob_access(store: Store) -> None:
    d = store.put_blob_bytes(b"hello")
    hex_digest = sha(b"hello")
    assert store.has_blob(hex_digest) and store.has_blob(hex_digest.upper())
    assert store.blob_path(hex_digest) == store.blob_path(d)
    with store.begin_blob(hex_digest) as w:
        w.write(b"hello")
        assert w.commit() == d and w.existed


def test_blob_writer_abort_and_context_manager(store: Store) -> None:
    w = store.begin_blob(None)
    w.write(b"abc")
    w.abort()
    with pytest.raises(RuntimeError), store.begin_blob(None) as w2:
        w2.write(b"def")
        raise RuntimeError("client went away")
    assert visible_blobs(store) == []
    with pytest.raises(InvalidDigest):
        store.begin_blob("sha256:nothex")
    with pytest.raises(InvalidDigest):
        store.blob_path("../../etc/passwd")


def test_stale_temps_removed_on_open_but_live_ones_kept(tmp_path: Path) -> None:
    s = Store(tmp_path / "st")
    stale = s.blobs_dir / f"{TMP_PREFIX}999999999-deadbeef"
    stale.write_bytes(b"junk")
    stale_manifest = s.manifests_dir / "h" / "n" / "m" / f"{TMP_PREFIX}999999999-x"
    stale_manifest.parent.mkdir(parents=True)
    stale_manifest.write_bytes(b"{}")
    live = s.begin_blob(None)
    live.write(b"in flight")
    Store(tmp_path / "st")  # a second open must not break the first one's upload
    assert not stale.exists() and not stale_manifest.exists()
    assert live.commit() == "sha256:" + sha(b"in flight")


# ---- blobs made visible before their data fsync -----------------------------------------------------------


def journal(s: Store) -> list[str]:
    return sorted(os.listdir(s.unsynced_dir)) if s.unsynced_dir.exists() else []


def test_crash_recovery_rehashes_journaled_blobs(tmp_path: Path) -> None:
    """What a crash can leave: blobs renamed into place whose data never reached the disk. Opening the store
    keeps the ones that still hash to their name and deletes the rest, before anything can read them."""
    s = Store(tmp_path / "st")
    good, torn = b"all bytes made it", b"half of these bytes made it"
    s.blob_path(sha(good)).write_bytes(good)
    s.blob_path(sha(torn)).write_bytes(torn[:10] + bytes(len(torn) - 10))  # zeros where data was lost
    never_renamed = "ab" * 32
    s.unsynced_dir.mkdir()
    for h in (sha(good), sha(torn), never_renamed):
        (s.unsynced_dir / f"sha256-{h}").touch()
    (s.unsynced_dir / "stray").touch()
    reopened = Store(tmp_path / "st")
    assert reopened.has_blob(sha(good)) and reopened.blob_path(sha(good)).read_bytes() == good
    assert not reopened.has_blob(sha(torn))
    assert journal(reopened) == []


def test_unsynced_install_journals_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Store(tmp_path / "st")
    data = os.urandom(1 << 20)
    tmp = s.blobs_dir / f"{TMP_PREFIX}{os.getpid()}-test"
    tmp.write_bytes(data)
    seen_at_rename: list[list[str]] = []
    real_replace = os.replace

    def replace(src: object, dst: object) -> None:
        seen_at_rename.append(journal(s))
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr("omx.models.store.os.replace", replace)
    pins: set[str] = set()
    assert s.install_blob(tmp, sha(data), pins, synced=False) is False
    assert seen_at_rename == [[f"sha256-{sha(data)}"]]
    assert pins == {sha(data)} and s.blob_path(sha(data)).read_bytes() == data
    assert s.wait_synced(timeout=30)
    assert journal(s) == []
    s.unpin_all(pins)


def test_second_open_leaves_a_pending_sync_alone(tmp_path: Path, held_blob_sync: threading.Event) -> None:
    """Another Store on the same root (same process) must neither re-hash nor clear a sync in flight."""
    s = Store(tmp_path / "st")
    release = held_blob_sync
    data = b"still syncing"
    tmp = s.blobs_dir / f"{TMP_PREFIX}{os.getpid()}-test"
    tmp.write_bytes(data)
    s.install_blob(tmp, sha(data), None, synced=False)
    assert not s.wait_synced(timeout=0.05)
    Store(tmp_path / "st")
    assert journal(s) == [f"sha256-{sha(data)}"] and s.has_blob(sha(data))
    release.set()
    assert s.wait_synced(timeout=30)
    assert journal(s) == []


def test_failed_background_fsync_removes_the_blob(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a failed fsync the bytes on disk are unknown: the blob goes (and the journal entry with it)."""
    s = Store(tmp_path / "st")
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):  # the blob; directories still sync
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr("omx.models.store.os.fsync", fsync)
    data = b"lost to a disk error"
    tmp = s.blobs_dir / f"{TMP_PREFIX}{os.getpid()}-test"
    tmp.write_bytes(data)
    s.install_blob(tmp, sha(data), None, synced=False)
    assert s.wait_synced(timeout=30)
    assert not s.has_blob(sha(data)) and journal(s) == []


# ---- manifests --------------------------------------------------------------------------------------------


def test_write_read_manifest_and_digest(store: Store) -> None:
    m = simple_manifest(store, b"sys")
    digest = store.write_manifest("m:v1", m)
    raw = (store.manifests_dir / "registry.ollama.ai" / "library" / "m" / "v1").read_bytes()
    assert digest == sha(raw) == store.manifest_digest("m:v1")
    assert raw.startswith(b'{"schemaVersion":2,'
                          b'"mediaType":"application/vnd.docker.distribution.manifest.v2+json",'
                          b'"config":{"mediaType":"application/vnd.docker.container.image.v1+json"')
    assert store.read_manifest("m:v1") == m
    # verbatim bytes (a pulled manifest) keep their digest
    pulled = json.dumps(json.loads(raw), indent=2).encode()
    assert store.write_manifest("m:v2", pulled) == sha(pulled) == store.manifest_digest("m:v2")
    assert not any(f.startswith(".") for _, _, fs in os.walk(store.manifests_dir) for f in fs)


def test_write_manifest_requires_blobs_and_valid_json(store: Store) -> None:
    m = simple_manifest(store, b"sys")
    m.layers.append(Layer(media_type=MEDIA_TYPE_MODEL, digest="sha256:" + "1" * 64, size=3))
    with pytest.raises(BlobNotFound):
        store.write_manifest("m", m)
    with pytest.raises(InvalidManifest):
        store.write_manifest("m", b"{not json")
    with pytest.raises(InvalidModelName):
        store.write_manifest("../evil", simple_manifest(store))
    assert not store.exists("m")
    with pytest.raises(ModelNotFound):
        store.read_manifest("m")


def test_case_insensitive_lookup_reuses_existing_path(store: Store) -> None:
    store.write_manifest("Foo:Latest", simple_manifest(store, b"a"))
    store.write_manifest("foo:latest", simple_manifest(store, b"b"))
    store.write_manifest("FOO:v2", simple_manifest(store, b"c"))
    model_dir = store.manifests_dir / "registry.ollama.ai" / "library"
    assert os.listdir(model_dir) == ["Foo"]
    assert sorted(os.listdir(model_dir / "Foo")) == ["Latest", "v2"]
    assert store.resolve("FOO").parts()[2:] == ("Foo", "Latest")
    assert store.load("fOO:LATEST").system == "b"
    assert [e.display for e in store.list_models()] in (["Foo:Latest", "Foo:v2"], ["Foo:v2", "Foo:Latest"])


def test_list_models_sizes_digests_order_and_strays(store: Store) -> None:
    m1 = simple_manifest(store, b"one")
    m2 = simple_manifest(store, b"two", b"three")
    store.write_manifest("old", m1)
    store.write_manifest("user/new:tag", m2)
    base = store.manifests_dir / "registry.ollama.ai"
    os.utime(base / "library" / "old" / "latest", (1_000_000, 1_000_000))
    # garbage that must be skipped, not crash the listing
    (store.manifests_dir / "stray-file").write_text("x")
    (base / "library" / "old" / "sub").mkdir()
    (base / "library" / "bad name").mkdir()
    (base / "library" / "bad name" / "latest").write_text("{}")
    (base / "library" / "broken").mkdir()
    (base / "library" / "broken" / "latest").write_text("{not json")
    (base / "library" / "deep" / "x" / "y").mkdir(parents=True)
    rows = store.list_models()
    assert [r.display for r in rows] == ["user/new:tag", "old:latest"]
    new, old = rows
    assert new.size == m2.config.size + sum(x.size for x in m2.layers) == m2.size
    assert new.digest == sha((base / "user" / "new" / "tag").read_bytes())
    assert old.modified_at.timestamp() == 1_000_000 and old.modified_at.tzinfo is not None
    assert new.details["format"] == "gguf" and new.details["family"] == "llama"
    assert new.details["parent_model"] == ""


def test_list_empty(store: Store) -> None:
    assert store.list_models() == []


def test_delete_collects_only_unshared_blobs(store: Store) -> None:
    a = simple_manifest(store, b"shared", b"only-a")
    b = simple_manifest(store, b"shared", b"only-b")
    store.write_manifest("ns/a", a)
    store.write_manifest("ns/b", b)
    removed = store.delete("NS/A")
    assert removed == ["sha256:" + sha(b"only-a")]
    assert store.has_blob("sha256:" + sha(b"shared")) and store.has_blob(b.config.digest)
    assert not (store.manifests_dir / "registry.ollama.ai" / "ns" / "a").exists()
    with pytest.raises(ModelNotFound):
        store.delete("ns/a")
    store.delete("ns/b")
    assert visible_blobs(store) == []
    assert os.listdir(store.manifests_dir) == []


def test_copy_duplicates_only_the_manifest(store: Store) -> None:
    store.write_manifest("src", simple_manifest(store, b"s"))
    blobs = visible_blobs(store)
    store.copy("src", "other/dst:t")
    assert visible_blobs(store) == blobs
    assert store.manifest_digest("other/dst:t") == store.manifest_digest("src")
    store.delete("src")
    assert store.load("other/dst:t").system == "s"  # its blobs survived: dst still references them
    with pytest.raises(ModelNotFound):
        store.copy("missing", "x")


def test_load_rejects_escaping_layer_names(store: Store) -> None:
    m = simple_manifest(store)
    m.layers.append(Layer(media_type=MEDIA_TYPE_JSON, digest=store.put_blob_bytes(b"{}"), size=2,
                          name="../../etc/passwd"))
    store.write_manifest("evil", m)
    with pytest.raises(InvalidManifest):
        store.load("evil")
    assert [e.display for e in store.list_models()] == ["evil:latest"]


def test_load_missing_blob(store: Store) -> None:
    m = simple_manifest(store, b"sys")
    store.write_manifest("m", m)
    store.blob_path(m.layers[0].digest).unlink()
    with pytest.raises(BlobNotFound):
        store.load("m")
    with pytest.raises(ModelNotFound):
        store.load("nope")


def test_prune(store: Store) -> None:
    store.write_manifest("keep", simple_manifest(store, b"k"))
    orphan = store.put_blob_bytes(b"orphan")
    partial = store.blobs_dir / ("sha256-" + "2" * 64 + "-partial")
    partial.write_bytes(b"")
    assert store.prune() == [orphan]
    assert partial.exists() and store.load("keep").system == "k"


# ---- create -----------------------------------------------------------------------------------------------


def statuses(events: list[dict[str, object]]) -> list[str]:
    return [str(e["status"]) for e in events]


def test_create_from_gguf(store: Store, tiny_gguf: Path) -> None:
    events = list(store.create("tiny", gguf=tiny_gguf, template="{{ .Prompt }}", system="be brief",
                               parameters={"stop": ["<|end|>"], "num_ctx": 128}, license="MIT"))
    st = statuses(events)
    assert st[0] == "parsing GGUF" and st[-2:] == ["writing manifest", "success"]
    blob = "sha256:" + sha(tiny_gguf.read_bytes())
    assert f"creating new layer {blob}" in st
    # model, template, system, license, params and config layers
    assert len([s for s in st if s.startswith("creating new layer")]) == 6
    m = store.load("tiny")
    assert m.model_path == store.blob_path(blob)
    assert [x.media_type for x in m.manifest.layers][:3] == [MEDIA_TYPE_MODEL, MEDIA_TYPE_TEMPLATE,
                                                             MEDIA_TYPE_SYSTEM]
    assert m.config.model_format == "gguf" and m.config.model_family == "llama"
    assert m.config.model_families == ["llama"]
    assert m.details["parameter_size"] == "264"  # 32*8 + 8 elements
    assert m.details["quantization_level"] == "F16"
    assert m.config.context_length == 256 and m.config.embedding_length == 8
    assert m.config.rootfs.diff_ids == [x.digest for x in m.manifest.layers]
    assert (m.template, m.system, m.license) == ("{{ .Prompt }}", "be brief", ["MIT"])
    assert m.params == {"stop": ["<|end|>"], "num_ctx": 128}
    params_blob = store.blob_path(m.manifest.layers_of(MEDIA_TYPE_PARAMS)[0].digest).read_bytes()
    assert params_blob == b'{"num_ctx":128,"stop":["\\u003c|end|\\u003e"]}\n'  # Go's encoder, byte for byte
    assert m.capabilities == ["completion"]
    assert m.digest == store.manifest_digest("tiny") and m.size == m.manifest.size
    assert store.runner_files(m) == ("gguf", store.blobs_dir, "sha256-" + sha(tiny_gguf.read_bytes()))
    # same inputs again: every layer is reused
    again = statuses(list(store.create("tiny2", gguf=tiny_gguf, template="{{ .Prompt }}", system="be brief",
                                       parameters={"stop": ["<|end|>"], "num_ctx": 128}, license="MIT")))
    assert not [s for s in again if s.startswith("creating")]
    assert store.manifest_digest("tiny2") == store.manifest_digest("tiny")


def test_show(store: Store, tiny_gguf: Path) -> None:
    list(store.create("tiny", gguf=tiny_gguf, template="{{ .Prompt }}", system="sys", license=["A", "B"],
                      parameters={"stop": ["<x>", "y"], "num_ctx": 64},
                      messages=[{"role": "user", "content": "hi"}]))
    m = store.load("tiny")
    info = store.show(m)
    json.dumps(info)
    assert info["license"] == "A\nB" and info["template"] == "{{ .Prompt }}" and info["system"] == "sys"
    assert info["parameters"].splitlines() == ["num_ctx" + " " * 24 + "64", "stop" + " " * 27 + '"<x>"',
                                               "stop" + " " * 27 + '"y"']
    assert info["details"] == m.details and info["capabilities"] == ["completion"]
    assert info["messages"] == [{"role": "user", "content": "hi"}]
    assert info["model_info"]["general.architecture"] == "llama"
    assert info["model_info"]["tokenizer.ggml.tokens"] is None and "tensors" not in info
    assert info["modelfile"].splitlines()[3:5] == ["", f"FROM {m.model_path}"]
    mf = parse_modelfile(info["modelfile"])
    assert (mf.parameters, mf.system, mf.license, mf.messages) == (m.params, m.system, m.license, m.messages)
    verbose = store.show(m, verbose=True)
    assert len(verbose["model_info"]["tokenizer.ggml.tokens"]) == VOCAB and len(verbose["tensors"]) == 2


def test_show_safetensors(store: Store, tmp_path: Path) -> None:
    list(store.create("hf", hf_dir=build_hf_dir(tmp_path / "hf")))
    info = store.show(store.load("hf"))
    assert info["model_info"] == {"general.architecture": "llama", "general.parameter_count": 136,
                                  "llama.context_length": 128, "llama.embedding_length": 8}
    assert info["modelfile"].splitlines()[4] == "FROM hf:latest"


def test_create_from_uploaded_blob_and_files(store: Store, tiny_gguf: Path) -> None:
    digest, _ = store.put_blob_file(tiny_gguf)
    list(store.create("a", model_file_digest=digest.replace(":", "-")))
    list(store.create("b", files={"tiny.gguf": digest}))
    assert store.load("a").model_path == store.load("b").model_path == store.blob_path(digest)
    assert store.load("a").template == "{{ .Prompt }}"  # Ollama's default when there is no template layer
    with pytest.raises(BlobNotFound):
        list(store.create("c", model_file_digest="sha256:" + "3" * 64))
    with pytest.raises(InvalidDigest):
        store.create("c", files={"x.gguf": ""})
    with pytest.raises(InvalidModelInput):
        store.create("c", files={"../x.gguf": digest})
    not_gguf = store.put_blob_bytes(b"definitely not a model")
    with pytest.raises(InvalidModelInput):
        list(store.create("c", model_file_digest=not_gguf))
    with pytest.raises(InvalidModelInput):
        list(store.create("c", files={"notes.txt": not_gguf}))
    assert not store.exists("c")


def test_failed_or_abandoned_create_leaves_no_new_blobs(store: Store, tmp_path: Path, tiny_gguf: Path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(InvalidModelInput):
        list(store.create("x", gguf=junk))
    assert visible_blobs(store) == []
    gen = store.create("x", gguf=tiny_gguf, system="s")
    assert next(gen) == {"status": "parsing GGUF"}
    gen.close()  # the client went away
    assert visible_blobs(store) == [] and not store.exists("x")
    list(store.create("kept", gguf=tiny_gguf))
    before = visible_blobs(store)
    with pytest.raises(ModelNotFound):
        list(store.create("y", from_model="missing"))
    gen = store.create("y", from_model="kept", system="new")
    next(gen)
    gen.close()
    assert visible_blobs(store) == before  # the shared base blobs stay


def test_create_argument_errors(store: Store, tiny_gguf: Path) -> None:
    with pytest.raises(InvalidModelInput):
        store.create("x")
    with pytest.raises(InvalidModelInput):
        store.create("x", gguf=tiny_gguf, from_model="y")
    with pytest.raises(InvalidModelName):
        store.create("bad name", gguf=tiny_gguf)
    with pytest.raises(ModelNotFound):
        list(store.create("x", from_model="missing"))


def test_create_embedding_model_capabilities(store: Store, tmp_path: Path) -> None:
    p = build_gguf(tmp_path / "embed.gguf", arch="bert", embedding=True)
    list(store.create("embed", gguf=p, template="{{ .Prompt }}{{ if .Tools }}{{ end }}{{ .Suffix }}"))
    assert store.load("embed").capabilities == ["embedding", "tools", "insert"]


def test_create_from_model_inherits_and_overrides(store: Store, tiny_gguf: Path) -> None:
    list(store.create("base", gguf=tiny_gguf, template="T", system="S",
                      parameters={"temperature": 0.5, "stop": ["a"]}))
    events = statuses(list(store.create("kid", from_model="BASE", system="S2",
                                        parameters={"stop": ["b"], "num_ctx": 64})))
    assert "parsing GGUF" not in events
    kid, base = store.load("kid"), store.load("base")
    assert kid.model_path == base.model_path and kid.template == "T" and kid.system == "S2"
    assert kid.params == {"stop": ["b"], "num_ctx": 64, "temperature": 0.5}  # new keys win, old ones kept
    assert kid.parent_model == "base:latest" and kid.details["parent_model"] == "base:latest"
    assert kid.config.model_family == "llama"
    # deleting the base keeps everything the child still uses
    store.delete("base")
    assert store.load("kid").template == "T"
    store.delete("kid")
    assert visible_blobs(store) == []


def test_create_from_hf_dir_and_materialize(store: Store, tmp_path: Path) -> None:
    src = build_hf_dir(tmp_path / "hf")
    events = statuses(list(store.create("hf-model", hf_dir=src)))
    assert events[0] == "reading model metadata" and events[-1] == "success"
    m = store.load("hf-model")
    named = {x.name: x.media_type for x in m.manifest.layers}
    assert named == {"config.json": MEDIA_TYPE_JSON, "model.safetensors": MEDIA_TYPE_TENSOR,
                     "sub/extra.json": MEDIA_TYPE_JSON, "tokenizer.json": MEDIA_TYPE_JSON,
                     "tokenizer_config.json": MEDIA_TYPE_JSON}
    assert m.model_path is None and m.format == "safetensors"
    assert m.config.model_family == "llama" and m.details["parameter_size"] == "136"
    assert m.details["quantization_level"] == "F16"
    assert m.config.context_length == 128 and m.config.embedding_length == 8
    assert m.capabilities == ["completion"]
    loc = store.materialize_hf_dir(m)
    assert loc.gguf_file is None and loc.path.is_relative_to(store.root)
    for rel in named:
        assert (loc.path / rel).is_symlink()
        assert (loc.path / rel).read_bytes() == (src / rel).read_bytes()
    assert store.materialize_hf_dir(m) == loc  # reused
    assert store.runner_files(m) == ("hf", loc.path, None)
    # the same directory uploaded as blobs (/api/create "files") gives the same model
    files = {rel: "sha256:" + sha((src / rel).read_bytes()) for rel in named}
    list(store.create("hf-files", files=files))
    assert store.manifest_digest("hf-files") == store.manifest_digest("hf-model")
    store.delete("hf-files")
    store.delete("hf-model")
    assert not loc.path.exists() and visible_blobs(store) == []


def test_create_from_hf_dir_requires_config_and_weights(store: Store, tmp_path: Path) -> None:
    d = tmp_path / "empty"
    d.mkdir()
    (d / "config.json").write_text("{}")
    with pytest.raises(InvalidModelInput):
        list(store.create("x", hf_dir=d))


def test_create_pins_blobs_against_concurrent_delete(store: Store, tiny_gguf: Path) -> None:
    list(store.create("a", gguf=tiny_gguf))
    gen = store.create("b", from_model="a", system="new")
    first = next(gen)  # b now holds pins on a's blobs
    store.delete("a")
    rest = list(gen)
    assert statuses([first, *rest])[-1] == "success"
    assert store.load("b").model_path is not None and store.load("b").model_path.exists()


def test_concurrent_writers_do_not_collide(store: Store) -> None:
    def work(i: int) -> None:
        store.write_manifest(f"m{i % 3}:t{i}", simple_manifest(store, f"s{i}".encode()))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.list_models()) == 12


# ---- GGUF metadata ----------------------------------------------------------------------------------------


def test_read_gguf_model_info(tiny_gguf: Path) -> None:
    meta = read_gguf(tiny_gguf)
    info = meta.model_info()
    assert info["general.architecture"] == "llama"
    assert info["general.parameter_count"] == 264 == meta.parameter_count
    assert info["llama.context_length"] == 256 and info["llama.embedding_length"] == 8
    assert info["llama.attention.layer_norm_rms_epsilon"] == 1e-05  # float32 shown in its short form
    assert "tokenizer.ggml.tokens" in info and info["tokenizer.ggml.tokens"] is None
    assert meta.array_lengths["tokenizer.ggml.tokens"] == VOCAB
    assert "general.name" not in info and "tokenizer.chat_template" not in info
    assert meta.file_type_name == "F16"
    assert meta.tensor_list() == [{"name": "token_embd.weight", "type": "F16", "shape": [8, 32]},
                                  {"name": "output_norm.weight", "type": "F32", "shape": [8]}]
    verbose = read_gguf(tiny_gguf, verbose=True).model_info()
    tokens = verbose["tokenizer.ggml.tokens"]
    assert tokens[:2] == ["t0", "t1"] and len(tokens) == VOCAB
    json.dumps(verbose)  # JSON-ready


def test_read_gguf_rejects_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 20)
    with pytest.raises(GGUFError):
        read_gguf(bad)
    bad.write_bytes(b"nope" * 10)
    with pytest.raises(GGUFError):
        read_gguf(bad)


@pytest.mark.parametrize(("n", "text"), [
    (7_615_616_512, "7.6B"), (26_500_000, "26.5M"), (8_030_261_248, "8.0B"), (136_727_040, "137M"),
    (70_553_706_496, "70.6B"), (1234, "1K"), (264, "264"), (1_500_000_000_000, "1.5T"),
])
def test_human_number(n: int, text: str) -> None:
    assert human_number(n) == text


def test_model_name_type_round_trips_through_store(store: Store) -> None:
    store.write_manifest(ModelName.parse("example.com:8080/ns/m:v1"), simple_manifest(store))
    (row,) = store.list_models()
    assert row.display == "example.com:8080/ns/m:v1"
