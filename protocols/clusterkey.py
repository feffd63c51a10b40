"""The cluster key file: one shared secret from which gossip, Raft and internal HTTP keys are derived."""

from __future__ import annotations

import base64
import os
import secrets
import stat
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32


class ClusterKeyError(Exception):
    """The cluster key file is missing, unreadable or malformed; the message says which and how to fix it."""


def generate_key_file(path: Path) -> bytes:
    key = secrets.token_bytes(KEY_BYTES)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(base64.b64encode(key).decode() + "\n")
    return key


def read_key_file(path: Path) -> bytes:
    try:
        text = path.read_text().strip()
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
