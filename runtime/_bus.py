"""Fan-out of run events to subscribers, each with its own bounded buffer.

Publishing is synchronous, so the agent loop hands events on without an await. A slow
subscriber never slows a run: when its buffer is full, a new text or thinking delta is
merged into the newest buffered delta of the same run and kind (the concatenated text
stays whole; the merged event keeps the later ``seq``, so a gap in ``seq`` means deltas
were merged). Other events are never dropped; terminal events least of all. A buffer
therefore holds at most ``capacity`` events plus the few non-delta events and per-kind
deltas of each run that arrived while it was full.
"""

from __future__ import annotations

from collections import deque
from types import TracebackType
from typing import final

import attrs
import trio

from ._events import Event, TextDelta, ThinkingDelta

DEFAULT_CAPACITY = 256


@final
@attrs.define(eq=False)
class Subscription:
    """An async iterator of events; use it as a context manager so it is always removed."""

    session_key: str | None
    _bus: EventBus
    _capacity: int
    _buffer: deque[Event] = attrs.field(factory=deque, init=False)
    _lot: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot, init=False)
    _closed: bool = attrs.field(default=False, init=False)
    merged: int = attrs.field(default=0, init=False)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop receiving; an iteration in progress ends once the buffer is drained."""
        if not self._closed:
            self._closed = True
            self._bus._remove(self)
            self._lot.unpark_all()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        while not self._buffer:
            if self._closed:
                raise StopAsyncIteration
            await self._lot.park()
        await trio.lowlevel.checkpoint()
        return self._buffer.popleft()

    def receive_nowait(self) -> Event | None:
        """The next buffered event, or None when there is none."""
        return self._buffer.popleft() if self._buffer else None

    def _push(self, event: Event) -> None:
        if len(self._buffer) >= self._capacity and isinstance(event, TextDelta | ThinkingDelta):
            for index in range(len(self._buffer) - 1, -1, -1):
                earlier = self._buffer[index]
                if earlier.run_id != event.run_id:
                    continue
                if type(earlier) is type(event):
                    self._buffer[index] = attrs.evolve(
                        earlier,
                        text=earlier.text + event.text,
                        seq=event.seq,
                    )
                    self.merged += 1
                    return
                if not isinstance(earlier, TextDelta | ThinkingDelta):
                    break  # never merge across a tool or lifecycle event of the run
        self._buffer.append(event)
        self._lot.unpark_all()


@final
@attrs.define(eq=False)
class EventBus:
    _subscriptions: set[Subscription] = attrs.field(factory=set, init=False)

    def subscribe(
        self, session_key: str | None = None, capacity: int = DEFAULT_CAPACITY
    ) -> Subscription:
        subscription = Subscription(session_key, self, capacity)
        self._subscriptions.add(subscription)
        return subscription

    def publish(self, event: Event) -> None:
        for subscription in self._subscriptions:
            if subscription.session_key in (None, event.session_key):
                subscription._push(event)

    def __len__(self) -> int:
        return len(self._subscriptions)

    def _remove(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)
