"""The abort bus on Redis (``coredis``, which runs on Trio through anyio): several gateway
processes sharing one store, and a Stop that finds its run on any of them.

Keys (under ``prefix``, ``trio-agent:`` by default; one Redis server, not a cluster: the
scripts below touch keys they compute):

- ``owner:{run}`` = the process id that owns the run, set (NX) by the claim before the run
  registers, removed once its end is written. A second claim of the id fails: the same
  idempotency key sent to two processes starts one run.
- ``runs:{process}``: the runs a process owns; ``procs``: the processes that said hello.
- ``session:{session}`` = the process that holds the session while it has live runs
  (``sruns:{session}``; ``sessions:{process}``): a session's runs live on one process at a
  time, so its history stays in order. A send for a session held by another live process
  is refused (``SessionElsewhere``) and sent there (``start_elsewhere``), where it is
  admitted under the session's policy; the session is free again once its last run
  there ended.
- ``alive:{process}``: the heartbeat, set every ``heartbeat`` seconds to expire after
  ``alive_for``. A process whose key expired is dead: the first live process to notice
  (every ``heartbeat``, it takes ``reap:{process}`` with NX) closes that process's runs as
  interrupted in the store, their checkpointed partials kept, and removes its keys. So a
  death is noticed within ``alive_for + heartbeat`` seconds (4 s by default).
- ``abort:{run}``: the tombstone, set for ``tombstone_for`` seconds by an abort of a run
  that is not live here. The claim reads it in the same script that sets the owner, so of
  an abort and a start that race, either the start sees the tombstone (the run is stopped
  as it registers) or the abort sees the owner (and asks it): the abort always wins.

An abort of a run on another process: one script sets the tombstone and reads the owner
and its heartbeat and, if another live process owns it, publishes the request on that
process's ``requests:{process}`` (one round trip). No live owner: ``aborted: false`` at
once. The owner aborts the run in its runtime and answers on the asker's channel
``replies:{process}`` with what it did, which is what the asker answers (``aborted`` true
only if the run was stopped). A session-wide abort goes to every process (``requests:``)
and is answered by each. A session's live runs (``live_elsewhere``: a client that
reconnected to another process reads ``chat.history``) are asked of the process that
holds the session the same way, and answered with their snapshots.

Run events (``relay_events``, on by default): each process publishes its runs' events on
``events:{session}`` (one script call per batch of what its subscription holds), and
hands those of the other processes to its own subscribers (``Runtime.relay``), so a
client may follow a run from any process, with the run's own ``seq``. A process receives
only the sessions its subscribers follow (``Runtime.followed_sessions``: a channel per
session, or the pattern of all while one subscriber, such as a gateway connection that
never called ``sessions.messages.subscribe``, follows every session; the channels stay a
few seconds under the pattern, so connections that follow everything for a moment do not
make it drop and take them again), and says so first
(``followers:{session}`` and ``followers-all`` hold the processes that relay them,
``follows:{process}`` what each relays, for its cleanup); a process publishes only the
events some other process relays, so one whose clients follow only its own runs sends
nothing through Redis. Before a process asks for a session's live runs it waits until it
receives that session's events, so the snapshot and the events after it line up (the
receiver drops what the snapshot holds, by ``seq``). Requests and answers travel on a
subscription of their own, so a stop never waits behind relayed events.

Redis restarted (nothing persisted, so every key is gone): the pub/sub connection comes
back by itself (coredis resubscribes), and the next heartbeat, finding that Redis no
longer knows this process, declares again what it relays, owns its live runs again and
stops those whose tombstone was set meanwhile. An abort sent while Redis is down fails
(the gateway answers with an error); one sent after the restart but before the
heartbeat finds no owner, answers ``aborted: false`` and leaves its tombstone, which the
heartbeat then finds: the run is stopped within ``heartbeat`` seconds all the same.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, final

import attrs
import coredis
import coredis.exceptions
import trio
from coredis.retry import (
    CompositeRetryPolicy,
    ConstantRetryPolicy,
    ExponentialBackoffRetryPolicy,
)

from runtime import (
    AbortRefused,
    AbortResult,
    AgentRuntimeError,
    Event,
    InvalidRequest,
    RunExists,
    RunRecord,
    RunSessionMismatch,
    RunSnapshot,
    Runtime,
    RuntimeClosing,
    SessionBusy,
    SessionElsewhere,
    Subscription,
    SubscriptionOverflow,
    converter,
    is_terminal,
)

logger = logging.getLogger("adapters.redis_bus")
# Failures are logged as strings: a kept log record must not keep a failed connection
# (and the anyio streams coredis leaves in it) alive.

# KEYS: owner:{run}, runs:{me}, abort:{run}, session:{s}, sessions:{me}, sruns:{s};
# ARGV: me, run, alive prefix, session. Returns {1, tombstoned} when claimed, {0, ""} when
# another process owns the run, {2, holder} when another live process holds the session.
_CLAIM = """
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then return {0, ''} end
local holder = redis.call('GET', KEYS[4])
if holder and holder ~= ARGV[1] and redis.call('EXISTS', ARGV[3] .. holder) == 1 then
  return {2, holder}
end
redis.call('SET', KEYS[4], ARGV[1])
redis.call('SADD', KEYS[5], ARGV[4])
redis.call('SADD', KEYS[6], ARGV[2])
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
return {1, redis.call('EXISTS', KEYS[3])}
"""
# KEYS: runs:{me}, sessions:{me}; ARGV: me, prefix, then run id and session pairs. A
# session whose last live run this was is no longer held.
_RELEASE = """
for i = 3, #ARGV, 2 do
  local run, session = ARGV[i], ARGV[i + 1]
  local key = ARGV[2] .. 'owner:' .. run
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
  redis.call('SREM', KEYS[1], run)
  local sruns = ARGV[2] .. 'sruns:' .. session
  redis.call('SREM', sruns, run)
  local held = ARGV[2] .. 'session:' .. session
  if redis.call('SCARD', sruns) == 0 and redis.call('GET', held) == ARGV[1] then
    redis.call('DEL', held)
    redis.call('SREM', KEYS[2], session)
  end
end
return 1
"""
# KEYS: abort:{run}, owner:{run}; ARGV: tombstone ms, alive prefix, me, requests channel
# prefix, request. Sets the tombstone and, when another live process owns the run, hands
# it the request (one round trip: a stop's first hop). Returns the live owner.
_TOMBSTONE = """
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
local owner = redis.call('GET', KEYS[2])
if not owner or redis.call('EXISTS', ARGV[2] .. owner) == 0 then return false end
if owner ~= ARGV[3] then redis.call('PUBLISH', ARGV[4] .. owner, ARGV[5]) end
return owner
"""
# KEYS: session:{s}; ARGV: alive prefix, me, requests channel prefix, request. Hands the
# request to the live process that holds the session, if another; returns that process.
_HOLDER = """
local holder = redis.call('GET', KEYS[1])
if not holder or redis.call('EXISTS', ARGV[1] .. holder) == 0 then return false end
if holder ~= ARGV[2] then redis.call('PUBLISH', ARGV[3] .. holder, ARGV[4]) end
return holder
"""
# KEYS: session:{s} for each session; ARGV: alive prefix, me. Returns 1 for each session
# another live process holds, else 0.
_HELD = """
local held = {}
for i, key in ipairs(KEYS) do
  local holder = redis.call('GET', key)
  local other = holder and holder ~= ARGV[2] and redis.call('EXISTS', ARGV[1] .. holder) == 1
  held[i] = other and 1 or 0
end
return held
"""
# KEYS: procs; ARGV: alive prefix, reap prefix, me, reap ms. Returns the dead ones to reap.
_FIND_DEAD = """
local dead = {}
for _, proc in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if proc ~= ARGV[3] and redis.call('EXISTS', ARGV[1] .. proc) == 0 then
    if redis.call('SET', ARGV[2] .. proc, ARGV[3], 'NX', 'PX', ARGV[4]) then
      table.insert(dead, proc)
    end
  end
end
return dead
"""
# KEYS: runs:{proc}, procs, reap:{proc}, alive:{proc}, sessions:{proc}; ARGV: proc, prefix.
_FORGET = """
for _, run in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[2] .. 'owner:' .. run
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
for _, session in ipairs(redis.call('SMEMBERS', KEYS[5])) do
  local held = ARGV[2] .. 'session:' .. session
  if redis.call('GET', held) == ARGV[1] then
    redis.call('DEL', held, ARGV[2] .. 'sruns:' .. session)
  end
end
for _, session in ipairs(redis.call('SMEMBERS', KEYS[6])) do
  redis.call('SREM', ARGV[2] .. 'followers:' .. session, ARGV[1])
end
redis.call('SREM', KEYS[7], ARGV[1])
redis.call('DEL', KEYS[1], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
redis.call('SREM', KEYS[2], ARGV[1])
return 1
"""
# KEYS: alive:{me}, procs; ARGV: me, alive ms. Returns 1 when Redis did not know us.
_BEAT = """
redis.call('SET', KEYS[1], '1', 'PX', ARGV[2])
return redis.call('SADD', KEYS[2], ARGV[1])
"""
# KEYS: runs:{me}, sessions:{me}; ARGV: me, prefix, then run id and session pairs.
# Returns the tombstoned run ids.
_RECLAIM = """
local tombstoned = {}
for i = 3, #ARGV, 2 do
  local run, session = ARGV[i], ARGV[i + 1]
  redis.call('SET', ARGV[2] .. 'owner:' .. run, ARGV[1])
  redis.call('SADD', KEYS[1], run)
  redis.call('SET', ARGV[2] .. 'session:' .. session, ARGV[1])
  redis.call('SADD', KEYS[2], session)
  redis.call('SADD', ARGV[2] .. 'sruns:' .. session, run)
  if redis.call('EXISTS', ARGV[2] .. 'abort:' .. run) == 1 then table.insert(tombstoned, run) end
end
return tombstoned
"""
# KEYS: events:{s} channels...; ARGV: me, followers prefix, followers-all key, then the
# session and the message of each channel. Publishes only the sessions another process
# relays (or it relays every one): a process's own clients get its events from it.
_PUBLISH_ALL = """
local all = redis.call('SCARD', ARGV[3]) - redis.call('SISMEMBER', ARGV[3], ARGV[1])
local sent = 0
for i, channel in ipairs(KEYS) do
  local followers = ARGV[2] .. ARGV[2 + 2 * i]
  if all > 0 or redis.call('SCARD', followers) - redis.call('SISMEMBER', followers, ARGV[1]) > 0
  then
    redis.call('PUBLISH', channel, ARGV[3 + 2 * i])
    sent = sent + 1
  end
end
return sent
"""
# KEYS: follows:{me}, followers-all; ARGV: me, followers prefix, "1" when it relays every
# session (else "0"), then "+" or "-" and a session, for each session it now relays or no
# longer does.
_DECLARE = """
redis.call(ARGV[3] == '1' and 'SADD' or 'SREM', KEYS[2], ARGV[1])
for i = 4, #ARGV, 2 do
  if ARGV[i] == '+' then
    redis.call('SADD', ARGV[2] .. ARGV[i + 1], ARGV[1])
    redis.call('SADD', KEYS[1], ARGV[i + 1])
  else
    redis.call('SREM', ARGV[2] .. ARGV[i + 1], ARGV[1])
    redis.call('SREM', KEYS[1], ARGV[i + 1])
  end
end
return 1
"""
# KEYS: owner:{run}...; ARGV: alive prefix. Returns 1 per run whose owner is alive.
_OWNED = """
local result = {}
for i, key in ipairs(KEYS) do
  local owner = redis.call('GET', key)
  if owner and redis.call('EXISTS', ARGV[1] .. owner) == 1 then
    result[i] = 1
  else
    result[i] = 0
  end
end
return result
"""


class RedisBusError(Exception):
    """Redis could not be used; the message says why and what to do."""


# coredis's default backs off up to 16 s: a stop must not wait that long after a restart
_RESUBSCRIBE = CompositeRetryPolicy(
    ExponentialBackoffRetryPolicy(
        (coredis.exceptions.ConnectionError,), retries=None, base_delay=0.05, max_delay=1.0,
        jitter=True,
    ),
    ConstantRetryPolicy((TimeoutError,), retries=2, delay=0.1),
)  # fmt: skip
SUBSCRIBE_TIMEOUT = 10.0  # seconds for Redis to acknowledge an events subscription
UNREACHABLE = (coredis.exceptions.RedisError, OSError)  # Redis down, restarting, refusing
RESEND_AFTER = 0.25  # seconds without an answer before an abort request is sent again
ANSWERS_KEPT = 1000  # answers kept by request id, for requests sent again
REMOTE_ENDS_KEPT = 1000  # ended runs of other processes remembered, for late copies
RELAY_MAX_BYTES = 64 * 1024 * 1024  # run events waiting to be published, at most


@final
@attrs.define(eq=False)
class _Waiter:
    expected: int | None = None
    # by process: the first answer of each (a request sent again may be answered twice)
    replies: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    done: trio.Event = attrs.field(factory=trio.Event)

    def check(self) -> None:
        if self.expected is not None and len(self.replies) >= self.expected:
            self.done.set()


@final
@attrs.define(eq=False)
class RedisAbortBus:
    """``Runtime(..., abort_bus=RedisAbortBus("redis://..."))``: see the module docstring.

    ``url`` is ``redis://host:port/db`` or ``unix:///path/to/redis.sock``."""

    url: str
    prefix: str = "trio-agent:"
    heartbeat: float = 1.0
    alive_for: float = 3.0
    tombstone_for: float = 60.0
    reply_timeout: float = 2.0
    relay_events: bool = True
    channels_under_pattern: float = 5.0  # see _follow
    process_id: str = attrs.field(factory=lambda: uuid.uuid4().hex[:16])
    _client: Any = attrs.field(default=None, init=False)
    _runtime: Runtime | None = attrs.field(default=None, init=False)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)
    # runs being claimed, not yet registered or released: set when that is decided
    _claiming: dict[str, trio.Event] = attrs.field(factory=dict, init=False)
    # runs whose tombstone the claim found: stopped as they register
    _pending: set[str] = attrs.field(factory=set, init=False)
    _waiters: dict[str, _Waiter] = attrs.field(factory=dict, init=False)
    _to_release: list[tuple[str, str]] = attrs.field(factory=list, init=False)  # run, session
    _run_sessions: dict[str, str] = attrs.field(factory=dict, init=False)  # claimed runs
    _release_wanted: trio.Event = attrs.field(factory=trio.Event, init=False)
    _scripts: dict[str, Any] = attrs.field(factory=dict, init=False)
    _tasks: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)
    # _follow's scope, and whether it is running (see _leave)
    _following: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)
    _follow_ended: trio.Event | None = attrs.field(default=None, init=False)
    _answered: dict[str, dict[str, Any]] = attrs.field(factory=dict, init=False)  # by request
    _underway: set[str] = attrs.field(factory=set, init=False)  # requests answered later
    # runs of other processes whose events were relayed here: the last seq of each (kept
    # for the last REMOTE_ENDS_KEPT that ended, so a late copy of an event is known)
    _remote_runs: dict[str, int] = attrs.field(factory=dict, init=False)
    _remote_ends: deque[str] = attrs.field(factory=deque, init=False)
    _publishing: Subscription | None = attrs.field(default=None, init=False)
    # the sessions whose channels are subscribed to, and whether the pattern of all is,
    # for the runtime's routes of version _relayed_version (see _follow)
    _relaying: set[str] = attrs.field(factory=set, init=False)
    _relaying_all: bool = attrs.field(default=False, init=False)
    _relayed_version: int = attrs.field(default=-1, init=False)
    _relay_progress: trio.Event = attrs.field(factory=trio.Event, init=False)

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    @property
    def _own_events(self) -> str:
        """How this process's event messages begin (``{"from": ID, "event": EVENT}``)."""
        return f'{{"from": {json.dumps(self.process_id)},'

    def _replies_channel(self, process_id: str) -> str:
        return self._key("replies", process_id)

    # -- the AbortBus port ---------------------------------------------------------

    @asynccontextmanager
    async def open(self, runtime: Runtime) -> AsyncIterator[RedisAbortBus]:
        async with coredis.Redis.from_url(self.url, decode_responses=True) as client:
            self._client, self._runtime = client, runtime
            for name, source in (
                ("claim", _CLAIM),
                ("release", _RELEASE),
                ("tombstone", _TOMBSTONE),
                ("holder", _HOLDER),
                ("held", _HELD),
                ("find_dead", _FIND_DEAD),
                ("forget", _FORGET),
                ("owned", _OWNED),
                ("beat", _BEAT),
                ("reclaim", _RECLAIM),
                ("publish_all", _PUBLISH_ALL),
                ("declare", _DECLARE),
            ):
                self._scripts[name] = client.register_script(source)
            try:
                await self._beat_once()
            except UNREACHABLE as exc:
                raise RedisBusError(
                    f"Redis at {self.url} could not be reached ({exc}). Start it, or check "
                    "the URL given to --bus."
                ) from exc
            # Two subscriptions, two connections: requests and their answers never wait
            # behind a backlog of run events (a stop first, across processes too).
            control = [  # requests to every process, and to this one; answers to this one
                self._key("requests", ""),
                self._key("requests", self.process_id),
                self._replies_channel(self.process_id),
            ]
            # coredis 6.9 closes a subscription by cancelling its current connection attempt:
            # one that is waiting to reconnect then goes on forever. This scope ends both.
            with trio.CancelScope() as subscriptions:
                async with (
                    client.pubsub(
                        channels=control, ignore_subscribe_messages=True, retry_policy=_RESUBSCRIBE
                    ) as requests,
                    client.pubsub(
                        ignore_subscribe_messages=True,
                        retry_policy=_RESUBSCRIBE,
                        subscription_timeout=SUBSCRIBE_TIMEOUT,
                    ) as events,
                    trio.open_nursery() as nursery,
                ):
                    self._nursery = nursery
                    nursery.start_soon(self._work, requests, events)
                    try:
                        yield self
                    finally:
                        try:
                            await self._leave()
                        finally:
                            subscriptions.cancel()
                            self._nursery = None

    async def _leave(self) -> None:
        """A clean exit: release this process's runs and forget it, so no one has to reap
        it; what it relays is declared no more first (a declaration landing after the
        forgetting would have the others publish to it forever). If that fails, the
        others reap it once its heartbeat expires."""
        with trio.move_on_after(5, shield=True) as waited:
            try:
                self._following.cancel()  # if not started yet, it never declares anything
                if self._follow_ended is not None:
                    await self._follow_ended.wait()
                await self._release_now()
                await self._forget(self.process_id)
            except Exception as exc:
                logger.warning(
                    "this process could not be forgotten by Redis (%s): other processes "
                    "reap its runs once its heartbeat expires",
                    str(exc),
                )
        if waited.cancelled_caught:
            logger.warning("this process could not be forgotten by Redis within 5 s")

    async def claim(self, run_id: str, session_key: str) -> bool:
        self._claiming[run_id] = trio.Event()
        self._run_sessions[run_id] = session_key
        try:
            claimed, tombstoned = await self._scripts["claim"](
                [
                    self._key("owner", run_id),
                    self._key("runs", self.process_id),
                    self._key("abort", run_id),
                    self._key("session", session_key),
                    self._key("sessions", self.process_id),
                    self._key("sruns", session_key),
                ],
                [self.process_id, run_id, self._key("alive", ""), session_key],
            )
        except BaseException:
            self.released(run_id)  # the script may have run: undo it, if it did
            raise
        if claimed != 1:
            self._claimed(run_id)
            del self._run_sessions[run_id]
            if claimed == 2:
                raise SessionElsewhere(session_key, str(tombstoned))
            return False
        if tombstoned:
            logger.info("run %s was aborted before it started: it is stopped now", run_id)
            self._pending.add(run_id)
        return True

    def registered(self, run_id: str) -> bool:
        self._claimed(run_id)
        if run_id in self._pending:
            self._pending.discard(run_id)
            return True
        return False

    def released(self, run_id: str) -> None:
        self._claimed(run_id)
        self._pending.discard(run_id)
        session_key = self._run_sessions.pop(run_id, None)
        if session_key is not None:
            self._to_release.append((run_id, session_key))
            self._release_wanted.set()

    def _claimed(self, run_id: str) -> None:
        """The claim of ``run_id`` is decided (registered, or released, or refused)."""
        if (decided := self._claiming.pop(run_id, None)) is not None:
            decided.set()

    async def _claim_decided(self, run_id: str) -> None:
        """Wait until a claim of ``run_id`` under way here is decided: an abort that came
        meanwhile then stops the run if it registered, and says so truthfully (it may
        never register: its id ran before, its session is elsewhere or refuses it)."""
        if (decided := self._claiming.get(run_id)) is not None:
            with trio.move_on_after(self.reply_timeout):
                await decided.wait()

    async def abort_elsewhere(
        self,
        run_id: str | None,
        session_key: str | None,
        reason: str,
        stop_policy: str | None,
    ) -> AbortResult:
        request = {
            "kind": "abort",
            "run_id": run_id,
            "session_key": session_key,
            "reason": reason,
            "stop_policy": stop_policy,
        }
        with self._request(request) as (waiter, message):
            if run_id is None:  # a session's runs: every process is asked
                replies = await self._replies(waiter, message, None)
            else:
                owner = await self._scripts["tombstone"](
                    [self._key("abort", run_id), self._key("owner", run_id)],
                    [
                        round(self.tombstone_for * 1000),
                        self._key("alive", ""),
                        self.process_id,
                        self._key("requests", ""),
                        message,
                    ],
                )
                if owner == self.process_id and run_id in self._claiming:
                    await self._claim_decided(run_id)  # then as if it came after
                    assert self._runtime is not None
                    return self._runtime.abort(
                        run_id,
                        session_key,
                        reason=reason,
                        stop_policy=stop_policy,  # type: ignore[arg-type]  # checked there
                    )
                if owner is None or owner == self.process_id:
                    return AbortResult(False, ())
                replies = await self._replies(waiter, message, owner, sent=True)
        aborted: list[str] = []
        refused: list[str] = []
        for reply in replies:
            if reply.get("error") == "mismatch" and run_id is not None and session_key:
                raise RunSessionMismatch(run_id, session_key)
            if reply.get("error") == "refused" and run_id is not None:
                raise AbortRefused(run_id)
            aborted += [r for r in reply.get("aborted", []) if r not in aborted]
            refused += [r for r in reply.get("refused", []) if r not in refused]
        return AbortResult(bool(aborted), tuple(aborted), tuple(refused))

    async def live_elsewhere(self, session_key: str) -> list[RunSnapshot]:
        await self._following_now()
        with self._request({"kind": "live", "session_key": session_key}) as (waiter, message):
            try:
                holder = await self._scripts["holder"](
                    [self._key("session", session_key)],
                    [self._key("alive", ""), self.process_id, self._key("requests", ""), message],
                )
            except UNREACHABLE as exc:  # the history is served all the same
                logger.warning("runs of other processes unknown (Redis unreachable): %s", str(exc))
                return []
            if holder is None or holder == self.process_id:
                return []
            replies = await self._replies(waiter, message, holder, sent=True)
        if not replies:  # the holder did not answer in time (logged): as if it had no runs
            return []
        return [converter.structure(run, RunSnapshot) for run in replies[0]["runs"]]

    async def start_elsewhere(
        self,
        process_id: str,
        session_key: str,
        message: str,
        run_id: str,
        options: Mapping[str, Any],
    ) -> None:
        await self._following_now()
        request = {
            "kind": "start",
            "session_key": session_key,
            "message": message,
            "run_id": run_id,
            "options": dict(options),
        }
        with self._request(request) as (waiter, sent):
            replies = await self._replies(waiter, sent, process_id)
        if not replies:  # it may have started: a retry with the same run id is safe
            raise SessionElsewhere(session_key, process_id)
        reply = replies[0]
        match reply.get("error"):
            case None if "exists" in reply:
                raise RunExists(run_id, live=reply["exists"])
            case None:
                return
            case "busy":
                raise SessionBusy(session_key, reply["run"])
            case "elsewhere":
                raise SessionElsewhere(session_key, reply["process"])
            case "closing":
                raise RuntimeClosing()
            case "invalid":
                raise InvalidRequest(reply["message"])
            case _:
                raise AgentRuntimeError(reply["message"])

    async def held_elsewhere(self, session_keys: Sequence[str]) -> set[str]:
        if not session_keys:
            return set()
        try:
            held = await self._scripts["held"](
                [self._key("session", key) for key in session_keys],
                [self._key("alive", ""), self.process_id],
            )
        except UNREACHABLE as exc:  # the sessions are listed all the same
            logger.warning("runs of other processes unknown (Redis unreachable): %s", str(exc))
            return set()
        return {key for key, flag in zip(session_keys, held, strict=True) if flag}

    @contextmanager
    def _request(self, request: dict[str, Any]) -> Iterator[tuple[_Waiter, str]]:
        """A request to other processes, as sent (with its id), and the waiter that
        collects its answers while the context lasts."""
        request_id = uuid.uuid4().hex
        waiter = self._waiters[request_id] = _Waiter()
        try:
            yield waiter, json.dumps(request | {"id": request_id, "from": self.process_id})
        finally:
            del self._waiters[request_id]

    async def _replies(
        self, waiter: _Waiter, message: str, to: str | None, *, sent: bool = False
    ) -> list[dict[str, Any]]:
        """Send the request ``message`` to process ``to`` (None: every other process),
        unless a script ``sent`` it already, and again until answered (a message published
        while the receiver's subscription reconnects is lost; requests are idempotent);
        return the answers that came within ``reply_timeout``, one per process."""
        if to is not None:
            waiter.expected = 1
        with trio.move_on_after(self.reply_timeout):
            while True:
                if not sent:
                    receivers = await self._client.publish(self._key("requests", to or ""), message)
                    if waiter.expected is None:  # all subscribers of the channel but us
                        waiter.expected = max(receivers - 1, 0)
                sent = False
                waiter.check()
                with trio.move_on_after(RESEND_AFTER):
                    await waiter.done.wait()
                if waiter.done.is_set():
                    break
        if not waiter.done.is_set():
            logger.warning(
                "a request was answered by %d of %s processes in %g s: %s",
                len(waiter.replies),
                waiter.expected,
                self.reply_timeout,
                message,
            )
        return list(waiter.replies.values())

    async def orphans(self, records: Sequence[RunRecord]) -> list[RunRecord]:
        if not records:
            return []
        owned = await self._scripts["owned"](
            [self._key("owner", r.run_id) for r in records], [self._key("alive", "")]
        )
        return [r for r, alive in zip(records, owned, strict=True) if not alive]

    # -- the tasks -------------------------------------------------------------------

    async def _work(self, requests: Any, events: Any) -> None:
        """The bus's tasks, under a scope of their own (``_tasks``: cancelling it stops
        the heartbeat as a death would, which the tests use)."""
        with self._tasks:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._listen, requests, self._on_control)
                nursery.start_soon(self._beat)
                nursery.start_soon(self._watch)
                nursery.start_soon(self._release_loop)
                if self.relay_events:
                    nursery.start_soon(self._listen, events, self._on_event)
                    nursery.start_soon(self._publish_events)
                    nursery.start_soon(self._follow_until_left, events)

    async def _listen(self, pubsub: Any, handle: Callable[[Any], None]) -> None:
        """Hand each message of ``pubsub`` to ``handle``. When the connection drops,
        coredis reconnects and subscribes again by itself; the messages go on."""
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True)
            if message is None:
                continue
            try:
                handle(message)
            except Exception:
                logger.exception("a bus message could not be handled: %r", message)

    def _on_control(self, message: Any) -> None:
        data = json.loads(message["data"])
        if message["channel"].startswith(self._key("requests", "")):
            self._on_request(data)
        elif (waiter := self._waiters.get(data.get("id"))) is not None:
            waiter.replies.setdefault(data["from"], data)
            waiter.check()

    def _on_event(self, message: Any) -> None:
        if message["data"].startswith(self._own_events):
            return  # this process's own, back from a session it follows: not even parsed
        data = json.loads(message["data"])["event"]
        if data["seq"] <= self._remote_runs.get(data["run_id"], -1):
            return  # received twice: by its session's channel and by the pattern (_follow)
        assert self._runtime is not None
        event: Event = converter.structure(data, Event)  # type: ignore[arg-type]
        self._remote_runs[event.run_id] = event.seq  # so _publish_events does not send it back
        if is_terminal(event):
            self._remote_ends.append(event.run_id)
            if len(self._remote_ends) > REMOTE_ENDS_KEPT:
                del self._remote_runs[self._remote_ends.popleft()]
        self._runtime.relay(event)

    async def _follow_until_left(self, pubsub: Any) -> None:
        self._follow_ended = ended = trio.Event()
        try:
            with self._following:  # cancelled by _leave
                await self._follow(pubsub)
        finally:
            ended.set()

    async def _follow(self, pubsub: Any) -> None:
        """Receive other processes' events for the sessions this process's subscribers
        follow (a channel each, or the pattern of all while one follows every session),
        subscribing before unsubscribing, so a followed session is never missed. What it
        relays is declared in Redis first (``followers:{session}``, ``followers-all``):
        the other processes publish only what some process relays.

        The channels stay subscribed under the pattern for ``channels_under_pattern``
        seconds (an event then comes twice; the copy is dropped by its seq): a gateway
        connection follows every session until it subscribes to one, a few ms, and
        clients connecting one after another would otherwise have the process drop and
        take again every channel for each of them."""
        assert self._runtime is not None
        everything = self._key("events", "*")
        version: int | None = None
        channels_go = math.inf  # when the pattern has covered the channels long enough
        while True:
            if version is not None:
                covering = self._relaying_all and self._relaying  # channels to drop, later
                with trio.move_on_at(channels_go if covering else math.inf):
                    await self._runtime.wait_followed_changed(version)
            version, named, all_ = self._runtime.followed_sessions(besides=self._publishing)
            if all_ and not self._relaying_all:
                channels_go = trio.current_time() + self.channels_under_pattern
            sessions = frozenset() if all_ and trio.current_time() >= channels_go else named
            try:
                if all_ and not self._relaying_all:
                    await self._declare(True)
                    await pubsub.psubscribe(everything)
                    self._relaying_all = True
                if new := sessions - self._relaying:
                    await self._declare(self._relaying_all, added=new)
                    await pubsub.subscribe(*(self._key("events", s) for s in new))
                    self._relaying |= new
                if not all_ and self._relaying_all:
                    await pubsub.punsubscribe(everything)
                    self._relaying_all = False
                    await self._declare(False)
                if old := self._relaying - sessions:
                    await pubsub.unsubscribe(*(self._key("events", s) for s in old))
                    self._relaying -= old
                    await self._declare(self._relaying_all, removed=old)
            except Exception as exc:
                logger.warning("following sessions' events failed, to be retried: %s", str(exc))
                version = None  # read the routes again, without waiting for a change
                await trio.sleep(self.heartbeat)
                continue
            self._relayed_version = version
            self._relay_progress.set()
            self._relay_progress = trio.Event()

    async def _declare(
        self, everything: bool, added: Iterable[str] = (), removed: Iterable[str] = ()
    ) -> None:
        await self._scripts["declare"](
            [self._key("follows", self.process_id), self._key("followers-all")],
            [
                self.process_id,
                self._key("followers", ""),
                "1" if everything else "0",
                *(part for session in added for part in ("+", session)),
                *(part for session in removed for part in ("-", session)),
            ],
        )

    async def _following_now(self) -> None:
        """Return once this process receives the events of every session its subscribers
        follow now: a snapshot asked for after it is continued by the events it gets."""
        if not self.relay_events:
            return
        assert self._runtime is not None
        version, _, _ = self._runtime.followed_sessions(besides=self._publishing)
        with trio.move_on_after(self.reply_timeout):
            while self._relayed_version < version:
                await self._relay_progress.wait()

    async def _publish_events(self) -> None:
        """Publish this process's runs' events, a batch (all the subscription holds) per
        script call; events relayed from other processes are not sent back."""
        assert self._runtime is not None
        while True:
            with self._runtime.subscribe(max_bytes=RELAY_MAX_BYTES) as events:
                self._publishing = events
                try:
                    async for first in events:
                        batch = [first]
                        while (more := events.receive_nowait()) is not None:
                            batch.append(more)
                        await self._publish_batch(batch)
                except SubscriptionOverflow:
                    logger.warning(
                        "run events were not relayed fast enough (Redis slow?): some were "
                        "dropped for clients on other processes"
                    )

    async def _publish_batch(self, batch: list[Event]) -> None:
        channels = []
        args = [self.process_id, self._key("followers", ""), self._key("followers-all")]
        for event in batch:
            if event.run_id in self._remote_runs:
                continue
            channels.append(self._key("events", event.session_key))
            event_json = json.dumps(converter.unstructure(event, Event))
            args += [event.session_key, f'{self._own_events} "event": {event_json}}}']
        if channels:
            try:
                await self._scripts["publish_all"](channels, args)
            except Exception as exc:
                logger.warning("run events could not be relayed: %s", str(exc))

    def _on_request(self, request: dict[str, Any]) -> None:
        """A request from another process: act at once (no await), answer after."""
        if request["from"] == self.process_id:
            return
        assert self._runtime is not None and self._nursery is not None
        if (answered := self._answered.get(request["id"])) is not None:  # sent again:
            self._nursery.start_soon(self._publish_reply, request["from"], answered)
            return  # the same answer (acting again would find the run stopping: "false")
        reply: dict[str, Any] = {"id": request["id"], "from": self.process_id}
        if request["kind"] == "start" or (
            request["kind"] == "abort" and request["run_id"] in self._claiming
        ):
            if request["id"] not in self._underway:  # else sent again meanwhile
                self._underway.add(request["id"])
                handle = self._start_here if request["kind"] == "start" else self._abort_later
                self._nursery.start_soon(handle, request, reply)
            return
        if request["kind"] == "live":
            runs = self._runtime.live_runs(request["session_key"])
            reply["runs"] = [converter.unstructure(run.snapshot()) for run in runs]
        else:
            reply |= self._abort_here(request)
        self._answer(request, reply)

    def _answer(self, request: dict[str, Any], reply: dict[str, Any]) -> None:
        assert self._nursery is not None
        self._answered[request["id"]] = reply
        while len(self._answered) > ANSWERS_KEPT:
            del self._answered[next(iter(self._answered))]
        self._nursery.start_soon(self._publish_reply, request["from"], reply)

    async def _start_here(self, request: dict[str, Any], reply: dict[str, Any]) -> None:
        """A message another process received for a session held here: admitted as if
        sent here (``start_run``), and what came of it answered."""
        assert self._runtime is not None
        try:
            await self._runtime.start_run(
                request["session_key"], request["message"], request["run_id"], **request["options"]
            )
        except RunExists as exists:
            reply["exists"] = exists.live
        except SessionElsewhere as elsewhere:  # its last run here ended meanwhile
            reply |= {"error": "elsewhere", "process": elsewhere.process_id}
        except SessionBusy as busy:
            reply |= {"error": "busy", "run": busy.live_run_id}
        except RuntimeClosing:
            reply["error"] = "closing"
        except InvalidRequest as exc:
            reply |= {"error": "invalid", "message": str(exc)}
        except Exception as exc:
            logger.exception("a run sent from process %s could not start", request["from"])
            reply |= {"error": "failed", "message": f"The run could not start: {exc}"}
        finally:
            self._underway.discard(request["id"])
        self._answer(request, reply)

    async def _abort_later(self, request: dict[str, Any], reply: dict[str, Any]) -> None:
        """An abort of a run being claimed here: answered once the claim is decided."""
        try:
            await self._claim_decided(request["run_id"])
            reply |= self._abort_here(request)
        finally:
            self._underway.discard(request["id"])
        self._answer(request, reply)

    def _abort_here(self, request: dict[str, Any]) -> dict[str, Any]:
        """Do what an abort request asks of this process; the answer's fields."""
        assert self._runtime is not None
        run_id, session_key = request["run_id"], request["session_key"]
        try:
            if run_id is not None and self._runtime.get_run(run_id) is None:
                result = AbortResult(False, ())
            else:
                result = self._runtime.abort(
                    run_id,
                    session_key,
                    reason=request["reason"] or "rpc",
                    stop_policy=request["stop_policy"],
                )
        except RunSessionMismatch:
            return {"error": "mismatch"}
        except AbortRefused:
            return {"error": "refused"}
        if result.aborted:
            logger.info(
                "abort from process %s: stopped %s", request["from"], ",".join(result.run_ids)
            )
        return {"aborted": list(result.run_ids), "refused": list(result.refused)}

    async def _publish_reply(self, to: str, reply: dict[str, Any]) -> None:
        try:
            await self._client.publish(self._replies_channel(to), json.dumps(reply))
        except Exception as exc:
            logger.warning("an answer could not be sent to %s: %s", to, str(exc))

    async def _beat_once(self) -> bool:
        """Say this process is alive; True when Redis had forgotten it (a restart, a
        flush): then the owner keys of its live runs are gone too."""
        return bool(
            await self._scripts["beat"](
                [self._key("alive", self.process_id), self._key("procs")],
                [self.process_id, round(self.alive_for * 1000)],
            )
        )

    async def _reclaim(self) -> None:
        """After Redis forgot this process: own its live runs again, and stop those whose
        tombstone was set meanwhile (an abort sent while the owner key was missing)."""
        assert self._runtime is not None
        runs = self._runtime.live_runs()
        if not runs:
            return
        tombstoned = await self._scripts["reclaim"](
            [self._key("runs", self.process_id), self._key("sessions", self.process_id)],
            [self.process_id, self.prefix, *(p for r in runs for p in (r.run_id, r.session_key))],
        )
        for run_id in tombstoned:
            with contextlib.suppress(AbortRefused):  # started with allow_cancel=False
                self._runtime.abort(run_id, reason="rpc")
        logger.warning(
            "Redis had forgotten this process (restarted?): %d live runs owned again, %d "
            "stopped by an abort sent meanwhile",
            len(runs),
            len(tombstoned),
        )

    async def _beat(self) -> None:
        while True:
            await trio.sleep(self.heartbeat)
            try:
                if await self._beat_once():  # Redis forgot us: what we relay, too
                    await self._declare(self._relaying_all, added=self._relaying)
                    await self._reclaim()
            except Exception as exc:
                logger.warning("heartbeat failed (Redis unreachable?): %s", str(exc))

    async def _watch(self) -> None:
        """Find dead processes and close their runs (see the module docstring)."""
        assert self._runtime is not None
        while True:
            await trio.sleep(self.heartbeat)
            try:
                dead = await self._scripts["find_dead"](
                    [self._key("procs")],
                    [
                        self._key("alive", ""),
                        self._key("reap", ""),
                        self.process_id,
                        round(max(30.0, 10 * self.alive_for) * 1000),
                    ],
                )
                for process_id in dead:
                    run_ids = sorted(await self._client.smembers(self._key("runs", process_id)))
                    logger.warning(
                        "process %s is dead (no heartbeat for %g s): closing its runs %s",
                        process_id,
                        self.alive_for,
                        ",".join(run_ids) or "(none)",
                    )
                    await self._runtime.close_interrupted(run_ids)
                    await self._forget(process_id)
            except Exception as exc:  # Redis or the store unreachable: try again later
                logger.warning("looking for dead processes failed: %s", str(exc))

    async def _forget(self, process_id: str) -> None:
        await self._scripts["forget"](
            [
                self._key("runs", process_id),
                self._key("procs"),
                self._key("reap", process_id),
                self._key("alive", process_id),
                self._key("sessions", process_id),
                self._key("follows", process_id),
                self._key("followers-all"),
            ],
            [process_id, self.prefix],
        )

    async def _release_loop(self) -> None:
        while True:
            await self._release_wanted.wait()
            try:
                await self._release_now()
            except Exception as exc:
                logger.warning("releasing runs failed, to be retried: %s", str(exc))
                await trio.sleep(self.heartbeat)

    async def _release_now(self) -> None:
        self._release_wanted = trio.Event()
        batch, self._to_release = self._to_release, []
        if not batch:
            return
        try:
            await self._scripts["release"](
                [self._key("runs", self.process_id), self._key("sessions", self.process_id)],
                [self.process_id, self.prefix, *(part for pair in batch for part in pair)],
            )
        except BaseException:
            self._to_release[:0] = batch
            self._release_wanted.set()
            raise
