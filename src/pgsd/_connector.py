"""Many databases, one task group: a pool per database, opened, checked and closed together.

Each pool runs in its own child task of the connector's task group, which
enters the pool's context and leaves it when the connector closes: a pool's
task group is entered and exited by the same task, as anyio and trio
require, and no pool outlives ``async with connector``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.abc
from psycopg.rows import RowFactory

from ._config import ConnectorConfig, DatabaseConfig, PoolConfig
from ._connection import Connection
from ._errors import ConfigError, PgsdError, PoolClosed, redact
from ._pool import ConnectionPool, StateCallback
from ._pool.lending import DeferredLease
from ._pool.listen import Listener, OnGap
from ._runtime import RunTimeDatabases
from ._stats import PoolStats
from ._verifying import Verifying

__all__ = ["DatabaseConnector"]

logger = logging.getLogger("pgsd.connector")

Target = str | DatabaseConfig


class _OneShotByName:
    """One-shot statements by database: ``await connector.fetchval("source", query)``.

    The same as the pool's (`ConnectionPool.fetchall` and the others), on
    the pool of the database named (or of a `DatabaseConfig`).
    """

    async def _resolve(self, target: Target) -> ConnectionPool:
        raise NotImplementedError  # pragma: no cover

    async def fetchall(
        self,
        target: Target,
        query: Any,
        params: Any = None,
        *,
        row_factory: RowFactory[Any] | None = None,
        read_only: bool = False,
    ) -> list[Any]:
        """All rows of one statement on the database's pool (see `ConnectionPool.fetchall`)."""
        pool = await self._resolve(target)
        return await pool.fetchall(query, params, row_factory=row_factory, read_only=read_only)

    async def fetchone(
        self,
        target: Target,
        query: Any,
        params: Any = None,
        *,
        row_factory: RowFactory[Any] | None = None,
        read_only: bool = False,
    ) -> Any:
        """The first row, or None (see `ConnectionPool.fetchone`)."""
        pool = await self._resolve(target)
        return await pool.fetchone(query, params, row_factory=row_factory, read_only=read_only)

    async def fetchval(
        self, target: Target, query: Any, params: Any = None, *, read_only: bool = False
    ) -> Any:
        """The first column of the first row, or None (see `ConnectionPool.fetchval`)."""
        pool = await self._resolve(target)
        return await pool.fetchval(query, params, read_only=read_only)

    async def execute(
        self, target: Target, query: Any, params: Any = None, *, read_only: bool = False
    ) -> int:
        """Rows affected (see `ConnectionPool.execute`)."""
        pool = await self._resolve(target)
        return await pool.execute(query, params, read_only=read_only)


class DatabaseConnector(_OneShotByName, RunTimeDatabases, Verifying):
    """A connection pool per configured database, in one task group.

    Use it as an async context manager::

        async with pgsd.DatabaseConnector(config) as connector:
            async with connector.get_connection("source") as conn:
                await conn.execute("SELECT 1")

    Entering opens every pool and waits, for at most each database's
    ``connect_timeout`` and for all databases at once, until each pool holds
    its first connections or has failed a first attempt: the program starts
    with warm pools, and a database that cannot be reached neither raises
    nor delays the others. It is logged (WARNING, logger
    ``pgsd.connector``) and its pool keeps retrying in the background.
    Leaving closes every pool at once, even when cancelled: each pool waits
    at most its ``close_timeout`` for borrowed connections, then closes
    them under their borrowers.

    Args:
        config: the databases and their pool settings.
        on_down: called as ``on_down(name, error)`` when a database goes
            down (see `ConnectionPool`); may be a coroutine function.
        on_recovered: called as ``on_recovered(name, None)`` when it is back.

    A connector can be entered once. Raises `TypeError` for a config that
    is not a `ConnectorConfig`.
    """

    def __init__(
        self,
        config: ConnectorConfig,
        *,
        on_down: StateCallback | None = None,
        on_recovered: StateCallback | None = None,
    ) -> None:
        if not isinstance(config, ConnectorConfig):
            raise TypeError(f"config must be a ConnectorConfig, got {type(config).__name__}")
        self.config = config
        self._on_down = on_down
        self._on_recovered = on_recovered
        # Every pool by name: the configured databases in config order, then
        # the pools made for other configs.
        self._pools: dict[str, ConnectionPool] = {}
        # Pools by config: each config as given (name and all), and the same
        # config without its name, so that an equal config finds its pool
        # whatever name it carries.
        self._by_config: dict[DatabaseConfig, ConnectionPool] = {}
        #: Called with every pool made from now on (`pgsd.opentelemetry`).
        self._pool_hooks: list[Callable[[ConnectionPool], None]] = []
        for name, database in config.databases.items():
            self._pools[name] = pool = self._make_pool(name, database, config.pool_config(name))
            self._register(pool, database)
        self._task_group: anyio.abc.TaskGroup | None = None
        #: Each open pool's task, by pool: set `stop` to close the pool;
        #: `started` and `done` say when it opened and when it has closed.
        self._runs: dict[ConnectionPool, _PoolRun] = {}
        self._closed = False
        self._new_pool_lock: anyio.Lock | None = None
        self._warming = _WarmUp()
        self._entered = False

    def __repr__(self) -> str:
        pools = ", ".join(f"{name!r}: {pool.state}" for name, pool in self._pools.items())
        return f"<pgsd.DatabaseConnector {{{pools}}}>"

    # -- opening and closing -------------------------------------------------

    async def __aenter__(self) -> Self:
        """Open every pool and wait (bounded) for their first connections.

        Raises:
            RuntimeError: the connector was entered before.
        """
        if self._entered:
            raise RuntimeError("a DatabaseConnector can be entered only once; make a new one")
        self._entered = True
        self._new_pool_lock = anyio.Lock()
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        try:
            # Opening a pool does not wait for the server: its first
            # connection attempts start at once, so starting the pools one
            # after the other still connects to every database concurrently.
            for pool in list(self._pools.values()):
                await task_group.start(self._run_pool, pool, self._run_of(pool))
            pools = [self._pools[name] for name in self.config.databases]
            await self._warming.run(pools)
            _log_open(pools)
        except BaseException:
            await self._close()  # noqa: ASYNC102 (shielded inside, bounded by close_timeout)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close every pool concurrently, within each pool's ``close_timeout``."""
        await self._close()  # noqa: ASYNC102 (shielded inside, bounded by close_timeout)

    async def _close(self) -> None:
        task_group, self._task_group = self._task_group, None
        self._closed = True
        if task_group is None:
            return
        for run in self._runs.values():
            run.stop.set()
        # Shielded so that a cancelled caller still closes every connection;
        # bounded because each pool's close is (close_timeout, then abort).
        task_group.cancel_scope.shield = True
        await task_group.__aexit__(None, None, None)

    def _run_of(self, pool: ConnectionPool) -> _PoolRun:
        run = self._runs[pool] = _PoolRun()
        return run

    async def _run_pool(
        self,
        pool: ConnectionPool,
        run: _PoolRun,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep one pool open until it is removed or the connector closes."""
        try:
            async with pool:
                run.started.set()
                task_status.started()
                await run.stop.wait()
        finally:
            run.done.set()
            self._runs.pop(pool, None)

    def _pool_down(self, name: str, error: BaseException | None) -> Any:
        self._warming.stop(name)
        if self._on_down is not None:
            return self._on_down(name, error)
        return None

    # -- pools -----------------------------------------------------------------

    def _make_pool(
        self, name: str, database: DatabaseConfig, pool_config: PoolConfig | None
    ) -> ConnectionPool:
        pool = ConnectionPool(
            database,
            pool_config,
            name=name,
            on_down=self._pool_down,
            on_recovered=self._on_recovered,
        )
        for hook in self._pool_hooks:
            hook(pool)
        return pool

    def _register(self, pool: ConnectionPool, database: DatabaseConfig) -> None:
        self._by_config.setdefault(database, pool)
        self._by_config.setdefault(_unnamed(database), pool)

    def _find_pool(self, target: Target) -> ConnectionPool | None:
        """The pool for a name or a known config; None for a config not seen yet.

        Raises:
            ConfigError: no database has that name.
            TypeError: ``target`` is neither a name nor a `DatabaseConfig`.
        """
        if isinstance(target, str):
            return self.pool(target)
        if not isinstance(target, DatabaseConfig):
            raise TypeError(
                f"expected a database name or a DatabaseConfig, got {type(target).__name__}"
            )
        pool = self._by_config.get(target)
        if pool is None and target.name is not None:
            pool = self._by_config.get(_unnamed(target))
        return pool

    async def _resolve(self, target: Target) -> ConnectionPool:
        pool = self._find_pool(target)
        if pool is None:
            assert isinstance(target, DatabaseConfig)
            pool = await self._new_pool(target)
        elif pool._closed:
            await self._opened(pool)
        return pool

    def _opening(self, pool: ConnectionPool) -> bool:
        """Whether *pool* was added at run time and its task has not opened it yet."""
        run = self._runs.get(pool)
        return run is not None and not run.started.is_set()

    async def _opened(self, pool: ConnectionPool) -> None:
        """Wait until a pool added at run time is open (at once for any other)."""
        run = self._runs.get(pool)
        if run is not None:
            await run.started.wait()

    async def _new_pool(self, database: DatabaseConfig) -> ConnectionPool:
        """Open a pool for a database that is not configured, once per config."""
        if self._new_pool_lock is None:
            raise PoolClosed("the connector is not open: use 'async with DatabaseConnector(...)'")
        async with self._new_pool_lock:
            pool = self._find_pool(database)  # another task may have made it meanwhile
            if pool is not None:
                return pool
            if self._task_group is None:
                raise PoolClosed("the connector is closed")
            name = self._new_name(database)
            pool = self._make_pool(name, database, database.pool or self.config.pool)
            await self._task_group.start(self._run_pool, pool, self._run_of(pool))
            self._pools[name] = pool
            self._register(pool, database)
        logger.info("opened a pool for database %r at %s", name, database.address)
        return pool

    def _new_name(self, database: DatabaseConfig) -> str:
        """A name for a new pool that no other pool of this connector has."""
        name = database.display_name
        if name in self._pools:
            name = f"{name} ({database.address})"
        unique, number = name, 2
        while unique in self._pools:
            unique = f"{name} #{number}"
            number += 1
        return unique

    def _unknown(self, name: str) -> ConfigError:
        known = ", ".join(map(repr, self.config.databases)) or "none"
        return ConfigError(f"no database named {name!r} in this connector (configured: {known})")

    # -- public API --------------------------------------------------------------

    def get_connection(
        self, target: Target, *, timeout: float | None = None, read_only: bool = False
    ) -> AbstractAsyncContextManager[Connection[Any]]:
        """Borrow a connection: ``async with connector.get_connection("source") as conn``.

        Args:
            target: a configured database's name, or a `DatabaseConfig`. A
                config equal to a configured database's (its name aside)
                uses that database's pool; any other config gets a pool of
                its own, made on first use with the connector's default
                `PoolConfig` (or the config's own ``pool``) and kept until
                the connector closes.
            timeout: seconds to wait for a connection (default: the pool's
                ``acquire_timeout``).
            read_only: a fresh read replica's connection when the database
                has ``replicas``; writes and the default go to the primary.

        The connection is lent as `ConnectionPool.connection` lends it.

        Raises:
            ConfigError: no database has that name (at once).
            TypeError: ``target`` is neither a name nor a `DatabaseConfig`.
            PoolTimeout, TooManyWaiters, PoolClosed: on entering, as
                `ConnectionPool.connection`.
            UnsupportedServerVersion, NoReplicaAvailable: on entering, as
                `ConnectionPool.connection`.
        """
        pool = self._find_pool(target)
        if pool is not None and not (pool._closed and self._opening(pool)):
            return pool.connection(timeout, read_only=read_only)
        # A config not seen yet (its pool is made on entering), or a database
        # added at run time whose pool is not open yet (entering waits for it).
        return DeferredLease(lambda: self._resolve(target), timeout, read_only)

    def listen(
        self,
        target: Target,
        channel: str,
        *more_channels: str,
        max_buffered: int = 1000,
        overflow: str = "gap",
        on_gap: OnGap | None = None,
        reconnect_timeout: float | None = None,
    ) -> Listener:
        """Receive a database's notifications: see `ConnectionPool.listen`.

        ``async with connector.listen("app", "jobs") as notifications``.

        Raises:
            ConfigError: a channel or option is invalid (at once); on
                entering, no database has that name.
        """
        return Listener(
            lambda: self._resolve(target),
            (channel, *more_channels),
            max_buffered=max_buffered,
            overflow=overflow,
            on_gap=on_gap,
            reconnect_timeout=reconnect_timeout,
        )

    async def notify(self, target: Target, channel: str, payload: str = "") -> None:
        """Send a notification through the database's pool (``pg_notify``, with parameters)."""
        pool = await self._resolve(target)
        await pool.notify(channel, payload)

    def pool(self, name: str) -> ConnectionPool:
        """The pool of the database named ``name``.

        Raises:
            ConfigError: no database has that name.
        """
        try:
            return self._pools[name]
        except KeyError:
            raise self._unknown(name) from None

    def stats(self) -> dict[str, PoolStats]:
        """A statistics snapshot of every pool, by name.

        The configured databases come first, in config order, then the
        pools made for other configs by `get_connection`.
        """
        return {name: pool.stats() for name, pool in self._pools.items()}


class _PoolRun:
    """The events of one pool's task in the connector."""

    __slots__ = ("done", "started", "stop")

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.stop = anyio.Event()
        self.done = anyio.Event()


class _WarmUp:
    """Opening a connector: wait for each pool's first connections, all at once.

    A pool's wait ends at its first failed attempt (`stop`, called when the
    pool goes down): waiting for the backoff to come round again would only
    delay the other databases.
    """

    def __init__(self) -> None:
        self._scopes: dict[str, anyio.CancelScope] = {}

    async def run(self, pools: list[ConnectionPool]) -> None:
        async with anyio.create_task_group() as task_group:
            for pool in pools:
                task_group.start_soon(self._wait_first_connection, pool)

    def stop(self, name: str) -> None:
        scope = self._scopes.get(name)
        if scope is not None:
            scope.cancel()

    async def _wait_first_connection(self, pool: ConnectionPool) -> None:
        if pool.pool_config.min_size == 0:
            return  # such a pool connects on first use only
        with anyio.CancelScope() as scope:
            self._scopes[pool.name] = scope
            try:
                if pool.state != "down":
                    await pool.wait_ready(pool.config.connect_timeout)
            except PgsdError:
                pass  # reported by _log_open from the pool's state and last error
            finally:
                del self._scopes[pool.name]


def _unnamed(database: DatabaseConfig) -> DatabaseConfig:
    return database if database.name is None else database.replace(name=None)


def _log_open(pools: list[ConnectionPool]) -> None:
    """One line for the whole connector, and a warning per database that is not up."""
    up = down = lazy = 0
    for pool in pools:
        if pool.state == "up":
            up += 1
        elif pool.pool_config.min_size == 0 and pool.last_error is None:
            lazy += 1
        else:
            down += 1
            _warn_down(pool)
    plural = "" if len(pools) == 1 else "s"
    extra = f", {lazy} not connected yet (min_size 0)" if lazy else ""
    logger.info("%d database%s: %d up, %d down%s", len(pools), plural, up, down, extra)


def _warn_down(pool: ConnectionPool) -> None:
    error = pool.last_error
    if error is not None:
        reason = redact(str(error).strip() or type(error).__name__)
    else:
        reason = f"no connection within {pool.config.connect_timeout:g} s"
    logger.warning(
        "database %r at %s is not available, its pool keeps retrying in the background: %s",
        pool.name,
        pool.config.address,
        reason,
    )
