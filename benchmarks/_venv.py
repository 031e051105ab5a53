"""The peers' own virtual environments, built on first use under ``.bench-venvs/``.

kosong needs Python >= 3.12 and, for its Anthropic provider, anthropic 1.x (it breaks on
2.x), so it cannot share our environment. The build is pinned and marked complete only
once pip succeeded, so a half-built environment is rebuilt rather than used.
"""

from __future__ import annotations

import pathlib
import subprocess
import time
from typing import Final

import attrs
import trio

ROOT: Final = pathlib.Path(__file__).resolve().parent.parent / ".bench-venvs"
PYTHON_312: Final = "/root/.pyenv/versions/3.12.1/bin/python"
KOSONG_PINS: Final = ("kosong==0.56.0", "anthropic==1.17.0")


@attrs.frozen
class Venv:
    """A peer's interpreter, or why there is none (``python`` None, ``note`` says why)."""

    python: pathlib.Path | None
    note: str  # the pinned versions and how long the build took, or the failure


async def kosong_venv() -> Venv:
    return await _venv("kosong", KOSONG_PINS)


async def _venv(name: str, pins: tuple[str, ...]) -> Venv:
    folder = trio.Path(ROOT / name)
    python, ready = folder / "bin" / "python", folder / ".complete"
    pinned = ", ".join(pins)
    if await ready.exists() and (await ready.read_text()) == pinned:
        return Venv(pathlib.Path(python), f"{pinned} (Python 3.12; venv already built)")
    started = time.monotonic()
    try:
        await _check([PYTHON_312, "-m", "venv", "--clear", str(folder)])
        await _check(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *pins]
        )
    except (OSError, subprocess.CalledProcessError) as failure:
        return Venv(None, f"cannot build the {name} venv ({pinned}): {_why(failure)}")
    await ready.write_text(pinned)
    took = time.monotonic() - started
    return Venv(pathlib.Path(python), f"{pinned} (Python 3.12; venv built in {took:.0f} s)")


async def _check(command: list[str]) -> None:
    await trio.run_process(command, capture_stdout=True, capture_stderr=True)


def _why(failure: BaseException) -> str:
    if isinstance(failure, subprocess.CalledProcessError):
        lines = (failure.stderr or b"").decode(errors="replace").strip().splitlines()
        errors = [line for line in lines if "ERROR" in line] or lines or ["(no output)"]
        return f"exit {failure.returncode}: {errors[-1]}"
    return str(failure)
