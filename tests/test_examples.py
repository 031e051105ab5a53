"""Each example runs, against the simulated provider, and does what it says."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("flags", [[], ["--anthropic"]])
def test_embed_in_service_stops_text_and_a_tool(flags, tmp_path) -> None:
    db = tmp_path / "demo.db"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "embed_in_service.py"), "--db", str(db), *flags],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    out = result.stdout
    assert out.count("stopped: reason=rpc policy=keep_partial") == 2
    assert "provider saw the connection closed by the client" in out
    assert "tool lookup (call_sim0001" in out or "tool lookup (toolu_" in out
    assert ": cancelled" in out
    history = out.split("3. The history")[1].split("\n")[1:]
    roles = [line.split()[0] for line in history if line.strip()]
    assert roles == ["user", "assistant", "user", "assistant", "tool"]
    assert db.exists()
