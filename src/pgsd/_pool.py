"""One database's connection pool: lend, take back, heal.

State changes happen in plain synchronous methods (``_take_idle``,
``_put_back``, ``_discard``, ``_grow``, ...), so that no other task can see
the pool half-changed; awaits (I/O) happen outside them. Maintenance tasks
(opening connections, pinging and expiring idle ones, timing out waiters,
reporting leaks) are children of the pool's own task group: nothing outlives
``async with pool``.

On the hot path (a connection idle, nobody waiting) an acquire and a release
are a few attribute updates: no task, no cancel scope, no lock, no log line.
"""

from __future__ import annotations

import heapq
import inspect
import logging
import random
import traceback
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Final

import anyio
import anyio.abc
import psycopg
from psycopg import pq

from ._backend import Backend, Waker, current_backend
from ._backoff import Backoff
from ._config import DatabaseConfig, PoolConfig
from ._connection import Connection, connect
from ._errors import (
    AuthenticationError,
    ConnectTimeout,
    DatabaseNotFound,
    PgsdError,
    PoolClosed,
    PoolTimeout,
    ServerUnavailable,
    TLSError,
    TooManyWaiters,
    UnsupportedServerVersion,
    redact,
)
from ._stats import PoolState, PoolStats
from ._version import get_version

__all__ = ["ConnectionPool"]

logger = logging.getLogger("pgsd.pool")

_IDLE: Final = pq.TransactionStatus.IDLE
_ACTIVE: Final = pq.TransactionStatus.ACTIVE
#: SQLSTATEs after which a connection is not worth keeping: connection
#: exceptions (class 08) and the server going away (admin shutdown, crash
#: shutdown, cannot connect now).
_FATAL_SQLSTATE_PREFIXES: Final = ("08", "57P01", "57P02", "57P03")
#: cannot execute ... in a read-only transaction: a demoted primary.
_READ_ONLY_SQLSTATE: Final = "25006"
#: A ping (before lending, or of an idle connection) gets at most this long.
_PING_TIMEOUT: Final = 5.0
#: Idle for longer than this, a connection's socket is checked for unasked input.
_INPUT_CHECK_AFTER: Final = 0.001
#: How often the maintenance task looks at idle connections and leaks.
_MAINTENANCE_TICK: Final = 1.0

Hook = Callable[[Connection[Any]], Awaitable[None]]
StateCallback = Callable[[str, BaseException | None], Any]


class _Entry:
    """One pooled connection and its bookkeeping."""

    __slots__ = ("borrowed_at", "conn", "created", "expires", "last_used", "leak_reported", "stack")

    def __init__(self, conn: Connection[Any], now: float, lifetime: float) -> None:
        self.conn = conn
        self.created = now
        self.expires = now + lifetime
        self.last_used = now
        self.borrowed_at = 0.0
        self.stack: traceback.StackSummary | None = None
        self.leak_reported = False


class _Waiter:
    """A task waiting for a connection: woken once, with a connection or an error."""

    __slots__ = ("deadline", "done", "entry", "error", "waker")

    def __init__(self, deadline: float, waker: Waker) -> None:
        self.deadline = deadline
        self.done = False
        self.entry: _Entry | None = None
        self.error: BaseException | None = None
        self.waker = waker

    def __lt__(self, other: _Waiter) -> bool:
        return self.deadline < other.deadline


class _Lease:
    """``async with pool.connection() as conn``: lends on enter, takes back on exit."""

    __slots__ = ("_entry", "_pool", "_timeout")

    def __init__(self, pool: ConnectionPool, timeout: float | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._entry: _Entry | None = None

    async def __aenter__(self) -> Connection[Any]:
        pool = self._pool
        entry = pool._lend_now()
        if entry is None:
            entry = await pool._acquire(self._timeout)
        self._entry = entry
        return entry.conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        entry, self._entry = self._entry, None
        if entry is not None and (exc is not None or not self._pool._return_now(entry)):
            # The clean-up in _restore is shielded and bounded by cancel_grace.
            await self._pool._release(entry, exc)  # noqa: ASYNC102


class ConnectionPool:
    """Connections to one database, lent to one task at a time.

    Use it as an async context manager; its maintenance tasks run until it
    is closed::

        async with pgsd.ConnectionPool(db_config, pool_config) as pool:
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")

    Opening does not wait for the server: a database that cannot be reached
    is reported down and retried with backoff while callers wait up to their
    acquire timeout. :meth:`wait_ready` waits for the first connections.

    Args:
        config: the database.
        pool_config: sizes and timings (default: ``config.pool``, else
            :class:`PoolConfig` defaults).
        name: the name used in logs, errors and statistics (default: the
            config's ``display_name``).
        on_down: called as ``on_down(name, error)`` when the database goes
            down (a connection attempt fails after success, or at open).
        on_recovered: called as ``on_recovered(name, None)`` when it is back.
            Either may be a coroutine function; it runs in the pool's task
            group and its errors are logged, never raised.
    """

    def __init__(
        self,
        config: DatabaseConfig,
        pool_config: PoolConfig | None = None,
        *,
        name: str | None = None,
        on_down: StateCallback | None = None,
        on_recovered: StateCallback | None = None,
    ) -> None:
        self.config = config
        self.pool_config = pool_config or config.pool or PoolConfig()
        self.name = name or config.display_name
        self._on_down = on_down
        self._on_recovered = on_recovered
        pc = self.pool_config
        self._min_size = pc.min_size
        self._max_size = pc.max_size
        self._acquire_timeout = pc.acquire_timeout
        self._ping_after_idle = pc.ping_after_idle
        self._track_stacks = pc.leak_threshold is not None
        self._hot_release = pc.reset is None
        self._wants_primary = config.target_session_attrs in ("read-write", "primary")

        self._entries: set[_Entry] = set()
        self._idle: deque[_Entry] = deque()
        self._waiters: deque[_Waiter] = deque()
        self._waiting = 0
        # Waiters with the default timeout, in arrival order, which is also
        # deadline order; waiters with their own timeout in a heap.
        self._default_deadlines: deque[_Waiter] = deque()
        self._other_deadlines: list[_Waiter] = []
        self._opening = 0
        self._state: PoolState = "opening"
        self._closed = True
        self._opened_once = False
        self._task_group: anyio.abc.TaskGroup | None = None
        self._backend: Backend
        self._now = anyio.current_time
        self._deadline_scope: anyio.CancelScope | None = None
        self._deadline_target = float("inf")
        self._changed: anyio.Event | None = None
        self._backoff = Backoff(pc)
        self._last_error: BaseException | None = None
        self._down_since = 0.0
        self._version_logged = False
        self._ever_up = False

        self._acquires = 0
        self._wait_total = 0.0
        self._wait_max = 0.0
        self._timeouts = 0
        self._errors = 0
        self._opened = 0
        self._closed_count = 0
        self._lost = 0
        self._reconnects = 0
        self._leaks = 0

    def __repr__(self) -> str:
        return (
            f"<pgsd.ConnectionPool {self.name!r} {self._state} "
            f"size={len(self._entries)}/{self._max_size} waiting={self._waiting}>"
        )

    # -- public API ----------------------------------------------------------

    async def __aenter__(self) -> ConnectionPool:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()  # noqa: ASYNC102 (shielded inside, bounded by close_timeout)

    async def open(self) -> None:
        """Start the maintenance tasks and begin filling to ``min_size``.

        Prefer ``async with pool``. Raises:
            RuntimeError: the pool is already open.
        """
        if not self._closed:
            raise RuntimeError(f"pool {self.name!r} is already open")
        if self._opened_once:
            raise RuntimeError(f"pool {self.name!r} was closed; make a new one")
        self._opened_once = True
        self._backend = current_backend()
        self._now = self._backend.time
        self._closed = False
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._task_group = tg
        tg.start_soon(self._expire_waiters, name=f"pgsd pool {self.name}: waiter deadlines")
        tg.start_soon(self._maintain, name=f"pgsd pool {self.name}: maintenance")
        self._grow()

    async def close(self) -> None:
        """Close every connection, fail every waiter with `PoolClosed`, stop the tasks.

        Borrowed connections get ``close_timeout`` seconds to come back;
        then they are closed under their borrowers. Returns within that
        bound even when cancelled or when a borrower never returns.
        """
        if self._closed:
            return
        self._closed = True
        self._set_state("closed")
        for waiter in self._waiters:
            self._fail(waiter, PoolClosed(f"pool {self.name!r} was closed"))
        self._waiters.clear()
        self._default_deadlines.clear()
        self._other_deadlines.clear()
        while self._idle:
            self._discard(self._idle.pop())
        try:
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(self.pool_config.close_timeout),
            ):
                while self._entries:
                    await self._wait_changed()
            for entry in list(self._entries):
                logger.warning(
                    "pool %r closed while a connection was still borrowed: closing it", self.name
                )
                self._discard(entry)
        finally:
            tg, self._task_group = self._task_group, None
            if tg is not None:
                tg.cancel_scope.cancel()
                # Its tasks are cancelled: they end at their next checkpoint.
                await tg.__aexit__(None, None, None)  # noqa: ASYNC102

    def connection(self, timeout: float | None = None) -> _Lease:
        """Borrow a connection: ``async with pool.connection() as conn``.

        The connection is idle and in autocommit mode. When the block ends
        it comes back clean or not at all: an open or failed transaction is
        rolled back, a query still running is cancelled, and a connection
        that cannot be cleaned quickly is closed and replaced.

        Args:
            timeout: seconds to wait for a connection (default
                ``acquire_timeout``). An enclosing cancel scope is honoured
                too.

        Raises:
            PoolTimeout: no connection within the timeout; the message says
                whether the database is down and gives the last error.
            TooManyWaiters: ``max_waiting`` tasks are already waiting.
            PoolClosed: the pool is closed, or closed while waiting.
            UnsupportedServerVersion: the server is older than
                ``min_server_version``.
            AuthenticationError, DatabaseNotFound, TLSError: the pool has
                never connected and its attempts fail in a way waiting cannot
                cure (a mistake in the configuration).
        """
        return _Lease(self, timeout)

    async def wait_ready(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until the pool holds ``min_size`` connections (at once when it is 0).

        Raises:
            PoolTimeout: not ready within ``timeout`` (default
                ``acquire_timeout``); the message gives the last error.
            PoolClosed: the pool is closed.
            AuthenticationError, DatabaseNotFound, TLSError,
                UnsupportedServerVersion: the first connection attempts
                failed in a way waiting cannot cure.
        """
        limit = self._acquire_timeout if timeout is None else timeout
        with anyio.move_on_after(limit):
            while len(self._entries) < self._min_size:
                if self._closed:
                    raise PoolClosed(f"pool {self.name!r} is closed")
                error = self._fail_fast_error()
                if error is not None:
                    raise error
                await self._wait_changed()
            return
        raise self._timeout_error(limit, "to open", count=False)

    async def ping(self) -> float:
        """Borrow a connection and ping it; return the round trip in seconds.

        Raises:
            PoolTimeout, PoolClosed: as :meth:`connection`.
            psycopg.OperationalError: the connection did not answer.
        """
        async with self.connection() as conn:
            return await conn.ping(_PING_TIMEOUT)

    def stats(self) -> PoolStats:
        """A snapshot of the pool's gauges and counters."""
        size = len(self._entries)
        idle = len(self._idle)
        return PoolStats(
            name=self.name,
            state=self._state,
            min_size=self._min_size,
            max_size=self._max_size,
            size=size,
            idle=idle,
            in_use=size - idle,
            opening=self._opening,
            waiting=self._waiting,
            acquires=self._acquires,
            wait_time_total=self._wait_total,
            wait_time_max=self._wait_max,
            timeouts=self._timeouts,
            errors=self._errors,
            connections_opened=self._opened,
            connections_closed=self._closed_count,
            connections_lost=self._lost,
            reconnect_attempts=self._reconnects,
            leaks=self._leaks,
        )

    @property
    def state(self) -> PoolState:
        """``opening``, ``up``, ``down`` or ``closed``."""
        return self._state

    @property
    def last_error(self) -> BaseException | None:
        """The last connection error, or None."""
        return self._last_error

    # -- acquire -------------------------------------------------------------

    async def _acquire(self, limit: float | None) -> _Entry:
        if self._closed:
            raise PoolClosed(f"pool {self.name!r} is closed")
        start = self._now()
        if limit is None:
            limit = self._acquire_timeout
        deadline = start + limit
        waited = False
        while True:
            entry = self._take_idle()
            if entry is None:
                waited = True
                entry = await self._wait_for_entry(deadline, limit)
            if self._worth_checking(entry, start) and not await self._check(entry, deadline):
                continue
            break
        self._acquires += 1
        if waited:
            wait = self._now() - start
            self._wait_total += wait
            if wait > self._wait_max:
                self._wait_max = wait
        if self._track_stacks:
            entry.borrowed_at = self._now()
            entry.stack = traceback.StackSummary.from_list(traceback.extract_stack()[:-2])
            entry.leak_reported = False
        return entry

    def _lend_now(self) -> _Entry | None:
        """The hot path: an idle connection that needs no check, nobody waiting."""
        idle = self._idle
        if not idle or self._waiting or self._track_stacks or self._closed:
            return None
        entry = idle[-1]
        if self._worth_checking(entry, self._now()):
            return None
        idle.pop()
        self._acquires += 1
        return entry

    def _take_idle(self) -> _Entry | None:
        """An idle connection, unless others queue for one (FIFO)."""
        if self._idle and not self._waiting:
            return self._idle.pop()  # the most recently used: idle ones expire
        return None

    async def _wait_for_entry(self, deadline: float, limit: float) -> _Entry:
        error = self._fail_fast_error()
        if error is not None:
            raise error
        max_waiting = self.pool_config.max_waiting
        if max_waiting and self._waiting >= max_waiting:
            raise TooManyWaiters(
                f"pool {self.name!r}: {self._waiting} tasks already wait for a connection"
                f" (max_waiting={max_waiting})"
            )
        waiter = _Waiter(deadline, self._backend.waker())
        self._waiters.append(waiter)
        self._waiting += 1
        if limit == self._acquire_timeout:
            self._default_deadlines.append(waiter)
        else:
            heapq.heappush(self._other_deadlines, waiter)
        if deadline < self._deadline_target and self._deadline_scope is not None:
            self._deadline_scope.cancel()  # the deadline task sleeps too long
        self._grow()
        try:
            await waiter.waker.wait()
        except BaseException:
            self._abandon(waiter)
            raise
        if waiter.entry is not None:
            return waiter.entry
        assert waiter.error is not None
        if isinstance(waiter.error, PoolTimeout):
            raise self._timeout_error(limit, "for a connection") from self._last_error
        raise waiter.error

    def _abandon(self, waiter: _Waiter) -> None:
        """A waiter was cancelled: never strand what it was handed."""
        if not waiter.done:
            waiter.done = True
            self._waiting -= 1
        elif waiter.entry is not None:
            entry, waiter.entry = waiter.entry, None
            self._put_back(entry)

    def _fail(self, waiter: _Waiter, error: BaseException) -> None:
        if not waiter.done:
            waiter.done = True
            waiter.error = error
            self._waiting -= 1
            waiter.waker.set()

    def _fail_fast_error(self) -> BaseException | None:
        """An error no wait is likely to cure, while the pool has no connection.

        A server older than the minimum; and, before the pool has ever
        connected, a wrong password, a missing database or a TLS
        misconfiguration: a mistake in the configuration should be seen at
        once, not after ``acquire_timeout``. Once the pool has been up, these
        count as passing (a password being rotated, a database being
        restored, a certificate being renewed) and callers wait.
        """
        error = self._last_error
        if error is None or self._entries:
            return None
        if isinstance(error, UnsupportedServerVersion):
            return error
        if not self._ever_up and isinstance(
            error, (AuthenticationError, DatabaseNotFound, TLSError)
        ):
            return error
        return None

    def _timeout_error(self, limit: float, what: str, *, count: bool = True) -> PoolTimeout:
        if count:
            self._timeouts += 1
        stats = self.stats()
        parts = [
            f"pool {self.name!r} ({self.config.address}): no connection within {limit:g} s"
            f" waiting {what}",
            f"state {stats.state}, size {stats.size}/{stats.max_size}, in use {stats.in_use},"
            f" other waiters {stats.waiting}",
        ]
        if self._state == "down":
            since = self._now() - self._down_since
            parts.append(f"the database has been down for {since:.1f} s")
        if self._last_error is not None and self._state != "up":
            parts.append(f"last connection error: {redact(str(self._last_error))}")
        return PoolTimeout("; ".join(parts))

    def _worth_checking(self, entry: _Entry, now: float) -> bool:
        """HikariCP's rule: check a connection that sat idle, or that heard from the server."""
        conn = entry.conn
        if conn.closed:
            return True
        idle = now - entry.last_used
        if idle > self._ping_after_idle:
            return True
        # Unasked input (a terminated backend's last words) on a connection
        # idle for a while. Under load connections are idle for microseconds:
        # skip the system call then.
        return idle > _INPUT_CHECK_AFTER and conn.input_pending()

    async def _check(self, entry: _Entry, deadline: float) -> bool:
        """Ping before lending; a dead connection is replaced unseen."""
        conn = entry.conn
        if not conn.closed:
            limit = min(_PING_TIMEOUT, max(0.0, deadline - self._now()))
            try:
                await conn.ping(limit)
            except psycopg.Error:
                pass
            except BaseException:
                self._take_back_interrupted(entry)
                raise
            else:
                return True
        self._lost += 1
        self._discard(entry)
        return False

    # -- release -------------------------------------------------------------

    def _return_now(self, entry: _Entry) -> bool:
        """The hot path: take back an idle connection with no reset hook to run."""
        conn = entry.conn
        now = self._now()
        if (
            self._hot_release
            and now < entry.expires
            and conn.pgconn.transaction_status == _IDLE
            and conn.autocommit
            and not conn.closed
        ):
            self._put_back(entry, now)
            return True
        return False

    async def _release(self, entry: _Entry, exc: BaseException | None) -> None:
        conn = entry.conn
        if exc is None and self._return_now(entry):
            return
        if conn.unsettled and self._task_group is not None:
            # The borrower was cancelled mid-query: cancel it on the server
            # in the pool's own task, so the borrower is not held up.
            self._task_group.start_soon(self._settle, entry)
            return
        if _is_fatal(exc, self._wants_primary) or conn.closed or conn.broken:
            self._lost += 1
            self._discard(entry)
            return
        if await self._restore(entry):
            self._put_back(entry)
        else:
            self._discard(entry)

    async def _settle(self, entry: _Entry) -> None:
        """Cancel an interrupted query (bounded), then clean and take back or discard."""
        await entry.conn.settle()
        if not entry.conn.closed and await self._restore(entry):
            self._put_back(entry)
        else:
            self._discard(entry)

    async def _restore(self, entry: _Entry) -> bool:
        """Roll back, reset, and check: shielded from cancellation, bounded in time."""
        conn = entry.conn
        if self._now() >= entry.expires:
            return False
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = self._now() + conn.cancel_grace
            try:
                status = conn.pgconn.transaction_status
                if status == _ACTIVE:
                    return False  # the borrower left a command running
                if status != _IDLE:
                    await conn.rollback()
                if not conn.autocommit:
                    await conn.set_autocommit(True)
                if self.pool_config.reset is not None:
                    await self.pool_config.reset(conn)
            except Exception as ex:
                logger.warning(
                    "pool %r: could not clean a returned connection, replacing it: %s",
                    self.name,
                    redact(str(ex)),
                )
                return False
        if scope.cancel_called:
            logger.warning(
                "pool %r: a returned connection took over %.1f s to clean, replacing it",
                self.name,
                conn.cancel_grace,
            )
            return False
        return not conn.closed and conn.pgconn.transaction_status == _IDLE and conn.autocommit

    def _put_back(self, entry: _Entry, now: float | None = None) -> None:
        """Hand a usable connection to the first waiter, or make it idle."""
        if self._closed:
            self._discard(entry)
            return
        entry.last_used = self._now() if now is None else now
        entry.stack = None
        while self._waiters:
            waiter = self._waiters.popleft()
            if waiter.done:
                continue
            waiter.done = True
            waiter.entry = entry
            self._waiting -= 1
            waiter.waker.set()
            self._forget_served()
            return
        self._idle.append(entry)
        self._notify()

    def _forget_served(self) -> None:
        """Drop served waiters from the deadline queues (FIFO: they are at the front)."""
        queue = self._default_deadlines
        while queue and queue[0].done:
            queue.popleft()
        heap = self._other_deadlines
        while heap and heap[0].done:
            heapq.heappop(heap)

    def _discard(self, entry: _Entry) -> None:
        """Close a connection and forget it; open a replacement if needed."""
        if entry in self._entries:
            self._entries.discard(entry)
            self._closed_count += 1
        entry.conn.abort()
        self._notify()
        self._grow()

    # -- growing and healing ---------------------------------------------------

    def _grow(self) -> None:
        """Start connection attempts up to what the demand and ``min_size`` need."""
        size = len(self._entries)
        if size + self._opening >= self._max_size or self._closed or self._task_group is None:
            return  # full (the usual case under load), closed, or not open
        missing = self._wanted_size() - size - self._opening
        if self._state == "down":
            # One attempt at a time while the server is away, with backoff.
            missing = min(missing, 1 - self._opening)
        for _ in range(missing):
            self._opening += 1
            self._task_group.start_soon(self._open_connection)

    def _wanted_size(self) -> int:
        """The connections the demand (lent and waited for) and ``min_size`` call for."""
        demand = len(self._entries) - len(self._idle) + self._waiting
        return max(self._min_size, min(self._max_size, demand))

    def _still_wanted(self) -> bool:
        """Whether an attempt under way is still needed (counting itself)."""
        if self._closed:
            return False
        return len(self._entries) + self._opening <= self._wanted_size()

    async def _open_connection(self) -> None:
        """Open one connection, retrying with backoff while it is wanted."""
        added = False
        try:
            while not self._closed:
                if self._state == "down":
                    self._reconnects += 1
                try:
                    conn = await self._connect()
                except Exception as ex:
                    self._connect_failed(ex)
                    # While the server is away one attempt at a time is enough.
                    if not self._still_wanted() or (self._state == "down" and self._opening > 1):
                        return
                    await anyio.sleep(self._backoff.next_delay())
                    continue
                self._opening -= 1
                added = True
                self._add(conn)
                return
        finally:
            if not added:
                self._opening -= 1
                self._notify()

    async def _connect(self) -> Connection[Any]:
        conn = await connect(self.config)
        try:
            num = conn.info.server_version
            if num < self.pool_config.min_server_version:
                raise UnsupportedServerVersion(
                    num, minimum=self.pool_config.min_server_version, database=self.name
                )
            if not self._version_logged:
                # Claimed before the await: connections open concurrently.
                self._version_logged = True
                try:
                    version = await get_version(conn)
                except BaseException:
                    self._version_logged = False
                    raise
                logger.info(
                    "pool %r: %s at %s",
                    self.name,
                    version.text.split(" on ")[0],
                    self.config.address,
                )
            if self.pool_config.configure is not None:
                await self.pool_config.configure(conn)
                if conn.pgconn.transaction_status != _IDLE:
                    raise PgsdError(
                        f"pool {self.name!r}: the configure hook left a transaction open"
                    )
        except BaseException:
            conn.abort()
            raise
        return conn

    def _add(self, conn: Connection[Any]) -> None:
        self._opened += 1
        if self._closed:
            conn.abort()
            return
        if self._state != "up":
            self._recovered()
        now = self._now()
        jitter = self.pool_config.lifetime_jitter
        lifetime = self.pool_config.max_lifetime * (1.0 - jitter * random.random())
        entry = _Entry(conn, now, lifetime)
        conn.settle_later = True
        self._entries.add(entry)
        self._put_back(entry)
        # wait_ready() counts connections: wake it even when a waiter got this one.
        self._notify()

    def _connect_failed(self, error: BaseException) -> None:
        self._errors += 1
        self._last_error = error
        # One refused attempt beside live connections (the server's
        # connection limit, say) does not make the database down.
        unreachable = isinstance(error, (ServerUnavailable, ConnectTimeout))
        if self._state in ("up", "opening") and (unreachable or not self._entries):
            self._down_since = self._now()
            self._set_state("down")
            logger.warning(
                "pool %r: database %s is down, retrying with backoff: %s",
                self.name,
                self.config.address,
                redact(str(error)),
            )
            self._callback(self._on_down, error)
        if self._fail_fast_error() is error:
            for waiter in list(self._waiters):
                self._fail(waiter, error)
            self._waiters.clear()

    def _recovered(self) -> None:
        was = self._state
        self._ever_up = True
        self._set_state("up")
        self._backoff.reset()
        if was == "down":
            since = self._now() - self._down_since
            logger.info(
                "pool %r: database %s recovered after %.1f s", self.name, self.config.address, since
            )
            self._callback(self._on_recovered, None)
        self._last_error = None

    def _set_state(self, state: PoolState) -> None:
        self._state = state
        self._notify()

    def _callback(self, callback: StateCallback | None, error: BaseException | None) -> None:
        if callback is None or self._task_group is None:
            return

        async def run() -> None:
            try:
                result = callback(self.name, error)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("pool %r: state callback failed", self.name)

        self._task_group.start_soon(run)

    def _notify(self) -> None:
        """Wake whoever waits for the pool to change (close, wait_ready)."""
        event, self._changed = self._changed, None
        if event is not None:
            event.set()

    async def _wait_changed(self) -> None:
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()

    # -- maintenance tasks -----------------------------------------------------

    async def _expire_waiters(self) -> None:
        """Time out waiters at their deadlines: one task for all, no scope per waiter."""
        while True:
            self._forget_served()
            self._deadline_target = self._next_deadline()
            with anyio.CancelScope() as scope:
                self._deadline_scope = scope
                await anyio.sleep_until(self._deadline_target)
            self._deadline_scope = None
            now = self._now()
            queue = self._default_deadlines
            while queue and (queue[0].done or queue[0].deadline <= now):
                self._fail(queue.popleft(), PoolTimeout())
            heap = self._other_deadlines
            while heap and (heap[0].done or heap[0].deadline <= now):
                self._fail(heapq.heappop(heap), PoolTimeout())
            waiters = self._waiters
            while waiters and waiters[0].done:
                waiters.popleft()

    def _next_deadline(self) -> float:
        target = float("inf")
        if self._default_deadlines:
            target = self._default_deadlines[0].deadline
        if self._other_deadlines:
            target = min(target, self._other_deadlines[0].deadline)
        return target

    async def _maintain(self) -> None:
        """Ping, expire and replace idle connections; report leaks."""
        pc = self.pool_config
        next_ping = self._now() + pc.health_check_interval
        while True:
            await anyio.sleep(_MAINTENANCE_TICK)
            now = self._now()
            self._expire_idle(now)
            if pc.leak_threshold is not None:
                self._report_leaks(now, pc.leak_threshold)
            due = now >= next_ping
            if due:
                next_ping = now + pc.health_check_interval
            for entry in list(self._idle):
                if due or entry.conn.input_pending():
                    await self._ping_idle(entry)
            self._grow()

    def _expire_idle(self, now: float) -> None:
        """Close idle connections past their lifetime, or idle too long above min_size."""
        max_idle = self.pool_config.max_idle
        for entry in list(self._idle):
            too_old = now >= entry.expires
            too_idle = now - entry.last_used >= max_idle and len(self._entries) > self._min_size
            if too_old or too_idle:
                self._idle.remove(entry)
                self._discard(entry)

    async def _ping_idle(self, entry: _Entry) -> None:
        if entry not in self._idle:
            return  # lent meanwhile
        self._idle.remove(entry)
        try:
            await entry.conn.ping(_PING_TIMEOUT)
        except psycopg.Error:
            self._lost += 1
            self._discard(entry)
        except BaseException:
            self._take_back_interrupted(entry)
            raise
        else:
            self._put_back(entry)

    def _take_back_interrupted(self, entry: _Entry) -> None:
        """After a cancelled ping: keep the connection if the ping never started."""
        if entry.conn.closed:  # an interrupted ping closes its connection
            self._discard(entry)
        else:
            self._put_back(entry)

    def _report_leaks(self, now: float, threshold: float) -> None:
        for entry in self._entries:
            if entry.stack is None or entry.leak_reported:
                continue
            if now - entry.borrowed_at >= threshold:
                entry.leak_reported = True
                self._leaks += 1
                logger.warning(
                    "pool %r: a connection has been held for %.1f s (leak_threshold %g s);"
                    " it was borrowed at:\n%s",
                    self.name,
                    now - entry.borrowed_at,
                    threshold,
                    "".join(entry.stack.format()),
                )


def _is_fatal(exc: BaseException | None, wants_primary: bool) -> bool:
    """Whether an error the borrower met means the connection is not worth keeping.

    Besides a lost connection: a write refused as read-only (SQLSTATE 25006)
    by a server that was the primary when connected and has since been
    demoted, when the database asks for a read-write server.
    """
    sqlstate = getattr(exc, "sqlstate", None)
    if not isinstance(sqlstate, str):
        return False
    if sqlstate.startswith(_FATAL_SQLSTATE_PREFIXES):
        return True
    return wants_primary and sqlstate == _READ_ONLY_SQLSTATE
