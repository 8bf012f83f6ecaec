"""Statements pipelined on one connection, against a real server, on asyncio and trio.

The engine under the pool's one-shot statements (`pgsd._pool.pipeline`):
each statement has its own Sync, so that every caller gets its own result,
an error stays with its statement, and a lost connection fails exactly the
statements in flight with `OutcomeUnknown`. Results must decode exactly as
through a lent connection.
"""

from __future__ import annotations

import decimal
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.abc
import psycopg
import psycopg.errors
import pytest
from psycopg import pq
from psycopg.rows import dict_row

import pgsd
from pgsd._backend import current_backend
from pgsd._errors import OutcomeUnknown
from pgsd._pool import pipeline as pipeline_module
from pgsd._pool.pipeline import Pipeline, Statement, rowcount
from pgsd.testing import PostgresServer
from support import CancelWhenRunning

pytestmark = pytest.mark.anyio


class Caller:
    """Statements on one pipelined connection, as the pool will send them."""

    def __init__(self, conn: pgsd.Connection, tg: anyio.abc.TaskGroup) -> None:
        self.conn = conn
        self.pipeline = Pipeline(conn)
        self.pipeline.start()
        self._spawn: Callable[[Callable[[], Any]], None] = tg.start_soon
        self.sent = 0

    async def run(self, query: str, params: Any = None) -> Any:
        pipeline = self.pipeline
        statement = Statement(query, params, current_backend().waker())
        pipeline.send(statement)
        if pipeline.claim_reader():
            self._spawn(pipeline.run)
        self.sent += 1
        try:
            await statement.waker.wait()
        except BaseException:
            statement.abandoned = True
            raise
        if statement.error is not None:
            raise statement.error
        return statement

    async def rows(self, query: str, params: Any = None, row_factory: Any = None) -> list[Any]:
        return self.pipeline.rows(await self.run(query, params), row_factory)


@pytest.fixture
async def caller(pg_server: PostgresServer) -> AsyncIterator[Caller]:
    conn = await pgsd.connect(pg_server.dsn(), autocommit=True)
    try:
        async with anyio.create_task_group() as tg:
            yield Caller(conn, tg)
    finally:
        with anyio.move_on_after(5, shield=True):
            await conn.close()


async def lent_rows(pg_server: PostgresServer, query: str, params: Any = None, **kw: Any) -> Any:
    async with await pgsd.connect(pg_server.dsn(), autocommit=True, **kw) as conn:
        cur = await conn.execute(query, params)
        return await cur.fetchall()


async def test_concurrent_callers_each_get_their_own_result(caller: Caller) -> None:
    results: dict[int, list[Any]] = {}

    async def one(n: int) -> None:
        results[n] = await caller.rows("SELECT %s::int * 2, %s::text", [n, f"n{n}"])

    async with anyio.create_task_group() as tg:
        for n in range(300):
            tg.start_soon(one, n)
    assert results == {n: [(n * 2, f"n{n}")] for n in range(300)}
    assert not caller.pipeline.in_flight


async def test_each_sync_may_flush_where_libpq_cannot_queue_one(
    caller: Caller, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without PQsendPipelineSync (libpq before 17), every Sync writes at once.
    monkeypatch.setattr(pipeline_module, "_send_sync", None)
    results: dict[int, Any] = {}

    async def one(n: int) -> None:
        results[n] = await caller.rows("SELECT %s::int", [n])

    async with anyio.create_task_group() as tg:
        for n in range(50):
            tg.start_soon(one, n)
    assert results == {n: [(n,)] for n in range(50)}


def test_the_queued_sync_is_found_in_psycopgs_own_libpq() -> None:
    # psycopg's binary package bundles libpq 17 or later: the Sync that does not
    # write at once must be found there, or every statement costs a write.
    assert pq.__impl__ == "binary"
    assert pq.version() >= 170000
    assert pipeline_module._send_sync is not None


async def test_rows_decode_as_through_a_lent_connection(
    caller: Caller, pg_server: PostgresServer
) -> None:
    query = (
        "SELECT NULL::int AS nothing, 'x'::text AS letter, 1.5::numeric AS half,"
        " '2026-12-03'::date AS day, ARRAY[1, 2] AS pair, '{\"a\": 1}'::jsonb AS doc"
    )
    rows = await caller.rows(query)
    assert rows == await lent_rows(pg_server, query)
    assert rows[0][2] == decimal.Decimal("1.5")
    as_dicts = await caller.rows(query, row_factory=dict_row)
    assert as_dicts == await lent_rows(pg_server, query, row_factory=dict_row)
    many = await caller.rows("SELECT generate_series(1, 5000)")
    assert many == [(n,) for n in range(1, 5001)]
    assert await caller.rows("SELECT 1 WHERE false") == []


async def test_rowcount_of_a_command(caller: Caller) -> None:
    await caller.run("CREATE TEMPORARY TABLE t (n int)")
    statement = await caller.run("INSERT INTO t SELECT generate_series(1, 7)")
    assert rowcount(statement) == 7
    assert rowcount(await caller.run("UPDATE t SET n = n + 1 WHERE n > 4")) == 3


async def test_an_error_stays_with_its_statement(caller: Caller) -> None:
    outcomes: dict[int, Any] = {}

    async def one(n: int) -> None:
        query = "SELECT 1 / %s::int" if n == 7 else "SELECT %s::int"
        try:
            outcomes[n] = await caller.rows(query, [0 if n == 7 else n])
        except psycopg.Error as ex:
            outcomes[n] = ex

    async with anyio.create_task_group() as tg:
        for n in range(20):
            tg.start_soon(one, n)
    assert isinstance(outcomes[7], psycopg.errors.DivisionByZero)
    assert {n: v for n, v in outcomes.items() if n != 7} == {n: [(n,)] for n in range(20) if n != 7}
    # The same class as a lent connection raises, and the connection goes on.
    assert await caller.rows("SELECT 'after'") == [("after",)]


async def test_a_bad_parameter_fails_before_anything_is_sent(caller: Caller) -> None:
    with pytest.raises(psycopg.ProgrammingError):
        await caller.rows("SELECT %s, %s", [1])
    assert caller.sent == 0
    assert await caller.rows("SELECT 2") == [(2,)]


async def test_a_cancelled_caller_leaves_and_its_result_is_dropped(
    caller: Caller, pg_server: PostgresServer
) -> None:
    query = "SELECT pg_sleep(0.5), 'slow'"
    canceller = CancelWhenRunning(pg_server, caller.conn.info.backend_pid, query)
    with canceller.scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(canceller.run)
            await caller.rows(query)
    assert canceller.scope.cancelled_caught
    # The statement behind it gets its own result, not the abandoned one's.
    assert await caller.rows("SELECT 'next'") == [("next",)]
    assert not caller.pipeline.in_flight


async def test_a_lost_connection_fails_exactly_the_statements_in_flight(
    caller: Caller, pg_server: PostgresServer
) -> None:
    assert await caller.rows("SELECT 1") == [(1,)]
    outcomes: list[Exception] = []

    async def one() -> None:
        try:
            await caller.rows("SELECT pg_sleep(30)")
        except Exception as ex:
            outcomes.append(ex)

    query = "SELECT pg_sleep(30)"
    canceller = CancelWhenRunning(pg_server, caller.conn.info.backend_pid, query)
    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(one)
        await canceller.run()  # cancels nothing we need: it only waits until the query runs
        pg_server.execute("SELECT pg_terminate_backend(%s)", [caller.conn.info.backend_pid])
    assert len(outcomes) == 3
    assert all(isinstance(ex, OutcomeUnknown) for ex in outcomes)
    assert all(isinstance(ex, psycopg.OperationalError) for ex in outcomes)
    assert "may or may not have run" in str(outcomes[0])
    assert caller.pipeline.broken is not None
