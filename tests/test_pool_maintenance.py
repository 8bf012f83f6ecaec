"""The pool's housekeeping against a real server: health checks never stall it.

Health checks run in tasks of their own, at most a few at a time, so that a
black-holed network delays no leak report, no expiry and no refill; closing
the pool stops them first, so that no socket is closed under a task. Timing
bounds are the configured timings plus ``MARGIN`` for a loaded 2-core
machine.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest

import pgsd
from pgsd.testing import FaultProxy, PostgresServer
from support import assert_invariants, pool_warnings, unique_name

pytestmark = pytest.mark.anyio

#: Scheduling delay a deadline may see on a loaded machine (seconds).
MARGIN = 1.0
#: How often a condition is looked at (seconds).
POLL = 0.02
#: The pool's maintenance tick (seconds).
TICK = 1.0


@contextlib.asynccontextmanager
async def proxied_pool(
    server: PostgresServer, **pool_options: Any
) -> AsyncIterator[tuple[FaultProxy, pgsd.ConnectionPool]]:
    async with FaultProxy(server.host, server.port) as proxy:
        config = pgsd.DatabaseConfig.from_dsn(
            server.dsn(), **proxy.dsn_params(), application_name=unique_name()
        )
        async with pgsd.ConnectionPool(config, pgsd.PoolConfig(**pool_options)) as pool:
            await pool.wait_ready()
            yield proxy, pool
        assert_invariants(pool.stats())
        assert pool.stats().size == 0
    assert proxy.connections == 0


async def wait_for(condition: Callable[[], bool], limit: float) -> float:
    """Poll *condition* (bounded by *limit*); return the seconds it took."""
    start = time.monotonic()
    with anyio.fail_after(limit):
        for _ in range(int(limit / POLL) + 1):
            if condition():
                return time.monotonic() - start
            await anyio.sleep(POLL)
    raise AssertionError(f"not within {limit:g} s")


async def test_a_leak_is_reported_while_idle_health_checks_hang(
    pg_server: PostgresServer, anyio_backend: str
) -> None:
    threshold = 1.5
    with pool_warnings() as log:
        async with proxied_pool(
            pg_server, min_size=6, max_size=6, health_check_interval=TICK, leak_threshold=threshold
        ) as (proxy, pool):
            async with pool.connection():
                proxy.set_mode("blackhole")  # every idle connection's ping now hangs
                took = await wait_for(lambda: pool.stats().leaks == 1, threshold + TICK + MARGIN)
                assert took < threshold + TICK + MARGIN
                assert any("held for" in message for message in log.messages)
                # The checks are under way meanwhile, a few at a time.
                await wait_for(lambda: pool.stats().idle < 5, 2 * TICK + MARGIN)
                assert pool.stats().idle >= 5 - 4
            proxy.set_mode("pass")


async def test_closing_while_a_health_check_hangs_is_quiet_and_prompt(
    pg_server: PostgresServer, anyio_backend: str
) -> None:
    close_timeout = 3.0
    async with FaultProxy(pg_server.host, pg_server.port) as proxy:
        config = pgsd.DatabaseConfig.from_dsn(
            pg_server.dsn(), **proxy.dsn_params(), application_name=unique_name()
        )
        pool_config = pgsd.PoolConfig(
            min_size=2, max_size=2, health_check_interval=TICK, close_timeout=close_timeout
        )
        pool = pgsd.ConnectionPool(config, pool_config)
        async with pool:
            await pool.wait_ready()
            proxy.set_mode("blackhole")
            # A health check has taken an idle connection and waits for its answer.
            await wait_for(lambda: pool.stats().idle < 2, 2 * TICK + MARGIN)
            start = time.monotonic()
        # Leaving the block raised nothing; it did not wait for the check.
        elapsed = time.monotonic() - start
        assert elapsed < close_timeout - 1.0
        stats = pool.stats()
        assert stats.size == 0
        assert stats.state == "closed"
        assert_invariants(stats)
    assert proxy.connections == 0


async def test_idle_connections_above_min_size_expire_though_health_checks_pass(
    pg_server: PostgresServer, anyio_backend: str
) -> None:
    max_idle = 2.0
    config = pgsd.DatabaseConfig.from_dsn(pg_server.dsn(), application_name=unique_name())
    pool_config = pgsd.PoolConfig(
        min_size=1, max_size=3, max_idle=max_idle, health_check_interval=TICK / 2
    )
    async with pgsd.ConnectionPool(config, pool_config) as pool:
        await pool.wait_ready()
        async with pool.connection(), pool.connection(), pool.connection():
            assert pool.stats().size == 3
        assert pool.stats().idle == 3
        # Checked every tick, and each check passes: checks are not use.
        await wait_for(lambda: pool.stats().size == 1, max_idle + 2 * TICK + MARGIN)
        stats = pool.stats()
        assert stats.connections_lost == 0
        assert stats.connections_closed == 2


async def test_closing_from_another_task_is_a_clear_error(
    pg_server: PostgresServer, anyio_backend: str
) -> None:
    config = pgsd.DatabaseConfig.from_dsn(pg_server.dsn(), application_name=unique_name())
    pool = pgsd.ConnectionPool(config, pgsd.PoolConfig(min_size=1, max_size=1))
    await pool.open()
    errors: list[BaseException] = []
    try:

        async def close_elsewhere() -> None:
            try:
                await pool.close()
            except RuntimeError as ex:
                errors.append(ex)

        async with anyio.create_task_group() as tg:  # noqa: ASYNC112 (another task, on purpose)
            tg.start_soon(close_elsewhere)
        assert len(errors) == 1
        assert "async with pool" in str(errors[0])
        assert pool.state != "closed"
        async with pool.connection() as conn:  # still usable
            await conn.execute("SELECT 1")
    finally:
        # No scope around it: the pool's task group was entered outside any.
        await pool.close()  # noqa: ASYNC102 (shielded inside, bounded by close_timeout)
    assert pool.state == "closed"
    assert pool.stats().size == 0
