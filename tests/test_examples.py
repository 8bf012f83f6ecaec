"""The programs in ``examples/`` run against a real server and print what they say."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgsd.testing import PostgresServer
from support import CLI_TIMEOUT, clean_env

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


@pytest.fixture(scope="module")
def two_databases(pg_server: PostgresServer) -> Iterator[tuple[str, str]]:
    """``source`` and ``target`` DSNs: two databases with a table ``app.items`` each."""
    pg_server.execute("CREATE DATABASE example_source")
    pg_server.execute("CREATE DATABASE example_target")
    try:
        for dbname, rows in (("example_source", 3), ("example_target", 3)):
            pg_server.execute("CREATE SCHEMA app", dbname=dbname)
            pg_server.execute("CREATE TABLE app.items (n int)", dbname=dbname)
            pg_server.execute(
                f"INSERT INTO app.items SELECT generate_series(1, {rows})", dbname=dbname
            )
        yield pg_server.dsn("example_source"), pg_server.dsn("example_target")
    finally:
        for dbname in ("example_source", "example_target"):
            pg_server.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")


@pytest.mark.parametrize("program", ["compare_counts_asyncio.py", "compare_counts_trio.py"])
def test_comparing_row_counts_across_two_databases(
    two_databases: tuple[str, str], pg_server: PostgresServer, program: str
) -> None:
    source, target = two_databases
    same = run_example(program, source, target, "app.items")
    assert same.returncode == 0, same.stderr
    assert same.stdout.splitlines() == [
        "source: 3 rows in app.items",
        "target: 3 rows in app.items",
        "the counts agree",
    ]
    pg_server.execute("INSERT INTO app.items VALUES (4)", dbname="example_target")
    try:
        differ = run_example(program, source, target, "app.items")
    finally:
        pg_server.execute("DELETE FROM app.items WHERE n = 4", dbname="example_target")
    assert differ.returncode == 1, differ.stderr
    assert differ.stdout.splitlines()[1:] == ["target: 4 rows in app.items", "the counts differ"]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_cache_invalidated_by_listen(pg_server: PostgresServer, backend: str) -> None:
    try:
        result = run_example("cache_invalidation.py", pg_server.dsn(), backend)
    finally:
        pg_server.execute("DROP TABLE IF EXISTS example_users")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "user 1 is Ada",
        "user 1 changed: forgotten",
        "user 1 is Ada Lovelace",
    ]
