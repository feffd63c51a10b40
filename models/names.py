"""Model names and blob digests, with Ollama's exact validity rules (types/model/name.go).

The part charsets guarantee that a valid name maps to a relative path of four plain components, so a name
can never address anything outside the store; that is why the store trusts `manifest_relpath()`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
DEFAULT_SCHEME = "https"

# Go's cutPromised puts this in for an empty side of a separator; "!" is never valid, so "a/" and "m:" fail.
_MISSING = "!MISSING!"

_HOST_MAX = 350
_PART_MAX = 80


class InvalidModelName(ValueError):
    """The string is not a valid `[host/][namespace/]model[:tag]` name."""

    def __init__(self, raw: str) -> None:
        super().__init__(f"invalid model name: {raw!r}")
        self.raw = raw


class InvalidDigest(ValueError):
    """Not `sha256:<64 hex>` (or `sha256-<64 hex>`); Ollama answers `invalid digest format`."""

    def __init__(self, raw: str) -> None:
        super().__init__("invalid digest format")
        self.raw = raw


def _is_word(c: str) -> bool:
    # ASCII only, like Go's byte test; str.isalnum() would admit Unicode letters and digits.
    return ("a" <= c <= "z") or ("A" <= c <= "Z") or ("0" <= c <= "9") or c == "_"


def _valid_part(kind: str, s: str) -> bool:
    limit = _HOST_MAX if kind == "host" else _PART_MAX
    if not 1 <= len(s) <= limit or not _is_word(s[0]):
        return False
    for c in s[1:]:
        if _is_word(c) or c == "-":
            continue
        if c == "." and kind != "namespace":
            continue
        if c == ":" and kind == "host":
            continue
        return False
    return True


def _cut_promised(s: str, sep: str) -> tuple[str, str, bool]:
    i = s.rfind(sep)
    if i < 0:
        return s, "", False
    return s[:i] or _MISSING, s[i + len(sep):] or _MISSING, True


@dataclass(frozen=True, eq=False)
class ModelName:
    """A fully qualified name; equality and hashing ignore case, like Ollama's Name.EqualFold."""

    host: str = DEFAULT_HOST
    namespace: str = DEFAULT_NAMESPACE
    model: str = ""
    tag: str = DEFAULT_TAG
    scheme: str = field(default=DEFAULT_SCHEME, repr=False)

    def __post_init__(self) -> None:
        for kind, part in (("host", self.host), ("namespace", self.namespace), ("model", self.model),
                           ("tag", self.tag)):
            if not _valid_part(kind, part):
                raise InvalidModelName(f"{self.host}/{self.namespace}/{self.model}:{self.tag}")

    @classmethod
    def parse(cls, s: str) -> ModelName:
        """Parse like Go ParseName (ParseNameBare merged with the defaults), then validate every part."""
        if not isinstance(s, str):
            raise InvalidModelName(repr(s))
        rest = s
        tag = ""
        # "/" can never be in a tag, so a ":" after the last "/" starts the tag (a host port comes before it).
        if rest.rfind(":") > rest.rfind("/"):
            rest, tag, _ = _cut_promised(rest, ":")
        host = namespace = ""
        scheme = DEFAULT_SCHEME
        rest, model, promised = _cut_promised(rest, "/")
        if not promised:
            model = rest
        else:
            rest, namespace, promised = _cut_promised(rest, "/")
            if not promised:
                namespace = rest
            else:
                before, sep, after = rest.partition("://")
                if sep:
                    scheme, host = before, after
                else:
                    host = before
        try:
            return cls(host or DEFAULT_HOST, namespace or DEFAULT_NAMESPACE, model, tag or DEFAULT_TAG,
                       scheme)
        except InvalidModelName:
            raise InvalidModelName(s) from None

    @classmethod
    def try_parse(cls, s: str) -> ModelName | None:
        try:
            return cls.parse(s)
        except InvalidModelName:
            return None

    def __str__(self) -> str:
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    def _key(self) -> tuple[str, str, str, str]:
        return (self.host.lower(), self.namespace.lower(), self.model.lower(), self.tag.lower())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ModelName):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def display_shortest(self) -> str:
        """The /api/tags form: drop the default host (and then the default namespace); always keep the tag."""
        if self.host.lower() != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace.lower() != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"

    def parts(self) -> tuple[str, str, str, str]:
        return (self.host, self.namespace, self.model, self.tag)

    def manifest_relpath(self) -> PurePosixPath:
        """`<host>/<namespace>/<model>/<tag>` below `manifests/`, in this name's own casing."""
        return PurePosixPath(self.host, self.namespace, self.model, self.tag)

    def with_parts(self, host: str, namespace: str, model: str, tag: str) -> ModelName:
        """Same name in another casing (the store's canonical one); raises if that changes more than case."""
        other = ModelName(host, namespace, model, tag, self.scheme)
        if other != self:
            raise ValueError(f"{other} is not a recasing of {self}")
        return other


def is_valid_name(s: str) -> bool:
    return ModelName.try_parse(s) is not None


_DIGEST_RE = re.compile(r"sha256[:-]([0-9a-fA-F]{64})")


def is_valid_digest(s: str) -> bool:
    """Ollama's `^sha256[:-][0-9a-fA-F]{64}$` (fullmatch: Python's `$` would accept a trailing newline)."""
    return isinstance(s, str) and _DIGEST_RE.fullmatch(s) is not None


def parse_digest(s: str) -> str:
    """The 64 lowercase hex digits of a digest; raises InvalidDigest."""
    m = _DIGEST_RE.fullmatch(s) if isinstance(s, str) else None
    if m is None:
        raise InvalidDigest(str(s))
    return m.group(1).lower()


def format_digest(hex_digest: str) -> str:
    """`sha256:<hex>`, the form used in manifests and API responses."""
    return "sha256:" + parse_digest("sha256:" + hex_digest)


def blob_filename(digest: str) -> str:
    """`sha256-<hex>`, the on-disk blob name (":" becomes "-")."""
    return "sha256-" + parse_digest(digest)
