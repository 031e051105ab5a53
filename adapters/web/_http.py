"""Just enough HTTP/1.1 to tell a WebSocket upgrade from a page request, and to serve
the page's few static files (GET and HEAD; anything else is refused, then the connection
closes). The files ship in the package and are read once."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from importlib import resources
from typing import Final
from urllib.parse import urlsplit

import attrs
import trio

MAX_HEAD: Final = 16 * 1024  # bytes a request head may take, the request line included
_READ_SIZE: Final = 4096

# What the page may load: its own files, and a WebSocket back to where it came from.
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

# path -> (file under static/, Content-Type)
PAGE_FILES: Final = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}

_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
}


class BadRequest(Exception):
    """A request head we answer with an error status, then close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@attrs.frozen
class RequestHead:
    method: str
    path: str  # the target without its query
    headers: Mapping[str, str]  # lower-case names
    raw: bytes  # every byte read from the connection, the head and anything after it

    @property
    def wants_websocket(self) -> bool:
        upgrade = self.headers.get("upgrade", "")
        return "websocket" in (token.strip().lower() for token in upgrade.split(","))

    def same_origin(self) -> bool:
        """True unless a browser says the request comes from another site's page."""
        origin = self.headers.get("origin")
        if origin is None:  # not a browser: programs send no Origin
            return True
        return urlsplit(origin).netloc.lower() == self.headers.get("host", "").lower()

    def foreign_name(self) -> str | None:
        """The ``Host`` (or ``Origin``, when a browser sends one) that names something
        other than this machine's loopback (``127.0.0.1``, ``localhost``, ``[::1]``, any
        port), or None when both name loopback. A page on a name that an attacker's DNS
        points at 127.0.0.1 (DNS rebinding) sends its own name in both headers."""
        host = self.headers.get("host", "")
        if not _loopback_netloc(host):
            return f"Host {host!r}" if host else "a request without a Host header"
        origin = self.headers.get("origin")
        if origin is not None:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not _loopback_netloc(parts.netloc):
                return f"Origin {origin!r}"
        return None


LOOPBACK_NAMES: Final = frozenset({"127.0.0.1", "localhost", "::1"})


def _loopback_netloc(netloc: str) -> bool:
    """``127.0.0.1``, ``localhost`` or ``[::1]``, with or without a port (any port: an
    SSH port forward changes it, and a rebinding attack needs a name, not a port)."""
    if "@" in netloc:
        return False
    try:
        parts = urlsplit("//" + netloc)
        parts.port  # noqa: B018 (raises ValueError for a malformed port)
    except ValueError:
        return False
    return parts.hostname in LOOPBACK_NAMES and parts.netloc == netloc


async def read_head(stream: trio.abc.ReceiveStream) -> RequestHead | None:
    """Read up to the end of the request head. None: the peer left before it ended."""
    buffer = bytearray()
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        if len(buffer) > MAX_HEAD:
            raise BadRequest(431, "The request head is too large.")
        chunk = await stream.receive_some(_READ_SIZE)
        if not chunk:
            return None
        buffer += chunk
    if end > MAX_HEAD:
        raise BadRequest(431, "The request head is too large.")
    lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(400, "This server speaks HTTP/1.1 and WebSocket only.")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise BadRequest(400, "A request header is malformed.")
        key = name.lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return RequestHead(parts[0], parts[1].partition("?")[0], headers, bytes(buffer))


async def answer(stream: trio.abc.SendStream, head: RequestHead) -> None:
    """Serve one of the page's files, or say why not."""
    if head.method not in ("GET", "HEAD"):
        await send_error(stream, 405, "Only GET and HEAD are served here.", allow="GET, HEAD")
        return
    found = PAGE_FILES.get(head.path)
    if found is None:
        await send_error(stream, 404, "There is no such page here; the chat is at /.")
        return
    name, content_type = found
    body = _read_file(name)
    await stream.send_all(
        _response(200, content_type, body, head_only=head.method == "HEAD", extra=[])
    )


async def send_error(
    stream: trio.abc.SendStream, status: int, message: str, *, allow: str | None = None
) -> None:
    extra = [] if allow is None else [("Allow", allow)]
    body = (message + "\n").encode()
    await stream.send_all(
        _response(status, "text/plain; charset=utf-8", body, head_only=False, extra=extra)
    )


def _response(
    status: int, content_type: str, body: bytes, *, head_only: bool, extra: list[tuple[str, str]]
) -> bytes:
    headers = [
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),
        ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),
        ("Connection", "close"),
        *extra,
    ]
    lines = [f"HTTP/1.1 {status} {_REASONS[status]}", *(f"{k}: {v}" for k, v in headers)]
    return "\r\n".join([*lines, "", ""]).encode("latin-1") + (b"" if head_only else body)


@functools.cache
def _read_file(name: str) -> bytes:
    return resources.files("adapters.web").joinpath("static", name).read_bytes()
