"""One-shot statements on the pool: `fetchall`, `fetchone`, `fetchval`, `execute`.

A statement does not borrow a connection: it is sent on a pooled
connection in pipeline mode (`pipeline`), beside other callers'
statements, up to ``pipeline_depth`` in flight per connection. The choice
of a connection: an idle one first (it enters pipeline mode), else the
least loaded pipelined one with room, else the caller queues in the pool's
FIFO like a borrower, under the same ``acquire_timeout`` and
``max_waiting``. A pipelined connection is never lent; once its last
statement is answered it leaves pipeline mode and goes back to the pool
(to the first waiter, or idle).

Head of line: a connection's statements run one after the other on the
server, so a slow statement delays those sent behind it on the same
connection. New statements go to the least loaded connection, which keeps
them away from a connection busy with a slow one while another has room.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

import anyio
import psycopg
from psycopg.rows import RowFactory, tuple_row

from .._errors import PoolClosed, evicts
from .entry import Entry
from .lending import acquire, worth_checking
from .pipeline import Pipeline, Statement, rowcount
from .room import grant_room, read_until, send, start

if TYPE_CHECKING:
    from .pool import ConnectionPool

__all__ = ["OneShot"]

logger = logging.getLogger("pgsd.pool")


class OneShot:
    """The one-shot statement methods of `ConnectionPool`."""

    async def fetchall(
        self,
        query: Any,
        params: Any = None,
        *,
        row_factory: RowFactory[Any] | None = None,
        read_only: bool = False,
    ) -> list[Any]:
        """Run one statement in its own implicit transaction; return its rows.

        With ``read_only=True`` it runs on a fresh read replica when the
        database has ``replicas`` (as ``connection(read_only=True)``).

        Raises:
            psycopg.Error: the statement failed (the class a lent connection
                would raise).
            OutcomeUnknown: the connection was lost with the statement in
                flight; it may have run.
            PoolTimeout, TooManyWaiters, PoolClosed, NoReplicaAvailable: as
                `connection()`.
        """
        pool: ConnectionPool = self  # type: ignore[assignment]
        statement, pipeline = await _run(pool, query, params, read_only)
        return _rows(pipeline, statement, row_factory, None)

    async def fetchone(
        self,
        query: Any,
        params: Any = None,
        *,
        row_factory: RowFactory[Any] | None = None,
        read_only: bool = False,
    ) -> Any:
        """As `fetchall`; the first row, or None."""
        pool: ConnectionPool = self  # type: ignore[assignment]
        statement, pipeline = await _run(pool, query, params, read_only)
        rows = _rows(pipeline, statement, row_factory, 1)
        return rows[0] if rows else None

    async def fetchval(self, query: Any, params: Any = None, *, read_only: bool = False) -> Any:
        """As `fetchall`; the first column of the first row, or None."""
        pool: ConnectionPool = self  # type: ignore[assignment]
        statement, pipeline = await _run(pool, query, params, read_only)
        rows = _rows(pipeline, statement, None, 1)
        return rows[0][0] if rows and rows[0] else None

    async def execute(self, query: Any, params: Any = None, *, read_only: bool = False) -> int:
        """As `fetchall`; the number of rows affected (-1 when the command gives none)."""
        pool: ConnectionPool = self  # type: ignore[assignment]
        statement, _ = await _run(pool, query, params, read_only)
        return rowcount(statement)


def _rows(
    pipeline: Pipeline, statement: Statement, row_factory: RowFactory[Any] | None, limit: int | None
) -> list[Any]:
    factory: Any = row_factory if row_factory is not None else pipeline.conn.row_factory
    return pipeline.rows(statement, None if factory is tuple_row else factory, limit)


async def _run(
    pool: ConnectionPool, query: Any, params: Any, read_only: bool
) -> tuple[Statement, Pipeline]:
    if read_only and pool._replicas is not None:
        pool = await pool._replicas.route()  # a fresh replica's pool, or the primary
    statement = Statement(query, params, pool._new_waker())
    entry = _with_room(pool)
    if entry is None:
        # Queue FIFO with borrowers: sent as soon as a pipeline has room, or
        # a whole connection comes.
        try:
            entry = await acquire(pool, None, statement)
        except BaseException:
            _leave(pool, statement)
            raise
        if entry is not None:
            start(pool, entry)
    reads = False
    if entry is not None:
        reads = send(pool, entry, statement)
        if pool._waiters.count:
            grant_room(pool, entry)  # the room left goes to those queued
    try:
        if reads:
            assert entry is not None
            await read_until(pool, entry, statement)
        elif not statement.done:
            await statement.waker.wait()
    except BaseException:
        _leave(pool, statement)
        raise
    if statement.error is not None:
        _evict_if_condemned(pool, statement)
        raise statement.error
    pipeline = statement.pipeline
    assert pipeline is not None
    return statement, pipeline


def _evict_if_condemned(pool: ConnectionPool, statement: Statement) -> None:
    """An error that condemns its connection (as for a borrower): replace the connection."""
    pipeline = statement.pipeline
    extra = pool.pool_config.evict_sqlstates
    if pipeline is None or not evicts(
        statement.error, wants_primary=pool._wants_primary, extra=extra
    ):
        return
    entry = pipeline.entry
    entry.retired = True  # no statement is sent on it any more; closed once drained
    for queue in (pool._idle, pool._parked):
        if entry in queue:  # drained and given back before its caller ran
            queue.remove(entry)
            pool._discard(entry)


def _leave(pool: ConnectionPool, statement: Statement) -> None:
    """The caller is gone: drop its result; stop its statement if the server runs it."""
    pipeline = statement.pipeline
    if pipeline is None or statement.done:
        return
    statement.abandoned = True
    if pipeline.in_flight and pipeline.in_flight[0] is statement:
        # The server runs it (or is about to): cancel it there, in the pool's task.
        pool._spawn(lambda: _cancel_head(pool, pipeline, statement))


def _with_room(pool: ConnectionPool) -> Entry | None:
    """An idle connection, else the least loaded pipeline with room; none while others queue.

    None, too, for an idle connection that needs a check before use (it sat
    idle, or heard from the server): the queue's path checks it, and a dead
    one is replaced unseen instead of failing the statement.
    """
    if pool._closed:
        raise PoolClosed(f"pool {pool.name!r} is closed")
    if pool._waiters.count or pool._paused:
        return None  # FIFO: queue behind them (or until the pool resumes)
    if pool._idle:
        if worth_checking(pool._idle[-1], pool._now(), pool._ping_after_idle):
            return None  # checked first on the way through the queue, as for a borrower
        entry = pool._idle.pop()
        start(pool, entry)
        return entry
    best: Entry | None = None
    best_load = room = pool.pool_config.pipeline_depth
    for entry in pool._pipelined:
        pipeline = entry.pipeline
        load = len(pipeline.in_flight)
        if load < best_load and pipeline.broken is None and not entry.retired:
            best, best_load = entry, load
    return best if best_load < room else None


async def _cancel_head(pool: ConnectionPool, pipeline: Pipeline, statement: Statement) -> None:
    """Stop an abandoned statement on the server, within ``cancel_grace``, or close.

    A cancel request stops whatever the backend runs when it arrives: if
    the abandoned statement ended meanwhile, the next one may be hit; the
    pipeline sends such a statement again (its own transaction rolled back).
    """
    conn = pipeline.conn
    grace = conn.cancel_grace
    pipeline.cancel_until = pool._now() + 2 * grace
    statement.waker = pool._new_waker()
    with anyio.move_on_after(grace):
        if not statement.done:
            with contextlib.suppress(psycopg.Error):
                await conn.cancel_safe(timeout=grace)
            await statement.waker.wait()
    if not statement.done:
        logger.warning(
            "pool %r: a one-shot statement whose caller left did not stop %.1f s after"
            " its cancellation: closing its connection",
            pool.name,
            grace,
        )
        conn.abort()  # the pipeline's reader fails what is in flight (OutcomeUnknown)
