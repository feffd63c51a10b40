"""The cluster key file: one shared secret from which gossip, Raft and internal HTTP keys are derived."""

from __future__ import annotations

import base64
import errno
import os
import secrets
import stat
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32


class ClusterKeyError(Exception):
    """The cluster key file is missing, unreadable or malformed; the message says which and how to fix it."""


def generate_key_file(path: Path) -> bytes:
    """Write a new key; raises FileExistsError rather than replace one, and leaves no partial file behind."""
    key = secrets.token_bytes(KEY_BYTES)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path))
    # Written whole to a temp file first, then linked into place: a failed write (disk full, a file size
    # limit) must not leave an empty key that keygen then refuses to replace; link(), unlike rename(),
    # never overwrites a key another keygen put there meanwhile.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(base64.b64encode(key).decode() + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    finally:
        os.unlink(tmp)
    return key


def read_key_file(path: Path) -> bytes:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise ClusterKeyError(f"cluster key file {path}: not base64 text") from None
    except FileNotFoundError:
        raise ClusterKeyError(
            f"cluster key file {path} does not exist (create one with `omx keygen {path}`)"
        ) from None
    except OSError as e:
        raise ClusterKeyError(f"cluster key file {path}: {e.strerror}") from None
    try:
        key = base64.b64decode(text, validate=True)
    except ValueError:
        raise ClusterKeyError(f"cluster key file {path}: not base64 text") from None
    if len(key) != KEY_BYTES:
        raise ClusterKeyError(f"cluster key file {path}: the key must be {KEY_BYTES} bytes, got {len(key)}")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ClusterKeyError(f"cluster key file {path} is readable by others (mode {oct(mode & 0o777)}); chmod 600 it")
    return key


def derive(key: bytes, purpose: str) -> bytes:
    """Separate keys per use (gossip, raft) from one cluster key, so one leaked derivative exposes nothing else."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=f"omx {purpose}".encode()).derive(key)
