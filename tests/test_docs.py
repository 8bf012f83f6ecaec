"""The code in README.md and docs/ runs, so that the documentation cannot drift from the code.

Every Python block is compiled, and every ``pgsd`` name it uses, and every
method it calls on a ``pool``, a ``connector`` or a ``conn``, must exist. A
block after a ``<!-- doctest -->`` comment is run against the session's
server on asyncio and on trio: a program's ``main()`` is awaited (the lines
that start an event loop are left out, the test supplies it), a fragment
(``<!-- doctest: fragment -->``) runs inside a coroutine with ``pool``,
``connector``, ``conn`` and ``db_config`` at hand, and the blocks marked
``<!-- doctest: pytest FILE -->`` are written to those files and run by a
pytest of their own. Every DSN in a run block
is pointed at the server, keeping its database name; a ``print(...)`` with a
trailing ``# comment`` must print the comment's text.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

import pgsd
from pgsd.testing import PostgresServer
from support import CLI_TIMEOUT, clean_env

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

#: The databases run blocks name in their DSNs, created for this module.
DATABASES = ("app", "source", "target", "audit")
TABLES = (
    "CREATE TABLE users (id int PRIMARY KEY, name text, team int, seen timestamptz)",
    "INSERT INTO users VALUES (42, 'Ada', 7, NULL)",
    "CREATE TABLE events (kind text)",
)
#: What a variable of this name is in the docs, for checking the methods called on it.
RECEIVERS = {
    "pool": pgsd.ConnectionPool,
    "connector": pgsd.DatabaseConnector,
    "conn": pgsd.Connection,
}
#: Calls that start an event loop: a run block's test supplies the loop instead.
LOOP_STARTS = {("anyio", "run"), ("asyncio", "run"), ("trio", "run")}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    code: str
    mode: str | None  # None: compiled and checked only; "program" or "fragment": run

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def python_blocks() -> list[Block]:
    blocks = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        i = 0
        while i < len(lines):
            if lines[i].strip() == "```python":
                start = i + 1
                end = lines.index("```", start)
                marker = lines[i - 1].strip() if i else ""
                mode = None
                if marker == "<!-- doctest -->":
                    mode = "program"
                elif marker == "<!-- doctest: fragment -->":
                    mode = "fragment"
                elif marker.startswith("<!-- doctest: pytest "):
                    mode = "pytest " + marker.split()[3]  # a file of a pytest run
                elif marker.startswith("<!-- doctest"):
                    raise AssertionError(f"{page}:{i}: unknown marker {marker}")
                code = textwrap.dedent("\n".join(lines[start:end])) + "\n"
                blocks.append(Block(page, start + 1, code, mode))
                i = end
            i += 1
    return blocks


BLOCKS = python_blocks()
RUN_BLOCKS = [block for block in BLOCKS if block.mode in ("program", "fragment")]
PYTEST_BLOCKS = [block for block in BLOCKS if block.mode and block.mode.startswith("pytest ")]


def test_the_docs_have_blocks_to_run() -> None:
    pages = {block.page.name for block in RUN_BLOCKS}
    assert {"README.md", "index.md", "cancellation.md", "production.md"} <= pages
    assert len(RUN_BLOCKS) >= 8


@pytest.mark.parametrize("block", BLOCKS, ids=lambda block: block.name)
def test_a_python_block_compiles_and_names_what_exists(block: Block) -> None:
    tree = compile(
        block.code, block.name, "exec", ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    )
    assert isinstance(tree, ast.Module)
    missing = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "pgsd":
            module = importlib.import_module(node.module or "pgsd")
            gone = [alias.name for alias in node.names if not hasattr(module, alias.name)]
            missing += [f"{node.module}.{name}" for name in gone]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            receiver = node.value.id
            if receiver == "pgsd" and not hasattr(pgsd, node.attr):
                missing.append(f"pgsd.{node.attr}")
            elif receiver in RECEIVERS and not hasattr(RECEIVERS[receiver], node.attr):
                missing.append(f"{RECEIVERS[receiver].__name__}.{node.attr}")
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "pgsd"
            and node.value.attr in {"testing", "prometheus", "opentelemetry"}
        ):
            module = importlib.import_module(f"pgsd.{node.value.attr}")
            if not hasattr(module, node.attr):
                missing.append(f"pgsd.{node.value.attr}.{node.attr}")
    assert not missing, f"{block.name} uses names pgsd does not have: {sorted(missing)}"


def test_the_name_check_finds_a_name_that_is_gone() -> None:
    block = Block(ROOT / "README.md", 1, "pool.fetchrows()\npgsd.Pool\n", None)
    with pytest.raises(AssertionError, match=r"ConnectionPool\.fetchrows.*pgsd\.Pool"):
        test_a_python_block_compiles_and_names_what_exists(block)


# -- running ---------------------------------------------------------------------------


def test_the_testing_guide_runs_as_a_test_suite(tmp_path: Path) -> None:
    """The guide's conftest.py and test files, as a reader would copy them, pass."""
    files = {block.mode.split()[1]: block.code for block in PYTEST_BLOCKS if block.mode}
    assert sorted(files) == ["conftest.py", "test_faults.py", "test_users.py"]
    for name, code in files.items():
        (tmp_path / name).write_text(code)
    tests = sum(code.count("\nasync def test_") for code in files.values())
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{2 * tests} passed" in result.stdout  # each test on asyncio and on trio


@pytest.fixture(scope="module")
def doc_server(pg_server: PostgresServer) -> Iterator[PostgresServer]:
    """The session's server with the databases and tables the docs' examples use."""
    for dbname in DATABASES:
        pg_server.execute(f"CREATE DATABASE doc_{dbname}")
        for statement in TABLES:
            pg_server.execute(statement, dbname=f"doc_{dbname}")
    try:
        yield pg_server
    finally:
        for dbname in DATABASES:
            pg_server.execute(f"DROP DATABASE IF EXISTS doc_{dbname} WITH (FORCE)")


def point_at(code: str, server: PostgresServer) -> str:
    """Every DSN in ``code`` pointed at ``server``, keeping its database's name."""

    def replace(match: re.Match[str]) -> str:
        dbname = match.group(1).split("?")[0]
        assert dbname in DATABASES, f"add {dbname!r} to DATABASES"
        return server.dsn(f"doc_{dbname}")

    return re.sub(r"postgresql://[^\"'/]*/([^\"']*)", replace, code)


def without_loop_starts(tree: ast.Module) -> ast.Module:
    def starts_loop(node: ast.stmt) -> bool:
        return (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Attribute)
            and isinstance(node.value.func.value, ast.Name)
            and (node.value.func.value.id, node.value.func.attr) in LOOP_STARTS
        )

    tree.body = [node for node in tree.body if not starts_loop(node)]
    return tree


def expected_prints(code: str) -> list[str | None]:
    """For each ``print`` call in source order, the text its trailing comment says."""
    lines = code.splitlines()
    calls = [
        node
        for node in ast.walk(ast.parse(code))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "print"
    ]
    expected = []
    for call in sorted(calls, key=lambda call: call.lineno):
        line = lines[call.lineno - 1]
        comment = line[call.end_col_offset or 0 :].partition("#")[2].strip()
        expected.append(comment or None)
    return expected


@pytest.fixture
async def doc_connector(
    doc_server: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[pgsd.DatabaseConnector]:
    """A connector of the docs' databases, with the same as ``pgsd.toml`` in the cwd."""
    toml = "[pool]\nmax_size = 5\n" + "".join(
        f'[databases.{name}]\ndsn = "{doc_server.dsn(f"doc_{name}")}"\n'
        for name in ("app", "source", "target")
    )
    (tmp_path / "pgsd.toml").write_text(toml)
    monkeypatch.chdir(tmp_path)
    async with pgsd.DatabaseConnector(pgsd.load_config("pgsd.toml")) as connector:
        yield connector


@pytest.mark.anyio
@pytest.mark.parametrize("block", RUN_BLOCKS, ids=lambda block: block.name)
async def test_a_doc_example_runs_and_prints_what_it_says(
    block: Block,
    doc_server: PostgresServer,
    doc_connector: pgsd.DatabaseConnector,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = point_at(block.code, doc_server)
    namespace: dict[str, Any] = {"__name__": "doc_example"}
    if block.mode == "fragment":
        namespace |= {"pgsd": pgsd, "anyio": anyio, "connector": doc_connector}
        namespace["pool"] = doc_connector.pool("app")
        namespace["db_config"] = doc_connector.config.databases["app"]
        source = "async def main(conn):\n" + textwrap.indent(code, "    ")
    else:
        source = code
    tree = without_loop_starts(ast.parse(source, block.name))
    exec(compile(tree, block.name, "exec"), namespace)  # the docs' own code
    with anyio.fail_after(60):
        if block.mode == "fragment":
            async with doc_connector.get_connection("source") as conn:
                await namespace["main"](conn)
        else:
            await namespace["main"]()
    printed = capsys.readouterr().out.splitlines()
    expected = expected_prints(code)
    assert len(printed) == len(expected), (printed, expected)
    for got, want in zip(printed, expected, strict=True):
        if want is not None:
            assert got == want, f"{block.name} printed {got!r} where its comment says {want!r}"


# -- the API reference -----------------------------------------------------------------

#: The modules whose public names (``__all__``) the API reference renders.
REFERENCE_MODULES = ("pgsd", "pgsd.testing", "pgsd.prometheus", "pgsd.opentelemetry")


def reference_objects() -> Iterator[tuple[str, Any]]:
    """Each public name and each public method of a public class, as griffe reads them.

    griffe is what the site's reference is rendered from (``docs/reference.md``):
    what it finds no docstring for, the reference does not show.
    """
    import griffe  # mkdocstrings' reader, a development dependency

    for module_name in REFERENCE_MODULES:
        package = griffe.load(module_name, search_paths=[str(ROOT / "src")])
        for name in importlib.import_module(module_name).__all__:
            obj = package[name]
            obj = obj.final_target if obj.is_alias else obj
            yield f"{module_name}.{name}", obj
            if obj.is_class:
                for member_name, member in obj.members.items():
                    member = member.final_target if member.is_alias else member
                    if not member_name.startswith("_") and member.is_function:
                        yield f"{module_name}.{name}.{member_name}", member


def resolve_exception(name: str) -> type[BaseException] | None:
    import builtins

    import psycopg

    for root in (pgsd, importlib.import_module("pgsd.testing"), builtins, psycopg):
        obj: Any = root
        parts = name.removeprefix(f"{root.__name__}.").split(".")
        for part in parts:
            obj = getattr(obj, part, None)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            return obj
    return None


def test_exception_names_resolve_only_to_exceptions() -> None:
    import psycopg

    assert resolve_exception("PoolTimeout") is pgsd.PoolTimeout
    assert resolve_exception("psycopg.OperationalError") is psycopg.OperationalError
    assert resolve_exception("ServerNotFound") is not None
    assert resolve_exception("pgsd.NoSuchError") is None
    assert resolve_exception("ConnectionPool") is None


def test_the_api_reference_documents_every_public_name_and_the_exceptions_it_names() -> None:
    from griffe import DocstringSectionKind

    undocumented, unknown = [], []
    seen = 0
    for path, obj in reference_objects():
        seen += 1
        if obj.docstring is None:
            if obj.is_function or obj.is_class or obj.is_module:
                undocumented.append(path)
            continue
        for section in obj.docstring.parse("google"):
            if section.kind is DocstringSectionKind.raises:
                for item in section.value:
                    names = [name.strip() for name in str(item.annotation).strip("()").split(",")]
                    unknown += [f"{path}: {name}" for name in names if not resolve_exception(name)]
    assert seen > 100
    assert not undocumented, f"no docstring, so not in the API reference: {undocumented}"
    assert not unknown, f"Raises names what is not an exception: {unknown}"
