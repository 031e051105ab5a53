"""CI installs from .ci/requirements.lock only (``pip install --require-hashes``), and the
project itself with ``--no-deps``: so a package named in pyproject.toml but missing from
the lock would surface as a confusing ImportError somewhere. These tests say what to run
instead: ``bash .ci/refresh-lock``."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / ".ci" / "requirements.lock"
FIX = "Run `bash .ci/refresh-lock` and commit .ci/requirements.lock with pyproject.toml."

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def _pins() -> dict[str, tuple[Version, str]]:
    """Each locked package: its version and its whole entry (with the hash lines)."""
    entries = re.split(r"\n(?=[A-Za-z0-9])", LOCK.read_text())
    pins: dict[str, tuple[Version, str]] = {}
    for entry in entries:
        if match := _PIN.match(entry):
            pins[canonicalize_name(match[1])] = (Version(match[2]), entry)
    return pins


def _required() -> list[Requirement]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        pyproject = tomllib.load(f)
    names = [
        *pyproject["project"]["dependencies"],
        *pyproject["project"]["optional-dependencies"]["dev"],
        *pyproject["build-system"]["requires"],
        "pip",
    ]
    return [Requirement(name) for name in names]


def test_the_lock_pins_every_requirement_within_its_range() -> None:
    pins = _pins()
    for requirement in _required():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is in pyproject.toml but not locked. {FIX}"
        version, _ = pins[name]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"The lock pins {name}=={version}, outside pyproject.toml's {requirement}. {FIX}"
        )


def test_every_locked_package_is_hashed() -> None:
    pins = _pins()
    assert len(pins) > 20
    for name, (_, entry) in pins.items():
        assert "--hash=sha256:" in entry, f"{name} has no hash in the lock. {FIX}"
