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
- Stops first: a run's terminal event is delivered before other runs' events buffered
  ahead of it, together with whatever of its own run is still buffered (in order), so a
  stop's outcome never waits behind a backlog of other runs' deltas. One run's events are
  never reordered.

Routing: a subscription follows every session (``session_key=None``, the operator view),
or the sessions it follows (``follow_session``) plus the runs it follows (``follow_run``,
until the run's terminal event). The bus indexes subscriptions by session and by run, so
a publish costs O(subscribers of that session and run + subscribers of everything), not
O(all subscribers).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Final, final

import attrs
import trio

from ._errors import AgentRuntimeError
from ._events import Event, RunCancelled, RunFailed, RunFinished, TextDelta, ThinkingDelta

DEFAULT_CAPACITY: Final = 256  # buffered events before deltas start to merge
DEFAULT_MAX_BYTES: Final = 4 * 1024 * 1024
EVENT_OVERHEAD: Final = 128  # bytes counted for each buffered event besides its text

Delta = TextDelta | ThinkingDelta
_TERMINAL: Final = (RunFinished, RunCancelled, RunFailed)


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

    session_key: str | None  # the session it was opened for; None: every session
    _bus: EventBus
    _capacity: int
    _max_bytes: int = DEFAULT_MAX_BYTES
    # terminal events, and what of their runs was still buffered: delivered first
    _urgent: deque[_Entry] = attrs.field(factory=deque, init=False)
    _buffer: deque[_Entry] = attrs.field(factory=deque, init=False)
    # how many entries of each run wait in _buffer (a terminal event moves them to _urgent)
    _waiting: dict[str, int] = attrs.field(factory=dict, init=False)
    # the newest buffered delta of each (run, kind) that a later delta may still merge into
    _open: dict[tuple[str, type], _Entry] = attrs.field(factory=dict, init=False)
    _bytes: int = attrs.field(default=0, init=False)
    _lot: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot, init=False)
    _closed: bool = attrs.field(default=False, init=False)
    _overflow: trio.Event = attrs.field(factory=trio.Event, init=False)
    # routing (kept by the bus): everything, or these sessions and runs
    _everything: bool = attrs.field(default=False, init=False)
    _sessions: set[str] = attrs.field(factory=set, init=False)
    _runs: set[str] = attrs.field(factory=set, init=False)
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

    @property
    def follows_everything(self) -> bool:
        return self._everything

    @property
    def sessions(self) -> frozenset[str]:
        """The sessions followed (empty while it follows everything)."""
        return frozenset(self._sessions)

    @property
    def runs(self) -> frozenset[str]:
        """The runs followed besides the sessions."""
        return frozenset(self._runs)

    def follows(self, event: Event) -> bool:
        return self._everything or event.session_key in self._sessions or event.run_id in self._runs

    def follow_session(self, session_key: str) -> None:
        """Receive this session's events from now on. The first call narrows a
        subscription that followed everything to its sessions and runs."""
        self._bus._route_session(self, session_key)

    def unfollow_session(self, session_key: str) -> None:
        """Stop receiving the session's events; those already buffered are dropped, except
        those of the runs it follows."""
        self._bus._unroute_session(self, session_key)
        self._discard(lambda e: e.session_key == session_key and e.run_id not in self._runs)

    def follow_run(self, run_id: str, session_key: str | None = None) -> None:
        """Receive this run's events until its terminal event, whatever else it follows.
        Name its session when the run may live on another process: the bus's ``followed``
        sessions then include it, so that process's events are relayed here."""
        self._bus._route_run(self, run_id, session_key)

    def unfollow_run(self, run_id: str) -> None:
        self._bus._unroute_run(self, run_id)

    async def wait_overflowed(self) -> None:
        """Return once the subscription has overflowed (see the module docstring)."""
        await self._overflow.wait()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        while True:
            while not (self._urgent or self._buffer):
                if self.overflowed:
                    raise SubscriptionOverflow(self._max_bytes)
                if self._closed:
                    raise StopAsyncIteration
                await self._lot.park()
            await trio.lowlevel.checkpoint()
            # what was buffered may have gone meanwhile (unfollow_session, receive_nowait)
            if self._urgent or self._buffer:
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
        return self._take() if self._urgent or self._buffer else None

    def _take(self) -> Event:
        if self._urgent:
            entry = self._urgent.popleft()
        else:
            entry = self._buffer.popleft()
            self._count(entry.event.run_id, -1)
        self._bytes -= entry.size
        event = entry.event
        if isinstance(event, TextDelta | ThinkingDelta):
            key = (event.run_id, type(event))
            if self._open.get(key) is entry:
                del self._open[key]  # on its way out: nothing merges into it any more
        return entry.take()

    def _count(self, run_id: str, change: int) -> None:
        left = self._waiting.get(run_id, 0) + change
        if left:
            self._waiting[run_id] = left
        else:
            self._waiting.pop(run_id, None)

    def _discard(self, drop: Callable[[Event], bool]) -> None:
        for lane in (self._urgent, self._buffer):
            kept = [entry for entry in lane if not drop(entry.event)]
            for entry in lane:
                if drop(entry.event):
                    self._bytes -= entry.size
                    if lane is self._buffer:
                        self._count(entry.event.run_id, -1)
            lane.clear()
            lane.extend(kept)
        for key, entry in list(self._open.items()):
            if drop(entry.event):
                del self._open[key]

    def _push(self, event: Event, size: int) -> None:
        if self._closed:
            return
        run_id = event.run_id
        if isinstance(event, TextDelta | ThinkingDelta):
            key = (run_id, type(event))
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
            self._open.pop((run_id, TextDelta), None)
            self._open.pop((run_id, ThinkingDelta), None)
            entry = _Entry(event, size)
        if isinstance(event, _TERMINAL):
            if run_id in self._waiting:  # its run's buffered events go first, in order
                del self._waiting[run_id]
                ahead = [e for e in self._buffer if e.event.run_id == run_id]
                rest = [e for e in self._buffer if e.event.run_id != run_id]
                self._urgent.extend(ahead)
                self._buffer.clear()
                self._buffer.extend(rest)
            self._urgent.append(entry)
        else:
            self._buffer.append(entry)
            self._count(run_id, 1)
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
    _everything: set[Subscription] = attrs.field(factory=set, init=False)
    _by_session: dict[str, set[Subscription]] = attrs.field(factory=dict, init=False)
    _by_run: dict[str, set[Subscription]] = attrs.field(factory=dict, init=False)
    # the sessions of the followed runs named with one (follow_run), by run
    _run_sessions: dict[str, str] = attrs.field(factory=dict, init=False)
    # bumped when a session gains its first follower or loses its last, or a subscription
    # that follows everything comes or goes (see ``followed``)
    _routes_version: int = attrs.field(default=0, init=False)
    _routes_lot: trio.lowlevel.ParkingLot = attrs.field(
        factory=trio.lowlevel.ParkingLot, init=False
    )

    def followed(self, besides: Subscription | None = None) -> tuple[frozenset[str], bool]:
        """The sessions some subscription follows by name, and whether one (other than
        ``besides``) follows every session."""
        everything = any(subscription is not besides for subscription in self._everything)
        return frozenset(self._by_session).union(self._run_sessions.values()), everything

    @property
    def routes_version(self) -> int:
        return self._routes_version

    async def wait_routes_changed(self, version: int) -> None:
        """Return once ``routes_version`` is other than ``version``."""
        await trio.lowlevel.checkpoint()
        while self._routes_version == version:
            await self._routes_lot.park()

    def _routes_changed(self) -> None:
        self._routes_version += 1
        self._routes_lot.unpark_all()

    def subscribe(
        self,
        session_key: str | None = None,
        capacity: int = DEFAULT_CAPACITY,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> Subscription:
        subscription = Subscription(session_key, self, capacity, max_bytes)
        self._subscriptions.add(subscription)
        if session_key is None:
            subscription._everything = True
            self._everything.add(subscription)
            self._routes_changed()
        else:
            self._route_session(subscription, session_key)
        return subscription

    def publish(self, event: Event) -> None:
        if not self._subscriptions:
            return
        size = event_size(event)  # once, for every subscriber
        overflowed = []
        for subscription in self._everything:
            subscription._push(event, size)
            if subscription._closed:
                overflowed.append(subscription)
        session_key = event.session_key
        for subscription in self._by_session.get(session_key, ()):
            subscription._push(event, size)
            if subscription._closed:
                overflowed.append(subscription)
        run_id = event.run_id
        followers = self._by_run.get(run_id)
        if followers:
            for subscription in followers:
                if subscription._everything or session_key in subscription._sessions:
                    continue  # already served above
                subscription._push(event, size)
                if subscription._closed:
                    overflowed.append(subscription)
            if isinstance(event, _TERMINAL):  # nothing of the run follows it
                for subscription in self._by_run.pop(run_id):
                    subscription._runs.discard(run_id)
                self._end_run_routes(run_id)
        for subscription in overflowed:
            self._remove(subscription)

    def __len__(self) -> int:
        return len(self._subscriptions)

    def _route_session(self, subscription: Subscription, session_key: str) -> None:
        if subscription._closed:
            return
        if subscription._everything:
            subscription._everything = False
            self._everything.discard(subscription)
            self._routes_changed()
            # what it buffered of other sessions was sent while it followed everything
            subscription._discard(
                lambda e: e.session_key != session_key and e.run_id not in subscription._runs
            )
        subscription._sessions.add(session_key)
        if session_key not in self._by_session:
            self._by_session[session_key] = set()
            self._routes_changed()
        self._by_session[session_key].add(subscription)

    def _unroute_session(self, subscription: Subscription, session_key: str) -> None:
        subscription._sessions.discard(session_key)
        followers = self._by_session.get(session_key)
        if followers is not None:
            followers.discard(subscription)
            if not followers:
                del self._by_session[session_key]
                self._routes_changed()

    def _route_run(
        self, subscription: Subscription, run_id: str, session_key: str | None
    ) -> None:
        if subscription._closed:
            return
        subscription._runs.add(run_id)
        self._by_run.setdefault(run_id, set()).add(subscription)
        if session_key is not None and run_id not in self._run_sessions:
            self._run_sessions[run_id] = session_key
            self._routes_changed()

    def _end_run_routes(self, run_id: str) -> None:
        """The run has no follower left: it no longer counts in ``followed``."""
        if self._run_sessions.pop(run_id, None) is not None:
            self._routes_changed()

    def _unroute_run(self, subscription: Subscription, run_id: str) -> None:
        subscription._runs.discard(run_id)
        followers = self._by_run.get(run_id)
        if followers is not None:
            followers.discard(subscription)
            if not followers:
                del self._by_run[run_id]
                self._end_run_routes(run_id)

    def _remove(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)
        if subscription in self._everything:
            self._everything.discard(subscription)
            self._routes_changed()
        for session_key in list(subscription._sessions):
            self._unroute_session(subscription, session_key)
        for run_id in list(subscription._runs):
            self._unroute_run(subscription, run_id)
