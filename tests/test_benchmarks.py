"""The benchmarks run (quick mode) so they never rot; their numbers are not asserted."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quick_benchmarks_write_a_report(tmp_path) -> None:
    report = tmp_path / "BENCHMARKS.md"
    subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--report", str(report)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    text = report.read_text()
    assert "quick mode" in text
    for adapter in ("anthropic (SDK)", "openai-compatible (httpx)"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {adapter} |"))
        assert row.endswith("| 10 |")  # every trial completed
    assert "## Stop latency, end to end" in text
    for others in ("0", "10"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {others} | "))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) == 7 and cells[1] == "10"  # every trial completed
        assert (float(cells[-1]) > 0) == (others != "0")  # the other runs did stream
