"""Databases added, removed and changed while a connector runs, against a real server.

On asyncio and trio: a database added at run time is usable at once; one
removed closes its pool (its waiters get `PoolClosed`, its connections
leave the server); `reload` keeps an unchanged database's pool and its
connections, resizes one whose sizes alone changed, and replaces the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

import pgsd
from pgsd.testing import PostgresServer
from support import db_config, server_connections, until

pytestmark = pytest.mark.anyio

#: A generous bound on what should end at once, for a loaded CI machine.
BOUND = 30


def connector_config(**databases: pgsd.DatabaseConfig) -> pgsd.ConnectorConfig:
    return pgsd.ConnectorConfig(databases=databases, pool=pgsd.PoolConfig(min_size=1))


async def test_a_database_added_at_run_time_is_usable_at_once(pg_server: PostgresServer) -> None:
    config = connector_config(first=db_config(pg_server))
    added = db_config(pg_server)
    async with pgsd.DatabaseConnector(config) as connector:
        connector.add_database("audit", added)
        with anyio.fail_after(BOUND):
            async with connector.get_connection("audit") as conn:
                cur = await conn.execute("SELECT 1")
                assert await cur.fetchone() == (1,)
            assert await connector.fetchval("audit", "SELECT 2") == 2
            reports = await connector.verify_all()
        assert set(reports) == {"first", "audit"}
        assert reports["audit"].ok
        assert "audit" in connector.stats()
        assert connector.config.databases["audit"].name == "audit"
        with pytest.raises(pgsd.ConfigError):
            connector.add_database("audit", added)
    with pytest.raises(pgsd.PoolClosed):
        connector.add_database("later", added)


async def test_removing_a_database_fails_its_waiters_and_closes_its_connections(
    pg_server: PostgresServer,
) -> None:
    doomed = db_config(pg_server, pool=pgsd.PoolConfig(min_size=1, max_size=1, close_timeout=5))
    config = connector_config(kept=db_config(pg_server), doomed=doomed)
    outcomes: list[Any] = []
    async with pgsd.DatabaseConnector(config) as connector:
        release = anyio.Event()

        async def holder() -> None:
            async with connector.get_connection("doomed"):
                await release.wait()

        async def waiter() -> None:
            try:
                async with connector.get_connection("doomed"):
                    outcomes.append("lent")
            except pgsd.PoolClosed as error:
                outcomes.append(error)

        with anyio.fail_after(BOUND):
            async with anyio.create_task_group() as tg:
                tg.start_soon(holder)
                await until(lambda: connector.stats()["doomed"].in_use == 1)
                tg.start_soon(waiter)
                await until(lambda: connector.stats()["doomed"].waiting == 1)
                tg.start_soon(connector.remove_database, "doomed")
                await until(lambda: bool(outcomes))
                release.set()
        assert isinstance(outcomes[0], pgsd.PoolClosed)
        with pytest.raises(pgsd.ConfigError):
            connector.pool("doomed")
        assert list(connector.stats()) == ["kept"]
        assert await server_connections(pg_server, doomed.application_name) == 0
        assert await connector.fetchval("kept", "SELECT 1") == 1


async def test_reload_keeps_resizes_replaces_adds_and_removes(pg_server: PostgresServer) -> None:
    same, resized, changed, gone = (db_config(pg_server) for _ in range(4))
    sized = pgsd.PoolConfig(min_size=1, max_size=2)
    config = connector_config(
        same=same, resized=resized.replace(pool=sized), changed=changed, gone=gone
    )
    async with pgsd.DatabaseConnector(config) as connector:
        with anyio.fail_after(BOUND):
            pools = {name: connector.pool(name) for name in config.databases}
            pid = await connector.fetchval("same", "SELECT pg_backend_pid()")
            new_config = connector_config(
                same=same,
                resized=resized.replace(pool=sized.replace(max_size=4)),
                changed=changed.replace(connect_timeout=20),
                new=db_config(pg_server),
            )
            await connector.reload(new_config)
            assert connector.pool("same") is pools["same"]
            assert await connector.fetchval("same", "SELECT pg_backend_pid()") == pid
            assert connector.pool("resized") is pools["resized"]
            assert connector.pool("resized").stats().max_size == 4
            assert connector.pool("changed") is not pools["changed"]
            assert pools["changed"].stats().state == "closed"
            assert connector.pool("changed").config.connect_timeout == 20
            assert await connector.fetchval("changed", "SELECT 1") == 1
            assert await connector.fetchval("new", "SELECT 1") == 1
            with pytest.raises(pgsd.ConfigError):
                connector.pool("gone")
            assert pools["gone"].stats().state == "closed"
            assert set(connector.config.databases) == {"same", "resized", "changed", "new"}


async def test_reload_takes_load_config_output(pg_server: PostgresServer, tmp_path: Path) -> None:
    def write(path: Path, names: list[str]) -> pgsd.ConnectorConfig:
        tables = "".join(
            f'[databases.{name}]\ndsn = "{pg_server.dsn()}"\napplication_name = "rt_{name}"\n'
            for name in names
        )
        path.write_text("[pool]\nmin_size = 1\n" + tables)
        return pgsd.load_config(path)

    first = write(tmp_path / "a.toml", ["one", "two"])
    async with pgsd.DatabaseConnector(first) as connector:
        one = connector.pool("one")
        with anyio.fail_after(BOUND):
            await connector.reload(write(tmp_path / "b.toml", ["one", "three"]))
            assert connector.pool("one") is one  # equal configs from two loads: kept
            assert await connector.fetchval("three", "SELECT 3") == 3
        assert list(connector.config.databases) == ["one", "three"]


async def test_reload_refuses_what_is_not_a_connector_config(pg_server: PostgresServer) -> None:
    async with pgsd.DatabaseConnector(connector_config(a=db_config(pg_server))) as connector:
        with pytest.raises(TypeError):
            await connector.reload({"a": db_config(pg_server)})  # type: ignore[arg-type]
    with pytest.raises(pgsd.PoolClosed):
        await connector.reload(connector_config(a=db_config(pg_server)))
