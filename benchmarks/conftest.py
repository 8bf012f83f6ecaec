"""Benchmark fixtures: one server, one event loop per backend, one pool per client.

The short form (``PGSD_BENCH_SHORT=1`` or ``--bench-short``) runs fewer and
smaller rounds; its saved runs go to their own storage so that a comparison
never sets a short run against a full one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from clients import CLIENTS, PEERS, Client
from harness import FULL, SHORT, Bench, Portals, Sizes
from pgsd.testing import PostgresServer
from report import Result, format_table

SHORT_ENV = "PGSD_BENCH_SHORT"
#: Every pool under test has this many connections, opened before timing.
POOL_SIZE = 5
#: pytest-benchmark's default storage, which the short form moves aside.
_DEFAULT_STORAGE = "file://./.benchmarks"
_RESULTS = pytest.StashKey[list[Result]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--bench-short",
        action="store_true",
        default=False,
        help=f"fewer and smaller rounds, for CI (same as {SHORT_ENV}=1)",
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


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    results = config.stash.get(_RESULTS, [])
    if not results:
        return
    sizes = _sizes(config)
    terminalreporter.write_sep(
        "=", f"pgsd and its peers: medians of {sizes.rounds} rounds ({sizes.form} form)"
    )
    order = [client.name for client in CLIENTS]
    pgsd = [client.name for client in CLIENTS if client.is_pgsd]
    for line in format_table(results, order=order, pgsd=pgsd, peers=PEERS):
        terminalreporter.write_line(line)
    terminalreporter.write_line(
        "vs X: how many times faster pgsd was than X in this run (above 1: pgsd is faster)"
    )


@pytest.fixture(scope="session")
def sizes(pytestconfig: pytest.Config) -> Sizes:
    return _sizes(pytestconfig)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    # Room for scenarios that open many connections at once.
    with PostgresServer(settings={"max_connections": "500"}) as server:
        yield server


@pytest.fixture(scope="session")
def portals() -> Iterator[Portals]:
    with ExitStack() as stack:
        yield Portals(stack)


@pytest.fixture(params=CLIENTS, ids=[client.name for client in CLIENTS])
def client(request: pytest.FixtureRequest) -> Client:
    result: Client = request.param
    return result


@pytest.fixture
def bench(
    benchmark: BenchmarkFixture,
    client: Client,
    portals: Portals,
    pg_server: PostgresServer,
    sizes: Sizes,
    pytestconfig: pytest.Config,
) -> Iterator[Bench]:
    """The client's pool, open (``POOL_SIZE`` connections) for one benchmark."""
    portal = portals.get(client.backend)
    with portal.wrap_async_context_manager(client.pool.open(pg_server.dsn(), POOL_SIZE)) as pool:
        yield Bench(benchmark, client, portal, pool, sizes, pytestconfig.stash[_RESULTS])
