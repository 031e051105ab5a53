"""The ``trio-agent`` command."""

from __future__ import annotations

import argparse
import sys

from adapters.sim import main as sim_main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="trio-agent", description="An LLM agent runtime whose Stop button really stops."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sim = commands.add_parser("sim", help="serve the simulated model provider on 127.0.0.1")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=0, help="port (0: any free port)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "sim":
        sim_main(["--host", args.host, "--port", str(args.port)])


if __name__ == "__main__":
    main()
