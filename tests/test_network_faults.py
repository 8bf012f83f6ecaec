"""A pool behind a faulty network: black holes, resets and refusals, via FaultProxy.

Every pool here reaches the session's server through a :class:`FaultProxy`,
which each test switches between forwarding and a fault. Timing bounds are
the configured timeouts plus ``MARGIN``: what a loaded 2-core machine may
add in scheduling delay, never a sleep of the test's own.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import psycopg
import pytest

import pgsd
from pgsd.testing import FaultProxy, PostgresServer
from support import assert_invariants, unique_name

pytestmark = pytest.mark.anyio

#: Scheduling delay a deadline may see on a loaded machine (seconds).
MARGIN = 0.5


@contextlib.asynccontextmanager
async def proxied_pool(
    server: PostgresServer, *, cancel_grace: float = 2.0, **pool_options: Any
) -> AsyncIterator[tuple[FaultProxy, pgsd.ConnectionPool]]:
    """A pool whose connections (and cancel requests) all pass through a proxy."""
    async with FaultProxy(server.host, server.port) as proxy:
        config = pgsd.DatabaseConfig.from_dsn(
            server.dsn(),
            **proxy.dsn_params(),
            application_name=unique_name(),
            cancel_grace=cancel_grace,
        )
        async with pgsd.ConnectionPool(config, pgsd.PoolConfig(**pool_options)) as pool:
            yield proxy, pool
        assert_invariants(pool.stats())
        assert pool.stats().size == 0
    assert proxy.connections == 0


async def select_one(pool: pgsd.ConnectionPool) -> int:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT 1")
        row = await cur.fetchone()
        assert row == (1,)
        return conn.info.backend_pid


async def server_pids(server: PostgresServer, application_name: str) -> set[int]:
    async with await pgsd.connect(server.dsn()) as observer:
        cur = await observer.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", [application_name]
        )
        return {int(row[0]) for row in await cur.fetchall()}


async def wait_until_running(server: PostgresServer, application_name: str, query: str) -> None:
    """Poll the server (bounded) until the query shows as active."""
    async with await pgsd.connect(server.dsn()) as observer:
        for _ in range(1000):
            cur = await observer.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = %s AND state = 'active' AND query = %s",
                [application_name, query],
            )
            if await cur.fetchone() == (1,):
                return
    raise AssertionError(f"{query!r} never ran")


# black hole ------------------------------------------------------------------


async def test_acquire_timeout_holds_when_idle_connections_are_black_holed(
    pg_server: PostgresServer,
) -> None:
    timeout = 1.0
    # ping_after_idle=0: every idle connection is pinged before it is lent,
    # and a ping into the black hole never gets an answer.
    async with proxied_pool(
        pg_server, min_size=2, max_size=2, acquire_timeout=timeout, ping_after_idle=0
    ) as (proxy, pool):
        await pool.wait_ready()
        proxy.set_mode("blackhole")
        start = anyio.current_time()
        with anyio.fail_after(timeout + 5), pytest.raises(pgsd.PoolTimeout):
            async with pool.connection():
                pass
        elapsed = anyio.current_time() - start
        assert timeout <= elapsed < timeout + MARGIN
        stats = pool.stats()
        # Both idle connections failed their ping and were abandoned; their
        # replacements hang in the black hole.
        assert stats.connections_lost == 2
        assert stats.size == 0
        assert stats.opening == 2
        assert stats.timeouts == 1
        assert_invariants(stats)


async def test_acquire_timeout_holds_when_new_connections_are_black_holed(
    pg_server: PostgresServer,
) -> None:
    timeout = 1.0
    async with proxied_pool(pg_server, min_size=0, max_size=2, acquire_timeout=timeout) as (
        proxy,
        pool,
    ):
        proxy.set_mode("blackhole")
        start = anyio.current_time()
        with anyio.fail_after(timeout + 5), pytest.raises(pgsd.PoolTimeout):
            async with pool.connection():
                pass
        elapsed = anyio.current_time() - start
        assert timeout <= elapsed < timeout + MARGIN
        # The attempt reached the proxy and is still waiting for the server's
        # answer (connect_timeout is 30 s): the acquire timeout did not wait for it.
        assert len(proxy.accept_times) == 1
        assert proxy.connections == 1
        stats = pool.stats()
        assert stats.opening == 1
        assert stats.size == 0
        assert_invariants(stats)


async def test_query_deadline_holds_while_black_holed_and_the_connection_is_replaced(
    pg_server: PostgresServer,
) -> None:
    deadline = 0.3
    grace = 1.0
    async with proxied_pool(pg_server, cancel_grace=grace, min_size=1, max_size=1) as (
        proxy,
        pool,
    ):
        await pool.wait_ready()
        with pytest.raises(TimeoutError):
            async with pool.connection() as conn:
                pid = conn.info.backend_pid
                proxy.set_mode("blackhole")
                start = anyio.current_time()
                with anyio.fail_after(deadline):
                    await conn.execute("SELECT 1")
        left = anyio.current_time()
        # The borrower leaves at its deadline: cancelling the query on the
        # server (up to cancel_grace, here into the black hole) is the pool's
        # job. A borrower held for that would be late by grace > MARGIN.
        assert deadline <= left - start < deadline + MARGIN
        # While the black hole lasts, the pool gives up on the connection
        # after cancel_grace and closes it; its replacement hangs.
        with pytest.raises(pgsd.PoolTimeout):
            async with pool.connection(timeout=grace + MARGIN):
                pass
        stats = pool.stats()
        assert stats.connections_closed == 1
        assert stats.size == 0
        assert stats.opening == 1
        assert_invariants(stats)
        proxy.set_mode("pass")
        with anyio.fail_after(5):
            assert await select_one(pool) != pid
        assert pool.stats().state == "up"


# reset -----------------------------------------------------------------------


async def test_reset_mid_query_raises_operational_error_and_the_pool_heals(
    pg_server: PostgresServer,
) -> None:
    query = "SELECT pg_sleep(30)"
    errors: list[tuple[float, Exception]] = []
    healed_pids: set[int] = set()
    async with proxied_pool(
        pg_server, min_size=2, max_size=3, reconnect_initial=0.05, reconnect_max=0.2
    ) as (proxy, pool):
        app = pool.config.application_name
        try:
            await pool.wait_ready()

            async def sleeper() -> None:
                try:
                    async with pool.connection() as conn:
                        await conn.execute(query)
                except psycopg.OperationalError as ex:
                    errors.append((anyio.current_time(), ex))

            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(sleeper)
                    await wait_until_running(pg_server, app, query)
                    reset_pids = await server_pids(pg_server, app)
                    assert len(reset_pids) == 2
                    proxy.set_mode("reset")
                    reset_at = anyio.current_time()
                    assert proxy.connections == 0
            assert len(errors) == 1
            failed_at, error = errors[0]
            assert failed_at - reset_at < MARGIN
            assert type(error) is psycopg.OperationalError
            assert "server closed the connection unexpectedly" in str(error)
            stats = pool.stats()
            assert stats.connections_lost == 1  # the borrower's, thrown away on return
            assert stats.in_use == 0
            assert_invariants(stats)

            proxy.set_mode("pass")
            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:
                    for _ in range(10):

                        async def borrower() -> None:
                            healed_pids.add(await select_one(pool))

                        tg.start_soon(borrower)
            stats = pool.stats()
            assert stats.state == "up"
            assert stats.acquires == 11
            # Only new backends served: the idle connection that was reset
            # too was found dead before it was lent.
            assert healed_pids
            assert healed_pids.isdisjoint(reset_pids)
            assert_invariants(stats)
        finally:
            # The server does not notice a vanished client while pg_sleep runs.
            pg_server.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s AND query = %s",
                [app, query],
            )


# refuse ----------------------------------------------------------------------


class _FailedConnects(logging.Handler):
    """Records when each connect() to one address fails (pgsd logs each at DEBUG)."""

    def __init__(self, address: str, wanted: int) -> None:
        super().__init__(logging.DEBUG)
        self.address = address
        self.wanted = wanted
        self.times: list[float] = []
        self.enough = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("connect to ") and self.address in message:
            self.times.append(time.monotonic())
            if len(self.times) >= self.wanted:
                self.enough.set()


@contextlib.contextmanager
def recording(handler: logging.Handler, name: str) -> Any:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_healing_through_refused_connections_backs_off_to_the_cap(
    pg_server: PostgresServer,
) -> None:
    initial, cap = 0.05, 0.4
    # Without jitter each delay is exact: 0.05, 0.1, 0.2, then 0.4 at the cap.
    expected = [0.05, 0.1, 0.2, 0.4, 0.4]
    async with proxied_pool(
        pg_server,
        min_size=1,
        max_size=1,
        reconnect_initial=initial,
        reconnect_multiplier=2.0,
        reconnect_max=cap,
        reconnect_jitter=0,
        ping_after_idle=0,
    ) as (proxy, pool):
        await pool.wait_ready()
        failures = _FailedConnects(f"127.0.0.1:{proxy.port}", wanted=len(expected) + 1)
        with recording(failures, "pgsd.connection"):
            # The pool's connection is reset, and its replacements are refused.
            proxy.set_mode("reset")
            proxy.set_mode("refuse")
            # A borrower finds the dead connection: ping_after_idle=0 has it
            # pinged before it is lent, however briefly it sat idle.
            with pytest.raises(pgsd.PoolTimeout):
                async with pool.connection(timeout=0.2):
                    pass
            with anyio.fail_after(sum(expected) + 5):
                await failures.enough.wait()
            # Refused by the kernel, not reset: nothing listens on the port.
            assert isinstance(pool.last_error, pgsd.ServerUnavailable)
            assert "Connection refused" in str(pool.last_error)
            assert pool.state == "down"
            proxy.set_mode("pass")
            passed = anyio.current_time()
            await pool.wait_ready(timeout=cap + MARGIN)
            assert anyio.current_time() - passed < cap + MARGIN
        stats = pool.stats()
        assert stats.state == "up"
        assert stats.errors == len(failures.times)
        # Every attempt after the first failure, the successful one included.
        assert stats.reconnect_attempts == len(failures.times)
        assert stats.connections_lost == 1
        assert await select_one(pool) > 0
    gaps = [b - a for a, b in itertools.pairwise(failures.times)]
    assert len(gaps) == len(expected)
    for gap, delay in zip(gaps, expected, strict=True):
        # Never sooner than the backoff says (1 ms for timer rounding), and
        # never much later: 0.4 + MARGIN is far below the uncapped 0.8.
        assert delay - 0.001 <= gap < delay + MARGIN, (gaps, expected)
