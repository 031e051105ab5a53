"""Fan-out of run events to subscribers, each with its own buffer bounded in bytes.

Publishing is synchronous, so the agent loop hands events on without an await. A slow
subscriber never slows a run:

- Once its buffer holds ``capacity`` events, a new text or thinking delta is merged into
  the newest buffered delta of the same run and kind, unless another event of that run
  came after it (nothing merges across a tool or lifecycle event). A merge appends the
  new text to a list of pieces, joined once when the event is delivered, so merging costs
  O(new text) however long the merged text grows. The merged event keeps the later
  ``seq``: a gap in ``seq`` means deltas were merged. The text stays whole.
- Every buffered event counts against ``max_bytes``: a delta its text's UTF-8 bytes, any
  other event the length of its ``repr`` (an estimate of its size), each plus
  ``EVENT_OVERHEAD``. A subscription whose buffer goes past ``max_bytes`` (merging could
  not keep it under) is *overflowed*: the bus stops buffering for it, what it holds stays
  readable (a prefix of the stream, the event that crossed the bound included), and then
  iteration raises ``SubscriptionOverflow``. Its reader must subscribe again and read
  history to resume. Nothing is ever dropped in between: terminal events least of all.
"""

from __future__ import annotations

from collections import deque
from types import TracebackType
from typing import Final, final

import attrs
import trio

from ._errors import AgentRuntimeError
from ._events import Event, TextDelta, ThinkingDelta

DEFAULT_CAPACITY: Final = 256  # buffered events before deltas start to merge
DEFAULT_MAX_BYTES: Final = 4 * 1024 * 1024
EVENT_OVERHEAD: Final = 128  # bytes counted for each buffered event besides its text

Delta = TextDelta | ThinkingDelta


class SubscriptionOverflow(AgentRuntimeError):
    """The subscriber fell so far behind that its buffer passed its byte bound."""

    def __init__(self, max_bytes: int):
        super().__init__(
            f"This subscriber fell more than {max_bytes} bytes of events behind and was "
            "dropped; subscribe again and read the session's history to resume."
        )
        self.max_bytes = max_bytes


def event_size(event: Event) -> int:
    """What a buffered event counts against ``max_bytes``."""
    if isinstance(event, TextDelta | ThinkingDelta):
        return EVENT_OVERHEAD + _utf8_size(event.text)
    return EVENT_OVERHEAD + len(repr(event))


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


@final
class _Entry:
    """One buffered event; a delta may grow by merging, its pieces joined on delivery."""

    __slots__ = ("event", "pieces", "seq", "size")

    def __init__(self, event: Event, size: int) -> None:
        self.event = event
        self.pieces: list[str] | None = None
        self.seq = event.seq
        self.size = size

    def merge(self, delta: Delta, size: int) -> None:
        if self.pieces is None:
            assert isinstance(self.event, TextDelta | ThinkingDelta)
            self.pieces = [self.event.text]
        self.pieces.append(delta.text)
        self.seq = delta.seq
        self.size += size

    def take(self) -> Event:
        event = self.event
        if self.pieces is None:
            return event
        assert isinstance(event, TextDelta | ThinkingDelta)
        return attrs.evolve(event, text="".join(self.pieces), seq=self.seq)


@final
@attrs.define(eq=False)
class Subscription:
    """An async iterator of events; use it as a context manager so it is always removed."""

    session_key: str | None
    _bus: EventBus
    _capacity: int
    _max_bytes: int = DEFAULT_MAX_BYTES
    _buffer: deque[_Entry] = attrs.field(factory=deque, init=False)
    # the newest buffered delta of each (run, kind) that a later delta may still merge into
    _open: dict[tuple[str, type], _Entry] = attrs.field(factory=dict, init=False)
    _bytes: int = attrs.field(default=0, init=False)
    _lot: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot, init=False)
    _closed: bool = attrs.field(default=False, init=False)
    _overflow: trio.Event = attrs.field(factory=trio.Event, init=False)
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

    @property
    def overflowed(self) -> bool:
        """True once the buffer passed ``max_bytes``: nothing more is buffered."""
        return self._overflow.is_set()

    @property
    def buffered_bytes(self) -> int:
        return self._bytes

    async def wait_overflowed(self) -> None:
        """Return once the subscription has overflowed (see the module docstring)."""
        await self._overflow.wait()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        while not self._buffer:
            if self.overflowed:
                raise SubscriptionOverflow(self._max_bytes)
            if self._closed:
                raise StopAsyncIteration
            await self._lot.park()
        await trio.lowlevel.checkpoint()
        return self._take()

    def seal(self) -> None:
        """From now on, no buffered delta takes in a delta published after this call.

        Call it when reading a run's snapshot (``Run.snapshot``) for this subscriber, with
        no await between the two: a delta merged across that instant would carry text the
        snapshot already holds under a ``seq`` above the snapshot's, and a reader that
        applies only the events after the snapshot's ``seq`` would show it twice."""
        self._open.clear()

    def receive_nowait(self) -> Event | None:
        """The next buffered event, or None when there is none."""
        return self._take() if self._buffer else None

    def _take(self) -> Event:
        entry = self._buffer.popleft()
        self._bytes -= entry.size
        event = entry.event
        if isinstance(event, TextDelta | ThinkingDelta):
            key = (event.run_id, type(event))
            if self._open.get(key) is entry:
                del self._open[key]  # on its way out: nothing merges into it any more
        return entry.take()

    def _push(self, event: Event, size: int) -> None:
        if self._closed:
            return
        if isinstance(event, TextDelta | ThinkingDelta):
            key = (event.run_id, type(event))
            entry = self._open.get(key)
            if entry is not None and len(self._buffer) >= self._capacity:
                text_size = size - EVENT_OVERHEAD
                entry.merge(event, text_size)
                self._bytes += text_size
                self.merged += 1
                self._check_bound()
                return
            entry = self._open[key] = _Entry(event, size)
        else:
            # nothing of this run merges across this event
            self._open.pop((event.run_id, TextDelta), None)
            self._open.pop((event.run_id, ThinkingDelta), None)
            entry = _Entry(event, size)
        self._buffer.append(entry)
        self._bytes += size
        self._check_bound()
        self._lot.unpark_all()

    def _check_bound(self) -> None:
        if self._bytes > self._max_bytes:
            self._overflow.set()
            self._closed = True  # the bus drops it after this publish (see publish)
            self._lot.unpark_all()


@final
@attrs.define(eq=False)
class EventBus:
    _subscriptions: set[Subscription] = attrs.field(factory=set, init=False)

    def subscribe(
        self,
        session_key: str | None = None,
        capacity: int = DEFAULT_CAPACITY,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> Subscription:
        subscription = Subscription(session_key, self, capacity, max_bytes)
        self._subscriptions.add(subscription)
        return subscription

    def publish(self, event: Event) -> None:
        if not self._subscriptions:
            return
        size = event_size(event)  # once, for every subscriber
        overflowed = []
        for subscription in self._subscriptions:
            if subscription.session_key in (None, event.session_key):
                subscription._push(event, size)
                if subscription._closed:
                    overflowed.append(subscription)
        for subscription in overflowed:
            self._subscriptions.discard(subscription)

    def __len__(self) -> int:
        return len(self._subscriptions)

    def _remove(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)
