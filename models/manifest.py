"""Manifest and config-blob schemas (Ollama's manifest.Manifest and model.ConfigV2).

Field order follows the Go structs so a manifest we write serializes like Ollama's own; unknown keys are kept
(extra="allow") so re-serializing a pulled document does not silently drop data.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from omx.models.names import InvalidDigest, format_digest, parse_digest

MEDIA_TYPE_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_TYPE_CONFIG = "application/vnd.docker.container.image.v1+json"

MEDIA_TYPE_MODEL = "application/vnd.ollama.image.model"
MEDIA_TYPE_TEMPLATE = "application/vnd.ollama.image.template"
MEDIA_TYPE_PROMPT = "application/vnd.ollama.image.prompt"  # legacy name of .template
MEDIA_TYPE_SYSTEM = "application/vnd.ollama.image.system"
MEDIA_TYPE_PARAMS = "application/vnd.ollama.image.params"
MEDIA_TYPE_LICENSE = "application/vnd.ollama.image.license"
MEDIA_TYPE_MESSAGES = "application/vnd.ollama.image.messages"
MEDIA_TYPE_ADAPTER = "application/vnd.ollama.image.adapter"
MEDIA_TYPE_PROJECTOR = "application/vnd.ollama.image.projector"
MEDIA_TYPE_EMBED = "application/vnd.ollama.image.embed"  # deprecated, ignored
MEDIA_TYPE_TENSOR = "application/vnd.ollama.image.tensor"
MEDIA_TYPE_DRAFT = "application/vnd.ollama.image.draft"
MEDIA_TYPE_JSON = "application/vnd.ollama.image.json"

TEMPLATE_MEDIA_TYPES = (MEDIA_TYPE_TEMPLATE, MEDIA_TYPE_PROMPT)


class InvalidManifest(ValueError):
    """A manifest or config blob that does not parse or validate."""


class Layer(BaseModel):
    """One blob reference; `name` is the file name inside a safetensors directory, `from` the source model."""

    model_config = ConfigDict(populate_by_name=True, extra="allow")

    media_type: str = Field(alias="mediaType")
    digest: str
    size: int = Field(ge=0, lt=1 << 63)  # Go's int64, as Ollama declares it; anything larger is a lie
    from_: str | None = Field(default=None, alias="from")
    name: str | None = None

    @field_validator("digest")
    @classmethod
    def _digest(cls, v: str) -> str:
        try:
            return format_digest(parse_digest(v))
        except InvalidDigest:
            raise ValueError(f"invalid digest {v!r}") from None

    @property
    def hex(self) -> str:
        return self.digest[len("sha256:"):]


class Manifest(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="allow")

    schema_version: int = Field(default=2, alias="schemaVersion")
    media_type: str = Field(default=MEDIA_TYPE_MANIFEST, alias="mediaType")
    config: Layer
    layers: list[Layer] = Field(default_factory=list)

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        try:
            return cls.model_validate_json(data)
        except ValueError as e:
            raise InvalidManifest(f"invalid manifest: {e}") from None

    def to_bytes(self) -> bytes:
        """Compact JSON like Go's json.Marshal (omitempty `from`/`name` left out)."""
        return self.model_dump_json(by_alias=True, exclude_none=True).encode()

    @property
    def size(self) -> int:
        """What /api/tags reports: every layer plus the config blob."""
        return self.config.size + sum(layer.size for layer in self.layers)

    def digests(self) -> set[str]:
        """Hex digests of every referenced blob, config included."""
        return {self.config.hex, *(layer.hex for layer in self.layers)}

    def layers_of(self, *media_types: str) -> list[Layer]:
        return [layer for layer in self.layers if layer.media_type in media_types]


class RootFS(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str = "layers"
    diff_ids: list[str] = Field(default_factory=list)


class ConfigV2(BaseModel):
    """The config blob; `model_type` is shown as parameter_size and `file_type` as quantization_level."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model_format: str = ""
    model_family: str = ""
    model_families: list[str] | None = None
    model_type: str = ""
    file_type: str = ""
    renderer: str | None = None
    parser: str | None = None
    requires: str | None = None
    remote_host: str | None = None
    remote_model: str | None = None
    capabilities: list[str] | None = None
    context_length: int | None = None
    embedding_length: int | None = None
    base_name: str | None = None
    architecture: str = "amd64"
    os: str = "linux"
    rootfs: RootFS = Field(default_factory=RootFS)

    @classmethod
    def from_bytes(cls, data: bytes) -> ConfigV2:
        try:
            return cls.model_validate_json(data)
        except ValueError as e:
            raise InvalidManifest(f"invalid config blob: {e}") from None

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


def model_details(config: ConfigV2 | None, parent_model: str = "") -> dict[str, Any]:
    """Ollama's api.ModelDetails as a JSON-ready dict (families may be null, like a Go nil slice)."""
    c = config or ConfigV2()
    details: dict[str, Any] = {
        "parent_model": parent_model,
        "format": c.model_format,
        "family": c.model_family,
        "families": list(c.model_families) if c.model_families is not None else None,
        "parameter_size": c.model_type,
        "quantization_level": c.file_type,
    }
    if c.context_length:
        details["context_length"] = c.context_length
    if c.embedding_length:
        details["embedding_length"] = c.embedding_length
    return details


def go_json(obj: Any) -> bytes:
    """JSON the way Go's json.Encoder writes params/messages layers (sorted map keys, HTML-escaped, trailing
    newline), so a params layer made here usually hashes the same as Ollama's."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                    ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return (text + "\n").encode()
