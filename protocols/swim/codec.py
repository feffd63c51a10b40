"""SWIM wire format: message tuples ↔ authenticated, encrypted msgpack packets.

The core speaks in plain tuples (see the ``PING``…``PUSH_PULL_REPLY`` constants); this module
turns them into bytes and back. Decoding is the trust boundary: every packet is size-checked,
authenticated (AEAD with the cluster key), replay-checked and schema-checked, and anything
wrong is dropped and counted by reason — never raised to the caller. Maps with short keys are
used on the wire so that fields a newer version adds are simply ignored by older ones.

Frame layout: ``version(1) | key_id(1) | nonce(12) | ChaCha20-Poly1305(plaintext, aad=first 2 bytes)``;
with ``key=None`` (explicitly insecure) ``key_id`` is 0 and the plaintext follows directly.
Plaintext: msgpack map ``{"f": sender id, "c": packet counter, "w": wall-clock ms, "b": body}``.
Member records inside a body (piggybacked updates ``u``, push-pull state ``m``) are each a msgpack
``bin`` holding one packed record map, like memberlist's compound messages: the same update goes
out ~λ·log N times and each member receives it about as often, so both ends handle it as one
opaque, cached byte string and only a record never seen before is unpacked and validated. An
update's ``f`` (who vouches for it) is left out when it is the member itself, as for every alive
update: such an update is then byte for byte the member's push-pull record, and one cache entry
serves both.
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
_BLOB_CACHE = 2048  # packed non-alive push-pull records cached per codec (cleared when exceeded)
_RECORD_CACHE = 16384  # entries of each process-wide record cache below (cleared when exceeded)
_BLOB_MAX = 2560  # larger received records (big metadata) are not cached: bounds those caches to ~40 MB each

# Each queued update goes out ~λ·log N times and each member receives it about as often, so records
# are packed and validated once, then reused by their bytes (memberlist too keeps broadcasts encoded):
# _PACKED: id(record) → (record, from, bytes); _SEEN: received bytes → validated (record, from).
# Both are pure functions (validation runs only after the packet passed its own codec's AEAD, size,
# replay and envelope checks), so all codecs in a process share them: with one member per process,
# as deployed, they are that member's caches; with many (tests, the simulator on the wire, the
# benchmark) a record is packed and checked once per process rather than once per member, which
# would otherwise be N² work on one CPU. A received record also primes _PACKED with its own bytes.
_PACKED: dict[int, tuple[Member, str, bytes]] = {}
_SEEN: dict[bytes, tuple[Member, str]] = {}


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


def bin_size(n: int) -> int:
    """Bytes a msgpack ``bin`` of ``n`` bytes takes on the wire, header included."""
    return n + (2 if n < 0x100 else 3 if n < 0x10000 else 5)


def update_blob(m: Member, frm: str) -> bytes:
    """One piggybacked update, packed (meta only travels with ``alive``; ``f`` only when not the member)."""
    return msgpack.packb(member_to_wire(m, None if frm == m.id else frm, with_meta=m.state == ALIVE))


def packed_update(m: Member, frm: str) -> bytes:
    """:func:`update_blob` through the process-wide cache (keyed by the record object)."""
    hit = _PACKED.get(id(m))
    if hit is not None and hit[0] is m and hit[1] == frm:
        return hit[2]
    blob = update_blob(m, frm)
    if len(_PACKED) > _RECORD_CACHE:
        _PACKED.clear()
    _PACKED[id(m)] = (m, frm, blob)
    return blob


def update_size(m: Member, frm: str) -> int:
    """Wire size of one piggybacked update inside a packet (packing it for sending, too)."""
    return bin_size(len(packed_update(m, frm)))


def _head(msg: tuple) -> dict[str, Any]:
    """A message's fields except its records (``u`` or ``m``), which always come last on the wire."""
    t = msg[0]
    if t == PING:
        return {"t": t, "s": msg[1], "g": msg[2]}
    if t in (ACK, NACK):
        return {"t": t, "s": msg[1]}
    if t == PING_REQ:
        return {"t": t, "s": msg[1], "g": msg[2], "h": msg[3], "p": msg[4]}
    if t == GOSSIP:
        return {"t": t}
    if t == PUSH_PULL:
        return {"t": t, "o": msg[1], "j": msg[2]}
    if t == PUSH_PULL_REPLY:
        return {"t": t, "o": msg[1]}
    raise ValueError(f"unknown message type {t!r}")


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


def member_from_wire(d: object) -> tuple[Member, str]:
    """A validated record and who vouches for it (``f``; the member itself when absent)."""
    # One flat function: it runs for every record this node has not seen before.
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
    if frm is None:
        frm = mid
    elif type(frm) is not str or not 0 < len(frm) <= MAX_ID_LEN:
        raise SchemaError("bad string")
    return Member(mid, host, port, inc, state, meta, ver), frm


def record_from_wire(blob: object) -> tuple[Member, str]:
    """One record as it sits in a packet: a ``bin`` holding a packed member map."""
    if type(blob) is not bytes:
        raise SchemaError("expected a packed record")
    try:
        d = msgpack.unpackb(blob, raw=False, strict_map_key=True, ext_hook=_no_ext)
    except Exception as e:
        raise SchemaError("bad record") from e
    return member_from_wire(d)


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
        self._sent_members: dict[int, tuple[Member, bytes]] = {}  # non-alive push-pull records (with meta)
        self._pack = msgpack.Packer().pack

    @property
    def encrypted(self) -> bool:
        return bool(self._aeads)

    def encode(self, msg: tuple) -> bytes:
        self._counter += 1
        body = _head(msg)
        if msg[0] in UDP_TYPES:
            # packed_update's cache hit, inlined: this runs for every update of every packet sent.
            get = _PACKED.get
            body["u"] = [hit[2] if (hit := get(id(m))) is not None and hit[0] is m and hit[1] == f
                         else packed_update(m, f) for m, f in msg[-1]]
        else:
            body["m"] = list(map(self._member_bytes, msg[-1]))
        plain = self._pack({"f": self.node_id, "c": self._counter, "w": int(self._clock() * 1000), "b": body})
        if not self._aeads:
            return bytes((WIRE_VERSION, 0)) + plain
        kid, aead = self._aeads[0]
        head = bytes((WIRE_VERSION, kid))
        nonce = os.urandom(NONCE_LEN)
        return head + nonce + aead.encrypt(nonce, plain, head)

    def _member_bytes(self, m: Member) -> bytes:
        if m.state == ALIVE:
            return packed_update(m, m.id)  # the same bytes as its self-vouched update
        hit = self._sent_members.get(id(m))
        if hit is not None and hit[0] is m:
            return hit[1]
        blob = self._pack(member_to_wire(m))
        if len(self._sent_members) > _BLOB_CACHE:
            self._sent_members.clear()
        self._sent_members[id(m)] = (m, blob)
        return blob

    def _records(self, v: object) -> list[tuple[Member, str]]:
        if type(v) is not list:
            raise SchemaError("expected list")
        seen = _SEEN
        try:
            return [seen[b] for b in v]  # only bytes keys are cached, so only a bytes ``b`` can hit
        except (KeyError, TypeError):
            pass
        if len(seen) > _RECORD_CACHE:
            seen.clear()
        if len(_PACKED) > _RECORD_CACHE:
            _PACKED.clear()
        out = []
        for b in v:
            hit = seen.get(b) if type(b) is bytes else None
            if hit is None:
                hit = record_from_wire(b)
                if len(b) <= _BLOB_MAX:
                    seen[b] = hit
                    if hit[0].state == ALIVE and hit[1] == hit[0].id:
                        # Relaying it (alive updates are relayed as they are) then sends these same bytes.
                        _PACKED[id(hit[0])] = (hit[0], hit[1], b)
            out.append(hit)
        return out

    def _msg(self, d: object) -> tuple:
        """Validate a decoded body and build the core tuple; unknown fields are ignored."""
        d = _map(d)
        get = d.get
        t = _int(get("t"), 1, 255)
        if t == PING:
            return (t, _int(get("s"), 0, _U32), _str(get("g"), MAX_ID_LEN), self._records(get("u", [])))
        if t in (ACK, NACK):
            return (t, _int(get("s"), 0, _U32), self._records(get("u", [])))
        if t == PING_REQ:
            return (t, _int(get("s"), 0, _U32), _str(get("g"), MAX_ID_LEN), _str(get("h"), MAX_HOST_LEN),
                    _int(get("p"), 0, 65535), self._records(get("u", [])))
        if t == GOSSIP:
            return (t, self._records(get("u")))
        if t == PUSH_PULL:
            j = get("j", False)
            if type(j) is not bool:
                raise SchemaError("bad join flag")
            return (t, _str(get("o"), MAX_ID_LEN), j, [m for m, _ in self._records(get("m"))])
        if t == PUSH_PULL_REPLY:
            return (t, _str(get("o"), MAX_ID_LEN), [m for m, _ in self._records(get("m"))])
        raise SchemaError(f"unknown message type {t}")

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
            if len(data) < 2 + NONCE_LEN + TAG_LEN:
                return self._drop("garbage")  # too short to be sealed (AESGCM raises on a short nonce)
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
            msg = self._msg(env.get("b"))
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
