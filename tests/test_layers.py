"""The layering: who may import whom, one module knows the event loop, and sizes.

The library is in layers (docs/architecture.md); a module imports only
from its own layer or the ones below. ``pgsd.testing`` stands apart: it
imports nothing of the library, and the library loads it only inside the
function that runs the embedded demo.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pgsd

SOURCE = Path(pgsd.__file__).parent

#: The library's layers, lowest first; each module is in exactly one.
LAYERS: dict[str, set[str]] = {
    "vocabulary": {"_errors", "_stats"},
    "configuration": {
        "_dsn",
        "_version",
        "_permissions",
        "_validate",
        "_credentials",
        "_replica_config",
        "_config",
        "_config_file",
        "_backoff",
    },
    "backend": {"_backend"},
    "connection": {"_internals", "_driver", "_attempts", "_connection"},
    "pool": {"_pool"},
    "connector": {"_reports", "_verifying", "_runtime", "_connector"},
    "interface": {
        "_check",
        "_watch",
        "_cli",
        "__main__",
        "prometheus",
        "opentelemetry",
        "__init__",
    },
}
#: No module over this many lines, no class over CLASS_LINES.
MODULE_LINES = 600
CLASS_LINES = 350


def library_modules() -> list[Path]:
    return sorted(path for path in SOURCE.rglob("*.py") if "testing" not in path.parts)


def top_name(path: Path) -> str:
    """The name of the top-level module or package *path* belongs to (``_pool``)."""
    return path.relative_to(SOURCE).parts[0].removesuffix(".py")


def layer_of(name: str) -> int:
    for number, members in enumerate(LAYERS.values()):
        if name in members:
            return number
    raise AssertionError(f"pgsd.{name} is in no layer: add it to LAYERS and docs/architecture.md")


def imports(path: Path, *, top_level_only: bool) -> list[tuple[int, str]]:
    """(line, pgsd module) for each import of the library in *path*."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: list[tuple[int, str]] = []
    package_depth = len(path.relative_to(SOURCE).parts) - 1
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level <= package_depth:
                    continue  # inside its own package
                if node.module:
                    found.append((node.lineno, node.module.split(".")[0]))
                else:  # from . import name: a module, or a name of the package
                    found.extend((node.lineno, _module_or_package(a.name)) for a in node.names)
            elif node.module and node.module.split(".")[0] == "pgsd":
                found.append((node.lineno, ".".join(node.module.split(".")[1:2]) or "__init__"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "pgsd":
                    found.append((node.lineno, parts[1] if len(parts) > 1 else "__init__"))
    return found


def _module_or_package(name: str) -> str:
    known = name == "testing" or any(name in members for members in LAYERS.values())
    return name if known else "__init__"


def imported_top_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_backend_module_imports_asyncio_or_trio() -> None:
    offenders = sorted(
        str(path.relative_to(SOURCE))
        for path in SOURCE.rglob("*.py")
        if path.name != "_backend.py" and imported_top_modules(path) & {"asyncio", "trio"}
    )
    assert offenders == []


def test_every_module_is_in_one_layer() -> None:
    names = {top_name(path) for path in library_modules()}
    placed = [name for members in LAYERS.values() for name in members]
    assert len(placed) == len(set(placed))
    assert names <= set(placed), sorted(names - set(placed))


def test_modules_import_only_from_their_layer_or_below() -> None:
    upward: list[str] = []
    for path in library_modules():
        own = top_name(path)
        for line, name in imports(path, top_level_only=False):
            if name == "testing":
                continue  # see the next test
            if layer_of(name) > layer_of(own):
                upward.append(f"{path.relative_to(SOURCE)}:{line} imports pgsd.{name}")
    assert upward == []


def test_the_library_loads_pgsd_testing_only_inside_a_function() -> None:
    at_import = [
        f"{path.relative_to(SOURCE)}:{line}"
        for path in library_modules()
        for line, name in imports(path, top_level_only=True)
        if name == "testing"
    ]
    assert at_import == []


def test_pgsd_testing_imports_nothing_of_the_library() -> None:
    offenders = [
        f"{path.relative_to(SOURCE)}:{line} imports pgsd.{name}"
        for path in sorted((SOURCE / "testing").rglob("*.py"))
        for line, name in imports(path, top_level_only=False)
        if name != "testing"
    ]
    assert offenders == []


@pytest.mark.parametrize("path", library_modules(), ids=lambda path: str(path.relative_to(SOURCE)))
def test_modules_and_classes_stay_small(path: Path) -> None:
    lines = path.read_text().count("\n")
    assert lines <= MODULE_LINES, f"{lines} lines: split it by responsibility"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            assert size <= CLASS_LINES, f"class {node.name}: {size} lines"
