"""Databases added, removed and changed while a connector runs.

`add_database` opens a pool in the connector's task group (its first users
wait until it is open), `remove_database` closes one (its waiters get
`PoolClosed`; lent connections get ``close_timeout`` to come back), and
`reload` applies a new `ConnectorConfig`: an unchanged database keeps its
pool and its connections, one whose sizes alone changed is resized, any
other change gets a new pool while the old one closes.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import anyio

from ._config import ConnectorConfig, DatabaseConfig, PoolConfig
from ._errors import ConfigError, PoolClosed
from ._pool import ConnectionPool

if TYPE_CHECKING:
    from ._connector import DatabaseConnector

__all__ = ["RunTimeDatabases"]

logger = logging.getLogger("pgsd.connector")

#: What `resize` can change on a running pool without replacing it.
_SIZES = ("min_size", "max_size")


class RunTimeDatabases:
    """The run-time database methods of `DatabaseConnector`."""

    def add_database(self, name: str, config: DatabaseConfig) -> None:
        """Add a database and open its pool in the connector's task group.

        It can be used at once (`get_connection`, the one-shot statements,
        `verify_connection`: they wait until its pool is open); its pool
        settings are ``config.pool`` or the connector's default.

        Raises:
            ConfigError: the name is empty or taken, or *config* is not a
                `DatabaseConfig`.
            PoolClosed: the connector is closed.
        """
        connector: DatabaseConnector = self  # type: ignore[assignment]
        if connector._closed:
            raise PoolClosed("the connector is closed")
        if name in connector._pools:
            raise ConfigError(f"a database named {name!r} exists already", key="databases")
        databases = {**connector.config.databases, name: config}
        connector.config = ConnectorConfig(databases=databases, pool=connector.config.pool)
        _open(connector, name)
        logger.info("added database %r at %s", name, config.address)

    async def remove_database(self, name: str) -> None:
        """Close the database's pool and forget it.

        Its waiters get `PoolClosed`; its lent connections get the pool's
        ``close_timeout`` to come back, then are closed. Returns once the
        pool is closed.

        Raises:
            ConfigError: no database has that name.
        """
        connector: DatabaseConnector = self  # type: ignore[assignment]
        pool = connector.pool(name)
        databases = {k: v for k, v in connector.config.databases.items() if k != name}
        connector.config = ConnectorConfig(databases=databases, pool=connector.config.pool)
        await _close(connector, name, pool)
        logger.info("removed database %r", name)

    async def reload(self, config: ConnectorConfig) -> None:
        """Apply a changed configuration (`pgsd.load_config`'s output will do).

        Databases that are new are added, those gone are removed (as
        `remove_database`), and those whose settings changed get a new pool
        while the old one closes; one whose pool sizes alone changed is
        resized in place, and an unchanged one keeps its pool and its
        connections. Returns once the old pools are closed.

        Raises:
            TypeError: *config* is not a `ConnectorConfig`.
            PoolClosed: the connector is closed.
        """
        connector: DatabaseConnector = self  # type: ignore[assignment]
        if not isinstance(config, ConnectorConfig):
            raise TypeError(f"config must be a ConnectorConfig, got {type(config).__name__}")
        if connector._closed:
            raise PoolClosed("the connector is closed")
        old = connector.config
        closing: list[tuple[str, ConnectionPool]] = []
        changes: dict[str, list[str]] = {"added": [], "changed": [], "resized": [], "removed": []}
        connector.config = config
        for name in old.databases:
            if name not in config.databases:
                closing.append((name, connector._pools[name]))
                changes["removed"].append(name)
        for name, database in config.databases.items():
            if name not in old.databases:
                _open(connector, name)
                changes["added"].append(name)
                continue
            pool = connector._pools[name]
            wanted = config.pool_config(name)
            same = _without_pool(database) == _without_pool(old.databases[name])
            if same and wanted == pool.pool_config:
                continue
            if same and _sizes_only(pool.pool_config, wanted):
                pool.resize(min_size=wanted.min_size, max_size=wanted.max_size)
                changes["resized"].append(name)
                continue
            closing.append((name, pool))
            _forget(connector, name, pool)
            _open(connector, name)
            changes["changed"].append(name)
        async with anyio.create_task_group() as tg:
            for name, pool in closing:
                tg.start_soon(_close, connector, name, pool)
        summary = "; ".join(
            f"{what} {', '.join(names)}" for what, names in changes.items() if names
        )
        logger.info("reloaded the configuration: %s", summary or "nothing changed")


def _without_pool(database: DatabaseConfig) -> DatabaseConfig:
    """The database's connection settings alone (its pool settings compared apart)."""
    return database if database.pool is None else database.replace(pool=None)


def _sizes_only(current: PoolConfig, wanted: PoolConfig) -> bool:
    """Whether the two pool configs differ in their sizes alone."""
    sizes = {key: getattr(current, key) for key in _SIZES}
    return dataclasses.replace(wanted, **sizes) == current


def _open(connector: DatabaseConnector, name: str) -> None:
    """Make the pool of configured database *name* and start it, or leave it for entering."""
    database = connector.config.databases[name]
    pool = connector._make_pool(name, database, connector.config.pool_config(name))
    connector._pools[name] = pool
    connector._register(pool, database)
    if connector._task_group is not None:
        connector._task_group.start_soon(connector._run_pool, pool, connector._run_of(pool))


def _forget(connector: DatabaseConnector, name: str, pool: ConnectionPool) -> None:
    """No new caller finds *pool* under *name* or by its config."""
    if connector._pools.get(name) is pool:
        del connector._pools[name]
    for key in [key for key, value in connector._by_config.items() if value is pool]:
        del connector._by_config[key]


async def _close(connector: DatabaseConnector, name: str, pool: ConnectionPool) -> None:
    """Forget *pool* and close it; return once it is closed (bounded by its close_timeout)."""
    _forget(connector, name, pool)
    run = connector._runs.get(pool)
    if run is None:
        return  # never opened (the connector was not entered), or closed already
    run.stop.set()
    with anyio.CancelScope(shield=True):
        await run.done.wait()
