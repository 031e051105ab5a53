"""One long-lived stack for property tests: sim + OpenAI-compatible adapter + SQLite file +
Runtime with two tools + Gateway, served by its own ``trio.run`` in a thread. Or several
gateways, each a ``Node`` with its own runtime, model client and store connection, sharing
one PostgreSQL database and one Redis bus as separate gateway processes do (in one loop:
sockets between them are real, and starting processes would cost more than the examples).

Why a thread: hypothesis runs each example in a fresh ``trio.run``, and starting a sim,
a store and a gateway per example would cost more than the example itself. Examples talk
to the gateway over real sockets; ``ScheduleServer.call`` runs an inspection inside the
server's loop (``trio.from_thread``), so what it reads is a consistent snapshot.

What the server records beside the runtime, for the invariants: every runtime event per
run (one subscriber on all sessions), which tools of which run are running, how many model
streams are open, and for each terminal event whether the run still had a tool running
or a model stream open when a subscriber received it.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import (
    AbstractAsyncContextManager,
    AsyncExitStack,
    asynccontextmanager,
    contextmanager,
)
from pathlib import Path
from typing import Any, TypeVar

import attrs
import trio

from adapters.gateway import Gateway
from adapters.openai_compat import open_openai_compat
from adapters.sim import SimServer, serve_sim
from adapters.stores import open_store
from runtime import (
    AbortBus,
    Event,
    LocalAbortBus,
    Model,
    ModelEvent,
    ModelRequest,
    Runtime,
    Store,
    Tool,
    is_terminal,
)

T = TypeVar("T")

FAST_TOOL_SECONDS = 0.003
SLOW_TOOL_SECONDS = 0.06
HUNG_TOOL_SECONDS = 0.5  # a blocking call that ignores a stop (its thread is abandoned)
# Lag bounds, tighter than the gateway's defaults so that a stalled client is closed within
# an example, yet loose enough that a reading client on a busy 2-core machine never is
# (1 s closed one once, in a --long run with the machine's load average at 4).
STALL_BYTES, STALL_SECONDS = 64 * 1024, 5.0
# Runtime._drive's task is named "run <run_id>", a tool round's "tools <run_id>"
RUN_TASK_PREFIXES = ("run ", "tools ")


def _run_id_of_current_task() -> str:
    """The run a tool or a model stream belongs to: the nearest run or tools task."""
    task: trio.lowlevel.Task | None = trio.lowlevel.current_task()
    while task is not None:
        if task.name.startswith(RUN_TASK_PREFIXES):
            return task.name.split(" ", 1)[1]
        nursery = task.parent_nursery
        task = nursery.parent_task if nursery is not None else None
    raise AssertionError("a tool or a model stream ran outside any run's task")


@attrs.define(eq=False)
class Tracker:
    """Tools and model streams per run: how many are open right now."""

    tools: Counter[str] = attrs.Factory(Counter)
    streams: Counter[str] = attrs.Factory(Counter)

    def tool(self, name: str, seconds: float, *, blocking: bool = False) -> Tool:
        """A tool that sleeps ``seconds``: in Trio, or (``blocking``) in a thread that a
        stop abandons, as a call to a hung service would."""
        in_thread = Tool.from_sync(name, lambda arguments: time.sleep(seconds)).fn

        async def run(arguments: Mapping[str, Any]) -> str:
            run_id = _run_id_of_current_task()
            self.tools[run_id] += 1
            try:
                if blocking:
                    await in_thread(arguments)
                else:
                    await trio.sleep(seconds)
            finally:
                self.tools[run_id] -= 1
            return f"{name} done: {arguments.get('text', '')}"

        return Tool(name, run, f"Sleeps {seconds} s.", {"type": "object"})


@attrs.define(eq=False)
class FlakyStore:
    """The store, except that the first commit of each run in ``fail_once`` fails, as a
    disk hiccup would: the runtime reports it and saves it later."""

    inner: Store
    fail_once: set[str] = attrs.Factory(set)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def commit_run(self, record: Any, items: Any, *, rollback: bool) -> None:
        if record.run_id in self.fail_once:
            self.fail_once.discard(record.run_id)
            raise OSError("a disk hiccup (injected)")
        await self.inner.commit_run(record, items, rollback=rollback)


@attrs.define(eq=False)
class CountingModel:
    """The Model port around a real adapter, counting each run's open streams."""

    inner: Model
    tracker: Tracker
    cut: int = 0  # streams left on an exception: a stop, a refusal, a malformed response

    @property
    def open_streams(self) -> int:  # read by tests.helpers.check_settled
        return sum(self.tracker.streams.values())

    @asynccontextmanager
    async def stream(self, request: ModelRequest) -> AsyncIterator[AsyncIterator[ModelEvent]]:
        run_id = _run_id_of_current_task()
        self.tracker.streams[run_id] += 1
        try:
            async with self.inner.stream(request) as events:
                yield events
        except BaseException:
            self.cut += 1
            raise
        finally:
            self.tracker.streams[run_id] -= 1


@attrs.frozen
class Terminal:
    """A terminal event, and what of its run was still open when a subscriber got it."""

    event: Event
    tools_running: int
    streams_open: int


@attrs.define(eq=False)
class Node:
    """One gateway process: its runtime, gateway, model client and store, and what it
    recorded (its own runs' events, and those relayed from the other nodes)."""

    port: int
    runtime: Runtime
    gateway: Gateway
    model: CountingModel
    tracker: Tracker
    store: FlakyStore
    idle_subscribers: int  # subscribed with no client connected: the recorder, the relay
    events: defaultdict[str, list[Event]] = attrs.Factory(lambda: defaultdict(list))
    terminals: dict[str, Terminal] = attrs.Factory(dict)

    async def _record(self, scope: trio.CancelScope, task_status: trio.TaskStatus) -> None:
        with scope, self.runtime.subscribe() as subscription:
            task_status.started()
            async for event in subscription:
                self.events[event.run_id].append(event)
                if is_terminal(event):
                    run_id = event.run_id
                    self.terminals[run_id] = Terminal(
                        event, self.tracker.tools[run_id], self.tracker.streams[run_id]
                    )


@attrs.define(eq=False)
class ScheduleServer:
    nodes: list[Node]
    sim: SimServer
    token: trio.lowlevel.TrioToken
    _stop: trio.Event = attrs.Factory(trio.Event)

    @property
    def port(self) -> int:
        """The first (or only) gateway's port."""
        return self.nodes[0].port

    @property
    def runtime(self) -> Runtime:
        """The first (or only) gateway's runtime."""
        return self.nodes[0].runtime

    def call(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``afn(*args)`` in the server's loop and return its result (blocking)."""
        return trio.from_thread.run(afn, *args, trio_token=self.token)

    async def call_from(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``call`` from another Trio loop, without blocking that loop."""
        return await trio.to_thread.run_sync(functools.partial(self.call, afn, *args))

    def run_tasks(self) -> list[str]:
        """Names of the tasks in the server's loop that belong to a run (call inside it)."""
        names = []
        pending = [trio.lowlevel.current_root_task()]
        while pending:
            task = pending.pop()
            names.append(task.name)
            for nursery in task.child_nurseries:
                pending.extend(nursery.child_tasks)
        return [n for n in names if n.startswith(RUN_TASK_PREFIXES) or "_run_tool" in n]


async def _serve(
    db: Path | str,
    gateways: int,
    bus: Callable[[], AbortBus],
    ready: queue.Queue[ScheduleServer | BaseException],
) -> None:
    async with trio.open_nursery() as nursery:
        sim = await nursery.start(serve_sim)
        async with AsyncExitStack() as stack:
            nodes = [
                await stack.enter_async_context(_node(sim, open_store(db), bus()))
                for _ in range(gateways)
            ]
            server = ScheduleServer(nodes, sim, trio.lowlevel.current_trio_token())
            ready.put(server)
            await server._stop.wait()
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def _node(
    sim: SimServer, opened_store: AbstractAsyncContextManager[Store], bus: AbortBus
) -> AsyncIterator[Node]:
    """One gateway, serving until the context ends."""
    tracker = Tracker()
    tools = [
        tracker.tool("fast", FAST_TOOL_SECONDS),
        tracker.tool("slow", SLOW_TOOL_SECONDS),
        tracker.tool("hung", HUNG_TOOL_SECONDS, blocking=True),
    ]
    # One retry, so a 429 with a short retry_after is retried and a 500 fails fast.
    async with (
        open_openai_compat(model="sim", base_url=sim.base_url + "/v1", max_retries=1) as inner,
        opened_store as opened,
    ):
        model = CountingModel(inner, tracker)
        store = FlakyStore(opened)
        runtime = Runtime(model=model, store=store, tools=tools, abort_bus=bus)  # type: ignore[arg-type]
        async with runtime:
            gateway = Gateway(runtime)
            # tight lag bounds, so that a stalled client is closed within an example
            gateway.max_buffered_bytes, gateway.send_timeout = STALL_BYTES, STALL_SECONDS
            recording = trio.CancelScope()

            async def serve(task_status: trio.TaskStatus[int]) -> None:
                await gateway.serve("127.0.0.1", 0, task_status=task_status)
                recording.cancel()  # the gateway has flushed its last events

            async with trio.open_nursery() as serving:
                port = await serving.start(serve)
                relaying = getattr(bus, "relay_events", False)  # its own subscriber
                node = Node(port, runtime, gateway, model, tracker, store, 1 + relaying)
                await serving.start(node._record, recording)
                yield node
                gateway.shutdown()


@contextmanager
def schedule_server(
    db: Path | str, *, gateways: int = 1, bus: Callable[[], AbortBus] = LocalAbortBus
) -> Iterator[ScheduleServer]:
    """Start the stack in a thread; stop it (and join the thread) on exit. ``db`` is a
    SQLite file or a PostgreSQL URL (``adapters.stores.open_store``); each of the
    ``gateways`` opens its own store on it and gets its own ``bus()``."""
    ready: queue.Queue[ScheduleServer | BaseException] = queue.Queue()
    failure: list[BaseException] = []

    def main() -> None:
        try:
            trio.run(_serve, db, gateways, bus, ready)
        except BaseException as exc:  # reported to the test thread below
            failure.append(exc)
            ready.put(exc)

    thread = threading.Thread(target=main, name="schedule-server", daemon=True)
    thread.start()
    started = ready.get(timeout=60)
    if isinstance(started, BaseException):
        raise started
    try:
        yield started
    finally:
        trio.from_thread.run_sync(started._stop.set, trio_token=started.token)
        thread.join(timeout=30)
        assert not thread.is_alive(), "the schedule server did not stop"
        if failure:
            raise failure[0]
