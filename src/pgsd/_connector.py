"""Many databases, one task group: a pool per database, opened, checked and closed together.

Each pool runs in its own child task of the connector's task group, which
enters the pool's context and leaves it when the connector closes: a pool's
task group is entered and exited by the same task, as anyio and trio
require, and no pool outlives ``async with connector``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.abc
from psycopg import AsyncConnection
from psycopg.rows import RowFactory

from ._config import ConnectorConfig, DatabaseConfig, PoolConfig
from ._connection import Connection
from ._errors import ConfigError, PgsdError, PoolClosed, redact
from ._permissions import PermissionReport
from ._permissions import check_permissions as _check_permissions
from ._pool import ConnectionPool, StateCallback
from ._reports import ConnectionReport, failure_report, verify_pool
from ._stats import PoolStats
from ._version import ServerVersion
from ._version import get_version as _get_version

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
    ) -> list[Any]:
        """All rows of one statement on the database's pool (see `ConnectionPool.fetchall`)."""
        pool = await self._resolve(target)
        return await pool.fetchall(query, params, row_factory=row_factory)

    async def fetchone(
        self,
        target: Target,
        query: Any,
        params: Any = None,
        *,
        row_factory: RowFactory[Any] | None = None,
    ) -> Any:
        """The first row, or None (see `ConnectionPool.fetchone`)."""
        pool = await self._resolve(target)
        return await pool.fetchone(query, params, row_factory=row_factory)

    async def fetchval(self, target: Target, query: Any, params: Any = None) -> Any:
        """The first column of the first row, or None (see `ConnectionPool.fetchval`)."""
        pool = await self._resolve(target)
        return await pool.fetchval(query, params)

    async def execute(self, target: Target, query: Any, params: Any = None) -> int:
        """Rows affected (see `ConnectionPool.execute`)."""
        pool = await self._resolve(target)
        return await pool.execute(query, params)


class DatabaseConnector(_OneShotByName):
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
        for name, database in config.databases.items():
            self._pools[name] = pool = self._make_pool(name, database, config.pool_config(name))
            self._register(pool, database)
        self._task_group: anyio.abc.TaskGroup | None = None
        self._closing: anyio.Event | None = None
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
        self._closing = anyio.Event()
        self._new_pool_lock = anyio.Lock()
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        try:
            # Opening a pool does not wait for the server: its first
            # connection attempts start at once, so starting the pools one
            # after the other still connects to every database concurrently.
            for pool in list(self._pools.values()):
                await task_group.start(self._run_pool, pool)
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
        if task_group is None:
            return
        assert self._closing is not None
        self._closing.set()
        # Shielded so that a cancelled caller still closes every connection;
        # bounded because each pool's close is (close_timeout, then abort).
        task_group.cancel_scope.shield = True
        await task_group.__aexit__(None, None, None)

    async def _run_pool(
        self,
        pool: ConnectionPool,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep one pool open until the connector closes."""
        assert self._closing is not None
        async with pool:
            task_status.started()
            await self._closing.wait()

    def _pool_down(self, name: str, error: BaseException | None) -> Any:
        self._warming.stop(name)
        if self._on_down is not None:
            return self._on_down(name, error)
        return None

    # -- pools -----------------------------------------------------------------

    def _make_pool(
        self, name: str, database: DatabaseConfig, pool_config: PoolConfig | None
    ) -> ConnectionPool:
        return ConnectionPool(
            database,
            pool_config,
            name=name,
            on_down=self._pool_down,
            on_recovered=self._on_recovered,
        )

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
        return pool

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
            await self._task_group.start(self._run_pool, pool)
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
        self, target: Target, *, timeout: float | None = None
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

        The connection is lent as `ConnectionPool.connection` lends it.

        Raises:
            ConfigError: no database has that name (at once).
            TypeError: ``target`` is neither a name nor a `DatabaseConfig`.
            PoolTimeout, TooManyWaiters, PoolClosed, UnsupportedServerVersion:
                on entering, as `ConnectionPool.connection`.
        """
        pool = self._find_pool(target)
        if pool is not None:
            return pool.connection(timeout)
        assert isinstance(target, DatabaseConfig)
        return _NewPoolLease(self, target, timeout)

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

    async def ping(self, target: Target) -> float:
        """Borrow a connection to the database and ping it; return the round trip in seconds.

        Raises:
            ConfigError: no database has that name.
            PoolTimeout, PoolClosed: as `ConnectionPool.connection`.
            psycopg.OperationalError: the connection did not answer.
        """
        pool = await self._resolve(target)
        return await pool.ping()

    async def get_version(self, conn: AsyncConnection[Any]) -> ServerVersion:
        """The server's version: the same as `pgsd.get_version`.

        Raises:
            psycopg.Error: the query failed.
        """
        return await _get_version(conn)

    async def check_permissions(
        self, conn: AsyncConnection[Any], required: Iterable[str] | None = None
    ) -> PermissionReport:
        """What the connected role may do: the same as `pgsd.check_permissions`.

        Raises:
            ConfigError: a requirement string is malformed.
            psycopg.Error: the query failed.
        """
        return await _check_permissions(conn, required)

    async def verify_connection(
        self,
        target: Target,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> ConnectionReport:
        """Check one database: reachable, version supported, required privileges held.

        Borrows a connection from the database's pool, pings it (the round
        trip is ``latency_ms``), reads the version and checks the
        permissions against the database's ``required`` list. A database
        that is down, refuses the role, runs a server older than the pool's
        ``min_server_version`` or lacks a privilege gives a report with
        ``ok=False`` and an ``error`` saying so, never an exception.

        Args:
            target: a configured database's name, or a `DatabaseConfig` (as
                for `get_connection`).
            timeout: seconds to wait for a connection, and again for the
                checks on it. Default: the database's ``connect_timeout``,
                capped by the pool's ``acquire_timeout``: as long as one
                fresh connection attempt may take, while the pool retries
                in the background.

        Raises:
            ConfigError: no database has that name (a programming error,
                not a database problem).
            TypeError: ``target`` is neither a name nor a `DatabaseConfig`.
        """
        pool = self._find_pool(target)
        if pool is None:
            assert isinstance(target, DatabaseConfig)
            try:
                pool = await self._new_pool(target)
            except PgsdError as exc:
                return failure_report(target.display_name, exc)
        if timeout is None:
            timeout = min(pool.config.connect_timeout, pool.pool_config.acquire_timeout)
        return await verify_pool(pool, timeout)

    async def verify_all(
        self, *, on_report: Callable[[str, ConnectionReport], object] | None = None
    ) -> dict[str, ConnectionReport]:
        """Check every configured database, all at once; reports in config order.

        ``on_report(name, report)`` is called as each check finishes (to show
        progress). Never raises for a database problem (see
        `verify_connection`).
        """
        reports: dict[str, ConnectionReport] = {}
        async with anyio.create_task_group() as task_group:
            for name in self.config.databases:
                task_group.start_soon(_verify_into, self, name, reports, on_report)
        return {name: reports[name] for name in self.config.databases}


class _NewPoolLease:
    """``get_connection`` with a config not seen yet: make its pool on entering."""

    __slots__ = ("_connector", "_database", "_lease", "_timeout")

    def __init__(
        self, connector: DatabaseConnector, database: DatabaseConfig, timeout: float | None
    ) -> None:
        self._connector = connector
        self._database = database
        self._timeout = timeout
        self._lease: AbstractAsyncContextManager[Connection[Any]] | None = None

    async def __aenter__(self) -> Connection[Any]:
        pool = await self._connector._resolve(self._database)
        lease = pool.connection(self._timeout)
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


async def _verify_into(
    connector: DatabaseConnector,
    name: str,
    reports: dict[str, ConnectionReport],
    on_report: Callable[[str, ConnectionReport], object] | None,
) -> None:
    reports[name] = report = await connector.verify_connection(name)
    if on_report is not None:
        on_report(name, report)


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
