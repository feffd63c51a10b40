"""In-process event bus feeding /api/v1/events: a bounded history plus live subscribers."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from omx.protocols.events import Event


class EventBus:
    """Publishing never blocks: a subscriber that falls behind is told it lagged and is dropped."""

    def __init__(self, history: int = 1000, queue_size: int = 1000) -> None:
        self._seq = itertools.count(1)
        self.history: deque[Event] = deque(maxlen=history)
        self._subs: set[asyncio.Queue[Event | None]] = set()
        self._queue_size = queue_size

    def publish(self, kind: str, **data: Any) -> Event:
        ev = Event(seq=next(self._seq), kind=kind, data=data)
        self.history.append(ev)
        for q in list(self._subs):
            try:
                q.put_nowait(ev)
            except asyncio.QueueFull:
                self._subs.discard(q)
                with contextlib.suppress(asyncio.QueueFull):
                    q.put_nowait(None)  # marks the lag for the reader
        return ev

    async def subscribe(self, after: int = 0) -> AsyncIterator[Event]:
        """History newer than `after`, then live events; ends if the subscriber lags."""
        q: asyncio.Queue[Event | None] = asyncio.Queue(self._queue_size)
        backlog = [e for e in self.history if e.seq > after]
        self._subs.add(q)
        try:
            for e in backlog:
                yield e
            last = backlog[-1].seq if backlog else after
            while True:
                ev = await q.get()
                if ev is None:
                    yield Event(seq=last, kind="stream.lagged", data={"reason": "subscriber too slow"})
                    return
                if ev.seq > last:
                    last = ev.seq
                    yield ev
        finally:
            self._subs.discard(q)
