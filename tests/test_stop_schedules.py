"""Property test: random stop schedules through the real gateway, sim and SQLite file.

Hypothesis draws a schedule: the provider's script for each message (``#sim`` lines:
text of some length and rate, silent pauses, thinking, calls to a fast and a slow tool
and to a blocking one that ignores a stop, over several turns, HTTP and mid-stream
errors), a run's final commit failing once (the runtime saves it later), the session's
stop and concurrency policies, one or two connections (and sometimes one more that
handshakes and then never reads, which must slow and break nothing; with the lag bounds
made tight, the gateway closes it if it falls behind), and steps of client actions fired
at a delay or upon an event of an earlier run (a send, a resend of the same idempotency
key, an abort of a run or of the session by ``chat.abort``, ``sessions.abort`` or
``/stop``). The ops of one step go out back to back, so two aborts race, an abort races
the run's completion, and a send races the abort before it. After each example the six
invariants of ARCHITECTURE.md are checked against the SQLite store, the runtime's events
and every frame each connection received.

The same schedules run across two gateways sharing one PostgreSQL database and one Redis
bus (issue 14): each connection is attached to gateway A or B, so a send, a resend of its
key or a stop may reach the gateway that does not hold the run. There a send may be
refused because the session's runs live on the other gateway, a run's events reach B's
clients relayed through Redis, and an abort by id of a run no gateway holds yet leaves a
tombstone that stops it as it starts; everything else is checked as for one gateway.

Cost: about 300 examples in about a minute on two cores, and 150 across two gateways in
about 40 s (``--long``: 10,000 each, before a release). Every example is bounded by
``IO_BOUND``; no timing is asserted.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Literal

import attrs
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.redis_bus import RedisAbortBus
from runtime import (
    MemoryStore,
    Message,
    ModelEvent,
    ModelRequest,
    RunCancelled,
    RunExists,
    RunFailed,
    RunFinished,
    RunRecord,
    Runtime,
    ScriptedModel,
    TerminalEvent,
    ThinkingDelta,
    ToolCallFinished,
    ToolCallStarted,
    text_turn,
    tool_turn,
    validate_history,
)
from tests.conftest import IO_BOUND
from tests.gateway_client import Client, Frame, open_client, open_raw
from tests.helpers import (
    check_abort_claims,
    check_kept_text,
    check_prompt_once,
    check_receipt,
    check_run_events,
    check_settled,
    delivered_text,
    is_unsaved,
)
from tests.schedule_server import ScheduleServer, schedule_server
from tests.services import Postgres, postgres_fixture, redis_server  # noqa: F401 (fixture)

EXAMPLES = 300
TWO_GATEWAY_EXAMPLES = 150  # each costs more: PostgreSQL commits, Redis round trips
LONG_EXAMPLES = 10_000
MAX_SENDS = 4

# -- the schedule ---------------------------------------------------------------------

AbortHow = Literal["chat.abort", "sessions.abort", "sessions.abort+queued", "/stop"]
UponEvent = Literal["start", "delta", "thinking", "tool", "end"]


@attrs.frozen
class Send:
    message: int  # index into Schedule.scripts
    conn: int
    queue_mode: str | None = None
    thinking: bool = False
    timeout_ms: int | None = None
    commit_fails: bool = False  # the run's first commit fails, as on a disk hiccup


@attrs.frozen
class Resend:
    """An earlier Send again, with its idempotency key: it must never start a second run."""

    send: int
    conn: int


@attrs.frozen
class Abort:
    conn: int
    how: AbortHow
    target: int | None  # a Send's index (its run id), or None: the whole session


@attrs.frozen
class Upon:
    """Wait, on connection 0, for an event of a Send's run (or for its end, if sooner)."""

    send: int
    event: UponEvent
    nth: int = 0  # for "delta": the delta with this chat seq


Op = Send | Resend | Abort


@attrs.frozen
class Step:
    when: float | Upon  # seconds after the previous step's replies, or an event
    ops: tuple[Op, ...]  # sent back to back, replies awaited after all went out


@attrs.frozen
class Schedule:
    scripts: tuple[str, ...]
    stop_policy: str
    concurrency: str
    connections: int
    steps: tuple[Step, ...]
    stalled: bool = False  # one more connection, that never reads after the handshake
    # the gateway of each connection, then of the stalled one (all 0 with one gateway)
    attached: tuple[int, ...] = (0, 0, 0, 0)


# ``{serial}`` makes each such line unique: the sim counts fail_count per exact line over
# its whole life, and the server outlives the example.
FAILS = ("",) * 6 + (
    "fail=429 retry_after=0.02",
    "fail=429 fail_count=1 retry_after=0.02{serial}",
    "fail=500",
    "fail=reset",
    "fail=garbage",
    "fail=error_event",
)
DELAYS = (0.0, 0.001, 0.005, 0.02, 0.06)
ABORTS: tuple[AbortHow, ...] = (
    "chat.abort",
    "chat.abort",
    "sessions.abort",
    "sessions.abort+queued",
    "/stop",
)


@st.composite
def scripts(draw: st.DrawFn) -> str:
    """One message's ``#sim`` line."""
    keys = []
    tool = draw(st.sampled_from((None, None, None, "fast", "slow", "slow", "hung", "missing")))
    if tool is not None:
        keys.append(f"tool={tool}")
        if (repeat := draw(st.integers(1, 3))) > 1:
            keys.append(f"repeat={repeat}")
    words = draw(st.integers(0, 20))
    keys += [f"words={words}", f"rate={draw(st.sampled_from((5000, 2000, 600)))}"]
    if draw(st.booleans()):
        keys.append(f"think={draw(st.sampled_from((0.005, 0.02, 0.06)))}")
    if words and draw(st.booleans()):
        pause = draw(st.sampled_from((0.005, 0.02, 0.06)))
        keys.append(f"pause_at={draw(st.integers(0, words))}:{pause}")
    keys.append(draw(st.sampled_from(FAILS)))
    return " ".join(["#sim", *keys]).strip()


@st.composite
def schedules(draw: st.DrawFn, gateways: int = 1) -> Schedule:
    """With several gateways, two or three connections, each attached to one of them."""
    script_count = draw(st.integers(1, 3))
    connections = draw(st.integers(1, 2) if gateways == 1 else st.integers(2, 3))
    conn = st.integers(0, connections - 1)
    sends: list[Send] = []
    steps = []
    for index in range(draw(st.integers(1, 5))):
        when: float | Upon = 0.0
        if index and sends and draw(st.booleans()):
            event = draw(st.sampled_from(("delta", "start", "thinking", "tool", "end")))
            when = Upon(draw(st.integers(0, len(sends) - 1)), event, draw(st.integers(0, 12)))
        elif index:
            when = draw(st.sampled_from(DELAYS))
        ops: list[Op] = []
        for position in range(draw(st.integers(1, 3))):
            kinds = ["abort"]
            if len(sends) < MAX_SENDS:
                kinds.insert(0, "send")
            if sends:
                kinds.append("resend")
            kind = "send" if index == position == 0 else draw(st.sampled_from(kinds))
            if kind == "send":
                send = Send(
                    draw(st.integers(0, script_count - 1)),
                    draw(conn),
                    draw(st.sampled_from((None, None, "followup", "interrupt"))),
                    draw(st.booleans()),
                    draw(st.sampled_from((None, None, None, None, 20, 80))),
                    draw(st.integers(0, 7)) == 0,
                )
                sends.append(send)
                ops.append(send)
            elif kind == "resend":
                ops.append(Resend(draw(st.integers(0, len(sends) - 1)), draw(conn)))
            else:
                how = draw(st.sampled_from(ABORTS))
                target = None
                if how != "/stop" and draw(st.integers(0, 3)):
                    target = draw(st.integers(0, len(sends) - 1))
                ops.append(Abort(draw(conn), how, target))
        steps.append(Step(when, tuple(ops)))
    return Schedule(
        tuple(draw(scripts()) for _ in range(script_count)),
        draw(st.sampled_from(("keep_partial", "rollback"))),
        draw(st.sampled_from(("enqueue", "interrupt", "rollback", "reject"))),
        connections,
        tuple(steps),
        draw(st.integers(0, 3)) == 0,
        # Connection i on gateway i (mod their number) unless drawn otherwise: the simplest
        # schedules cross gateways. Nothing is drawn for one: its fixed examples stay.
        tuple((i + draw(st.integers(0, gateways - 1))) % gateways for i in range(connections + 1))
        if gateways > 1
        else (0,) * (connections + 1),
    )


# -- playing it -----------------------------------------------------------------------

SERIALS = itertools.count()
STOP_REASONS = {"/stop": "stop-command"}  # every other abort op's reason is "rpc"
TERMINAL_STATES = {"final": RunFinished, "aborted": RunCancelled, "error": RunFailed}
RUN_STATUS = {RunFinished: "finished", RunCancelled: "cancelled", RunFailed: "failed"}


@attrs.frozen
class Snapshot:
    """What the server holds once every run of the example has ended."""

    history: list[Message]
    records: dict[str, RunRecord | None]
    events: dict[str, list[Any]]  # run id -> its runtime events
    relayed: dict[str, list[list[Any]]]  # run id -> its events as each other gateway got them
    tools_at_end: dict[str, int]  # run id -> its tools running when its end was seen
    streams_at_end: dict[str, int]  # run id -> its model streams open then
    run_tasks: list[str]
    sim_closed_by: list[str | None]
    streams_cut: int


@attrs.define
class Played:
    session: str
    gateways: int = 1
    prompts: dict[int, str] = attrs.Factory(dict)  # send index -> the message sent
    accepted: dict[str, str] = attrs.Factory(dict)  # run id -> its prompt
    owners: dict[str, int] = attrs.Factory(dict)  # run id -> the gateway that started it
    claims: defaultdict[str, list[str]] = attrs.Factory(lambda: defaultdict(list))
    missed: set[str] = attrs.Factory(set)  # runs an abort named, that said aborted: false
    snapshot: Snapshot | None = None
    received: list[list[Frame]] = attrs.Factory(list)  # per connection


def key(session: str, send: int) -> str:
    return f"{session}-{send}"


async def request(client: Client, method: str, params: dict[str, Any]) -> str:
    """Send a request frame without waiting for its reply; return its id."""
    request_id = f"op-{uuid.uuid4().hex}"
    frame = {"type": "req", "id": request_id, "method": method, "params": params}
    await client.send_raw(json.dumps(frame))
    return request_id


def is_end(frame: Frame, run_id: str) -> bool:
    return (
        frame["event"] == "chat"
        and frame["payload"]["runId"] == run_id
        and frame["payload"]["state"] in TERMINAL_STATES
    )


def upon(event: Upon, run_id: str) -> Any:
    """A predicate for ``event`` of the run, or for the run's end, whichever comes first."""

    def matches(frame: Frame) -> bool:
        payload = frame["payload"]
        if is_end(frame, run_id) or payload.get("runId") != run_id:
            return is_end(frame, run_id)
        stream, phase = payload.get("stream"), payload.get("data", {}).get("phase")
        return {
            "delta": payload.get("state") == "delta" and payload["seq"] >= event.nth,
            "start": stream == "lifecycle" and phase == "start",
            "thinking": stream == "thinking",
            "tool": stream == "tool" and phase == "start",
            "end": False,
        }[event.event]

    return matches


def op_request(schedule: Schedule, played: Played, sends: list[Send], op: Op) -> tuple[str, dict]:
    session = played.session
    if isinstance(op, Send | Resend):
        index = len(sends) if isinstance(op, Send) else op.send
        send = op if isinstance(op, Send) else sends[op.send]
        if isinstance(op, Send):
            line = schedule.scripts[send.message].format(serial=next(SERIALS))
            played.prompts[index] = f"Message {index}.\n{line}"
            sends.append(op)
        params: dict[str, Any] = {
            "sessionKey": session,
            "message": played.prompts[index],
            "idempotencyKey": key(session, index),
        }
        if send.queue_mode is not None:
            params["queueMode"] = send.queue_mode
        if send.thinking:
            params["thinking"] = "on"
        if send.timeout_ms is not None:
            params["timeoutMs"] = send.timeout_ms
        return "chat.send", params
    target = None if op.target is None else key(session, op.target)
    if op.how == "/stop":
        return "chat.send", {
            "sessionKey": session,
            "message": "/stop",
            "idempotencyKey": f"stop-{uuid.uuid4().hex}",
        }
    if op.how == "chat.abort":
        return "chat.abort", {"sessionKey": session} | ({"runId": target} if target else {})
    if target is not None:
        return "sessions.abort", {"runId": target, "key": session}
    return "sessions.abort", {"key": session, "clearQueued": op.how == "sessions.abort+queued"}


def record_reply(
    schedule: Schedule, played: Played, sends: list[Send], op: Op, params: dict, reply: Frame
) -> None:
    """Note what a reply says; the replies' own rules are asserted here."""
    run_id = params.get("idempotencyKey")
    if isinstance(op, Abort):
        assert reply["ok"], reply
        payload = reply["payload"]
        assert payload["aborted"] == bool(payload["runIds"]), payload
        for aborted in payload["runIds"]:
            played.claims[aborted].append(STOP_REASONS.get(op.how, "rpc"))
        if params.get("runId") and not payload["aborted"]:
            played.missed.add(params["runId"])
        return
    if not reply["ok"]:  # refused, retryable: by the reject policy, or because the
        # session's runs live on another gateway (then it started nothing, saved nothing)
        error = reply["error"]
        assert error["code"] == "UNAVAILABLE" and error["retryable"] is True, reply
        assert "could not handle" not in error["message"], reply  # a bug, answered
        send = op if isinstance(op, Send) else sends[op.send]
        rejects = schedule.concurrency == "reject" and send.queue_mode is None
        elsewhere = played.gateways > 1 and "another gateway process" in error["message"]
        assert rejects or elsewhere, reply
        return
    status = reply["payload"]["status"]
    if status == "started":
        assert run_id not in played.accepted, f"the key {run_id} started a second run"
        played.accepted[run_id] = params["message"]
        played.owners[run_id] = schedule.attached[op.conn]
    else:
        assert status in ("in_flight", "ok") and run_id in played.accepted, reply


async def wait_step(clients: list[Client], played: Played, when: float | Upon) -> None:
    if isinstance(when, Upon):
        run_id = key(played.session, when.send)
        if run_id in played.accepted:
            await clients[0].wait_event(upon(when, run_id))
    elif when:
        await trio.sleep(when)


async def play(server: ScheduleServer, schedule: Schedule) -> Played:
    played = Played(session=f"sched-{uuid.uuid4().hex[:10]}", gateways=len(server.nodes))
    sends: list[Send] = []
    ports = [server.nodes[gateway].port for gateway in schedule.attached]
    await server.call_from(_clear_sim, server)
    with trio.fail_after(IO_BOUND):
        async with AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(
                    open_client(ports[index], caps=["tool-events"] if index == 0 else None)
                )
                for index in range(schedule.connections)
            ]
            if schedule.stalled:
                stalled = ports[schedule.connections]
                await stack.enter_async_context(open_raw(stalled, graceful=False))
            await clients[0].ok(
                "runtime.sessions.configure",
                {
                    "sessionKey": played.session,
                    "stopPolicy": schedule.stop_policy,
                    "concurrency": schedule.concurrency,
                },
            )
            for step in schedule.steps:
                await wait_step(clients, played, step.when)
                fired = []
                for op in step.ops:
                    if isinstance(op, Send) and op.commit_fails:
                        run_id = key(played.session, len(sends))
                        await server.call_from(_fail_commit_once, server, run_id)
                    method, params = op_request(schedule, played, sends, op)
                    client = clients[op.conn]
                    fired.append((op, params, client, await request(client, method, params)))
                replies = [
                    (op, params, await client.response(request_id))
                    for op, params, client, request_id in fired
                ]
                # A send and a resend of one key race: whichever started the run, the
                # other may have been answered first that it is in flight.
                replies.sort(
                    key=lambda reply: reply[2].get("payload", {}).get("status") != "started"
                )
                for op, params, reply in replies:
                    record_reply(schedule, played, sends, op, params, reply)
            for client in clients:
                for run_id in played.accepted:
                    await client.wait_event(lambda f, run_id=run_id: is_end(f, run_id))
            # Invariant 6, second half: the same pooled client serves the next run.
            probe = f"{played.session}-probe"
            await clients[0].ok(
                "chat.send",
                {
                    "sessionKey": probe,
                    "message": "Probe.\n#sim words=3 rate=4000",
                    "idempotencyKey": probe,
                },
            )
            await clients[0].wait_chat(probe, "final")
            played.snapshot = await server.call_from(
                _inspect, server, played.session, played.owners
            )
            played.received = [client.received for client in clients]
        # every frame was checked against OpenClaw's schema as the clients closed
        await server.call_from(_wait_unsubscribed, server)
    return played


async def _clear_sim(server: ScheduleServer) -> None:
    server.sim.clear_connections()
    for node in server.nodes:
        node.model.cut = 0


async def _fail_commit_once(server: ScheduleServer, run_id: str) -> None:
    for node in server.nodes:  # whichever gateway starts it
        node.store.fail_once.add(run_id)


async def _inspect(server: ScheduleServer, session: str, owners: dict[str, int]) -> Snapshot:
    """Run in the server's loop once every run has ended; ``owners``: run id -> the node
    that ran it."""
    sim = server.sim
    store = server.runtime.store  # the one database every node uses
    # A run whose commit failed is saved by the runtime's next checkpoint tick. Polled:
    # nothing signals it.
    with trio.fail_after(IO_BOUND):
        for run_id in owners:
            while (record := await store.get_run(run_id)) is None or record.status == "running":  # noqa: ASYNC110
                await trio.sleep(0.01)
        for node in server.nodes:
            node.store.fail_once.clear()
    # Invariant 6, first half: every provider connection the example opened is closed.
    with trio.fail_after(IO_BOUND):
        await sim.wait_closed(count=len(sim.connections()))
    # Invariants 2 and 4: valid history; no run registered, no model stream open.
    for node in server.nodes:
        history = await check_settled(node.runtime, node.model, session)
    # Every node's subscribers get every run's events: its own, or relayed by the bus.
    # Polled: a node no client is attached to may not have them yet.
    with trio.fail_after(IO_BOUND):
        while any(r not in node.terminals for node in server.nodes for r in owners):  # noqa: ASYNC110
            await trio.sleep(0.01)
    owner = {run_id: server.nodes[index] for run_id, index in owners.items()}
    return Snapshot(
        history=history,
        records={run_id: await store.get_run(run_id) for run_id in owners},
        events={r: list(node.events[r]) for r, node in owner.items()},
        relayed={
            r: [list(other.events[r]) for other in server.nodes if other is not node]
            for r, node in owner.items()
        },
        tools_at_end={r: node.terminals[r].tools_running for r, node in owner.items()},
        streams_at_end={r: node.terminals[r].streams_open for r, node in owner.items()},
        run_tasks=server.run_tasks(),
        sim_closed_by=[record.closed_by for record in sim.connections()],
        streams_cut=sum(node.model.cut for node in server.nodes),
    )


async def _wait_unsubscribed(server: ScheduleServer) -> None:
    """Invariant 4, subscribers: once the clients left, only the recorder (and the bus's
    relay) is subscribed."""
    with trio.fail_after(IO_BOUND):
        for node in server.nodes:
            # Polled: nothing signals a connection's end.
            while (  # noqa: ASYNC110
                node.gateway.connections
                or node.runtime.statistics().subscribers != node.idle_subscribers
            ):
                await trio.sleep(0.002)


# -- the invariants -------------------------------------------------------------------


def check_store(played: Played) -> dict[str, TerminalEvent]:
    """Invariants 1 to 6 against the runtime's events and the SQLite store."""
    snapshot = played.snapshot
    assert snapshot is not None
    terminals: dict[str, TerminalEvent] = {}
    for run_id, prompt in played.accepted.items():
        events = snapshot.events[run_id]
        # Invariant 1: exactly one terminal event per run, last, seq increasing.
        terminal = terminals[run_id] = check_run_events(events)
        # and so on every other gateway, relayed: the same run, text and end
        for relayed in snapshot.relayed[run_id]:
            assert check_run_events(relayed) == terminal
            assert delivered_text(relayed) == delivered_text(events)
        # Invariant 1, in the store: the run's record is final and agrees with the event.
        record = snapshot.records[run_id]
        if is_unsaved(terminal):  # reported as not saved, then saved as what it was
            assert record is not None and record.status in RUN_STATUS.values(), record
        else:
            assert record is not None and record.status == RUN_STATUS[type(terminal)], record
        # Invariant 3: history keeps what subscribers were sent (policy permitting).
        check_kept_text(events, snapshot.history)
        # Nothing lost or doubled: the prompt is stored once, or handed back.
        check_prompt_once(prompt, events, snapshot.history)
        # Tools not running after stop: each tool call's fate is the one the events show,
        # and no tool of the run was running, nor its model stream open, at its end.
        check_receipt(events)
        assert snapshot.tools_at_end[run_id] == 0, f"run {run_id} ended with a tool running"
        assert snapshot.streams_at_end[run_id] == 0, f"run {run_id} ended with a stream open"
    # Invariant 2: the whole session's history is valid input for the next request
    # (also asserted inside check_settled), and holds prompts of accepted runs only.
    validate_history(snapshot.history)
    stored_prompts = [m.meta.get("run_id") for m in snapshot.history if m.role == "user"]
    assert set(stored_prompts) <= set(played.accepted), stored_prompts
    # Invariant 4: no run's task is left, nor any tool's.
    assert snapshot.run_tasks == [], snapshot.run_tasks
    # Invariant 5: an abort that said aborted won; one too late said nothing. Across
    # gateways an abort by id of a run no gateway holds yet leaves a tombstone, which
    # stops the run as it starts (the abort that beats the start wins): not "too late".
    beaten = played.missed if played.gateways > 1 else ()
    check_abort_claims(played.claims, terminals, ("rpc", "stop-command"), beaten)
    # Invariant 6: the sim saw every connection closed, and closed by the client only
    # where the runtime left a stream early (a stop, or a malformed response).
    assert None not in snapshot.sim_closed_by
    assert snapshot.sim_closed_by.count("client") <= snapshot.streams_cut
    return terminals


def check_connection(
    received: Sequence[Frame], played: Played, terminals: dict[str, TerminalEvent]
) -> None:
    """What one connection saw agrees with the runtime and the store."""
    assert played.snapshot is not None
    events = [f for f in received if f.get("type") == "event"]
    assert [f["seq"] for f in events] == list(range(len(events))), "a gap in event seq"
    ours = {f["payload"].get("runId") for f in events} - {None}
    ours -= {f"{played.session}-probe"}
    assert ours <= set(played.accepted), f"frames for runs never accepted: {ours}"
    for run_id, terminal in terminals.items():
        runtime_events = played.snapshot.events[run_id]
        chat = [
            f["payload"] for f in events if f["event"] == "chat" and f["payload"]["runId"] == run_id
        ]
        # Invariant 1 on the wire: one terminal chat event, last, of the runtime's kind.
        ends = [p for p in chat if p["state"] in TERMINAL_STATES]
        assert len(ends) == 1 and chat[-1] is ends[0], [p["state"] for p in chat]
        assert TERMINAL_STATES[ends[0]["state"]] is type(terminal)
        # the run's own seq, as the runtime numbered its events: rising, ending at the
        # terminal event's (gaps: events with no chat frame, deltas merged for a laggard)
        seqs = [p["seq"] for p in chat]
        assert seqs == sorted(set(seqs)) and seqs[-1] == terminal.seq
        stopped = [
            f for f in events if f["event"] == "runtime.stopped" and f["payload"]["runId"] == run_id
        ]
        assert len(stopped) == (1 if isinstance(terminal, RunCancelled) else 0)
        # Invariant 3 on the wire: the text and thinking this client saw are the runtime's.
        seen = "".join(p["deltaText"] for p in chat if p["state"] == "delta")
        assert seen == delivered_text(runtime_events)
        agent = [
            f["payload"]
            for f in events
            if f["event"] == "agent" and f["payload"]["runId"] == run_id
        ]
        thinking = "".join(p["data"]["delta"] for p in agent if p["stream"] == "thinking")
        assert thinking == "".join(e.text for e in runtime_events if isinstance(e, ThinkingDelta))
        if isinstance(terminal, RunCancelled):
            kept = ends[0].get("message")
            assert (kept is None) == (terminal.message is None)
            if kept is not None and terminal.message is not None:
                shown = "".join(b.get("text", "") for b in kept["content"] if b["type"] == "text")
                assert shown == terminal.message.text
            assert stopped[0]["payload"]["restoredPrompt"] == terminal.restored_prompt
        tools = [p["data"]["phase"] for p in agent if p["stream"] == "tool"]
        if tools:  # the tool-events connection: the runtime's tool events, one for one
            assert tools.count("start") == sum(
                isinstance(e, ToolCallStarted) for e in runtime_events
            )
            assert tools.count("result") == sum(
                isinstance(e, ToolCallFinished) for e in runtime_events
            )


# -- the test -------------------------------------------------------------------------


@attrs.define
class LingeringModel:
    """A model whose stream takes a while to close after its last event, as a socket may."""

    inner: ScriptedModel

    @property
    def open_streams(self) -> int:
        return self.inner.open_streams

    @asynccontextmanager
    async def stream(self, request: ModelRequest) -> AsyncIterator[AsyncIterator[ModelEvent]]:
        async with self.inner.stream(request) as events:
            yield events
            await trio.sleep(5)


async def test_a_stop_while_a_tool_turn_closes_keeps_the_call_with_its_result(
    autojump_clock,
) -> None:
    """Found by the schedules: a stop that lands after a turn of tool calls alone has
    streamed, but before the turn is closed, saved the calls' results without the
    assistant message that made the calls, and the next request would be refused."""
    turn = tool_turn(("c1", "slow", {"text": "x"}))
    model = LingeringModel(ScriptedModel.from_turns(turn, text_turn("done")))
    async with Runtime(model=model) as rt:
        run = await rt.start_run("s", "hello")
        await trio.sleep(1)  # the turn has streamed; its stream is closing
        assert rt.abort(run_id=run.run_id).aborted
        terminal = await run.wait()
        history = await check_settled(rt, model, "s")  # invariant 2
        assert [m.role for m in history] == ["user", "assistant", "tool"]
        assert [(r.tool_call_id, r.status) for r in terminal.receipt] == [("c1", "not_started")]


@attrs.define
class GatedStore:
    """A MemoryStore whose ``get_settings`` calls each wait for the next gate, in order."""

    gates: list[trio.Event]
    inner: MemoryStore = attrs.Factory(MemoryStore)

    async def get_settings(self, session_key: str) -> Any:
        if self.gates:
            await self.gates.pop(0).wait()
        return await self.inner.get_settings(session_key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_resend_racing_a_stopped_send_never_starts_a_second_run(autojump_clock) -> None:
    """The race the schedules found, pinned: a second send of an id passed the registry
    check while the first was being admitted, read "no such run" before the first run
    was committed, and registered a second run once the first (aborted) had left."""
    first_gate, second_gate = trio.Event(), trio.Event()
    store = GatedStore([first_gate, second_gate])
    outcomes: list[object] = []
    async with Runtime(model=ScriptedModel.from_turns(text_turn("hi", pause=1)), store=store) as rt:

        async def send() -> None:
            try:
                outcomes.append(await rt.start_run("s", "hello", "k"))
            except RunExists as exists:
                outcomes.append(exists)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            await trio.testing.wait_all_tasks_blocked()  # the first waits in admission
            nursery.start_soon(send)
            await trio.testing.wait_all_tasks_blocked()
            first_gate.set()
            await trio.testing.wait_all_tasks_blocked()
            assert rt.abort(run_id="k").aborted
            await trio.testing.wait_all_tasks_blocked()  # stopped, committed, gone
            second_gate.set()
        runs = [o for o in outcomes if not isinstance(o, RunExists)]
        assert len(runs) == 1 and len(outcomes) == 2, outcomes
        await check_settled(rt, rt.model, "s")
        assert [m.text for m in await store.history("s")] == ["hello"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with schedule_server(tmp_path_factory.mktemp("schedules") / "schedules.db") as running:
        yield running


@pytest.fixture(scope="module")
def two_gateways(postgres: Postgres) -> Any:
    """Two gateways sharing one PostgreSQL database and one Redis, as two processes do."""
    with (
        redis_server() as redis,
        schedule_server(
            postgres.create_database(), gateways=2, bus=lambda: RedisAbortBus(redis.url)
        ) as running,
    ):
        yield running


def play_schedules(server: ScheduleServer, strategy: Any, examples: int, long: bool) -> None:
    @settings(
        max_examples=LONG_EXAMPLES if long else examples,
        # Real sockets on a shared 2-core machine: an example's time varies with load, so
        # a deadline would fail for no bug. IO_BOUND inside each example bounds hangs.
        deadline=None,
        # CI plays the same schedules every run, so a failure there is a bug to reproduce,
        # not a draw of luck; --long explores fresh ones each time.
        derandomize=not long,
        database=None,  # nothing written into the tree; a failure prints its blob
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(schedule=strategy)
    def check(schedule: Schedule) -> None:
        played = trio.run(play, server, schedule)
        terminals = check_store(played)
        for received in played.received:
            check_connection(received, played, terminals)

    check()


def test_no_stop_schedule_breaks_an_invariant(server: ScheduleServer, request: Any) -> None:
    play_schedules(server, schedules(), EXAMPLES, request.config.getoption("--long"))


def test_no_stop_schedule_across_two_gateways_breaks_an_invariant(
    two_gateways: ScheduleServer, request: Any
) -> None:
    """Issue 14: the same schedules, each connection on gateway A or B, so that a send, a
    resend of its key or a stop may reach the gateway that does not run the run."""
    long = request.config.getoption("--long")
    play_schedules(two_gateways, schedules(gateways=2), TWO_GATEWAY_EXAMPLES, long)
