"""``python -m benchmarks [--quick] [--report PATH] [NAME ...]``: run benchmarks, update
BENCHMARKS.md (a full run) or, with ``--quick`` and no ``--report``, bench-quick/BENCHMARKS.md,
so the committed report and plots always hold a full run.

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
# scale_out and scale_out_throughput need PostgreSQL and Redis installed).
DEFAULT: Final = (
    "provider_close",
    "gateway_stop",
    "peers",
    "streaming",
    "scale",
    "stop_commit",
    "mcp_stop",
)
ON_REQUEST: Final = ("soak", "scale_out", "scale_out_throughput")
ROOT: Final = pathlib.Path(__file__).resolve().parent.parent
REPORT: Final = ROOT / "BENCHMARKS.md"
QUICK_REPORT: Final = ROOT / "bench-quick" / "BENCHMARKS.md"  # ignored by git
HEADER: Final = """# Benchmarks

Written by `python -m benchmarks` (every benchmark but soak; `python -m benchmarks NAME ...`
reruns some and keeps the other sections; `--quick` runs tiny sizes, not for comparison,
and writes to bench-quick/ unless `--report` names a file).
Each section says when, how and on what machine it ran. Plots are in `{plots}/`.
"""


def report_path(quick: bool, report: pathlib.Path | None) -> pathlib.Path:
    """The report a run writes: ``report`` if given, else the committed one for a full
    run and bench-quick/ for a quick one (whose tiny sizes must never replace it)."""
    if report is not None:
        return report
    return QUICK_REPORT if quick else REPORT


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
        part_links = [f"{PLOTS}/{name}-{part.key}.png" for part in section.parts]
        for part, part_link in zip(section.parts, part_links, strict=True):
            draw(part.plot, part.title, report.parent / part_link)
        text = section.markdown(link, part_links)
        sections[name] = text.replace("\n\n", "\n\n" + stamp, 1)
        print(sections[name], f"({name}: {took:.1f} s)\n", sep="\n", flush=True)
        await path.write_text(assemble(HEADER.format(plots=PLOTS), sections, DEFAULT + ON_REQUEST))


if __name__ == "__main__":
    known = DEFAULT + ON_REQUEST
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, under a minute")
    parser.add_argument(
        "--report",
        type=pathlib.Path,
        default=None,
        help=f"where to write (default: {REPORT.name}; with --quick, bench-quick/{REPORT.name})",
    )
    parser.add_argument(
        "names",
        nargs="*",
        help=f"some of: {', '.join(known)} (default: all but {', '.join(ON_REQUEST)})",
    )
    args = parser.parse_args()
    unknown = set(args.names) - set(known)
    if unknown:
        parser.error(f"unknown benchmark {sorted(unknown)}; choose from {', '.join(known)}")
    report = report_path(args.quick, args.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    trio.run(main, args.quick, args.names or list(DEFAULT), report)
    print(f"wrote {report}")
