"""Leaks: the suite's own leak checks, and a pool's memory over many cycles.

Every test on the session server must close the server connections it
opens, and every test on the server or an event loop must close the
connection objects it makes (conftest's ``no_leaked_connections``). The
first tests here run a test that leaks in a pytest of its own, to show that
each kind of leak fails the test that made it.

The memory test runs ``WARM_UP`` then ``CYCLES`` acquire/release cycles of
a pool, under ``tracemalloc``: plain borrows with a query, hand-overs to a
waiter, waiters cancelled while the pool is exhausted, acquire timeouts, and
borrowers cancelled in the middle of a query. The memory the process holds
after the cycles may exceed what it held after the warm-up by less than
``MAX_GROWTH``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
import tracemalloc
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import psycopg
import pytest

import pgsd
from pgsd.testing import PostgresServer
from support import ServerBackends, Tally, invariants_hold, wait_until_gone, watching

# -- the suite's leak checks -------------------------------------------------------

#: The inner runs wait this long (not the suite's LEFTOVER_WAIT) for backends to exit.
INNER_LEFTOVER_WAIT = 1.0

#: The suite's own options (pyproject.toml), which an inner run in another directory lacks.
INNER_OPTIONS = (
    "-p",
    "no:asyncio",
    "-p",
    "no:hypothesispytest",
    "-p",
    "no:cacheprovider",
    "-W",
    "error",
    # No short summary: under CI it repeats each message in full, elsewhere cut.
    "-rN",
)

INNER_FIXTURES = """
import pytest

from support import ServerBackends


@pytest.fixture
def pg_server(outer_server):
    return outer_server


@pytest.fixture
def server_backends(pg_server):
    backends = ServerBackends(pg_server, wait={wait!r})
    yield backends
    backends.close()
"""


class OuterSession:
    """A plugin for an inner pytest run: the outer session's server, and a place to keep things."""

    def __init__(self, server: PostgresServer) -> None:
        self.server = server
        self.connections: list[psycopg.Connection[Any]] = []

    @pytest.fixture
    def outer_server(self) -> PostgresServer:
        return self.server

    @pytest.fixture
    def kept(self) -> list[psycopg.Connection[Any]]:
        return self.connections


def run_inner(pytester: pytest.Pytester, plugin: OuterSession, tests: str) -> pytest.RunResult:
    """Run ``tests`` under a copy of this suite's conftest, on the outer session's server."""
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    pytester.makepyfile(
        test_inner=INNER_FIXTURES.format(wait=INNER_LEFTOVER_WAIT) + tests,
    )
    return pytester.runpytest_inprocess(*INNER_OPTIONS, plugins=[plugin])


def test_the_leak_check_guards_every_test(request: pytest.FixtureRequest) -> None:
    assert "no_leaked_connections" in request.fixturenames


def test_a_server_connection_left_open_fails_the_test_and_is_named(
    pytester: pytest.Pytester, pg_server: PostgresServer
) -> None:
    plugin = OuterSession(pg_server)
    tests = """
import psycopg


def test_closes_its_connection(pg_server):
    with psycopg.connect(pg_server.dsn(application_name="pgsd_closed_in_time")):
        pass


def test_leaves_a_connection_open(pg_server, kept):
    kept.append(psycopg.connect(pg_server.dsn(application_name="pgsd_left_open")))


def test_after_the_leak(pg_server):
    with psycopg.connect(pg_server.dsn()) as conn:
        conn.execute("SELECT 1")
"""
    try:
        result = run_inner(pytester, plugin, tests)
    finally:
        for conn in plugin.connections:
            conn.close()
    result.assert_outcomes(passed=3, errors=1)
    output = result.stdout.str()
    assert "ERROR at teardown of test_leaves_a_connection_open" in output
    assert "1 server connection(s) opened by the test still open 1 s after it ended" in output
    assert "application_name='pgsd_left_open' usename='postgres' datname='postgres'" in output
    assert "state='idle'" in output
    assert "pgsd_closed_in_time" not in output
    assert len(plugin.connections) == 1


def test_an_open_connection_collected_as_garbage_fails_the_test_that_dropped_it(
    pytester: pytest.Pytester, pg_server: PostgresServer
) -> None:
    plugin = OuterSession(pg_server)
    # Each connection is dropped inside a reference cycle, so that only the
    # cycle collector frees it: at the end of the test, by the leak check.
    tests = """
import psycopg
import pytest

import pgsd


def test_drops_an_open_psycopg_connection(pg_server):
    cycle = [psycopg.connect(pg_server.dsn())]
    cycle.append(cycle)


@pytest.mark.anyio
async def test_drops_an_open_pgsd_connection(pg_server, anyio_backend):
    cycle = [await pgsd.connect(pg_server.dsn())]
    cycle.append(cycle)


def test_after_the_leaks(pg_server):
    with psycopg.connect(pg_server.dsn()) as conn:
        conn.execute("SELECT 1")
"""
    result = run_inner(pytester, plugin, tests)
    result.assert_outcomes(passed=4, errors=3)
    output = result.stdout.str()
    for test in (
        "test_drops_an_open_psycopg_connection",
        "test_drops_an_open_pgsd_connection[asyncio]",
        "test_drops_an_open_pgsd_connection[trio]",
    ):
        assert f"ERROR at teardown of {test}" in output
    assert output.count("objects dropped by the test warned when collected") == 3
    assert output.count("ResourceWarning: <psycopg.Connection object at") == 1
    assert output.count("ResourceWarning: <pgsd.Connection object at") == 2
    # Collected, the connections closed: the server check found nothing left.
    assert "server connection(s)" not in output
    assert "ERROR at teardown of test_after_the_leaks" not in output


def test_left_over_lists_only_connections_opened_after_the_snapshot(
    pg_server: PostgresServer,
) -> None:
    backends = ServerBackends(pg_server, wait=INNER_LEFTOVER_WAIT)
    try:
        with psycopg.connect(pg_server.dsn(application_name="pgsd_before")):
            before = backends.snapshot()
            with psycopg.connect(pg_server.dsn(application_name="pgsd_after")) as after:
                left = backends.left_over(before)
                assert [backend.application_name for backend in left] == ["pgsd_after"]
                assert left[0].pid == after.info.backend_pid
            # Closed: its backend exits within the wait.
            assert backends.left_over(before) == []
    finally:
        backends.close()


# -- a pool's memory -------------------------------------------------------------------

WARM_UP = 2_000
CYCLES = 20_000
#: The cycles after the warm-up must end within this many seconds: a bound
#: that stops the loop, not a speed target. They take about 20 s here on
#: trio, and close to 40 s under coverage on a loaded machine.
SECONDS = 90.0
MAX_GROWTH = 64 * 1024
MAX_SIZE = 3
#: One cycle in each PERIOD is each of these; the rest are plain borrows.
PERIOD = 50
HANDOVERS = 4
CANCELLED_WAITING = 2
TIMEOUTS = 2
CANCELLED_MID_QUERY = 1
#: The deadline of a cancelled waiter, an acquire timeout and a cancelled query, in seconds.
TINY = 0.001
#: Bounds on a poll of the pool: iterations, and their pace.
POLLS = 1000
POLL_PACE = 0.01
SAMPLE_PACE = 0.01
#: More than trio lets pile up before it prunes its deadline heap.
STALE_TIMERS = 2_000
#: Lines of the comparison shown when the memory grew too much.
TOP_LINES = 15


class Cycles:
    """Acquire/release cycles of every kind, in a fixed order, on one pool."""

    def __init__(self, pool: pgsd.ConnectionPool) -> None:
        self.pool = pool
        self.tally = Tally()
        kinds = (
            [self._handover] * HANDOVERS
            + [self._cancelled_waiting] * CANCELLED_WAITING
            + [self._timeout] * TIMEOUTS
            + [self._cancelled_mid_query] * CANCELLED_MID_QUERY
        )
        self._kinds = kinds + [self._select_1] * (PERIOD - len(kinds))

    async def run(self, count: int) -> None:
        for _ in range(count):
            await self._kinds[self.tally.cycles % PERIOD]()
            self.tally.cycles += 1

    async def _select_1(self) -> None:
        async with self.pool.connection() as conn:
            self.tally.lent += 1
            cur = await conn.execute("SELECT 1")
            assert await cur.fetchone() == (1,)

    @contextlib.asynccontextmanager
    async def _exhausted(self) -> Any:
        """Every connection of the pool borrowed for the block."""
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(MAX_SIZE):
                await stack.enter_async_context(self.pool.connection())
                self.tally.lent += 1
            assert self.pool.stats().idle == 0
            yield

    async def _handover(self) -> None:
        """A waiter queued on an exhausted pool gets the first connection returned."""
        async with anyio.create_task_group() as tg:
            async with self._exhausted():
                tg.start_soon(self._select_1)
                for _ in range(POLLS):
                    if self.pool.stats().waiting:
                        break
                    await anyio.lowlevel.checkpoint()
                assert self.pool.stats().waiting == 1
        self.tally.handovers += 1

    async def _cancelled_waiting(self) -> None:
        async with self._exhausted():
            with anyio.move_on_after(TINY) as scope:
                async with self.pool.connection():
                    raise AssertionError("lent a connection of an exhausted pool")
            assert scope.cancelled_caught
        self.tally.cancelled_waiting += 1

    async def _timeout(self) -> None:
        async with self._exhausted():
            with pytest.raises(pgsd.PoolTimeout):
                async with self.pool.connection(timeout=TINY):
                    raise AssertionError("lent a connection of an exhausted pool")
        self.tally.timeouts += 1

    async def _cancelled_mid_query(self) -> None:
        """A borrower whose deadline falls in a query; every other one catches it inside."""
        inside = self.tally.cancelled_mid_query % 2 == 0
        with anyio.CancelScope() as outer:
            async with self.pool.connection() as conn:
                self.tally.lent += 1
                with anyio.CancelScope() as scope:
                    (scope if inside else outer).deadline = anyio.current_time() + TINY
                    await conn.execute("SELECT pg_sleep(10)")
        assert scope.cancelled_caught or outer.cancelled_caught
        self.tally.cancelled_mid_query += 1


async def wait_until_settled(pool: pgsd.ConnectionPool) -> None:
    """Cancelled queries are settled by the pool's own tasks: wait until all are back."""
    for _ in range(POLLS):
        stats = pool.stats()
        if stats.in_use == 0 and stats.size == MAX_SIZE:
            return
        await anyio.sleep(POLL_PACE)
    raise AssertionError(f"connections still in use after the cycles: {pool.stats()}")


async def drop_stale_timers() -> None:
    """Make the event loop drop, now, the timers of cancel scopes that are gone.

    Both loops drop the timer of a cancel scope that exits before its
    deadline lazily: asyncio once such timers are half its timer heap, trio
    once they outnumber the live ones by 1,000 (each holds its scope, about
    400 bytes). Leaving STALE_TIMERS such scopes at once, then passing
    through the loop, makes either drop them all, so that two snapshots
    compare the pool's memory, not where the loop is in that clean-up.
    """
    far = anyio.current_time() + 3600
    for _ in range(STALE_TIMERS):
        # Left at once, on purpose: each leaves a stale timer behind.
        with anyio.CancelScope(deadline=far):  # noqa: ASYNC100
            pass
    await anyio.lowlevel.checkpoint()


async def memory_snapshot() -> tracemalloc.Snapshot:
    await drop_stale_timers()
    gc.collect()
    return tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )


#: How long a cancelled query gets to stop before its connection is closed.
CANCEL_GRACE = 15.0


@pytest.mark.anyio
@pytest.mark.timeout(SECONDS + 60)
async def test_memory_is_flat_over_many_acquire_release_and_cancel_cycles(
    pg_server: PostgresServer, anyio_backend: str
) -> None:
    config = pgsd.DatabaseConfig.from_dsn(
        pg_server.dsn(),
        application_name=f"pgsd_leaks_{os.getpid()}_{anyio_backend}",
        # A cancel request is a new connection to the server: on a loaded
        # machine it may take over the default 2 s, and a connection given up
        # on leaves its backend running a while beside its replacement.
        cancel_grace=CANCEL_GRACE,
    )
    pool_config = pgsd.PoolConfig(min_size=MAX_SIZE, max_size=MAX_SIZE)
    tracemalloc.start()
    try:
        async with pgsd.ConnectionPool(config, pool_config) as pool:
            await pool.wait_ready()
            cycles = Cycles(pool)
            async with watching(
                pg_server, pool, pace=SAMPLE_PACE, max_samples=int((SECONDS + 60) / SAMPLE_PACE)
            ) as watch:
                await cycles.run(WARM_UP)
                await wait_until_settled(pool)
                before = await memory_snapshot()
                start = time.monotonic()
                with anyio.fail_after(SECONDS):
                    await cycles.run(CYCLES)
                elapsed = time.monotonic() - start
                await wait_until_settled(pool)
                after = await memory_snapshot()
            stats = pool.stats()
    finally:
        tracemalloc.stop()
    await wait_until_gone(pg_server, config.application_name)

    changes = after.compare_to(before, "lineno")
    growth = sum(change.size_diff for change in changes)
    tally = cycles.tally
    print(
        f"\nmemory [{anyio_backend}]: {tally.cycles - WARM_UP:,} cycles after a warm-up of"
        f" {WARM_UP:,} in {elapsed:.1f} s, traced memory {growth / 1024:+.1f} KiB;"
        f" {tally.handovers:,} hand-overs, {tally.cancelled_waiting:,} waiters cancelled,"
        f" {tally.timeouts:,} timeouts, {tally.cancelled_mid_query:,} cancelled mid-query;"
        f" at most {watch.most} server connections in {watch.samples:,} samples"
    )
    top = "\n".join(str(change) for change in changes[:TOP_LINES])
    assert growth < MAX_GROWTH, f"memory grew {growth / 1024:.1f} KiB; the top lines:\n{top}"
    assert tally.cycles == WARM_UP + CYCLES
    per_kind = (WARM_UP + CYCLES) // PERIOD
    assert tally.handovers == per_kind * HANDOVERS
    assert tally.cancelled_waiting == per_kind * CANCELLED_WAITING
    assert tally.timeouts == per_kind * TIMEOUTS
    assert tally.cancelled_mid_query == per_kind * CANCELLED_MID_QUERY
    assert stats.acquires == tally.lent
    assert stats.timeouts == tally.timeouts
    assert stats.state == "up"
    assert stats.in_use == 0
    assert stats.waiting == 0
    assert stats.size == stats.idle == MAX_SIZE
    assert stats.connections_opened - stats.connections_closed == MAX_SIZE
    assert stats.errors == 0
    assert stats.leaks == 0
    assert invariants_hold(stats)
    assert watch.broken == []
    assert watch.samples > 0
    assert 0 < watch.most <= MAX_SIZE
