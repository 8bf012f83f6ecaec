"""A second cancellation while pgsd cleans up after the first: the connection is never left dirty.

On trio (and under any anyio cancel scope) the clean-up is shielded and
finishes. On asyncio a task's own ``task.cancel()`` goes through every
shield, as it goes through psycopg's wait: the clean-up is cut short, and
what follows must still be right, a usable connection or a closed one, and a
pooled connection lent idle or replaced. (When the second cancellation
lands before the cancel request has gone out, the server runs the query to
its end, as it does under psycopg: docs/guides/cancellation.md says so.)

The clean-up is made to take long enough for the second cancellation to
land inside it by a proxy that delays every packet; the second cancellation
is sent once the first one's cancel request (a connection of its own) has
reached the proxy, so no timer races the clean-up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import anyio
import psycopg
import pytest

import pgsd
from pgsd.testing import FaultProxy, PostgresServer
from support import db_config, server_connections, until

pytestmark = pytest.mark.anyio

#: Long enough to be cancelled; short enough that a query the server was never asked
#: to stop (asyncio, the clean-up cut short before the cancel request went out) has
#: ended before the leak check's 5 s are up.
SLEEP = "SELECT pg_sleep(4)"
#: Delay per chunk through the proxy: the clean-up's round trips take this long each.
LATENCY = 0.3


async def cancel_twice(
    anyio_backend: str, proxy: FaultProxy, work: Callable[[], Awaitable[None]], started: anyio.Event
) -> None:
    """Run ``work``; once ``started`` is set, cancel it, and again inside the clean-up."""
    if anyio_backend == "asyncio":
        task = asyncio.get_running_loop().create_task(work())
        await started.wait()
        accepted = len(proxy.accept_times)
        task.cancel()
        await until(lambda: len(proxy.accept_times) > accepted)  # the cancel request is out
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return
    async with anyio.create_task_group() as tg:
        inner = anyio.CancelScope()

        async def scoped() -> None:
            with inner:
                await work()

        tg.start_soon(scoped)
        await started.wait()
        accepted = len(proxy.accept_times)
        inner.cancel()
        await until(lambda: len(proxy.accept_times) > accepted)
        tg.cancel_scope.cancel()  # the enclosing scope too, while the clean-up runs


async def test_a_direct_connection_cancelled_twice_mid_query_stays_right(
    pg_server: PostgresServer, anyio_backend: str
) -> None:
    async with FaultProxy(pg_server.host, pg_server.port) as proxy:
        config = db_config(pg_server, **proxy.dsn_params())
        async with await pgsd.connect(config) as conn:
            started = anyio.Event()

            async def work() -> None:
                proxy.set_mode("delay", latency=LATENCY)
                started.set()
                await conn.execute(SLEEP)

            with anyio.fail_after(30):
                await cancel_twice(anyio_backend, proxy, work, started)
            proxy.set_mode("pass")
            if anyio_backend == "trio":
                # Shielded: the clean-up finished, the query stopped, the connection is idle.
                with anyio.fail_after(30):
                    cur = await conn.execute("SELECT 42")
                    assert await cur.fetchone() == (42,)
                [(state, query)] = pg_server.execute(
                    "SELECT state, query FROM pg_stat_activity WHERE application_name = %s",
                    [config.application_name],
                )
                assert (state, query) == ("idle", "SELECT 42")
                return
            # task.cancel() cut the clean-up short: the connection finishes it before its
            # next command, and is then clean or closed with an error that says so.
            outcome: object
            with anyio.fail_after(30):
                try:
                    cur = await conn.execute("SELECT 42")
                    outcome = await cur.fetchone()
                except psycopg.OperationalError as error:
                    outcome = error
            if isinstance(outcome, psycopg.OperationalError):
                assert "the connection was closed" in str(outcome)
                assert conn.closed
            else:
                assert outcome == (42,)
                assert conn.pgconn.transaction_status == 0  # idle


async def test_a_pooled_transaction_cancelled_twice_comes_back_clean_or_not_at_all(
    pg_server: PostgresServer, anyio_backend: str
) -> None:
    async with FaultProxy(pg_server.host, pg_server.port) as proxy:
        config = db_config(pg_server, **proxy.dsn_params())
        pool_config = pgsd.PoolConfig(min_size=1, max_size=1, acquire_timeout=30)
        async with pgsd.ConnectionPool(config, pool_config) as pool:
            await pool.wait_ready()
            started = anyio.Event()

            async def work() -> None:
                async with pool.connection() as conn, conn.transaction():
                    await conn.execute("CREATE TEMP TABLE scratch (n int)")
                    proxy.set_mode("delay", latency=LATENCY)
                    started.set()
                    await conn.execute(SLEEP)

            with anyio.fail_after(30):
                await cancel_twice(anyio_backend, proxy, work, started)
            proxy.set_mode("pass")
            with anyio.fail_after(30):
                async with pool.connection() as conn:
                    assert conn.info.transaction_status.name == "IDLE"
                    assert conn.autocommit
                    # The transaction was rolled back, or its connection replaced.
                    cur = await conn.execute("SELECT to_regclass('pg_temp.scratch') IS NULL")
                    assert await cur.fetchone() == (True,)
            stats = pool.stats()
            assert stats.size <= 1
            assert await server_connections(pg_server, config.application_name) <= 1
