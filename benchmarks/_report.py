"""Summaries, sections and the report file every benchmark shares.

The report is one Markdown file made of sections, each fenced by an HTML comment that
names its benchmark, so a run of some benchmarks replaces only their sections and keeps
the others. Each section's plot goes to ``bench-plots/NAME.png`` beside the report.
"""

from __future__ import annotations

import os
import pathlib
import platform
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Final, Literal

import attrs

PLOTS: Final = "bench-plots"  # folder beside the report
_MARK: Final = re.compile(r"^<!-- benchmark: (\w+) -->$", re.MULTILINE)


@attrs.frozen
class Summary:
    trials: int
    median: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        ordered = sorted(values)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        return cls(len(ordered), statistics.median(ordered), p99, ordered[-1])


@attrs.frozen
class Series:
    label: str
    xs: tuple[float | str, ...]  # numbers for a line plot, category names for bars
    ys: tuple[float, ...]


@attrs.frozen
class Plot:
    """A figure for a section: one line (or one group of bars) per series."""

    xlabel: str
    ylabel: str
    series: tuple[Series, ...]
    kind: Literal["line", "bar"] = "line"
    log_x: bool = False
    log_y: bool = False


@attrs.frozen
class Section:
    """One benchmark's part of the report: a table and what to read from it."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    notes: str = ""
    plot: Plot | None = None
    # more tables after the first, each with its own plot (``bench-plots/NAME-KEY.png``)
    parts: tuple[Part, ...] = ()

    def markdown(self, plot_link: str | None = None, part_links: Sequence[str] = ()) -> str:
        lines = [f"## {self.title}", ""]
        if self.notes:
            lines += [self.notes, ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "---|" * len(self.columns))
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if plot_link is not None:
            lines += ["", f"![{self.title}]({plot_link})"]
        for part, link in zip(self.parts, part_links, strict=True):
            lines += ["", f"### {part.title}", "", part.notes, ""]
            lines.append("| " + " | ".join(part.columns) + " |")
            lines.append("|" + "---|" * len(part.columns))
            lines += ["| " + " | ".join(row) + " |" for row in part.rows]
            lines += ["", f"![{part.title}]({link})"]
        return "\n".join(lines) + "\n"


@attrs.frozen
class Part:
    """A further table of a section, with its own notes and plot."""

    key: str  # names its plot file
    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    notes: str
    plot: Plot


def ms(value: float) -> str:
    return f"{value:.2f}"


def ratio(value: float, reference: float) -> str:
    """How many times ``reference`` ``value`` is (``reference`` is ours: 1.0x)."""
    return f"{value / reference:.1f}x" if reference > 0 else "n/a"


def machine() -> str:
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )


def draw(plot: Plot, title: str, path: pathlib.Path) -> None:
    """Write ``plot`` as a PNG (matplotlib's Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4))
    if plot.kind == "line":
        for series in plot.series:
            axes.plot(series.xs, series.ys, marker="o", label=series.label)
    else:
        categories = list(dict.fromkeys(x for series in plot.series for x in series.xs))
        width = 0.8 / len(plot.series)
        for index, series in enumerate(plot.series):
            positions = [categories.index(x) + index * width for x in series.xs]
            axes.bar(positions, series.ys, width, label=series.label)
        ticks = [i + 0.4 - width / 2 for i in range(len(categories))]
        axes.set_xticks(ticks, [str(category) for category in categories])
    axes.set_xscale("log" if plot.log_x else "linear")
    axes.set_yscale("log" if plot.log_y else "linear")
    axes.set(title=title, xlabel=plot.xlabel, ylabel=plot.ylabel)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(exist_ok=True)
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def split(report: str) -> dict[str, str]:
    """The sections of a report written by ``assemble``, by benchmark name."""
    parts = _MARK.split(report)
    return {parts[i]: parts[i + 1].strip("\n") + "\n" for i in range(1, len(parts), 2)}


def assemble(header: str, sections: Mapping[str, str], order: Iterable[str]) -> str:
    """The report: ``header``, then the sections in ``order`` (those that exist)."""
    body = [f"<!-- benchmark: {name} -->\n{sections[name]}" for name in order if name in sections]
    return header.rstrip("\n") + "\n\n" + "\n".join(body)
