"""Shared fixtures: real node processes on loopback, started and stopped by the tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from omx.node.launch import NodeProc, start_node

__all__ = ["NodeProc", "start_node"]


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
