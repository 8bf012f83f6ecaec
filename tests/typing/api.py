"""The public API as a type checker sees it: `just lint` runs mypy --strict on this file.

Nothing here runs. Each ``assert_type`` pins what a caller's code gets, so
that a change in a public signature shows up as a type error here first.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, assert_type

import anyio.lowlevel
from psycopg.rows import DictRow, TupleRow, dict_row

import pgsd


async def connecting() -> None:
    conn = await pgsd.connect("host=127.0.0.1 dbname=app")
    assert_type(conn, pgsd.Connection[TupleRow])
    config = pgsd.DatabaseConfig(host="127.0.0.1", dbname="app", user="app", connect_timeout=5)
    conn = await pgsd.connect(config, autocommit=False)
    async with conn:
        cur = await conn.execute("SELECT 1")
        assert_type(await cur.fetchone(), tuple[Any, ...] | None)
        assert_type(await conn.ping(timeout=1.0), float)
        async with conn.transaction():
            await conn.execute("SELECT 1")
    dict_conn = await pgsd.connect(config, row_factory=dict_row)
    assert_type(dict_conn, pgsd.Connection[DictRow])
    dict_cur = await dict_conn.execute("SELECT 1 AS one")
    assert_type(await dict_cur.fetchone(), DictRow | None)
    await dict_conn.close()


def configuring(path: Path) -> None:
    database = pgsd.DatabaseConfig.from_dsn("postgresql://app@db1/app", connect_timeout=3)
    assert_type(database, pgsd.DatabaseConfig)
    assert_type(database.replace(sslmode="verify-full"), pgsd.DatabaseConfig)
    assert_type(database.display_name, str)
    assert_type(database.required, Sequence[str])
    pool = pgsd.PoolConfig(min_size=1, max_size=10, acquire_timeout=2.5)
    assert_type(pool.replace(max_size=20), pgsd.PoolConfig)
    connector = pgsd.ConnectorConfig(databases={"source": database}, pool=pool)
    assert_type(connector.pool_config("source"), pgsd.PoolConfig)
    assert_type(pgsd.load_config(path), pgsd.ConnectorConfig)
    assert_type(pgsd.load_config(path, environ={"PGSD_PASSWORD": "x"}), pgsd.ConnectorConfig)


async def pooling(config: pgsd.DatabaseConfig) -> None:
    async with pgsd.ConnectionPool(config, pgsd.PoolConfig(max_size=2), name="source") as pool:
        assert_type(pool, pgsd.ConnectionPool)
        async with pool.connection(timeout=1.0) as conn:
            assert_type(conn, pgsd.Connection[Any])
        await pool.wait_ready(timeout=5)
        assert_type(await pool.ping(), float)
        stats = pool.stats()
        assert_type(stats, pgsd.PoolStats)
        assert_type(stats.in_use, int)
        assert_type(stats.wait_time_max, float)
        assert_type(pool.state, pgsd.PoolState)
        assert_type(pool.last_error, BaseException | None)
        assert_type(await pool.fetchall("SELECT %s", [1]), list[Any])
        assert_type(await pool.fetchone("SELECT 1", row_factory=dict_row), Any)
        assert_type(await pool.fetchval("SELECT 1"), Any)
        assert_type(await pool.execute("SELECT 1"), int)
        assert_type(stats.statements_in_flight, int)


async def connecting_to_many(config: pgsd.ConnectorConfig) -> None:
    def on_down(name: str, error: BaseException | None) -> None: ...

    async with pgsd.DatabaseConnector(config, on_down=on_down) as connector:
        assert_type(connector, pgsd.DatabaseConnector)
        assert_type(await connector.fetchval("source", "SELECT 1"), Any)
        assert_type(await connector.execute("source", "SELECT %s", [1]), int)
        lease = connector.get_connection("source", timeout=2.0)
        assert_type(lease, AbstractAsyncContextManager[pgsd.Connection[Any]])
        async with lease as conn:
            assert_type(await connector.get_version(conn), pgsd.ServerVersion)
            report = await connector.check_permissions(conn, ["database:CONNECT"])
            assert_type(report, pgsd.PermissionReport)
        assert_type(connector.pool("source"), pgsd.ConnectionPool)
        assert_type(connector.stats(), dict[str, pgsd.PoolStats])
        assert_type(await connector.ping("source"), float)
        verified = await connector.verify_connection("source", timeout=3)
        assert_type(verified, pgsd.ConnectionReport)
        assert_type(verified.ok, bool)
        assert_type(verified.error, str | None)
        assert_type(verified.tls, bool | None)
        assert_type(verified.to_dict(), dict[str, Any])
        reports = await connector.verify_all(on_report=lambda name, report: None)
        assert_type(reports, dict[str, pgsd.ConnectionReport])


async def inspecting(conn: pgsd.Connection[Any]) -> None:
    version = await pgsd.get_version(conn)
    assert_type(version, pgsd.ServerVersion)
    assert_type(version.major, int)
    assert_type(version.supported, bool)
    assert_type(version.is_supported(pgsd.MIN_SERVER_VERSION), bool)
    report = await pgsd.check_permissions(conn, ["table:app.users:SELECT"])
    assert_type(report.missing, tuple[str, ...])
    assert_type(report.attributes, pgsd.RoleAttributes)
    assert_type(report.ok, bool)
    assert_type(await pgsd.require_permissions(conn, ["role:pg_monitor"]), pgsd.PermissionReport)


def handling(exc: Exception) -> None:
    if isinstance(exc, pgsd.ConnectError):
        assert_type(exc.database, str)
        assert_type(exc.sqlstate, str | None)
        assert_type(exc.hint, str)
    if isinstance(exc, pgsd.ConfigError):
        assert_type(exc.key, str | None)
        assert_type(exc.path, str | None)
    if isinstance(exc, pgsd.InsufficientPrivileges):
        assert_type(exc.missing, tuple[str, ...])
    if isinstance(exc, pgsd.UnsupportedServerVersion):
        assert_type(exc.version_num, int)
    assert_type(issubclass(pgsd.PoolTimeout, pgsd.PgsdError), bool)


async def operating(pool: pgsd.ConnectionPool, connector: pgsd.DatabaseConnector) -> None:
    async def token(config: pgsd.DatabaseConfig) -> str:
        await anyio.lowlevel.checkpoint()
        return config.user or ""

    def vault(config: pgsd.DatabaseConfig) -> str:
        return "x"

    pgsd.DatabaseConfig(host="h", password_provider=token)
    pgsd.DatabaseConfig(host="h", password_provider=vault)
    pgsd.DatabaseConfig(host="h", password_provider=pgsd.PasswordCommand(["vault", "read"]))
    assert_type(await pool.drain(), int)
    pool.resize(min_size=1, max_size=10)
    pool.pause()
    pool.resume()
    pgsd.PoolConfig(evict_sqlstates=["08", "XX001"])
    stats = pool.stats()
    assert_type(stats.wait_time, pgsd.Histogram)
    assert_type(stats.use_time.quantile(0.99), float)
    assert_type(stats.connect_time.counts, tuple[int, ...])
    connector.add_database("audit", pgsd.DatabaseConfig(host="h"))
    await connector.remove_database("audit")
    await connector.reload(pgsd.load_config("pgsd.toml"))
