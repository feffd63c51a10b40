"""SwimNode over real UDP/TCP sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Callable

import msgpack
import pytest

from omx.protocols.swim import ALIVE, DEAD, LEFT, JoinError, MemberEvent, SwimConfig, SwimNode
from omx.protocols.swim.codec import Codec

pytestmark = pytest.mark.timeout(60)
KEY = os.urandom(32)
CFG = SwimConfig.local()


async def _wait_for(cond: Callable[[], bool], limit: float = 8.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while not cond():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def _sees(node: SwimNode, member: str, state: str) -> bool:
    m = node.get(member)
    return m is not None and m.state == state


def _converged(nodes: list[SwimNode]) -> bool:
    ids = {n.id for n in nodes}
    return all({m.id for m in n.members() if m.state == ALIVE} == ids for n in nodes)


async def _cluster(n: int, key: bytes | None = KEY) -> list[SwimNode]:
    nodes = [SwimNode(f"node{i}", "127.0.0.1", 0, key, meta={"role": "worker", "i": i}, config=CFG)
             for i in range(n)]
    for node in nodes:
        await node.start()
    for node in nodes[1:]:
        assert await node.join([nodes[0].address]) == 1
    await _wait_for(lambda: _converged(nodes))
    return nodes


async def _stop(nodes: list[SwimNode]) -> None:
    for n in nodes:
        await n.stop()


async def test_join_converge_detect_failure_and_leave():
    events: list[MemberEvent] = []
    nodes = await _cluster(5)
    nodes[1].on_event = events.append
    try:
        assert nodes[2].get("node4").meta == {"role": "worker", "i": 4}
        nodes[4].set_meta({"role": "worker", "i": 4, "load": 3})
        await _wait_for(lambda: all(n.get("node4").meta.get("load") == 3 for n in nodes))

        await nodes[3].stop()  # crash: no goodbye
        await _wait_for(lambda: all(_sees(n, "node3", DEAD) for n in nodes if n.id != "node3"))
        kinds = [e.kind for e in events if e.member.id == "node3"]
        assert kinds.index("suspect") < kinds.index("dead")

        assert await nodes[4].leave(2.0)
        await nodes[4].stop()
        await _wait_for(lambda: all(_sees(n, "node4", LEFT) for n in nodes[:3]))
        await asyncio.sleep(1.5)  # longer than the suspicion timeout: still left, never dead
        assert all(_sees(n, "node4", LEFT) for n in nodes[:3])
        assert not [e for e in events if e.member.id == "node4" and e.kind in ("dead", "suspect")]
        assert all(n.stats()["dropped_total"] == 0 for n in nodes[:3])
    finally:
        await _stop(nodes)


async def test_wrong_key_and_bad_address_fail_clearly():
    nodes = await _cluster(2)
    stranger = SwimNode("stranger", "127.0.0.1", 0, os.urandom(32), config=CFG)
    await stranger.start()
    try:
        with pytest.raises(JoinError, match="check the cluster key") as ei:
            await stranger.join([nodes[0].address])
        assert ei.value.key_rejected
        assert nodes[0].stats()["dropped"]["key"] >= 1
        with pytest.raises(JoinError, match="no seed could be reached") as ei:
            await stranger.join(["not-an-address", "127.0.0.1:1"])
        assert not ei.value.key_rejected and set(ei.value.reasons) == {"not-an-address", "127.0.0.1:1"}
        assert all(m.id != "stranger" for m in nodes[0].members())
    finally:
        await stranger.stop()
        await _stop(nodes)


async def test_key_is_required_and_meta_is_limited():
    with pytest.raises(TypeError, match="key=None"):
        SwimNode("x", "127.0.0.1", 0)
    with pytest.raises(ValueError, match="limit"):
        SwimNode("x", "127.0.0.1", 0, None, meta={"blob": "x" * 4096})


async def test_fuzzed_udp_and_tcp_do_not_disturb_membership():
    nodes = await _cluster(3)
    target = nodes[0]
    rng = random.Random(1234)
    loop = asyncio.get_running_loop()
    udp, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=("127.0.0.1", target.port))
    valid = Codec("node1", KEY).encode((2, 1, []))
    try:
        for i in range(600):
            kind = i % 4
            if kind == 0:
                data = rng.randbytes(rng.randrange(0, 1500))
            elif kind == 1:  # bit-flipped real packet
                b = bytearray(valid)
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
                data = bytes(b)
            elif kind == 2:  # well-formed msgpack, unkeyed and schema-violating
                data = b"\x01\x00" + msgpack.packb({"f": "evil", "c": i, "w": 0, "b": {"t": 1, "s": "x"}})
            else:  # replay of a real packet
                data = valid
            udp.sendto(data)
            if i % 20 == 0:
                await asyncio.sleep(0.005)  # stay under the socket buffer: we test the node, not the kernel
        for i in range(40):
            r, w = await asyncio.open_connection("127.0.0.1", target.port)
            if i % 2:
                w.write(rng.randbytes(rng.randrange(1, 3000)))
            else:
                w.write((rng.randrange(1, 2**32)).to_bytes(4, "big") + rng.randbytes(64))
            w.write_eof()
            await r.read()  # the node closes without answering
            w.close()
        await asyncio.sleep(1.0)
        st = target.stats()
        assert st["dropped_total"] >= 500, st
        assert {"garbage", "key", "replay"} <= set(st["dropped"])
        assert _converged(nodes)
        assert {m.id for m in target.members()} == {"node0", "node1", "node2"}
        assert target.local_health <= 2
    finally:
        udp.close()
        await _stop(nodes)


async def test_unencrypted_cluster_when_asked():
    nodes = await _cluster(3, key=None)
    try:
        assert _converged(nodes)
    finally:
        await _stop(nodes)
