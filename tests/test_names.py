"""Model names and digests: Ollama's parsing table, path safety, case-insensitive identity."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omx.models.names import (
    InvalidDigest,
    InvalidModelName,
    ModelName,
    blob_filename,
    is_valid_digest,
    is_valid_name,
    parse_digest,
)

VALID = [
    # input, (host, namespace, model, tag), display_shortest
    ("llama3.2", ("registry.ollama.ai", "library", "llama3.2", "latest"), "llama3.2:latest"),
    ("llama3.2:1b", ("registry.ollama.ai", "library", "llama3.2", "1b"), "llama3.2:1b"),
    ("user/m:tag", ("registry.ollama.ai", "user", "m", "tag"), "user/m:tag"),
    ("registry.ollama.ai/library/m:latest", ("registry.ollama.ai", "library", "m", "latest"), "m:latest"),
    ("REGISTRY.ollama.ai/Library/m", ("REGISTRY.ollama.ai", "Library", "m", "latest"), "m:latest"),
    ("example.com/ns/m:v1", ("example.com", "ns", "m", "v1"), "example.com/ns/m:v1"),
    ("localhost:5000/ns/m:v1", ("localhost:5000", "ns", "m", "v1"), "localhost:5000/ns/m:v1"),
    ("localhost:5000/ns/m", ("localhost:5000", "ns", "m", "latest"), "localhost:5000/ns/m:latest"),
    ("http://localhost:5000/ns/m:v1", ("localhost:5000", "ns", "m", "v1"), "localhost:5000/ns/m:v1"),
    ("_m", ("registry.ollama.ai", "library", "_m", "latest"), "_m:latest"),
    ("m_1-2.3:t_1.2-x", ("registry.ollama.ai", "library", "m_1-2.3", "t_1.2-x"), "m_1-2.3:t_1.2-x"),
    ("a-b/c.d:e", ("registry.ollama.ai", "a-b", "c.d", "e"), "a-b/c.d:e"),
    ("m" * 80, ("registry.ollama.ai", "library", "m" * 80, "latest"), "m" * 80 + ":latest"),
    ("h" * 350 + "/n/m", ("h" * 350, "n", "m", "latest"), "h" * 350 + "/n/m:latest"),
]

INVALID = [
    "", " ", "a/", "m:", ":tag", "/m", "//m", "a//m", "../x", "..", ".", "./m", "a/../b", "/etc/passwd",
    "../../etc/passwd:x", "ns.x/m",  # no "." in a namespace
    "m:tag:x", "m tag", " m", "m ", "-m", "m:-x", "m:.x", "m/", "h/n/m/x", "a\\b", "..\\x", "a\x00b",
    "m:t\x00", "é", "modèle", "m\n", "m:latest\n", "m" * 81, "m:" + "t" * 81, "n" * 81 + "/m",
    "h" * 351 + "/n/m", "h/n:x/m",  # ":" only in a host
    "m@sha256:abc", "m*", "host/ns:1/m",
]


@pytest.mark.parametrize(("raw", "parts", "short"), VALID)
def test_valid_names(raw: str, parts: tuple[str, str, str, str], short: str) -> None:
    n = ModelName.parse(raw)
    assert n.parts() == parts
    assert n.display_shortest() == short
    assert str(n) == f"{parts[0]}/{parts[1]}/{parts[2]}:{parts[3]}"
    assert n.manifest_relpath().parts == parts
    assert ModelName.parse(str(n)) == n
    assert is_valid_name(raw)


@pytest.mark.parametrize("raw", INVALID)
def test_invalid_names(raw: str) -> None:
    with pytest.raises(InvalidModelName):
        ModelName.parse(raw)
    assert not is_valid_name(raw)
    assert ModelName.try_parse(raw) is None


def test_scheme_is_kept_but_not_part_of_identity() -> None:
    n = ModelName.parse("http://localhost:5000/ns/m:v1")
    assert n.scheme == "http"
    assert ModelName.parse("localhost:5000/ns/m:v1").scheme == "https"
    assert n == ModelName.parse("localhost:5000/ns/m:v1")


def test_case_insensitive_identity() -> None:
    a = ModelName.parse("Llama3.2:Latest")
    b = ModelName.parse("llama3.2")
    assert a == b
    assert hash(a) == hash(b)
    assert {a, b} == {a}
    assert a.manifest_relpath() != b.manifest_relpath()  # the path keeps the given casing
    assert a.with_parts(*b.parts()).parts() == b.parts()
    with pytest.raises(ValueError):
        a.with_parts("registry.ollama.ai", "library", "other", "latest")


def test_constructor_validates() -> None:
    assert ModelName(model="m").display_shortest() == "m:latest"
    with pytest.raises(InvalidModelName):
        ModelName(model="..")
    with pytest.raises(InvalidModelName):
        ModelName("h", "n", "m", "../t")


HEX = "a" * 32 + "B" * 32


@pytest.mark.parametrize("raw", [f"sha256:{HEX}", f"sha256-{HEX}", f"sha256:{HEX.lower()}"])
def test_valid_digests(raw: str) -> None:
    assert is_valid_digest(raw)
    assert parse_digest(raw) == HEX.lower()
    assert blob_filename(raw) == f"sha256-{HEX.lower()}"


@pytest.mark.parametrize("raw", ["", "sha256:", f"sha256:{HEX}\n", f"sha256:{HEX}0", f"sha256_{HEX}",
                                 f"sha512:{HEX}", f"SHA256:{HEX}", f" sha256:{HEX}", "sha256:" + "g" * 64,
                                 f"sha256:../{HEX[3:]}"])
def test_invalid_digests(raw: str) -> None:
    assert not is_valid_digest(raw)
    with pytest.raises(InvalidDigest) as e:
        parse_digest(raw)
    assert str(e.value) == "invalid digest format"


_ALPHABET = st.sampled_from([*"aZ0_-.:/\\ \x00@é\n", "..", "http://", "../", "sha256"])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=40), st.lists(_ALPHABET, max_size=12).map("".join)))
def test_any_string_is_rejected_or_stays_inside_root(raw: str) -> None:
    root = Path("/srv/store/manifests")
    try:
        n = ModelName.parse(raw)
    except InvalidModelName:
        return
    rel = n.manifest_relpath()
    assert len(rel.parts) == 4
    for part in rel.parts:
        assert part not in ("", ".", "..")
        assert not any(c in part for c in "/\\\x00")
    target = (root / rel).resolve()
    assert target.is_relative_to(root)
    assert ModelName.parse(str(n)) == n
