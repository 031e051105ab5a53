"""Who a connection is: token checks, named principals, and a limit on failed attempts.

One shared token (``Gateway(token=...)``, ``--token``) admits the single tenant, who
reaches every session. Named tokens (``Gateway(tokens={"alice": ...})``,
``--token-file``) admit principals, each confined to the session keys and run ids that
begin with its name and a colon. The rule is a function of the key alone, so a refusal
never says whether someone else's session exists.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final, final

import attrs

MAX_FAILURES: Final = 5  # failed token attempts an address may make ...
FAILURE_WINDOW: Final = 60.0  # ... within this many seconds; then it waits
MAX_ADDRESSES: Final = 4096  # addresses remembered; the least recently failed go first

_NAME: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# the main session: agent:<agent id>:<main key>, as in OpenClaw; the page's and the
# CLI's default session (adapters/chat_client.DEFAULT_SESSION)
DEFAULT_AGENT_ID: Final = "main"
MAIN_KEY: Final = "main"


@final
@attrs.frozen
class Principal:
    """Who a connection acts for. ``name`` None: the single tenant, who reaches all."""

    name: str | None = None

    @property
    def prefix(self) -> str:
        """What every key this principal names must begin with; "" for the single tenant."""
        return "" if self.name is None else f"{self.name}:"

    @property
    def main_session_key(self) -> str:
        """The main session inside the namespace: hello-ok tells it, and with it the
        prefix, to the client (docs/protocol.md, "Access")."""
        return f"{self.prefix}agent:{DEFAULT_AGENT_ID}:{MAIN_KEY}"

    def owns(self, key: str) -> bool:
        """Whether a session key or run id is this principal's to see and touch."""
        return key.startswith(self.prefix)


def check_tokens(tokens: Mapping[str, str], shared: str | None = None) -> None:
    """Refuse bad names, empty or repeated tokens. The messages never quote a token."""
    seen = {shared}
    for name, token in tokens.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(
                f"Token name {name!r} is not allowed: use 1 to 64 letters, digits, '_', '.' "
                "or '-' (a name prefixes its session keys, so it has no colon)."
            )
        if not isinstance(token, str) or not token or token.split() != [token]:
            raise ValueError(f"The token of {name!r} must be non-empty text without spaces.")
        if token in seen:
            raise ValueError(
                f"The token of {name!r} is also another name's or the shared one; give each "
                "its own."
            )
        seen.add(token)


def identify(given: str, token: str | None, tokens: Mapping[str, str]) -> Principal | None:
    """The principal ``given`` is the token of, or None.

    Every candidate is compared, in constant time, as SHA-256 digests: the time taken
    depends neither on how much of a token matches nor on its length, nor on which
    principal matched.
    """
    digest = _digest(given)
    candidates: list[tuple[str | None, str]] = [] if token is None else [(None, token)]
    candidates += tokens.items()
    found: Principal | None = None
    for name, secret in candidates:
        if hmac.compare_digest(digest, _digest(secret)) and found is None:
            found = Principal(name)
    return found


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def read_token_file(path: Path, shared: str | None = None) -> dict[str, str]:
    """Named tokens from a file of ``name token`` lines (``#`` comments, blank lines),
    checked as ``check_tokens`` does."""
    tokens: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if len(words) != 2:
            raise ValueError(f"{path}:{number}: write one 'name token' pair per line.")
        name, token = words
        if name in tokens:
            raise ValueError(f"{path}:{number}: {name!r} is named twice.")
        tokens[name] = token
    if not tokens:
        raise ValueError(f"{path} names no tokens; write one 'name token' pair per line.")
    check_tokens(tokens, shared)
    return tokens


@final
@attrs.define(eq=False)
class FailureLimiter:
    """Failed token attempts per client address, over a sliding window.

    An address with ``max_failures`` failures in the last ``window`` seconds is refused,
    whatever token it sends, until the oldest of them is ``window`` old. A success does
    not clear the count: with named tokens, one principal could otherwise guess another's
    token between its own good logins. IPv6 addresses count per /64, the block one host
    usually holds. At most ``max_addresses`` addresses are remembered.
    """

    max_failures: int = MAX_FAILURES
    window: float = FAILURE_WINDOW
    max_addresses: int = MAX_ADDRESSES
    clock: Callable[[], float] = time.monotonic
    _failures: OrderedDict[str, deque[float]] = attrs.field(factory=OrderedDict, init=False)

    def retry_after(self, address: str) -> float | None:
        """Seconds until ``address`` may try a token again; None if it may now."""
        key = _bucket(address)
        times = self._failures.get(key)
        if times is None:
            return None
        wait = times[0] + self.window - self.clock()
        if times[-1] + self.window <= self.clock():
            del self._failures[key]  # all of them have expired
        return wait if len(times) >= self.max_failures and wait > 0 else None

    def record_failure(self, address: str) -> None:
        key = _bucket(address)
        times = self._failures.pop(key, None) or deque(maxlen=self.max_failures)
        times.append(self.clock())
        self._failures[key] = times  # now the most recent
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)

    def __len__(self) -> int:
        return len(self._failures)


def _bucket(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
