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
_BLOB_CACHE = 2048  # cached packed updates per codec and direction (cleared when exceeded)
_BLOB_MAX = 2560  # larger received updates (big metadata) are not cached: bounds the cache to ~5 MB
_K_W, _K_B, _K_U, _K_M = msgpack.packb("w"), msgpack.packb("b"), msgpack.packb("u"), msgpack.packb("m")
_ARRAY_HEADER = msgpack.Packer().pack_array_header


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
    if t in UDP_TYPES:
        d = _udp_head(msg)
        d["u"] = _updates_to_wire(msg[-1])
        return d
    if t == PUSH_PULL:
        return {"t": t, "o": msg[1], "j": msg[2], "m": [member_to_wire(m) for m in msg[3]]}
    if t == PUSH_PULL_REPLY:
        return {"t": t, "o": msg[1], "m": [member_to_wire(m) for m in msg[2]]}
    raise ValueError(f"unknown message type {t!r}")


def _udp_head(msg: tuple) -> dict[str, Any]:
    """A datagram message's fields except its updates ``u``, which always come last on the wire."""
    t = msg[0]
    if t == PING:
        return {"t": t, "s": msg[1], "g": msg[2]}
    if t in (ACK, NACK):
        return {"t": t, "s": msg[1]}
    if t == PING_REQ:
        return {"t": t, "s": msg[1], "g": msg[2], "h": msg[3], "p": msg[4]}
    return {"t": t}


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
    # One flat function: this runs for every update of every packet (the hottest path under load).
    if type(d) is not dict:
        raise SchemaError("expected map")
    get = d.get
    k, mid, host, port, inc, ver, meta, frm = (get("k"), get("i"), get("h"), get("p"), get("n"), get("v", 0),
                                               get("m"), get("f"))
    if (type(k) is not int or not 0 <= k <= 3
            or type(mid) is not str or not 0 < len(mid) <= MAX_ID_LEN
            or type(host) is not str or not 0 < len(host) <= MAX_HOST_LEN
            or type(port) is not int or not 0 <= port <= 65535
            or type(inc) is not int or not 0 <= inc <= _U63
            or type(ver) is not int or not 0 <= ver <= _U63):
        raise SchemaError("bad member")
    state = STATES[k]
    if meta is not None:
        if type(meta) is not dict:
            raise SchemaError("expected map")
        for mk in meta:
            if type(mk) is not str or len(mk) > 256:
                raise SchemaError("bad string")
    elif k == 0:
        meta = {}
    if (frm is not None or need_from) and (type(frm) is not str or not 0 < len(frm) <= MAX_ID_LEN):
        raise SchemaError("bad string")
    return Member(mid, host, port, inc, state, meta, ver), frm


def _updates_from_wire(v: object) -> list[tuple[Member, str]]:
    if type(v) is not list:
        raise SchemaError("expected list")
    return [member_from_wire(d, need_from=True) for d in v]  # type: ignore[misc]


class _Validated(list):  # type: ignore[type-arg]
    """A member list the codec's fast path has already validated record by record."""


def _members_from_wire(v: object) -> list[Member]:
    if type(v) is _Validated:
        return list(v)
    if type(v) is not list:
        raise SchemaError("expected list")
    return [member_from_wire(d)[0] for d in v]


def msg_from_wire(d: object, ups: list[tuple[Member, str]] | None = None) -> tuple:
    """Validate a decoded body and build the core tuple; unknown fields are ignored.

    ``ups``: the body's updates, already validated one by one (the codec's fast path).
    """
    d = _map(d)
    t = _int(d.get("t"), 1, 255)
    if t == PING:
        return (t, _int(d.get("s"), 0, _U32), _str(d.get("g"), MAX_ID_LEN),
                _updates_from_wire(d.get("u", [])) if ups is None else ups)
    if t in (ACK, NACK):
        return (t, _int(d.get("s"), 0, _U32), _updates_from_wire(d.get("u", [])) if ups is None else ups)
    if t == PING_REQ:
        return (t, _int(d.get("s"), 0, _U32), _str(d.get("g"), MAX_ID_LEN), _str(d.get("h"), MAX_HOST_LEN),
                _int(d.get("p"), 0, 65535), _updates_from_wire(d.get("u", [])) if ups is None else ups)
    if t == GOSSIP:
        return (t, _updates_from_wire(d.get("u")) if ups is None else ups)
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
        # Each queued update goes out ~λ·log N times and each member receives it about as often, so
        # both directions cache it by its bytes (memberlist also keeps broadcasts pre-encoded):
        # sent: id(update tuple) → (tuple, packed bytes); received: packed bytes → validated update.
        # Push-pull member lists likewise, per member record.
        self._sent_blobs: dict[int, tuple[Any, bytes]] = {}
        self._seen_blobs: dict[bytes, Any] = {}
        self._sent_members: dict[int, tuple[Any, bytes]] = {}
        self._seen_members: dict[bytes, Any] = {}
        self._env_head = b"\x84" + msgpack.packb("f") + msgpack.packb(node_id) + msgpack.packb("c")

    @property
    def encrypted(self) -> bool:
        return bool(self._aeads)

    def encode(self, msg: tuple) -> bytes:
        self._counter += 1
        # Byte for byte what packb({"f": id, "c": counter, "w": wall ms, "b": msg_to_wire(msg)}) gives,
        # but with each update's packed bytes reused from the cache.
        plain = b"".join((self._env_head, msgpack.packb(self._counter), _K_W, msgpack.packb(int(self._clock() * 1000)),
                          _K_B, self._body(msg)))
        if not self._aeads:
            return bytes((WIRE_VERSION, 0)) + plain
        kid, aead = self._aeads[0]
        head = bytes((WIRE_VERSION, kid))
        nonce = os.urandom(NONCE_LEN)
        return head + nonce + aead.encrypt(nonce, plain, head)

    def _body(self, msg: tuple) -> bytes:
        t = msg[0]
        if t in UDP_TYPES:
            head, key, items, cache = _udp_head(msg), _K_U, msg[-1], self._sent_blobs
        elif t == PUSH_PULL:
            head, key, items, cache = {"t": t, "o": msg[1], "j": msg[2]}, _K_M, msg[3], self._sent_members
        elif t == PUSH_PULL_REPLY:
            head, key, items, cache = {"t": t, "o": msg[1]}, _K_M, msg[2], self._sent_members
        else:
            raise ValueError(f"unknown message type {t!r}")
        packed = msgpack.packb(head)  # a fixmap of at most 5 fields: one more for the list, which comes last
        if len(cache) > _BLOB_CACHE:
            cache.clear()
        parts = [bytes((packed[0] + 1,)), packed[1:], key, _ARRAY_HEADER(len(items))]
        for it in items:
            hit = cache.get(id(it))
            if hit is None or hit[0] is not it:
                if key is _K_U:
                    m, f = it
                    blob = msgpack.packb(member_to_wire(m, f, with_meta=m.state == ALIVE))
                else:
                    blob = msgpack.packb(member_to_wire(it))
                hit = cache[id(it)] = (it, blob)
            parts.append(hit[1])
        return b"".join(parts)

    def _fast_msg(self, plain: bytes) -> tuple[str, int, int, tuple] | None:
        """Decode the common shape with each update looked up by its bytes; ``None`` → take the slow path.

        It accepts exactly what the slow path accepts (each update is unpacked and validated the same
        way the first time its bytes are seen); anything unusual — a repeated key, an unexpected
        type, trailing bytes — is left to the slow path, which also classifies the drop.
        """
        up = msgpack.Unpacker(None, raw=False, strict_map_key=True, ext_hook=_no_ext, max_buffer_size=len(plain))
        up.feed(plain)
        env: dict[str, Any] = {}
        body: dict[str, Any] | None = None
        ups: list[Any] | None = None
        for _ in range(up.read_map_header()):
            k = up.unpack()
            if type(k) is not str or k in env:
                return None
            if k != "b":
                env[k] = up.unpack()
                continue
            env[k] = body = {}
            for _ in range(up.read_map_header()):
                bk = up.unpack()
                if type(bk) is not str or bk in body:
                    return None
                if bk not in ("u", "m"):
                    body[bk] = up.unpack()
                    continue
                is_u = bk == "u"
                body[bk] = items = []
                seen = self._seen_blobs if is_u else self._seen_members
                if len(seen) > _BLOB_CACHE:
                    seen.clear()
                for _ in range(up.read_array_header()):
                    start = up.tell()
                    up.skip()
                    blob = plain[start:up.tell()]
                    hit = seen.get(blob)
                    if hit is None:
                        d = msgpack.unpackb(blob, raw=False, strict_map_key=True, ext_hook=_no_ext)
                        hit = member_from_wire(d, need_from=True) if is_u else member_from_wire(d)[0]
                        if len(blob) <= _BLOB_MAX:
                            seen[blob] = hit
                    items.append(hit)
                if is_u:
                    ups = items
                else:
                    body[bk] = _Validated(items)
        if up.tell() != len(plain) or body is None:
            return None
        sender, counter, wall = env.get("f"), env.get("c"), env.get("w")
        if (type(sender) is not str or not 0 < len(sender) <= MAX_ID_LEN or type(counter) is not int
                or not 0 <= counter <= _U63 or type(wall) is not int or not 0 <= wall <= _U63):
            return None
        return sender, counter, wall, msg_from_wire(body, ups)

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
            fast = self._fast_msg(plain)
        except Exception:
            fast = None
        if fast is not None:
            sender, counter, wall, msg = fast
        else:
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
