"""What every model adapter (the Anthropic SDK one and the httpx ones) decides the same way
about a failing provider: which phase a broken connection failed in, and how much of an
error body is read.

Phase, not exception class. A connection that fails before the response headers arrive is
``unavailable``: nothing reached the caller, so the request may be retried. One that breaks
after the headers (or after any output) is ``bad_response``: part of the turn may have been
delivered, so it is never retried. Libraries change which exception class says "the peer
hung up" (the anthropic SDK 2.17 wraps a body that breaks off in ``APIConnectionError``,
earlier releases let httpx2's ``RemoteProtocolError`` through), so adapters classify by the
place they caught the failure: opening the stream, or reading it.

Error bodies: an HTTP error response's body is read up to ``MAX_ERROR_BODY`` bytes and the
connection is then dropped, so a provider (or a proxy) answering with a huge or endless
error body cannot eat memory. ``BoundedBody`` does the reading for any httpx-shaped byte
stream; ``excerpt`` says in the error message that the body was cut.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Final, Literal, Protocol

from runtime import ModelError

MAX_ERROR_BODY: Final = 64 * 1024  # bytes of an HTTP error body that are read, at most

Phase = Literal["connect", "stream"]


def transport_failure(phase: Phase, *, where: str, detail: str) -> ModelError:
    """A connection that failed (refused, reset, closed early), by the phase it failed in.

    ``where`` names the provider ("The provider at http://..."); ``detail`` is what the
    library said, with no secret in it.
    """
    if phase == "stream":
        return ModelError(
            "bad_response",
            f"{where} broke off its response after it had begun ({detail}). The turn is not "
            "retried, since part of it may have been delivered; retry the turn.",
        )
    return ModelError(
        "unavailable",
        f"The connection to {where[0].lower()}{where[1:]} failed before it answered "
        f"({detail}). Check that the server is running and reachable, then try again.",
    )


class _ByteStream(Protocol):
    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class BoundedBody:
    """The first ``limit`` bytes of ``inner``, an httpx (or httpx2) response's byte stream.

    Put it in place of ``response.stream`` before ``response.aread()``: the read then ends
    after ``limit`` bytes (``truncated`` says whether more was there), ``inner`` is closed
    (a half-read connection is discarded, not pooled) and the library's async generators
    under it are run to their end, so none is left for the garbage collector. A subclass
    adds the library's ``AsyncByteStream`` base, which httpx checks for.
    """

    def __init__(self, inner: Any, limit: int = MAX_ERROR_BODY) -> None:
        self._inner: _ByteStream = inner
        self._limit = limit
        self.truncated = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return _Bounded(self, aiter(self._inner))

    async def aclose(self) -> None:
        await self._inner.aclose()


class _Bounded:
    """The iterator of a ``BoundedBody``: a class, so that it strands no generator."""

    def __init__(self, body: BoundedBody, chunks: AsyncIterator[bytes]) -> None:
        self._body = body
        self._chunks = chunks
        self._left = body._limit

    def __aiter__(self) -> _Bounded:
        return self

    async def __anext__(self) -> bytes:
        if self._left <= 0:
            raise StopAsyncIteration
        chunk = await anext(self._chunks)  # its StopAsyncIteration ends ours
        if len(chunk) >= self._left:
            chunk = chunk[: self._left]
            self._left = 0
            await self._finish()
            return chunk
        self._left -= len(chunk)
        return chunk

    async def _finish(self) -> None:
        """The limit is reached: learn whether more was coming, then close the stream and
        run the library's generators to their end (with the connection closed, their next
        read fails or ends at once)."""
        try:
            try:
                more = await anext(self._chunks, b"")
                self._body.truncated = bool(more)
            finally:
                await self._body.aclose()
            async for _ in self._chunks:
                pass
        except Exception:
            # The connection is closed on purpose; what the generators raise about it is
            # expected. Cancelled (a BaseException) still goes through.
            self._body.truncated = True


def excerpt(content: bytes, truncated: bool) -> str:
    """An error body as text for a message: decoded, and marked if it was cut."""
    text = content.decode(errors="replace").strip()
    if truncated:
        return f"{text}... (the error body was longer than {MAX_ERROR_BODY // 1024} KiB)"
    return text
