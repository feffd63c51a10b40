"""A node's lasting identity: its id survives restarts so peers and the registry see one node."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def node_id(data_dir: Path) -> str:
    """Stable across restarts, so peers and the registry see one node, not a new one each time."""
    path = data_dir / "node_id"
    try:
        text = path.read_text().strip()
        if text:
            return text
    except FileNotFoundError:
        pass
    nid = "n-" + secrets.token_hex(4)
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(nid + "\n")
    os.replace(tmp, path)
    return nid
