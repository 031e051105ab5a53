"""The public surface of ``runtime`` and its import boundary."""

from __future__ import annotations

import ast
import pathlib
import sys

import runtime

ALLOWED = {"trio", "attrs", "cattrs", "runtime"}
ROOT = pathlib.Path(runtime.__file__).parent


def test_runtime_imports_only_trio_attrs_cattrs_and_the_standard_library() -> None:
    offenders = []
    for path in sorted(ROOT.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [] if node.level else [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in ALLOWED and top not in sys.stdlib_module_names:
                    offenders.append(f"{path.name}: {name}")
    assert offenders == []


def test_every_public_name_is_reexported_explicitly() -> None:
    source = (ROOT / "__init__.py").read_text()
    for name in (n for n in dir(runtime) if not n.startswith("_")):
        if name in {"annotations"}:
            continue
        obj = getattr(runtime, name)
        if getattr(obj, "__module__", "").startswith("runtime."):
            assert f"as {name}\n" in source, name
