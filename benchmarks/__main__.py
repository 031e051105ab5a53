"""``python -m benchmarks [--quick]``: run every benchmark, write BENCHMARKS.md."""

from __future__ import annotations

import argparse
import pathlib
import time

import trio

from . import gateway_stop, provider_close
from ._report import machine

BENCHMARKS = {"provider_close": provider_close.run, "gateway_stop": gateway_stop.run}
REPORT = pathlib.Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


async def main(quick: bool, names: list[str]) -> str:
    """Run the benchmarks named; return the report's text."""
    sections = []
    for name in names:
        started = time.monotonic()
        section = await BENCHMARKS[name](quick)
        print(section.markdown())
        print(f"({name}: {time.monotonic() - started:.1f} s)\n", flush=True)
        sections.append(section.markdown())
    mode = "quick mode: tiny sizes, not for comparison" if quick else "full run"
    header = (
        "# Benchmarks\n\nWritten by `python -m benchmarks`"
        f" ({mode}) on {time.strftime('%Y-%m-%d')}; machine: {machine()}.\n\n"
    )
    return header + "\n".join(sections)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, under a minute")
    parser.add_argument("--report", type=pathlib.Path, default=REPORT)
    parser.add_argument("names", nargs="*", help=f"some of: {', '.join(BENCHMARKS)} (default all)")
    args = parser.parse_args()
    unknown = set(args.names) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark {sorted(unknown)}; choose from {', '.join(BENCHMARKS)}")
    args.report.write_text(trio.run(main, args.quick, args.names or list(BENCHMARKS)))
    print(f"wrote {args.report}")
