"""The runtime: admits runs, drives the agent loop, and stops runs at any await.

Each run lives in the runtime's nursery under its own ``CancelScope``, registered under
its ``run_id`` before the run's first checkpoint. ``abort`` is synchronous: it records
why and cancels the scope, so the next checkpoint (a socket read waiting for the
provider's next byte, a tool's sleep, a queue wait) raises ``Cancelled`` at once. The run
then leaves its scope and runs one shielded, bounded stop commit that writes what it
produced and emits its one terminal event. Nothing else needs to know how it stopped.
"""

from __future__ import annotations

import json
import logging
import statistics as stats
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, Literal, final

import attrs
import trio

from ._bus import DEFAULT_CAPACITY, EventBus, Subscription
from ._errors import InvalidRequest, RunExists, RunSessionMismatch, SessionBusy
from ._events import (
    CONCURRENCY_POLICIES,
    STOP_POLICIES,
    ConcurrencyPolicy,
    Event,
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
    converter,
)
from ._history import Message, TextBlock
from ._model import ErrorKind, Model, ModelError, ModelRequest, TextChunk, ThinkingChunk
from ._state import BUDGET_RESULT, PendingCall, RunState
from ._store import MemoryStore, RunRecord, RunStatus, Store
from ._tools import Tool, call_tool

logger = logging.getLogger("runtime")

Phase = Literal["queued", "running", "committing", "done"]
StopHook = Callable[["Run", list[Message], Any], "list[Message] | None"]

STOP_COMMANDS = frozenset({"/stop", "stop"})


@final
@attrs.frozen
class AbortResult:
    aborted: bool
    run_ids: tuple[str, ...]


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
    _prompt_stored: bool = attrs.field(default=False, init=False)
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
    def terminal_event(self) -> TerminalEvent | None:
        return self._terminal

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
    ``run_timeout`` seconds (None: no limit). ``commit_timeout`` bounds the shielded
    stop commit. ``checkpoint_interval`` bounds how much streamed text a crash can lose.
    """

    model: Model
    store: Store = attrs.field(factory=MemoryStore)
    tools: Sequence[Tool] = ()
    system: str | None = None
    thinking: bool = False
    max_turns: int = 16
    max_tool_calls: int = 64
    run_timeout: float | None = None
    commit_timeout: float = 5.0
    checkpoint_interval: float = 0.25
    subscriber_capacity: int = DEFAULT_CAPACITY
    on_cancelled: StopHook | None = None
    recover: bool = True
    _tools_by_name: dict[str, Tool] = attrs.field(init=False)
    _runs: dict[str, Run] = attrs.field(factory=dict, init=False)
    _sessions: dict[str, list[Run]] = attrs.field(factory=dict, init=False)
    _admitting: dict[str, trio.Event] = attrs.field(factory=dict, init=False)  # in start_run
    _bus: EventBus = attrs.field(factory=EventBus, init=False)
    _exit_stack: AsyncExitStack | None = attrs.field(default=None, init=False)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)
    _aborts: int = attrs.field(default=0, init=False)
    _checkpointer: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)
    _stop_latencies: deque[float] = attrs.field(factory=lambda: deque(maxlen=1000), init=False)

    def __attrs_post_init__(self) -> None:
        self._tools_by_name = {tool.name: tool for tool in self.tools}
        if len(self._tools_by_name) != len(self.tools):
            raise InvalidRequest("Two tools share a name; tool names must be unique.")

    async def __aenter__(self) -> Runtime:
        async with AsyncExitStack() as stack:
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
        self._checkpointer.cancel()  # the runs' commits save their state from here
        for run in list(self._runs.values()):
            self._abort_run(run, "shutdown", None)
        assert self._exit_stack is not None
        try:
            return await self._exit_stack.__aexit__(exc_type, exc, tb)
        finally:
            self._exit_stack = self._nursery = None

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
        self._admitting[run_id] = trio.Event()
        try:
            if await self.store.get_run(run_id) is not None:
                raise RunExists(run_id, live=False)
            settings = await self.store.get_settings(session_key)
        finally:
            self._admitting.pop(run_id).set()
        # From here to the end: no await, so admission and registration are atomic.
        chain = self._sessions.setdefault(session_key, [])
        policy = concurrency or settings.concurrency
        if chain and policy == "reject":
            raise SessionBusy(session_key, chain[0].run_id)
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
        if chain and policy in ("interrupt", "rollback"):
            live = chain[0]
            self._abort_run(
                live, "interrupted", "rollback" if policy == "rollback" else "keep_partial"
            )
        self._runs[run_id] = run
        chain.append(run)
        if run._ahead:
            self._publish(run, RunQueued, prompt=message, behind=run._ahead[-1].run_id)
        self._nursery.start_soon(self._drive, run, name=f"run {run_id}")
        return run

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
        """
        _check_choice("stop policy", stop_policy, STOP_POLICIES)
        if run_id is not None:
            run = self._runs.get(run_id)
            if run is None:
                return AbortResult(False, ())
            if session_key is not None and run.session_key != session_key:
                raise RunSessionMismatch(run_id, session_key)
            runs = [run]
        elif session_key is not None:
            runs = list(self._sessions.get(session_key, ()))
        else:
            raise InvalidRequest("Name a run id or a session key to abort.")
        aborted = tuple(r.run_id for r in runs if self._abort_run(r, reason, stop_policy))
        return AbortResult(bool(aborted), aborted)

    def subscribe(self, session_key: str | None = None) -> Subscription:
        """Events of one session (or all when None): ``with rt.subscribe(key) as events:``
        then ``async for event in events``. See ``_bus`` for the overflow rule."""
        return self._bus.subscribe(session_key, self.subscriber_capacity)

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
        failure: tuple[ErrorKind, str] | None = None
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
        except Exception as exc:
            logger.exception("run failed session=%s run=%s", run.session_key, run.run_id)
            failure = ("unknown", f"The run failed unexpectedly: {type(exc).__name__}: {exc}")
        except BaseException as exc:  # Cancelled from outside the run: the runtime is closing
            outer = exc
        run._phase = "committing"
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
        with trio.move_on_after(self.commit_timeout, shield=True):
            try:
                if reason is not None:
                    await self._commit_stop(run, reason, exited_at)
                elif failure is not None:
                    await self._commit_failure(run, *failure)
                else:
                    await self._commit_finish(run, finish_reason)
            except Exception as exc:
                logger.exception("commit failed session=%s run=%s", run.session_key, run.run_id)
                run._terminal = None
                self._emit_terminal(
                    run,
                    RunFailed,
                    error_kind="store",
                    error_message=(
                        f"The run's result could not be saved: {type(exc).__name__}: {exc}"
                    ),
                )
        if run._terminal is None:  # the commit ran out of time
            self._emit_terminal(
                run,
                RunFailed,
                error_kind="store",
                error_message=(
                    f"The run's result could not be saved within {self.commit_timeout} s."
                ),
            )
        del self._runs[run.run_id]
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
        await self.store.begin_run(record, prompt)
        run._prompt_stored = True
        history = await self.store.history(run.session_key)
        self._publish(run, RunStarted, prompt=run.prompt)
        self._publish(run, StreamOptions, allow_cancel=run.allow_cancel)
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
            async with trio.open_nursery() as nursery:
                for call in calls[: max(budget, 0)]:
                    nursery.start_soon(self._run_tool, run, call)
            state.end_tool_round()
            if budget < len(calls):
                return "max_tool_calls"

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
        """Every ``checkpoint_interval``, save the state of each running run that changed,
        in one store call, so a crash loses at most that much of the streamed text. One
        task for all runs: a timer per run would cost thousands of wake-ups a second.
        A failed save (a locked or full database) is logged and tried again next time: it
        must not end this task, whose failure would take the runtime and its runs down."""
        with self._checkpointer:
            while True:
                await trio.sleep(self.checkpoint_interval)
                snapshots = {}
                for run in self._runs.values():
                    if run._prompt_stored and run._state.version != run._checkpointed:
                        if run.phase == "running":
                            run._checkpointed = run._state.version
                            snapshots[run.run_id] = json.dumps(converter.unstructure(run._state))
                if snapshots:
                    try:
                        await self.store.checkpoint_runs(snapshots)
                    except Exception as exc:
                        logger.warning("checkpoint failed, to be retried: %s", exc)
                        for run_id in snapshots:
                            if (unsaved := self._runs.get(run_id)) is not None:
                                unsaved._checkpointed = -1

    # -- the commits: shielded by the caller, each ends in exactly one terminal event --

    async def _commit_stop(self, run: Run, reason: str, exited_at: float) -> None:
        abort_at = run._abort_at if run._abort_at is not None else exited_at
        meta = {"aborted": True, "origin": reason, "run_id": run.run_id}
        items, receipt = run._state.close(meta)
        restored = None
        rollback = run._prompt_stored and run.stop_policy == "rollback"
        if rollback or not run._prompt_stored:
            items, restored = [], run.prompt
        if self.on_cancelled is not None:
            try:
                changed = self.on_cancelled(run, items, run.context)
            except Exception:
                logger.exception("on_cancelled hook failed; saving the items unchanged")
            else:
                items = items if changed is None else changed
        scope_ms = _ms(exited_at, abort_at)
        record = run._final_record("cancelled", reason, scope_exited_ms=scope_ms)
        await self.store.commit_run(record, items, rollback=rollback)
        committed_ms = _ms(trio.current_time(), abort_at)
        self._stop_latencies.append(committed_ms)
        logger.info(
            "commit done session=%s run=%s reason=%s policy=%s ms=%.2f",
            run.session_key,
            run.run_id,
            reason,
            run.stop_policy,
            committed_ms,
        )
        kept = [m for m in items if m.role == "assistant" and m.meta.get("aborted")]
        self._emit_terminal(
            run,
            RunCancelled,
            reason=reason,
            policy=run.stop_policy,
            message=kept[-1] if kept else None,
            receipt=receipt,
            usage=record.usage,
            timings=StopTimings(scope_ms, committed_ms),
            restored_prompt=restored,
        )

    async def _commit_failure(self, run: Run, kind: ErrorKind, message: str) -> None:
        items, _ = run._state.close({"error": kind})
        record = run._final_record("failed", "error", error=message)
        await self.store.commit_run(record, items, rollback=False)
        self._emit_terminal(run, RunFailed, error_kind=kind, error_message=message)

    async def _commit_finish(self, run: Run, stop_reason: str) -> None:
        items, _ = run._state.close({})
        record = run._final_record("finished", stop_reason)
        await self.store.commit_run(record, items, rollback=False)
        replies = [m for m in items if m.role == "assistant"]
        self._emit_terminal(
            run,
            RunFinished,
            stop_reason=stop_reason,
            message=replies[-1] if replies else None,
            usage=record.usage,
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
        """Close the runs a dead process left as running: each keeps its checkpointed
        partial, marked interrupted, so the session's history is valid again."""
        for record in await self.store.running_runs():
            state = RunState(record.run_id)
            if record.checkpoint:
                state = converter.structure(json.loads(record.checkpoint), RunState)
            items, _ = state.close(
                {"aborted": True, "origin": "interrupted", "run_id": record.run_id}
            )
            final = attrs.evolve(
                record,
                status="interrupted",
                stop_reason="interrupted",
                ended_at=time.time(),
                usage=state.usage(),
                checkpoint=None,
            )
            await self.store.commit_run(final, items, rollback=False)
            logger.info(
                "recovered interrupted run session=%s run=%s items=%d",
                record.session_key,
                record.run_id,
                len(items),
            )


def _check_choice(what: str, value: str | None, choices: Sequence[str]) -> None:
    if value is not None and value not in choices:
        raise InvalidRequest(f"Unknown {what} {value!r}; choose one of {', '.join(choices)}.")


def _ms(later: float, earlier: float) -> float:
    return round((later - earlier) * 1000, 3)


def is_stop_command(message: str) -> bool:
    """Whether a chat message is a stop command (``/stop``, ``stop``) rather than a prompt."""
    return message.strip().lower() in STOP_COMMANDS
