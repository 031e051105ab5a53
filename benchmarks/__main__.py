"""``python -m benchmarks [--quick] [NAME ...]``: run benchmarks, update BENCHMARKS.md.

Naming some benchmarks reruns only those: their sections of an existing report are
replaced and the others kept. Each benchmark is a module with
``async def run(quick: bool) -> Section``, imported only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import pathlib
import time
from typing import Final

import trio

from ._report import PLOTS, assemble, draw, machine, split

# Run in this order by default; ON_REQUEST ones only when named (soak takes 10 minutes;
# scale_out needs PostgreSQL and Redis installed).
DEFAULT: Final = (
    "provider_close",
    "gateway_stop",
    "peers",
    "streaming",
    "scale",
    "stop_commit",
    "mcp_stop",
)
ON_REQUEST: Final = ("soak", "scale_out")
REPORT: Final = pathlib.Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
HEADER: Final = """# Benchmarks

Written by `python -m benchmarks` (every benchmark but soak; `python -m benchmarks NAME ...`
reruns some and keeps the other sections; `--quick` runs tiny sizes, not for comparison).
Each section says when, how and on what machine it ran. Plots are in `{plots}/`.
"""


async def main(quick: bool, names: list[str], report: pathlib.Path) -> None:
    """Run the benchmarks named, writing the report after each one."""
    path = trio.Path(report)
    sections = split(await path.read_text()) if await path.exists() else {}
    mode = "quick mode: tiny sizes, not for comparison" if quick else "full run"
    for name in names:
        started = time.monotonic()
        module = importlib.import_module(f"{__package__}.{name}")
        drawn_by_itself = "plots" in inspect.signature(module.run).parameters  # soak
        plots = {"plots": report.parent / PLOTS} if drawn_by_itself else {}
        section = await module.run(quick, **plots)
        took = time.monotonic() - started
        link = None
        if section.plot is not None:
            link = f"{PLOTS}/{name}.png"
            draw(section.plot, section.title, report.parent / link)
        load = f"load average {os.getloadavg()[0]:.1f} at the end"  # a busy machine is noisy
        stamp = f"_{mode}, {time.strftime('%Y-%m-%d')}, {took:.0f} s; {machine()}; {load}._\n\n"
        text = section.markdown(link)
        sections[name] = text.replace("\n\n", "\n\n" + stamp, 1)
        print(sections[name], f"({name}: {took:.1f} s)\n", sep="\n", flush=True)
        await path.write_text(assemble(HEADER.format(plots=PLOTS), sections, DEFAULT + ON_REQUEST))


if __name__ == "__main__":
    known = DEFAULT + ON_REQUEST
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, under a minute")
    parser.add_argument("--report", type=pathlib.Path, default=REPORT)
    parser.add_argument(
        "names", nargs="*", help=f"some of: {', '.join(known)} (default: all but soak)"
    )
    args = parser.parse_args()
    unknown = set(args.names) - set(known)
    if unknown:
        parser.error(f"unknown benchmark {sorted(unknown)}; choose from {', '.join(known)}")
    trio.run(main, args.quick, args.names or list(DEFAULT), args.report)
    print(f"wrote {args.report}")
