"""The programs in ``examples/`` run against a real server and print what they say."""

from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
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


# -- the web apps: served on a free port of 127.0.0.1, asked over HTTP, stopped by a signal --

#: Bound on a web example's start, and on its stop after the signal.
SERVE_TIMEOUT = 60
#: Straight to 127.0.0.1, whatever proxy the environment names.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Served:
    """A web example's process, the lines it wrote, and the address it serves on."""

    def __init__(self, command: list[str], env: dict[str, str], ready: str) -> None:
        self.process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._wait_for(re.compile(ready + r"(http://127\.0\.0\.1:\d+)")).group(1)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _wait_for(self, pattern: re.Pattern[str]) -> re.Match[str]:
        deadline = time.monotonic() + SERVE_TIMEOUT
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern.pattern}: {self.output}") from None
            if line is None:
                raise AssertionError(f"exited before serving: {self.output}")
            self.output.append(line)
            if match := pattern.search(line):
                return match

    def get(self, path: str) -> tuple[int, object]:
        try:
            with DIRECT.open(self.url + path, timeout=SERVE_TIMEOUT) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            with error:
                return error.code, json.loads(error.read())

    def stop(self, sig: int) -> int:
        """Send ``sig``, wait for the process to end; its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout=SERVE_TIMEOUT)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            assert self.process.stdout is not None
            self.process.stdout.close()
        while (line := self.lines.get(timeout=SERVE_TIMEOUT)) is not None:
            self.output.append(line)
        return code


def check_the_routes(served: Served, pg_server: PostgresServer) -> None:
    assert served.get("/counts/app.items") == (200, {"source": 3, "target": 3, "agree": True})
    pg_server.execute("INSERT INTO app.items VALUES (4)", dbname="example_target")
    try:
        assert served.get("/counts/app.items") == (200, {"source": 3, "target": 4, "agree": False})
    finally:
        pg_server.execute("DELETE FROM app.items WHERE n = 4", dbname="example_target")
    assert served.get("/counts/app.nothing") == (
        404,
        {"error": "no table app.nothing in source, target"},
    )
    assert served.get("/counts/app.items;DROP%20TABLE%20app.items") == (
        400,
        {"error": "give a table as name or schema.name"},
    )
    assert served.get("/health") == (200, {"source": "up", "target": "up"})


@pytest.mark.parametrize("worker", ["asyncio", "trio"])
def test_a_starlette_app_with_the_connector_in_its_lifespan(
    two_databases: tuple[str, str], pg_server: PostgresServer, worker: str
) -> None:
    source, target = two_databases
    served = Served(
        [
            *(sys.executable, "-m", "hypercorn", "--worker-class", worker),
            *("--bind", "127.0.0.1:0", f"{EXAMPLES / 'starlette_app.py'}:app"),
        ],
        clean_env(SOURCE_DSN=source, TARGET_DSN=target),
        ready="Running on ",
    )
    try:
        check_the_routes(served, pg_server)
        status, stats = served.get("/stats")
        assert status == 200
        assert isinstance(stats, dict)
        assert sorted(stats) == ["source", "target"]
        assert all(entry["state"] == "up" and entry["size"] >= 1 for entry in stats.values())
    finally:
        code = served.stop(signal.SIGINT)
    assert code == 0, served.output
    assert not any("Traceback" in line for line in served.output), served.output


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_trio_web_app_served_by_hypercorn(
    two_databases: tuple[str, str], pg_server: PostgresServer, sig: int
) -> None:
    source, target = two_databases
    served = Served(
        [sys.executable, str(EXAMPLES / "trio_web_app.py"), source, target, "0"],
        clean_env(),
        ready="serving on ",
    )
    try:
        check_the_routes(served, pg_server)
    finally:
        code = served.stop(sig)
    assert code == 0, served.output
    assert served.output[-1] == "stopped; pools closed"
    assert not any("Traceback" in line for line in served.output), served.output
