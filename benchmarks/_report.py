"""Summaries and the report file every benchmark shares."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Sequence

import attrs


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
class Section:
    """One benchmark's part of the report: a table and what to read from it."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    notes: str = ""

    def markdown(self) -> str:
        lines = [f"## {self.title}", ""]
        if self.notes:
            lines += [self.notes, ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "---|" * len(self.columns))
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"


def ms(value: float) -> str:
    return f"{value:.2f}"


def machine() -> str:
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )
