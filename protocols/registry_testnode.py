"""One registry voter in its own process, driven by JSON lines, for tests and scenarios.

Run `python -m omx.protocols.registry_testnode '<config json>'`. Config keys: self_addr, partners,
data_dir, password, and optional RegistryConfig fields. It prints {"event": "ready"} (or
{"event": "error", ...} and exits 2), then answers each stdin line {"id", "cmd", ...} with one
stdout line {"id", "ok": true, "result"} or {"id", "ok": false, "error", "message"}.
Commands: write {op, args, timeout}, snapshot, status, changes {since}, events, transfer {to}, close.
Commands run concurrently, so a slow write never blocks a status query.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Any

from omx.protocols.registry import Registry, RegistryConfig, RegistryError


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _handle(registry: Registry, events: list[list[Any]], msg: dict[str, Any]) -> Any:
    cmd = msg.get("cmd")
    if cmd == "write":
        result = await registry.write(msg["op"], *msg.get("args", []), timeout=float(msg.get("timeout", 5.0)))
        return result.to_dict()
    if cmd == "snapshot":
        return registry.snapshot()
    if cmd == "status":
        return registry.status()
    if cmd == "changes":
        changes = registry.changes_since(int(msg.get("since", 0)))
        return None if changes is None else [c.to_dict() for c in changes]
    if cmd == "events":
        return list(events)
    if cmd == "transfer":
        return await registry.transfer_leadership(msg.get("to"))
    raise ValueError(f"unknown command {cmd!r}")


async def main(config_json: str) -> int:
    raw = json.loads(config_json)
    raw["partners"] = tuple(raw.get("partners", ()))
    events: list[list[Any]] = []  # appended from the Raft thread; list.append is atomic
    try:
        registry = await Registry.open(
            RegistryConfig(**raw), on_change=lambda rev, kind, key, value: events.append([rev, kind, key])
        )
    except (RegistryError, OSError) as exc:
        _emit({"event": "error", "error": type(exc).__name__, "message": str(exc)})
        return 2
    _emit({"event": "ready"})

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**22)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    tasks: set[asyncio.Task[None]] = set()

    async def run(msg: dict[str, Any]) -> None:
        try:
            _emit({"id": msg.get("id"), "ok": True, "result": await _handle(registry, events, msg)})
        except Exception as exc:
            _emit({"id": msg.get("id"), "ok": False, "error": type(exc).__name__, "message": str(exc)})

    while line := await reader.readline():
        msg = json.loads(line)
        if msg.get("cmd") == "close":
            break
        task = asyncio.create_task(run(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await registry.close()
    for task in tasks:
        task.cancel()
    _emit({"event": "closed"})
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    sys.exit(asyncio.run(main(sys.argv[1])))
