"""Length-prefixed JSON frames: the node <-> runner pipe protocol.

A 4-byte big-endian length then a UTF-8 JSON object. Length-prefixing (rather than lines) lets
token text carry any character, and the size cap keeps a corrupt peer from making us allocate
gigabytes.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any, BinaryIO

MAX_FRAME = 256 * 1024 * 1024
_HEADER = struct.Struct(">I")


class FrameError(Exception):
    """The peer sent something that is not a frame; the channel cannot be trusted any more."""


def encode(obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    return _HEADER.pack(len(body)) + body


def _decode(body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(body)
    except ValueError as e:
        raise FrameError(f"bad frame: {e}") from e
    if not isinstance(obj, dict):
        raise FrameError("bad frame: not an object")
    return obj


def _read_exactly(stream: BinaryIO, n: int) -> bytes:
    """Up to n bytes, fewer only at EOF: a raw pipe answers each read with whatever has arrived (64 KiB at a
    time), so one read() of a 300 KB frame comes back short."""
    first = stream.read(n)
    if not first or len(first) == n:
        return first or b""
    buf = bytearray(first)
    while len(buf) < n:
        more = stream.read(n - len(buf))
        if not more:
            break
        buf += more
    return bytes(buf)


def read_sync(stream: BinaryIO) -> dict[str, Any] | None:
    """Blocking read of one frame; None on a clean EOF."""
    head = _read_exactly(stream, _HEADER.size)
    if not head:
        return None
    if len(head) < _HEADER.size:
        raise FrameError("truncated frame header")
    (n,) = _HEADER.unpack(head)
    if n > MAX_FRAME:
        raise FrameError(f"frame too large: {n} bytes")
    body = _read_exactly(stream, n)
    if len(body) < n:
        raise FrameError("truncated frame body")
    return _decode(body)


async def read_async(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """Read one frame; None on a clean EOF."""
    try:
        head = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise FrameError("truncated frame header") from e
    (n,) = _HEADER.unpack(head)
    if n > MAX_FRAME:
        raise FrameError(f"frame too large: {n} bytes")
    try:
        body = await reader.readexactly(n)
    except asyncio.IncompleteReadError as e:
        raise FrameError("truncated frame body") from e
    return _decode(body)
