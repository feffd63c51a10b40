"""The region registry: a Raft group (pysyncobj) holding `registry_state`, bridged to asyncio.

Safety choices, each forced by how pysyncobj works:

- A password is mandatory: pysyncobj unpickles every peer message, so an unauthenticated Raft port
  is remote code execution. The password makes it encrypt and authenticate (Fernet) every message.
- We run the tick loop on our own thread (`autoTick=False`). pysyncobj's auto-tick thread quits
  when the thread that built the SyncObj exits, and its `destroy()` is not joinable; owning the
  loop lets `Registry.open` build in a worker thread and `close()` tear down deterministically.
  All pysyncobj internals are touched only on that thread; other threads enqueue work.
- Log compaction never forks (`useFork=False`): forking a process that runs an event loop and
  torch threads is unsafe. The state is small, so the in-thread dump costs milliseconds.
- The journal (every entry, as received) and the full dump live under the data dir, so a full
  restart of all voters replays every committed entry.
- There is one replicated method, `apply_write(op, ts, args)`: pysyncobj numbers replicated
  methods by sorted name, so adding a per-op method would renumber the log format across a
  rolling upgrade. An op name in the entry stays stable.
- `commandsWaitLeader=False`: a queued write would otherwise sit until some future leader appears
  and apply long after its caller gave up. Instead `write()` retries "no leader" itself until its
  deadline.
- Voters change at runtime (`dynamicMembershipChange`): pysyncobj logs one add/remove entry at a time
  and every voter switches to the new set when it appends the entry. A voter outside the set is
  refused at the Raft port, so a new voter must be added first and then started with the full current
  set as its partners (`Registry.add_voter`). pysyncobj rebuilds the set on restart from the full dump
  and the committed log; we also keep the last set seen in `voters.json`, so a restarted voter starts
  from it at once instead of from its (possibly stale) configured partners.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, SyncObjException, replicated
from pysyncobj.encryptor import HAS_CRYPTO

from omx.protocols.registry_state import (
    INVALID,
    WRITE_OPS,
    Change,
    RegistryState,
    WriteResult,
    empty_data,
)

__all__ = [
    "WRITE_OPS",
    "ChangeCallback",
    "Registry",
    "RegistryConfig",
    "RegistryConfigError",
    "RegistryError",
    "RegistryMembershipError",
    "RegistryNotLeader",
    "RegistryStateMachine",
    "RegistryTimeout",
    "RegistryUnavailable",
    "WriteResult",
]

log = logging.getLogger(__name__)

#: Called on the Raft thread after every applied write: (revision, kind, key, value).
ChangeCallback = Callable[[int, str, str, Any], None]

_RAFT_STATES = {0: "follower", 1: "candidate", 2: "leader"}
# Failures where pysyncobj guarantees the entry was never appended, so a retry can't double-apply.
_NOT_APPLIED = {FAIL_REASON.MISSING_LEADER, FAIL_REASON.NOT_LEADER, FAIL_REASON.DISCARDED, FAIL_REASON.QUEUE_FULL}
_FAIL_NAMES = {v: k for k, v in vars(FAIL_REASON).items() if k.isupper()}
_REFUSED = -1  # our own code: a membership change refused before it was proposed


class RegistryError(Exception):
    """Base of registry errors. `outcome_unknown`: the write may still apply later."""

    outcome_unknown = False


class RegistryConfigError(RegistryError, ValueError):
    """The registry can't start with this configuration."""


class RegistryUnavailable(RegistryError):
    """No leader reachable (election running, no quorum, or closed); the write did not apply."""


class RegistryNotLeader(RegistryError):
    """The leader changed while the write was in flight; it may or may not have applied."""

    outcome_unknown = True


class RegistryMembershipError(RegistryError):
    """A voter change that can't be made as asked (bad, duplicate or unknown address, last voter)."""


class RegistryTimeout(RegistryError):
    """The write was proposed but not seen committed in time; it may still apply."""

    outcome_unknown = True


@dataclass(frozen=True)
class RegistryConfig:
    """One voter's registry settings. Timeouts: losing the leader stalls writes for ~0.5–1.5 s."""

    self_addr: str
    partners: tuple[str, ...]
    data_dir: Path
    password: str | None
    bind_addr: str | None = None
    raft_min_timeout: float = 0.5
    raft_max_timeout: float = 1.2
    append_entries_period: float = 0.1
    # A silent peer (no RST, e.g. a partition) is dropped after this long.
    connection_timeout: float = 2.0
    connection_retry: float = 0.5
    # A leader cut off from the majority steps down after this, so its pending writes fail fast.
    leader_fallback_timeout: float = 2.0
    compaction_min_entries: int = 5000
    compaction_min_time: float = 300.0
    tick_period: float = 0.05
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.password, str) or not self.password.strip():
            raise RegistryConfigError(
                "the registry needs a password: pysyncobj unpickles peer messages, so an unauthenticated "
                "Raft port would run any code sent to it; set the same password on every voter"
            )
        if not HAS_CRYPTO:
            raise RegistryConfigError("the registry needs the 'cryptography' package to encrypt Raft traffic")
        for addr in (self.self_addr, *self.partners):
            host, _, port = addr.rpartition(":")
            if not host or not port.isdigit():
                raise RegistryConfigError(f"bad Raft address {addr!r}; expected host:port")
        object.__setattr__(self, "partners", tuple(p for p in self.partners if p != self.self_addr))
        object.__setattr__(self, "data_dir", Path(self.data_dir))

    def syncobj_conf(self) -> SyncObjConf:
        data_dir = Path(self.data_dir)
        conf = SyncObjConf(
            password=self.password,
            autoTick=False,
            # Send each write at once (a pipe wakes the poller) instead of batching per period.
            appendEntriesUseBatch=False,
            appendEntriesPeriod=self.append_entries_period,
            raftMinTimeout=self.raft_min_timeout,
            raftMaxTimeout=self.raft_max_timeout,
            connectionTimeout=self.connection_timeout,
            connectionRetryTime=self.connection_retry,
            leaderFallbackTimeout=self.leader_fallback_timeout,
            commandsWaitLeader=False,
            journalFile=str(data_dir / "raft.journal"),
            fullDumpFile=str(data_dir / "raft.dump"),
            useFork=False,
            logCompactionMinEntries=self.compaction_min_entries,
            logCompactionMinTime=self.compaction_min_time,
            dynamicMembershipChange=True,
            # pysyncobj binds 0.0.0.0 unless told otherwise.
            bindAddress=self.bind_addr or self.self_addr,
            # With autoTick off, pysyncobj spins on bind retries; fail at once with a clear error instead.
            maxBindRetries=1,
            **self.extra,
        )
        try:
            conf.validate()
        except AssertionError:
            raise RegistryConfigError("inconsistent Raft timeouts (need min > 3*period, max > min, ...)") from None
        return conf


class RegistryStateMachine(SyncObj):
    """The replicated registry. `_data` is the only replicated attribute (see `__init__`)."""

    def __init__(self, config: RegistryConfig, on_change: ChangeCallback | None = None) -> None:
        # Attributes set before SyncObj.__init__ are left out of pysyncobj's dumps; `_data`, set after,
        # is what it pickles into the full dump and restores from it.
        self._config = config
        self._lock = threading.Lock()
        self._on_change = on_change
        self._notified_revision = 0
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._status: dict[str, Any] = {}
        _prepare_data_dir(config)
        self._voters_file = Path(config.data_dir) / "voters.json"
        saved = _load_voters(self._voters_file)
        # The voter set last seen wins over the configured partners: those only seed a fresh voter.
        partners = [a for a in saved if a != config.self_addr] if saved else list(config.partners)
        self._saved_voters: tuple[str, ...] = tuple(saved or ())
        try:
            super().__init__(config.self_addr, partners, config.syncobj_conf())
        except SyncObjException as exc:
            raise RegistryConfigError(
                f"can't bind the Raft port {config.bind_addr or config.self_addr} ({exc}); is it in use?"
            ) from None
        self._data: dict[str, Any] = empty_data()

    # -- the one replicated write ---------------------------------------------------------------

    @replicated
    def apply_write(self, op: str, ts: float, args: list[Any]) -> WriteResult:
        with self._lock:
            result, change = RegistryState(self._data).apply(op, ts, tuple(args) if isinstance(args, list) else args)
        if change is not None:
            self._notify(change)
        return result

    def _notify(self, change: Change) -> None:
        self._notified_revision = change.revision
        if self._on_change is None:
            return
        try:
            self._on_change(change.revision, change.kind, change.key, change.value)
        except Exception:
            log.exception("registry change callback failed")

    # -- reads (any thread) ---------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return RegistryState(self._data).snapshot()

    def changes_since(self, revision: int) -> list[Change] | None:
        with self._lock:
            return RegistryState(self._data).changes_since(revision)

    @property
    def latest_status(self) -> dict[str, Any]:
        return self._status

    # -- voters (Raft thread only) ----------------------------------------------------------------

    def voter_addrs(self) -> tuple[str, ...]:
        """Every voter's Raft address (this one included), as of the last appended membership entry."""
        return tuple(sorted({self.selfNode.address, *(n.address for n in self.otherNodes)}))

    def membership_refusal(self, kind: str, addr: str) -> RegistryError | None:
        """Why this voter can't propose `kind` ("add"/"remove") of `addr` now, or None when it can."""
        voters = self.voter_addrs()
        if not self._isLeader():
            leader = self._getLeader()
            name = leader.address if leader is not None else "none"
            err = RegistryNotLeader(f"this voter ({self._config.self_addr}) is not the Raft leader (leader: {name}); "
                                    "voters change through the leader")
            err.outcome_unknown = False
            return err
        if kind == "add" and addr in voters:
            return RegistryMembershipError(f"{addr} is already a voter ({', '.join(voters)})")
        if kind == "remove":
            if addr not in voters:
                return RegistryMembershipError(f"{addr} is not a voter ({', '.join(voters)})")
            if len(voters) == 1:
                return RegistryMembershipError(f"{addr} is the last voter; a region needs at least one")
            if addr == self._config.self_addr:
                return RegistryMembershipError(
                    f"{addr} is the Raft leader; transfer leadership to another voter first, then remove it")
        return None

    def _save_voters(self, voters: tuple[str, ...]) -> None:
        tmp = self._voters_file.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(list(voters)))
            os.replace(tmp, self._voters_file)
        except OSError:
            log.exception("cannot save the voter set to %s", self._voters_file)
            return
        self._saved_voters = voters

    # -- the Raft thread ------------------------------------------------------------------------

    def start(self) -> None:
        self._publish_status()
        self._thread = threading.Thread(target=self._run, name=f"raft-{self._config.self_addr}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop ticking and release the port and journal; blocks, so call it off the event loop."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the Raft thread: pysyncobj's internals are not thread-safe."""
        self._calls.put(fn)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self.doTick(self._config.tick_period)
                except Exception:
                    log.exception("raft tick failed")
                    self._stop.wait(self._config.tick_period)
                while True:
                    try:
                        fn = self._calls.get_nowait()
                    except queue.Empty:
                        break
                    try:
                        fn()
                    except Exception:
                        log.exception("raft thread call failed")
                self._after_tick()
        finally:
            # pysyncobj saves the commit index once a second; save it now so a restarted voter can
            # replay everything it had committed before any quorum forms (private name: no public hook).
            journal = getattr(self, "_SyncObj__raftLog", None)
            if journal is not None:
                journal.onOneSecondTimer()
            self.destroy()  # with autoTick off this tears down transport and journal here, on their thread

    def _after_tick(self) -> None:
        revision = self._data["revision"]
        if revision != self._notified_revision:
            # State arrived as a whole (full dump at start, or a snapshot from the leader), not as
            # individual writes: watchers must resync from snapshot().
            self._notify(Change(revision, "registry.reset", "", None, 0.0))
        voters = self.voter_addrs()
        if voters != self._saved_voters:
            self._save_voters(voters)
        self._publish_status()

    def _publish_status(self) -> None:
        s = self.getStatus()
        leader = s["leader"]
        partners = {n.address: self.isNodeConnected(n) for n in sorted(self.otherNodes, key=lambda n: n.address)}
        # Copy-on-write: readers on other threads get a whole dict, never one being filled in.
        self._status = {
            "self": self._config.self_addr,
            "leader": leader.address if leader is not None else None,
            "is_leader": s["state"] == 2,
            "raft_state": _RAFT_STATES.get(s["state"], str(s["state"])),
            "term": s["raft_term"],
            "commit_index": s["commit_idx"],
            "last_applied": s["last_applied"],
            "partners": partners,
            "voters": list(self.voter_addrs()),
            "has_quorum": s["has_quorum"],
            "revision": self._data["revision"],
        }


def _load_voters(path: Path) -> list[str] | None:
    """The voter set a previous run saved, or None (fresh voter, or an unreadable file)."""
    try:
        voters = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        log.warning("ignoring unreadable %s; starting from the configured partners", path)
        return None
    if not isinstance(voters, list) or not voters or not all(isinstance(a, str) for a in voters):
        return None
    return voters


def _check_addr(addr: str) -> None:
    host, _, port = addr.rpartition(":") if isinstance(addr, str) else ("", "", "")
    if not host or not port.isdigit():
        raise RegistryMembershipError(f"bad Raft address {addr!r}; expected host:port")


def _prepare_data_dir(config: RegistryConfig) -> None:
    """Create the data dir (owner-only: the dump is a pickle) and refuse one used by another voter."""
    data_dir = Path(config.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ident = data_dir / "registry.json"
    if ident.exists():
        try:
            owner = json.loads(ident.read_text()).get("self_addr")
        except (OSError, ValueError, AttributeError):
            owner = None
        if owner != config.self_addr:
            raise RegistryConfigError(f"{data_dir} holds the Raft log of {owner!r}, not {config.self_addr!r}")
    else:
        tmp = ident.with_suffix(".tmp")
        tmp.write_text(json.dumps({"self_addr": config.self_addr}))
        os.replace(tmp, ident)


class Registry:
    """asyncio face of one voter. Build with `await Registry.open(config)`; never blocks the loop."""

    def __init__(self, config: RegistryConfig, on_change: ChangeCallback | None = None) -> None:
        """Blocking (key derivation, journal load, bind): prefer `open()` from async code."""
        self.config = config
        self._sm = RegistryStateMachine(config, on_change)
        self._sm.start()
        self._closed = False
        self._pending: set[asyncio.Future[tuple[Any, int]]] = set()

    @classmethod
    async def open(cls, config: RegistryConfig, on_change: ChangeCallback | None = None) -> Registry:
        return await asyncio.to_thread(cls, config, on_change)

    @property
    def state_machine(self) -> RegistryStateMachine:
        return self._sm

    # timeout is a deadline across internal retries, which asyncio.timeout around the call can't express.
    async def write(self, op: str, *args: Any, timeout: float = 5.0) -> WriteResult:  # noqa: ASYNC109
        """Propose a write, wait for it to commit here, and return its result.

        Returns an error `WriteResult` for bad arguments or a lost compare-and-set; raises
        `RegistryUnavailable` (not applied), `RegistryNotLeader` or `RegistryTimeout` (outcome unknown).
        """
        if op not in WRITE_OPS:
            raise ValueError(f"unknown registry write {op!r}; known: {list(WRITE_OPS)}")
        try:
            # Only plain JSON data enters the log: replicas unpickle it, and it must mean the same everywhere.
            plain_args = json.loads(json.dumps(list(args), allow_nan=False))
        except (TypeError, ValueError) as exc:
            return WriteResult(False, self._sm.latest_status.get("revision", 0), INVALID, f"arguments: {exc}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        ts = time.time()  # the proposer's clock stamps the write, so every replica stores the same time
        last_err: int | None = None
        retry_margin = 0.05 + 4 * self.config.tick_period
        while not self._closed:
            fut: asyncio.Future[tuple[Any, int]] = loop.create_future()
            self._pending.add(fut)
            self._sm.apply_write(op, ts, plain_args, callback=_resolver(loop, fut))
            try:
                async with asyncio.timeout_at(deadline):
                    result, err = await fut
            except TimeoutError:
                raise RegistryTimeout(
                    f"registry {op}: not committed within {timeout:.1f}s ({self._why()}); it may still apply"
                ) from None
            finally:
                self._pending.discard(fut)
            if err == FAIL_REASON.SUCCESS:
                return result
            if err not in _NOT_APPLIED:
                raise RegistryNotLeader(
                    f"registry {op}: {_FAIL_NAMES.get(err, err)} while waiting for the commit; it may have applied"
                )
            last_err = err
            # Stop early enough that the last attempt's "no leader" answer, not the deadline, ends the loop.
            if loop.time() + retry_margin >= deadline:
                break
            await asyncio.sleep(0.05)  # an election is running or the leader is unknown; try again shortly
        if self._closed:
            raise RegistryUnavailable("the registry is closed")
        raise RegistryUnavailable(
            f"registry {op}: no leader within {timeout:.1f}s ({_FAIL_NAMES.get(last_err, last_err)}; {self._why()}); "
            "not applied. Check that a majority of voters run, can reach each other, and share the password"
        )

    def _why(self) -> str:
        s = self._sm.latest_status
        partners = s.get("partners", {})
        up = sum(1 for connected in partners.values() if connected)
        return (
            f"leader={s.get('leader')}, state={s.get('raft_state')}, connected to {up}/{len(partners)} partners, "
            f"has_quorum={s.get('has_quorum')}"
        )

    def snapshot(self) -> dict[str, Any]:
        """A deep copy of this voter's applied state (may lag the leader); the caller owns it."""
        return self._sm.snapshot()

    def changes_since(self, revision: int) -> list[Change] | None:
        """Applied changes after `revision`, or None when they fell out of the log (resync from snapshot)."""
        return self._sm.changes_since(revision)

    def status(self) -> dict[str, Any]:
        """Raft view of this voter, as of its last tick (≤ tick_period old)."""
        s = dict(self._sm.latest_status)
        s["partners"] = dict(s.get("partners", {}))
        return s

    @property
    def is_leader(self) -> bool:
        return bool(self._sm.latest_status.get("is_leader"))

    async def transfer_leadership(self, to: str | None = None, timeout: float = 2.0) -> bool:  # noqa: ASYNC109
        """Ask the leader to hand over to `to` (or the most caught-up partner). True once the leader moved."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[Any, int]] = loop.create_future()
        self._sm.call_soon(lambda: self._sm.transferLeadership(to, callback=_resolver(loop, fut)))
        try:
            async with asyncio.timeout(timeout):
                _, err = await fut
                if err != FAIL_REASON.SUCCESS:
                    return False
                # pysyncobj only confirms the request was sent; wait until this voter follows someone else.
                # The Raft thread republishes status every tick; there is no event to await.
                while self._sm.latest_status.get("is_leader") or self._sm.latest_status.get("leader") is None:  # noqa: ASYNC110
                    await asyncio.sleep(self.config.tick_period)
                return to is None or self._sm.latest_status.get("leader") == to
        except TimeoutError:
            return False

    def voters(self) -> list[str]:
        """Every voter's Raft address as this voter knows it (≤ tick_period old)."""
        return list(self._sm.latest_status.get("voters", []))

    async def add_voter(self, addr: str, timeout: float = 10.0) -> list[str]:  # noqa: ASYNC109
        """Make `addr` a voter (leader only); returns the voter set once the change committed.

        The change commits on a majority of the new set, so add a voter only while the current ones are
        up. Start the new voter afterwards with the returned set as its partners: voters refuse Raft
        connections from outside their set.
        """
        return await self._change_voters("add", addr, timeout)

    async def remove_voter(self, addr: str, timeout: float = 10.0) -> list[str]:  # noqa: ASYNC109
        """Drop `addr` from the voters (leader only, never itself); returns the set once committed."""
        return await self._change_voters("remove", addr, timeout)

    async def _change_voters(self, kind: str, addr: str, timeout: float) -> list[str]:  # noqa: ASYNC109
        _check_addr(addr)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._closed:
            fut: asyncio.Future[tuple[Any, int]] = loop.create_future()
            self._pending.add(fut)
            callback = _resolver(loop, fut)

            def propose(callback: Callable[[Any, int], None] = callback) -> None:
                # Check and propose on the Raft thread, so no tick runs between the two.
                refusal = self._sm.membership_refusal(kind, addr)
                if refusal is not None:
                    callback(refusal, _REFUSED)
                elif kind == "add":
                    self._sm.addNodeToCluster(addr, callback=callback)
                else:
                    self._sm.removeNodeFromCluster(addr, callback=callback)

            self._sm.call_soon(propose)
            try:
                async with asyncio.timeout_at(deadline):
                    result, err = await fut
            except TimeoutError:
                raise RegistryTimeout(f"{kind} voter {addr}: not committed within {timeout:.1f}s ({self._why()}); "
                                      "it may still apply") from None
            finally:
                self._pending.discard(fut)
            if err == _REFUSED:
                raise result
            if err == FAIL_REASON.SUCCESS:
                return list(self._sm.latest_status.get("voters", []))
            if err == FAIL_REASON.REQUEST_DENIED and loop.time() + 0.1 < deadline:
                # pysyncobj takes one change at a time, and none before the new term's first entry commits.
                await asyncio.sleep(0.1)
                continue
            if err in _NOT_APPLIED or err == FAIL_REASON.REQUEST_DENIED:
                raise RegistryUnavailable(f"{kind} voter {addr}: {_FAIL_NAMES.get(err, err)} ({self._why()}); "
                                          "not applied")
            raise RegistryNotLeader(f"{kind} voter {addr}: {_FAIL_NAMES.get(err, err)} while waiting for the "
                                    "commit; it may have applied")
        raise RegistryUnavailable("the registry is closed")

    async def close(self) -> None:
        """Stop the Raft thread and release the port and files; in-flight writes end with errors."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._sm.stop)
        for fut in self._pending:
            if not fut.done():
                fut.set_exception(RegistryTimeout("the registry closed before the write was confirmed"))


def _resolver(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[tuple[Any, int]]) -> Callable[[Any, int], None]:
    """A pysyncobj callback (runs on the Raft thread) that settles `fut` on its event loop."""

    def settle(result: Any, err: int) -> None:
        if not fut.done():
            fut.set_result((result, err))

    def callback(result: Any, err: int) -> None:
        try:
            loop.call_soon_threadsafe(settle, result, err)
        except RuntimeError:  # the loop is closed; nobody is waiting any more
            pass

    return callback
