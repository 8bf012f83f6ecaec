"""Lending when the hot path cannot: waiting in the queue, checking, tracking loans.

`ConnectionPool._lend_now` lends an idle connection that needs no check
when nobody waits. Otherwise `acquire` runs: it takes an idle connection or
queues (FIFO, with a deadline), pings a connection that sat idle or heard
from the server (HikariCP's rule) and replaces a dead one unseen, and, with
``leak_threshold``, notes where the loan was made.
"""

from __future__ import annotations

import traceback
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, overload

import psycopg

from .._errors import PoolClosed, PoolTimeout, TooManyWaiters
from .entry import PING_TIMEOUT, Entry

if TYPE_CHECKING:
    from .._connection import Connection
    from .pipeline import Statement
    from .pool import ConnectionPool

__all__ = ["acquire", "take_back_interrupted", "timeout_error", "worth_checking"]

#: Idle for longer than this, a connection's socket is checked for unasked input.
_INPUT_CHECK_AFTER: Final = 0.001


@overload
async def acquire(pool: ConnectionPool, limit: float | None) -> Entry: ...
@overload
async def acquire(
    pool: ConnectionPool, limit: float | None, statement: Statement
) -> Entry | None: ...
async def acquire(
    pool: ConnectionPool, limit: float | None, statement: Statement | None = None
) -> Entry | None:
    """A connection for a borrower, within *limit* seconds (default ``acquire_timeout``).

    With *statement* (a one-shot statement's caller), room on a pipelined
    connection will do too: the pool sends the statement there as soon as
    there is room, and None comes back once it has ended (`Statement.done`).
    """
    if pool._closed:
        raise PoolClosed(f"pool {pool.name!r} is closed")
    start = pool._now()
    if limit is None:
        limit = pool._acquire_timeout
    deadline = start + limit
    waited = False
    while True:
        entry = None
        if pool._idle and not pool._waiters.count:  # FIFO: nobody jumps the queue
            entry = pool._idle.pop()  # the most recently used: idle ones expire
        if entry is None:
            waited = True
            entry = await _wait_for_entry(pool, deadline, limit, statement)
            if entry is None:
                return None  # sent on a pipeline, and ended: nothing to check, no loan
        if worth_checking(entry, start, pool._ping_after_idle) and not await _check(
            pool, entry, deadline
        ):
            continue
        break
    counters = pool._counters
    counters.acquires += 1
    entry.lent_at = now = pool._now()
    if waited:
        counters.waited(now - start)
    if counters.observer is not None:
        counters.observer.waited(now - start if waited else 0.0)
    if pool._track_stacks:
        entry.borrowed_at = now
        entry.stack = traceback.StackSummary.from_list(traceback.extract_stack()[:-2])
        entry.leak_reported = False
    return entry


async def _wait_for_entry(
    pool: ConnectionPool, deadline: float, limit: float, statement: Statement | None
) -> Entry | None:
    waiters = pool._waiters
    error = pool._availability.fail_fast_error(connections=len(pool._entries))
    if error is not None:
        raise error
    max_waiting = pool.pool_config.max_waiting
    if max_waiting and waiters.count >= max_waiting:
        raise TooManyWaiters(
            f"pool {pool.name!r}: {waiters.count} tasks already wait for a connection"
            f" (max_waiting={max_waiting})"
        )
    waiter = waiters.add(
        deadline,
        pool._new_waker() if statement is None else statement.waker,
        default_timeout=limit == pool._acquire_timeout,
        statement=statement,
    )
    pool._filler.grow()
    try:
        await waiter.waker.wait()
    except BaseException:
        handed = waiters.abandon(waiter)
        if handed is not None:
            pool._put_back(handed)  # never strand what it was handed
        raise
    if waiter.entry is not None:
        if statement is not None:
            statement.waker = pool._new_waker()  # the first one woke us with the entry
        return waiter.entry
    if waiter.error is None:
        return None  # its statement was sent on a pipeline, and ended
    if isinstance(waiter.error, PoolTimeout):
        pool._counters.timeouts += 1
        raise timeout_error(pool, limit, "for a connection") from pool.last_error
    raise waiter.error


def timeout_error(pool: ConnectionPool, limit: float, what: str) -> PoolTimeout:
    """A timeout that says what the pool looked like, and why (counts nothing)."""
    size = len(pool._entries)
    parts = [
        f"pool {pool.name!r} ({pool.config.address}): no connection within {limit:g} s"
        f" waiting {what}",
        f"state {pool.state}, size {size}/{pool._max_size},"
        f" in use {size - len(pool._idle)}, other waiters {pool._waiters.count}",
        *pool._availability.describe(),
    ]
    return PoolTimeout("; ".join(parts))


def worth_checking(entry: Entry, now: float, ping_after_idle: float) -> bool:
    """HikariCP's rule: check a connection that sat idle, or that heard from the server."""
    conn = entry.conn
    if conn.closed:
        return True
    idle = now - entry.last_used
    if idle > ping_after_idle:
        return True
    # Unasked input (a terminated backend's last words) on a connection idle
    # for a while. Under load connections are idle for microseconds: skip
    # the system call then.
    return idle > _INPUT_CHECK_AFTER and conn.input_pending()


async def _check(pool: ConnectionPool, entry: Entry, deadline: float) -> bool:
    """Ping before lending; a dead connection is replaced unseen."""
    conn = entry.conn
    if not conn.closed:
        limit = min(PING_TIMEOUT, max(0.0, deadline - pool._now()))
        try:
            await conn.ping(limit)
        except psycopg.Error:
            pass
        except BaseException:
            take_back_interrupted(pool, entry)
            raise
        else:
            return True
    pool._counters.lost += 1
    pool._discard(entry)
    return False


def take_back_interrupted(pool: ConnectionPool, entry: Entry) -> None:
    """After a cancelled ping: keep the connection if the ping never started."""
    if entry.conn.closed:  # an interrupted ping closes its connection
        pool._discard(entry)
    else:
        pool._put_back(entry)


class DeferredLease:
    """A lease whose pool is found only on entering (*resolve*), then lent as `connection()`.

    For a pool not open yet (a connector's database added at run time) and
    for a read whose replica is chosen when it starts.
    """

    __slots__ = ("_lease", "_read_only", "_resolve", "_timeout")

    def __init__(
        self,
        resolve: Callable[[], Awaitable[ConnectionPool]],
        timeout: float | None,
        read_only: bool = False,
    ) -> None:
        self._resolve = resolve
        self._timeout = timeout
        self._read_only = read_only
        self._lease: Any = None

    async def __aenter__(self) -> Connection[Any]:
        pool = await self._resolve()
        lease = pool.connection(self._timeout, read_only=self._read_only)
        conn = await lease.__aenter__()
        self._lease = lease
        return conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            # The pool's return is shielded and bounded by cancel_grace.
            await lease.__aexit__(exc_type, exc, tb)  # noqa: ASYNC102
