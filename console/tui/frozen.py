"""A `Source` with fixed data: snapshot tests render it deterministically; the benchmark scales it up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from omx.console.tui.client import ApiError
from omx.console.tui.data import EventRow, Instance, Member, MetricPoint, MetricsSample, ModelInfo, Snapshot

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z: event times in snapshots never depend on the clock


def sample_snapshot(nodes: int = 5, instances: int | None = None, regions: int = 1) -> Snapshot:
    """A plausible cluster: the first three nodes of each region vote, one node is dead, one suspect."""
    members = []
    for i in range(nodes):
        region = "default" if regions == 1 else f"region-{i % regions + 1}"
        status = "dead" if i == 3 else "suspect" if i == 4 else "alive"
        control = i // regions < 3
        members.append(Member(
            id=f"node-{i + 1:04d}", status=status, region=region, role="control" if control else "worker",
            api_addr=f"http://10.0.{i // 250}.{i % 250 + 1}:11434", gossip_addr=f"10.0.{i // 250}.{i % 250 + 1}:7946",
            raft_state=("leader" if i < regions else "follower") if control else "", raft_term=7 if control else None,
            models=("omx-tiny:latest",) if i % 2 == 0 else (), inflight=i % 3, slots=4, cordoned=i == 2,
            draining=i == 2 and nodes > 5, memory=f"{(i % 7) + 1}.5 GiB", is_self=i == 0))
    leaders = {m.region: m.id for m in members if m.raft_state == "leader"}
    n_inst = nodes if instances is None else instances
    insts = []
    for j in range(n_inst):
        m = members[j % nodes]
        external = j >= nodes
        insts.append(Instance(
            id=f"ext-{j:05d}" if external else m.id, url=f"http://10.1.{j // 250 % 250}.{j % 250}:11434"
            if external else m.api_addr, node="" if external else m.id, region=m.region,
            kind="external" if external else "node",
            status={"alive": "healthy", "dead": "dead", "suspect": "suspect"}[m.status] if not external else "healthy",
            circuit="open" if m.status == "dead" and not external else "closed",
            models=("omx-tiny:latest", "llama3:8b"), loaded=("omx-tiny:latest",) if j % 2 == 0 else (),
            inflight=j % 4, slots=4, queue=j % 3, latency_ms=40.0 + j % 50, tokens_per_s=20.0 + j % 30))
    models = (
        ModelInfo("omx-tiny:latest", "sha256:" + "ab" * 32, 1_234_567, 2, 2, ("node-0001", "node-0003")),
        ModelInfo("llama3:8b", "sha256:" + "cd" * 32, 4_661_224_676, 3, 1, ("node-0002",),
                  (("node-0003", 1_864_489_870, 4_661_224_676),)),
        ModelInfo("qwen2:0.5b", "sha256:" + "ef" * 32, 352_000_000, None, 0, ()),
    )
    per = {m.id: MetricPoint(1.5 + k, 42.0 + k, 180.0 + k, 12.0, 48.0, 30.0 + k)
           for k, m in enumerate(members[: min(nodes, 8)])}
    metrics = MetricsSample(cluster=MetricPoint(12.5, 45.0, 210.0, 14.0, 60.0, 240.0), per_node=per, source="proxy")
    return Snapshot(connected="http://10.0.0.1:11434", self_id="node-0001", region="default", members=tuple(members),
                    leaders=leaders, instances=tuple(insts), models=models, metrics=metrics, ts=T0)


def sample_events() -> list[EventRow]:
    kinds = [("member.joined", {"id": "node-0002", "address": "10.0.0.2:7946"}),
             ("raft.leader", {"region": "default", "leader": "10.0.0.1:7000", "by": "node-0001"}),
             ("member.suspect", {"id": "node-0005", "incarnation": 3}),
             ("member.dead", {"id": "node-0004", "incarnation": 2}),
             ("raft.voter_down", {"id": "node-0004", "region": "default"}),
             ("registry.node", {"key": "node-0003", "revision": 12}),
             ("router.retried", {"model": "llama3:8b", "target": "node-0003", "reason": "node-0002: cannot connect"}),
             ("router.resumed", {"model": "llama3:8b", "target": "node-0003", "tokens": 57})]
    return [EventRow(seq=i + 1, kind=k, ts=T0 + 60 * i, data=d, origin="http://10.0.0.1:11434")
            for i, (k, d) in enumerate(kinds)]


class FrozenSource:
    """Serves the same snapshot every poll; actions are recorded in `calls`, and may be told to fail."""

    def __init__(self, snap: Snapshot | None = None, events: list[EventRow] | None = None,
                 history: list[MetricsSample] | None = None) -> None:
        self.snap = snap or sample_snapshot()
        self.url = self.snap.connected
        self.event_rows = sample_events() if events is None else events
        self.history = history  # successive metric samples served one per poll (the last one repeats)
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.fail: str | None = None  # when set, every action raises ApiError with this text
        self.polls = 0

    async def snapshot(self) -> Snapshot:
        self.polls += 1
        if self.history:
            return replace(self.snap, metrics=self.history[min(self.polls, len(self.history)) - 1])
        return self.snap

    async def events(self, after: int) -> AsyncIterator[EventRow]:
        for e in self.event_rows:
            if e.seq > after:
                yield e
        await asyncio.Event().wait()  # a quiet but open stream

    async def _act(self, name: str, *args: Any) -> dict[str, Any]:
        self.calls.append((name, args))
        if self.fail:
            raise ApiError(self.fail, 409)
        return {"ok": True}

    async def node_action(self, node: str, action: str) -> dict[str, Any]:
        return await self._act(action, node)

    async def remove_node(self, node: str, force: bool) -> dict[str, Any]:
        return await self._act("remove", node, force)

    async def transfer_leader(self, to: str | None = None, region: str | None = None) -> dict[str, Any]:
        return await self._act("transfer_leader", to, region)

    async def scale_model(self, model: str, replicas: int) -> dict[str, Any]:
        return await self._act("scale", model, replicas)

    async def pull_model(self, model: str) -> AsyncIterator[dict[str, Any]]:
        await self._act("pull", model)
        for done in (0, 50, 100):
            yield {"status": "downloading", "total": 100, "completed": done}
        yield {"status": "success"}

    async def delete_model(self, model: str) -> dict[str, Any]:
        return await self._act("delete", model)

    async def copy_model(self, source: str, destination: str) -> dict[str, Any]:
        return await self._act("copy", source, destination)

    async def load_model(self, model: str) -> dict[str, Any]:
        return await self._act("load", model)

    async def unload_model(self, model: str) -> dict[str, Any]:
        return await self._act("unload", model)

    async def add_instance(self, url: str) -> dict[str, Any]:
        return await self._act("add_instance", url)

    async def remove_instance(self, url: str) -> dict[str, Any]:
        return await self._act("remove_instance", url)

    async def chat(self, model: str, messages: list[dict[str, str]]) -> AsyncIterator[dict[str, Any]]:
        await self._act("chat", model, len(messages))
        for word in ("Hello", " from", " the", " cluster."):
            yield {"message": {"role": "assistant", "content": word}, "done": False}
        yield {"message": {"role": "assistant", "content": ""}, "done": True, "eval_count": 4}

    async def close(self) -> None:
        return None
