"""The Raft registry: pure write rules in-process, and a 3-voter group of real processes on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from omx.protocols.registry import Registry, RegistryConfig, RegistryConfigError, RegistryUnavailable
from omx.protocols.registry_state import CONFLICT, INVALID, NOT_FOUND, RegistryState

DIGEST = "sha256:" + "ab" * 32
MODEL = {"digest": DIGEST, "size": 10, "desired_replicas": 2}
NODE = {"region": "eu", "role": "control", "api_addr": "127.0.0.1:11434"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_until(pred: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)


class Voter:
    """A registry voter process driven over its JSON-lines stdin/stdout."""

    def __init__(self, addr: str, partners: list[str], data_dir: Path, password: str | None, **extra: Any) -> None:
        self.addr = addr
        self.config = {"self_addr": addr, "partners": partners, "data_dir": str(data_dir), "password": password}
        self.config.update(extra)
        self.proc: asyncio.subprocess.Process | None = None
        self._next = 0
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self.first_line: asyncio.Future[dict[str, Any]] | None = None

    async def start(self) -> dict[str, Any]:
        log = await asyncio.to_thread(open, self.config["data_dir"] + ".log", "ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "omx.protocols.registry_testnode", json.dumps(self.config),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
        )
        log.close()
        self.first_line = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read())
        return await asyncio.wait_for(self.first_line, 20)

    async def _read(self) -> None:
        assert self.proc and self.proc.stdout and self.first_line
        while line := await self.proc.stdout.readline():
            msg = json.loads(line)
            if "event" in msg and not self.first_line.done():
                self.first_line.set_result(msg)
            fut = self._waiting.pop(msg.get("id"), None) if "id" in msg else None
            if fut and not fut.done():
                fut.set_result(msg)
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(ConnectionError(f"voter {self.addr} exited"))
        if not self.first_line.done():
            self.first_line.set_exception(ConnectionError(f"voter {self.addr} exited before ready"))

    async def call(self, cmd: str, within: float = 15, **kw: Any) -> dict[str, Any]:
        assert self.proc and self.proc.stdin
        self._next += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[self._next] = fut
        self.proc.stdin.write((json.dumps({"id": self._next, "cmd": cmd, **kw}) + "\n").encode())
        await self.proc.stdin.drain()
        return await asyncio.wait_for(fut, within)

    async def result(self, cmd: str, **kw: Any) -> Any:
        reply = await self.call(cmd, **kw)
        assert reply["ok"], reply
        return reply["result"]

    async def write(self, op: str, *args: Any, commit_timeout: float = 5.0) -> dict[str, Any]:
        """The raw reply: {"ok": True, "result": WriteResult} or {"ok": False, "error": ...}."""
        return await self.call("write", op=op, args=list(args), timeout=commit_timeout)

    def kill(self) -> None:
        assert self.proc
        self.proc.kill()  # SIGKILL

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        assert self.proc.stdin
        try:
            self.proc.stdin.write(b'{"cmd": "close"}\n')
            await self.proc.stdin.drain()
            await asyncio.wait_for(self.proc.wait(), 10)
        except (ConnectionError, TimeoutError):
            self.proc.kill()
            await self.proc.wait()
        if self._reader:
            await self._reader


class Cluster:
    def __init__(self, root: Path, n: int = 3, passwords: list[str | None] | None = None, **extra: Any) -> None:
        addrs = [f"127.0.0.1:{free_port()}" for _ in range(n)]
        root.mkdir(parents=True, exist_ok=True)
        pw = passwords or ["s3cret"] * n
        self.voters = [Voter(a, addrs, root / f"v{i}", pw[i], **extra) for i, a in enumerate(addrs)]

    async def start(self) -> None:
        replies = await asyncio.gather(*(v.start() for v in self.voters))
        assert all(r["event"] == "ready" for r in replies), replies

    async def stop(self) -> None:
        await asyncio.gather(*(v.stop() for v in self.voters))

    def alive(self) -> list[Voter]:
        return [v for v in self.voters if v.proc and v.proc.returncode is None]

    async def leader(self, within: float = 10) -> Voter:
        """The voter that leads with every live voter agreeing on it."""
        found: list[Voter] = []

        async def agreed() -> bool:
            statuses = [await v.result("status") for v in self.alive()]
            leaders = {s["leader"] for s in statuses}
            if len(leaders) != 1 or None in leaders:
                return False
            found[:] = [v for v in self.alive() if v.addr in leaders]
            return bool(found)

        await wait_until(agreed, within, "an agreed leader")
        return found[0]

    async def converged(self, within: float = 10) -> dict[str, Any]:
        """Wait until every live voter has applied the same state; return it."""
        snaps: list[dict[str, Any]] = []

        async def same() -> bool:
            snaps[:] = [await v.result("snapshot") for v in self.alive()]
            return all(s == snaps[0] for s in snaps)

        await wait_until(same, within, "all voters to apply the same state")
        return snaps[0]


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path)
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


# -- pure write rules (no network) -------------------------------------------------------------


def test_state_validation_leaves_state_unchanged() -> None:
    rs = RegistryState()
    assert rs.apply("upsert_node", 1.0, ("n1", NODE))[0].ok
    before = rs.snapshot()
    bad_writes = [
        ("upsert_node", ("", NODE)),
        ("upsert_node", ("n2", {"region": "eu"})),  # missing fields for a new node
        ("upsert_node", ("n1", {"bogus": 1})),
        ("set_node_fields", ("n1", {"state": "zombie"})),
        ("set_node_fields", ("n1", {"cordoned": "yes"})),
        ("set_node_fields", ("n1", {"region": "us"})),  # not a mutable field
        ("put_model", ("m", {**MODEL, "digest": "md5:x"})),
        ("put_model", ("m", {**MODEL, "size": -1})),
        ("put_model", ("m", {**MODEL, "desired_replicas": True})),
        ("put_model", ("m", MODEL, "1")),
        ("put_model", ("m",)),  # wrong arity
        ("set_placement", ("m", ["n1"])),  # no such model
        ("set_setting", ("k", float("nan"))),
        ("set_setting", ("k", "x" * 70_000)),
        ("no_such_op", ()),
    ]
    for op, args in bad_writes:
        result, change = rs.apply(op, 2.0, args)
        assert not result.ok and result.error in (INVALID, NOT_FOUND), (op, args, result)
        assert change is None
    assert rs.snapshot() == before
    assert rs.apply("set_setting", float("inf"), ("k", 1))[0].error == INVALID


def test_state_cas_versions_and_placements() -> None:
    rs = RegistryState()
    for n in ("n1", "n2"):
        rs.apply("upsert_node", 1.0, (n, NODE))
    created = rs.apply("put_model", 1.0, ("m", MODEL, 0))[0]
    assert created.ok and created.version == rs.revision
    again = rs.apply("put_model", 1.0, ("m", MODEL, 0))[0]
    assert (again.ok, again.error, again.version) == (False, CONFLICT, created.version)
    placed = rs.apply("set_placement", 1.0, ("m", ["n1", "n2"], 0))[0]
    assert placed.ok
    assert rs.apply("set_placement", 1.0, ("m", ["n1"], 0))[0].error == CONFLICT
    assert rs.apply("set_placement", 1.0, ("m", ["n1", "n1"], placed.version))[0].error == INVALID
    # Removing a node takes it out of placements (and bumps the placement version).
    assert rs.apply("remove_node", 1.0, ("n2",))[0].ok
    snap = rs.snapshot()
    assert snap["placements"]["m"] == ["n1"] and snap["placement_versions"]["m"] > placed.version
    # Versions are revisions, so delete + recreate can't satisfy a stale expected version (no ABA).
    assert rs.apply("delete_model", 1.0, ("m", created.version))[0].ok
    assert rs.apply("put_model", 1.0, ("m", MODEL, 0))[0].version != created.version
    changes = rs.changes_since(0)
    assert changes is not None and [c.revision for c in changes] == list(range(1, rs.revision + 1))


def test_password_required(tmp_path: Path) -> None:
    for pw in (None, "", "   "):
        with pytest.raises(RegistryConfigError, match="password"):
            RegistryConfig("127.0.0.1:1", (), tmp_path, pw)


async def test_in_process_bridge_and_watch(tmp_path: Path) -> None:
    """A single voter is its own majority: the asyncio bridge, watch callback and close, in-process."""
    seen: list[tuple[int, str, str]] = []
    reg = await Registry.open(
        RegistryConfig(f"127.0.0.1:{free_port()}", (), tmp_path / "solo", "pw"),
        on_change=lambda rev, kind, key, value: seen.append((rev, kind, key)),
    )
    try:
        await wait_until(lambda: asyncio.sleep(0, reg.is_leader), 5, "self-election")
        result = await reg.write("set_setting", "a", [1, 2], timeout=5)
        assert result.ok and result.revision == 1
        bad = await reg.write("set_setting", "a", {1, 2})  # a set is not JSON: refused before the log
        assert not bad.ok and bad.error == INVALID
        assert reg.snapshot()["settings"] == {"a": [1, 2]}
        assert seen == [(1, "setting.set", "a")]
        status = reg.status()
        assert status["raft_state"] == "leader" and status["has_quorum"] and status["partners"] == {}
        with pytest.raises(ValueError):
            await reg.write("drop_everything")
    finally:
        await reg.close()


# -- three voter processes ---------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_writes_replicate_cas_and_invalid(cluster: Cluster) -> None:
    leader = await cluster.leader()
    follower = next(v for v in cluster.voters if v is not leader)
    # (1) writes through the leader and through a follower (forwarded) reach every voter.
    assert (await leader.write("upsert_node", "n1", NODE))["result"]["ok"]
    assert (await follower.write("set_setting", "greeting", {"hello": "world"}))["result"]["ok"]
    put = (await follower.write("put_model", "llama", MODEL, 0))["result"]
    assert put["ok"]
    state = await cluster.converged()
    assert state["nodes"]["n1"]["role"] == "control" and state["settings"]["greeting"] == {"hello": "world"}
    assert state["models"]["llama"]["version"] == put["version"]

    # (2) CAS: two writers race on the same expected version; the log order picks exactly one.
    v = put["version"]
    a, b = await asyncio.gather(
        leader.write("put_model", "llama", {**MODEL, "desired_replicas": 3}, v),
        follower.write("put_model", "llama", {**MODEL, "desired_replicas": 5}, v),
    )
    results = [a["result"], b["result"]]
    assert sorted(r["ok"] for r in results) == [False, True], results
    winner = next(r for r in results if r["ok"])
    loser = next(r for r in results if not r["ok"])
    assert loser["error"] == CONFLICT and loser["version"] == winner["version"]
    state = await cluster.converged()
    assert state["models"]["llama"]["version"] == winner["version"]

    # (6) invalid arguments: an error result, and no voter's state changes.
    bad = (await follower.write("set_placement", "llama", ["ghost-node"], 0))["result"]
    assert not bad["ok"] and bad["error"] == INVALID
    bad = (await leader.write("set_node_fields", "n1", {"state": 42}))["result"]
    assert not bad["ok"] and bad["error"] == INVALID
    assert await cluster.converged() == state

    # The change log streams every applied write in order, on every voter.
    events = await follower.result("events")
    assert [e[0] for e in events] == list(range(1, state["revision"] + 1))
    assert [c["revision"] for c in await leader.result("changes", since=2)] == list(range(3, state["revision"] + 1))

    # Graceful hand-over (Raft TimeoutNow) to a named follower.
    assert await leader.result("transfer", to=follower.addr) is True
    assert await cluster.leader() is follower


@pytest.mark.timeout(60)
async def test_leader_sigkill_failover(cluster: Cluster) -> None:
    leader = await cluster.leader()
    assert (await leader.write("set_setting", "before", 1))["result"]["ok"]
    await cluster.converged()
    survivors = [v for v in cluster.voters if v is not leader]
    leader.kill()
    killed_at = time.monotonic()
    await leader.proc.wait()  # type: ignore[union-attr]
    attempts = 0
    while True:
        attempts += 1
        voter = survivors[attempts % 2]
        reply = await voter.write("set_setting", "after", attempts, commit_timeout=1.0)
        if reply["ok"] and reply["result"]["ok"]:
            break
        assert time.monotonic() - killed_at < 6, f"no write within 6 s of killing the leader: {reply}"
    elapsed = time.monotonic() - killed_at
    print(f"\nleader failover: first committed write {elapsed:.2f} s after SIGKILL ({attempts} attempts)")
    assert elapsed <= 6
    state = await cluster.converged()
    assert state["settings"]["before"] == 1 and "after" in state["settings"]
    new_leader = await cluster.leader()
    assert new_leader is not leader


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["stop", "sigkill"])
async def test_full_restart_keeps_committed_entries(tmp_path: Path, how: str) -> None:
    # Compact often so the restart has to combine the full dump with the journal tail.
    c = Cluster(tmp_path, compaction_min_entries=8)
    await c.start()
    try:
        leader = await c.leader()
        for i in range(30):
            assert (await leader.write("set_setting", f"k{i}", i))["result"]["ok"]
        assert (await leader.write("upsert_node", "n1", NODE))["result"]["ok"]
        assert (await leader.write("put_model", "m", MODEL, 0))["result"]["ok"]
        assert (await leader.write("set_placement", "m", ["n1"], 0))["result"]["ok"]
        before = await c.converged()
        assert before["revision"] == 33
        if how == "sigkill":  # the journal is an mmap: the page cache keeps it when the process dies
            for v in c.voters:
                v.kill()
            await asyncio.gather(*(v.proc.wait() for v in c.voters))  # type: ignore[union-attr]
        await c.stop()
        assert all((tmp_path / f"v{i}" / "raft.dump").exists() for i in range(3))

        await c.start()
        await c.leader()
        assert await c.converged() == before
        # The group still takes writes after the restart.
        leader = await c.leader()
        assert (await leader.write("set_setting", "after_restart", True))["result"]["revision"] == 34
    finally:
        await c.stop()


@pytest.mark.timeout(60)
async def test_password_mismatch_never_forms_a_cluster(tmp_path: Path) -> None:
    # No password at all: the voter refuses to start, with the reason.
    solo = Voter(f"127.0.0.1:{free_port()}", [], tmp_path / "nopw", None)
    reply = await solo.start()
    assert reply["event"] == "error" and "password" in reply["message"]
    await solo.proc.wait()  # type: ignore[union-attr]

    # Three voters that each use a different password: no two can talk, so no leader, ever.
    c = Cluster(tmp_path / "mixed", passwords=["alpha", "bravo", "charlie"])
    await c.start()
    try:
        replies = await asyncio.gather(*(v.write("set_setting", "x", 1, commit_timeout=2.0) for v in c.voters))
        for r in replies:
            assert not r["ok"] and r["error"] == RegistryUnavailable.__name__, r
            assert "share the password" in r["message"]
        for v in c.voters:
            status = await v.result("status")
            assert status["leader"] is None and not status["has_quorum"]
            assert not any(status["partners"].values())
            assert (await v.result("snapshot"))["revision"] == 0
        assert len(c.alive()) == 3  # nothing crashed
    finally:
        await c.stop()


# -- voters change at runtime (in-process voters) ----------------------------------------------


async def _leader_of(regs: list[Registry], within: float = 10) -> Registry:
    """The voter that leads with every given voter agreeing on it."""
    found: list[Registry] = []

    async def agreed() -> bool:
        leaders = {r.status()["leader"] for r in regs}
        found[:] = [r for r in regs if r.is_leader]
        return len(leaders) == 1 and None not in leaders and len(found) == 1

    await wait_until(agreed, within, "an agreed leader")
    return found[0]


@pytest.mark.timeout(90)
async def test_add_and_remove_voters_then_restart_keeps_membership(tmp_path: Path) -> None:
    from omx.protocols.registry import RegistryMembershipError, RegistryNotLeader

    addrs = [f"127.0.0.1:{free_port()}" for _ in range(4)]
    a, b, c, d = addrs

    def conf(addr: str, partners: list[str], **kw: Any) -> RegistryConfig:
        return RegistryConfig(addr, tuple(partners), tmp_path / addr.replace(":", "_"), "pw",
                              compaction_min_entries=6, **kw)

    regs = {x: await Registry.open(conf(x, [a, b, c])) for x in (a, b, c)}
    try:
        leader = await _leader_of(list(regs.values()))
        follower = next(r for r in regs.values() if r is not leader)
        assert (await leader.write("set_setting", "before", 1)).ok
        # Refused before anything is proposed, each with its reason.
        with pytest.raises(RegistryNotLeader, match="not the Raft leader") as exc:
            await follower.add_voter(d)
        assert not exc.value.outcome_unknown
        with pytest.raises(RegistryMembershipError, match="already a voter"):
            await leader.add_voter(b)
        with pytest.raises(RegistryMembershipError, match="not a voter"):
            await leader.remove_voter(d)
        with pytest.raises(RegistryMembershipError, match="transfer leadership"):
            await leader.remove_voter(leader.config.self_addr)
        with pytest.raises(RegistryMembershipError, match="bad Raft address"):
            await leader.add_voter("nohost")

        # Add d: it commits on 3 of the 4 new voters, then d starts with the whole set as its partners.
        voters = await leader.add_voter(d)
        assert voters == sorted(addrs)
        regs[d] = await Registry.open(conf(d, [x for x in voters if x != d]))
        assert (await leader.write("set_setting", "with_d", 2)).ok
        await wait_until(lambda: asyncio.sleep(0, regs[d].snapshot()["settings"].get("with_d") == 2), 10,
                         "the new voter to replicate")
        await wait_until(lambda: asyncio.sleep(0, all(r.voters() == sorted(addrs) for r in regs.values())), 10,
                         "every voter to know the new set")

        # Remove a follower (stopped first, as a dead voter would be); writes still commit on the rest.
        gone = next(x for x in (a, b, c) if regs[x] is not leader)
        await regs.pop(gone).close()
        assert sorted(await leader.remove_voter(gone)) == sorted(x for x in addrs if x != gone)
        for i in range(8):  # enough entries to compact the log: the dump must carry the new voter set
            assert (await leader.write("set_setting", f"after_{i}", i)).ok
        rest = sorted(regs)
        await wait_until(lambda: asyncio.sleep(0, all(r.voters() == rest for r in regs.values())), 10,
                         "every voter to drop the removed one")

        # A follower restarted with its original (stale) partners comes back with the changed set.
        again = next(x for x in rest if regs[x] is not leader)
        await regs.pop(again).close()
        assert json.loads((tmp_path / again.replace(":", "_") / "voters.json").read_text()) == rest
        regs[again] = await Registry.open(conf(again, [a, b, c]))
        assert regs[again].voters() == rest or regs[again].status()["voters"] == rest
        assert (await leader.write("set_setting", "after_restart", 3)).ok
        await wait_until(lambda: asyncio.sleep(0, all(r.snapshot()["settings"].get("after_restart") == 3
                                                      for r in regs.values())), 10, "every voter to apply")
        assert regs[again].voters() == rest and gone not in regs[again].status()["partners"]
        # Without voters.json, pysyncobj itself rebuilds the set from the full dump and the committed log.
        await regs.pop(again).close()
        (tmp_path / again.replace(":", "_") / "voters.json").unlink()
        regs[again] = await Registry.open(conf(again, [a, b, c]))
        await wait_until(lambda: asyncio.sleep(0, regs[again].voters() == rest), 10,
                         "the restarted voter to rebuild the voter set")
        leader = await _leader_of(list(regs.values()))
        assert (await leader.write("set_setting", "last", 4)).ok
    finally:
        for r in regs.values():
            await r.close()
