"""The benchmarks run (quick mode) so they never rot; their numbers are not asserted.

One quick run of every benchmark (about a minute, plus the kosong venv's one-time build
under .bench-venvs/), then a rerun of one benchmark that must keep the other sections.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.__main__ import DEFAULT
from benchmarks._report import split


def _bench(report: Path, *names: str) -> None:
    command = [sys.executable, "-m", "benchmarks", "--quick", "--report", str(report), *names]
    done = subprocess.run(command, timeout=900, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def _rows(section: str) -> list[list[str]]:
    """The table's rows (header and rule left out), as lists of stripped cells."""
    lines = [line for line in section.splitlines() if line.startswith("|")][2:]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def _row(rows: list[list[str]], *first: str) -> list[str]:
    found = [row for row in rows if tuple(row[: len(first)]) == first]
    assert len(found) == 1, f"no single row starting {first!r} in {rows}"
    return found[0]


@pytest.mark.slow
def test_quick_benchmarks_write_a_report(tmp_path: Path) -> None:
    report = tmp_path / "BENCHMARKS.md"
    _bench(report)
    text = report.read_text()
    sections = split(text)
    assert list(sections) == list(DEFAULT)  # every benchmark; soak only when named
    assert all("quick mode" in section for section in sections.values())
    for name, section in sections.items():
        if name != "provider_close":
            assert f"](bench-plots/{name}.png)" in section
            assert (tmp_path / "bench-plots" / f"{name}.png").stat().st_size > 0

    for adapter in (
        "anthropic (SDK)",
        "openai-compatible (httpx)",
        "openai-responses (httpx)",
        "gemini (httpx)",
    ):
        row = next(line for line in text.splitlines() if line.startswith(f"| {adapter} |"))
        assert row.endswith("| 10 |")  # every trial completed

    main, load_part = sections["gateway_stop"].split("\n### ", 1)
    assert "](bench-plots/gateway_stop-load.png)" in load_part
    assert (tmp_path / "bench-plots" / "gateway_stop-load.png").stat().st_size > 0
    load = _rows(load_part)
    assert _row(load, "10", "subscribed client")[2] == "5"  # every trial completed
    operator = _row(load, "10", "subscribed client; an operator reads all")
    assert operator[2] == "5" and operator[9] == "10/10 of 10"  # every text exact
    stops = _rows(main)
    assert len(stops) == 4
    for others in ("0", "10"):
        for provider in ("silent", "streaming"):
            row = _row(stops, others, provider)
            assert len(row) == 8 and row[2] == "10"  # every trial completed
        silent = _row(stops, others, "silent")
        assert (float(silent[-1]) > 0) == (others != "0")  # the other runs did stream

    peers = _rows(sections["peers"])
    for adapter in ("openai-compatible (httpx)", "anthropic (SDK)"):
        for case in ("silent", "streaming"):
            assert _row(peers, f"ours, {adapter}", case)[2:7:4] == ["5", "5/5"]
    kosong = "kosong (kimi-cli's LLM layer), Anthropic provider, task.cancel()"
    for case in ("silent", "streaming, on_message_part busy"):
        row = _row(peers, kosong, case)
        assert row[2] == "5", f"kosong did not run: {row[-1]}"
        assert row[-1].startswith("kosong==")  # the pinned versions are printed
    assert _row(peers, "asyncio + httpx, task.cancel()", "silent")[2] == "5"
    for silence in ("0.1", "0.3"):
        assert (
            _row(peers, "cooperative stop flag (kimi-cli #2375)", f"silent {silence} s")[2] == "3"
        )

    streaming = _rows(sections["streaming"])
    assert _row(streaming, "added latency per delta, provider → WebSocket client, ms")[-1] == "50"
    assert _row(streaming, "clients that got every word from deltaText alone", "10")[2] == "10/10"
    for clients in ("1", "10"):
        assert float(_row(streaming, "deltas per second through the gateway", clients)[2]) > 0
        # CPU time is counted in clock ticks (10 ms): a quick run can honestly read 0.
        assert float(_row(streaming, "gateway CPU seconds per 1,000 deltas", clients)[2]) >= 0

    scale = _rows(sections["scale"])
    assert _row(scale, "gateway memory per idle connection, at 20")
    assert _row(scale, "gateway memory per live run, at 20")
    for size in ("1", "10"):
        assert _row(scale, f"abort a session of {size} runs, ms")[-1] == "3"

    commits = _rows(sections["stop_commit"])
    for store in ("SQLite file", "MemoryStore"):
        for words in ("0", "100", "1000"):
            assert _row(commits, store, words)[2] == "10"

    tools = _rows(sections["mcp_stop"])
    assert len(tools) == 3
    for kind in ("in-process tool", "MCP over stdio", "MCP over streamable HTTP"):
        row = _row(tools, kind)
        assert len(row) == 7 and row[1] == "3"  # every trial's server was told

    # A rerun of one benchmark replaces its section and keeps the others as they were.
    _bench(report, "stop_commit")
    again = split(report.read_text())
    assert list(again) == list(DEFAULT)
    assert {k: v for k, v in again.items() if k != "stop_commit"} == {
        k: v for k, v in sections.items() if k != "stop_commit"
    }
    assert len(_rows(again["stop_commit"])) == 6


def test_a_quick_run_never_writes_the_committed_report() -> None:
    from benchmarks.__main__ import QUICK_REPORT, REPORT, report_path

    assert report_path(quick=True, report=None) == QUICK_REPORT != REPORT
    assert QUICK_REPORT.parent.name == "bench-quick"  # plots go beside it, in bench-quick/
    assert report_path(quick=False, report=None) == REPORT
    assert report_path(quick=True, report=Path("x.md")) == Path("x.md")  # --report decides
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", str(QUICK_REPORT)], cwd=REPORT.parent, check=False
    )
    assert ignored.returncode == 0  # never committed by accident


@pytest.mark.slow
def test_quick_scale_out_throughput(tmp_path: Path) -> None:
    """One gateway against two on private PostgreSQL and Redis servers (run on request
    only, so not in the run of every benchmark above)."""
    from tests.services import _postgres_bin

    if _postgres_bin() is None or shutil.which("redis-server") is None:
        pytest.skip("needs PostgreSQL's server binaries and redis-server")
    report = tmp_path / "BENCHMARKS.md"
    _bench(report, "scale_out_throughput")
    section = split(report.read_text())["scale_out_throughput"]
    assert "quick mode" in section and "target 1.7x" in section
    assert (tmp_path / "bench-plots" / "scale_out_throughput.png").stat().st_size > 0
    rows = _rows(section)
    assert [row[:2] for row in rows] == [
        ["1 gateway, sweep", "4"],
        ["1 gateway, sweep", "8"],
        ["1 gateway at L/2", "4"],
        ["2 gateways at L/2", "4"],
        ["2 gateways at L", "8"],
    ]
    for row in rows:
        assert len(row) == 17 and float(row[3]) > 0 and float(row[4]) > 0  # deltas arrived
        assert all(float(cores) >= 0 for cores in row[5].split(" + "))
    assert len(_row(rows, "2 gateways at L")[5].split(" + ")) == 2  # both gateways sampled
    for label in ("1 gateway at L/2", "2 gateways at L"):
        assert _row(rows, label)[11] == "3"  # every stop trial completed
        # the gateway's part of a stop (abort to commit end) is within the whole stop
        assert 0 < float(_row(rows, label)[15]) <= float(_row(rows, label)[14])
