"""Benchmark fixtures: one server, one event loop per backend, one pool per client.

The short form (``PGSD_BENCH_SHORT=1`` or ``--bench-short``) runs fewer and
smaller rounds; its saved runs go to their own storage so that a comparison
never sets a short run against a full one. ``--bench-gate`` (``just
bench-ci``) fails the session when pgsd falls behind its peers (see
``gate.py``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import psycopg
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from clients import CLIENTS, PEERS, POINT_ROWS, POINT_TABLE, Client
from gate import Check, evaluate
from harness import FULL, POOL_SIZE, SHORT, Bench, Portals, Recorder, Sizes, pg_url
from pgsd.testing import PostgresServer
from report import Result, format_table

SHORT_ENV = "PGSD_BENCH_SHORT"
#: pytest-benchmark's default storage, which the short form moves aside.
_DEFAULT_STORAGE = "file://./.benchmarks"
_RESULTS = pytest.StashKey[list[Result]]()
_GATE = pytest.StashKey[list[Check]]()
#: The table lists scenarios in the order they ran: the modules in this order
#: (first the checks of the measures themselves, which take no time).
_MODULE_ORDER = (
    "test_measures.py",
    "test_pool.py",
    "test_one_shot.py",
    "test_pgbench.py",
    "test_exhaustion.py",
    "test_connect_storm.py",
    "test_memory.py",
)
PGSD_CLIENTS = [client.name for client in CLIENTS if client.is_pgsd]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--bench-short",
        action="store_true",
        default=False,
        help=f"fewer and smaller rounds, for CI (same as {SHORT_ENV}=1)",
    )
    parser.addoption(
        "--bench-gate",
        action="store_true",
        default=False,
        help="fail the session when pgsd falls behind its peers (thresholds in gate.py)",
    )


def _sizes(config: pytest.Config) -> Sizes:
    short = config.getoption("bench_short") or os.environ.get(SHORT_ENV, "") not in ("", "0")
    return SHORT if short else FULL


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RESULTS] = []
    # Before pytest-benchmark reads its options (its hook runs last).
    if _sizes(config) is SHORT and config.getoption("benchmark_storage") == _DEFAULT_STORAGE:
        config.option.benchmark_storage = f"{_DEFAULT_STORAGE}/short"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return _MODULE_ORDER.index(name) if name in _MODULE_ORDER else len(_MODULE_ORDER)

    items.sort(key=rank)  # stable: each module keeps its own order


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    if not config.getoption("bench_gate"):
        return
    results: list[Result] = config.stash[_RESULTS]
    checks = evaluate(results, PGSD_CLIENTS)
    config.stash[_GATE] = checks
    if not all(check.passed for check in checks) and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    results = config.stash.get(_RESULTS, [])
    if results:
        _write_table(terminalreporter, results, _sizes(config))
    checks = config.stash.get(_GATE, None)
    if checks is not None:
        _write_gate(terminalreporter, checks)


def _write_table(reporter: pytest.TerminalReporter, results: list[Result], sizes: Sizes) -> None:
    reporter.write_sep("=", f"pgsd and its peers ({sizes.form} form)")
    order = [client.name for client in CLIENTS]
    for line in format_table(results, order=order, pgsd=PGSD_CLIENTS, peers=PEERS):
        reporter.write_line(line)
    reporter.write_line(
        "vs X: how many times better pgsd's figure was than X's in this run"
        " (above 1: pgsd was faster, waited less or used less memory)"
    )
    reporter.write_line(
        "of pgbench: the client's SELECT 1 queries per second as a share of pgbench's"
    )


def _write_gate(reporter: pytest.TerminalReporter, checks: list[Check]) -> None:
    failed = [check for check in checks if not check.passed]
    verdict = f"FAILED ({len(failed)} of {len(checks)} checks)" if failed else "passed"
    reporter.write_sep("=", f"benchmark gate {verdict}", red=bool(failed), green=not failed)
    for check in checks:
        mark = "ok  " if check.passed else "FAIL"
        reporter.write_line(f"{mark}  {check.name}: {check.detail}")


def pytest_benchmark_update_json(
    config: pytest.Config, benchmarks: list[Any], output_json: dict[str, Any]
) -> None:
    """Save the whole table with the run, pgbench and memory figures included."""
    output_json["pgsd"] = {
        "form": _sizes(config).form,
        "figures": [result.as_dict() for result in config.stash.get(_RESULTS, [])],
    }


@pytest.fixture(scope="session")
def sizes(pytestconfig: pytest.Config) -> Sizes:
    return _sizes(pytestconfig)


@pytest.fixture(scope="session")
def results(pytestconfig: pytest.Config) -> list[Result]:
    """The session's figures, which the final table shows."""
    return pytestconfig.stash[_RESULTS]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    # Room for scenarios that open many connections at once.
    with PostgresServer(settings={"max_connections": "500"}) as server:
        yield server


@pytest.fixture(scope="session")
def server_url(pg_server: PostgresServer) -> str:
    return pg_url(pg_server)


@pytest.fixture(scope="session")
def point_rows(server_url: str) -> int:
    """The point reads' table, created once: ``POINT_ROWS`` rows with ids from 1."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {POINT_TABLE}")
        conn.execute(
            f"CREATE TABLE {POINT_TABLE} (id int PRIMARY KEY, name text NOT NULL,"
            " team int NOT NULL, created timestamptz NOT NULL)"
        )
        conn.execute(
            f"INSERT INTO {POINT_TABLE} SELECT i, 'user ' || i, i %% 50,"
            " '2026-01-01'::timestamptz + i * interval '1 minute'"
            " FROM generate_series(1, %s) AS i",
            (POINT_ROWS,),
        )
        conn.execute(f"VACUUM ANALYZE {POINT_TABLE}")
    return POINT_ROWS


@pytest.fixture(scope="session")
def portals() -> Iterator[Portals]:
    with ExitStack() as stack:
        yield Portals(stack)


@pytest.fixture(params=CLIENTS, ids=[client.name for client in CLIENTS])
def client(request: pytest.FixtureRequest) -> Client:
    result: Client = request.param
    return result


@pytest.fixture
def acquire_timeout() -> float | None:
    """The pools' acquire timeout (None: each library's default); a module may override it."""
    return None


@pytest.fixture
def recorder(client: Client, results: list[Result]) -> Recorder:
    """Records the client's figures, for a test that times nothing itself."""
    return Recorder(client.name, results)


@pytest.fixture
def timed_recorder(benchmark: BenchmarkFixture, client: Client, results: list[Result]) -> Recorder:
    """Records the client's figures and times rounds with pytest-benchmark."""
    return Recorder(client.name, results, benchmark)


@pytest.fixture
def bench(
    benchmark: BenchmarkFixture,
    client: Client,
    portals: Portals,
    server_url: str,
    sizes: Sizes,
    results: list[Result],
    acquire_timeout: float | None,
) -> Iterator[Bench]:
    """The client's pool, open (``POOL_SIZE`` connections) for one benchmark."""
    portal = portals.get(client.backend)
    pool_cm = client.pool.open(server_url, POOL_SIZE, acquire_timeout=acquire_timeout)
    with portal.wrap_async_context_manager(pool_cm) as pool:
        yield Bench(benchmark, client, portal, pool, sizes, results)
