"""Scale-out throughput: do two gateway processes carry more streaming than one?

Issue 14's target: two ``trio-agent serve`` processes on the 2-core machine carry at least
1.7 times the streaming deltas/s of one, with the stop p99 under load no worse than one
process at half the load. Measured as users meet it: every configuration runs on a
private PostgreSQL and a private Redis (``--db postgresql://... --bus unix://...``, as
scale_out starts them), each gateway is ``trio-agent serve --provider openai`` pointed at
the simulated provider in its own process (``provider_close.sim_process``), and each
streaming session has its own WebSocket connection (a user watching a reply): it
subscribes to its session and sends the message on the gateway it is connected to, so its
run lives there. Connections are dealt to the gateways in turn.

The sessions' connections (``Viewer``) are the load generator, in this process: past the
handshake and their three requests they read the socket and count the chat delta frames
in the bytes (a JSON string escapes its quotes, so ``,"state":"delta"`` occurs only as the
field), keeping the run's ``seq`` just before the last one (merged deltas skip seqs, so
seqs count deltas), without WebSocket or JSON parsing: the clients cost as little as
reading can.

1. One gateway, sessions doubled from a start until it falls behind (its connections get
   merged deltas: fewer frames than deltas) or its deltas/s stops rising (less than
   ``RISE`` more for twice the sessions): that count is L, the load one gateway cannot
   carry.
2. One gateway at L/2: deltas/s, and the stop latency (``gateway_stop.trial``: a
   measuring client's ``chat.abort`` to its ``aborted`` event) under that load.
3. Two gateways at L/2 sessions in all, then at L (L/2 each): total deltas/s at both, and
   the stop latency at L, the trials dealt to the two gateways in turn. The target compares
   the most two gateways carried with the most one carried (one past its knee may carry
   less than at it), and the stop p99 of two at L with one at L/2.

CPU is sampled from /proc for each gateway, the provider, this process (the load
generator and the measuring clients), Redis, PostgreSQL (the postmaster and its backends),
and the whole machine (/proc/stat), over each measuring window.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final

import attrs
import trio

from adapters.gateway._protocol import COALESCE_AFTER

from ._gateway import CONNECT, Client, GatewayProcess, cpu_seconds, gateway_process, open_client
from ._report import Plot, Section, Series, Summary, ms
from .gateway_stop import PROVIDERS, WARMUP, trial
from .provider_close import sim_process
from .scale_out import serve_command

RATE: Final = 20.0  # words (deltas) per second of each session's reply
WORDS: Final = 20_000  # each reply: long enough not to end while measured (1000 s)
RISE: Final = 1.15  # deltas/s stopped rising: twice the sessions gave less than this times
KEPT_UP: Final = 0.95  # frames per delta at least this: deltas were not merged
DELTA: Final = b',"state":"delta"'  # in a chat delta frame, after its seq, nowhere else
FAILED: Final = b'"state":"error"'
DIGITS: Final = b"0123456789"
KEEP: Final = 48  # bytes kept from one read to the next: a pattern and the seq before it
STARTING: Final = 32  # connections shaking hands at once
START_BOUND: Final = 600.0  # seconds for every session to stream; longer is a hang


@attrs.frozen
class Plan:
    start: int  # sessions on the first step of the sweep
    most: int  # the sweep stops here even if the deltas/s still rose
    window: float  # seconds of each throughput measurement
    settle: float  # seconds after every session streams, before measuring
    trials: int  # stops timed in each stop measurement


FULL: Final = Plan(start=100, most=1600, window=10.0, settle=3.0, trials=200)
QUICK: Final = Plan(start=4, most=8, window=1.0, settle=0.5, trials=3)


# -- the load generator: one connection per streaming session -------------------------


@attrs.define(eq=False)
class Viewer:
    """One session's connection, with just enough WebSocket to shake hands and send its
    three requests (client frames masked with a zero key, as RFC 6455 allows); then it
    only counts the chat delta frames (and error events) in the bytes it reads, and keeps
    the last one's ``seq``: the run's own event number, which merged deltas skip, so seqs
    count deltas and frames count frames."""

    stream: trio.SocketStream
    deltas: int = 0  # chat delta frames
    seq: int = 0  # of the last chat delta frame
    errors: int = 0
    streaming: trio.Event = attrs.Factory(trio.Event)  # set at its first delta
    _buffer: bytes = b""

    async def _fill(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise RuntimeError("the gateway closed a session's connection")
        self._buffer += data

    async def _message(self) -> bytes:
        """The next text message (a gateway sends each in one unmasked frame)."""
        while True:
            buffer = self._buffer
            if len(buffer) >= 2:
                size, at = buffer[1] & 0x7F, 2
                if size == 126:
                    size, at = int.from_bytes(buffer[2:4]), 4
                elif size == 127:
                    size, at = int.from_bytes(buffer[2:10]), 10
                if len(buffer) >= at + size:  # the short header reads are then complete too
                    if buffer[0] != 0x81:
                        raise RuntimeError(f"unexpected WebSocket frame {buffer[:2]!r}")
                    self._buffer = buffer[at + size :]
                    return buffer[at : at + size]
            await self._fill()

    async def call(self, request_id: str, method: str, params: Mapping[str, Any]) -> None:
        frame = {"type": "req", "id": request_id, "method": method, "params": params}
        payload = json.dumps(frame).encode()
        size = len(payload)
        head = bytes([0x81, 0x80 | size]) if size < 126 else b"\x81\xfe" + size.to_bytes(2)
        await self.stream.send_all(head + b"\0\0\0\0" + payload)
        start = b'{"type":"res","id":"' + request_id.encode() + b'"'
        while not (message := await self._message()).startswith(start):
            pass  # events of other sessions (before it subscribed)
        if not json.loads(message)["ok"]:
            raise RuntimeError(f"{method} failed: {message[:300]!r}")

    async def count(self) -> None:
        """Read until cancelled, counting; a pattern split between two reads counts too
        (``seen``: the last bytes read, whose patterns were counted already)."""
        seen, data, self._buffer = b"", self._buffer, b""
        while True:
            joined = seen + data
            self.deltas += joined.count(DELTA) - seen.count(DELTA)
            self.errors += joined.count(FAILED) - seen.count(FAILED)
            last = joined.rfind(DELTA)
            if last > 0:  # the seq's digits are just before it
                start = last
                while start and joined[start - 1] in DIGITS:
                    start -= 1
                if start:  # else they began before what was kept
                    self.seq = int(joined[start:last])
                if not self.streaming.is_set():
                    self.streaming.set()
            seen = joined[-KEEP:]
            data = await self.stream.receive_some(65536)
            if not data:
                raise RuntimeError("the gateway closed a session's connection")


async def view(
    port: int, session: str, *, task_status: trio.TaskStatus[Viewer] = trio.TASK_STATUS_IGNORED
) -> None:
    """Connect, follow ``session``, send its message; then count until cancelled."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade"
            b"\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13"
            b"\r\n\r\n"
        )
        viewer = Viewer(stream)
        while b"\r\n\r\n" not in viewer._buffer:
            await viewer._fill()
        head, viewer._buffer = viewer._buffer.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"no WebSocket upgrade: {head[:200]!r}")
        await viewer._message()  # connect.challenge
        await viewer.call("c", "connect", CONNECT)
        await viewer.call("s", "sessions.messages.subscribe", {"key": session})
        message = f"Keep talking.\n#sim words={WORDS} rate={RATE:g}"
        params = {"sessionKey": session, "message": message, "idempotencyKey": session}
        await viewer.call("m", "chat.send", params)
        task_status.started(viewer)
        await viewer.count()


# -- CPU, from /proc --------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for task in pathlib.Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _cmdline(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _busy_seconds() -> float:
    """CPU seconds the whole machine spent busy, every core (/proc/stat)."""
    fields = [int(x) for x in pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):  # a backend that exited: its time is lost
            total += cpu_seconds(pid)
    return total


@attrs.frozen
class Cpu:
    """Who to sample: each gateway, and the processes they compete with for the cores."""

    gateways: tuple[int, ...]
    postgres: pathlib.Path  # its data folder (postmaster.pid)

    def sample(self) -> dict[str, float]:
        mine = os.getpid()
        children = _children(mine)
        provider = [p for p in children if "adapters.sim" in _cmdline(p)]
        redis = [p for p in children if "redis-server" in _cmdline(p)]
        postmaster = int((self.postgres / "postmaster.pid").read_text().split()[0])
        sampled = {f"gateway {i + 1}": cpu_seconds(pid) for i, pid in enumerate(self.gateways)}
        return sampled | {
            "provider": _seconds(provider),
            "load generator": cpu_seconds(mine),
            "Redis": _seconds(redis),
            "PostgreSQL": _seconds([postmaster, *_children(postmaster)]),
            "machine": _busy_seconds(),
            "wall": time.monotonic(),
        }

    @staticmethod
    def shares(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        """Cores each used between two samples (1.0: one core all the time)."""
        wall = after["wall"] - before["wall"]
        return {k: (after[k] - before[k]) / wall for k in before if k != "wall"}


# -- one configuration ---------------------------------------------------------------


@attrs.define(eq=False)
class Setup:
    """Gateways on one database and one Redis, the provider, and the sessions' viewers."""

    gateways: list[GatewayProcess]
    cpu: Cpu
    nursery: trio.Nursery
    viewers: list[Viewer] = attrs.Factory(list)

    async def add_sessions(self, count: int, name: str) -> None:
        """``count`` more sessions streaming, their connections dealt to the gateways in
        turn; returns once every session has sent text."""
        limiter = trio.CapacityLimiter(STARTING)
        first = len(self.viewers)

        async def one(index: int) -> None:
            async with limiter:
                port = self.gateways[index % len(self.gateways)].port
                self.viewers.append(await self.nursery.start(view, port, f"{name}-{index}"))

        with trio.fail_after(START_BOUND):
            async with trio.open_nursery() as starting:
                for index in range(first, first + count):
                    starting.start_soon(one, index)
            for viewer in self.viewers:
                await viewer.streaming.wait()

    async def throughput(self, seconds: float) -> Window:
        before, (seqs, frames) = self.cpu.sample(), self.delivered()
        await trio.sleep(seconds)
        after, (seqs_now, frames_now) = self.cpu.sample(), self.delivered()
        wall = after["wall"] - before["wall"]
        deltas = sum(now - then for now, then in zip(seqs_now, seqs, strict=True))
        shares = Cpu.shares(before, after)
        return Window(len(self.viewers), deltas / wall, (frames_now - frames) / wall, shares)

    def delivered(self) -> tuple[list[int], int]:
        """Each session's last delta seq, and the delta frames of all of them."""
        errors = sum(v.errors for v in self.viewers)
        if errors:
            raise RuntimeError(f"{errors} sessions' runs failed")
        return [v.seq for v in self.viewers], sum(v.deltas for v in self.viewers)


@contextlib.asynccontextmanager
async def configuration(
    db: str, bus: str, postgres: pathlib.Path, count: int
) -> AsyncIterator[Setup]:
    """The provider and ``count`` gateways on ``db`` and ``bus``."""
    more = ("--provider", "openai", "--model", "sim")
    async with sim_process() as sim_url, contextlib.AsyncExitStack() as stack:
        env = {"OPENAI_BASE_URL": sim_url + "/v1", "OPENAI_API_KEY": ""}
        gateways = [
            await stack.enter_async_context(
                gateway_process("", command=serve_command(db, bus, *more), env=env)
            )
            for _ in range(count)
        ]
        async with trio.open_nursery() as nursery:
            yield Setup(gateways, Cpu(tuple(g.pid for g in gateways), postgres), nursery)
            nursery.cancel_scope.cancel()


@attrs.frozen
class Window:
    sessions: int
    deltas_per_second: float  # deltas that reached the sessions' connections (by seq)
    frames_per_second: float  # chat delta frames they received (fewer if deltas merged)
    cpu: dict[str, float]  # cores each used

    @property
    def kept_up(self) -> bool:
        """No deltas merged: no connection fell ``COALESCE_AFTER`` events behind."""
        return self.frames_per_second >= KEPT_UP * self.deltas_per_second


@attrs.frozen
class Result:
    label: str
    gateways: int
    window: Window
    stop: Summary | None = None
    committed: Summary | None = None  # each stop's abort to its commit's end, in the gateway


async def stops(setup: Setup, result: Result, trials: int, name: str) -> Result:
    """``result`` with the stop latency under the setup's load: measuring clients, one
    per gateway, each subscribed to a session of its own; the trials dealt to the gateways
    in turn. With each stop's part inside the gateway, from its abort to its commit's end."""
    message = PROVIDERS["streaming"]
    async with contextlib.AsyncExitStack() as stack:
        clients: list[Client] = []
        for gateway in setup.gateways:
            client = await stack.enter_async_context(open_client(gateway.port))
            await client.call("sessions.messages.subscribe", {"key": f"{name}-home"})
            clients.append(client)
            for index in range(WARMUP):
                await trial(client, f"{name}-warmup-{gateway.port}-{index}", message)
        samples = [
            await trial(clients[i % len(clients)], f"{name}-{i}", message) for i in range(trials)
        ]
    return attrs.evolve(
        result,
        stop=Summary.of([s[0] for s in samples]),
        committed=Summary.of([s[2] for s in samples]),
    )


async def step(setup: Setup, sessions: int, plan: Plan, label: str) -> Result:
    """Sessions added up to ``sessions``; their deltas/s and CPU once they all stream."""
    await setup.add_sessions(sessions - len(setup.viewers), label.replace(" ", "-"))
    await trio.sleep(plan.settle)
    window = await setup.throughput(plan.window)
    cores = " + ".join(f"{window.cpu[f'gateway {i + 1}']:.2f}" for i in range(len(setup.gateways)))
    print(f"  {label}: {sessions} sessions, {window.deltas_per_second:.0f} deltas/s, "
          f"gateway CPU {cores}, machine {window.cpu['machine']:.2f}", flush=True)  # fmt: skip
    return Result(label, len(setup.gateways), window)


async def measure(plan: Plan) -> tuple[list[Result], int, bool]:
    """The sweep of one gateway; then one gateway at L/2, two at L/2 and at L. Returns
    them, L, and whether one gateway's deltas/s had stopped rising at L."""
    from tests.services import postgres_server, redis_server  # the tests' private servers

    results: list[Result] = []
    with postgres_server(fsync=True) as postgres, redis_server() as redis:
        data = postgres.folder / "data"

        @contextlib.asynccontextmanager
        async def fresh(count: int) -> AsyncIterator[Setup]:
            db = await trio.to_thread.run_sync(postgres.create_database)
            async with configuration(db, redis.url, data, count) as setup:
                yield setup

        async with fresh(1) as setup:
            sessions, best = plan.start, 0.0
            while True:
                results.append(await step(setup, sessions, plan, "1 gateway, sweep"))
                rate = results[-1].window.deltas_per_second
                saturated = rate < best * RISE or not results[-1].window.kept_up
                if saturated or sessions >= plan.most:
                    break
                best, sessions = rate, sessions * 2
        load = sessions
        async with fresh(1) as setup:
            half = await step(setup, load // 2, plan, "1 gateway at L/2")
            results.append(await stops(setup, half, plan.trials, "g1"))
        async with fresh(2) as setup:
            results.append(await step(setup, load // 2, plan, "2 gateways at L/2"))
            full = await step(setup, load, plan, "2 gateways at L")
            results.append(await stops(setup, full, plan.trials, "g2"))
        for result in (r for r in results if r.stop is not None):
            assert result.stop is not None
            print(f"  {result.label}: stop p99 {ms(result.stop.p99)} ms", flush=True)
    return results, load, saturated


# -- the report ------------------------------------------------------------------------

# What limits the numbers: structure, and a dated profile (the table's last column and
# the CPU-per-delta sentence are worked out from each run's own figures).
LIMITS: Final = (
    " What limits these numbers (rewrite this with a new profile). On this 2-core "
    "machine the provider, the load generator, Redis and PostgreSQL share the cores "
    "with the gateways: two gateways keep up only while the machine has a core to "
    "spare, and where they stop, the machine is busy (the last column), not a "
    "gateway. The CPU per delta above says what the cores would carry with the "
    "provider and the clients elsewhere; 1.7x on 2 cores needs all the rest to cost "
    "under 18 % of a gateway's CPU per delta. A stop under load is a chain of Trio "
    "scheduler passes in a busy process, each waiting for every task ready before it: "
    "the client's frame to its handler (trio-websocket's reader task, then the "
    "connection's), the cancel to the run's task, the stop commit's worker thread and "
    "back, the terminal event to the connection's writer. Traced at 200 sessions on "
    "one gateway (0.8 of a core; the runtime's log lines stamped, 2026-12-05, 100 "
    "stops): the request to the abort median 2 ms (p90 8), the cancel to the scope's "
    "exit 1.5 (9), the stop commit 10 (32), the aborted event to the client 5 (32). "
    "The commit's p90 was 48 to 52 ms before it was pipelined (two round trips, not "
    "one per statement) and its connection handed back by its own thread (one thread "
    "hop, not two, and no wait for the deadline's canceller). A process publishes "
    "only the sessions another process relays (here none: each session's client is on "
    "the gateway that runs it), which took the Redis relay, 7 to 8 % of a gateway's "
    "samples when every event went through Redis and came back, to nearly nothing. "
    "py-spy on the gateways (2026-12-05, before that change; 100 Hz, 6 to 8 s, 200 "
    "sessions per gateway): frames to clients (encoding, trio-websocket, wsproto, one "
    "socket send per frame) 23 to 37 % of samples; reading the provider's SSE streams "
    "(httpx-sse, httpx, httpcore, h11) 23 to 32 %; the trio scheduler and locks "
    "(async stacks cut short) 8 to 26 %; the runtime 5 to 8 %; PostgreSQL calls in "
    "the worker thread 3 to 5 %; socket syscalls 10 to 17 % of all samples. A leaner "
    "SSE reader (events split in httpx's bytes, no text, line and field layers) cost "
    "the same per event in a micro-benchmark (69 against 70 µs of CPU, one event per "
    "read): the cost is httpx, httpcore and h11 per read, not the SSE decoding. The "
    "provider spends 35 to 46 % of its samples in hypercorn's h11 send path, one send "
    "per word."
)


def _per_delta(result: Result, who: str) -> float:
    """µs of CPU per delivered delta spent by ``who`` (``gateway``: all gateways)."""
    window = result.window
    cores = sum(v for k, v in window.cpu.items() if k.startswith(who))
    return cores / window.deltas_per_second * 1e6 if window.deltas_per_second else 0.0


def bounds(results: list[Result]) -> str:
    """What the CPU per delta says this machine can carry, from the stop rows."""
    cores = os.cpu_count() or 1
    parts = []
    for result in (r for r in results if r.stop is not None):
        costs = {w: _per_delta(result, w) for w in ("gateway", "provider", "load generator")}
        rest = _per_delta(result, "Redis") + _per_delta(result, "PostgreSQL")
        every = sum(costs.values()) + rest
        parts.append(
            f"{result.label}: per delta delivered, the gateways took {costs['gateway']:.0f} µs "
            f"of CPU, the provider {costs['provider']:.0f}, the load generator "
            f"{costs['load generator']:.0f}, Redis and PostgreSQL {rest:.0f}; at those costs "
            f"all {cores} cores carry at most {cores / every * 1e6:.0f} deltas/s"
            + (_ceiling(costs["gateway"], every - costs["gateway"], cores)
               if result.gateways == 1 and costs["gateway"] else "")
        )  # fmt: skip
    return " CPU per delta (from /proc, over each window): " + "; ".join(parts) + "."


def _ceiling(gateway: float, others: float, cores: int) -> str:
    """What two gateways can carry against one, when one gateway's deltas cost ``gateway``
    µs of its core and ``others`` µs elsewhere on the same ``cores``: one is held by its
    own core, two by all the cores (for 1.7x on 2 cores: ``others`` <= 0.18 ``gateway``)."""
    one = min(1e6 / gateway, cores * 1e6 / (gateway + others))
    two = min(2e6 / gateway, cores * 1e6 / (gateway + others))
    return (
        f" and one gateway's core {1e6 / gateway:.0f}: two gateways on these cores carry at "
        f"most {two / one:.2f}x one (the rest costs {others / gateway:.0%} of a gateway's CPU "
        "per delta)"
    )


def _limit(window: Window, gateways: int) -> str:
    """What the row's own CPU figures say held its deltas/s."""
    busiest = max(window.cpu[f"gateway {i + 1}"] for i in range(gateways))
    cores = os.cpu_count() or 1
    if not window.kept_up:
        per_frame = window.deltas_per_second / window.frames_per_second
        return f"the gateway fell behind: {per_frame:.1f} deltas merged per frame"
    if window.cpu["machine"] >= 0.85 * cores:
        return f"the machine: {window.cpu['machine']:.2f} of {cores} cores busy"
    if busiest >= 0.85:
        return f"gateway CPU ({busiest:.2f} of a core)"
    if window.deltas_per_second >= 0.85 * window.sessions * RATE:
        return "none: near the provider's pace"
    return "unclear: no gateway nor the machine at capacity"


def _row(result: Result) -> tuple[str, ...]:
    window, stop = result.window, result.stop
    cpu = window.cpu
    gateways = " + ".join(f"{cpu[f'gateway {i + 1}']:.2f}" for i in range(result.gateways))
    return (
        result.label,
        str(window.sessions),
        f"{window.sessions * RATE:.0f}",
        f"{window.deltas_per_second:.0f}",
        f"{window.frames_per_second:.0f}",
        gateways,
        f"{cpu['provider']:.2f}",
        f"{cpu['load generator']:.2f}",
        f"{cpu['Redis']:.2f}",
        f"{cpu['PostgreSQL']:.2f}",
        f"{cpu['machine']:.2f}",
        str(stop.trials) if stop else "",
        ms(stop.median) if stop else "",
        ms(stop.p99) if stop else "",
        ms(stop.max) if stop else "",
        ms(result.committed.p99) if result.committed else "",
        _limit(window, result.gateways),
    )


def verdict(results: list[Result], load: int, saturated: bool) -> str:
    sweep = [r for r in results if r.label == "1 gateway, sweep"]
    one, two = (
        max(
            [r for r in results if r.gateways == n and r.window.kept_up]
            or [r for r in results if r.gateways == n],
            key=lambda r: r.window.deltas_per_second,
        )
        for n in (1, 2)
    )
    merged = [r for r in results if not r.window.kept_up]
    half = next(r for r in results if r.label == "1 gateway at L/2")
    two_at_l = next(r for r in results if r.label == "2 gateways at L")
    assert half.stop is not None and two_at_l.stop is not None
    assert half.committed is not None and two_at_l.committed is not None
    found = (
        f"L = {load} sessions ({load * RATE:.0f} deltas/s nominal): there one gateway fell "
        f"behind (its deltas merged) or twice the sessions gave it less than "
        f"{(RISE - 1) * 100:.0f} % more deltas/s"
        if saturated
        else f"L = {load} sessions, the sweep's end: one gateway's deltas/s still rose there"
    )
    ratio = two.window.deltas_per_second / one.window.deltas_per_second
    at_l = two_at_l.window.deltas_per_second / sweep[-1].window.deltas_per_second
    throughput = "met" if ratio >= 1.7 else "MISSED"
    stop = "met" if two_at_l.stop.p99 <= half.stop.p99 else "MISSED"
    behind = "".join(
        f" {r.label} ({r.window.sessions} sessions) delivered {r.window.deltas_per_second:.0f} "
        f"deltas/s in {r.window.frames_per_second:.0f} frames/s: its connections had fallen "
        f"{COALESCE_AFTER} events ({COALESCE_AFTER / RATE:.1f} s of a reply) behind and got "
        "merged deltas, so it is not counted as carrying them."
        for r in merged
    )
    return (
        f"{found}.{behind} The most two gateways carried ({two.window.deltas_per_second:.0f} "
        f"deltas/s, {two.label}) is {ratio:.2f}x the most one carried "
        f"({one.window.deltas_per_second:.0f}, {one.label}, {one.window.sessions} sessions); "
        f"target 1.7x: {throughput} (at L alone: {at_l:.2f}x; the most each carried is "
        "compared, as one gateway past its knee can carry less than at it). Stop p99 "
        f"with two gateways at L: {ms(two_at_l.stop.p99)} ms, against {ms(half.stop.p99)} ms "
        f"for one gateway at L/2 (target: no worse; {stop}); of it, the gateway's own part "
        f"(abort to commit end) had p99 {ms(two_at_l.committed.p99)} ms and "
        f"{ms(half.committed.p99)} ms."
    )


async def run(quick: bool) -> Section:
    plan = QUICK if quick else FULL
    results, load, saturated = await measure(plan)
    cores = os.cpu_count()
    sweep = [r for r in results if r.stop is None]
    two = [r for r in results if r.gateways == 2]
    plot = Plot(
        "sessions streaming (each 20 deltas/s)",
        "chat delta frames/s delivered to the sessions' clients",
        (
            Series("1 gateway", tuple(r.window.sessions for r in sweep),
                   tuple(r.window.deltas_per_second for r in sweep)),
            Series("2 gateways", tuple(r.window.sessions for r in two),
                   tuple(r.window.deltas_per_second for r in two)),
        ),
    )  # fmt: skip
    notes = (
        f"Every session is one WebSocket connection (a user watching a reply of {WORDS:,} "
        f"words at {RATE:g} words/s, one delta each): it subscribes to its session and sends "
        "its message on the gateway it is connected to, connections dealt to the gateways "
        "in turn. Each gateway is `trio-agent serve --provider openai` on a private "
        "PostgreSQL (fsync on) and a private Redis (unix sockets), pointed at the simulated "
        "provider in its own process; every configuration gets a fresh database, provider "
        "and gateways. One gateway first, sessions doubled until it falls behind (merged "
        f"deltas) or its deltas/s stops rising (less than {(RISE - 1) * 100:.0f} % more for "
        "twice the sessions): that load is L. "
        "Then one gateway at L/2, and two gateways at L/2 and at L (L/2 each), each "
        f"measured for {plan.window:g} s after every session streams. Then the stop latency "
        "under load (one gateway at L/2, two at L): a measuring client per gateway, "
        "subscribed to a session of its own, sends a reply streaming 200 words/s, "
        "`chat.abort` 50 ms after its start, and stamps its `aborted` event "
        f"({WARMUP} untimed trials first per gateway; trials dealt to the gateways in turn); "
        "the column after the stop's max is each stop's part inside the gateway, from the "
        "abort to the stop commit's end (the `runtime.stopped` event's timings), the rest "
        "being the request reaching its handler and the `aborted` event reaching the client. "
        "Delivered deltas/s counts the deltas that reached the sessions' connections, from "
        "the run's own `seq` on each chat delta frame; a connection with more than "
        f"{COALESCE_AFTER} events waiting gets its deltas merged, so fewer frames (the next "
        "column): a row with fewer frames than deltas is a gateway that fell behind. "
        "CPU "
        "columns are cores used over the window (/proc): each gateway, the "
        "provider, this process (the load generator: the sessions' connections, which "
        "past their handshake only count delta frames in the bytes they read, no WebSocket "
        "or JSON parsing; and the measuring clients), Redis, PostgreSQL (postmaster and "
        f"backends), and all of the machine's {cores} cores together (other engineers' "
        "tests included). On this machine the provider, the load generator, Redis and "
        "PostgreSQL run on the same cores as the gateways: two gateways cannot each have a "
        "core, so the ratio here is the machine's, not the gateways' alone. "
        + verdict(results, load, saturated)
        + bounds(results)
        + LIMITS
    )
    return Section(
        "Scale-out throughput: one gateway process against two (PostgreSQL + Redis)",
        (
            "configuration", "sessions", "nominal deltas/s", "delivered deltas/s",
            "delta frames/s",
            "gateway CPU (cores)", "provider CPU", "load generator CPU", "Redis CPU",
            "PostgreSQL CPU", f"machine busy (of {cores} cores)", "stop trials",
            "stop median ms", "stop p99 ms", "stop max ms",
            "stop p99 in the gateway ms (abort to commit end)", "what limits it",
        ),
        tuple(_row(r) for r in results),
        notes,
        plot,
    )  # fmt: skip
