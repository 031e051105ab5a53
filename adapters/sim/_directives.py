"""The ``#sim key=value ...`` line that scripts one simulated reply.

A test steers the sim through the conversation itself, so the client under test needs no
side channel: the last user text message carries a line such as
``#sim words=40 rate=200 think=2``. A bad line is the test author's mistake, so it is
rejected with a message that names the key rather than being half-obeyed.

Keys (all optional; the first ``#sim`` line of the message counts):

- ``words=N`` reply length in words (default 150, or 12 after the tool results are in);
  ``rate=R`` words per second (default 30), one word per delta.
- ``think=S`` S seconds of silence after the response headers, before the first byte;
  thinking text follows when the request enabled thinking (it does with or without S).
- ``pause_at=K:S`` S seconds of silence after text word K (0: before the first word).
- ``tool=NAME`` call NAME with ``{"text": "..."}`` arguments streamed in fragments, until
  ``repeat=N`` (default 1) results for it follow the user's message; then a text reply.
  ``args=JSON`` (a JSON object, after every other key: it takes the rest of the line)
  gives the call these arguments instead, e.g. ``#sim tool=research args={"topic": "x"}``.
- ``fail=429|500|529`` that HTTP error at once (``retry_after=S``, default 1, sets the
  429's retry-after header); ``fail=reset`` drops the connection, ``fail=garbage`` sends a
  malformed event, ``fail=error_event`` sends a provider error event and ends the
  response, ``fail=refusal`` ends the turn as a refusal (stop_reason refusal; OpenAI:
  content_filter; Gemini: SAFETY), each after the third delta. ``fail_count=K`` fails
  only the first K requests carrying this exact line. ``error_bytes=N`` (with
  fail=429|500|529) pads the error body to N bytes and sends it in 64 KiB pieces,
  stopping if the client hangs up: a provider answering with a huge error body.
- ``max_tokens=N`` answers as if the request's output limit were N deltas: the text
  reply stops after N words, and a tool call's arguments after N fragments (the call
  never completes), each ending the turn with max_tokens.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal, get_args

import attrs

PREFIX: Final = "#sim"

FailKind = Literal["429", "500", "529", "reset", "garbage", "error_event", "refusal"]
HTTP_FAILS: Final[frozenset[str]] = frozenset({"429", "500", "529"})

DEFAULT_RATE: Final = 30.0  # words per second when no rate= is given
_TOOL_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")  # the providers' tool name rule


class DirectiveError(ValueError):
    """The directive line is wrong; ``key`` names the offending key (or token)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@attrs.frozen
class Directive:
    """What one request asks the sim to do. The defaults are the no-directive reply."""

    words: int | None = None  # None: the full default reply (or a short one after a tool)
    rate: float = DEFAULT_RATE
    think: float = 0.0
    pause_at: tuple[int, float] | None = None  # (after word K, silent for S seconds)
    tool: str | None = None
    args: Mapping[str, Any] | None = None  # None: {"text": ...} with a few reply words
    repeat: int = 1
    fail: FailKind | None = None
    retry_after: float = 1.0
    fail_count: int | None = None  # None: fail every request carrying this line
    error_bytes: int | None = None  # pad an HTTP error body to this many bytes
    max_tokens: int | None = None  # overrides the request's output limit (in deltas)
    line: str = ""  # the directive line as written, which keys fail_count


def find_line(text: str) -> str | None:
    """The first ``#sim`` line in ``text``, stripped, or None."""
    for raw in text.splitlines():
        line = raw.strip()
        if line == PREFIX or line.startswith((PREFIX + " ", PREFIX + "\t")):
            return line
    return None


def parse_directive(text: str) -> Directive:
    """The directive in a user message's text; the default one if it has no ``#sim`` line.

    Raises ``DirectiveError`` for an unknown key, a repeated key, or a bad value.
    """
    line = find_line(text)
    if line is None:
        return Directive()
    values: dict[str, Any] = {}
    keys, has_args, args = line[len(PREFIX) :].partition(" args=")
    if has_args:
        values["args"] = _args("args", args.strip())
    for token in keys.split():
        key, eq, value = token.partition("=")
        if not eq:
            raise DirectiveError(
                token, f"#sim directive token {token!r} is not of the form key=value."
            )
        parser = _PARSERS.get(key)
        if parser is None:
            known = ", ".join([*_PARSERS, "args"])
            raise DirectiveError(
                key, f"Unknown #sim directive key {key!r}; the known keys are: {known}."
            )
        if key in values:
            raise DirectiveError(key, f"#sim directive key {key!r} is given twice.")
        values[key] = parser(key, value)
    fail = values.get("fail")
    if "fail_count" in values and fail is None:
        raise DirectiveError("fail_count", "#sim directive key 'fail_count' needs fail=... too.")
    if "retry_after" in values and fail != "429":
        raise DirectiveError("retry_after", "#sim directive key 'retry_after' needs fail=429.")
    if "error_bytes" in values and fail not in HTTP_FAILS:
        raise DirectiveError(
            "error_bytes", "#sim directive key 'error_bytes' needs fail=429, 500 or 529."
        )
    for key in ("repeat", "args"):
        if key in values and "tool" not in values:
            raise DirectiveError(key, f"#sim directive key {key!r} needs tool=NAME too.")
    return Directive(line=line, **values)


def _int(key: str, value: str, *, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise DirectiveError(
            key, f"#sim directive key {key!r} needs a whole number >= {minimum}, got {value!r}."
        )
    return number


def _number(key: str, value: str, *, positive: bool = False) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        bound = "> 0" if positive else ">= 0"
        raise DirectiveError(
            key, f"#sim directive key {key!r} needs a finite number {bound}, got {value!r}."
        )
    return number


def _pause_at(key: str, value: str) -> tuple[int, float]:
    word, colon, seconds = value.partition(":")
    if not colon:
        raise DirectiveError(
            key, f"#sim directive key {key!r} needs WORD:SECONDS (e.g. 5:2.5), got {value!r}."
        )
    return _int(key, word, minimum=0), _number(key, seconds)


def _tool(key: str, value: str) -> str:
    if not _TOOL_NAME.fullmatch(value):
        raise DirectiveError(
            key,
            f"#sim directive key {key!r} needs a tool name of 1-64 letters, digits, "
            f"'_' or '-', got {value!r}.",
        )
    return value


def _args(key: str, value: str) -> Mapping[str, Any]:
    try:
        args = json.loads(value)
    except ValueError:
        args = None
    if not isinstance(args, dict):
        raise DirectiveError(
            key,
            f"#sim directive key {key!r} needs a JSON object (the rest of the line), "
            f"got {value!r}.",
        )
    return args


def _fail(key: str, value: str) -> str:
    kinds = get_args(FailKind)
    if value not in kinds:
        raise DirectiveError(
            key, f"#sim directive key {key!r} needs one of {', '.join(kinds)}, got {value!r}."
        )
    return value


_PARSERS: Final[dict[str, Callable[[str, str], Any]]] = {
    "words": lambda key, value: _int(key, value, minimum=0),
    "rate": lambda key, value: _number(key, value, positive=True),
    "think": _number,
    "pause_at": _pause_at,
    "tool": _tool,
    "repeat": lambda key, value: _int(key, value, minimum=1),
    "fail": _fail,
    "retry_after": _number,
    "fail_count": lambda key, value: _int(key, value, minimum=1),
    "error_bytes": lambda key, value: _int(key, value, minimum=1),
    "max_tokens": lambda key, value: _int(key, value, minimum=0),
}
