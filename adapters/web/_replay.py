"""A stream that first gives back bytes already read from it.

The gateway reads a connection's request head to tell a page request from a WebSocket
upgrade; trio-websocket must then see the whole upgrade request, so the bytes read are
replayed before the socket's own."""

from __future__ import annotations

from typing import final

import trio


@final
class ReplayStream(trio.abc.Stream):
    def __init__(self, stream: trio.abc.Stream, already_read: bytes) -> None:
        self._stream = stream
        self._pending = already_read

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if not self._pending:
            return await self._stream.receive_some(max_bytes)
        await trio.lowlevel.checkpoint()
        size = len(self._pending) if max_bytes is None else max_bytes
        chunk, self._pending = self._pending[:size], self._pending[size:]
        return chunk

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()
