"""Peers stopping a model stream, each in its own process: ``python peer_driver.py PEER``.

Standalone on purpose (the standard library and httpx, plus kosong for its peer): it runs
in whichever interpreter the peer needs, kosong's in its own virtual environment, never
importing this project. Each trial starts a request to the simulated provider, waits
until the provider has sent the response headers (the sim's connection records say so),
stops the way the peer stops, and prints one JSON line: the stop time, and whether and
when the provider recorded the connection closed by the client (``time.monotonic`` is
one clock for every process on the machine).

Peers: ``kosong`` (the LLM layer of kimi-cli: ``kosong.generate`` on its Anthropic
provider, stopped by cancelling its task as kimi-cli does); ``httpx-cancel`` (a plain
asyncio service streaming with httpx, stopped by ``task.cancel()``); ``cooperative`` (a
stop flag checked between chunks, as kimi-cli issue #2375 describes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable, Coroutine
from typing import Any

import httpx

CONNECTIONS = "/v1/_sim/connections"
SILENT = "Wait for it.\n#sim think=60"
STREAMING = "Keep going.\n#sim words=100000 rate=200"
BUSY_CALLBACK = 0.05  # seconds an on_message_part callback awaits (a UI render, a write)
SETTLE = 0.01  # after the headers, before the stop
CLOSE_BOUND = 2.0  # seconds to wait for the provider to record the close


async def _record(
    probe: httpx.AsyncClient, url: str, ready: Callable[[dict[str, Any]], bool], bound: float
) -> dict[str, Any] | None:
    """The sim's first connection record that is ``ready``, or None after ``bound`` s."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        records: list[dict[str, Any]] = (await probe.get(url + CONNECTIONS)).json()
        for record in records:
            if ready(record):
                return record
        await asyncio.sleep(0.002)
    return None


def _kosong(
    provider: Any, busy: bool
) -> tuple[Callable[[], Coroutine[Any, Any, None]], asyncio.Event]:
    """kimi-cli's model step: ``generate`` with an ``on_message_part`` callback."""
    from kosong import generate  # type: ignore[import-not-found]
    from kosong.message import Message  # type: ignore[import-not-found]

    entered = asyncio.Event()  # the callback is running

    async def on_message_part(part: object) -> None:
        entered.set()
        if busy:
            await asyncio.sleep(BUSY_CALLBACK)

    async def work() -> None:
        history = [Message(role="user", content=STREAMING if busy else SILENT)]
        await generate(provider, "", [], history, on_message_part=on_message_part)

    return work, entered


async def trial(
    peer: str, case: str, silence: float, url: str, client: Any, probe: httpx.AsyncClient
) -> dict[str, Any]:
    """One stop. ``client``: kosong's provider, or the httpx client the others stream on."""
    await probe.delete(url + CONNECTIONS)
    stop_flag = asyncio.Event()
    busy = case == "busy"
    if peer == "kosong":
        work, callback_busy = _kosong(client, busy)
        path = "/v1/messages"
    else:
        path, callback_busy = "/v1/chat/completions", asyncio.Event()
        message = SILENT if peer == "httpx-cancel" else f"Think.\n#sim think={silence} words=20"
        body = {"model": "sim", "stream": True, "messages": [{"role": "user", "content": message}]}

        async def work() -> None:
            async with client.stream("POST", url + path, json=body) as response:
                async for _ in response.aiter_lines():
                    if stop_flag.is_set():
                        break

    task = asyncio.create_task(work())
    opened = await _record(probe, url, lambda r: r["path"] == path and r["status"] == 200, 30)
    if opened is None:
        raise RuntimeError(f"{peer}: the request never reached the provider")
    if busy:
        await callback_busy.wait()
        await asyncio.sleep(BUSY_CALLBACK / 2)  # inside the callback's await
    else:
        await asyncio.sleep(SETTLE)
    asked = time.monotonic()
    if peer == "cooperative":
        stop_flag.set()
    else:
        task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    stopped = time.monotonic()
    closed = await _record(
        probe, url, lambda r: r["id"] == opened["id"] and r["closed_at"] is not None, CLOSE_BOUND
    )
    by_client = closed is not None and closed["closed_by"] == "client"
    return {
        "stop_ms": (stopped - asked) * 1000,
        "closed": by_client,
        "close_ms": (closed["closed_at"] - asked) * 1000 if closed and by_client else None,
    }


async def main(peer: str, case: str, silence: float, url: str, trials: int) -> None:
    async with httpx.AsyncClient() as probe, httpx.AsyncClient(timeout=120) as client:
        if peer == "kosong":
            from kosong.contrib.chat_provider.anthropic import Anthropic  # type: ignore[import-not-found]

            client = Anthropic(model="sim", api_key="bench", base_url=url, default_max_tokens=1024)
        for _ in range(trials):
            print(json.dumps(await trial(peer, case, silence, url, client, probe)), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="peer_driver.py")
    parser.add_argument("peer", choices=("kosong", "httpx-cancel", "cooperative"))
    parser.add_argument("--case", choices=("silent", "busy"), default="silent")
    parser.add_argument("--silence", type=float, default=60.0, help="cooperative: think=S")
    parser.add_argument("--url", required=True)
    parser.add_argument("--trials", type=int, default=10)
    args = parser.parse_args()
    asyncio.run(main(args.peer, args.case, args.silence, args.url, args.trials))
