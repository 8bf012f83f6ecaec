"""Failover: a pool over a primary and its streaming standby follows the primary.

The pool's database lists both servers, primary first, with
``target_session_attrs=read-write``: libpq skips whichever is not writable.
Each test builds its own pair, since a failover cannot be undone.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import anyio
import psycopg
import pytest

import pgsd
from pgsd.testing import PostgresServer, StandbyServer, promote, start_standby
from support import assert_invariants, server_connections, unique_name

pytestmark = pytest.mark.anyio

#: What streaming replication needs on the primary (PostgreSQL's defaults
#: since 10, spelled out).
_REPLICATION = {"wal_level": "replica", "max_wal_senders": "4", "max_replication_slots": "4"}
_MAX_SIZE = 3
_POOL = {
    "max_size": _MAX_SIZE,
    "acquire_timeout": 5.0,
    "reconnect_initial": 0.05,
    "reconnect_max": 0.2,
}
#: A scenario's bound: a promotion and a fast shutdown take well under a
#: second here, the rest is connects and queries on loopback; the margin is
#: for a loaded machine.
_SCENARIO_TIMEOUT = 20
_INSERT = "INSERT INTO pgsd_failover (n, port) VALUES (%s, inet_server_port())"


@pytest.fixture
def servers() -> Iterator[tuple[PostgresServer, StandbyServer]]:
    """A primary and a standby streaming from it; a table made on the primary, replayed."""
    with PostgresServer(settings=_REPLICATION) as primary, start_standby(primary) as standby:
        primary.execute("CREATE TABLE pgsd_failover (n int, port int)")
        standby.wait_caught_up()
        assert standby.execute("SELECT to_regclass('pgsd_failover') IS NOT NULL") == [(True,)]
        yield primary, standby


def failover_config(primary: PostgresServer, standby: PostgresServer) -> pgsd.DatabaseConfig:
    return pgsd.DatabaseConfig(
        host=f"{primary.host},{standby.host}",
        port=f"{primary.port},{standby.port}",
        dbname="postgres",
        user=primary.superuser,
        target_session_attrs="read-write",
        connect_timeout=2,
        application_name=unique_name(),
    )


async def where(conn: pgsd.Connection) -> tuple[int, bool]:
    """The port of the server a connection is on, and whether that server is a standby."""
    cur = await conn.execute("SELECT inet_server_port(), pg_is_in_recovery()")
    row = await cur.fetchone()
    assert row is not None
    assert conn.info.port == row[0]
    return int(row[0]), bool(row[1])


async def wait_for_connections(server: PostgresServer, application_name: str, count: int) -> None:
    """Backends exit just after their client closes: poll, bounded in count."""
    for _ in range(300):
        if await server_connections(server, application_name) == count:
            return
    raise AssertionError(f"{application_name} did not reach {count} connections on {server}")


async def rows_written_on(server: PostgresServer) -> int:
    async with await pgsd.connect(server.dsn()) as observer:
        cur = await observer.execute(
            "SELECT count(*) FROM pgsd_failover WHERE port = %s", [server.port]
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def make_read_only(server: PostgresServer) -> None:
    """What a demoted primary looks like to its clients: every session read-only."""
    server.execute("ALTER SYSTEM SET default_transaction_read_only = on")
    server.execute("SELECT pg_reload_conf()")
    # The reload is a signal: poll until new sessions see it.
    for _ in range(1000):
        async with await pgsd.connect(server.dsn()) as observer:
            cur = await observer.execute("SHOW default_transaction_read_only")
            if await cur.fetchone() == ("on",):
                return
    raise AssertionError(f"{server} did not become read-only")


class ConnectionPeaks:
    """Samples, on each watched server, how many backends the pool has there.

    Watch a server only while the count is exact: a backend whose client
    has closed shows for a moment after, and so does one that libpq
    refused as read-only. Stop watching a server before stopping it.
    """

    def __init__(self, application_name: str, servers: Iterable[PostgresServer]) -> None:
        self.application_name = application_name
        self._watched = {server.port: server for server in servers}
        self.peaks = dict.fromkeys(self._watched, 0)
        self.rounds = 0

    def unwatch(self, server: PostgresServer) -> None:
        self._watched.pop(server.port, None)

    async def run(self, done: anyio.Event) -> None:
        for _ in range(10_000):
            if done.is_set():
                return
            for port, server in list(self._watched.items()):
                try:
                    count = await server_connections(server, self.application_name)
                except (pgsd.PgsdError, psycopg.Error):
                    if port in self._watched:
                        raise
                    continue  # stopped while sampled, after it was unwatched
                self.peaks[port] = max(self.peaks[port], count)
            self.rounds += 1


@contextlib.asynccontextmanager
async def pool_with_peaks(
    config: pgsd.DatabaseConfig, servers: Iterable[PostgresServer], **pool_options: Any
) -> AsyncIterator[tuple[pgsd.ConnectionPool, ConnectionPeaks]]:
    """A pool, and its connection counts sampled on the servers while it is open."""
    peaks = ConnectionPeaks(config.application_name or "", servers)
    done = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(peaks.run, done)
        try:
            async with pgsd.ConnectionPool(config, pgsd.PoolConfig(**pool_options)) as pool:
                yield pool, peaks
                assert_invariants(pool.stats())
        finally:
            done.set()
    assert pool.stats().size == 0
    assert peaks.rounds >= 1
    assert max(peaks.peaks.values()) <= _MAX_SIZE


async def write_with_every_connection(pool: pgsd.ConnectionPool) -> list[tuple[int, bool] | str]:
    """Borrow all ``max_size`` connections at once and write through each.

    Returns, per connection, where the write landed, or the SQLSTATE that
    refused it; a refusal leaves its ``async with`` block, so the pool sees it.
    """
    results: list[tuple[int, bool] | str] = []
    all_borrowed = anyio.Event()

    async def borrower() -> None:
        try:
            async with pool.connection() as conn:
                if pool.stats().in_use == _MAX_SIZE:
                    all_borrowed.set()
                # Holding on until every connection is out makes them distinct.
                await all_borrowed.wait()
                await conn.execute(_INSERT, [len(results)])
                results.append(await where(conn))
        except psycopg.errors.ReadOnlySqlTransaction as ex:
            results.append(str(ex.sqlstate))

    async with anyio.create_task_group() as tg:
        for _ in range(_MAX_SIZE):
            tg.start_soon(borrower)
    return results


async def test_pool_writes_to_the_promoted_standby_after_the_primary_stops(
    servers: tuple[PostgresServer, StandbyServer],
) -> None:
    primary, standby = servers
    config = failover_config(primary, standby)
    with anyio.fail_after(_SCENARIO_TIMEOUT):
        async with pool_with_peaks(config, servers, min_size=2, **_POOL) as (pool, peaks):
            await pool.wait_ready()
            async with pool.connection() as conn:
                assert await where(conn) == (primary.port, False)
            assert await server_connections(primary, config.application_name or "") == 2

            peaks.unwatch(primary)
            with pytest.raises(psycopg.OperationalError):
                async with pool.connection() as held:
                    await anyio.to_thread.run_sync(promote, standby)
                    await anyio.to_thread.run_sync(primary.stop)
                    # The fast shutdown sent this connection 57P01 and closed it.
                    await held.execute(_INSERT, [0])
            assert pool.stats().connections_lost >= 1

            for n in range(1, 6):
                async with pool.connection() as conn:
                    await conn.execute(_INSERT, [n])
                    assert await where(conn) == (standby.port, False)
            await pool.wait_ready()
            stats = pool.stats()
            # The borrowed connection, and the idle one, found dead by a ping.
            assert stats.connections_lost == 2
            assert stats.state == "up"
            assert stats.size == 2
            assert_invariants(stats)
            await wait_for_connections(standby, config.application_name or "", 2)
        assert await rows_written_on(standby) == 5


async def test_connections_to_a_demoted_primary_are_evicted_on_read_only_refusals(
    servers: tuple[PostgresServer, StandbyServer],
) -> None:
    primary, standby = servers
    config = failover_config(primary, standby)
    name = config.application_name or ""
    with anyio.fail_after(_SCENARIO_TIMEOUT):
        async with pool_with_peaks(config, servers, min_size=_MAX_SIZE, **_POOL) as (pool, peaks):
            await pool.wait_ready()
            assert await server_connections(primary, name) == _MAX_SIZE

            # Two primaries for a moment, then the old one turns read-only
            # and keeps running: a split brain resolved by demotion.
            peaks.unwatch(primary)
            await anyio.to_thread.run_sync(promote, standby)
            await make_read_only(primary)

            # Every pooled connection is on the old primary: each refuses once.
            refusals = await write_with_every_connection(pool)
            assert refusals == ["25006"] * _MAX_SIZE
            assert pool.stats().connections_lost == _MAX_SIZE

            # Their replacements skipped the read-only server.
            writes = await write_with_every_connection(pool)
            assert writes == [(standby.port, False)] * _MAX_SIZE
            stats = pool.stats()
            assert stats.connections_lost == _MAX_SIZE
            assert stats.errors == 0  # libpq found the primary on each attempt
            assert stats.state == "up"
            assert_invariants(stats)
            await wait_for_connections(primary, name, 0)
            await wait_for_connections(standby, name, _MAX_SIZE)
        assert await rows_written_on(standby) == _MAX_SIZE


async def test_pool_waits_out_a_crashed_primary_until_the_standby_is_promoted(
    servers: tuple[PostgresServer, StandbyServer],
) -> None:
    primary, standby = servers
    config = failover_config(primary, standby)
    events: list[str] = []
    options = pgsd.PoolConfig(min_size=2, **_POOL)
    with anyio.fail_after(_SCENARIO_TIMEOUT):
        async with pgsd.ConnectionPool(
            config,
            options,
            on_down=lambda name, error: events.append("down"),
            on_recovered=lambda name, error: events.append("recovered"),
        ) as pool:
            await pool.wait_ready()
            primary.kill()
            # No primary at all: the old one is gone, the standby is read-only.
            with pytest.raises(pgsd.PoolTimeout) as info:
                # A backend of the crashed primary may answer a ping before it
                # notices its postmaster died: the borrower then gets 57P01
                # and the connection is evicted. There are two such at most.
                for _ in range(3):
                    with contextlib.suppress(psycopg.OperationalError):
                        async with pool.connection(timeout=1.0) as conn:
                            await conn.execute(_INSERT, [0])
            assert "down" in str(info.value)
            assert pool.state == "down"

            await anyio.to_thread.run_sync(promote, standby)
            await pool.wait_ready(timeout=5)
            for n in range(1, 4):
                async with pool.connection() as conn:
                    await conn.execute(_INSERT, [n])
                    assert await where(conn) == (standby.port, False)
            await pool.wait_ready()
            stats = pool.stats()
            assert stats.connections_lost == 2
            assert stats.reconnect_attempts >= 1
            assert stats.state == "up"
            assert stats.size == 2
            assert_invariants(stats)
            # Refused attempts made while the standby was read-only are gone.
            await wait_for_connections(standby, config.application_name or "", 2)
        assert events == ["down", "recovered"]
        assert await rows_written_on(standby) == 3


def test_a_standby_of_a_primary_without_replication_is_refused_with_the_reason() -> None:
    with PostgresServer(settings={"wal_level": "minimal", "max_wal_senders": "0"}) as primary:
        with pytest.raises(RuntimeError, match="wal_level = minimal") as info:
            start_standby(primary)
        assert "max_wal_senders = 0" in str(info.value)
