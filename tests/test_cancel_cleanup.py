"""The clean-up after a cancellation: a pooled transaction's, and a second cancellation during it.

A borrower cancelled inside ``conn.transaction()`` gives its connection back
to be cleaned by the pool, which rolls the transaction back and lends the
same connection again.

A second cancellation while pgsd cleans up after the first must not cut
the clean-up short: on trio (and under any anyio cancel scope) it is
shielded; on asyncio a task's own ``task.cancel()`` goes through shields, so
pgsd runs the clean-up in a task of its own and raises that cancellation
once it ends. Either way the query stops on the server and the connection
comes back idle.

The clean-up is made to take long enough for the second cancellation to
land inside it by a proxy that delays every packet; the second cancellation
is sent once the first one's cancel request (a connection of its own) has
reached the proxy, so no timer races the clean-up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import anyio
import pytest

import pgsd
from pgsd.testing import FaultProxy, PostgresServer
from support import db_config, server_connections, until

pytestmark = pytest.mark.anyio

SLEEP = "SELECT pg_sleep(30)"
#: Delay per chunk through the proxy: the clean-up's round trips take this long each.
LATENCY = 0.3


async def server_runs(server: PostgresServer, application_name: str) -> None:
    """Until the server runs `SLEEP` for that application.

    A cancel request sent before would reach the server first (it travels on
    a connection of its own) and stop nothing.
    """
    async with await pgsd.connect(server.dsn()) as observer:
        for _ in range(1000):  # bounded: 10 s at least
            cur = await observer.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = %s AND state = 'active' AND query = %s",
                [application_name, SLEEP],
            )
            if await cur.fetchone() == (1,):
                return
            await anyio.sleep(0.01)
    raise AssertionError(f"{application_name} never ran {SLEEP}")


async def cancel_twice(
    anyio_backend: str,
    proxy: FaultProxy,
    server: PostgresServer,
    application_name: str,
    work: Callable[[], Awaitable[None]],
) -> None:
    """Run ``work``; cancel it once the server runs `SLEEP`, and again inside the clean-up.

    The second cancellation comes once the first one's cancel request has
    reached the proxy; then the proxy forwards without delay again.
    """

    async def first_then_second(first: Callable[[], object], second: Callable[[], object]) -> None:
        await server_runs(server, application_name)
        accepted = len(proxy.accept_times)
        first()
        await until(lambda: len(proxy.accept_times) > accepted)  # the cancel request is out
        second()

    with anyio.fail_after(30):
        if anyio_backend == "asyncio":
            task = asyncio.get_running_loop().create_task(work())
            await first_then_second(task.cancel, task.cancel)
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            inner = anyio.CancelScope()

            async def scoped() -> None:
                with inner:
                    await work()

            async with anyio.create_task_group() as tg:
                tg.start_soon(scoped)
                # The enclosing scope too, while the clean-up runs.
                await first_then_second(inner.cancel, tg.cancel_scope.cancel)
    proxy.set_mode("pass")


async def assert_rolled_back(conn: pgsd.Connection) -> None:
    """Idle, and the borrower's transaction (its temporary table) rolled back."""
    assert conn.info.transaction_status.name == "IDLE"
    cur = await conn.execute("SELECT to_regclass('pg_temp.scratch') IS NULL")
    assert await cur.fetchone() == (True,)


async def test_a_direct_connection_cancelled_twice_mid_query_stays_right(
    pg_server: PostgresServer, anyio_backend: str
) -> None:
    async with FaultProxy(pg_server.host, pg_server.port) as proxy:
        config = db_config(pg_server, **proxy.dsn_params())
        async with await pgsd.connect(config) as conn:

            async def work() -> None:
                proxy.set_mode("delay", latency=LATENCY)
                await conn.execute(SLEEP)

            await cancel_twice(anyio_backend, proxy, pg_server, config.application_name, work)
            # The clean-up finished: the query stopped, the connection is idle and usable.
            with anyio.fail_after(30):
                cur = await conn.execute("SELECT 42")
                assert await cur.fetchone() == (42,)
            [(state, query)] = pg_server.execute(
                "SELECT state, query FROM pg_stat_activity WHERE application_name = %s",
                [config.application_name],
            )
            assert (state, query) == ("idle", "SELECT 42")


async def test_a_pooled_transaction_cancelled_twice_comes_back_clean(
    pg_server: PostgresServer, anyio_backend: str
) -> None:
    async with FaultProxy(pg_server.host, pg_server.port) as proxy:
        config = db_config(pg_server, **proxy.dsn_params())
        pool_config = pgsd.PoolConfig(min_size=1, max_size=1, acquire_timeout=30)
        async with pgsd.ConnectionPool(config, pool_config) as pool:
            await pool.wait_ready()

            async def work() -> None:
                async with pool.connection() as conn, conn.transaction():
                    await conn.execute("CREATE TEMP TABLE scratch (n int)")
                    proxy.set_mode("delay", latency=LATENCY)
                    await conn.execute(SLEEP)

            await cancel_twice(anyio_backend, proxy, pg_server, config.application_name, work)
            with anyio.fail_after(30):
                async with pool.connection() as conn:
                    await assert_rolled_back(conn)
                    assert conn.autocommit
            stats = pool.stats()
            assert stats.size == 1
            assert stats.connections_closed == 0  # rolled back, not replaced
            assert await server_connections(pg_server, config.application_name) <= 1


async def test_a_borrower_cancelled_in_a_transaction_gives_back_a_clean_connection(
    pg_server: PostgresServer, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = db_config(pg_server)
    pool_config = pgsd.PoolConfig(min_size=1, max_size=1, acquire_timeout=30)
    async with pgsd.ConnectionPool(config, pool_config) as pool:
        await pool.wait_ready()
        with anyio.move_on_after(1) as scope:
            async with pool.connection() as conn, conn.transaction():
                await conn.execute("CREATE TEMP TABLE scratch (n int)")
                await conn.execute(SLEEP)
        assert scope.cancelled_caught
        with anyio.fail_after(30):
            async with pool.connection() as again:
                assert again is conn  # cleaned, not replaced
                await assert_rolled_back(again)
        assert pool.stats().connections_closed == 0
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []


async def test_a_borrower_cancelled_while_its_connection_is_reset_leaks_nothing(
    pg_server: PostgresServer, anyio_backend: str
) -> None:
    entered = anyio.Event()

    async def reset(conn: pgsd.Connection) -> None:
        entered.set()
        await conn.execute("SELECT pg_sleep(0.5)")

    pool_config = pgsd.PoolConfig(min_size=1, max_size=1, acquire_timeout=10, reset=reset)
    async with pgsd.ConnectionPool(db_config(pg_server), pool_config) as pool:

        async def borrow() -> None:
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")

        if anyio_backend == "asyncio":
            task = asyncio.get_running_loop().create_task(borrow())
            await entered.wait()
            task.cancel()  # while the pool resets the connection it took back
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(borrow)
                    await entered.wait()
                    scope.cancel()
        assert pool.stats().in_use == 0  # taken back, not stranded with its borrower
        with anyio.fail_after(30):
            async with pool.connection() as conn:
                cur = await conn.execute("SELECT 42")
                assert await cur.fetchone() == (42,)
