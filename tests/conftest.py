"""Test policy (after trio-websocket's):

- Everything that talks over a socket uses 127.0.0.1 and port 0, never a fixed port.
- Every test that does I/O is bounded by a generous ``trio.fail_after`` against hangs;
  time is never asserted tightly (speed is measured in ``benchmarks/``, not here).
- Time-dependent tests of the core run on ``autojump_clock`` and touch no sockets.
- Warnings are errors (pyproject), so an unclosed stream or generator fails the test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Bound for one test's I/O; generous on purpose (a 2-core CI machine may be busy).
IO_BOUND = 30.0


@pytest.fixture
def io_bound() -> float:
    return IO_BOUND


@pytest.fixture
async def sim(nursery):  # type: ignore[no-untyped-def]
    """A running simulated model provider (``adapters.sim.SimServer``) for one test."""
    from adapters.sim import serve_sim

    return await nursery.start(serve_sim)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        help="run the property tests' long mode (10,000 stop schedules), before a release",
    )


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A child process's environment: no token from the caller, no writes to the real home."""
    env = {k: v for k, v in os.environ.items() if k != "TRIO_AGENT_TOKEN"}
    return env | {"XDG_DATA_HOME": str(tmp_path / "data")}
