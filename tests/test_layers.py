"""The layering: one module knows the event loop."""

from __future__ import annotations

import ast
from pathlib import Path

import pgsd

SOURCE = Path(pgsd.__file__).parent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_backend_module_imports_asyncio_or_trio() -> None:
    offenders = sorted(
        path.name
        for path in SOURCE.glob("*.py")
        if path.name != "_backend.py" and imported_modules(path) & {"asyncio", "trio"}
    )
    assert offenders == []
