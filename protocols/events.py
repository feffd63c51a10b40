"""The node's event stream format: membership, leader and registry changes as server-sent events."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    seq: int
    kind: str  # e.g. "member.joined", "member.dead", "raft.leader", "registry.node"
    data: dict[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "kind": self.kind, "ts": self.ts, "data": self.data}

    def sse(self) -> bytes:
        """One SSE frame; `id` lets a reconnecting client resume with Last-Event-ID."""
        body = json.dumps(self.to_json(), separators=(",", ":"), ensure_ascii=False)
        return f"id: {self.seq}\nevent: {self.kind}\ndata: {body}\n\n".encode()
