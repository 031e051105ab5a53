"""The runtime: admits runs, drives the agent loop, and stops runs at any await.

Each run lives in the runtime's nursery under its own ``CancelScope``, registered under
its ``run_id`` before the run's first checkpoint. ``abort`` is synchronous: it records
why and cancels the scope, so the next checkpoint (a socket read waiting for the
provider's next byte, a tool's sleep, a queue wait) raises ``Cancelled`` at once. The run
then leaves its scope and runs one shielded, bounded stop commit that writes what it
produced and emits its one terminal event. Nothing else needs to know how it stopped.
"""

from __future__ import annotations

import logging
import statistics as stats
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from types import TracebackType
from typing import Any, Literal, final

import attrs
import trio

from ._abort import AbortBus, AbortResult, LocalAbortBus
from ._bus import DEFAULT_CAPACITY, DEFAULT_MAX_BYTES, EventBus, Subscription
from ._context import MAX_HISTORY_READ, fit_context
from ._errors import (
    AbortRefused,
    InvalidRequest,
    RunExists,
    RunSessionMismatch,
    RuntimeClosing,
    SessionBusy,
    SessionElsewhere,
)
from ._events import (
    CONCURRENCY_POLICIES,
    STOP_POLICIES,
    ConcurrencyPolicy,
    Event,
    FailureKind,
    RunCancelled,
    RunFailed,
    RunFinished,
    RunQueued,
    RunStarted,
    StopPolicy,
    StopTimings,
    StreamOptions,
    TerminalEvent,
    TextDelta,
    ThinkingDelta,
    ToolCallFinished,
    ToolCallProgress,
    ToolCallStarted,
)
from ._history import InvalidHistory, Message, TextBlock, validate_history
from ._model import Model, ModelError, ModelRequest, TextChunk, ThinkingChunk
from ._state import BUDGET_RESULT, PendingCall, RunState, encode_fragment
from ._store import MemoryStore, RunRecord, RunStatus, SessionSettings, Store
from ._tools import Tool, call_tool

logger = logging.getLogger("runtime")

Phase = Literal["queued", "running", "committing", "done"]
StopHook = Callable[["Run", list[Message], Any], "list[Message] | None"]

STOP_COMMANDS = frozenset({"/stop", "stop"})


@final
@attrs.frozen
class LatencySummary:
    count: int
    median_ms: float | None
    p99_ms: float | None
    max_ms: float | None


@final
@attrs.frozen
class RuntimeStatistics:
    live_runs: int
    queued_runs: int
    aborts: int
    subscribers: int
    stop_latency: LatencySummary  # abort requested -> stop committed


@final
@attrs.frozen
class RunSnapshot:
    """A live (or queued) run at one instant: its reply so far and the ``seq`` of the
    last event it published. The text holds every ``TextDelta`` with a ``seq`` up to
    ``seq`` and none after it, so a reader that then applies only the events with a
    higher ``seq`` misses nothing and doubles nothing. Plain data: the abort bus carries
    it from the process that runs the run to the one a client asked."""

    run_id: str
    session_key: str
    phase: Phase
    prompt: str
    text: str
    seq: int
    allow_cancel: bool
    accepted_at: float  # wall-clock seconds


@final
@attrs.define(eq=False)
class Run:
    """A handle on one run. Read its state; ``await run.wait()`` for its terminal event."""

    run_id: str
    session_key: str
    prompt: str
    stop_policy: StopPolicy
    allow_cancel: bool
    thinking: bool
    timeout: float | None
    context: Any
    _ahead: tuple[Run, ...]  # the session's runs admitted before this one
    _scope: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)
    _phase: Phase = attrs.field(default="queued", init=False)
    _abort_reason: str | None = attrs.field(default=None, init=False)
    _abort_at: float | None = attrs.field(default=None, init=False)
    # begin_run was called: from here the prompt may be in the store (even if the call
    # was cancelled after its write), so a stop that hands the prompt back removes it.
    _begun: bool = attrs.field(default=False, init=False)
    _prompt_stored: bool = attrs.field(default=False, init=False)  # begin_run returned
    # the current tool round's tasks: they live in the runtime's nursery (see _run_tools)
    _tools_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)
    _tools_done: trio.Event | None = attrs.field(default=None, init=False)
    _started_at: float = attrs.field(factory=time.time, init=False)
    _seq: int = attrs.field(default=0, init=False)
    _done: trio.Event = attrs.field(factory=trio.Event, init=False)
    _terminal: TerminalEvent | None = attrs.field(default=None, init=False)
    _checkpointed: int = attrs.field(default=-1, init=False)  # the state version last saved
    _state: RunState = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._state = RunState(self.run_id)

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def text(self) -> str:
        """The reply's text so far, over all turns: exactly what was sent as TextDelta."""
        return self._state.reply_text()

    @property
    def accepted_at(self) -> float:
        """When ``start_run`` admitted it, in wall-clock seconds."""
        return self._started_at

    @property
    def terminal_event(self) -> TerminalEvent | None:
        return self._terminal

    def snapshot(self) -> RunSnapshot:
        """The text so far and the ``seq`` it reflects, read at one instant. Synchronous:
        events are published with no await after the state they report changed, so no
        event can fall between the two reads."""
        return RunSnapshot(
            self.run_id,
            self.session_key,
            self._phase,
            self.prompt,
            self._state.reply_text(),
            self._seq - 1,
            self.allow_cancel,
            self._started_at,
        )

    async def wait(self) -> TerminalEvent:
        """Wait for the run to end and return its terminal event."""
        await self._done.wait()
        assert self._terminal is not None
        return self._terminal

    def _request_abort(self, reason: str, policy: StopPolicy | None) -> bool:
        if self._phase not in ("queued", "running") or self._abort_reason is not None:
            return False  # already stopping, or the commit began: too late either way
        self._abort_reason = reason
        self._abort_at = trio.current_time()
        if policy is not None:
            self.stop_policy = policy
        self._scope.cancel(reason)
        self._tools_scope.cancel(reason)
        return True

    def _final_record(self, status: RunStatus, stop_reason: str, **fields: Any) -> RunRecord:
        return RunRecord(
            run_id=self.run_id,
            session_key=self.session_key,
            status=status,
            started_at=self._started_at,
            ended_at=time.time(),
            stop_reason=stop_reason,
            usage=self._state.usage(),
            **fields,
        )

    def _next_seq(self) -> int:
        seq, self._seq = self._seq, self._seq + 1
        return seq


@final
@attrs.define(eq=False)
class Runtime:
    """Runs agents; ``async with Runtime(model=...) as rt`` owns the nursery they live in.

    Budgets: ``max_turns`` model turns and ``max_tool_calls`` tool calls per run, and
    ``run_timeout`` seconds (None: no limit). ``commit_timeout`` bounds a run's end, from
    leaving its scope to its terminal event, whatever its tools or the store do.
    ``checkpoint_interval`` bounds how much streamed text a crash can lose.
    ``context_budget`` bounds, in characters, the history sent to the model (see
    ``_context``: the newest whole exchanges that fit; None for all of it).
    """

    model: Model
    store: Store = attrs.field(factory=MemoryStore)
    abort_bus: AbortBus = attrs.field(factory=LocalAbortBus)  # see _abort: several processes
    tools: Sequence[Tool] = ()
    system: str | None = None
    thinking: bool = False
    max_turns: int = 16
    max_tool_calls: int = 64
    run_timeout: float | None = None
    commit_timeout: float = 5.0
    context_budget: int | None = 400_000
    checkpoint_interval: float = 0.25
    subscriber_capacity: int = DEFAULT_CAPACITY
    subscriber_max_bytes: int = DEFAULT_MAX_BYTES
    on_cancelled: StopHook | None = None
    recover: bool = True
    _tools_by_name: dict[str, Tool] = attrs.field(init=False)
    _runs: dict[str, Run] = attrs.field(factory=dict, init=False)
    _sessions: dict[str, list[Run]] = attrs.field(factory=dict, init=False)
    _admitting: dict[str, trio.Event] = attrs.field(factory=dict, init=False)  # in start_run
    # By session: its admissions, one at a time (a send the reject policy refuses must
    # never have claimed its id: another process would answer a resend of it in_flight,
    # for a run that never runs; found by the two-gateway schedules).
    _admissions: dict[str, trio.Lock] = attrs.field(factory=dict, init=False)
    # By session: its prompt writes and late commits, one at a time. A late commit reads
    # the session's last message and appends after it only if it is the run's own, so the
    # next prompt must not be written in between (found by the two-gateway schedules).
    # Another process cannot write one meanwhile, as a run whose end is unsaved keeps its
    # session here; left open: a dead process's run closed by another, whose session is
    # free once its holder is dead (the check inside the store's commit would close it).
    _order: dict[str, trio.Lock] = attrs.field(factory=dict, init=False)
    _bus: EventBus = attrs.field(factory=EventBus, init=False)
    _exit_stack: AsyncExitStack | None = attrs.field(default=None, init=False)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)
    _aborts: int = attrs.field(default=0, init=False)
    _closing: bool = attrs.field(default=False, init=False)
    _unsettled: dict[str, _Commit] = attrs.field(factory=dict, init=False)  # failed commits
    # the checkpoint encoder's own thread: never waits behind tools' threads
    _encoder: trio.CapacityLimiter = attrs.field(
        factory=lambda: trio.CapacityLimiter(1), init=False
    )
    _checkpointer: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)
    _stop_latencies: deque[float] = attrs.field(factory=lambda: deque(maxlen=1000), init=False)

    def __attrs_post_init__(self) -> None:
        self._tools_by_name = {tool.name: tool for tool in self.tools}
        if len(self._tools_by_name) != len(self.tools):
            raise InvalidRequest("Two tools share a name; tool names must be unique.")

    async def __aenter__(self) -> Runtime:
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(self.abort_bus.open(self))  # left after the runs
            self._nursery = await stack.enter_async_context(trio.open_nursery())
            if self.recover:
                await self._recover_interrupted()
            self._nursery.start_soon(self._checkpoint_loop)
            self._exit_stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self._closing = True  # start_run refuses from here: no run is admitted too late
        self._checkpointer.cancel()  # the runs' commits save their state from here
        for run in list(self._runs.values()):
            self._abort_run(run, "shutdown", None)
        assert self._exit_stack is not None
        try:
            return await self._exit_stack.__aexit__(exc_type, exc, tb)
        finally:
            self._exit_stack = self._nursery = None
            # A last try for commits that failed; what still fails, recovery closes at
            # the next start (the run is still recorded as running, with its checkpoint).
            with trio.move_on_after(self.commit_timeout, shield=True):
                for plan in list(self._unsettled.values()):
                    with _logged("saving a run that could not be saved before"):
                        await self._settle(plan)

    # -- the API ----------------------------------------------------------------------

    async def start_run(
        self,
        session_key: str,
        message: str,
        run_id: str | None = None,
        *,
        stop_policy: StopPolicy | None = None,
        concurrency: ConcurrencyPolicy | None = None,
        allow_cancel: bool = True,
        thinking: bool | None = None,
        run_timeout: float | None = None,
        context: Any = None,
    ) -> Run:
        """Start a run and return its handle once it is registered (and so abortable).

        ``stop_policy`` and ``concurrency`` override the session's settings for this run.
        If the session has a live run, ``concurrency`` decides: ``enqueue`` runs this one
        after it, ``reject`` raises SessionBusy, ``interrupt`` stops the live run (its
        partial kept) and ``rollback`` stops and rolls it back; in both, this run starts
        as soon as that stop is committed. Queued runs are left in place.
        """
        if self._closing:
            raise RuntimeClosing()
        if self._nursery is None:
            raise RuntimeError("Use the Runtime inside 'async with' before starting runs.")
        if not isinstance(session_key, str) or not session_key.strip():
            raise InvalidRequest("sessionKey is empty; name the session to send to.")
        if not isinstance(message, str) or not message.strip():
            raise InvalidRequest("The message is empty; there is nothing to send.")
        _check_choice("stop policy", stop_policy, STOP_POLICIES)
        _check_choice("concurrency policy", concurrency, CONCURRENCY_POLICIES)
        if run_timeout is not None and not run_timeout > 0:
            raise InvalidRequest("run_timeout must be a positive number of seconds.")
        run_id = run_id or uuid.uuid4().hex
        # One admission per id at a time: otherwise a second send of the id could read "no
        # such run" before the first run's record was written, and, once that run had
        # ended and left the registry, start a second run with the same id.
        while (admitting := self._admitting.get(run_id)) is not None:
            await admitting.wait()
        if run_id in self._runs:
            raise RunExists(run_id, live=True)
        if run_id in self._unsettled:  # it ran; its record is not in the store yet
            raise RunExists(run_id, live=False)
        self._admitting[run_id] = trio.Event()
        try:
            async with _one_at_a_time(self._admissions, session_key):  # see _admissions
                settings = await self._admit(session_key, run_id, concurrency)
                # From here to the end: no await, so admission and registration are atomic.
                # (A session `reject` refuses was refused in _admit: no admission fills it
                # meanwhile.)
                if self._closing:  # shutdown began while this admission awaited the store
                    self.abort_bus.released(run_id)
                    raise RuntimeClosing()
                chain = self._sessions.get(session_key, [])
                policy = concurrency or settings.concurrency
                run = Run(
                    run_id,
                    session_key,
                    message,
                    stop_policy or settings.stop_policy,
                    allow_cancel,
                    self.thinking if thinking is None else thinking,
                    run_timeout if run_timeout is not None else self.run_timeout,
                    context,
                    tuple(chain),
                )
                if chain and policy in ("interrupt", "rollback") and chain[0].allow_cancel:
                    live = chain[0]  # one that does not allow cancel is waited for
                    self._abort_run(
                        live, "interrupted", "rollback" if policy == "rollback" else "keep_partial"
                    )
                self._runs[run_id] = run
                self._sessions.setdefault(session_key, chain).append(run)
                self._publish(run, StreamOptions, allow_cancel=run.allow_cancel)
                if run._ahead:
                    self._publish(run, RunQueued, prompt=message, behind=run._ahead[-1].run_id)
        finally:
            self._admitting.pop(run_id).set()
        self._nursery.start_soon(self._drive, run, name=f"run {run_id}")
        if self.abort_bus.registered(run_id) and allow_cancel:  # an abort came first: it wins
            self._abort_run(run, "rpc", None)
        return run

    async def _admit(
        self, session_key: str, run_id: str, concurrency: ConcurrencyPolicy | None
    ) -> SessionSettings:
        """``start_run``'s awaits: the session's settings, a refusal under ``reject``, the
        claim of the id (then its lookup in the store). Returns the settings with the id
        claimed, or raises with nothing claimed."""
        claimed = False
        try:
            settings = await self.store.get_settings(session_key)
            # Refused before the claim: while claimed, another process answers a send of
            # this id "in_flight" and an abort of it "aborted", for a run that then never
            # runs. (No admission fills the session meanwhile: see _admissions.)
            busy = self._sessions.get(session_key)
            if busy and (concurrency or settings.concurrency) == "reject":
                if (recorded := await self.store.get_run(run_id)) is not None:
                    raise RunExists(run_id, live=recorded.status == "running")
                if busy := self._sessions.get(session_key):  # its runs may have ended meanwhile
                    raise SessionBusy(session_key, busy[0].run_id)
            # Claimed first, then looked for in the store: a process that ran this id
            # wrote its record before releasing it, so no process can start it again
            # between the two (see _abort). An abort that comes meanwhile is kept for
            # registration.
            claimed = await self.abort_bus.claim(run_id, session_key)
            if not claimed:
                raise RunExists(run_id, live=True)
            if (recorded := await self.store.get_run(run_id)) is not None:
                # running, yet not live here: left by a process that died
                raise RunExists(run_id, live=recorded.status == "running")
        except BaseException:
            if claimed:  # the claim landed but the run will not be registered
                self.abort_bus.released(run_id)
            raise
        return settings

    async def start_run_anywhere(
        self,
        session_key: str,
        message: str,
        run_id: str | None = None,
        *,
        stop_policy: StopPolicy | None = None,
        concurrency: ConcurrencyPolicy | None = None,
        allow_cancel: bool = True,
        thinking: bool | None = None,
        run_timeout: float | None = None,
    ) -> Run | None:
        """``start_run``; but where the session's runs live on another process
        (``SessionElsewhere``), the message is sent there, and that process admits it under
        the session's concurrency policy as this one would. Then None is returned: the run
        lives there, its events reach this process's subscribers that follow its session
        or its id (the abort bus relays them), and ``abort_anywhere`` stops it. Raises what
        ``start_run`` raises, on whichever process admitted it."""
        run_id = run_id or uuid.uuid4().hex
        options = {
            "stop_policy": stop_policy,
            "concurrency": concurrency,
            "allow_cancel": allow_cancel,
            "thinking": thinking,
            "run_timeout": run_timeout,
        }
        try:
            return await self.start_run(session_key, message, run_id, **options)  # type: ignore[arg-type]
        except SessionElsewhere as elsewhere:
            holder = elsewhere.process_id
        await self.abort_bus.start_elsewhere(holder, session_key, message, run_id, options)
        return None

    def abort(
        self,
        run_id: str | None = None,
        session_key: str | None = None,
        *,
        reason: str = "rpc",
        stop_policy: StopPolicy | None = None,
    ) -> AbortResult:
        """Stop one run, or every live or queued run of a session, now.

        Synchronous: when it returns, the runs' scopes are cancelled. A run that is
        unknown, finished, or already committing is not aborted (``aborted=False``); a
        live run of another session than ``session_key`` raises RunSessionMismatch.
        A run started with ``allow_cancel=False`` is stopped only by ``reason="shutdown"``:
        named by id it raises AbortRefused; a session-wide abort leaves it running and
        lists it in ``refused``.
        """
        _check_choice("stop policy", stop_policy, STOP_POLICIES)
        if run_id is not None:
            run = self._runs.get(run_id)
            if run is None:
                return AbortResult(False, ())
            if session_key is not None and run.session_key != session_key:
                raise RunSessionMismatch(run_id, session_key)
            if not run.allow_cancel and reason != "shutdown":
                raise AbortRefused(run_id)
            runs = [run]
        elif session_key is not None:
            runs = list(self._sessions.get(session_key, ()))
        else:
            raise InvalidRequest("Name a run id or a session key to abort.")
        refused = tuple(r.run_id for r in runs if not r.allow_cancel and reason != "shutdown")
        aborted = tuple(
            r.run_id
            for r in runs
            if r.run_id not in refused and self._abort_run(r, reason, stop_policy)
        )
        return AbortResult(bool(aborted), aborted, refused)

    async def abort_anywhere(
        self,
        run_id: str | None = None,
        session_key: str | None = None,
        *,
        reason: str = "rpc",
        stop_policy: StopPolicy | None = None,
    ) -> AbortResult:
        """``abort``, and where the run is not live here, on the process that owns it (see
        ``abort_bus``): a run named by id that is live here is stopped here alone; a
        session's runs are stopped on every process."""
        here = self.abort(run_id, session_key, reason=reason, stop_policy=stop_policy)
        if run_id is not None and run_id in self._runs:
            return here
        there = await self.abort_bus.abort_elsewhere(run_id, session_key, reason, stop_policy)
        aborted = here.run_ids + there.run_ids
        return AbortResult(bool(aborted), aborted, here.refused + there.refused)

    async def live_runs_anywhere(self, session_key: str) -> list[RunSnapshot]:
        """Snapshots of a session's live and queued runs, in the order they will run,
        wherever they live: here, or on the process that holds the session (a session's
        runs live on one process at a time; see ``abort_bus``)."""
        await trio.lowlevel.checkpoint()
        if runs := self._sessions.get(session_key):
            return [run.snapshot() for run in runs]
        return await self.abort_bus.live_elsewhere(session_key)

    def subscribe(
        self,
        session_key: str | None = None,
        *,
        max_bytes: int | None = None,
        capacity: int | None = None,
    ) -> Subscription:
        """Events of one session (or all when None): ``with rt.subscribe(key) as events:``
        then ``async for event in events``. A subscriber more than ``max_bytes`` behind
        (default ``subscriber_max_bytes``) is dropped; past ``capacity`` buffered events
        (default ``subscriber_capacity``) its deltas merge: see ``_bus`` for the rules.
        ``Subscription.follow_session`` and ``follow_run`` change what it follows."""
        bound = self.subscriber_max_bytes if max_bytes is None else max_bytes
        merge_after = self.subscriber_capacity if capacity is None else capacity
        return self._bus.subscribe(session_key, merge_after, bound)

    def followed_sessions(
        self, besides: Subscription | None = None
    ) -> tuple[int, frozenset[str], bool]:
        """What this process's subscribers follow, leaving out ``besides``: a version
        number that changes with it (``wait_followed_changed``), the sessions followed by
        name, and whether one follows every session. The abort bus relays other
        processes' events for these sessions only."""
        return self._bus.routes_version, *self._bus.followed(besides)

    async def wait_followed_changed(self, version: int) -> None:
        """Return once what the subscribers follow changed since ``version``."""
        await self._bus.wait_routes_changed(version)

    def relay(self, event: Event) -> None:
        """Hand this process's subscribers an event of a run on another process (the
        abort bus relays them, so a client may follow a run from any process)."""
        self._bus.publish(event)

    def get_run(self, run_id: str) -> Run | None:
        """The live or queued run with this id, if any."""
        return self._runs.get(run_id)

    def live_runs(self, session_key: str | None = None) -> list[Run]:
        """Live and queued runs, of one session or all, in the order they will run."""
        if session_key is not None:
            return list(self._sessions.get(session_key, ()))
        return list(self._runs.values())

    def statistics(self) -> RuntimeStatistics:
        latencies = sorted(self._stop_latencies)
        summary = LatencySummary(
            len(latencies),
            stats.median(latencies) if latencies else None,
            latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else None,
            latencies[-1] if latencies else None,
        )
        queued = sum(1 for r in self._runs.values() if r.phase == "queued")
        return RuntimeStatistics(
            len(self._runs) - queued, queued, self._aborts, len(self._bus), summary
        )

    # -- one run ----------------------------------------------------------------------

    def _abort_run(self, run: Run, reason: str, policy: StopPolicy | None) -> bool:
        if not run._request_abort(reason, policy):
            return False
        self._aborts += 1
        logger.info(
            "abort requested session=%s run=%s reason=%s phase=%s",
            run.session_key,
            run.run_id,
            reason,
            run.phase,
        )
        return True

    async def _drive(self, run: Run) -> None:
        failure: tuple[FailureKind, str] | None = None
        outer: BaseException | None = None
        finish_reason = "end_turn"
        try:
            with run._scope:
                for earlier in run._ahead:
                    await earlier._done.wait()
                run._phase = "running"
                if run.timeout is not None:
                    run._scope.deadline = trio.current_time() + run.timeout
                finish_reason = await self._execute(run)
        except ModelError as exc:
            failure = (exc.kind, str(exc))
        except StoreFailed as exc:
            failure = ("store", str(exc))
        except Exception as exc:
            logger.exception("run failed session=%s run=%s", run.session_key, run.run_id)
            failure = ("unknown", f"The run failed unexpectedly: {type(exc).__name__}: {exc}")
        except BaseException as exc:  # Cancelled from outside the run: the runtime is closing
            outer = exc
        run._phase = "committing"
        run._tools_scope.cancel()
        exited_at = trio.current_time()
        reason = run._abort_reason
        if reason is None and outer is not None:
            reason = "shutdown"
        elif reason is None and run._scope.cancelled_caught:
            reason = "timeout"
        if reason is not None:
            logger.info(
                "scope exited, provider stream closed session=%s run=%s reason=%s ms=%.2f",
                run.session_key,
                run.run_id,
                reason,
                _ms(exited_at, run._abort_at or exited_at),
            )
        # One bound for the whole stop, from the scope's exit to the terminal event: the
        # tools' clean-up gets half of it, the store write the rest (SQLiteStore interrupts
        # a statement at the deadline, so the bound holds while the database is locked).
        with trio.move_on_after(self.commit_timeout, shield=True):
            if run._tools_done is not None:
                with trio.move_on_after(self.commit_timeout / 2):
                    await run._tools_done.wait()
            plan = self._plan(run, reason, failure, finish_reason, exited_at)
            await self._commit(run, plan)
        if run._terminal is None:  # the commit ran out of time: it may yet have landed
            why = f"The run's result could not be saved within {self.commit_timeout} s."
            self._unsaved(run, plan, why)
        del self._runs[run.run_id]
        # Owned until its end is written: a failed commit keeps its claim (and so its id
        # and session) until _settle lands it, or another process could start the same id
        # again, finding neither a record nor an owner. Found by the two-gateway schedules.
        if run.run_id not in self._unsettled:
            self.abort_bus.released(run.run_id)
        chain = self._sessions[run.session_key]
        chain.remove(run)
        if not chain:
            del self._sessions[run.session_key]
        run._phase = "done"
        run._done.set()
        if outer is not None:
            raise outer

    async def _execute(self, run: Run) -> str:
        """The agent loop. Returns why the run finished."""
        prompt = Message("user", (TextBlock(run.prompt),), time.time(), {"run_id": run.run_id})
        record = RunRecord(
            run_id=run.run_id,
            session_key=run.session_key,
            status="running",
            started_at=run._started_at,
        )
        run._begun = True
        with _store_call("save the prompt"):
            async with _one_at_a_time(self._order, run.session_key):
                await self.store.begin_run(record, prompt)
        run._prompt_stored = True
        with _store_call("read the session's history"):
            stored = await self.store.history(run.session_key, limit=MAX_HISTORY_READ)
        history = fit_context(stored, self.context_budget)
        self._publish(run, RunStarted, prompt=run.prompt)
        state = run._state
        tools = [tool.spec for tool in self.tools]
        while True:
            if state.turns >= self.max_turns:
                return "max_turns"
            request = ModelRequest(
                (*history, *state.items),
                tools,
                self.system,
                run.thinking,
            )
            async with self.model.stream(request) as model_events:
                async for model_event in model_events:
                    # No await in this body: a cancel lands on the stream's own read.
                    state.apply(model_event)
                    if isinstance(model_event, TextChunk) and model_event.text:
                        self._publish(run, TextDelta, text=model_event.text)
                    elif isinstance(model_event, ThinkingChunk) and model_event.text:
                        self._publish(run, ThinkingDelta, text=model_event.text)
            calls = state.end_turn()
            if not calls:
                return state.turn_stop_reason or "end_turn"
            budget = self.max_tool_calls - state.tool_calls
            for call in calls[max(budget, 0) :]:
                call.result, call.is_error = BUDGET_RESULT, True
            await self._run_tools(run, calls[: max(budget, 0)])
            state.end_tool_round()
            if budget < len(calls):
                return "max_tool_calls"

    async def _run_tools(self, run: Run, calls: Sequence[PendingCall]) -> None:
        """Run one turn's tool calls at once and wait for all of them.

        The tasks live in the runtime's nursery under the run's tools scope, not in the
        run's own scope: a stop cancels them too, but the run leaves its scope at once,
        and a tool that ignores cancellation (a shielded clean-up, a process that will
        not die) holds the stop commit for at most half of ``commit_timeout``. A result
        that arrives after the stop began is dropped (see ``_run_tool``).
        """
        assert self._nursery is not None
        run._tools_scope = trio.CancelScope()  # a scope is entered once: one per round
        run._tools_done = done = trio.Event()
        self._nursery.start_soon(self._tool_round, run, calls, done, name=f"tools {run.run_id}")
        await done.wait()

    async def _tool_round(self, run: Run, calls: Sequence[PendingCall], done: trio.Event) -> None:
        try:
            with run._tools_scope:
                async with trio.open_nursery() as nursery:
                    for call in calls:
                        nursery.start_soon(self._run_tool, run, call)
        finally:
            done.set()

    async def _run_tool(self, run: Run, call: PendingCall) -> None:
        assert call.arguments is not None
        run._state.tool_calls += 1
        call.state = "running"
        self._publish(
            run, ToolCallStarted, tool_call_id=call.id, name=call.name, arguments=call.arguments
        )

        def progress(progress: float, total: float | None, message: str | None) -> None:
            self._publish(
                run,
                ToolCallProgress,
                tool_call_id=call.id,
                name=call.name,
                progress=progress,
                total=total,
                message=message,
            )

        content, is_error = await call_tool(self._tools_by_name.get(call.name), call, progress)
        if run._phase != "running":  # the stop began while it ran: it counts as cancelled
            logger.warning(
                "tool result after the stop dropped session=%s run=%s tool=%s",
                run.session_key,
                run.run_id,
                call.name,
            )
            return
        call.result, call.is_error, call.state = content, is_error, "done"
        run._state.version += 1
        self._publish(
            run,
            ToolCallFinished,
            tool_call_id=call.id,
            name=call.name,
            is_error=is_error,
            result=content,
        )

    async def _checkpoint_loop(self) -> None:
        """Every ``checkpoint_interval``, save what each running run added since its last
        save, in one store call, so a crash loses at most that much of the streamed text.
        One task for all runs: a timer per run would cost thousands of wake-ups a second.
        Fragments are encoded in a thread, so a large tool result does not hold the loop.
        A failed save (a locked or full database) is logged and its fragments are sent
        again next time, as are final commits that failed (see ``_settle``): it must not
        end this task, whose failure would take the runtime and its runs down."""
        with self._checkpointer:
            while True:
                await trio.sleep(self.checkpoint_interval)
                for plan in list(self._unsettled.values()):
                    with _logged("saving a run that could not be saved before"):
                        await self._settle(plan)
                pending = {}
                for run in self._runs.values():
                    state = run._state
                    if run._prompt_stored and run.phase == "running":
                        if state.version != run._checkpointed:
                            pending[run.run_id] = (run, state.version, *state.checkpoint_fragment())
                if not pending:
                    continue
                with _logged("checkpoint failed, to be retried"):
                    encoded = await trio.to_thread.run_sync(
                        _encode_all, {k: v[2] for k, v in pending.items()}, limiter=self._encoder
                    )
                    await self.store.checkpoint_runs(encoded)
                    for run, version, _, marks in pending.values():
                        run._checkpointed = version
                        run._state.fragment_saved(marks)

    # -- the commits: shielded by the caller, each ends in exactly one terminal event --

    def _plan(
        self,
        run: Run,
        reason: str | None,
        failure: tuple[FailureKind, str] | None,
        finish_reason: str,
        exited_at: float,
    ) -> _Commit:
        """What a run's end writes, and the terminal event that reports it."""
        if reason is not None:
            return self._stop_plan(run, reason, exited_at)
        if failure is not None:
            items, _ = run._state.close({"error": failure[0]})
            record = run._final_record("failed", "error", error=failure[1])
            failed = {"error_kind": failure[0], "error_message": failure[1]}
            return _Commit(record, self._checked(run, items), False, RunFailed, failed)
        items, _ = run._state.close({})
        record = run._final_record("finished", finish_reason)
        replies = [m for m in items if m.role == "assistant"]
        fields: dict[str, Any] = {
            "stop_reason": finish_reason,
            "message": replies[-1] if replies else None,
            "usage": record.usage,
        }
        return _Commit(record, self._checked(run, items), False, RunFinished, fields)

    def _stop_plan(self, run: Run, reason: str, exited_at: float) -> _Commit:
        abort_at = run._abort_at if run._abort_at is not None else exited_at
        meta = {"aborted": True, "origin": reason, "run_id": run.run_id}
        items, receipt = run._state.close(meta)
        # The prompt is handed back exactly when it is not left in history: under rollback,
        # and whenever begin_run had not returned (its write may or may not have happened,
        # so the rollback by run_id, which is idempotent, removes it in either case).
        handed_back = not run._prompt_stored or run.stop_policy == "rollback"
        if handed_back:
            items = []
        elif self.on_cancelled is not None:
            try:
                changed = self.on_cancelled(run, items, run.context)
            except Exception:
                logger.exception("on_cancelled hook failed; saving the items unchanged")
            else:
                if changed is not None and _valid_after_prompt(run, changed):
                    items = changed
                elif changed is not None:
                    logger.error("on_cancelled returned invalid history; saving it unchanged")
        scope_ms = _ms(exited_at, abort_at)
        record = run._final_record("cancelled", reason, scope_exited_ms=scope_ms)
        kept = [m for m in items if m.role == "assistant" and m.meta.get("aborted")]
        fields: dict[str, Any] = {
            "reason": reason,
            "policy": run.stop_policy,
            "message": kept[-1] if kept else None,
            "receipt": receipt,
            "usage": record.usage,
            "restored_prompt": run.prompt if handed_back else None,
        }
        rollback = handed_back and run._begun
        return _Commit(record, self._checked(run, items), rollback, RunCancelled, fields, abort_at)

    def _checked(self, run: Run, items: list[Message]) -> list[Message]:
        """Invariant 2, checked on every commit: items that would leave the history invalid
        after the run's prompt are not written (logged as the bug they are)."""
        if not items or _valid_after_prompt(run, items):
            return items
        logger.error("a run's items are not valid history; not saved run=%s", run.run_id)
        return []

    async def _commit(self, run: Run, plan: _Commit) -> None:
        """Write the plan and emit its terminal event (see ``_unsaved`` for a failure)."""
        try:
            await self.store.commit_run(plan.record, plan.items, rollback=plan.rollback)
        except Exception as exc:
            logger.exception("commit failed session=%s run=%s", run.session_key, run.run_id)
            self._unsaved(run, plan, f"The run's result could not be saved: {exc}")
        else:
            self._emit_planned(run, plan)

    def _unsaved(self, run: Run, plan: _Commit, why: str) -> None:
        """The write failed or ran out of time: the checkpoint task writes the plan later.

        A plan that hands the prompt back (a rollback, or a run that had not begun) keeps
        nothing in history, so the run ends as planned, its prompt handed back, and the
        rollback by run id is retried. A plan that keeps messages ends the run as failed
        (``store``): its result is not saved yet. Either way the client is told what the
        history will hold, and a prompt is never lost. (One case is left: if the process
        dies before the retry lands, recovery closes a rolled-back run as interrupted
        and keeps its prompt, which the client was handed back.)"""
        self._unsettled[run.run_id] = plan
        if plan.fields.get("restored_prompt") is not None:
            self._emit_planned(run, plan)
        else:
            self._emit_terminal(run, RunFailed, error_kind="store", error_message=why)

    def _emit_planned(self, run: Run, plan: _Commit) -> None:
        fields = plan.fields
        if plan.abort_at is not None:  # a stop: its timings and its log line
            committed_ms = _ms(trio.current_time(), plan.abort_at)
            self._stop_latencies.append(committed_ms)
            logger.info(
                "commit done session=%s run=%s reason=%s policy=%s ms=%.2f",
                run.session_key,
                run.run_id,
                fields["reason"],
                run.stop_policy,
                committed_ms,
            )
            timings = StopTimings(plan.record.scope_exited_ms or 0.0, committed_ms)
            fields = {**fields, "timings": timings}
        self._emit_terminal(run, plan.terminal, **fields)

    async def _settle(self, plan: _Commit) -> None:
        """Write a commit that failed before, or a dead process's run, without breaking
        the history: if the session went on meanwhile, its items are set aside in the run
        record instead of being appended after later turns."""
        record, items = plan.record, plan.items
        async with _one_at_a_time(self._order, record.session_key):
            if items and not plan.rollback:
                tail = await self.store.history(record.session_key, limit=1)
                if not tail or tail[-1].meta.get("run_id") != record.run_id:
                    record = attrs.evolve(record, set_aside=tuple(items), error=SET_ASIDE)
                    items = []
            await self.store.commit_run(record, items, rollback=plan.rollback)
        if self._unsettled.pop(record.run_id, None) is not None:
            self.abort_bus.released(record.run_id)  # its end is written at last
        logger.info(
            "settled run session=%s run=%s status=%s items=%d set_aside=%d",
            record.session_key,
            record.run_id,
            record.status,
            len(items),
            len(record.set_aside),
        )

    def _emit_terminal(self, run: Run, kind: type[TerminalEvent], **fields: Any) -> None:
        if run._terminal is not None:
            return
        event = kind(run_id=run.run_id, session_key=run.session_key, seq=run._next_seq(), **fields)
        run._terminal = event
        self._bus.publish(event)

    def _publish(self, run: Run, kind: type[Event], **fields: Any) -> None:
        self._bus.publish(
            kind(run_id=run.run_id, session_key=run.session_key, seq=run._next_seq(), **fields)
        )

    async def _recover_interrupted(self) -> None:
        """Close the runs a dead process left as running (those no live process owns)."""
        await self._close_records(await self.abort_bus.orphans(await self.store.running_runs()))

    async def close_interrupted(self, run_ids: Sequence[str]) -> None:
        """Close these runs of a dead process, if still recorded as running (the abort
        bus calls this for a process it found dead; another may have closed them first)."""
        records = [await self.store.get_run(run_id) for run_id in run_ids]
        await self._close_records([r for r in records if r is not None and r.status == "running"])

    async def _close_records(self, records: Sequence[RunRecord]) -> None:
        """Close runs a dead process left as running: each keeps its checkpointed
        partial, marked interrupted, so the session's history is valid again. Each record
        is handled on its own: one that cannot be read (a corrupt checkpoint, an older
        format) is logged and closed as interrupted with nothing kept, and the service
        starts all the same."""
        for record in records:
            meta = {"aborted": True, "origin": "interrupted", "run_id": record.run_id}
            try:
                state = RunState.from_checkpoint(record.run_id, record.checkpoint or "")
                items, _ = state.close(meta)
                prompt = Message("user", (TextBlock("."),), 0.0, {})
                validate_history([prompt, *items])
            except Exception as exc:
                logger.error(
                    "unreadable checkpoint, run closed with nothing kept session=%s run=%s: %s",
                    record.session_key,
                    record.run_id,
                    exc,
                )
                state, items = RunState(record.run_id), []
            final = attrs.evolve(
                record,
                status="interrupted",
                stop_reason="interrupted",
                ended_at=time.time(),
                usage=state.usage(),
                checkpoint=None,
            )
            await self._settle(_Commit(final, items, False, RunCancelled, {}))


@final
@attrs.frozen
class _Commit:
    """What one run's end writes (record and items, rollback or not) and the terminal
    event that reports it; ``abort_at`` is set for a stop, whose timings end at the write."""

    record: RunRecord
    items: list[Message]
    rollback: bool
    terminal: type[TerminalEvent]
    fields: dict[str, Any]
    abort_at: float | None = None


@asynccontextmanager
async def _one_at_a_time(locks: dict[str, trio.Lock], key: str) -> AsyncIterator[None]:
    """Hold ``key``'s lock in ``locks``: made on first use, dropped once free, and taken
    with no scheduler pass when free (the usual case, on every run's way)."""
    lock = locks.setdefault(key, trio.Lock())
    try:
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            yield
        finally:
            lock.release()
    finally:
        if not lock.locked() and not lock.statistics().tasks_waiting and locks.get(key) is lock:
            del locks[key]


SET_ASIDE = (
    "The session went on before this run's result could be saved, so its messages were "
    "set aside in this record rather than added after later turns."
)


def _valid_after_prompt(run: Run, items: Sequence[Message]) -> bool:
    prompt = Message("user", (TextBlock(run.prompt),), 0.0, {"run_id": run.run_id})
    try:
        validate_history([prompt, *items])
    except InvalidHistory:
        return False
    return True


def _encode_all(fragments: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    return {run_id: encode_fragment(fragment) for run_id, fragment in fragments.items()}


@contextmanager
def _logged(what: str) -> Iterator[None]:
    """Log a failure of the background work inside, and go on."""
    try:
        yield
    except Exception as exc:
        logger.warning("%s: %s", what, exc)


class StoreFailed(Exception):
    """A store call of the agent loop failed: the run fails with kind ``store``."""


@contextmanager
def _store_call(what: str) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        raise StoreFailed(f"The run could not {what}: {exc}") from exc


def _check_choice(what: str, value: str | None, choices: Sequence[str]) -> None:
    if value is not None and value not in choices:
        raise InvalidRequest(f"Unknown {what} {value!r}; choose one of {', '.join(choices)}.")


def _ms(later: float, earlier: float) -> float:
    return round((later - earlier) * 1000, 3)


def is_stop_command(message: str) -> bool:
    """Whether a chat message is a stop command (``/stop``, ``stop``) rather than a prompt."""
    return message.strip().lower() in STOP_COMMANDS
