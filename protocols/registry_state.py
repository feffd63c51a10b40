"""The region registry's data and write rules: pure, deterministic, no I/O and no clocks.

Every Raft replica runs the same writes in the same log order through `RegistryState.apply`, so
everything here must depend only on the current data and the write's arguments: no wall clock
(the proposer stamps `ts`), no randomness, no iteration over unordered containers that leaks into
results. Bad arguments give an error `WriteResult` instead of raising, so every replica reaches the
same verdict and the log never holds an entry that crashes a replica.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

#: Keep this many changes so a watcher that fell a little behind can catch up without a full resync.
MAX_CHANGES = 1000
#: Largest JSON encoding of one setting or label set; the registry is for control data, not blobs.
MAX_VALUE_BYTES = 64 * 1024
MAX_KEY_LEN = 256
MAX_REPLICAS = 1000
#: A change's value is copied into the change log only when its JSON is this small.
MAX_SUMMARY_BYTES = 1024

NODE_STATES = ("alive", "suspect", "dead", "left", "joining")
NODE_FIELDS = ("region", "role", "api_addr", "labels", "cordoned", "draining", "state")
MUTABLE_NODE_FIELDS = ("cordoned", "draining", "state", "labels")
MODEL_FIELDS = ("digest", "size", "desired_replicas")

WRITE_OPS = (
    "upsert_node",
    "set_node_fields",
    "remove_node",
    "put_model",
    "delete_model",
    "set_placement",
    "set_setting",
)

# Error codes carried by WriteResult.error.
INVALID = "invalid"
CONFLICT = "conflict"
NOT_FOUND = "not_found"
INTERNAL = "internal"

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class WriteResult:
    """Outcome of one replicated write, identical on every replica.

    `version` is the object's version after the write (or its current one when the write did not
    apply; 0 = absent). Versions are the registry revision of the object's last write, so they never
    repeat after delete + recreate (no ABA for compare-and-set).
    """

    ok: bool
    revision: int
    error: str | None = None
    message: str = ""
    version: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Change:
    """One applied write, as streamed to watchers; `value` is a summary (small values verbatim)."""

    revision: int
    kind: str
    key: str
    value: Any
    ts: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Invalid(Exception):
    """Internal: a validation failure, turned into an error result by `apply`."""

    def __init__(self, code: str, message: str, version: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.version = version


def empty_data() -> dict[str, Any]:
    """A fresh registry; plain containers only, so it pickles into pysyncobj's dump unchanged."""
    return {
        "revision": 0,
        "nodes": {},
        "models": {},
        "placements": {},
        "placement_versions": {},
        "settings": {},
        "changes": deque(maxlen=MAX_CHANGES),
    }


def _json_copy(value: Any, what: str) -> Any:
    """Normalise to plain JSON types (tuples become lists) and bound the size."""
    try:
        text = json.dumps(value, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise _Invalid(INVALID, f"{what} is not JSON-serialisable: {exc}") from None
    if len(text) > MAX_VALUE_BYTES:
        raise _Invalid(INVALID, f"{what} is {len(text)} bytes of JSON, over the {MAX_VALUE_BYTES} limit")
    return json.loads(text)


def _key(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_KEY_LEN or value != value.strip():
        raise _Invalid(INVALID, f"{what} must be a non-empty string of at most {MAX_KEY_LEN} chars, no outer spaces")
    return value


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(INVALID, f"{what} must be a bool")
    return value


def _labels(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise _Invalid(INVALID, "labels must be a dict of str to str")
    return _json_copy(value, "labels")


def _expected(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Invalid(INVALID, "expected_version must be None or an int >= 0 (0 = must not exist)")
    return value


def _check_version(expected: int | None, current: int, what: str) -> None:
    if expected is not None and expected != current:
        raise _Invalid(CONFLICT, f"{what}: expected version {expected}, current is {current}", current)


def _summary(value: Any) -> Any:
    text = json.dumps(value, sort_keys=True)
    return value if len(text) <= MAX_SUMMARY_BYTES else {"truncated": True, "bytes": len(text)}


class RegistryState:
    """Applies writes to a registry data dict (from `empty_data`) in place.

    The dict, not this wrapper, is the replicated state: pysyncobj pickles and restores it.
    """

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        self.data = data if data is not None else empty_data()

    @property
    def revision(self) -> int:
        return self.data["revision"]

    def snapshot(self) -> dict[str, Any]:
        """A deep copy without the change log; the caller owns it."""
        d = self.data
        return copy.deepcopy({k: d[k] for k in d if k != "changes"})

    def changes_since(self, revision: int) -> list[Change] | None:
        """Changes after `revision`, or None when the log no longer reaches back (resync from a snapshot)."""
        changes = self.data["changes"]
        if revision >= self.revision:
            return []
        if not changes or changes[0]["revision"] > revision + 1:
            return None
        return [Change(**c) for c in changes if c["revision"] > revision]

    def apply(self, op: str, ts: float, args: tuple[Any, ...]) -> tuple[WriteResult, Change | None]:
        """Run one write; never raises for bad input, and changes nothing unless it applies."""
        handler = getattr(self, f"_op_{op}", None) if op in WRITE_OPS else None
        if handler is None:
            return WriteResult(False, self.revision, INVALID, f"unknown write op {op!r}"), None
        if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
            return WriteResult(False, self.revision, INVALID, "ts must be a finite number"), None
        if not isinstance(args, tuple | list):
            return WriteResult(False, self.revision, INVALID, "args must be a sequence"), None
        try:
            # Handlers validate everything first, then mutate; a TypeError means a wrong arity.
            kind, key, value, version = handler(float(ts), *args)
        except _Invalid as exc:
            return WriteResult(False, self.revision, exc.code, str(exc), exc.version), None
        except TypeError as exc:
            return WriteResult(False, self.revision, INVALID, f"bad arguments for {op}: {exc}"), None
        except Exception as exc:  # a bug here must not wedge the Raft apply loop on every replica
            return WriteResult(False, self.revision, INTERNAL, f"{op} failed: {exc!r}"), None
        change = Change(self.revision, kind, key, _summary(value), float(ts))
        self.data["changes"].append(change.to_dict())
        return WriteResult(True, self.revision, None, "", version), change

    def _bump(self) -> int:
        self.data["revision"] += 1
        return self.data["revision"]

    # -- nodes ---------------------------------------------------------------------------------

    def _op_upsert_node(self, ts: float, node_id: Any, info: Any) -> tuple[str, str, Any, int | None]:
        node_id = _key(node_id, "node_id")
        if not isinstance(info, dict):
            raise _Invalid(INVALID, "node info must be a dict")
        unknown = sorted(set(map(str, info)) - set(NODE_FIELDS))
        if unknown:
            raise _Invalid(INVALID, f"unknown node fields {unknown}; allowed: {list(NODE_FIELDS)}")
        current = self.data["nodes"].get(node_id)
        if current is None:
            missing = [f for f in ("region", "role", "api_addr") if f not in info]
            if missing:
                raise _Invalid(INVALID, f"new node {node_id!r} needs {missing}")
            record: dict[str, Any] = {
                "region": "", "role": "", "api_addr": "", "labels": {},
                "cordoned": False, "draining": False, "state": "alive",
            }
        else:
            record = copy.deepcopy(current)
        for field in ("region", "role"):
            if field in info:
                record[field] = _key(info[field], field)
        if "api_addr" in info:
            if not isinstance(info["api_addr"], str) or len(info["api_addr"]) > MAX_KEY_LEN:
                raise _Invalid(INVALID, "api_addr must be a string")
            record["api_addr"] = info["api_addr"]
        self._node_mutables(record, info)
        record["updated_at"] = ts
        self.data["nodes"][node_id] = record
        self._bump()
        return "node.upsert", node_id, record, None

    def _node_mutables(self, record: dict[str, Any], fields: dict[str, Any]) -> None:
        for field in ("cordoned", "draining"):
            if field in fields:
                record[field] = _bool(fields[field], field)
        if "state" in fields:
            if fields["state"] not in NODE_STATES:
                raise _Invalid(INVALID, f"state must be one of {list(NODE_STATES)}")
            record["state"] = fields["state"]
        if "labels" in fields:
            record["labels"] = _labels(fields["labels"])

    def _op_set_node_fields(self, ts: float, node_id: Any, fields: Any) -> tuple[str, str, Any, int | None]:
        node_id = _key(node_id, "node_id")
        if not isinstance(fields, dict) or not fields:
            raise _Invalid(INVALID, "fields must be a non-empty dict")
        unknown = sorted(set(map(str, fields)) - set(MUTABLE_NODE_FIELDS))
        if unknown:
            raise _Invalid(INVALID, f"fields {unknown} can't be set here; allowed: {list(MUTABLE_NODE_FIELDS)}")
        current = self.data["nodes"].get(node_id)
        if current is None:
            raise _Invalid(NOT_FOUND, f"no node {node_id!r}")
        record = copy.deepcopy(current)
        self._node_mutables(record, fields)
        record["updated_at"] = ts
        self.data["nodes"][node_id] = record
        self._bump()
        return "node.update", node_id, record, None

    def _op_remove_node(self, ts: float, node_id: Any) -> tuple[str, str, Any, int | None]:
        node_id = _key(node_id, "node_id")
        if node_id not in self.data["nodes"]:
            raise _Invalid(NOT_FOUND, f"no node {node_id!r}")
        del self.data["nodes"][node_id]
        revision = self._bump()
        # Placements never point at unknown nodes; dropping one counts as a placement write.
        for model in sorted(self.data["placements"]):
            nodes = self.data["placements"][model]
            if node_id in nodes:
                self.data["placements"][model] = [n for n in nodes if n != node_id]
                self.data["placement_versions"][model] = revision
        return "node.remove", node_id, None, None

    # -- models and placements -----------------------------------------------------------------

    def _op_put_model(self, ts: float, name: Any, info: Any, expected_version: Any = None) -> tuple[str, str, Any, int]:
        name = _key(name, "model name")
        expected = _expected(expected_version)
        if not isinstance(info, dict):
            raise _Invalid(INVALID, "model info must be a dict")
        if sorted(map(str, info)) != sorted(MODEL_FIELDS):
            raise _Invalid(INVALID, f"model info needs exactly {list(MODEL_FIELDS)}")
        digest, size, replicas = info["digest"], info["size"], info["desired_replicas"]
        if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
            raise _Invalid(INVALID, "digest must look like sha256:<64 lowercase hex>")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise _Invalid(INVALID, "size must be an int >= 0")
        if isinstance(replicas, bool) or not isinstance(replicas, int) or not 0 <= replicas <= MAX_REPLICAS:
            raise _Invalid(INVALID, f"desired_replicas must be an int in 0..{MAX_REPLICAS}")
        current = self.data["models"].get(name)
        _check_version(expected, current["version"] if current else 0, f"model {name!r}")
        version = self._bump()
        record = {"digest": digest, "size": size, "desired_replicas": replicas, "version": version, "updated_at": ts}
        self.data["models"][name] = record
        return "model.put", name, record, version

    def _op_delete_model(self, ts: float, name: Any, expected_version: Any = None) -> tuple[str, str, Any, int]:
        name = _key(name, "model name")
        expected = _expected(expected_version)
        current = self.data["models"].get(name)
        if current is None:
            raise _Invalid(NOT_FOUND, f"no model {name!r}", 0)
        _check_version(expected, current["version"], f"model {name!r}")
        del self.data["models"][name]
        self.data["placements"].pop(name, None)
        self.data["placement_versions"].pop(name, None)
        self._bump()
        return "model.delete", name, None, 0

    def _op_set_placement(
        self, ts: float, name: Any, node_ids: Any, expected_version: Any = None
    ) -> tuple[str, str, Any, int]:
        name = _key(name, "model name")
        expected = _expected(expected_version)
        if not isinstance(node_ids, list | tuple):
            raise _Invalid(INVALID, "node_ids must be a list")
        nodes = [_key(n, "node id") for n in node_ids]
        if len(set(nodes)) != len(nodes):
            raise _Invalid(INVALID, "node_ids has duplicates")
        unknown = [n for n in nodes if n not in self.data["nodes"]]
        if unknown:
            raise _Invalid(INVALID, f"unknown nodes {unknown}")
        if name not in self.data["models"]:
            raise _Invalid(NOT_FOUND, f"no model {name!r}", 0)
        _check_version(expected, self.data["placement_versions"].get(name, 0), f"placement of {name!r}")
        version = self._bump()
        self.data["placements"][name] = nodes
        self.data["placement_versions"][name] = version
        return "placement.set", name, {"nodes": nodes, "version": version}, version

    # -- settings ------------------------------------------------------------------------------

    def _op_set_setting(self, ts: float, key: Any, value: Any) -> tuple[str, str, Any, int | None]:
        key = _key(key, "setting key")
        if value is None:
            if key not in self.data["settings"]:
                raise _Invalid(NOT_FOUND, f"no setting {key!r}")
            del self.data["settings"][key]
            self._bump()
            return "setting.delete", key, None, None
        value = _json_copy(value, f"setting {key!r}")
        self.data["settings"][key] = value
        self._bump()
        return "setting.set", key, value, None
