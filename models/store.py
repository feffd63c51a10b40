"""The content-addressed model store, in Ollama's layout so an Ollama models directory works as-is.

    <root>/manifests/<host>/<namespace>/<model>/<tag>    manifest JSON
    <root>/blobs/sha256-<hex>                           content-addressed blobs, mode 0644
    <root>/tmp/hf-<manifest digest>/                    symlink views of safetensors models (rebuildable)
    <root>/omx-unsynced/sha256-<hex>                    journal: blobs visible before their data fsync

Invariants: a blob is only ever renamed into place after its sha256 was verified, and every file appears
atomically (temp file in the same directory, fsync, rename, fsync directory). The one exception to the
order is a pulled blob, whose data fsync (seconds for a large one) runs after the rename: a durable entry in
`<root>/omx-unsynced/` precedes the rename, and opening the store re-hashes every blob still listed there,
so a crash never leaves a visible blob whose bytes were not verified. Temp files are dot-files named
`.omx-tmp-<pid>-<random>`, which manifest enumeration ignores and `clean_temps` removes once their writer is
gone. Methods are synchronous; the node calls the slow ones through `asyncio.to_thread`.

Concurrency: one lock per Store serializes manifest writes, deletes and blob garbage collection, and `create`
pins the blobs it is assembling so a concurrent delete cannot collect them before its manifest exists.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import struct
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any, NamedTuple

from omx.models.ggufmeta import GGUFError, human_number, is_gguf, read_gguf
from omx.models.manifest import (
    MEDIA_TYPE_ADAPTER,
    MEDIA_TYPE_CONFIG,
    MEDIA_TYPE_JSON,
    MEDIA_TYPE_LICENSE,
    MEDIA_TYPE_MESSAGES,
    MEDIA_TYPE_MODEL,
    MEDIA_TYPE_PARAMS,
    MEDIA_TYPE_PROJECTOR,
    MEDIA_TYPE_SYSTEM,
    MEDIA_TYPE_TEMPLATE,
    MEDIA_TYPE_TENSOR,
    TEMPLATE_MEDIA_TYPES,
    ConfigV2,
    InvalidManifest,
    Layer,
    Manifest,
    go_json,
    model_details,
)
from omx.models.names import InvalidDigest, InvalidModelName, ModelName, parse_digest
from omx.protocols.modelfile import format_modelfile, format_parameters

log = logging.getLogger("omx.store")

TMP_PREFIX = ".omx-tmp-"
UNSYNCED_DIR = "omx-unsynced"  # journal of blobs made visible before their data fsync finished
DEFAULT_TEMPLATE = "{{ .Prompt }}"  # what Ollama uses for a model without a template layer
_CHUNK = 4 << 20
MAX_CONFIG_BYTES = 1 << 20  # a model's config blob is a few hundred bytes of JSON
_STALE_FOREIGN_S = 24 * 3600  # a temp of another live pid is only reclaimed after this long
_CACHE_MAX = 64

# Files of a Hugging Face directory worth keeping: weights plus whatever tokenizers and configs read.
_HF_AUX_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")

# Temp paths being written by this process, so that opening a second Store on the same root never
# deletes a live temp of the first.
_ACTIVE_TEMPS: set[str] = set()
_ACTIVE_LOCK = threading.Lock()

# Blobs this process installed unsynced and has not yet synced: (store root, hex) → installs pending. Shared
# by every Store of the process, so opening a second Store on the same root never re-hashes or clears them.
_PENDING_SYNC: Counter[tuple[str, str]] = Counter()
_PENDING_LOCK = threading.Condition()


class StoreError(Exception):
    """Base class; the HTTP layer maps subclasses to Ollama's route-specific messages."""


class ModelNotFound(StoreError):
    def __init__(self, name: ModelName | str) -> None:
        super().__init__(f"model {str(name)!r} not found")
        self.name = name


class BlobNotFound(StoreError):
    def __init__(self, digest: str) -> None:
        super().__init__(f"blob {digest!r} not found")
        self.digest = digest


class DigestMismatch(StoreError):
    """The content does not hash to the digest it was announced under; nothing was stored."""

    def __init__(self, expected: str, got: str) -> None:
        super().__init__(f'digest mismatch, expected "{expected}", got "{got}"')
        self.expected = expected
        self.got = got


class InvalidModelInput(StoreError):
    """Create was given something it cannot turn into a model (bad files, conflicting sources...)."""


# --------------------------------------------------------------------------------------------------------
# Small file helpers


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name() -> str:
    return f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"


def _register_temp(path: Path, active: bool) -> None:
    with _ACTIVE_LOCK:
        if active:
            _ACTIVE_TEMPS.add(str(path))
        else:
            _ACTIVE_TEMPS.discard(str(path))


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.parent / _temp_name()
    _register_temp(tmp, True)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _register_temp(tmp, False)


def _is_stale_temp(path: Path) -> bool:
    with _ACTIVE_LOCK:
        if str(path) in _ACTIVE_TEMPS:
            return False
    m = re.match(re.escape(TMP_PREFIX) + r"(\d+)-", path.name)
    pid = int(m.group(1)) if m else -1
    if pid == os.getpid() or pid <= 0:
        return True  # ours but not active: left by an earlier life of this pid (containers reuse pids)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    try:
        return time.time() - path.lstat().st_mtime > _STALE_FOREIGN_S
    except FileNotFoundError:
        return False


def _remove_path(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()


def safe_relname(name: str) -> PurePosixPath:
    """A layer's file name as a relative path that cannot leave its directory (names come from peers)."""
    if not name or len(name) > 1024 or "\\" in name or "\x00" in name or name.startswith("/"):
        raise InvalidManifest(f"invalid layer file name {name!r}")
    p = PurePosixPath(name)
    if any(part in ("", ".", "..") for part in name.split("/")) or p.is_absolute():
        raise InvalidManifest(f"invalid layer file name {name!r}")
    return p


_BARE_HEX = re.compile(r"[0-9a-fA-F]{64}")


def _hex(digest: str) -> str:
    """Hex of `sha256:<hex>`, `sha256-<hex>` or bare hex (parse_digest's output); else InvalidDigest."""
    if isinstance(digest, str) and _BARE_HEX.fullmatch(digest):
        return digest.lower()
    return parse_digest(digest)


def _as_name(name: ModelName | str) -> ModelName:
    return name if isinstance(name, ModelName) else ModelName.parse(name)


# --------------------------------------------------------------------------------------------------------
# Blob writing


class BlobWriter:
    """Incremental blob writer: hash while writing, publish only a verified blob.

    Use as a context manager or call commit()/abort(); leaving the block without commit() discards the temp.
    """

    def __init__(self, store: Store, expected: str | None, pins: set[str] | None = None) -> None:
        self._store = store
        self._expected = _hex(expected) if expected is not None else None
        # Ollama's mismatch message quotes the digest as the client gave it (bare hex gets its prefix back)
        bare = expected is not None and _BARE_HEX.fullmatch(expected) is not None
        self._expected_raw = f"sha256:{self._expected}" if bare else expected
        self._pins = pins
        self._hash = hashlib.sha256()
        self.size = 0
        self.digest: str | None = None  # "sha256:<hex>" once committed
        self.existed = False  # the blob was already in the store when committed
        self._tmp = store.blobs_dir / _temp_name()
        _register_temp(self._tmp, True)
        try:
            fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except BaseException:
            _register_temp(self._tmp, False)
            raise
        self._file = open(fd, "wb")  # closed by commit() or abort()
        self._closed = False

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise ValueError("blob writer is closed")
        self._file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    def commit(self) -> str:
        """Verify and publish; returns "sha256:<hex>". Raises DigestMismatch (and removes the temp)."""
        if self._closed:
            raise ValueError("blob writer is closed")
        got = self._hash.hexdigest()
        try:
            self._file.flush()
            os.fchmod(self._file.fileno(), 0o644)
            os.fsync(self._file.fileno())
            self._file.close()
            self._closed = True
            if self._expected is not None and got != self._expected:
                raise DigestMismatch(str(self._expected_raw), "sha256:" + got)
            self.existed = self._store.install_blob(self._tmp, got, self._pins)
        finally:
            self._discard()
        self.digest = "sha256:" + got
        return self.digest

    def abort(self) -> None:
        self._discard()

    def _discard(self) -> None:
        if not self._closed:
            self._file.close()
            self._closed = True
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)
        _register_temp(self._tmp, False)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None,
    ) -> None:
        if self.digest is None:
            self.abort()


# --------------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class ModelEntry:
    """One /api/tags row; `digest` is the sha256 hex of the manifest bytes."""

    name: ModelName
    size: int
    digest: str
    modified_at: datetime
    details: dict[str, Any]
    manifest: Manifest
    config: ConfigV2 | None

    @property
    def display(self) -> str:
        return self.name.display_shortest()


@dataclass(frozen=True)
class ResolvedModel:
    """Everything a runner and /api/show need about one model. Treat the dicts and lists as read-only."""

    name: ModelName
    digest: str  # sha256 hex of the manifest bytes: the identity of this exact model version
    manifest: Manifest
    config: ConfigV2
    size: int
    modified_at: datetime
    model_path: Path | None  # GGUF weights
    files: dict[str, Path]  # safetensors directory: file name → blob
    adapters: list[Path]
    projectors: list[Path]
    template: str
    system: str
    params: dict[str, Any]
    license: list[str]
    messages: list[dict[str, Any]]
    capabilities: list[str]
    parent_model: str

    @property
    def format(self) -> str:
        if self.config.model_format:
            return self.config.model_format
        return "gguf" if self.model_path is not None else "safetensors"

    @property
    def details(self) -> dict[str, Any]:
        return model_details(self.config, self.parent_model)

    @property
    def has_template(self) -> bool:
        return bool(self.manifest.layers_of(*TEMPLATE_MEDIA_TYPES))


class HFLocation(NamedTuple):
    """Arguments for transformers' from_pretrained: a directory, plus `gguf_file=` for GGUF models."""

    path: Path
    gguf_file: str | None


@dataclass(frozen=True)
class _Parsed:
    """The immutable, digest-keyed part of a ResolvedModel (cached: blobs never change)."""

    manifest: Manifest
    config: ConfigV2
    model_path: Path | None
    files: dict[str, Path]
    adapters: list[Path]
    projectors: list[Path]
    template: str
    system: str
    params: dict[str, Any]
    license: list[str]
    messages: list[dict[str, Any]]
    capabilities: list[str]
    parent_model: str


# --------------------------------------------------------------------------------------------------------


class Store:
    def __init__(self, root: str | os.PathLike[str], *, clean: bool = True) -> None:
        self.root = Path(root).absolute()
        self.manifests_dir = self.root / "manifests"
        self.blobs_dir = self.root / "blobs"
        self.tmp_dir = self.root / "tmp"
        for d in (self.manifests_dir, self.blobs_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._pins: Counter[str] = Counter()
        self._cache: OrderedDict[str, _Parsed] = OrderedDict()
        self.unsynced_dir = self.root / UNSYNCED_DIR
        self._sync_queue: list[str] = []
        self._syncer: threading.Thread | None = None
        self.recover_unsynced()
        if clean:
            self.clean_temps()

    # ---- blobs -----------------------------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        """Path of `sha256:<hex>`, `sha256-<hex>` or bare hex; raises InvalidDigest for anything else."""
        return self.blobs_dir / f"sha256-{_hex(digest)}"

    def has_blob(self, digest: str) -> bool:
        try:
            return stat.S_ISREG(self.blob_path(digest).lstat().st_mode)
        except FileNotFoundError:
            return False

    def blob_size(self, digest: str) -> int:
        try:
            st = self.blob_path(digest).lstat()
        except FileNotFoundError:
            raise BlobNotFound(digest) from None
        if not stat.S_ISREG(st.st_mode):
            raise BlobNotFound(digest)
        return st.st_size

    def begin_blob(self, expected_digest: str | None) -> BlobWriter:
        """Start writing a blob; with expected_digest=None it is named by whatever its content hashes to."""
        return BlobWriter(self, expected_digest)

    def put_blob_bytes(self, data: bytes) -> str:
        return self._put_bytes(data, None)[0]

    def put_blob_file(self, src: str | os.PathLike[str]) -> tuple[str, int]:
        """Copy a file into the store, hashing in the same pass; returns (digest, size)."""
        w = self._put_file(Path(src), None)
        assert w.digest is not None
        return w.digest, w.size

    def _put_bytes(self, data: bytes, pins: set[str] | None) -> tuple[str, bool]:
        with BlobWriter(self, None, pins) as w:
            w.write(data)
            return w.commit(), w.existed

    def _put_file(self, src: Path, pins: set[str] | None) -> BlobWriter:
        with open(src, "rb") as f, BlobWriter(self, None, pins) as w:
            while chunk := f.read(_CHUNK):
                w.write(chunk)
            w.commit()
            return w

    def install_blob(self, tmp: Path, hex_digest: str, pins: set[str] | None, *, synced: bool = True) -> bool:
        """Rename a verified temp into place (pinning it first, atomically w.r.t. GC); True if it existed.

        `synced=False` is for callers that did not fsync the temp's data: waiting for a large blob's fsync
        would be most of a fast transfer. A durable journal entry (see `recover_unsynced`) is written before
        the rename, and the data, the directory and then the entry are synced in the background, so a crash
        can never leave torn bytes behind a visible blob name.
        """
        final = self.blobs_dir / f"sha256-{hex_digest}"
        with self._lock:
            if pins is not None:
                self.pin(hex_digest, pins)
            if final.is_file():
                return True
            if not synced:
                self._journal_add(hex_digest)
            try:
                os.replace(tmp, final)
            except BaseException:
                if not synced:
                    self._journal_done(hex_digest)
                raise
        if synced:
            _fsync_dir(self.blobs_dir)
        else:
            self._sync_later(hex_digest)
        return False

    def pin(self, hex_digest: str, pins: set[str]) -> None:
        """Keep a blob from garbage collection until `unpin_all(pins)`: it belongs to a model being assembled
        (pulled, created) whose manifest does not exist yet. Adding the same blob twice to one set counts once."""
        with self._lock:
            if hex_digest not in pins:
                pins.add(hex_digest)
                self._pins[hex_digest] += 1

    def unpin_all(self, pins: set[str]) -> None:
        """Release every pin in `pins` (and empty it), once the manifest that needs them exists or never will."""
        with self._lock:
            for h in pins:
                self._pins[h] -= 1
                if self._pins[h] <= 0:
                    del self._pins[h]
            pins.clear()

    def pin_existing(self, digest: str, pins: set[str]) -> int:
        """Pin a blob that must already exist (raises BlobNotFound), in one step so GC cannot slip between the
        check and the pin; returns its size."""
        with self._lock:
            size = self.blob_size(digest)
            self.pin(_hex(digest), pins)
            return size

    # ---- blobs whose data is not yet durable -----------------------------------------------------------
    def _journal_entry(self, hex_digest: str) -> Path:
        return self.unsynced_dir / f"sha256-{hex_digest}"

    def _journal_add(self, hex_digest: str) -> None:
        """Durably record that this blob may become visible before its data is on disk (before the rename)."""
        with _PENDING_LOCK:
            _PENDING_SYNC[(str(self.root), hex_digest)] += 1
        self.unsynced_dir.mkdir(exist_ok=True)
        fd = os.open(self._journal_entry(hex_digest), os.O_WRONLY | os.O_CREAT, 0o644)
        os.close(fd)
        _fsync_dir(self.unsynced_dir)  # an empty file: the directory entry is the record

    def _sync_later(self, hex_digest: str) -> None:
        with _PENDING_LOCK:
            self._sync_queue.append(hex_digest)
            if self._syncer is None:
                # not a daemon: a normal interpreter exit waits for the pending syncs instead of leaving the
                # next start a re-hash; the thread ends when the queue is empty
                self._syncer = threading.Thread(target=self._sync_loop, name="omx-blob-sync")
                self._syncer.start()

    def _sync_loop(self) -> None:
        while True:
            with _PENDING_LOCK:
                if not self._sync_queue:
                    self._syncer = None
                    _PENDING_LOCK.notify_all()
                    return
                hex_digest = self._sync_queue.pop(0)
            self._sync_blob(hex_digest)

    def _sync_blob(self, hex_digest: str) -> None:
        """fsync a blob installed unsynced, then its directory, then drop its journal entry. A failed fsync
        means the bytes on disk are unknown, so the blob is removed (a later pull fetches it again)."""
        path = self.blobs_dir / f"sha256-{hex_digest}"
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(self.blobs_dir)
        except FileNotFoundError:
            pass  # deleted meanwhile: nothing left to protect
        except OSError as e:
            log.error("cannot sync blob sha256:%s (%s); removing it", hex_digest, e)
            with contextlib.suppress(OSError):
                path.unlink()
        self._journal_done(hex_digest)

    def _journal_done(self, hex_digest: str) -> None:
        key = (str(self.root), hex_digest)
        with _PENDING_LOCK:
            _PENDING_SYNC[key] -= 1
            if _PENDING_SYNC[key] <= 0:  # the last install of this blob is synced: its entry can go
                del _PENDING_SYNC[key]
                with contextlib.suppress(FileNotFoundError):
                    self._journal_entry(hex_digest).unlink()  # no fsync: a stale entry only costs a re-hash
            _PENDING_LOCK.notify_all()

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait until every blob this process installed unsynced into this store is durable; False on timeout."""
        root = str(self.root)
        with _PENDING_LOCK:
            return _PENDING_LOCK.wait_for(lambda: not any(r == root for r, _ in _PENDING_SYNC), timeout)

    def recover_unsynced(self) -> list[str]:
        """After a crash, re-hash every blob still in the journal: keep (and sync) those that match their
        name, delete those that do not. Runs when the store opens, before it serves anything; entries that
        a live Store of this process is still syncing are left alone. Returns the removed digests."""
        removed: list[str] = []
        try:
            with os.scandir(self.unsynced_dir) as it:
                names = sorted(e.name for e in it)
        except FileNotFoundError:
            return removed
        for name in names:
            m = re.fullmatch(r"sha256-([0-9a-f]{64})", name)
            entry = self.unsynced_dir / name
            if m is None:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
                continue
            hexd = m.group(1)
            with _PENDING_LOCK:
                if (str(self.root), hexd) in _PENDING_SYNC:
                    continue
            path = self.blobs_dir / name
            try:
                with open(path, "rb") as f:
                    got = hashlib.file_digest(f, "sha256").hexdigest()
                    ok = got == hexd
                    if ok:
                        os.fsync(f.fileno())
            except FileNotFoundError:
                ok = True  # never renamed into place, or deleted: nothing visible to check
            if not ok:
                log.warning("blob sha256:%s was not fully on disk after a crash; removing it", hexd)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                removed.append("sha256:" + hexd)
            _fsync_dir(self.blobs_dir)
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        return removed

    # ---- names -----------------------------------------------------------------------------------------
    @staticmethod
    def _match(d: Path, part: str, want_dir: bool) -> str | None:
        """The entry of d equal to part ignoring case (exact casing preferred), of the wanted kind."""

        def kind_ok(p: Path) -> bool:
            try:
                mode = p.lstat().st_mode
            except OSError:  # missing, or a name the file system cannot hold (ENAMETOOLONG): not here either way
                return False
            return stat.S_ISDIR(mode) if want_dir else stat.S_ISREG(mode)

        if kind_ok(d / part):
            return part
        lower = part.lower()
        try:
            with os.scandir(d) as it:
                names = sorted(e.name for e in it if e.name.lower() == lower)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return next((n for n in names if kind_ok(d / n)), None)

    def _find(self, name: ModelName) -> tuple[ModelName, Path] | None:
        """Existing manifest for name, matched case-insensitively like Ollama's getExistingName."""
        d = self.manifests_dir
        found: list[str] = []
        for i, part in enumerate(name.parts()):
            entry = self._match(d, part, want_dir=i < 3)
            if entry is None:
                return None
            found.append(entry)
            d = d / entry
        return name.with_parts(*found), d

    def _target(self, name: ModelName) -> tuple[ModelName, Path]:
        """Where name's manifest goes: each existing component's casing is reused, so `Foo` → `foo/`."""
        d = self.manifests_dir
        out: list[str] = []
        parts = name.parts()
        for i, part in enumerate(parts):
            entry = self._match(d, part, want_dir=i < 3) if d.is_dir() else None
            chosen = entry or part
            out.append(chosen)
            d = d / chosen
        return name.with_parts(*out), d

    def resolve(self, name: ModelName | str) -> ModelName:
        """The stored casing of an existing model; raises ModelNotFound."""
        n = _as_name(name)
        found = self._find(n)
        if found is None:
            raise ModelNotFound(name)
        return found[0]

    def exists(self, name: ModelName | str) -> bool:
        try:
            return self._find(_as_name(name)) is not None
        except InvalidModelName:
            return False

    # ---- manifests -------------------------------------------------------------------------------------
    def write_manifest(
        self, name: ModelName | str, manifest: bytes | Manifest, *, require_blobs: bool = True,
    ) -> str:
        """Atomically (re)write a manifest; bytes are stored verbatim (pulled manifests keep their digest).

        Returns the manifest digest (hex). With require_blobs, every referenced blob must already exist, so a
        manifest never points at missing data.
        """
        n = _as_name(name)
        data = manifest.to_bytes() if isinstance(manifest, Manifest) else bytes(manifest)
        parsed = Manifest.from_bytes(data)
        with self._lock:
            if require_blobs:
                for layer in (parsed.config, *parsed.layers):
                    if not self.has_blob(layer.digest):
                        raise BlobNotFound(layer.digest)
            self.check_sizes(parsed)
            config = self.blob_path(parsed.config.digest)
            if self.has_blob(parsed.config.digest):  # a config that does not parse would break every later use
                if config.stat().st_size > MAX_CONFIG_BYTES:
                    raise InvalidManifest(f"invalid config blob: {config.stat().st_size} bytes, more than a model "
                                          f"config takes ({MAX_CONFIG_BYTES})")
                ConfigV2.from_bytes(config.read_bytes())
            _, path = self._target(n)
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(path, data)
        return hashlib.sha256(data).hexdigest()

    def check_sizes(self, m: Manifest) -> None:
        """Every size the manifest declares for a blob we hold must be that blob's: /api/tags, disk checks and
        progress all trust them (a lying one reached 10^21 bytes)."""
        for layer in (m.config, *m.layers):
            try:
                actual = self.blob_path(layer.digest).stat().st_size
            except FileNotFoundError:
                continue
            if actual != layer.size:
                raise InvalidManifest(f"layer {layer.digest} is {actual} bytes, not the {layer.size} the manifest "
                                      "says")

    def _read(self, name: ModelName | str) -> tuple[ModelName, bytes, os.stat_result]:
        n = _as_name(name)
        found = self._find(n)
        if found is None:
            raise ModelNotFound(name)
        canon, path = found
        try:
            with open(path, "rb") as f:
                return canon, f.read(), os.fstat(f.fileno())
        except FileNotFoundError:
            raise ModelNotFound(name) from None

    def manifest_bytes(self, name: ModelName | str) -> bytes:
        return self._read(name)[1]

    def read_manifest(self, name: ModelName | str) -> Manifest:
        return Manifest.from_bytes(self._read(name)[1])

    def manifest_digest(self, name: ModelName | str) -> str:
        return hashlib.sha256(self._read(name)[1]).hexdigest()

    def _walk(self) -> Iterator[tuple[ModelName, Path]]:
        """Every manifests/*/*/*/* regular file whose path parts form a valid name; strays are skipped."""

        def entries(d: Path, want_dir: bool) -> list[str]:
            try:
                with os.scandir(d) as it:
                    return sorted(e.name for e in it if not e.name.startswith(".")
                                  and (e.is_dir(follow_symlinks=False) if want_dir
                                       else e.is_file(follow_symlinks=False)))
            except OSError:
                return []

        for host in entries(self.manifests_dir, True):
            for ns in entries(self.manifests_dir / host, True):
                for model in entries(self.manifests_dir / host / ns, True):
                    for tag in entries(self.manifests_dir / host / ns / model, False):
                        try:
                            name = ModelName(host, ns, model, tag)
                        except InvalidModelName:
                            log.debug("ignoring stray manifest path %s/%s/%s/%s", host, ns, model, tag)
                            continue
                        yield name, self.manifests_dir / host / ns / model / tag

    def list_models(self) -> list[ModelEntry]:
        """Local models, newest first; unreadable manifests are logged and skipped, never fatal."""
        rows: list[tuple[int, ModelEntry]] = []
        for name, path in self._walk():
            try:
                with open(path, "rb") as f:
                    data = f.read()
                    st = os.fstat(f.fileno())
                m = Manifest.from_bytes(data)
            except (OSError, InvalidManifest) as e:
                log.warning("skipping manifest %s: %s", path, e)
                continue
            config = self._read_config(m)
            entry = ModelEntry(
                name=name, size=m.size, digest=hashlib.sha256(data).hexdigest(),
                modified_at=_local_time(st), details=model_details(config), manifest=m, config=config,
            )
            rows.append((st.st_mtime_ns, entry))
        rows.sort(key=lambda r: (-r[0], r[1].display))
        return [e for _, e in rows]

    def _read_config(self, m: Manifest) -> ConfigV2 | None:
        try:
            return ConfigV2.from_bytes(self.blob_path(m.config.digest).read_bytes())
        except (OSError, InvalidManifest) as e:
            log.warning("config blob %s unreadable: %s", m.config.digest, e)
            return None

    def _references(self) -> tuple[set[str], set[str], bool]:
        """(blob hexes referenced, manifest digests, every manifest readable)."""
        blobs: set[str] = set()
        manifests: set[str] = set()
        ok = True
        for _, path in self._walk():
            try:
                data = path.read_bytes()
                blobs |= Manifest.from_bytes(data).digests()
                manifests.add(hashlib.sha256(data).hexdigest())
            except (OSError, InvalidManifest) as e:
                log.warning("manifest %s unreadable: %s", path, e)
                ok = False
        return blobs, manifests, ok

    # ---- delete / copy / prune -------------------------------------------------------------------------
    def delete(self, name: ModelName | str) -> list[str]:
        """Remove a manifest, its empty dirs and the blobs nothing else uses; returns the removed digests."""
        n = _as_name(name)
        with self._lock:
            found = self._find(n)
            if found is None:
                raise ModelNotFound(name)
            _, path = found
            data = path.read_bytes()
            try:
                digests = Manifest.from_bytes(data).digests()
            except InvalidManifest:
                digests = set()
            path.unlink()
            self._remove_empty_dirs(path.parent)
            mdigest = hashlib.sha256(data).hexdigest()
            referenced, manifests, ok = self._references()
            removed: list[str] = []
            if not ok:
                log.warning("not collecting blobs of %s: some manifests are unreadable", n)
            else:
                for h in sorted(digests - referenced):
                    if self._pins[h] > 0:
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        (self.blobs_dir / f"sha256-{h}").unlink()
                        removed.append("sha256:" + h)
            if mdigest not in manifests:
                self._cache.pop(mdigest, None)
                _remove_path(self.tmp_dir / f"hf-{mdigest}")
        return removed

    def _remove_empty_dirs(self, d: Path) -> None:
        while d != self.manifests_dir and self.manifests_dir in d.parents:
            try:
                d.rmdir()
            except OSError:
                return
            d = d.parent

    def copy(self, src: ModelName | str, dst: ModelName | str) -> None:
        """Duplicate only the manifest (byte for byte, so the digest is the same)."""
        s, d = _as_name(src), _as_name(dst)
        with self._lock:
            found = self._find(s)
            if found is None:
                raise ModelNotFound(src)
            data = found[1].read_bytes()
            _, path = self._target(d)
            if path == found[1]:
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(path, data)

    def prune(self) -> list[str]:
        """Remove blobs no manifest references and empty manifest dirs (Ollama does this at startup).

        Skipped while any manifest is unreadable; never touches pinned blobs or partial downloads.
        """
        removed: list[str] = []
        with self._lock:
            referenced, _, ok = self._references()
            if ok:
                with os.scandir(self.blobs_dir) as it:
                    names = [e.name for e in it if e.is_file(follow_symlinks=False)]
                for fname in names:
                    m = re.fullmatch(r"sha256-([0-9a-f]{64})", fname)
                    if m and m.group(1) not in referenced and self._pins[m.group(1)] <= 0:
                        with contextlib.suppress(FileNotFoundError):
                            (self.blobs_dir / fname).unlink()
                            removed.append("sha256:" + m.group(1))
            for dirpath, _dirs, _files in os.walk(self.manifests_dir, topdown=False):
                p = Path(dirpath)
                if p != self.manifests_dir:
                    with contextlib.suppress(OSError):
                        p.rmdir()
        return removed

    def clean_temps(self) -> None:
        """Remove temp files whose writer is gone, and symlink views whose blobs were deleted."""
        candidates: list[Path] = []
        for d in (self.blobs_dir, self.tmp_dir):
            with contextlib.suppress(OSError), os.scandir(d) as it:
                candidates += [Path(e.path) for e in it if e.name.startswith(TMP_PREFIX)]
        for dirpath, _dirs, files in os.walk(self.manifests_dir):
            candidates += [Path(dirpath) / f for f in files if f.startswith(TMP_PREFIX)]
        for p in candidates:
            if _is_stale_temp(p):
                log.info("removing stale temp %s", p)
                _remove_path(p)
        with contextlib.suppress(OSError), os.scandir(self.tmp_dir) as it:
            views = [Path(e.path) for e in it if e.name.startswith("hf-") and e.is_dir(follow_symlinks=False)]
        for v in views:
            for dirpath, _dirs, files in os.walk(v):
                if any(not (Path(dirpath) / f).exists() for f in files):
                    _remove_path(v)
                    break

    # ---- load ------------------------------------------------------------------------------------------
    def load(self, name: ModelName | str) -> ResolvedModel:
        """Resolve a model for a runner or /api/show; raises ModelNotFound, BlobNotFound, InvalidManifest."""
        canon, data, st = self._read(name)
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            parsed = self._cache.get(digest)
            if parsed is not None:
                self._cache.move_to_end(digest)
        if parsed is None:
            parsed = self._parse(Manifest.from_bytes(data))
            with self._lock:
                self._cache[digest] = parsed
                while len(self._cache) > _CACHE_MAX:
                    self._cache.popitem(last=False)
        return ResolvedModel(
            name=canon, digest=digest, manifest=parsed.manifest, config=parsed.config,
            size=parsed.manifest.size, modified_at=_local_time(st), model_path=parsed.model_path,
            files=dict(parsed.files), adapters=list(parsed.adapters), projectors=list(parsed.projectors),
            template=parsed.template, system=parsed.system, params=copy.deepcopy(parsed.params),
            license=list(parsed.license), messages=copy.deepcopy(parsed.messages),
            capabilities=list(parsed.capabilities), parent_model=parsed.parent_model,
        )

    def _text(self, layer: Layer) -> str:
        try:
            return self.blob_path(layer.digest).read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            raise BlobNotFound(layer.digest) from None

    def _json(self, layer: Layer) -> Any:
        try:
            return json.loads(self._text(layer))
        except json.JSONDecodeError as e:
            raise InvalidManifest(f"layer {layer.digest} is not JSON: {e}") from None

    def _parse(self, m: Manifest) -> _Parsed:
        config_blob = self.blob_path(m.config.digest)
        try:
            config = ConfigV2.from_bytes(config_blob.read_bytes())
        except FileNotFoundError:
            raise BlobNotFound(m.config.digest) from None
        model_path: Path | None = None
        parent = ""
        files: dict[str, Path] = {}
        adapters: list[Path] = []
        projectors: list[Path] = []
        template: str | None = None
        system = ""
        params: dict[str, Any] = {}
        licenses: list[str] = []
        messages: list[dict[str, Any]] = []
        for layer in m.layers:
            mt = layer.media_type
            if mt in (MEDIA_TYPE_MODEL, MEDIA_TYPE_TENSOR, MEDIA_TYPE_JSON, MEDIA_TYPE_ADAPTER,
                      MEDIA_TYPE_PROJECTOR) and not self.has_blob(layer.digest):
                raise BlobNotFound(layer.digest)
            path = self.blob_path(layer.digest)
            if mt == MEDIA_TYPE_MODEL:
                model_path, parent = path, layer.from_ or ""
            elif mt in (MEDIA_TYPE_TENSOR, MEDIA_TYPE_JSON):
                if layer.name is None:
                    raise InvalidManifest(f"layer {layer.digest} ({mt}) has no file name")
                files[str(safe_relname(layer.name))] = path
            elif mt == MEDIA_TYPE_ADAPTER:
                adapters.append(path)
            elif mt == MEDIA_TYPE_PROJECTOR:
                projectors.append(path)
            elif mt in TEMPLATE_MEDIA_TYPES:
                template = self._text(layer)
            elif mt == MEDIA_TYPE_SYSTEM:
                system = self._text(layer)
            elif mt == MEDIA_TYPE_LICENSE:
                licenses.append(self._text(layer))
            elif mt == MEDIA_TYPE_PARAMS:
                value = self._json(layer)
                if not isinstance(value, dict):
                    raise InvalidManifest(f"params layer {layer.digest} is not a JSON object")
                params = value
            elif mt == MEDIA_TYPE_MESSAGES:
                value = self._json(layer)
                if not isinstance(value, list) or not all(isinstance(x, dict) for x in value):
                    raise InvalidManifest(f"messages layer {layer.digest} is not a list of messages")
                messages = value
        tmpl = template if template is not None else DEFAULT_TEMPLATE
        caps = self._capabilities(config, model_path, files, tmpl, projectors)
        return _Parsed(m, config, model_path, files, adapters, projectors, tmpl, system, params, licenses,
                       messages, caps, parent)

    @staticmethod
    def _capabilities(
        config: ConfigV2, model_path: Path | None, files: Mapping[str, Path], template: str,
        projectors: Sequence[Path],
    ) -> list[str]:
        """Ollama's Model.Capabilities(): weights decide completion vs embedding, the template the rest."""
        if config.capabilities:
            return list(config.capabilities)
        caps: list[str] = []
        if model_path is not None:
            try:
                meta = read_gguf(model_path, max_array=0, tensors=False)
            except (OSError, GGUFError) as e:
                log.warning("cannot read %s: %s", model_path, e)
                meta = None
            arch = meta.architecture if meta else ""
            caps.append("embedding" if meta and f"{arch}.pooling_type" in meta.kv else "completion")
            if meta and f"{arch}.vision.block_count" in meta.kv:
                caps.append("vision")
        elif files:
            hf = _hf_config(files.get("config.json"))
            caps.append("completion" if _hf_is_generative(hf) else "embedding")
            if isinstance(hf.get("vision_config"), dict):
                caps.append("vision")
        else:
            caps.append("completion")
        if re.search(r"\.Tools\b", template):
            caps.append("tools")
        if re.search(r"\.Suffix\b", template):
            caps.append("insert")
        if projectors and "vision" not in caps:
            caps.append("vision")
        if re.search(r"\.Think(ing)?\b", template) or config.model_family in ("gptoss", "gpt-oss"):
            caps.append("thinking")
        return caps

    # ---- runner views ----------------------------------------------------------------------------------
    def materialize_hf_dir(self, m: ResolvedModel) -> HFLocation:
        """Where transformers can load the model from.

        GGUF: (blobs dir, blob file name) for `from_pretrained(dir, gguf_file=name)`. Safetensors: a directory
        of relative symlinks (file name → blob) under tmp/, built in a temp dir and renamed into place.
        """
        if m.model_path is not None:
            return HFLocation(self.blobs_dir, m.model_path.name)
        if not m.files:
            raise InvalidModelInput(f"{m.name.display_shortest()} has no model weights")
        final = self.tmp_dir / f"hf-{m.digest}"
        if final.is_dir() and all((final / rel).exists() for rel in m.files):
            return HFLocation(final, None)
        build = self.tmp_dir / _temp_name()
        _register_temp(build, True)
        try:
            build.mkdir()
            for rel, blob in m.files.items():
                link = build / safe_relname(rel)
                link.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(os.path.relpath(blob, link.parent), link)
            if final.exists():
                _remove_path(final)  # a stale view (its blobs went away); rebuilt below
            try:
                os.rename(build, final)
            except OSError:
                if not final.is_dir():  # lost a race to a concurrent builder: theirs is as good
                    raise
        finally:
            _remove_path(build)
            _register_temp(build, False)
        return HFLocation(final, None)

    def show(self, m: ResolvedModel, verbose: bool = False) -> dict[str, Any]:
        """The /api/show body except `modified_at` (the HTTP layer formats times).

        model_info comes from the GGUF header (large arrays null unless verbose); for a safetensors model it
        is summarized from the config, since there is no GGUF key/value map to show.
        """
        cfg = m.config
        from_ = str(m.model_path) if m.model_path is not None else m.name.display_shortest()
        info: dict[str, Any] = {}
        if m.license:
            info["license"] = "\n".join(m.license)
        info["modelfile"] = format_modelfile(
            from_=from_, short_name=m.name.display_shortest(), template=m.template, system=m.system,
            parameters=m.params, license=m.license, messages=m.messages,
            adapters=[str(p) for p in m.adapters], projectors=[str(p) for p in m.projectors],
            renderer=cfg.renderer or "", parser=cfg.parser or "",
        )
        if params := format_parameters(m.params):
            info["parameters"] = params
        info["template"] = m.template
        if m.system:
            info["system"] = m.system
        if cfg.renderer:
            info["renderer"] = cfg.renderer
        if cfg.parser:
            info["parser"] = cfg.parser
        info["details"] = m.details
        if m.messages:
            info["messages"] = m.messages
        info["model_info"] = {}
        if m.model_path is not None:
            try:
                meta = read_gguf(m.model_path, verbose=verbose)
                info["model_info"] = meta.model_info()
                if verbose:
                    info["tensors"] = meta.tensor_list()
            except (OSError, GGUFError) as e:
                log.warning("cannot read %s: %s", m.model_path, e)
        elif m.files:
            fam = cfg.model_family
            count = sum(sum(_safetensors_counts(p).values()) for rel, p in m.files.items()
                        if rel.endswith(".safetensors"))
            info["model_info"] = {"general.architecture": fam, "general.parameter_count": count}
            if cfg.context_length:
                info["model_info"][f"{fam}.context_length"] = cfg.context_length
            if cfg.embedding_length:
                info["model_info"][f"{fam}.embedding_length"] = cfg.embedding_length
        if m.projectors:
            try:
                info["projector_info"] = read_gguf(m.projectors[0], verbose=verbose).model_info()
            except (OSError, GGUFError) as e:
                log.warning("cannot read %s: %s", m.projectors[0], e)
        info["capabilities"] = m.capabilities
        if cfg.requires:
            info["requires"] = cfg.requires
        return info

    def runner_files(self, m: ResolvedModel) -> tuple[str, Path, str | None]:
        """(kind, directory, gguf file name): kind "gguf" or "hf", as LoadSpec wants it."""
        loc = self.materialize_hf_dir(m)
        return ("gguf" if loc.gguf_file else "hf"), loc.path, loc.gguf_file

    # ---- create ----------------------------------------------------------------------------------------
    def create(
        self,
        name: ModelName | str,
        *,
        from_model: ModelName | str | None = None,
        gguf: str | os.PathLike[str] | None = None,
        hf_dir: str | os.PathLike[str] | None = None,
        model_file_digest: str | None = None,
        files: Mapping[str, str] | None = None,
        adapters: Mapping[str, str] | None = None,
        template: str | None = None,
        system: str | None = None,
        parameters: Mapping[str, Any] | None = None,
        license: str | Sequence[str] | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
        renderer: str | None = None,
        parser: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Create (or replace) a model; returns a generator of Ollama-style progress dicts.

        Exactly one source: `from_model` (inherit its layers), a local `gguf` file or `hf_dir` directory
        (copied into the store), an uploaded GGUF blob `model_file_digest`, or /api/create's `files`
        ({file name: digest} of uploaded blobs: one GGUF, or a safetensors directory). Empty template/system
        and empty lists mean "keep the inherited one", as in Ollama. Arguments are checked before the
        generator is returned; store errors surface while iterating.
        """
        target = _as_name(name)
        sources = [s for s in (from_model, gguf, hf_dir, model_file_digest, files) if s is not None]
        if not sources:
            raise InvalidModelInput("neither 'from' or 'files' was specified")
        if len(sources) > 1:
            raise InvalidModelInput("only one model source may be given")
        base = _as_name(from_model) if from_model is not None else None
        if model_file_digest is not None:
            parse_digest(model_file_digest)
        named = _check_file_map(files) if files is not None else None
        named_adapters = _check_file_map(adapters) if adapters else {}
        if parameters is not None and not isinstance(parameters, Mapping):
            raise InvalidModelInput("parameters must be an object")
        licenses = [license] if isinstance(license, str) else list(license or [])
        return self._create(
            target, base=base, gguf=Path(gguf) if gguf is not None else None,
            hf_dir=Path(hf_dir) if hf_dir is not None else None, model_file_digest=model_file_digest,
            files=named, adapters=named_adapters, template=template or None, system=system or None,
            parameters=dict(parameters or {}), licenses=[x for x in licenses if x],
            messages=[dict(x) for x in messages or []], renderer=renderer, parser=parser,
        )

    def _create(
        self, target: ModelName, *, base: ModelName | None, gguf: Path | None, hf_dir: Path | None,
        model_file_digest: str | None, files: dict[str, str] | None, adapters: dict[str, str],
        template: str | None, system: str | None, parameters: dict[str, Any], licenses: list[str],
        messages: list[dict[str, Any]], renderer: str | None, parser: str | None,
    ) -> Iterator[dict[str, Any]]:
        pins: set[str] = set()
        seen: dict[str, bool] = {}  # hex → created by this call (False: it was already there)
        try:
            layers: list[Layer] = []
            if base is not None:
                layers, config = self._base_layers(base, pins)
                seen.update(dict.fromkeys((layer.hex for layer in layers), False))
            else:
                config = ConfigV2()
                if gguf is not None or model_file_digest is not None:
                    if gguf is not None:
                        if not gguf.is_file():
                            raise InvalidModelInput(f"no such file: {gguf}")
                        w = self._put_file(gguf, pins)
                        assert w.digest is not None
                        digest, size = w.digest, w.size
                        seen[_hex(digest)] = not w.existed
                    else:
                        assert model_file_digest is not None
                        digest = "sha256:" + _hex(model_file_digest)
                        size = self.pin_existing(digest, pins)
                        seen[_hex(digest)] = False
                    yield {"status": "parsing GGUF"}
                    layers, config = self._gguf_layers(digest, size)
                elif hf_dir is not None:
                    yield {"status": "reading model metadata"}
                    for rel, path in _hf_files(hf_dir):
                        w = self._put_file(path, pins)
                        assert w.digest is not None
                        layers.append(Layer(media_type=_hf_media_type(rel), digest=w.digest, size=w.size,
                                            name=rel))
                        seen[_hex(w.digest)] = not w.existed
                    config = self._hf_config(layers)
                elif files is not None:
                    sizes = {rel: self.pin_existing(d, pins) for rel, d in files.items()}
                    seen.update(dict.fromkeys((_hex(d) for d in files.values()), False))
                    ggufs = [rel for rel, d in files.items() if is_gguf(self.blob_path(d))]
                    if len(files) == 1 and ggufs:
                        (digest,) = files.values()
                        yield {"status": "parsing GGUF"}
                        layers, config = self._gguf_layers("sha256:" + _hex(digest), sizes[ggufs[0]])
                    elif any(rel.endswith(".safetensors") for rel in files):
                        yield {"status": "reading model metadata"}
                        layers = [Layer(media_type=_hf_media_type(rel), digest="sha256:" + _hex(d),
                                        size=sizes[rel], name=rel) for rel, d in sorted(files.items())]
                        _require_hf(set(files))
                        config = self._hf_config(layers)
                    else:
                        raise InvalidModelInput("unsupported model files: expected one GGUF file or "
                                                "a safetensors directory (config.json and *.safetensors)")
            for d in adapters.values():
                size = self.pin_existing(d, pins)
                layers.append(Layer(media_type=MEDIA_TYPE_ADAPTER, digest="sha256:" + _hex(d), size=size))
                seen.setdefault(_hex(d), False)

            def text_layer(media_type: str, text: str) -> Layer:
                return self._data_layer(media_type, text.encode(), pins, seen)

            if template is not None:
                layers = [x for x in layers if x.media_type not in TEMPLATE_MEDIA_TYPES]
                layers.append(text_layer(MEDIA_TYPE_TEMPLATE, template))
            if system is not None:
                layers = [x for x in layers if x.media_type != MEDIA_TYPE_SYSTEM]
                layers.append(text_layer(MEDIA_TYPE_SYSTEM, system))
            if licenses:
                layers = [x for x in layers if x.media_type != MEDIA_TYPE_LICENSE]
                layers += [text_layer(MEDIA_TYPE_LICENSE, x) for x in licenses]
            if parameters:
                merged = dict(parameters)
                for old in [x for x in layers if x.media_type == MEDIA_TYPE_PARAMS]:
                    prior = self._json(old)
                    if isinstance(prior, dict):
                        for k, v in prior.items():
                            merged.setdefault(k, v)
                layers = [x for x in layers if x.media_type != MEDIA_TYPE_PARAMS]
                layers.append(self._data_layer(MEDIA_TYPE_PARAMS, go_json(merged), pins, seen))
            if messages:
                layers = [x for x in layers if x.media_type != MEDIA_TYPE_MESSAGES]
                layers.append(self._data_layer(MEDIA_TYPE_MESSAGES, go_json(messages), pins, seen))

            if renderer:
                config.renderer = renderer
            if parser:
                config.parser = parser
            config.rootfs.diff_ids = [x.digest for x in layers]
            config_layer = self._data_layer(MEDIA_TYPE_CONFIG, config.to_bytes(), pins, seen)
            for layer in (*layers, config_layer):
                verb = "creating new" if seen.get(layer.hex) else "using existing"
                yield {"status": f"{verb} layer {layer.digest}"}
            yield {"status": "writing manifest"}
            self.write_manifest(target, Manifest(config=config_layer, layers=layers))
            yield {"status": "success"}
        except BaseException:  # failed or abandoned (GeneratorExit): drop the blobs this call added
            self.unpin_all(pins)
            self._drop_unreferenced([h for h, new in seen.items() if new])
            raise
        finally:
            self.unpin_all(pins)

    def _drop_unreferenced(self, hexes: Iterable[str]) -> None:
        hexes = list(hexes)
        if not hexes:
            return
        with self._lock:
            referenced, _, ok = self._references()
            if not ok:
                return
            for h in hexes:
                if h not in referenced and self._pins[h] <= 0:
                    with contextlib.suppress(FileNotFoundError):
                        (self.blobs_dir / f"sha256-{h}").unlink()

    def _data_layer(self, media_type: str, data: bytes, pins: set[str], seen: dict[str, bool]) -> Layer:
        digest, existed = self._put_bytes(data, pins)
        seen.setdefault(_hex(digest), not existed)
        return Layer(media_type=media_type, digest=digest, size=len(data))

    def _base_layers(self, base: ModelName, pins: set[str]) -> tuple[list[Layer], ConfigV2]:
        """The layers of an existing model, pinned, each marked `from` it (Ollama's NewLayerFromLayer)."""
        with self._lock:
            canon, data, _ = self._read(base)
            m = Manifest.from_bytes(data)
            for h in m.digests():
                if not self.has_blob("sha256:" + h):
                    raise BlobNotFound("sha256:" + h)
                self.pin(h, pins)
        try:
            config = ConfigV2.from_bytes(self.blob_path(m.config.digest).read_bytes())
        except FileNotFoundError:
            raise BlobNotFound(m.config.digest) from None
        src = canon.display_shortest()
        layers = [layer.model_copy(update={"from_": src}) for layer in m.layers]
        return layers, config

    def _gguf_layers(self, digest: str, size: int) -> tuple[list[Layer], ConfigV2]:
        try:
            meta = read_gguf(self.blob_path(digest), max_array=0)
        except GGUFError as e:
            raise InvalidModelInput(str(e)) from None
        arch = meta.architecture
        config = ConfigV2(
            model_format="gguf", model_family=arch, model_families=[arch] if arch else None,
            model_type=human_number(meta.parameter_count), file_type=meta.file_type_name,
            context_length=meta.context_length, embedding_length=meta.embedding_length,
        )
        return [Layer(media_type=MEDIA_TYPE_MODEL, digest=digest, size=size)], config

    def _hf_config(self, layers: list[Layer]) -> ConfigV2:
        by_name = {x.name: self.blob_path(x.digest) for x in layers if x.name}
        if "config.json" not in by_name:
            raise InvalidModelInput("config.json not found")
        hf = _hf_config(by_name["config.json"])
        n_params = 0
        dtypes: Counter[str] = Counter()
        for rel, path in by_name.items():
            if rel.endswith(".safetensors"):
                for dtype, count in _safetensors_counts(path).items():
                    dtypes[dtype] += count
                    n_params += count
        text = hf.get("text_config") if isinstance(hf.get("text_config"), dict) else {}
        family = str(hf.get("model_type") or text.get("model_type") or "")

        def pick(*keys: str) -> int | None:
            for src in (hf, text):
                for k in keys:
                    v = src.get(k)
                    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                        return v
            return None

        return ConfigV2(
            model_format="safetensors", model_family=family, model_families=[family] if family else None,
            model_type=human_number(n_params), file_type=dtypes.most_common(1)[0][0] if dtypes else "",
            context_length=pick("max_position_embeddings", "n_positions", "max_seq_len"),
            embedding_length=pick("hidden_size", "d_model", "n_embd"),
        )


# --------------------------------------------------------------------------------------------------------
# Helpers for create


def _local_time(st: os.stat_result) -> datetime:
    return datetime.fromtimestamp(st.st_mtime_ns / 1e9).astimezone()


def _check_file_map(files: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for rel, digest in files.items():
        try:
            safe_relname(rel)
        except InvalidManifest:
            raise InvalidModelInput(f"invalid file name {rel!r}") from None
        if not digest:
            raise InvalidDigest(str(digest))
        parse_digest(digest)
        out[rel] = digest
    return out


def _hf_media_type(rel: str) -> str:
    return MEDIA_TYPE_TENSOR if rel.endswith(".safetensors") else MEDIA_TYPE_JSON


def _require_hf(names: Iterable[str]) -> None:
    names = set(names)
    if "config.json" not in names:
        raise InvalidModelInput("config.json not found")
    if not any(n.endswith(".safetensors") for n in names):
        raise InvalidModelInput("no safetensors files found")


def _hf_files(root: Path) -> list[tuple[str, Path]]:
    """The weights, configs and tokenizer files of a Hugging Face directory (relative name, path)."""
    if not root.is_dir():
        raise InvalidModelInput(f"not a directory: {root}")
    out: list[tuple[str, Path]] = []
    for dirpath, dirs, fnames in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for fname in sorted(fnames):
            if fname.startswith(".") or not fname.endswith((".safetensors", *_HF_AUX_SUFFIXES)):
                continue
            path = Path(dirpath) / fname
            if path.is_file():  # follows symlinks on purpose: HF cache snapshots are symlinks
                out.append((path.relative_to(root).as_posix(), path))
    _require_hf(rel for rel, _ in out)
    return sorted(out)  # by name, the same order as an uploaded `files` map gets


def _hf_config(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise InvalidModelInput(f"config.json: {e}") from None
    if not isinstance(value, dict):
        raise InvalidModelInput("config.json is not a JSON object")
    return value


def _hf_is_generative(hf: Mapping[str, Any]) -> bool:
    archs = hf.get("architectures") or []
    if not archs:
        return True
    return any(isinstance(a, str) and a.endswith(("ForCausalLM", "ForConditionalGeneration", "LMHeadModel"))
               for a in archs)


def _safetensors_counts(path: Path) -> Counter[str]:
    """Elements per dtype from a safetensors header (8-byte length, JSON), without reading tensor data."""
    counts: Counter[str] = Counter()
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("file too short")
            (n,) = struct.unpack("<Q", head)
            if n > 100 << 20:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise InvalidModelInput(f"{path.name}: not a safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise InvalidModelInput(f"{path.name}: not a safetensors file")
    for key, info in header.items():
        if key == "__metadata__" or not isinstance(info, dict):
            continue
        shape = info.get("shape") or []
        count = 1
        for d in shape:
            count *= int(d)
        counts[str(info.get("dtype", "")).upper()] += count
    return counts
