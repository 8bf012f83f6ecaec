"""Read replicas: reads go to fresh standbys, writes to the primary, on real servers.

A primary streams to two standbys (`pgsd.testing.start_standby`). The
tests that only read share one such set; those that stop, pause or promote
a standby build their own.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

import pgsd
from pgsd.testing import PostgresServer, StandbyServer, promote, start_standby
from support import (
    REPORT_KEYS,
    check_document_errors,
    run_pgsd,
    server_connections,
    unique_name,
    until,
)

pytestmark = pytest.mark.anyio

_REPLICATION = {"wal_level": "replica", "max_wal_senders": "6", "max_replication_slots": "6"}
#: Small, so that the checks (a fifth of it apart) and the tests are quick.
_MAX_LAG = 1.0
_POOL = {"min_size": 1, "max_size": 3, "acquire_timeout": 5.0, "reconnect_max": 0.2}
#: Polls of 10 ms: 20 s, for a loaded machine.
_POLLS = 2000
_SECRET = "replica-secret-6502"

Cluster = tuple[PostgresServer, StandbyServer, StandbyServer]


def _cluster() -> Iterator[Cluster]:
    with PostgresServer(settings=_REPLICATION) as primary:
        with start_standby(primary) as first, start_standby(primary) as second:
            primary.execute("CREATE TABLE pgsd_replicas (n int)")
            first.wait_caught_up()
            second.wait_caught_up()
            yield primary, first, second


@pytest.fixture(scope="module")
def shared() -> Iterator[Cluster]:
    """A primary and two standbys that the tests using it leave as they found them."""
    yield from _cluster()


@pytest.fixture
def own() -> Iterator[Cluster]:
    """A primary and two standbys for one test to break."""
    yield from _cluster()


def replicated(cluster: Cluster, **options: Any) -> pgsd.DatabaseConfig:
    primary, first, second = cluster
    options.setdefault("max_replica_lag", _MAX_LAG)
    return pgsd.DatabaseConfig(
        host=primary.host,
        port=primary.port,
        dbname="postgres",
        user=primary.superuser,
        application_name=unique_name(),
        connect_timeout=2,
        # With a password (which the trust of these servers never asks for)
        # that no log line, error, repr or statistic may show.
        replicas=[
            f"host={first.host} port={first.port} password={_SECRET}",
            f"host={second.host} port={second.port} password={_SECRET}",
        ],
        **options,
    )


@asynccontextmanager
async def open_replicated(config: pgsd.DatabaseConfig) -> AsyncIterator[pgsd.ConnectionPool]:
    async with pgsd.ConnectionPool(config, pgsd.PoolConfig(**_POOL)) as pool:
        yield pool
    assert pool.stats().size == 0
    assert all(replica.size == 0 for replica in pool.stats().replicas)


@asynccontextmanager
async def fresh(cluster: Cluster, **options: Any) -> AsyncIterator[pgsd.ConnectionPool]:
    """An open pool over the cluster, once both of its replicas were found fresh."""
    async with open_replicated(replicated(cluster, **options)) as pool:
        with anyio.fail_after(30):
            await until(lambda: states(pool) == ["fresh", "fresh"], _POLLS)
        yield pool


def connector_config(cluster: Cluster) -> pgsd.ConnectorConfig:
    """A connector's config with the cluster as its database ``app``."""
    return pgsd.ConnectorConfig(
        databases={"app": replicated(cluster)}, pool=pgsd.PoolConfig(**_POOL)
    )


def states(pool: pgsd.ConnectionPool) -> list[str | None]:
    return [replica.replica_state for replica in pool.stats().replicas]


async def read_ports(pool: pgsd.ConnectionPool, reads: int, tasks: int = 10) -> Counter[int]:
    """The server port of each of *reads* reads asking for a replica, from *tasks* tasks."""
    ports: Counter[int] = Counter()
    left = reads

    async def reader() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async with pool.connection(read_only=True) as conn:
                cur = await conn.execute("SELECT inet_server_port()")
                row = await cur.fetchone()
                assert row is not None
                ports[row[0]] += 1

    async with anyio.create_task_group() as tg:
        for _ in range(tasks):
            tg.start_soon(reader)
    return ports


@asynccontextmanager
async def writing(pool: pgsd.ConnectionPool) -> AsyncIterator[None]:
    """Keep the primary writing (one insert every 10 ms, at most 6000) while inside."""

    async def write() -> None:
        for n in range(6000):
            await pool.execute("INSERT INTO pgsd_replicas VALUES (%s)", [n])
            await anyio.sleep(0.01)

    async with anyio.create_task_group() as tg:
        tg.start_soon(write)
        yield
        tg.cancel_scope.cancel()


# -- routing -------------------------------------------------------------------------


async def test_reads_spread_over_the_fresh_replicas_and_writes_go_to_the_primary(
    shared: Cluster,
) -> None:
    primary, first, second = shared
    async with open_replicated(replicated(shared)) as pool:
        with anyio.fail_after(30):
            ports = await read_ports(pool, 60)
            assert set(ports) == {first.port, second.port}
            assert min(ports.values()) >= 10  # spread, not all on one
            async with pool.connection() as conn:
                cur = await conn.execute("SELECT inet_server_port(), pg_is_in_recovery()")
                assert await cur.fetchone() == (primary.port, False)
            assert await pool.fetchval("SELECT inet_server_port()") == primary.port
            one_shot = {
                await pool.fetchval("SELECT inet_server_port()", read_only=True) for _ in range(20)
            }
            assert one_shot <= {first.port, second.port}
            assert await pool.fetchval("SELECT pg_is_in_recovery()", read_only=True) is True


async def test_stats_show_each_replica_with_its_role_lag_and_state(shared: Cluster) -> None:
    async with fresh(shared) as pool:
        stats = pool.stats()
        assert stats.role == "primary"
        assert stats.lag_seconds is None
        assert [replica.role for replica in stats.replicas] == ["replica", "replica"]
        for replica in stats.replicas:
            assert replica.lag_seconds is not None
            assert 0 <= replica.lag_seconds <= _MAX_LAG
            assert replica.max_size == _POOL["max_size"]
        assert [replica.name for replica in stats.replicas] == [
            f"postgres replica {server.host}:{server.port}" for server in shared[1:]
        ]


async def test_an_idle_primary_does_not_make_its_replicas_look_stale(shared: Cluster) -> None:
    async with fresh(shared) as pool:
        with anyio.fail_after(30):
            # Nothing is written for several times max_replica_lag: the
            # standbys' last replayed transaction ages, their lag does not.
            start = anyio.current_time()
            await until(lambda: anyio.current_time() - start > 3 * _MAX_LAG, _POLLS)
            assert states(pool) == ["fresh", "fresh"]
            ports = await read_ports(pool, 20)
        assert set(ports) <= {shared[1].port, shared[2].port}


async def test_a_replica_whose_replay_is_paused_gets_no_reads_until_it_catches_up(
    shared: Cluster,
) -> None:
    _, first, second = shared
    async with fresh(shared) as pool:
        with anyio.fail_after(60):
            first.execute("SELECT pg_wal_replay_pause()")
            try:
                async with writing(pool):
                    await until(lambda: states(pool)[0] == "lagging", _POLLS)
                    lag = pool.stats().replicas[0].lag_seconds
                    assert lag is not None
                    assert lag > _MAX_LAG
                    ports = await read_ports(pool, 30)
                    assert set(ports) == {second.port}
            finally:
                first.execute("SELECT pg_wal_replay_resume()")
            await until(lambda: states(pool) == ["fresh", "fresh"], _POLLS)
            ports = await read_ports(pool, 60)
            assert set(ports) == {first.port, second.port}


# -- faults ----------------------------------------------------------------------------


async def test_a_stopped_replica_is_passed_over_and_no_reader_sees_an_error_after(
    own: Cluster,
) -> None:
    _, first, second = own
    async with fresh(own) as pool:
        with anyio.fail_after(60):
            first.stop()
            await until(lambda: states(pool)[0] == "down", _POLLS)
            ports = await read_ports(pool, 50)  # an error here fails the test
            assert set(ports) == {second.port}


async def test_with_every_replica_gone_reads_fall_back_to_the_primary_or_raise(
    own: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    primary, first, second = own
    caplog.set_level(logging.DEBUG, logger="pgsd")
    async with (
        open_replicated(replicated(own)) as falls_back,
        open_replicated(replicated(own, replica_fallback="error")) as strict,
    ):
        with anyio.fail_after(60):
            await until(lambda: states(falls_back) == states(strict) == ["fresh"] * 2, _POLLS)
            first.stop()
            second.stop()
            await until(lambda: states(falls_back) == states(strict) == ["down"] * 2, _POLLS)
            ports = await read_ports(falls_back, 20)
            assert set(ports) == {primary.port}
            with pytest.raises(pgsd.NoReplicaAvailable) as raised:
                async with strict.connection(read_only=True):
                    pass
            with pytest.raises(pgsd.NoReplicaAvailable):
                await strict.fetchval("SELECT 1", read_only=True)
    message = str(raised.value)
    assert f"{first.host}:{first.port}" in message
    assert f"{second.host}:{second.port}" in message
    shown = [message, repr(falls_back.config), repr(falls_back.stats()), *caplog.messages]
    assert not [text for text in shown if _SECRET in text]
    fallbacks = [r for r in caplog.records if "they go to the primary" in r.getMessage()]
    assert len(fallbacks) == 1  # logged once, not per read


async def test_a_promoted_replica_is_no_longer_used_as_one(own: Cluster) -> None:
    _, first, second = own
    async with fresh(own) as pool:
        with anyio.fail_after(60):
            promote(second)
            await until(lambda: states(pool)[1] == "promoted", _POLLS)
            ports = await read_ports(pool, 30)
            assert set(ports) == {first.port}


async def test_a_replica_cut_off_from_its_primary_is_noticed_and_goes_stale_on_writes(
    own: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    _, first, second = own
    caplog.set_level(logging.INFO, logger="pgsd.pool")
    async with fresh(own) as pool:
        with anyio.fail_after(60):
            # The standby's replication connection now goes nowhere: the
            # primary no longer lists it among those it streams to.
            [(conninfo,)] = first.execute("SHOW primary_conninfo")
            first.execute("ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port=1'")
            first.execute("SELECT pg_reload_conf()")
            cut_off = f"replica {pool.stats().replicas[0].name!r} of 'postgres' receives no WAL"
            await until(lambda: any(cut_off in r.getMessage() for r in caplog.records), _POLLS)
            async with writing(pool):
                await until(lambda: states(pool)[0] == "lagging", _POLLS)
                ports = await read_ports(pool, 20)
            assert set(ports) == {second.port}
            quoted = conninfo.replace("'", "''")  # ALTER SYSTEM takes no parameters
            first.execute(f"ALTER SYSTEM SET primary_conninfo = '{quoted}'")
            first.execute("SELECT pg_reload_conf()")
            await until(lambda: states(pool) == ["fresh", "fresh"], _POLLS)
    again = [r for r in caplog.records if "receives WAL again" in r.getMessage()]
    assert len(again) == 1


async def test_under_load_no_server_holds_more_than_its_pools_max_size(shared: Cluster) -> None:
    config = replicated(shared)
    name = config.application_name
    peaks: Counter[int] = Counter()
    async with open_replicated(config) as pool:
        with anyio.fail_after(60):
            await until(lambda: states(pool) == ["fresh", "fresh"], _POLLS)
            done = anyio.Event()

            async def watch() -> None:
                while not done.is_set():
                    for server in shared:
                        count = await server_connections(server, name)
                        peaks[server.port] = max(peaks[server.port], count)
                    await anyio.sleep(0.005)

            async def mixed(n: int) -> None:
                for i in range(20):
                    if (n + i) % 4 == 0:
                        await pool.execute("INSERT INTO pgsd_replicas VALUES (%s)", [n])
                    elif (n + i) % 2:
                        await pool.fetchval("SELECT count(*) FROM pg_class", read_only=True)
                    else:
                        async with pool.connection(read_only=True) as conn:
                            await conn.execute("SELECT pg_sleep(0.001)")

            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                async with anyio.create_task_group() as load:
                    for n in range(40):
                        load.start_soon(mixed, n)
                done.set()
    assert set(peaks) == {server.port for server in shared}
    assert all(0 < peak <= _POOL["max_size"] for peak in peaks.values()), peaks


# -- the connector ---------------------------------------------------------------------


async def test_the_connector_routes_reads_by_intent(shared: Cluster) -> None:
    primary, first, second = shared
    async with pgsd.DatabaseConnector(connector_config(shared)) as connector:
        with anyio.fail_after(30):
            async with connector.get_connection("app", read_only=True) as conn:
                cur = await conn.execute("SELECT inet_server_port()")
                row = await cur.fetchone()
                assert row is not None
                assert row[0] in (first.port, second.port)
            async with connector.get_connection("app") as conn:
                cur = await conn.execute("SELECT inet_server_port()")
                assert await cur.fetchone() == (primary.port,)
            value = await connector.fetchval("app", "SELECT pg_is_in_recovery()", read_only=True)
            assert value is True
            assert await connector.fetchval("app", "SELECT pg_is_in_recovery()") is False
        replicas = connector.stats()["app"].replicas
        assert [replica.role for replica in replicas] == ["replica", "replica"]


async def test_read_only_on_a_database_without_replicas_uses_its_own_pool(
    shared: Cluster,
) -> None:
    primary = shared[0]
    config = pgsd.DatabaseConfig.from_dsn(primary.dsn(), application_name=unique_name())
    async with pgsd.ConnectionPool(config, pgsd.PoolConfig(**_POOL)) as pool:
        with anyio.fail_after(30):
            async with pool.connection(read_only=True) as conn:
                cur = await conn.execute("SELECT inet_server_port()")
                assert await cur.fetchone() == (primary.port,)
            assert await pool.fetchval("SELECT 1", read_only=True) == 1
        assert pool.stats().replicas == ()


# -- reports ---------------------------------------------------------------------------


async def test_verify_connection_reports_the_primary_and_each_replica(shared: Cluster) -> None:
    primary, first, second = shared
    async with pgsd.DatabaseConnector(connector_config(shared)) as connector:
        with anyio.fail_after(30):
            report = await connector.verify_connection("app")
    assert report.ok, report.error
    assert (report.role, report.port, report.lag_seconds) == ("primary", primary.port, None)
    assert [(r.role, r.port, r.replica_state, r.ok) for r in report.replicas] == [
        ("replica", first.port, "fresh", True),
        ("replica", second.port, "fresh", True),
    ]
    for replica in report.replicas:
        assert replica.lag_seconds is not None
        assert 0 <= replica.lag_seconds <= _MAX_LAG
        assert replica.version == report.version
    document = report.to_dict()
    assert set(document) == REPORT_KEYS
    assert [set(r) for r in document["replicas"]] == [set(REPORT_KEYS)] * 2
    assert document["replicas"][0]["replica_state"] == "fresh"


async def test_a_report_names_the_replica_that_is_down(own: Cluster) -> None:
    _, first, second = own
    async with pgsd.DatabaseConnector(connector_config(own)) as connector:
        with anyio.fail_after(60):
            pool = connector.pool("app")
            await until(lambda: states(pool) == ["fresh", "fresh"], _POLLS)
            first.stop()
            await until(lambda: states(pool)[0] == "down", _POLLS)
            report = await connector.verify_connection("app", timeout=3)
    assert not report.ok
    down, up = report.replicas
    assert (down.ok, down.replica_state, up.ok, up.port) == (False, "down", True, second.port)
    assert down.error is not None
    assert report.error is not None
    assert f"replica 'app replica {first.host}:{first.port}'" in report.error


def test_pgsd_check_shows_every_replica_with_its_lag(shared: Cluster, tmp_path: Path) -> None:
    primary, first, second = shared
    path = tmp_path / "pgsd.toml"
    path.write_text(
        f"""
[databases.app]
host = "{primary.host}"
port = {primary.port}
dbname = "postgres"
user = "{primary.superuser}"
replicas = ["host={first.host} port={first.port}", "host={second.host} port={second.port}"]
max_replica_lag = 5
"""
    )
    result = run_pgsd("check", "--json", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(result.stdout)
    assert check_document_errors(document) == []
    [database] = document["databases"]
    assert [r["port"] for r in database["replicas"]] == [first.port, second.port]
    assert {r["replica_state"] for r in database["replicas"]} == {"fresh"}
    table = run_pgsd("check", "--config", str(path), cwd=tmp_path)
    assert table.returncode == 0, table.stdout + table.stderr
    for server in (first, second):
        line = next(
            x for x in table.stdout.splitlines() if f"replica {server.host}:{server.port}" in x
        )
        assert "fresh, lag" in line
        assert f"{server.host}:{server.port}" in line


# -- the lag, as pure logic ------------------------------------------------------------------


def test_the_lag_is_the_age_of_the_newest_sample_a_standby_has_replayed() -> None:
    config = pgsd.DatabaseConfig(host="db1", replicas=["host=db2"], max_replica_lag=5)
    replicas = pgsd.ConnectionPool(config)._replicas
    assert replicas is not None
    assert replicas._lag(100.0, 500) is None  # no sample of the primary yet
    replicas._samples.extend([(90.0, 100), (95.0, 200), (99.0, 300)])
    assert replicas._lag(100.0, 300) == 1.0  # has everything written by 99.0
    assert replicas._lag(100.0, 250) == 5.0  # has what was written by 95.0, not by 99.0
    assert replicas._lag(100.0, 10_000) == 1.0  # ahead of the newest sample: as fresh as it
    assert replicas._lag(100.0, 50) == 10.0  # behind every sample that covers 10 s: >= 10 s
    replicas._samples.clear()
    replicas._samples.append((99.0, 300))
    # Behind the only sample, taken 1 s ago: how far behind is not known yet.
    assert replicas._lag(100.0, 299) == -1.0
