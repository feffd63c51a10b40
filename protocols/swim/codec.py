"""SWIM wire format: message tuples ↔ authenticated, encrypted msgpack packets.

The core speaks in plain tuples (see the ``PING``…``PUSH_PULL_REPLY`` constants); this module
turns them into bytes and back. Decoding is the trust boundary: every packet is size-checked,
authenticated (AEAD with the cluster key), replay-checked and schema-checked, and anything
wrong is dropped and counted by reason — never raised to the caller. Maps with short keys are
used on the wire so that fields a newer version adds are simply ignored by older ones.

Frame layout: ``version(1) | key_id(1) | nonce(12) | ChaCha20-Poly1305(plaintext, aad=first 2 bytes)``;
with ``key=None`` (explicitly insecure) ``key_id`` is 0 and the plaintext follows directly.
Plaintext: msgpack map ``{"f": sender id, "c": packet counter, "w": wall-clock ms, "b": body}``.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

ALIVE, SUSPECT, DEAD, LEFT = "alive", "suspect", "dead", "left"
STATES = (ALIVE, SUSPECT, DEAD, LEFT)
_STATE_CODE = {s: i for i, s in enumerate(STATES)}

# Message type codes (first element of every core message tuple).
PING, ACK, NACK, PING_REQ, GOSSIP, PUSH_PULL, PUSH_PULL_REPLY = 1, 2, 3, 4, 5, 6, 7
UDP_TYPES = frozenset({PING, ACK, NACK, PING_REQ, GOSSIP})
STREAM_TYPES = frozenset({PUSH_PULL, PUSH_PULL_REPLY})

WIRE_VERSION = 1
NONCE_LEN = 12
TAG_LEN = 16
#: Bytes an encrypted frame adds around the msgpack body, plus the envelope map; used by the
#: core to keep piggybacked gossip inside the UDP packet budget.
PACKET_OVERHEAD = 2 + NONCE_LEN + TAG_LEN + 64

MAX_ID_LEN = 128
MAX_HOST_LEN = 253
_U32 = 0xFFFFFFFF
_U63 = (1 << 63) - 1


class Member(NamedTuple):
    """One member as gossiped. Immutable, so one record can be shared by many simulated nodes."""

    id: str
    host: str
    port: int
    incarnation: int
    state: str
    meta: Mapping[str, Any] | None
    meta_version: int

    @property
    def addr(self) -> tuple[str, int]:
        return (self.host, self.port)


class SchemaError(ValueError):
    """A decoded packet does not match the message schema."""


def key_id(key: bytes) -> int:
    """One byte naming a key so a keyring can pick the right one; 0 is reserved for 'no key'."""
    return hashlib.sha256(key).digest()[0] or 1


def packed_size(obj: object) -> int:
    return len(msgpack.packb(obj))


# --------------------------------------------------------------------------- to wire


def member_to_wire(m: Member, frm: str | None = None, *, with_meta: bool = True) -> dict[str, Any]:
    d: dict[str, Any] = {"k": _STATE_CODE[m.state], "i": m.id, "n": m.incarnation, "h": m.host, "p": m.port,
                         "v": m.meta_version}
    if with_meta and m.meta is not None:
        d["m"] = m.meta
    if frm is not None:
        d["f"] = frm
    return d


def update_size(m: Member, frm: str) -> int:
    """Encoded size of one piggybacked update (meta only travels with ``alive``)."""
    return packed_size(member_to_wire(m, frm, with_meta=m.state == ALIVE))


def msg_to_wire(msg: tuple) -> dict[str, Any]:
    t = msg[0]
    if t == PING:
        return {"t": t, "s": msg[1], "g": msg[2], "u": _updates_to_wire(msg[3])}
    if t in (ACK, NACK):
        return {"t": t, "s": msg[1], "u": _updates_to_wire(msg[2])}
    if t == PING_REQ:
        return {"t": t, "s": msg[1], "g": msg[2], "h": msg[3], "p": msg[4], "u": _updates_to_wire(msg[5])}
    if t == GOSSIP:
        return {"t": t, "u": _updates_to_wire(msg[1])}
    if t == PUSH_PULL:
        return {"t": t, "o": msg[1], "j": msg[2], "m": [member_to_wire(m) for m in msg[3]]}
    if t == PUSH_PULL_REPLY:
        return {"t": t, "o": msg[1], "m": [member_to_wire(m) for m in msg[2]]}
    raise ValueError(f"unknown message type {t!r}")


def _updates_to_wire(ups: Sequence[tuple[Member, str]]) -> list[dict[str, Any]]:
    return [member_to_wire(m, f, with_meta=m.state == ALIVE) for m, f in ups]


# --------------------------------------------------------------------------- from wire (schema)


def _int(v: object, lo: int, hi: int) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise SchemaError("int out of range")
    return v


def _str(v: object, maxlen: int, minlen: int = 1) -> str:
    if type(v) is not str or not minlen <= len(v) <= maxlen:
        raise SchemaError("bad string")
    return v


def _map(v: object) -> dict:
    if type(v) is not dict:
        raise SchemaError("expected map")
    return v


def member_from_wire(d: object, *, need_from: bool = False) -> tuple[Member, str | None]:
    d = _map(d)
    state = STATES[_int(d.get("k"), 0, 3)]
    meta = d.get("m")
    if meta is not None:
        meta = _map(meta)
        for k in meta:
            _str(k, 256, 0)
    elif state == ALIVE:
        meta = {}
    frm = d.get("f")
    if frm is not None or need_from:
        frm = _str(frm, MAX_ID_LEN)
    m = Member(_str(d.get("i"), MAX_ID_LEN), _str(d.get("h"), MAX_HOST_LEN), _int(d.get("p"), 0, 65535),
               _int(d.get("n"), 0, _U63), state, meta, _int(d.get("v", 0), 0, _U63))
    return m, frm


def _updates_from_wire(v: object) -> list[tuple[Member, str]]:
    if type(v) is not list:
        raise SchemaError("expected list")
    out = []
    for d in v:
        m, frm = member_from_wire(d, need_from=True)
        out.append((m, frm))
    return out


def _members_from_wire(v: object) -> list[Member]:
    if type(v) is not list:
        raise SchemaError("expected list")
    return [member_from_wire(d)[0] for d in v]


def msg_from_wire(d: object) -> tuple:
    """Validate a decoded body and build the core tuple; unknown fields are ignored."""
    d = _map(d)
    t = _int(d.get("t"), 1, 255)
    if t == PING:
        return (t, _int(d.get("s"), 0, _U32), _str(d.get("g"), MAX_ID_LEN), _updates_from_wire(d.get("u", [])))
    if t in (ACK, NACK):
        return (t, _int(d.get("s"), 0, _U32), _updates_from_wire(d.get("u", [])))
    if t == PING_REQ:
        return (t, _int(d.get("s"), 0, _U32), _str(d.get("g"), MAX_ID_LEN), _str(d.get("h"), MAX_HOST_LEN),
                _int(d.get("p"), 0, 65535), _updates_from_wire(d.get("u", [])))
    if t == GOSSIP:
        return (t, _updates_from_wire(d.get("u")))
    if t == PUSH_PULL:
        j = d.get("j", False)
        if type(j) is not bool:
            raise SchemaError("bad join flag")
        return (t, _str(d.get("o"), MAX_ID_LEN), j, _members_from_wire(d.get("m")))
    if t == PUSH_PULL_REPLY:
        return (t, _str(d.get("o"), MAX_ID_LEN), _members_from_wire(d.get("m")))
    raise SchemaError(f"unknown message type {t}")


def _no_ext(code: int, data: bytes) -> object:
    raise SchemaError("msgpack ext types are not allowed")


# --------------------------------------------------------------------------- replay window


class _ReplayGuard:
    """Per-sender sliding window of packet counters (IPsec style), bounded in senders.

    Counters start at the sender's boot time in µs, so a restarted node is never mistaken for
    a replay of its previous life. A sender evicted from the LRU could have one old packet
    replayed within the clock-skew limit; the skew check bounds that exposure.
    """

    def __init__(self, window: int = 1024, max_senders: int = 4096) -> None:
        self.window = window
        self.max_senders = max_senders
        self._seen: OrderedDict[str, list[int]] = OrderedDict()

    def check(self, sender: str, counter: int) -> bool:
        st = self._seen.get(sender)
        if st is None:
            self._seen[sender] = [counter, 1]
            if len(self._seen) > self.max_senders:
                self._seen.popitem(last=False)
            return True
        self._seen.move_to_end(sender)
        top, mask = st
        if counter > top:
            shift = counter - top
            st[0] = counter
            st[1] = ((mask << shift) | 1) & ((1 << self.window) - 1) if shift < self.window else 1
            return True
        back = top - counter
        if back >= self.window or (mask >> back) & 1:
            return False
        st[1] = mask | (1 << back)
        return True


# --------------------------------------------------------------------------- codec


class Codec:
    """Encodes and decodes one node's packets; keeps drop counters and the replay window.

    ``key`` may be one 32-byte key, a keyring (first key encrypts, all decrypt — for rotation),
    or ``None`` to run unencrypted, which must be asked for explicitly.
    """

    def __init__(self, node_id: str, key: bytes | Sequence[bytes] | None, *, max_packet: int = 65_000,
                 max_stream: int = 32 * 1024 * 1024, max_skew: float = 120.0,
                 clock: Callable[[], float] = time.time) -> None:
        keys: list[bytes] = [] if key is None else [key] if isinstance(key, bytes | bytearray) else list(key)
        for k in keys:
            if len(k) != 32:
                raise ValueError("cluster keys must be 32 bytes")
        if key is not None and not keys:
            raise ValueError("empty keyring; pass key=None to run without encryption")
        self.node_id = node_id
        self._aeads = [(key_id(k), ChaCha20Poly1305(bytes(k))) for k in keys]
        self.max_packet = max_packet
        self.max_stream = max_stream
        self.max_skew = max_skew
        self._clock = clock
        self._counter = time.time_ns() // 1000
        self._replay = _ReplayGuard()
        self.drops: Counter[str] = Counter()
        self.accepted = 0
        self.last_drop = ""

    @property
    def encrypted(self) -> bool:
        return bool(self._aeads)

    def encode(self, msg: tuple) -> bytes:
        self._counter += 1
        plain = msgpack.packb({"f": self.node_id, "c": self._counter, "w": int(self._clock() * 1000),
                               "b": msg_to_wire(msg)})
        if not self._aeads:
            return bytes((WIRE_VERSION, 0)) + plain
        kid, aead = self._aeads[0]
        head = bytes((WIRE_VERSION, kid))
        nonce = os.urandom(NONCE_LEN)
        return head + nonce + aead.encrypt(nonce, plain, head)

    def _drop(self, reason: str) -> None:
        self.drops[reason] += 1
        self.last_drop = reason

    def decode(self, data: bytes, *, stream: bool = False) -> tuple[str, tuple] | None:
        """Return ``(sender_id, message)`` or ``None`` (dropped, counted in ``drops``)."""
        if len(data) > (self.max_stream if stream else self.max_packet):
            return self._drop("oversized")
        if len(data) < 3 or data[0] != WIRE_VERSION:
            return self._drop("garbage")
        kid = data[1]
        if kid == 0:
            if self._aeads:
                return self._drop("key")  # plaintext packet to an encrypted cluster
            plain = data[2:]
        else:
            plain = None
            for k, aead in self._aeads:
                if k != kid:
                    continue
                try:
                    plain = aead.decrypt(data[2:2 + NONCE_LEN], data[2 + NONCE_LEN:], data[:2])
                    break
                except InvalidTag:
                    continue
            if plain is None:
                return self._drop("key")
        try:
            env = msgpack.unpackb(plain, raw=False, strict_map_key=True, ext_hook=_no_ext)
        except Exception:
            return self._drop("decode")
        try:
            env = _map(env)
            sender = _str(env.get("f"), MAX_ID_LEN)
            counter = _int(env.get("c"), 0, _U63)
            wall = _int(env.get("w"), 0, _U63)
            msg = msg_from_wire(env.get("b"))
        except SchemaError:
            return self._drop("schema")
        if (msg[0] in STREAM_TYPES) != stream:
            return self._drop("schema")
        if abs(wall / 1000.0 - self._clock()) > self.max_skew:
            return self._drop("stale")
        if not self._replay.check(sender, counter):
            return self._drop("replay")
        self.accepted += 1
        return sender, msg
