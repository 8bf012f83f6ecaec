"""Checking databases through a connector: ping, version, permissions, reports.

The methods of `DatabaseConnector` that look at a database rather than lend
from it; `verify_connection` and `verify_all` never raise for a database
problem, they report it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import anyio
from psycopg import AsyncConnection

from ._config import DatabaseConfig
from ._errors import PgsdError
from ._permissions import PermissionReport
from ._permissions import check_permissions as _check_permissions
from ._reports import ConnectionReport, failure_report, verify_pool
from ._version import ServerVersion
from ._version import get_version as _get_version

if TYPE_CHECKING:
    from ._connector import DatabaseConnector

__all__ = ["Verifying"]

Target = str | DatabaseConfig


class Verifying:
    """The checking methods of `DatabaseConnector`."""

    async def ping(self, target: Target) -> float:
        """Borrow a connection to the database and ping it; return the round trip in seconds.

        Raises:
            ConfigError: no database has that name.
            PoolTimeout, PoolClosed: as `ConnectionPool.connection`.
            psycopg.OperationalError: the connection did not answer.
        """
        connector: DatabaseConnector = self  # type: ignore[assignment]
        pool = await connector._resolve(target)
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
        connector: DatabaseConnector = self  # type: ignore[assignment]
        pool = connector._find_pool(target)
        if pool is None:
            assert isinstance(target, DatabaseConfig)
            try:
                pool = await connector._new_pool(target)
            except PgsdError as exc:
                return failure_report(target.display_name, exc)
        await connector._opened(pool)
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
        connector: DatabaseConnector = self  # type: ignore[assignment]
        reports: dict[str, ConnectionReport] = {}
        async with anyio.create_task_group() as task_group:
            for name in connector.config.databases:
                task_group.start_soon(_verify_into, connector, name, reports, on_report)
        return {name: reports[name] for name in connector.config.databases}


async def _verify_into(
    connector: DatabaseConnector,
    name: str,
    reports: dict[str, ConnectionReport],
    on_report: Callable[[str, ConnectionReport], object] | None,
) -> None:
    reports[name] = report = await connector.verify_connection(name)
    if on_report is not None:
        on_report(name, report)
