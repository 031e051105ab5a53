"""A Stop is served as soon as the gateway reads it, never queued behind the connection's
earlier requests; and a Stop naming a send still in that queue waits for it, so "send,
then Stop" always stops the run it sent.

The store is the real SQLite file behind a gate: reading one session's settings (which
``chat.send`` does before admitting a run) waits until the test opens the gate, so a send
is held in the connection's queue for as long as the test needs, without timing.
"""

from __future__ import annotations

from typing import Any

import trio

from adapters.sqlite_store import SQLiteStore
from tests.conftest import IO_BOUND
from tests.gateway_client import open_client
from tests.gateway_stack import running_gateway, send


class GatedStore:
    """SQLiteStore, except that reading the settings of session ``held`` waits for ``gate``."""

    def __init__(self, store: SQLiteStore) -> None:
        self._store = store
        self.gate = trio.Event()
        self.waiting = trio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def get_settings(self, session_key: str) -> Any:
        if session_key == "held":
            self.waiting.set()
            await self.gate.wait()
        return await self._store.get_settings(session_key)


async def test_a_stop_overtakes_a_send_stuck_in_the_queue(sim, tmp_path, nursery) -> None:
    gated = running_gateway(tmp_path / "gated.db", sim, wrap_store=GatedStore)
    async with gated as (gateway, port), open_client(port) as client:
        store = gateway.runtime.store
        with trio.fail_after(IO_BOUND):
            await client.ok("chat.send", send("s", "Wait.\n#sim think=60", "silent"))
            answered = trio.Event()

            async def stuck_send() -> None:
                await client.ok("chat.send", send("held", "Hello.", "held-1"))
                answered.set()

            nursery.start_soon(stuck_send)
            await store.waiting.wait()
            stopped = await client.ok("chat.abort", {"sessionKey": "s", "runId": "silent"})
            assert stopped["aborted"] is True and not answered.is_set()
            await client.wait_chat("silent", "aborted")
            store.gate.set()
            await answered.wait()
            assert (await client.wait_chat("held-1", "final"))["payload"]["state"] == "final"


async def test_a_stop_naming_a_queued_send_stops_that_run(sim, tmp_path) -> None:
    gated = running_gateway(tmp_path / "gated.db", sim, wrap_store=GatedStore)
    async with gated as (gateway, port), open_client(port) as client:
        store = gateway.runtime.store
        with trio.fail_after(IO_BOUND):
            answers: dict[str, Any] = {}

            async def call(method: str, params: dict[str, Any]) -> None:
                answers[method] = await client.ok(method, params)

            async with trio.open_nursery() as calls:
                calls.start_soon(call, "chat.send", send("held", "Go.\n#sim think=60", "held-2"))
                await store.waiting.wait()
                calls.start_soon(call, "chat.abort", {"sessionKey": "held", "runId": "held-2"})
                await trio.sleep(0.2)  # room for a wrong early answer ("no such run") to arrive
                assert answers == {}
                store.gate.set()
            await client.wait_chat("held-2", "aborted")
            assert answers["chat.send"]["status"] == "started"
            assert answers["chat.abort"]["aborted"] is True
            history = await client.ok("chat.history", {"sessionKey": "held"})
            assert history["liveRuns"] == []
