"""The README's ten-line embedding example runs as printed, against the simulated provider."""

from __future__ import annotations

import os
import pathlib
import re
import sys

import trio

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def ten_line_example() -> str:
    section = README.read_text().split("## Embedding in ten lines", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, "the README lost its embedding example"
    return match.group(1)


async def test_the_embedding_example_stops_a_run_and_keeps_its_partial(sim, tmp_path) -> None:
    script = tmp_path / "embed.py"
    script.write_text(ten_line_example())
    env = os.environ | {"OPENAI_BASE_URL": sim.base_url + "/v1", "OPENAI_API_KEY": "unused"}
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, str(script)], cwd=tmp_path, env=env, capture_stdout=True
        )
    printed = done.stdout.decode()
    assert printed.startswith("RunCancelled("), printed
    assert "reason='rpc'" in printed and "policy='keep_partial'" in printed, printed
    assert "TextBlock(text='Rivers" in printed, printed  # the partial reply was kept
    assert (tmp_path / "chat.db").exists()
