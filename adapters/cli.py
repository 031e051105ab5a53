"""The ``trio-agent`` command: ``serve`` the gateway, ``chat`` and ``history`` against it,
``sim`` for the simulated model provider alone."""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from adapters._migrations import SchemaTooNew
from adapters.chat_client import DEFAULT_SESSION, DEFAULT_URL, chat, history
from adapters.gateway import DEFAULT_PORT, Gateway, UnsafeBind, check_bind, read_token_file
from adapters.openai_compat import open_openai_compat
from adapters.postgres_store import PostgresStoreError
from adapters.sim import main as sim_main
from adapters.sim import serve_sim
from adapters.sqlite_store import SQLiteStoreError, default_db_path
from adapters.stores import describe, open_store
from runtime import AbortBus, LocalAbortBus, Model, Runtime, Tool

logger = logging.getLogger("adapters.cli")

TOKEN_ENV = "TRIO_AGENT_TOKEN"
PROVIDERS = ("sim", "anthropic", "openai", "openai-responses", "gemini")


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "sim":
        sim_main(["--host", args.host, "--port", str(args.port)])
        return
    try:
        if args.command == "serve":
            sys.exit(serve(args))
        elif args.command == "chat":
            sys.exit(trio.run(chat, args.url, args.token, args.session, args.message))
        else:
            sys.exit(trio.run(history, args.url, args.token, args.session, args.limit))
    except KeyboardInterrupt:  # Ctrl-C where no signal receiver was open
        sys.exit(130)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-agent", description="An LLM agent runtime whose Stop button really stops."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def token(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--token",
            default=os.environ.get(TOKEN_ENV) or None,
            help=f"shared token (default: ${TOKEN_ENV})",
        )

    serve_ = commands.add_parser("serve", help="serve the WebSocket gateway")
    serve_.add_argument("--host", default="127.0.0.1")
    serve_.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0: any free port)")
    token(serve_)
    serve_.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="file of 'name token' lines; each name reaches only the sessions 'name:...'",
    )
    serve_.add_argument(
        "--db",
        default=None,
        help="where the history is kept: a SQLite file (default: under $XDG_DATA_HOME), or "
        "a postgresql:// URL to share it between several gateway processes",
    )
    serve_.add_argument(
        "--bus",
        default=None,
        metavar="URL",
        help="Redis (redis://host:port or unix:///path.sock) that carries stops between "
        "gateway processes sharing a postgresql:// --db; default: this process alone",
    )
    serve_.add_argument("--provider", choices=PROVIDERS, default="sim")
    serve_.add_argument("--model", help='model name (required but for the sim: "sim")')
    serve_.add_argument(
        "--mcp",
        action="append",
        default=[],
        type=_mcp_server,
        metavar="NAME=COMMAND|NAME=URL",
        help="tools from an MCP server: a command to start (split as a shell would), or a "
        "streamable HTTP URL; repeatable",
    )
    serve_.add_argument(
        "--tool-timeout",
        action="append",
        default=[],
        type=_tool_timeout,
        metavar="TOOL=SECONDS",
        help="end a call of this MCP tool as an error after SECONDS (the server is told); "
        "repeatable",
    )
    serve_.add_argument(
        "--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )

    for name, help_ in (("chat", "send a message, print the reply"), ("history", "print it")):
        sub = commands.add_parser(name, help=help_)
        sub.add_argument("--url", default=DEFAULT_URL)
        token(sub)
        sub.add_argument("--session", default=DEFAULT_SESSION, help="session key")
    commands.choices["chat"].add_argument("message")
    commands.choices["history"].add_argument("--limit", type=int, default=200)

    sim = commands.add_parser("sim", help="serve the simulated model provider on 127.0.0.1")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=0, help="port (0: any free port)")
    return parser


def _mcp_server(option: str) -> Any:
    from adapters.mcp import parse_server  # the SDK is slow to import: only when asked

    try:
        return parse_server(option)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _tool_timeout(option: str) -> tuple[str, float]:
    name, _, seconds = option.partition("=")
    try:
        value = float(seconds)
    except ValueError:
        value = math.nan
    if not name or not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(
            f"--tool-timeout {option!r}: write TOOL=SECONDS with SECONDS a positive number."
        )
    return name, value


def serve(args: argparse.Namespace) -> int:
    if args.model is None and args.provider != "sim":
        print(
            f"trio-agent serve: --provider {args.provider} needs --model (the model's name)",
            file=sys.stderr,
        )
        return 2
    try:
        args.tokens = read_token_file(args.token_file, args.token) if args.token_file else {}
        check_bind(args.host, args.token, args.tokens)  # before anything listens
    except (UnsafeBind, OSError, ValueError) as refusal:
        print(f"trio-agent: {refusal}", file=sys.stderr)
        return 2
    logging.basicConfig(stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("runtime", "adapters"):
        logging.getLogger(name).setLevel(args.log_level)
    # The collector's full passes over a gateway with 1000 live runs took ~200 ms each,
    # the stop latency's tail: leave start-up's objects out of them, and make them rarer.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    failure: BaseException | None = None
    try:
        trio.run(_serve, args)
    except* (CannotStart, OSError) as group:  # no API key; the port is taken; ...
        failure = group
        while isinstance(failure, BaseExceptionGroup):
            failure = failure.exceptions[0]
    if failure is not None:
        print(f"trio-agent: cannot serve on {args.host}:{args.port}: {failure}", file=sys.stderr)
        return 2
    return 0


class CannotStart(Exception):
    """The provider cannot start (no API key, say): one line for the user, exit 2."""


async def _serve(args: argparse.Namespace) -> None:
    db: str | Path = args.db or default_db_path()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with AsyncExitStack() as stack:
            try:
                model = await stack.enter_async_context(
                    _open_model(args.provider, args.model or "sim")
                )
            except ValueError as exc:
                raise CannotStart(str(exc)) from None
            try:
                store = await stack.enter_async_context(open_store(db))
            except (PostgresStoreError, SQLiteStoreError, SchemaTooNew) as exc:
                raise CannotStart(str(exc)) from None
            # Opened before the runtime, so closed after it: the runtime's shutdown stops
            # its runs (telling the servers of calls in flight) while they are still up.
            tools = await _open_tools(stack, args) if args.mcp else ()
            bus = _abort_bus(args.bus) if args.bus else LocalAbortBus()
            try:
                runtime = await stack.enter_async_context(
                    Runtime(model=model, store=store, tools=tools, abort_bus=bus)
                )
            except* Exception as group:
                bus_errors = [e for e in _leaves(group) if type(e).__name__ == "RedisBusError"]
                if bus_errors:
                    raise CannotStart(str(bus_errors[0])) from None
                raise
            gateway = Gateway(runtime, token=args.token, tokens=args.tokens)
            async with trio.open_nursery() as nursery:

                async def serve_then_stop_watching(
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
                ) -> None:
                    await gateway.serve(args.host, args.port, task_status=task_status)
                    nursery.cancel_scope.cancel()

                port = await nursery.start(serve_then_stop_watching)
                _announce(args, port, db, [tool.name for tool in tools])
                await _watch_signals(signals, gateway)


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def _abort_bus(url: str) -> AbortBus:
    from adapters.redis_bus import RedisAbortBus  # only when asked: coredis is slow to import

    return RedisAbortBus(url)


async def _open_tools(stack: AsyncExitStack, args: argparse.Namespace) -> tuple[Tool, ...]:
    from adapters.mcp import MCPToolError, open_mcp_tools

    try:
        mcp = await stack.enter_async_context(
            open_mcp_tools(args.mcp, tool_timeouts=dict(args.tool_timeout))
        )
    except* MCPToolError as group:
        raise CannotStart(str(group.exceptions[0])) from None
    return mcp.tools


def _announce(args: argparse.Namespace, port: int, db: str | Path, tools: list[str]) -> None:
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"ws://{host}:{port}"
    print(f"trio-agent gateway on {url} (provider {args.provider}, db {describe(db)})")
    print(f"chat page: http://{host}:{port}/")
    if tools:
        print(f"tools (MCP): {', '.join(tools)}")
    connect = "trio-agent chat" + ("" if url == DEFAULT_URL else f" --url {url}")
    token = f" --token ... (or ${TOKEN_ENV})" if args.token else ""
    print(f'talk to it: {connect}{token} "hello"; Ctrl-C stops it', flush=True)


async def _watch_signals(signals: AsyncIterator[int], gateway: Gateway) -> None:
    """The first signal shuts down gracefully; a second one exits at once."""
    stopping = False
    async for signum in signals:
        name = signal.Signals(signum).name
        if stopping:
            print(f"trio-agent: {name} again, exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)  # the store's checkpoints cover what was in flight
        stopping = True
        logger.info("%s: shutting down (runs are stopped, partials kept)", name)
        gateway.shutdown()


@asynccontextmanager
async def _open_model(provider: str, model: str) -> AsyncIterator[Model]:
    """The provider's adapter; ``sim`` also runs the simulated provider in-process."""
    if provider == "anthropic":
        from adapters.anthropic import open_anthropic  # the SDK is slow to import

        async with open_anthropic(model=model) as anthropic:
            yield anthropic
    elif provider == "openai":
        async with open_openai_compat(model=model) as openai:
            yield openai
    elif provider == "openai-responses":
        from adapters.openai_responses import open_openai_responses

        async with open_openai_responses(model=model) as responses:
            yield responses
    elif provider == "gemini":
        from adapters.gemini import open_gemini

        async with open_gemini(model=model) as gemini:
            yield gemini
    else:
        async with trio.open_nursery() as nursery:
            sim = await nursery.start(serve_sim)
            # api_key="": the user's OPENAI_API_KEY has no business going to the sim
            async with open_openai_compat(
                model=model, base_url=sim.base_url + "/v1", api_key=""
            ) as simulated:
                yield simulated
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    main()
