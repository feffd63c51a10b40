"""SWIM membership with Lifeguard: a sans-IO core, an asyncio UDP/TCP driver and a simulator.

Public API:

- :class:`SwimNode` (``net``): a real member — ``await start()``, ``await join(["host:port"])``,
  ``members()``, ``set_meta({...})``, ``events()``, ``stats()``, ``await leave()``, ``await stop()``.
- :class:`SwimConfig` (``core``): timings and limits; ``SwimConfig.lan()`` / ``SwimConfig.local()``.
- :class:`Member` (``codec``): an immutable member record; states ``ALIVE``/``SUSPECT``/``DEAD``/``LEFT``.
- :class:`MemberEvent`: what ``on_event`` / ``events()`` deliver (kind, member).
- :class:`JoinError`: no seed accepted us (``.key_rejected`` when the cluster key looks wrong).
- :class:`SimNetwork` (``sim``): many cores on a virtual clock for tests and scale runs.
- :class:`SwimCore`, :class:`Codec`: the building blocks, for other drivers.
"""

from .codec import ALIVE, DEAD, LEFT, SUSPECT, Codec, Member
from .core import SwimConfig, SwimCore
from .net import JoinError, MemberEvent, SwimNode
from .sim import SimNetwork

__all__ = [
    "ALIVE",
    "DEAD",
    "LEFT",
    "SUSPECT",
    "Codec",
    "JoinError",
    "Member",
    "MemberEvent",
    "SimNetwork",
    "SwimConfig",
    "SwimCore",
    "SwimNode",
]
