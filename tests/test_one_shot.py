"""One-shot statements on the pool (`fetchall`, `fetchone`, `fetchval`, `execute`), real server.

Pipelined across concurrent callers on the pool's connections: each caller
gets its own result, an error stays with its statement, the pool's bounds
(max_size, acquire_timeout, FIFO) hold, and a lent connection is never
shared with them.
"""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import psycopg
import psycopg.errors
import pytest
from psycopg import pq
from psycopg.rows import dict_row

import pgsd
from pgsd.testing import PostgresServer
from support import (
    CancelWhenRunning,
    assert_invariants,
    db_config,
    open_pool,
    server_connections,
)

pytestmark = pytest.mark.anyio


async def test_hundreds_of_callers_each_get_their_own_result(pg_server: PostgresServer) -> None:
    config = db_config(pg_server)
    results: dict[int, Any] = {}
    most = 0
    async with open_pool(config, min_size=0, max_size=3) as pool:

        async def one(n: int) -> None:
            results[n] = await pool.fetchone("SELECT %s::int, %s::text", [n, f"n{n}"])

        async with anyio.create_task_group() as tg:
            for n in range(500):
                tg.start_soon(one, n)
                if n % 100 == 0:
                    most = max(most, await server_connections(pg_server, config.application_name))
        stats = pool.stats()
        assert_invariants(stats)
        assert stats.size <= 3
        assert stats.idle == stats.size  # every connection is back, out of pipeline mode
    assert results == {n: (n, f"n{n}") for n in range(500)}
    assert most <= 3


async def test_a_queued_statement_that_cannot_be_converted_fails_alone(
    pg_server: PostgresServer,
) -> None:
    # Queued statements are converted when the pool sends them for their
    # callers, as room frees: an error there still reaches only its caller.
    results: dict[int, Any] = {}
    async with await pgsd.connect(pg_server.dsn()) as conn:
        with pytest.raises(psycopg.Error) as lent:
            await conn.execute("SELECT %s::int", [object()])
    async with open_pool(db_config(pg_server), max_size=1, pipeline_depth=1) as pool:

        async def one(n: int) -> None:
            try:
                results[n] = await pool.fetchval("SELECT %s::int", [object() if n == 7 else n])
            except psycopg.Error as error:
                results[n] = error

        async with anyio.create_task_group() as tg:
            for n in range(20):
                tg.start_soon(one, n)
        assert pool.stats().statements == 19
    assert type(results.pop(7)) is type(lent.value)
    assert results == {n: n for n in range(20) if n != 7}


async def test_the_four_forms_and_row_factories(pg_server: PostgresServer) -> None:
    async with open_pool(db_config(pg_server), max_size=2) as pool:
        assert await pool.fetchall("SELECT generate_series(1, 3)") == [(1,), (2,), (3,)]
        assert await pool.fetchone("SELECT 1, 'a'") == (1, "a")
        assert await pool.fetchone("SELECT 1 WHERE false") is None
        assert await pool.fetchval("SELECT count(*) FROM generate_series(1, 9)") == 9
        assert await pool.fetchval("SELECT 1 WHERE false") is None
        assert await pool.fetchval("SELECT NULL::int") is None
        assert await pool.fetchone("SELECT 1 AS one", row_factory=dict_row) == {"one": 1}
        name = f"pgsd_one_shot_{id(pool)}"
        await pool.execute(f"CREATE TABLE {name} (n int)")
        try:
            assert await pool.execute(f"INSERT INTO {name} SELECT generate_series(1, 5)") == 5
            assert await pool.execute(f"DELETE FROM {name} WHERE n > %s", [2]) == 3
            assert await pool.fetchval(f"SELECT sum(n) FROM {name}") == 3
        finally:
            with anyio.move_on_after(10, shield=True):
                await pool.execute(f"DROP TABLE {name}")


async def test_an_error_stays_with_its_statement_and_the_connection_stays(
    pg_server: PostgresServer,
) -> None:
    outcomes: dict[int, Any] = {}
    async with open_pool(db_config(pg_server), min_size=1, max_size=1) as pool:

        async def one(n: int) -> None:
            try:
                outcomes[n] = await pool.fetchval("SELECT 10 / %s::int", [n % 5])
            except psycopg.Error as ex:
                outcomes[n] = type(ex)

        async with anyio.create_task_group() as tg:
            for n in range(50):
                tg.start_soon(one, n)
        stats = pool.stats()
    assert all(outcomes[n] is psycopg.errors.DivisionByZero for n in range(0, 50, 5))
    assert all(outcomes[n] == 10 // (n % 5) for n in range(50) if n % 5)
    assert stats.connections_closed == 0
    assert stats.connections_opened == 1


async def test_a_lent_connection_is_never_shared_with_one_shot_statements(
    pg_server: PostgresServer,
) -> None:
    async with open_pool(db_config(pg_server), min_size=2, max_size=2) as pool:
        await pool.wait_ready()
        values: list[int] = []

        async def statements() -> None:
            for n in range(200):
                value = await pool.fetchval("SELECT %s::int", [n])
                values.append(value)

        async def borrower() -> None:
            for _ in range(20):
                async with pool.connection() as conn:
                    assert conn.pgconn.pipeline_status == pq.PipelineStatus.OFF
                    async with conn.transaction():
                        cur = await conn.execute("SELECT txid_current()")
                        assert await cur.fetchone() is not None

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(statements)
            tg.start_soon(borrower)
        assert sorted(values) == sorted(list(range(200)) * 3)
        assert_invariants(pool.stats())


async def test_acquire_timeout_applies_to_one_shot_statements(pg_server: PostgresServer) -> None:
    async with open_pool(db_config(pg_server), max_size=1, acquire_timeout=0.5) as pool:
        async with pool.connection():
            with pytest.raises(pgsd.PoolTimeout):
                await pool.fetchval("SELECT 1")
        assert await pool.fetchval("SELECT 2") == 2
        assert pool.stats().timeouts == 1


async def test_a_caller_cancelled_while_queued_never_sends(pg_server: PostgresServer) -> None:
    name = f"pgsd_never_{abs(hash(pg_server.dsn())) % 10**6}"
    async with open_pool(db_config(pg_server), max_size=1) as pool:
        await pool.execute(f"CREATE TABLE IF NOT EXISTS {name} (n int)")
        try:
            async with pool.connection():
                with anyio.CancelScope() as scope:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(pool.execute, f"INSERT INTO {name} VALUES (1)")
                        for _ in range(100):
                            if pool.stats().waiting == 1:
                                break
                            await anyio.lowlevel.checkpoint()
                        assert pool.stats().waiting == 1
                        scope.cancel()
            assert await pool.fetchval(f"SELECT count(*) FROM {name}") == 0
        finally:
            with anyio.move_on_after(10, shield=True):
                await pool.execute(f"DROP TABLE {name}")


async def test_statistics_count_one_shot_statements(pg_server: PostgresServer) -> None:
    async with open_pool(db_config(pg_server), min_size=1, max_size=1) as pool:
        async with anyio.create_task_group() as tg:
            for n in range(40):
                tg.start_soon(pool.fetchval, "SELECT %s::int", [n])
        stats = pool.stats()
    assert stats.statements == 40
    assert stats.statements_in_flight == 0
    assert 1 < stats.pipeline_depth_max <= pgsd.PoolConfig().pipeline_depth
    assert stats.acquires <= 40


async def test_a_lost_connection_fails_its_statements_and_the_pool_heals(
    pg_server: PostgresServer,
) -> None:
    config = db_config(pg_server)
    outcomes: list[Exception] = []
    async with open_pool(config, min_size=1, max_size=1) as pool:
        await pool.wait_ready()
        (pid,) = {await pool.fetchval("SELECT pg_backend_pid()") for _ in range(3)}

        async def sleeper() -> None:
            try:
                await pool.fetchval("SELECT pg_sleep(30)")
            except Exception as ex:
                outcomes.append(ex)

        query = "SELECT pg_sleep(30)"
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(sleeper)
            await CancelWhenRunning(pg_server, pid, query).run()  # only waits until it runs
            pg_server.execute("SELECT pg_terminate_backend(%s)", [pid])
        assert len(outcomes) == 3
        assert all(isinstance(ex, pgsd.OutcomeUnknown) for ex in outcomes)
        # Evicted and replaced: the next statement runs on a new connection.
        assert await pool.fetchval("SELECT pg_backend_pid()") != pid
        stats = pool.stats()
        assert stats.connections_lost >= 1
        assert_invariants(stats)


async def test_the_connector_runs_one_shot_statements_by_database_name(
    pg_server: PostgresServer,
) -> None:
    config = pgsd.ConnectorConfig(databases={"main": db_config(pg_server)})
    async with pgsd.DatabaseConnector(config) as connector:
        assert await connector.fetchval("main", "SELECT %s::int + 1", [41]) == 42
        assert await connector.fetchone("main", "SELECT 1 AS a", row_factory=dict_row) == {"a": 1}
        assert await connector.fetchall("main", "SELECT generate_series(1, 2)") == [(1,), (2,)]
        assert await connector.execute("main", "SELECT 1") == 1
        with pytest.raises(pgsd.ConfigError):
            await connector.fetchval("nowhere", "SELECT 1")


async def wait_for_waiters(pool: pgsd.ConnectionPool, count: int) -> None:
    for _ in range(1000):
        if pool.stats().waiting == count:
            return
        await anyio.lowlevel.checkpoint()
    raise AssertionError(f"never {count} waiters")


async def test_statements_and_borrowers_are_served_first_come_first_served(
    pg_server: PostgresServer,
) -> None:
    # Served in turn on one connection: the server's clock gives the order.
    served: list[tuple[Any, str]] = []
    async with open_pool(db_config(pg_server), max_size=1, pipeline_depth=1) as pool:

        async def statement(label: str) -> None:
            served.append((await pool.fetchval("SELECT clock_timestamp()"), label))

        async def borrower(label: str) -> None:
            async with pool.connection() as conn:
                cur = await conn.execute("SELECT clock_timestamp()")
                row = await cur.fetchone()
                assert row is not None
                served.append((row[0], label))

        async with anyio.create_task_group() as tg:
            async with pool.connection():
                for n, (kind, label) in enumerate(
                    [(statement, "s1"), (borrower, "b1"), (statement, "s2"), (borrower, "b2")]
                ):
                    tg.start_soon(kind, label)
                    await wait_for_waiters(pool, n + 1)
    assert [label for _, label in sorted(served)] == ["s1", "b1", "s2", "b2"]


async def test_max_waiting_applies_to_one_shot_statements(pg_server: PostgresServer) -> None:
    async with open_pool(db_config(pg_server), max_size=1, max_waiting=2) as pool:
        async with anyio.create_task_group() as tg:
            async with pool.connection():
                for n in range(2):
                    tg.start_soon(pool.fetchval, "SELECT 1")
                    await wait_for_waiters(pool, n + 1)
                with pytest.raises(pgsd.TooManyWaiters):
                    await pool.fetchval("SELECT 1")
        assert pool.stats().statements == 2


async def test_a_cancelled_statement_is_stopped_on_the_server_and_the_rest_go_on(
    pg_server: PostgresServer,
) -> None:
    config = db_config(pg_server)
    results: list[Any] = []
    async with open_pool(config, min_size=1, max_size=1) as pool:
        pid = await pool.fetchval("SELECT pg_backend_pid()")
        query = "SELECT pg_sleep(60)"
        canceller = CancelWhenRunning(pg_server, pid, query)

        async def behind(n: int) -> None:
            results.append(await pool.fetchval("SELECT %s::int", [n]))

        async with anyio.create_task_group() as tg:
            with canceller.scope:
                async with anyio.create_task_group() as inner:
                    inner.start_soon(canceller.run)
                    inner.start_soon(pool.fetchval, query)
                    await wait_until_sent(pool, 1)
                    for n in range(5):  # sent behind the sleep, on the same connection
                        tg.start_soon(behind, n)
                    await wait_until_sent(pool, 6)
            # The caller left; the statements behind get their results well before 60 s.
            with anyio.fail_after(config.cancel_grace + 5):
                await wait_for_count(results, 5)
        assert sorted(results) == list(range(5))
        busy = await server_connections(pg_server, config.application_name)
        assert busy <= 1
        stats = pool.stats()
        assert stats.connections_closed == 0  # stopped by the cancel request, not closed
        assert await pool.fetchval("SELECT pg_backend_pid()") == pid


async def wait_until_sent(pool: pgsd.ConnectionPool, count: int) -> None:
    for _ in range(1000):
        if pool.stats().statements_in_flight >= count:
            return
        await anyio.lowlevel.checkpoint()
    raise AssertionError(f"never {count} statements in flight")


async def wait_for_count(items: list[Any], count: int) -> None:
    for _ in range(10_000):
        if len(items) >= count:
            return
        await anyio.sleep(0.01)
    raise AssertionError(f"never {count} items")
