"""Shared fixtures and helpers: real node processes on loopback, started and stopped by the tests, and what the
multi-node tests ask of them (`from conftest import members`; pytest puts this folder on the import path)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from omx.models.store import Store
from omx.node.launch import NodeProc, start_node
from omx.protocols.clusterkey import derive, read_key_file

__all__ = ["NodeProc", "cluster_view", "members", "routed_headers", "start_node"]


def cluster_view(node: NodeProc) -> dict[str, Any]:
    """One node's view of the cluster (`GET /api/v1/cluster`): its gossip members, counts, region leaders."""
    return httpx.get(node.url + "/api/v1/cluster", timeout=5).json()


def members(node: NodeProc) -> list[dict[str, Any]]:
    return cluster_view(node)["members"]


def routed_headers(node: NodeProc) -> dict[str, str]:
    """The credentials a peer's router sends: the node serves the request itself (tests pin where work runs).
    The cluster key is the one `start_cluster` wrote next to the nodes' data dirs."""
    token = derive(read_key_file(node.data_dir.parent / "cluster.key"), "internal http").hex()
    return {"X-Omx-Routed": "test", "Authorization": f"Bearer {token}"}


@pytest.fixture(scope="session")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    """One node with the demo model, shared by the tests that only need a working server."""
    n = start_node(tmp_path_factory.mktemp("node"), env={"OMX_NUM_PARALLEL": "4", "OMX_LOG_LEVEL": "INFO"})
    try:
        yield n
    finally:
        n.stop()


@pytest.fixture(scope="session")
def demo_model() -> str:
    return "omx-tiny:latest"


@pytest.fixture
def held_blob_sync(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Hold the store's background fsyncs of unsynced blobs until the returned event is set (released at the
    end of the test in any case), so a test can look at the moment between a blob's rename and its fsync."""
    release = threading.Event()
    real_sync = Store._sync_blob

    def held_sync(self: Store, hex_digest: str) -> None:
        release.wait(30)
        real_sync(self, hex_digest)

    monkeypatch.setattr(Store, "_sync_blob", held_sync)
    yield release
    release.set()
