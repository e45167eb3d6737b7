"""The bus: committed events to in-process subscribers.

Publishing never blocks: each subscription has a bounded queue. A subscriber that falls
behind (its queue full) is switched to reading the log at its own cursor until it has
caught up, then back to live delivery. So a slow subscriber costs the writer nothing and
loses nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

from gateway.events import Event

if TYPE_CHECKING:
    from gateway.store import EventStore

log = logging.getLogger("gateway.bus")


class Subscription:
    """An async iterator of committed events, in seq order, each exactly once."""

    def __init__(
        self,
        bus: Bus,
        name: str,
        types: frozenset[str] | None,
        maxsize: int,
        cursor: int,
    ) -> None:
        self.bus = bus
        self.name = name
        self.types = types
        self.cursor = cursor  # seq of the last event handed out (or skipped)
        self.lagging = False
        self.lag_episodes = 0
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize)
        self._backlog: deque[Event] = deque()
        self._closed = False

    def _offer(self, events: Sequence[Event]) -> None:
        if self.lagging or self._closed:
            return
        for e in events:
            if self.types is not None and e.type not in self.types:
                continue
            try:
                self._queue.put_nowait(e)
            except asyncio.QueueFull:
                # Fall back to the log from our cursor; drop what is queued (we will re-read it).
                self.lagging = True
                self.lag_episodes += 1
                log.debug("subscriber %s fell behind; reading from the log", self.name)
                self._drain_queue()
                self._queue.put_nowait(None)  # wake the reader so it notices
                return

    def _drain_queue(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.bus._subs.discard(self)
            self._drain_queue()
            self._queue.put_nowait(None)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self.lagging:
                ev = await self._catch_up()
                if ev is not None:
                    return ev
                continue
            item = await self._queue.get()
            if item is None:
                continue
            if item.seq <= self.cursor:
                continue
            self.cursor = item.seq
            return item

    async def _catch_up(self) -> Event | None:
        if self._backlog:
            return self._backlog.popleft()  # the cursor is already past the whole batch
        store = self.bus.store
        if store is None:  # no log to read from: resume live
            self.lagging = False
            return None
        batch = await store.events(self.cursor, 500)
        if batch:
            self.cursor = batch[-1].seq
            self._backlog.extend(e for e in batch if self.types is None or e.type in self.types)
        elif self.cursor >= self.bus.last_seq:
            # Caught up: no await between this check and the flag flip, so nothing
            # published in between can be missed.
            self.lagging = False
        return None


class Bus:
    """Fan-out of committed events. Attach to a store with `Bus(store)`."""

    def __init__(self, store: EventStore | None = None) -> None:
        self.store = store
        self._subs: set[Subscription] = set()
        self.last_seq = store.last_seq if store is not None else 0
        if store is not None:
            store.add_listener(self.publish)

    def publish(self, events: Sequence[Event]) -> None:
        if events:
            self.last_seq = max(self.last_seq, events[-1].seq)
        for sub in list(self._subs):
            sub._offer(events)

    def subscribe(
        self,
        name: str,
        types: Sequence[str] | None = None,
        maxsize: int = 1000,
        from_seq: int | None = None,
    ) -> Subscription:
        """Events committed after now (or after `from_seq`, read from the log first)."""
        start = self.last_seq if from_seq is None else from_seq
        sub = Subscription(self, name, frozenset(types) if types else None, maxsize, start)
        if from_seq is not None and from_seq < self.last_seq:
            sub.lagging = True
        self._subs.add(sub)
        return sub

    def close(self) -> None:
        for sub in list(self._subs):
            sub.close()
        if self.store is not None:
            self.store.remove_listener(self.publish)
