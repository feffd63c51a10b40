"""Placement decisions (pure: fed snapshots, as the region leader sees them each round)."""

from __future__ import annotations

from typing import Any

import pytest

from omx.node.scheduler import place

pytestmark = pytest.mark.fast

GB = 1 << 30


def member(nid: str, have: list[str], state: str = "alive", region: str = "r1", mem: int = 64 * GB,
           **meta: Any) -> dict[str, Any]:
    return {"id": nid, "state": state, "meta": {"region": region, "have": have, "mem_avail": mem, **meta}}


def snap(models: dict[str, int], placements: dict[str, list[str]] | None = None,
         nodes: dict[str, dict[str, Any]] | None = None, size: int = GB) -> dict[str, Any]:
    return {"models": {k: {"digest": "sha256:" + "0" * 64, "size": size, "desired_replicas": n}
                       for k, n in models.items()},
            "placements": placements or {}, "nodes": nodes if nodes is not None else {}}


def test_spreads_replicas_over_the_least_placed_nodes() -> None:
    ms = [member(n, ["a:latest", "b:latest"]) for n in ("n1", "n2", "n3")]
    s = snap({"a:latest": 2, "b:latest": 2}, nodes={n: {} for n in ("n1", "n2", "n3")})
    out = place(s, ms, "r1")
    assert len(out["a:latest"]) == 2 and len(out["b:latest"]) == 2
    # four replicas on three nodes: no node carries more than two, every node carries one
    counts = {n: sum(n in v for v in out.values()) for n in ("n1", "n2", "n3")}
    assert max(counts.values()) == 2 and min(counts.values()) == 1


def test_lost_or_drained_node_is_replaced_and_survivors_stay() -> None:
    nodes = {n: {} for n in ("n1", "n2", "n3")}
    s = snap({"a:latest": 2}, {"a:latest": ["n1", "n2"]}, nodes)
    ms = [member("n1", ["a:latest"], state="dead"), member("n2", ["a:latest"]), member("n3", ["a:latest"])]
    assert place(s, ms, "r1") == {"a:latest": ["n2", "n3"]}
    nodes["n2"] = {"draining": True}
    ms[0] = member("n1", ["a:latest"])
    assert place(s, ms, "r1") == {"a:latest": ["n1", "n3"]}


def test_eligibility_holders_first_then_fetchers() -> None:
    nodes = {n: {} for n in ("n1", "n2", "n3", "n4", "n5")}
    ms = [member("n1", []),                                          # does not hold it: would fetch it
          member("n2", ["a:latest"], mem=GB // 2),                   # too little memory
          member("n3", ["a:latest"], load_failed=["a:latest"]),      # tried and failed to load it
          member("n4", ["a:latest"], region="r2"),                   # another region's scheduler decides there
          member("n5", ["a:latest"], cordoned=True)]                 # cordoned (as gossip says)
    assert place(snap({"a:latest": 1}, nodes=nodes), ms, "r1") == {"a:latest": ["n1"]}
    ms.append(member("n6", ["a:latest"]))
    nodes["n6"] = {}
    assert place(snap({"a:latest": 1}, nodes=nodes), ms, "r1") == {"a:latest": ["n6"]}  # a holder first
    assert place(snap({"a:latest": 3}, nodes=nodes), ms, "r1") == {"a:latest": ["n6", "n1"]}
    # held by no live member: nobody could fetch it, so nothing is placed
    gone = [member("n1", []), member("n6", ["a:latest"], state="dead")]
    assert place(snap({"a:latest": 1}, nodes=nodes), gone, "r1") == {}


def test_scale_down_and_zero() -> None:
    nodes = {n: {} for n in ("n1", "n2", "n3")}
    ms = [member(n, ["a:latest"]) for n in nodes]
    assert place(snap({"a:latest": 1}, {"a:latest": ["n1", "n2"]}, nodes), ms, "r1") == {"a:latest": ["n1"]}
    assert place(snap({"a:latest": 0}, {"a:latest": ["n1"]}, nodes), ms, "r1") == {"a:latest": []}
    assert place(snap({"a:latest": 1}, {"a:latest": ["n1"]}, nodes), ms, "r1") == {}  # nothing to change


def test_ten_thousand_nodes_one_round() -> None:
    nodes = {f"n{i}": {} for i in range(10_000)}
    ms = [member(n, ["a:latest"]) for n in nodes]
    out = place(snap({"a:latest": 50}, nodes=nodes), ms, "r1")
    assert len(set(out["a:latest"])) == 50


def test_label_selector_limits_placement() -> None:
    nodes = {"n1": {"labels": {"gpu": "h100"}}, "n2": {"labels": {"gpu": "a10"}}, "n3": {}}
    ms = [member(n, ["a:latest"]) for n in nodes]
    s = snap({"a:latest": 2}, nodes=nodes)
    s["settings"] = {"placement.selector.a:latest": {"gpu": "h100"}}
    assert place(s, ms, "r1") == {"a:latest": ["n1"]}  # only one node matches: one replica, not a wrong one
