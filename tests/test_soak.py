"""The soak runs (quick mode, about 40 s) so it never rots; its numbers are not asserted,
but what the clients saw of the invariants is: no violation, nothing left running."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quick_soak_writes_its_section_and_plot_and_sees_no_violation(tmp_path) -> None:
    report = tmp_path / "soak.md"
    subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--quick", "--report", str(report)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    text = report.read_text()
    assert text.startswith("## Soak")
    assert "- Violations seen by the clients: 0 (none)." in text
    assert "](bench-plots/soak.png)" in text
    assert (tmp_path / "bench-plots" / "soak.png").read_bytes().startswith(b"\x89PNG")
    drained = next(line for line in text.splitlines() if line.startswith("| drained |"))
    cells = [cell.strip() for cell in drained.strip("|").split("|")]
    live, queued, started, finished, aborted, failed = (int(cells[i]) for i in (3, 4, 7, 8, 9, 10))
    assert (live, queued) == (0, 0)  # no run left in the registry
    assert started > 0 and finished + aborted + failed == started
