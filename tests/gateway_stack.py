"""A whole gateway in the test's process: sim provider, OpenAI-compatible adapter, SQLite
file, runtime, WebSocket server on a free port. Tunable where fault tests need it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from adapters.gateway import Gateway
from adapters.openai_compat import open_openai_compat
from adapters.sim import SimServer, serve_sim
from adapters.sqlite_store import SQLiteStore
from runtime import Runtime, Tool


@asynccontextmanager
async def running_gateway(
    db: Path,
    sim: SimServer | None = None,
    *,
    busy_timeout: float = 5.0,
    wrap_store: Callable[[SQLiteStore], Any] = lambda store: store,
    tools: Sequence[Tool] = (),
    **model_options: Any,
) -> AsyncIterator[tuple[Gateway, int]]:
    """A gateway on a free port in front of a runtime on ``sim`` (a fresh one if None)
    and the SQLite file ``db`` (as ``wrap_store`` returns it: the runtime's ``store``);
    ``model_options`` go to ``open_openai_compat``; the runtime has ``tools``."""
    async with trio.open_nursery() as nursery:
        if sim is None:
            sim = await nursery.start(serve_sim)
        async with open_openai_compat(
            model="sim", base_url=sim.base_url + "/v1", **model_options
        ) as model:
            async with SQLiteStore(db, busy_timeout=busy_timeout) as store:
                async with Runtime(model=model, store=wrap_store(store), tools=tools) as rt:
                    gateway = Gateway(rt, tick_interval_ms=200)
                    async with trio.open_nursery() as serving:  # serve ends before the runtime
                        port = await serving.start(gateway.serve, "127.0.0.1", 0)
                        yield gateway, port
                        gateway.shutdown()
        nursery.cancel_scope.cancel()


def send(session: str, message: str, key: str, **extra: Any) -> dict[str, Any]:
    """``chat.send`` params."""
    return {"sessionKey": session, "message": message, "idempotencyKey": key, **extra}
