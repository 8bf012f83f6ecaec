"""One database's connection pool: its lifecycle, the lease and the hot path.

State changes happen in plain synchronous methods (``_put_back``,
``_discard``, `Filler.grow`, ...), so that no other task can see the pool
half-changed; awaits (I/O) happen outside them. The pool's tasks (opening
connections, timing out waiters, housekeeping, settling interrupted
queries) are children of its own task group: nothing outlives
``async with pool``.

On the hot path (a connection idle, nobody waiting) an acquire and a
release are a few attribute updates: no task, no cancel scope, no lock, no
log line. The other parts: `lending` (the slow path: queueing, checking),
`waiters` (the queue and its deadlines), `availability` (up, down,
backoff, fail fast), `filler` (opening connections), `cleanup` (taking
them back), `maintenance` (expiry, leaks, health checks).
"""

from __future__ import annotations

import dataclasses
import logging
from bisect import bisect_left
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any

import anyio
import anyio.abc

from .._backend import Waker, current_backend
from .._config import DatabaseConfig, PoolConfig
from .._connection import Connection, connect
from .._errors import PoolClosed
from .._stats import BUCKETS, PoolCounters, PoolState, PoolStats
from .availability import Availability, StateCallback
from .cleanup import release
from .entry import IDLE, PING_TIMEOUT, ConnectionFactory, Entry
from .filler import Filler
from .lending import acquire, worth_checking
from .listen import Listening
from .maintenance import Maintenance
from .operations import Operations
from .replicas import ReplicaSet
from .statements import OneShot
from .waiters import WaiterQueue

__all__ = ["ConnectionPool", "Hook"]

logger = logging.getLogger("pgsd.pool")

Hook = Callable[[Connection[Any]], Awaitable[None]]


class _Lease:
    """``async with pool.connection() as conn``: lends on enter, takes back on exit."""

    __slots__ = ("_entry", "_pool", "_timeout")

    def __init__(self, pool: ConnectionPool, timeout: float | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._entry: Entry | None = None

    async def __aenter__(self) -> Connection[Any]:
        pool = self._pool
        entry = pool._lend_now()
        if entry is None:
            entry = await acquire(pool, self._timeout)
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
            # The clean-up is shielded and bounded by cancel_grace.
            await release(self._pool, entry, exc)  # noqa: ASYNC102


class ConnectionPool(OneShot, Operations, Listening):
    """Connections to one database, lent to one task at a time.

    Use it as an async context manager; its tasks run until it is closed::

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
        connection_factory: opens one connection, called with *config*
            (default: `pgsd.connect`). For a connection set up in a way
            `DatabaseConfig` cannot say, and for tests of the pool's
            scheduling.
    """

    def __init__(
        self,
        config: DatabaseConfig,
        pool_config: PoolConfig | None = None,
        *,
        name: str | None = None,
        on_down: StateCallback | None = None,
        on_recovered: StateCallback | None = None,
        connection_factory: ConnectionFactory | None = None,
    ) -> None:
        self.config = config
        self.pool_config = pc = pool_config or config.pool or PoolConfig()
        self.name = name or config.display_name
        self._min_size = pc.min_size
        self._max_size = pc.max_size
        self._acquire_timeout = pc.acquire_timeout
        self._ping_after_idle = pc.ping_after_idle
        self._track_stacks = pc.leak_threshold is not None
        self._hot_release = pc.reset is None
        self._wants_primary = config.target_session_attrs in ("read-write", "primary")

        self._entries: set[Entry] = set()
        self._idle: deque[Entry] = deque()  # the most recently used on the right
        self._pipelined: set[Entry] = set()  # in pipeline mode for one-shot statements
        self._paused = False
        self._parked: deque[Entry] = deque()  # idle while paused, not to be lent
        self._waiters = WaiterQueue()
        self._closed = True
        self._opened_once = False
        self._owner: Any = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._now: Callable[[], float] = anyio.current_time
        #: The event loop's waker factory, known once the pool is open.
        self._new_waker: Callable[[], Waker] = _no_waker
        self._changed: anyio.Event | None = None
        self._counters = PoolCounters()
        self._availability = Availability(
            self.name,
            config.address,
            pc,
            on_down=on_down,
            on_recovered=on_recovered,
            changed=self._notify,
        )
        self._filler = Filler(self, connection_factory or connect)
        self._maintenance = Maintenance(self)
        self._replicas = ReplicaSet(self, connection_factory) if config.replicas else None

    def __repr__(self) -> str:
        return (
            f"<pgsd.ConnectionPool {self.name!r} {self.state} "
            f"size={len(self._entries)}/{self._max_size} waiting={self._waiters.count}>"
        )

    # -- lifecycle -----------------------------------------------------------

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
        """Start the pool's tasks and begin filling to ``min_size``.

        Prefer ``async with pool``: `open` and `close` must be called by
        the same task, since the pool's task group belongs to it.

        Raises:
            RuntimeError: the pool is already open, or was closed.
        """
        if not self._closed:
            raise RuntimeError(f"pool {self.name!r} is already open")
        if self._opened_once:
            raise RuntimeError(f"pool {self.name!r} was closed; make a new one")
        self._opened_once = True
        backend = current_backend()
        self._now = backend.time
        self._new_waker = backend.waker
        self._owner = anyio.get_current_task().id
        self._closed = False
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._task_group = tg
        self._availability.start(self._now, self._spawn)
        tg.start_soon(self._waiters.expire, self._now, name=f"pgsd pool {self.name}: deadlines")
        await tg.start(
            self._maintenance.run_maintenance, name=f"pgsd pool {self.name}: maintenance"
        )
        if self._replicas is not None:
            await tg.start(self._replicas.run_replicas, name=f"pgsd pool {self.name}: replicas")
        self._filler.grow()

    async def close(self) -> None:
        """Close every connection, fail every waiter with `PoolClosed`, stop the tasks.

        Borrowed connections get ``close_timeout`` seconds to come back;
        then they are closed under their borrowers. Returns within that
        bound even when cancelled or when a borrower never returns.

        Raises:
            RuntimeError: called by another task than the one that opened
                the pool (use ``async with pool``).
        """
        if self._closed:
            return
        if anyio.get_current_task().id != self._owner:
            raise RuntimeError(
                f"pool {self.name!r} must be closed by the task that opened it:"
                " use `async with pool` (or cancel that task)"
            )
        self._closed = True
        self._availability.set_state("closed")
        self._waiters.fail_all(PoolClosed(f"pool {self.name!r} was closed"))
        try:
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(self.pool_config.close_timeout),
            ):
                if self._replicas is not None:
                    self._replicas.stop()  # they close meanwhile, each on its own budget
                await self._maintenance.stop()
                for queue in (self._idle, self._parked):
                    while queue:
                        self._discard(queue.pop())
                while self._entries:
                    await self._wait_changed()
                if self._replicas is not None:
                    await self._replicas.wait_closed()
        finally:
            tg, self._task_group = self._task_group, None
            if tg is not None:
                tg.cancel_scope.cancel()
                # Its tasks are cancelled: they end at their next checkpoint.
                await tg.__aexit__(None, None, None)  # noqa: ASYNC102
            for entry in list(self._entries):
                _log_closed_under_borrower(self.name)
                self._discard(entry)

    def _spawn(self, func: Callable[[], Coroutine[Any, Any, None]]) -> None:
        if self._task_group is not None:
            self._task_group.start_soon(func)

    # -- public API ----------------------------------------------------------

    def connection(
        self, timeout: float | None = None, *, read_only: bool = False
    ) -> AbstractAsyncContextManager[Connection[Any]]:
        """Borrow a connection: ``async with pool.connection() as conn``.

        The connection is idle and in autocommit mode. When the block ends
        it comes back clean or not at all: an open or failed transaction is
        rolled back, a query still running is cancelled, and a connection
        that cannot be cleaned quickly is closed and replaced.

        Args:
            timeout: seconds to wait for a connection (default
                ``acquire_timeout``). An enclosing cancel scope is honoured
                too.
            read_only: a fresh read replica's connection, when the database
                has ``replicas`` (see `ReplicaSet`); else this pool's.

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
            NoReplicaAvailable: with ``read_only``, no replica qualifies and
                ``replica_fallback`` is ``"error"``.
        """
        if read_only and self._replicas is not None:
            return self._replicas.lease(timeout)
        return _Lease(self, timeout)

    async def ping(self) -> float:
        """Borrow a connection and ping it; return the round trip in seconds.

        Raises:
            PoolTimeout, PoolClosed: as :meth:`connection`.
            psycopg.OperationalError: the connection did not answer.
        """
        async with self.connection() as conn:
            return await conn.ping(PING_TIMEOUT)

    def stats(self) -> PoolStats:
        """A snapshot of the pool's gauges and counters (its replicas' in ``replicas``)."""
        snapshot = self._counters.snapshot(
            name=self.name,
            state=self.state,
            min_size=self._min_size,
            max_size=self._max_size,
            size=len(self._entries),
            idle=len(self._idle) + len(self._parked),
            opening=self._filler.opening,
            waiting=self._waiters.count,
            in_flight=sum(len(entry.pipeline.in_flight) for entry in self._pipelined),
        )
        if self._replicas is None:
            return snapshot
        return dataclasses.replace(snapshot, replicas=self._replicas.stats())

    @property
    def state(self) -> PoolState:
        """``opening``, ``up``, ``down``, ``paused`` or ``closed``."""
        if self._paused and not self._closed:
            return "paused"
        return self._availability.state

    @property
    def last_error(self) -> BaseException | None:
        """The last connection error, or None."""
        return self._availability.last_error

    # -- lending ---------------------------------------------------------------

    def _lend_now(self) -> Entry | None:
        """The hot path: an idle connection that needs no check, nobody waiting."""
        idle = self._idle
        if not idle or self._waiters.count or self._track_stacks or self._closed:
            return None
        entry = idle[-1]
        now = self._now()
        if worth_checking(entry, now, self._ping_after_idle):
            return None
        idle.pop()
        entry.lent_at = now
        self._counters.acquires += 1
        return entry

    # -- taking back -------------------------------------------------------------

    def _return_now(
        self, entry: Entry, _bisect: Any = bisect_left, _bounds: tuple[float, ...] = BUCKETS
    ) -> bool:
        """The hot path: take back an idle connection with no reset hook to run.

        It counts the use time too (`PoolCounters.used`, inlined): a hold
        within the first bucket costs one comparison, a longer one (where
        the hold itself dwarfs it) a bucket lookup. The defaults bind the
        lookup as locals, cheaper than globals here.
        """
        conn = entry.conn
        now = self._now()
        if (
            self._hot_release
            and now < entry.expires
            and conn.transaction_status == IDLE
            and conn.autocommit
            and not conn.closed
        ):
            entry.last_used = now
            used = now - entry.lent_at
            counters = self._counters
            if used <= _bounds[0]:
                counters.use_quick += 1
            else:
                counters.use_counts[_bisect(_bounds, used)] += 1
            counters.use_sum += used
            self._put_back(entry)
            return True
        return False

    def _put_back(self, entry: Entry) -> None:
        """Hand a usable connection to the first waiter, or make it idle.

        Closed instead when the pool is closed, the connection was drained,
        or the pool holds more than ``max_size`` (it was resized); parked
        while the pool is paused.
        """
        if self._closed or entry.retired or len(self._entries) > self._max_size:
            self._discard(entry)
            return
        entry.stack = None
        if self._paused:
            self._parked.append(entry)
            self._notify()
            return
        if not self._waiters.grant(entry):
            self._idle.append(entry)
            self._notify()

    def _discard(self, entry: Entry) -> None:
        """Close a connection and forget it; open a replacement if needed."""
        if entry in self._entries:
            self._entries.discard(entry)
            self._counters.closed += 1
        entry.conn.abort()
        self._notify()
        self._filler.grow()

    def _notify(self) -> None:
        """Wake whoever waits for the pool to change (close, wait_ready)."""
        event, self._changed = self._changed, None
        if event is not None:
            event.set()

    async def _wait_changed(self) -> None:
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()


def _log_closed_under_borrower(name: str) -> None:
    logger.warning("pool %r closed while a connection was still borrowed: closing it", name)


def _no_waker() -> Waker:
    raise RuntimeError("the pool is not open")
