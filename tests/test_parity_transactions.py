"""Transactions, pipeline mode, COPY and notifications as psycopg: the parity suite's session half.

Each scenario runs on stock ``psycopg.AsyncConnection`` on asyncio and on
``pgsd.Connection`` on the test's backend (see ``tests/parity.py``), and
each test then asserts what the common outcome must be, from psycopg's
documented behaviour.

Where the result of a pipeline depends on when the server answers, the
first statement of the pipeline waits on an advisory lock that a second
connection holds until every statement is queued: no result can arrive
early, whatever the load. Notifications said to be "waiting" are waited
for in the listener's socket (peeked, not read) before ``notifies()`` is
called.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import psycopg
import pytest
from psycopg.copy import AsyncCopy, AsyncLibpqWriter, AsyncQueuedLibpqWriter
from psycopg.transaction import OutOfOrderTransactionNesting

from parity import (
    DIVISION_BY_ZERO,
    ConnectionClass,
    Raised,
    assert_same,
    attempt,
    tx_status,
    value_or_raised,
)
from pgsd.testing import PostgresServer

pytestmark = pytest.mark.anyio


@pytest.fixture
def dsn(pg_server: PostgresServer) -> str:
    """Every scenario here runs on the session's server."""
    return pg_server.dsn()


autocommit_modes = pytest.mark.parametrize(
    "autocommit", [False, True], ids=["transaction", "autocommit"]
)

#: The table the transaction and pipeline scenarios write to, and the one COPY fills.
TABLE = "t (x int)"
COPY_TABLE = "c (id int, name text, data bytea)"
#: The content of ``t``, in order.
CONTENT = "SELECT coalesce(array_agg(x ORDER BY x), '{}') FROM t"

#: The advisory lock key that holds a pipeline's first statement back.
LOCK_KEY = 7_210_455
WAIT_FOR_THE_LOCK = "SELECT 1 FROM pg_advisory_xact_lock_shared(%s)"

#: What psycopg raises for a statement in a failed transaction, and for a fetch with no result.
IN_FAILED_TRANSACTION = Raised(
    psycopg.errors.InFailedSqlTransaction,
    "25P02",
    "current transaction is aborted, commands ignored until end of transaction block",
)
NO_RESULT = Raised(psycopg.ProgrammingError, None, "no result available")

#: Messages of psycopg's ProgrammingError for commit()/rollback() inside a block.
COMMIT_FORBIDDEN = (
    "Explicit commit() forbidden within a Transaction context. (Transaction will be"
    " automatically committed on successful exit from context.)"
)
ROLLBACK_FORBIDDEN = (
    "Explicit rollback() forbidden within a Transaction context. (Either raise"
    " Rollback() or allow an exception to propagate out of the context.)"
)


class Boom(Exception):
    """The user's own exception, raised inside a block."""


def pipe_status(conn: psycopg.AsyncConnection[Any]) -> str:
    return conn.info.pipeline_status.name


def states(
    conn: psycopg.AsyncConnection[Any], *blocks: psycopg.AsyncTransaction
) -> tuple[str, ...]:
    """Each block's status, then the connection's transaction status."""
    return (*(block.status.value for block in blocks), tx_status(conn))


def status_after_statement(autocommit: bool) -> str:
    """After a statement outside any block, psycopg has begun a transaction unless in autocommit."""
    return "IDLE" if autocommit else "INTRANS"


def status_after_error(autocommit: bool) -> str:
    """After a failed statement outside any block: a failed transaction unless in autocommit."""
    return "IDLE" if autocommit else "INERROR"


@contextlib.asynccontextmanager
async def table_session(
    cls: ConnectionClass, dsn: str, table: str, *, autocommit: bool = False
) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A connection on which the temporary ``table`` is made and committed, left idle."""
    async with await cls.connect(dsn, autocommit=autocommit) as conn:
        await conn.execute(f"CREATE TEMP TABLE {table}")
        if not autocommit:
            await conn.commit()
        yield conn


async def rows(
    conn: psycopg.AsyncConnection[Any], query: str, params: Any = None
) -> list[tuple[Any, ...]]:
    cur = await conn.execute(query, params)
    return await cur.fetchall()


async def rows_once_rolled_back(conn: psycopg.AsyncConnection[Any], query: str) -> list[Any]:
    """``query``'s rows, after a rollback of what a failure left open (none in autocommit)."""
    if not conn.autocommit:
        await conn.rollback()
    return await rows(conn, query)


async def left_after_failure(conn: psycopg.AsyncConnection[Any], query: str) -> list[Any]:
    """What a failure left: (transaction status, closed), then :func:`rows_once_rolled_back`."""
    left = (tx_status(conn), conn.closed)
    return [left, await rows_once_rolled_back(conn, query)]


async def values(conn: psycopg.AsyncConnection[Any]) -> list[int]:
    """The content of ``t``; an idle connection is left idle (no implicit transaction)."""
    idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    cur = await conn.execute(CONTENT)
    row = await cur.fetchone()
    assert row is not None
    if idle and not conn.autocommit:
        await conn.rollback()
    return list(row[0])


async def committed(conn: psycopg.AsyncConnection[Any]) -> list[int]:
    """The content of ``t`` once whatever is still open is rolled back: what was committed."""
    await conn.rollback()
    return await values(conn)


@contextlib.contextmanager
def caught(steps: list[Any]) -> Iterator[None]:
    """Record in ``steps``, instead of raising, a Boom or a psycopg error out of the block."""
    try:
        yield
    except Boom as ex:
        steps.append(("caught", str(ex)))
    except psycopg.Error as ex:
        steps.append(Raised.of(ex))


@contextlib.asynccontextmanager
async def lock_held(cls: ConnectionClass, dsn: str) -> AsyncIterator[Callable[[], Awaitable[Any]]]:
    """Hold LOCK_KEY on a connection of its own (WAIT_FOR_THE_LOCK waits); yield its release."""
    async with await cls.connect(dsn, autocommit=True) as holder:
        await holder.execute("SELECT pg_advisory_lock(%s)", [LOCK_KEY])

        async def release() -> Any:
            return await holder.execute("SELECT pg_advisory_unlock(%s)", [LOCK_KEY])

        yield release


def count_notifications(data: bytes) -> int:
    """The complete NotificationResponse ('A') messages at the start of ``data``."""
    count = pos = 0
    while pos + 5 <= len(data):
        length = int.from_bytes(data[pos + 1 : pos + 5], "big")
        if pos + 1 + length > len(data):
            break
        if data[pos : pos + 1] == b"A":
            count += 1
        pos += 1 + length
    return count


async def wait_for_notifications(conn: psycopg.AsyncConnection[Any], count: int) -> None:
    """Wait until ``count`` notifications wait unread in ``conn``'s socket.

    The socket is peeked through a duplicate descriptor: nothing is read,
    libpq and the event loop see the bytes as they were. The listener must
    be idle, its last answer read, so the buffer starts on a message.
    """
    fd = conn.pgconn.socket
    for _ in range(1000):
        with socket.socket(fileno=os.dup(fd)) as sock:
            try:
                data = sock.recv(1 << 20, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                data = b""
        if count_notifications(data) >= count:
            return
        await anyio.sleep(0.01)
    raise AssertionError(f"{count} notification(s) did not reach the listener in 10 s")


@contextlib.asynccontextmanager
async def listening(
    cls: ConnectionClass, dsn: str, channel: str, *, autocommit: bool = True
) -> AsyncIterator[tuple[psycopg.AsyncConnection[Any], psycopg.AsyncConnection[Any]]]:
    """(listener, sender): the listener LISTENs on ``channel``, idle; the sender autocommits."""
    async with (
        await cls.connect(dsn, autocommit=autocommit) as listener,
        await cls.connect(dsn, autocommit=True) as sender,
    ):
        await listener.execute(f"LISTEN {channel}")
        if not autocommit:
            await listener.commit()
        yield listener, sender


async def notify(sender: psycopg.AsyncConnection[Any], channel: str, *payloads: str) -> None:
    """One notification on ``channel`` per payload, each sent by a statement of its own."""
    for payload in payloads:
        await sender.execute("SELECT pg_notify(%s, %s)", [channel, payload])


async def payloads(listener: psycopg.AsyncConnection[Any], **notifies: Any) -> list[str]:
    """The payloads of what ``listener.notifies(**notifies)`` yields."""
    return [n.payload async for n in listener.notifies(**notifies)]


# --- transactions ------------------------------------------------------------------


async def commit_on_success(cls: ConnectionClass, dsn: str, autocommit: bool) -> Any:
    async with table_session(cls, dsn, TABLE, autocommit=autocommit) as conn:
        steps: list[Any] = [tx_status(conn)]
        async with conn.transaction() as tx:
            steps.append((tx.status.value, tx_status(conn), tx.savepoint_name))
            await conn.execute("INSERT INTO t VALUES (1)")
        steps.append(states(conn, tx))
        steps.append(await committed(conn))  # nothing left to undo: the block committed
        return steps


@autocommit_modes
async def test_transaction_commits_on_success(dsn: str, autocommit: bool) -> None:
    result = await assert_same(commit_on_success, dsn, autocommit)
    assert result == ["IDLE", ("active", "INTRANS", ""), ("committed", "IDLE"), [1]]


async def error_in_block(cls: ConnectionClass, dsn: str, autocommit: bool, error: str) -> Any:
    async with table_session(cls, dsn, TABLE, autocommit=autocommit) as conn:
        steps: list[Any] = []
        with caught(steps):
            async with conn.transaction() as tx:
                await conn.execute("INSERT INTO t VALUES (1)")
                if error == "user":
                    raise Boom("out of the block")
                await conn.execute("SELECT 1/0")
                steps.append("not reached")
        steps.append((*states(conn, tx), conn.closed))
        steps.append(await values(conn))
        steps.append(await rows(conn, "SELECT 'usable'"))
        return steps


@pytest.mark.parametrize(
    ("error", "raised"),
    [("user", ("caught", "out of the block")), ("sql", DIVISION_BY_ZERO)],
    ids=["user-exception", "sql-error"],
)
@autocommit_modes
async def test_an_error_in_a_block_rolls_it_back_and_propagates(
    dsn: str, autocommit: bool, error: str, raised: Any
) -> None:
    result = await assert_same(error_in_block, dsn, autocommit, error)
    assert result == [raised, ("rolled_back_with_error", "IDLE", False), [], [("usable",)]]


async def nested_savepoints(cls: ConnectionClass, dsn: str, autocommit: bool) -> Any:
    async with table_session(cls, dsn, TABLE, autocommit=autocommit) as conn:
        steps: list[Any] = []
        async with conn.transaction() as outer:
            await conn.execute("INSERT INTO t VALUES (1)")
            with contextlib.suppress(Boom):
                async with conn.transaction() as inner:
                    steps.append(inner.savepoint_name)
                    await conn.execute("INSERT INTO t VALUES (2)")
                    raise Boom
            steps.append(("inner", *states(conn, inner)))
            async with conn.transaction() as second:
                steps.append(second.savepoint_name)
                await conn.execute("INSERT INTO t VALUES (3)")
            steps.append(("second", *states(conn, second)))
            steps.append(await values(conn))
        steps.append(("outer", *states(conn, outer)))
        steps.append(await committed(conn))
        return steps


@autocommit_modes
async def test_nested_block_is_a_savepoint_whose_rollback_keeps_outer_work(
    dsn: str, autocommit: bool
) -> None:
    result = await assert_same(nested_savepoints, dsn, autocommit)
    assert result == [
        "_pg3_2",
        ("inner", "rolled_back_with_error", "INTRANS"),
        "_pg3_2",
        ("second", "committed", "INTRANS"),
        [1, 3],
        ("outer", "committed", "IDLE"),
        [1, 3],
    ]


async def block_in_implicit_transaction(cls: ConnectionClass, dsn: str) -> Any:
    async with table_session(cls, dsn, TABLE) as conn:
        await conn.execute("SELECT 1")  # starts the implicit transaction
        steps: list[Any] = [tx_status(conn)]
        async with conn.transaction() as tx:
            steps.append(tx.savepoint_name)
            await conn.execute("INSERT INTO t VALUES (1)")
        steps.append(states(conn, tx))
        steps.append(await committed(conn))  # the implicit transaction held the block's work
        return steps


async def test_block_inside_an_implicit_transaction_is_a_savepoint(dsn: str) -> None:
    result = await assert_same(block_in_implicit_transaction, dsn)
    assert result == ["INTRANS", "_pg3_1", ("committed", "INTRANS"), []]


async def named_savepoints(cls: ConnectionClass, dsn: str, autocommit: bool) -> Any:
    async with table_session(cls, dsn, TABLE, autocommit=autocommit) as conn:
        steps: list[Any] = []
        async with conn.transaction(savepoint_name="outer_sp") as outer:
            steps.append(outer.savepoint_name)
            await conn.execute("INSERT INTO t VALUES (1)")
            # The savepoint exists on the server under that name.
            await conn.execute("ROLLBACK TO SAVEPOINT outer_sp")
            await conn.execute("INSERT INTO t VALUES (2)")
            async with conn.transaction(savepoint_name="inner sp") as inner:
                steps.append(inner.savepoint_name)
                await conn.execute("INSERT INTO t VALUES (3)")
                await conn.execute('ROLLBACK TO SAVEPOINT "inner sp"')
                await conn.execute("INSERT INTO t VALUES (4)")
            with contextlib.suppress(Boom):
                async with conn.transaction(savepoint_name="failing") as failing:
                    await conn.execute("INSERT INTO t VALUES (5)")
                    raise Boom
            steps.append(states(conn, inner, failing))
            steps.append(await values(conn))
        steps.append(states(conn, outer))
        steps.append(await committed(conn))
        return steps


@autocommit_modes
async def test_named_savepoints(dsn: str, autocommit: bool) -> None:
    result = await assert_same(named_savepoints, dsn, autocommit)
    assert result == [
        "outer_sp",
        "inner sp",
        ("committed", "rolled_back_with_error", "INTRANS"),
        [2, 4],
        ("committed", "IDLE"),
        [2, 4],
    ]


async def force_rollback(cls: ConnectionClass, dsn: str, autocommit: bool) -> Any:
    async with table_session(cls, dsn, TABLE, autocommit=autocommit) as conn:
        steps: list[Any] = []
        async with conn.transaction(force_rollback=True) as tx:
            await conn.execute("INSERT INTO t VALUES (1)")
            async with conn.transaction() as inner:
                await conn.execute("INSERT INTO t VALUES (2)")
            steps.append(await values(conn))
        steps.append(states(conn, inner, tx))
        steps.append(await committed(conn))
        async with conn.transaction() as outer:
            await conn.execute("INSERT INTO t VALUES (3)")
            async with conn.transaction(force_rollback=True) as forced:
                await conn.execute("INSERT INTO t VALUES (4)")
            steps.append(await values(conn))
        steps.append(states(conn, forced, outer))
        steps.append(await committed(conn))
        return steps


@autocommit_modes
async def test_force_rollback(dsn: str, autocommit: bool) -> None:
    result = await assert_same(force_rollback, dsn, autocommit)
    assert result == [
        [1, 2],
        ("committed", "rolled_back_explicitly", "IDLE"),
        [],
        [3],
        ("rolled_back_explicitly", "committed", "IDLE"),
        [3],
    ]


async def rollback_exception(cls: ConnectionClass, dsn: str, autocommit: bool) -> Any:
    async with table_session(cls, dsn, TABLE, autocommit=autocommit) as conn:
        steps: list[Any] = []
        async with conn.transaction() as tx:
            await conn.execute("INSERT INTO t VALUES (1)")
            raise psycopg.Rollback()
        steps.append(("swallowed", *states(conn, tx)))
        async with conn.transaction() as outer:
            await conn.execute("INSERT INTO t VALUES (2)")
            async with conn.transaction() as inner:
                await conn.execute("INSERT INTO t VALUES (3)")
                raise psycopg.Rollback()
            steps.append(("inner swallowed", *states(conn, inner)))
            await conn.execute("INSERT INTO t VALUES (4)")
        steps.append(("outer", *states(conn, outer)))
        steps.append(await committed(conn))
        return steps


@autocommit_modes
async def test_rollback_exception_is_swallowed_by_its_block(dsn: str, autocommit: bool) -> None:
    result = await assert_same(rollback_exception, dsn, autocommit)
    assert result == [
        ("swallowed", "rolled_back_explicitly", "IDLE"),
        ("inner swallowed", "rolled_back_explicitly", "INTRANS"),
        ("outer", "committed", "IDLE"),
        [2, 4],
    ]


async def rollback_outer_from_inner(cls: ConnectionClass, dsn: str, autocommit: bool) -> Any:
    async with table_session(cls, dsn, TABLE, autocommit=autocommit) as conn:
        steps: list[Any] = []
        async with conn.transaction() as outer:
            await conn.execute("INSERT INTO t VALUES (1)")
            async with conn.transaction() as inner:
                await conn.execute("INSERT INTO t VALUES (2)")
                raise psycopg.Rollback(outer)
            steps.append("after the inner block")  # not reached: the outer swallows it
        steps.append(states(conn, inner, outer))
        steps.append(await committed(conn))
        # A Rollback naming a block that is not being left goes through every block.
        try:
            async with conn.transaction() as other:
                await conn.execute("INSERT INTO t VALUES (3)")
                raise psycopg.Rollback(outer)
        except psycopg.Rollback as ex:
            steps.append(("escaped", ex.transaction is outer, other.status.value))
        steps.append((tx_status(conn), await values(conn)))
        return steps


@autocommit_modes
async def test_rollback_of_the_outer_block_raised_in_the_inner_one(
    dsn: str, autocommit: bool
) -> None:
    result = await assert_same(rollback_outer_from_inner, dsn, autocommit)
    assert result == [
        ("rolled_back_explicitly", "rolled_back_explicitly", "IDLE"),
        [],
        ("escaped", True, "rolled_back_explicitly"),
        ("IDLE", []),
    ]


async def commit_inside_block(cls: ConnectionClass, dsn: str, autocommit: bool) -> Any:
    async with table_session(cls, dsn, TABLE, autocommit=autocommit) as conn:
        steps: list[Any] = []

        async def commit_then_rollback() -> list[Any]:
            return [await attempt(end(), "no error") for end in (conn.commit, conn.rollback)]

        async with conn.transaction() as tx:
            await conn.execute("INSERT INTO t VALUES (1)")
            async with conn.transaction() as inner:
                steps += await commit_then_rollback()
                steps.append(states(conn, inner))
            steps += await commit_then_rollback()
            steps.append(states(conn, tx))
        steps.append(states(conn, tx))
        steps.append(await committed(conn))
        return steps


@autocommit_modes
async def test_commit_and_rollback_inside_a_block_raise_programming_error(
    dsn: str, autocommit: bool
) -> None:
    result = await assert_same(commit_inside_block, dsn, autocommit)
    commit = Raised(psycopg.ProgrammingError, None, COMMIT_FORBIDDEN)
    rollback = Raised(psycopg.ProgrammingError, None, ROLLBACK_FORBIDDEN)
    assert result == [
        commit,
        rollback,
        ("active", "INTRANS"),
        commit,
        rollback,
        ("active", "INTRANS"),
        ("committed", "IDLE"),
        [1],
    ]


async def status_at_each_step(cls: ConnectionClass, dsn: str, autocommit: bool) -> Any:
    async with table_session(cls, dsn, TABLE, autocommit=autocommit) as conn:
        steps: list[Any] = [("start", tx_status(conn))]
        async with conn.transaction() as tx:
            steps.append(("entered", *states(conn, tx)))
            await conn.execute("INSERT INTO t VALUES (1)")
            steps.append(("after insert", *states(conn, tx)))
        steps.append(("left", *states(conn, tx)))
        with contextlib.suppress(Boom):
            async with conn.transaction() as failed:
                try:
                    await conn.execute("SELECT 1/0")
                except psycopg.errors.DivisionByZero:
                    steps.append(("sql error", *states(conn, failed)))
                raise Boom
        steps.append(("left by error", *states(conn, failed)))
        async with conn.transaction() as explicit:
            raise psycopg.Rollback
        steps.append(("rollback", *states(conn, explicit)))
        async with conn.transaction(force_rollback=True) as forced:
            pass
        steps.append(("forced", *states(conn, forced)))
        return steps


@autocommit_modes
async def test_transaction_status_after_each_step(dsn: str, autocommit: bool) -> None:
    result = await assert_same(status_at_each_step, dsn, autocommit)
    assert result == [
        ("start", "IDLE"),
        ("entered", "active", "INTRANS"),
        ("after insert", "active", "INTRANS"),
        ("left", "committed", "IDLE"),
        ("sql error", "active", "INERROR"),
        ("left by error", "rolled_back_with_error", "IDLE"),
        ("rollback", "rolled_back_explicitly", "IDLE"),
        ("forced", "rolled_back_explicitly", "IDLE"),
    ]


async def sql_error_in_savepoint(cls: ConnectionClass, dsn: str, autocommit: bool) -> Any:
    async with table_session(cls, dsn, TABLE, autocommit=autocommit) as conn:
        await conn.execute("ALTER TABLE t ADD PRIMARY KEY (x)")
        if not autocommit:
            await conn.commit()
        steps: list[Any] = []
        async with conn.transaction() as outer:
            await conn.execute("INSERT INTO t VALUES (1)")
            try:
                async with conn.transaction() as inner:
                    await conn.execute("INSERT INTO t VALUES (2)")
                    await conn.execute("INSERT INTO t VALUES (1)")
            except psycopg.Error as ex:
                steps.append(Raised(type(ex), ex.sqlstate, ""))
            steps.append(states(conn, inner))
            await conn.execute("INSERT INTO t VALUES (3)")
        steps.append(states(conn, outer))
        steps.append(await committed(conn))
        return steps


@autocommit_modes
async def test_sql_error_in_a_savepoint_keeps_the_outer_transaction(
    dsn: str, autocommit: bool
) -> None:
    result = await assert_same(sql_error_in_savepoint, dsn, autocommit)
    assert result == [
        Raised(psycopg.errors.UniqueViolation, "23505", ""),
        ("rolled_back_with_error", "INTRANS"),
        ("committed", "IDLE"),
        [1, 3],
    ]


async def swallowed_sql_error(cls: ConnectionClass, dsn: str, autocommit: bool) -> Any:
    async with table_session(cls, dsn, TABLE, autocommit=autocommit) as conn:
        steps: list[Any] = []
        with caught(steps):
            async with conn.transaction() as tx:
                await conn.execute("INSERT INTO t VALUES (1)")
                try:
                    await conn.execute("SELECT 1/0")
                except psycopg.errors.DivisionByZero:
                    steps.append(("swallowed", tx_status(conn)))
                steps.append(await attempt(conn.execute("INSERT INTO t VALUES (2)")))
            steps.append("left the block")
        steps.append((*states(conn, tx), conn.closed))
        steps.append(await values(conn))
        return steps


@autocommit_modes
async def test_block_left_normally_after_a_swallowed_sql_error(dsn: str, autocommit: bool) -> None:
    result = await assert_same(swallowed_sql_error, dsn, autocommit)
    assert result[0] == ("swallowed", "INERROR")
    assert result[1] == IN_FAILED_TRANSACTION
    # COMMIT of a failed transaction rolls it back on the server.
    assert result[-2][1:] == ("IDLE", False)
    assert result[-1] == []


async def leave_outer_block_first(
    cls: ConnectionClass, dsn: str, autocommit: bool, outer_error: bool, inner_error: bool
) -> Any:
    async with table_session(cls, dsn, TABLE, autocommit=autocommit) as conn:
        outer_cm = conn.transaction()
        outer = await outer_cm.__aenter__()
        await conn.execute("INSERT INTO t VALUES (1)")
        inner_cm = conn.transaction()
        inner = await inner_cm.__aenter__()
        await conn.execute("INSERT INTO t VALUES (2)")
        steps: list[Any] = []
        for name, cm, error in (("outer", outer_cm, outer_error), ("inner", inner_cm, inner_error)):
            exc = Boom(f"leaving {name}") if error else None
            try:
                if exc is None:
                    returned = await cm.__aexit__(None, None, None)
                else:
                    returned = await cm.__aexit__(Boom, exc, None)
                steps.append((name, "returned", returned))
            except Exception as ex:
                steps.append((name, Raised.of(ex), ex is exc))
            steps.append((conn.closed, tx_status(conn), outer.status.value, inner.status.value))
        # The connection still works; nothing was committed nor rolled back.
        steps.append(await values(conn))
        await conn.rollback()
        steps.append((tx_status(conn), await values(conn)))
        return steps


@pytest.mark.parametrize("inner_error", [False, True], ids=["inner-ok", "inner-error"])
@pytest.mark.parametrize("outer_error", [False, True], ids=["outer-ok", "outer-error"])
@autocommit_modes
async def test_leaving_the_outer_block_before_the_inner_one_raises(
    dsn: str, autocommit: bool, outer_error: bool, inner_error: bool
) -> None:
    result = await assert_same(leave_outer_block_first, dsn, autocommit, outer_error, inner_error)
    outer_status = "rolled_back_with_error" if outer_error else "committed"
    inner_status = "rolled_back_with_error" if inner_error else "committed"
    outer_action = "rollback" if outer_error else "commit"
    inner_action = "rollback" if inner_error else "commit"
    assert len(result) == 6
    name, raised, same = result[0]
    assert issubclass(raised.type, psycopg.ProgrammingError)
    assert (name, raised.type, raised.sqlstate, same) == (
        "outer",
        OutOfOrderTransactionNesting,
        None,
        False,
    )
    assert raised.message.startswith(f"transaction {outer_action} at the wrong nesting level:")
    # The message shows the block as it was when it was left.
    assert "(active) [INTRANS]" in raised.message
    assert result[1] == (False, "INTRANS", outer_status, "active")
    name, raised, same = result[2]
    assert (name, raised.type, same) == ("inner", OutOfOrderTransactionNesting, False)
    assert raised.message.startswith(f"transaction {inner_action} at the wrong nesting level:")
    assert "'_pg3_2' (active) [INTRANS]" in raised.message
    assert result[3] == (False, "INTRANS", outer_status, inner_status)
    assert result[4] == [1, 2]
    assert result[5] == ("IDLE", [])


async def transaction_in_pipeline(cls: ConnectionClass, dsn: str, autocommit: bool) -> Any:
    async with table_session(cls, dsn, TABLE, autocommit=autocommit) as conn:
        steps: list[Any] = []
        async with conn.pipeline():
            async with conn.transaction() as tx:
                inserted = await conn.execute("INSERT INTO t VALUES (1) RETURNING x")
                steps.append((tx.status.value, pipe_status(conn)))
            steps.append((*states(conn, tx), pipe_status(conn)))
            steps.append(await inserted.fetchall())
            with caught(steps):
                async with conn.transaction() as failing:
                    await conn.execute("INSERT INTO t VALUES (2)")
                    await conn.execute("SELECT 1/0")
            steps.append((*states(conn, failing), pipe_status(conn)))
            after = await conn.execute(CONTENT)
        steps.append((pipe_status(conn), await after.fetchall()))
        return steps


@autocommit_modes
async def test_transaction_block_in_pipeline_mode(dsn: str, autocommit: bool) -> None:
    result = await assert_same(transaction_in_pipeline, dsn, autocommit)
    assert result == [
        ("active", "ON"),
        ("committed", "IDLE", "ON"),
        [(1,)],
        DIVISION_BY_ZERO,
        ("rolled_back_with_error", "IDLE", "ON"),
        ("OFF", [([1],)]),
    ]


# --- pipeline mode -----------------------------------------------------------------


async def pipeline_statements(cls: ConnectionClass, dsn: str, autocommit: bool) -> Any:
    async with table_session(cls, dsn, TABLE, autocommit=autocommit) as conn:
        steps: list[Any] = [pipe_status(conn)]
        async with conn.pipeline() as pipeline:
            steps.append((pipe_status(conn), pipeline.status.name))
            cursors = [
                await conn.execute("SELECT %s::int, %s::text", [i, f"v{i}"]) for i in range(10)
            ]
            insert = await conn.execute("INSERT INTO t SELECT generate_series(1, 3)")
            steps.append(await cursors[0].fetchone())  # fetched inside the block
        steps.append(pipe_status(conn))
        steps.append([await cur.fetchall() for cur in cursors])
        steps.append((insert.rowcount, insert.statusmessage))
        steps.append((tx_status(conn), await values(conn)))
        return steps


@autocommit_modes
async def test_pipeline_runs_several_statements(dsn: str, autocommit: bool) -> None:
    result = await assert_same(pipeline_statements, dsn, autocommit)
    assert result == [
        "OFF",
        ("ON", "ON"),
        (0, "v0"),
        "OFF",
        [[]] + [[(i, f"v{i}")] for i in range(1, 10)],
        (3, "INSERT 0 3"),
        (status_after_statement(autocommit), [1, 2, 3]),
    ]


async def pipeline_error(cls: ConnectionClass, dsn: str, autocommit: bool, where: str) -> Any:
    async with (
        lock_held(cls, dsn) as release,
        await cls.connect(dsn, autocommit=autocommit) as conn,
    ):
        steps: list[Any] = []
        try:
            async with conn.pipeline() as pipeline:
                first = await conn.execute(WAIT_FOR_THE_LOCK, [LOCK_KEY])
                failing = await conn.execute("SELECT 1/0")
                following = await conn.execute("SELECT 3")
                steps.append(("queued", pipe_status(conn)))
                await release()
                if where == "fetch":
                    steps.append(("fetch", await value_or_raised(first.fetchall())))
                    steps.append((pipe_status(conn), tx_status(conn)))
                    aborted = await conn.execute("SELECT 4")
                    steps.append(("aborted", await value_or_raised(aborted.fetchall())))
                    steps.append((pipe_status(conn), tx_status(conn)))
                    await pipeline.sync()
                    steps.append(("synced", pipe_status(conn), tx_status(conn)))
                    later = await conn.execute("SELECT 5")
                    steps.append(("later", await value_or_raised(later.fetchall())))
                steps.append("left the block")
        except psycopg.Error as ex:
            steps.append(("exit", Raised.of(ex)))
        steps.append((pipe_status(conn), tx_status(conn), conn.closed))
        steps.append([await value_or_raised(cur.fetchall()) for cur in (first, failing, following)])
        steps.append(await rows_once_rolled_back(conn, "SELECT 'usable'"))
        return steps


@autocommit_modes
async def test_pipeline_error_surfaces_at_block_exit(dsn: str, autocommit: bool) -> None:
    result = await assert_same(pipeline_error, dsn, autocommit, "exit")
    assert result == [
        ("queued", "ON"),
        "left the block",  # the error surfaces as the block is left
        ("exit", DIVISION_BY_ZERO),
        ("OFF", status_after_error(autocommit), False),
        [[(1,)], NO_RESULT, NO_RESULT],
        [("usable",)],
    ]


@autocommit_modes
async def test_pipeline_error_surfaces_at_fetch_and_aborts_following_statements(
    dsn: str, autocommit: bool
) -> None:
    result = await assert_same(pipeline_error, dsn, autocommit, "fetch")
    in_tx = status_after_statement(autocommit)
    assert result == [
        ("queued", "ON"),
        ("fetch", DIVISION_BY_ZERO),
        ("ABORTED", in_tx),
        ("aborted", Raised(psycopg.errors.PipelineAborted, None, "pipeline aborted")),
        ("ABORTED", in_tx),
        ("synced", "ON", status_after_error(autocommit)),
        ("later", [(5,)] if autocommit else IN_FAILED_TRANSACTION),
        "left the block",
        ("OFF", status_after_error(autocommit), False),
        [[(1,)], NO_RESULT, NO_RESULT],
        [("usable",)],
    ]


async def pipeline_sync(cls: ConnectionClass, dsn: str, autocommit: bool) -> Any:
    async with (
        lock_held(cls, dsn) as release,
        table_session(cls, dsn, TABLE, autocommit=autocommit) as conn,
    ):
        steps: list[Any] = []
        async with conn.pipeline() as pipeline:
            first = await conn.execute(WAIT_FOR_THE_LOCK, [LOCK_KEY])
            insert = await conn.execute("INSERT INTO t VALUES (1), (2)")
            steps.append((first.pgresult is None, insert.pgresult is None))
            await release()
            await pipeline.sync()
            # After sync() every result is there, before any fetch.
            steps.append((first.pgresult is None, insert.pgresult is None, insert.rowcount))
            steps.append((pipe_status(conn), tx_status(conn)))
            steps.append(await first.fetchall())
            after = await conn.execute("SELECT count(*) FROM t")
            await pipeline.sync()
            steps.append(await after.fetchall())
            await pipeline.sync()  # nothing queued
            steps.append((pipe_status(conn), tx_status(conn)))
        steps.append((pipe_status(conn), tx_status(conn)))
        return steps


@autocommit_modes
async def test_pipeline_sync_makes_results_available(dsn: str, autocommit: bool) -> None:
    result = await assert_same(pipeline_sync, dsn, autocommit)
    in_tx = status_after_statement(autocommit)
    assert result == [
        (True, True),
        (False, False, 2),
        ("ON", in_tx),
        [(1,)],
        [(2,)],
        ("ON", in_tx),
        ("OFF", in_tx),
    ]


async def executemany_in_pipeline(cls: ConnectionClass, dsn: str, autocommit: bool) -> Any:
    async with table_session(cls, dsn, TABLE, autocommit=autocommit) as conn:
        steps: list[Any] = []
        cur = conn.cursor()
        async with conn.pipeline():
            await cur.executemany(
                "INSERT INTO t VALUES (%s) RETURNING x * 10",
                [(i,) for i in range(5)],
                returning=True,
            )
            sets = [await cur.fetchall()]
            for _ in range(10):
                if not cur.nextset():
                    break
                sets.append(await cur.fetchall())
            steps.append(sets)
            await cur.executemany("INSERT INTO t VALUES (%s)", [(i,) for i in range(5, 8)])
            steps.append(pipe_status(conn))
        steps.append((cur.rowcount, pipe_status(conn)))
        steps.append(await values(conn))
        return steps


@autocommit_modes
async def test_executemany_in_a_pipeline(dsn: str, autocommit: bool) -> None:
    result = await assert_same(executemany_in_pipeline, dsn, autocommit)
    assert result == [
        [[(i * 10,)] for i in range(5)],
        "ON",
        (3, "OFF"),
        list(range(8)),
    ]


async def pipeline_shared_by_tasks(cls: ConnectionClass, dsn: str, autocommit: bool) -> Any:
    async with await cls.connect(dsn, autocommit=autocommit) as conn:
        results: dict[int, list[Any]] = {}

        async def worker(i: int) -> None:
            cur = conn.cursor()
            got = []
            for j in range(3):
                await cur.execute("SELECT %s::int * 100 + %s::int", [i, j])
                got.append(await cur.fetchone())
            results[i] = got

        async with conn.pipeline():
            async with anyio.create_task_group() as tg:
                for i in range(8):
                    tg.start_soon(worker, i)
            inside = pipe_status(conn)
        return [results[i] for i in range(8)], inside, pipe_status(conn)


@autocommit_modes
async def test_one_pipeline_used_by_several_tasks(dsn: str, autocommit: bool) -> None:
    result = await assert_same(pipeline_shared_by_tasks, dsn, autocommit)
    assert result == (
        [[(i * 100 + j,) for j in range(3)] for i in range(8)],
        "ON",
        "OFF",
    )


async def pipeline_tasks_interleaved(cls: ConnectionClass, dsn: str, autocommit: bool) -> Any:
    async with await cls.connect(dsn, autocommit=autocommit) as conn:
        tasks = 10
        results: dict[int, Any] = {}
        queued = 0
        all_queued = anyio.Event()

        async def worker(i: int) -> None:
            nonlocal queued
            cur = conn.cursor()
            await cur.execute("SELECT %s::int, repeat('x', %s)", [i, 1000 * i])
            queued += 1
            if queued == tasks:
                all_queued.set()
            # Every task has queued its statement before any fetches its result.
            await all_queued.wait()
            row = await cur.fetchone()
            assert row is not None
            results[i] = (row[0], len(row[1]))

        async with conn.pipeline():
            async with anyio.create_task_group() as tg:
                for i in range(tasks):
                    tg.start_soon(worker, i)
            inside = pipe_status(conn)
        return [results[i] for i in range(tasks)], inside, pipe_status(conn), tx_status(conn)


@autocommit_modes
async def test_pipeline_tasks_fetch_after_all_have_queued(dsn: str, autocommit: bool) -> None:
    result = await assert_same(pipeline_tasks_interleaved, dsn, autocommit)
    assert result == (
        [(i, 1000 * i) for i in range(10)],
        "ON",
        "OFF",
        status_after_statement(autocommit),
    )


async def nested_pipelines(cls: ConnectionClass, dsn: str, autocommit: bool) -> Any:
    async with await cls.connect(dsn, autocommit=autocommit) as conn:
        steps: list[Any] = []
        async with conn.pipeline() as outer:
            first = await conn.execute("SELECT 1")
            async with conn.pipeline() as inner:
                steps.append((inner is outer, pipe_status(conn)))
                # Entering the nested block synced what was queued.
                steps.append(first.pgresult is None)
                second = await conn.execute("SELECT 2")
            steps.append((pipe_status(conn), second.pgresult is None))
            steps.append((await first.fetchall(), await second.fetchall()))
            third = await conn.execute("SELECT 3")
        steps.append((pipe_status(conn), await third.fetchall()))
        return steps


@autocommit_modes
async def test_nested_pipeline_blocks(dsn: str, autocommit: bool) -> None:
    result = await assert_same(nested_pipelines, dsn, autocommit)
    assert result == [
        (True, "ON"),
        False,
        ("ON", False),
        ([(1,)], [(2,)]),
        ("OFF", [(3,)]),
    ]


async def pipeline_status_values(cls: ConnectionClass, dsn: str, autocommit: bool) -> Any:
    async with await cls.connect(dsn, autocommit=autocommit) as conn:
        steps: list[Any] = [("before", pipe_status(conn))]
        async with conn.pipeline() as pipeline:
            steps.append(("entered", pipe_status(conn), pipeline.status.name))
            failing = await conn.execute("SELECT 1/0")
            steps.append(("failing", await value_or_raised(failing.fetchall())))
            steps.append(("after error", pipe_status(conn), pipeline.status.name))
            await pipeline.sync()
            steps.append(("synced", pipe_status(conn), pipeline.status.name))
        steps.append(("left", pipe_status(conn)))
        steps.append(("usable", await rows_once_rolled_back(conn, "SELECT 1")))
        return steps


@autocommit_modes
async def test_pipeline_status(dsn: str, autocommit: bool) -> None:
    result = await assert_same(pipeline_status_values, dsn, autocommit)
    assert result == [
        ("before", "OFF"),
        ("entered", "ON", "ON"),
        ("failing", DIVISION_BY_ZERO),
        ("after error", "ABORTED", "ABORTED"),
        ("synced", "ON", "ON"),
        ("left", "OFF"),
        ("usable", [(1,)]),
    ]


# --- COPY --------------------------------------------------------------------------

COPY_ROWS = [
    (1, "one", b"\x00\x01"),
    (2, "tab\there\nnewline", b""),
    (3, None, None),
    (4, "\u00fcn\u00efcode \\ backslash", b"\xff"),
]
WRITERS = {"queued": AsyncQueuedLibpqWriter, "libpq": AsyncLibpqWriter}


def copy_id_and_name(
    cur: psycopg.AsyncCursor[Any], writer: str | None = None
) -> contextlib.AbstractAsyncContextManager[AsyncCopy]:
    """``COPY c (id, name) FROM STDIN``, through one of WRITERS or psycopg's default one."""
    return cur.copy(
        "COPY c (id, name) FROM STDIN", writer=None if writer is None else WRITERS[writer](cur)
    )


async def copy_write_text(cls: ConnectionClass, dsn: str, autocommit: bool) -> Any:
    async with table_session(cls, dsn, COPY_TABLE, autocommit=autocommit) as conn:
        cur = conn.cursor()
        async with copy_id_and_name(cur) as copy:
            await copy.write("1\tone\n2\ttw")
            await copy.write(b"o\n3\t\\N\n")
        steps: list[Any] = [(cur.rowcount, tx_status(conn))]
        steps.append(await rows(conn, "SELECT id, name FROM c ORDER BY id"))
        return steps


@autocommit_modes
async def test_copy_from_stdin_with_write(dsn: str, autocommit: bool) -> None:
    result = await assert_same(copy_write_text, dsn, autocommit)
    assert result == [
        (3, status_after_statement(autocommit)),
        [(1, "one"), (2, "two"), (3, None)],
    ]


async def copy_write_row(cls: ConnectionClass, dsn: str, autocommit: bool, binary: bool) -> Any:
    async with table_session(cls, dsn, COPY_TABLE, autocommit=autocommit) as conn:
        cur = conn.cursor()
        statement = "COPY c (id, name, data) FROM STDIN"
        if binary:
            statement += " (FORMAT BINARY)"
        async with cur.copy(statement) as copy:
            if binary:
                copy.set_types(["int4", "text", "bytea"])
            for row in COPY_ROWS:
                await copy.write_row(row)
        steps: list[Any] = [(cur.rowcount, tx_status(conn))]
        steps.append(await rows(conn, "SELECT id, name, data FROM c ORDER BY id"))
        return steps


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
@autocommit_modes
async def test_copy_from_stdin_with_write_row(dsn: str, autocommit: bool, binary: bool) -> None:
    result = await assert_same(copy_write_row, dsn, autocommit, binary)
    assert result == [(4, status_after_statement(autocommit)), COPY_ROWS]


async def copy_many_rows(cls: ConnectionClass, dsn: str, writer: str) -> Any:
    async with table_session(cls, dsn, COPY_TABLE, autocommit=True) as conn:
        cur = conn.cursor()
        async with copy_id_and_name(cur, writer) as copy:
            for i in range(20000):
                await copy.write_row((i, f"name {i}"))
        return cur.rowcount, await rows(
            conn,
            "SELECT count(*), sum(id), md5(string_agg(name, ',' ORDER BY id)) FROM c",
        )


@pytest.mark.parametrize("writer", list(WRITERS))
async def test_copy_many_rows_through_a_writer(dsn: str, writer: str) -> None:
    result = await assert_same(copy_many_rows, dsn, writer)
    digest = hashlib.md5(",".join(f"name {i}" for i in range(20000)).encode()).hexdigest()
    assert result == (20000, [(20000, 20000 * 19999 // 2, digest)])


def large_copy_text() -> str:
    """About 4 MB of COPY text, written at once."""
    return "".join(f"{i}\t{'x' * 200}\n" for i in range(20000))


async def copy_large_write(cls: ConnectionClass, dsn: str, writer: str) -> Any:
    async with table_session(cls, dsn, COPY_TABLE, autocommit=True) as conn:
        cur = conn.cursor()
        data = large_copy_text()
        async with copy_id_and_name(cur, writer) as copy:
            await copy.write(data)
        return (
            len(data),
            cur.rowcount,
            await rows(conn, "SELECT count(*), sum(id), sum(length(name)) FROM c"),
        )


@pytest.mark.parametrize("writer", list(WRITERS))
async def test_copy_one_large_write_through_a_writer(dsn: str, writer: str) -> None:
    result = await assert_same(copy_large_write, dsn, writer)
    size = len(large_copy_text())
    assert size > 4_000_000
    assert result == (size, 20000, [(20000, 20000 * 19999 // 2, 20000 * 200)])


COPY_OUT = "COPY (SELECT g, 'n' || g FROM generate_series(1, 5) AS g ORDER BY g) TO STDOUT"
COPY_OUT_LINES = [f"{i}\tn{i}\n".encode() for i in range(1, 6)]
COPY_OUT_TEXT_ROWS = [(str(i), f"n{i}") for i in range(1, 6)]


async def read_to_the_end(read: Callable[[], Awaitable[Any]], end: Any) -> list[Any]:
    """What ``read()`` returns, up to ``end`` included (at most 100 reads)."""
    got: list[Any] = []
    for _ in range(100):
        got.append(await read())
        if got[-1] == end:
            break
    return got


async def copy_read_chunks(cls: ConnectionClass, dsn: str, autocommit: bool) -> Any:
    async with await cls.connect(dsn, autocommit=autocommit) as conn:
        cur = conn.cursor()
        async with cur.copy(COPY_OUT) as copy:

            async def chunk() -> bytes:
                return bytes(await copy.read())

            chunks = await read_to_the_end(chunk, b"")
        return chunks, cur.rowcount, tx_status(conn)


@autocommit_modes
async def test_copy_to_stdout_with_read(dsn: str, autocommit: bool) -> None:
    result = await assert_same(copy_read_chunks, dsn, autocommit)
    chunks, rowcount, status = result
    assert b"".join(chunks) == b"".join(COPY_OUT_LINES)
    assert chunks[-1] == b""
    assert chunks == [*COPY_OUT_LINES, b""]
    assert (rowcount, status) == (5, status_after_statement(autocommit))


async def copy_rows(cls: ConnectionClass, dsn: str, typed: bool) -> Any:
    async with await cls.connect(dsn, autocommit=True) as conn:
        cur = conn.cursor()
        async with cur.copy(COPY_OUT) as copy:
            if typed:
                copy.set_types(["int4", "text"])
            return [row async for row in copy.rows()]


@pytest.mark.parametrize(
    ("typed", "expected"),
    [(False, COPY_OUT_TEXT_ROWS), (True, [(i, f"n{i}") for i in range(1, 6)])],
    ids=["untyped", "set_types"],
)
async def test_copy_to_stdout_rows(dsn: str, typed: bool, expected: Any) -> None:
    result = await assert_same(copy_rows, dsn, typed)
    assert result == expected


async def copy_read_row(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn, autocommit=True) as conn:
        async with conn.cursor().copy(COPY_OUT) as copy:
            got = await read_to_the_end(copy.read_row, None)
        got.append(await rows(conn, "SELECT 'after'"))
        return got


async def test_copy_to_stdout_read_row(dsn: str) -> None:
    result = await assert_same(copy_read_row, dsn)
    assert result == [*COPY_OUT_TEXT_ROWS, None, [("after",)]]


async def copy_binary_out(cls: ConnectionClass, dsn: str) -> Any:
    async with table_session(cls, dsn, COPY_TABLE, autocommit=True) as conn:
        cur = conn.cursor()
        async with cur.copy("COPY c (id, name, data) FROM STDIN") as copy:
            for row in COPY_ROWS:
                await copy.write_row(row)
        async with cur.copy(
            "COPY (SELECT id, name, data FROM c ORDER BY id) TO STDOUT (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["int4", "text", "bytea"])
            return [row async for row in copy.rows()]


async def test_copy_to_stdout_binary_with_set_types(dsn: str) -> None:
    result = await assert_same(copy_binary_out, dsn)
    assert result == COPY_ROWS


async def copy_iterate(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn, autocommit=True) as conn:
        cur = conn.cursor()
        async with cur.copy(COPY_OUT) as copy:
            return [bytes(data) async for data in copy]


async def test_copy_to_stdout_async_iteration(dsn: str) -> None:
    result = await assert_same(copy_iterate, dsn)
    assert result == COPY_OUT_LINES


async def copy_from_failing(
    cls: ConnectionClass, dsn: str, autocommit: bool, error: str, writer: str | None = None
) -> Any:
    """COPY FROM that a Boom or a bad row stops, once the writer has rows queued."""
    async with table_session(cls, dsn, COPY_TABLE, autocommit=autocommit) as conn:
        steps: list[Any] = []
        with caught(steps):
            async with copy_id_and_name(conn.cursor(), writer) as copy:
                for i in range(5000):
                    await copy.write_row((i, f"name {i}"))
                if error == "user":
                    raise Boom("stop copying")
                await copy.write_row(("not a number", "bad"))
                steps.append("written")
        return steps + await left_after_failure(conn, "SELECT count(*) FROM c")


def assert_the_bad_row_is_reported(raised: Any) -> None:
    assert isinstance(raised, Raised)
    assert (raised.type, raised.sqlstate) == (psycopg.errors.InvalidTextRepresentation, "22P02")
    assert 'invalid input syntax for type integer: "not a number"' in raised.message


@autocommit_modes
async def test_copy_from_with_bad_data(dsn: str, autocommit: bool) -> None:
    result = await assert_same(copy_from_failing, dsn, autocommit, "bad-data")
    # The server reports the bad row when the block ends the COPY.
    assert result[0] == "written"
    assert_the_bad_row_is_reported(result[1])
    assert result[2:] == [(status_after_error(autocommit), False), [(0,)]]


@autocommit_modes
async def test_user_exception_in_a_copy_from_block(dsn: str, autocommit: bool) -> None:
    result = await assert_same(copy_from_failing, dsn, autocommit, "user")
    assert result == [
        ("caught", "stop copying"),
        (status_after_error(autocommit), False),
        [(0,)],
    ]


async def copy_to_user_error(cls: ConnectionClass, dsn: str, autocommit: bool) -> Any:
    async with await cls.connect(dsn, autocommit=autocommit) as conn:
        steps: list[Any] = []
        with caught(steps):
            # Far more than socket buffers hold: the server is still sending.
            async with conn.cursor().copy(
                "COPY (SELECT g, repeat('x', 100) FROM generate_series(1, 2000000) AS g) TO STDOUT"
            ) as copy:
                steps.append(await copy.read_row())
                raise Boom("enough")
        return steps + await left_after_failure(conn, "SELECT 'usable'")


@autocommit_modes
async def test_user_exception_in_a_copy_to_block(dsn: str, autocommit: bool) -> None:
    result = await assert_same(copy_to_user_error, dsn, autocommit)
    assert result == [
        ("1", "x" * 100),
        ("caught", "enough"),
        (status_after_error(autocommit), False),
        [("usable",)],
    ]


@pytest.mark.parametrize("error", ["user", "bad-data"])
@pytest.mark.parametrize("writer", list(WRITERS))
async def test_copy_writer_error_leaves_the_connection_usable(
    dsn: str, writer: str, error: str
) -> None:
    result = await assert_same(copy_from_failing, dsn, True, error, writer)
    if error == "user":
        assert result == [("caught", "stop copying"), ("IDLE", False), [(0,)]]
    else:
        assert result[0] == "written"
        assert_the_bad_row_is_reported(result[1])
        assert result[2:] == [("IDLE", False), [(0,)]]


async def copy_in_transaction(cls: ConnectionClass, dsn: str, autocommit: bool) -> Any:
    async with table_session(cls, dsn, COPY_TABLE, autocommit=autocommit) as conn:
        cur = conn.cursor()
        steps: list[Any] = []
        async with conn.transaction() as kept:
            async with cur.copy("COPY c (id) FROM STDIN") as copy:
                await copy.write_row((1,))
                await copy.write_row((2,))
            steps.append(tx_status(conn))
            try:
                async with conn.transaction() as failing:
                    async with cur.copy("COPY c (id) FROM STDIN") as copy:
                        await copy.write_row(("bad",))
            except psycopg.Error as ex:
                steps.append((type(ex), ex.sqlstate, *states(conn, failing)))
        async with conn.transaction() as undone:
            async with cur.copy("COPY c (id) FROM STDIN") as copy:
                await copy.write_row((3,))
            raise psycopg.Rollback
        steps.append(states(conn, kept, undone))
        await conn.rollback()
        steps.append(await rows(conn, "SELECT id FROM c ORDER BY id"))
        return steps


@autocommit_modes
async def test_copy_inside_a_transaction(dsn: str, autocommit: bool) -> None:
    result = await assert_same(copy_in_transaction, dsn, autocommit)
    assert result == [
        "INTRANS",
        (psycopg.errors.InvalidTextRepresentation, "22P02", "rolled_back_with_error", "INTRANS"),
        ("committed", "rolled_back_explicitly", "IDLE"),
        [(1,), (2,)],
    ]


# --- notifications -----------------------------------------------------------------


async def notifies_timeout_zero(cls: ConnectionClass, dsn: str, autocommit: bool) -> Any:
    async with listening(cls, dsn, "parity_waiting", autocommit=autocommit) as (listener, sender):
        await notify(sender, "parity_waiting", "n0", "n1", "n2")
        await wait_for_notifications(listener, 3)
        return await payloads(listener, timeout=0), await payloads(listener, timeout=0)


@autocommit_modes
async def test_notifies_timeout_zero_returns_all_waiting_notifications(
    dsn: str, autocommit: bool
) -> None:
    result = await assert_same(notifies_timeout_zero, dsn, autocommit)
    assert result == (["n0", "n1", "n2"], [])


async def notifies_stop_after(cls: ConnectionClass, dsn: str) -> Any:
    async with listening(cls, dsn, "parity_five") as (listener, sender):
        async with sender.transaction():
            await notify(sender, "parity_five", *(f"n{i}" for i in range(5)))
        await wait_for_notifications(listener, 5)
        first = await payloads(listener, stop_after=2, timeout=10)
        return first, await payloads(listener, timeout=0.2)


async def test_notifies_stop_after_with_more_waiting_loses_nothing(dsn: str) -> None:
    first, rest = await assert_same(notifies_stop_after, dsn)
    assert len(first) >= 2
    assert first + rest == [f"n{i}" for i in range(5)]
    # All five came in one read: psycopg yields the whole batch (documented:
    # "you might actually receive more than this number").
    assert (first, rest) == ([f"n{i}" for i in range(5)], [])


async def notifies_stop_after_one_at_a_time(cls: ConnectionClass, dsn: str) -> Any:
    """Notifications that come one by one, during notifies(stop_after=2) and after it."""
    async with listening(cls, dsn, "parity_trickle") as (listener, sender):
        first: list[str] = []
        received = [anyio.Event() for _ in range(2)]

        async def listen() -> None:
            async for n in listener.notifies(stop_after=2, timeout=20):
                first.append(n.payload)
                received[len(first) - 1].set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(listen)
            for i, event in enumerate(received):
                await notify(sender, "parity_trickle", f"n{i}")
                await event.wait()
        # Sent while nobody is in notifies(): read by the next call, or by a query.
        await notify(sender, "parity_trickle", "n2", "n3")
        await wait_for_notifications(listener, 2)
        second = await payloads(listener, timeout=0)
        await notify(sender, "parity_trickle", "n4")
        await wait_for_notifications(listener, 1)
        answer = await rows(listener, "SELECT 1")
        return first, second, answer, await payloads(listener, timeout=0)


async def test_notifies_stop_after_loses_nothing_that_arrives_one_at_a_time(dsn: str) -> None:
    result = await assert_same(notifies_stop_after_one_at_a_time, dsn)
    assert result == (["n0", "n1"], ["n2", "n3"], [(1,)], ["n4"])


async def notifies_during_queries(cls: ConnectionClass, dsn: str, autocommit: bool) -> Any:
    async with listening(cls, dsn, "parity_busy", autocommit=autocommit) as (listener, sender):
        if not autocommit:
            # In a transaction, the server holds notifications back until it ends.
            await listener.execute("SELECT 1")
        await notify(sender, "parity_busy", "n0", "n1", "n2")
        if autocommit:
            await wait_for_notifications(listener, 3)
        answers = [await rows(listener, "SELECT %s::int", [i]) for i in range(3)]
        if not autocommit:
            await listener.commit()
        received = await payloads(listener, timeout=10, stop_after=3)
        return answers, received, await payloads(listener, timeout=0)


@autocommit_modes
async def test_notifications_arriving_during_queries_are_delivered_later(
    dsn: str, autocommit: bool
) -> None:
    result = await assert_same(notifies_during_queries, dsn, autocommit)
    assert result == ([[(0,)], [(1,)], [(2,)]], ["n0", "n1", "n2"], [])


async def notifies_nothing_waiting(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn, autocommit=True) as listener:
        await listener.execute("LISTEN parity_quiet")
        start = anyio.current_time()
        received = [n async for n in listener.notifies(timeout=0.5)]
        elapsed = anyio.current_time() - start
        return received, 0.4 <= elapsed < 10, await rows(listener, "SELECT 1")


async def test_notifies_timeout_with_nothing_waiting(dsn: str) -> None:
    result = await assert_same(notifies_nothing_waiting, dsn)
    assert result == ([], True, [(1,)])


async def notify_handlers(cls: ConnectionClass, dsn: str) -> Any:
    async with listening(cls, dsn, "parity_handled") as (listener, sender):
        got: list[psycopg.Notify] = []
        also: list[str] = []

        def second_handler(n: psycopg.Notify) -> None:
            also.append(n.payload)

        listener.add_notify_handler(got.append)
        listener.add_notify_handler(second_handler)
        await sender.execute("NOTIFY parity_handled, 'one'")
        await wait_for_notifications(listener, 1)
        await listener.execute("SELECT 1")  # reading its answer reads the notification
        first = [(n.channel, n.payload, n.pid == sender.info.backend_pid) for n in got]
        listener.remove_notify_handler(got.append)
        listener.remove_notify_handler(second_handler)
        await sender.execute("NOTIFY parity_handled, 'two'")
        await wait_for_notifications(listener, 1)
        await listener.execute("SELECT 1")  # no handler: kept for notifies()
        later = await payloads(listener, timeout=0)
        return first, also, [n.payload for n in got], later


async def test_add_notify_handler_callbacks(dsn: str) -> None:
    result = await assert_same(notify_handlers, dsn)
    assert result == ([("parity_handled", "one", True)], ["one"], ["one"], ["two"])


async def notify_fields(cls: ConnectionClass, dsn: str) -> Any:
    async with listening(cls, dsn, '"Parity Channel"') as (listener, sender):
        await sender.execute("NOTIFY \"Parity Channel\", 'payload \u00fcn\u00efcode'")
        await sender.execute('NOTIFY "Parity Channel"')
        received = [n async for n in listener.notifies(timeout=10, stop_after=2)]
        return [
            (
                type(n).__name__,
                n.channel,
                n.payload,
                n.pid == sender.info.backend_pid,
                tuple(n) == (n.channel, n.payload, n.pid),
            )
            for n in received
        ]


async def test_notify_fields(dsn: str) -> None:
    result = await assert_same(notify_fields, dsn)
    assert result == [
        ("Notify", "Parity Channel", "payload \u00fcn\u00efcode", True, True),
        ("Notify", "Parity Channel", "", True, True),
    ]
