"""LISTEN/NOTIFY through `pool.listen` and `connector.listen`, on real servers, both backends."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import pgsd
from pgsd.testing import FaultProxy, PgBouncer, PostgresServer
from support import db_config, server_connections, terminate_all, until

pytestmark = pytest.mark.anyio

#: Every scenario's bound: loopback round trips and a restart, with room for a loaded machine.
BOUND = 30
_POOL = {"min_size": 1, "max_size": 2, "reconnect_initial": 0.05, "reconnect_max": 0.2}


@asynccontextmanager
async def open_pool(config: pgsd.DatabaseConfig) -> AsyncIterator[pgsd.ConnectionPool]:
    async with pgsd.ConnectionPool(config, pgsd.PoolConfig(**_POOL)) as pool:
        yield pool


async def settle(server: PostgresServer, application_name: str, count: int) -> None:
    """Wait (at most 10 s) until the server holds *count* of these connections."""
    for _ in range(1000):
        if await server_connections(server, application_name) == count:
            return
        await anyio.sleep(0.01)
    raise AssertionError(f"the server does not hold {count} connections of {application_name}")


async def take(notifications: Any, count: int) -> list[Any]:
    """The next *count* items of the stream."""
    items = []
    async for item in notifications:
        items.append(item)
        if len(items) == count:
            break
    return items


def payloads(items: list[Any]) -> list[str]:
    return [item.payload for item in items if isinstance(item, pgsd.Notification)]


# -- delivery ----------------------------------------------------------------------------


async def test_notifications_arrive_in_order_with_their_channel_payload_and_pid(
    pg_server: PostgresServer,
) -> None:
    async with open_pool(db_config(pg_server)) as pool:
        with anyio.fail_after(BOUND):
            async with pool.listen("jobs", "cache") as notifications:
                texts = ["it's", 'say "hi"', "naïve — ünïcödé ✓", "", "x" * 7000]
                async with pool.connection() as conn:
                    cur = await conn.execute("SELECT pg_backend_pid()")
                    [(sender,)] = await cur.fetchall()
                    for text in texts:
                        await conn.execute("SELECT pg_notify('jobs', %s)", [text])
                    await conn.execute("SELECT pg_notify('cache', 'users:42')")
                    await conn.execute("SELECT pg_notify('elsewhere', 'not for us')")
                    await conn.execute("SELECT pg_notify('jobs', 'last')")
                items = await take(notifications, len(texts) + 2)
    assert [(n.channel, n.payload) for n in items] == [
        *(("jobs", text) for text in texts),
        ("cache", "users:42"),
        ("jobs", "last"),
    ]
    assert {n.pid for n in items} == {sender}


@pytest.mark.parametrize(
    "channel",
    [
        'quote"d',
        "it's",
        "semi; colon",
        "UPPER and lower",
        "ünïcödé ✓",
        "a" * 63,
        "x) ; DROP TABLE t; --",
    ],
)
async def test_any_channel_name_is_listened_to_as_given(
    pg_server: PostgresServer, channel: str
) -> None:
    async with open_pool(db_config(pg_server)) as pool:
        with anyio.fail_after(BOUND):
            async with pool.listen(channel) as notifications:
                await pool.notify(channel, "hello")
                [item] = await take(notifications, 1)
    assert (item.channel, item.payload) == (channel, "hello")


@pytest.mark.parametrize("channel", ["", "a" * 64, "ü" * 32, "nul\x00byte"])
async def test_a_channel_postgresql_cannot_name_is_refused_at_once(
    pg_server: PostgresServer, channel: str
) -> None:
    async with open_pool(db_config(pg_server)) as pool:
        with pytest.raises(pgsd.ConfigError) as raised:
            pool.listen(channel)
    assert raised.value.key == "channels"


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"max_buffered": 0}, "max_buffered"),
        ({"overflow": "drop"}, "overflow"),
        ({"reconnect_timeout": 0}, "reconnect_timeout"),
    ],
)
async def test_invalid_listen_options_are_refused_naming_them(
    pg_server: PostgresServer, options: dict[str, Any], key: str
) -> None:
    async with open_pool(db_config(pg_server)) as pool:
        with pytest.raises(pgsd.ConfigError) as raised:
            pool.listen("jobs", **options)
    assert raised.value.key == key


async def test_the_listener_has_its_own_connection_outside_max_size(
    pg_server: PostgresServer,
) -> None:
    config = db_config(pg_server)
    async with pgsd.ConnectionPool(config, pgsd.PoolConfig(min_size=1, max_size=1)) as pool:
        with anyio.fail_after(BOUND):
            async with pool.listen("jobs") as notifications:
                async with pool.connection() as conn:  # the pool's one connection
                    await conn.execute("SELECT pg_notify('jobs', 'while lent')")
                    assert await server_connections(pg_server, config.application_name) == 2
                [item] = await take(notifications, 1)
            assert item.payload == "while lent"
            await settle(pg_server, config.application_name, 1)


# -- faults --------------------------------------------------------------------------------


async def test_a_terminated_listener_reconnects_reports_a_gap_and_goes_on(
    pg_server: PostgresServer,
) -> None:
    config = db_config(pg_server)
    async with open_pool(config) as pool:
        with anyio.fail_after(BOUND):
            async with pool.listen("jobs") as notifications:
                await pool.notify("jobs", "before")
                [before] = await take(notifications, 1)
                await terminate_all(pg_server, config.application_name)
                [gap] = await take(notifications, 1)
                assert isinstance(gap, pgsd.ListenGap)
                assert gap.reason == "reconnected"
                assert gap.error
                await pool.notify("jobs", "after")
                [after] = await take(notifications, 1)
    assert (before.payload, after.payload) == ("before", "after")


async def test_a_restarted_server_gives_a_gap_then_delivery_resumes() -> None:
    with PostgresServer() as server:
        async with open_pool(db_config(server)) as pool:
            with anyio.fail_after(BOUND):
                async with pool.listen("jobs", "cache") as notifications:
                    server.restart()
                    [gap] = await take(notifications, 1)
                    assert isinstance(gap, pgsd.ListenGap)
                    await pool.notify("cache", "after the restart")
                    await pool.notify("jobs", "both channels again")
                    items = await take(notifications, 2)
    assert [(n.channel, n.payload) for n in items] == [
        ("cache", "after the restart"),
        ("jobs", "both channels again"),
    ]


async def test_a_network_reset_gives_a_gap_then_delivery_resumes(
    pg_server: PostgresServer,
) -> None:
    async with FaultProxy(pg_server.host, pg_server.port) as proxy:
        config = db_config(pg_server, **proxy.dsn_params())
        async with open_pool(config) as pool:
            with anyio.fail_after(BOUND):
                async with pool.listen("jobs") as notifications:
                    proxy.set_mode("reset")  # every connection gets an RST, on both sides
                    proxy.set_mode("pass")  # and new ones get through again
                    [gap] = await take(notifications, 1)
                    assert isinstance(gap, pgsd.ListenGap)
                    assert gap.reason == "reconnected"
                    await pool.notify("jobs", "after the reset")
                    [item] = await take(notifications, 1)
    assert item.payload == "after the reset"


async def test_a_connection_gone_silent_is_found_by_a_ping_and_replaced(
    pg_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pgsd.listen")
    async with FaultProxy(pg_server.host, pg_server.port) as proxy:
        config = db_config(pg_server, connect_timeout=2, **proxy.dsn_params())
        pool_config = pgsd.PoolConfig(**_POOL, health_check_interval=0.5)
        async with pgsd.ConnectionPool(config, pool_config) as pool:
            with anyio.fail_after(BOUND):
                async with pool.listen("jobs") as notifications:
                    # No RST, no FIN: the packets just stop (a NAT, a failover).
                    proxy.set_mode("blackhole")
                    await until(lambda: "lost its connection" in caplog.text, 2000)
                    proxy.set_mode("pass")
                    [gap] = await take(notifications, 1)
                    assert isinstance(gap, pgsd.ListenGap)
                    assert "ping" in (gap.error or "")
                    await pool.notify("jobs", "after the silence")
                    [item] = await take(notifications, 1)
    assert item.payload == "after the silence"


async def test_several_consumers_share_one_listener_and_all_end_with_it(
    pg_server: PostgresServer,
) -> None:
    got: list[list[str]] = [[], []]
    async with open_pool(db_config(pg_server)) as pool:
        with anyio.fail_after(BOUND):
            async with anyio.create_task_group() as tg:
                async with pool.listen("jobs") as notifications:

                    async def consume(mine: list[str]) -> None:
                        async for item in notifications:
                            mine.append(item.payload)
                            await anyio.lowlevel.checkpoint()

                    for mine in got:
                        tg.start_soon(consume, mine)
                    for n in range(20):
                        await pool.notify("jobs", str(n))
                    await until(lambda: len(got[0]) + len(got[1]) == 20)
                # Leaving the block ends both consumers' iterations.
    assert sorted(got[0] + got[1], key=int) == [str(n) for n in range(20)]


async def test_on_gap_is_called_instead_of_yielding_the_gap(pg_server: PostgresServer) -> None:
    config = db_config(pg_server)
    gaps: list[pgsd.ListenGap] = []
    gap_seen = anyio.Event()
    items: list[Any] = []

    async def on_gap(gap: pgsd.ListenGap) -> None:  # noqa: ASYNC124 (awaited: the test)
        gaps.append(gap)
        gap_seen.set()

    async with open_pool(config) as pool:
        with anyio.fail_after(BOUND):
            async with pool.listen("jobs", on_gap=on_gap) as notifications:
                await terminate_all(pg_server, config.application_name)

                async def consume() -> None:
                    items.extend(await take(notifications, 1))

                async with anyio.create_task_group() as tg:
                    tg.start_soon(consume)
                    await gap_seen.wait()  # reconnected and listening again
                    await pool.notify("jobs", "after")
    assert [type(item) for item in items] == [pgsd.Notification]
    assert items[0].payload == "after"
    assert [gap.reason for gap in gaps] == ["reconnected"]


async def test_a_database_down_past_reconnect_timeout_ends_the_stream_with_an_error() -> None:
    with PostgresServer() as server:
        async with open_pool(db_config(server)) as pool:
            with anyio.fail_after(BOUND):
                async with pool.listen("jobs", reconnect_timeout=1.0) as notifications:
                    server.stop()
                    with pytest.raises(pgsd.ListenError) as raised:
                        async for _ in notifications:
                            pass
    assert "reconnect_timeout" in str(raised.value)
    assert "stayed down" in str(raised.value)


# -- bounded memory ---------------------------------------------------------------------------


async def test_a_flood_into_a_full_buffer_is_dropped_and_reported_as_a_gap(
    pg_server: PostgresServer,
) -> None:
    async with open_pool(db_config(pg_server)) as pool:
        with anyio.fail_after(BOUND):
            async with pool.listen("jobs", max_buffered=10) as notifications:
                await pool.execute(
                    "SELECT pg_notify('jobs', n::text) FROM generate_series(1, 200) AS n"
                )
                await until(lambda: notifications.buffered + notifications.dropped == 200)
                assert notifications.buffered == 10
                items = await take(notifications, 11)
                await pool.notify("jobs", "later")
                [later] = await take(notifications, 1)
    delivered = payloads(items)
    gaps = [item for item in items if isinstance(item, pgsd.ListenGap)]
    assert delivered == [str(n) for n in range(1, 11)]  # the first ten, in order
    assert len(gaps) == 1
    assert gaps[0].reason == "overflow"
    assert gaps[0].dropped == 190
    assert later.payload == "later"


async def test_a_flood_with_overflow_block_delivers_everything_in_order(
    pg_server: PostgresServer,
) -> None:
    async with open_pool(db_config(pg_server)) as pool:
        with anyio.fail_after(BOUND):
            async with pool.listen("jobs", max_buffered=10, overflow="block") as notifications:
                await pool.execute(
                    "SELECT pg_notify('jobs', n::text) FROM generate_series(1, 500) AS n"
                )
                # The reader fills the buffer, then stops reading: nothing dropped.
                await until(lambda: notifications.buffered == 10)
                assert notifications.dropped == 0
                items = await take(notifications, 500)
    assert payloads(items) == [str(n) for n in range(1, 501)]


# -- leaving ------------------------------------------------------------------------------------


async def test_cancelling_the_consumer_closes_its_connection_promptly(
    pg_server: PostgresServer,
) -> None:
    config = db_config(pg_server)
    async with open_pool(config) as pool:
        with anyio.fail_after(BOUND):
            with anyio.move_on_after(0.2) as scope:
                async with pool.listen("jobs") as notifications:
                    async for _ in notifications:
                        pass
            assert scope.cancelled_caught
            await settle(pg_server, config.application_name, 1)  # the pool's own is left
            listening = pg_server.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                " AND query ILIKE '%%LISTEN%%' AND state = 'idle'",
                [config.application_name],
            )
            assert listening == [(0,)]


# -- the connector and PgBouncer -------------------------------------------------------------


async def test_the_connector_listens_and_notifies_by_database_name(
    pg_server: PostgresServer,
) -> None:
    config = pgsd.ConnectorConfig(
        databases={"app": db_config(pg_server)}, pool=pgsd.PoolConfig(**_POOL)
    )
    async with pgsd.DatabaseConnector(config) as connector:
        with anyio.fail_after(BOUND):
            async with connector.listen("app", "jobs") as notifications:
                await connector.notify("app", "jobs", "it's ünïcödé")
                [item] = await take(notifications, 1)
    assert (item.channel, item.payload) == ("jobs", "it's ünïcödé")


async def test_behind_pgbouncer_in_session_mode_notifications_arrive(
    pg_server: PostgresServer,
) -> None:
    with PgBouncer(pg_server, pool_mode="session") as bouncer:
        config = pgsd.DatabaseConfig.from_dsn(bouncer.dsn(), application_name="pgsd_listen_session")
        async with open_pool(config) as pool:
            with anyio.fail_after(BOUND):
                async with pool.listen("jobs") as notifications:
                    await pool.notify("jobs", "through the bouncer")
                    [item] = await take(notifications, 1)
    assert item.payload == "through the bouncer"


async def test_behind_pgbouncer_in_transaction_mode_listen_fails_with_the_reason(
    pg_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    with PgBouncer(pg_server, pool_mode="transaction") as bouncer:
        config = pgsd.DatabaseConfig.from_dsn(bouncer.dsn(), application_name="pgsd_listen_tx")
        async with open_pool(config) as pool:
            with anyio.fail_after(BOUND), pytest.raises(pgsd.ListenError) as raised:
                async with pool.listen("jobs"):
                    pass
    assert "transaction or statement mode" in str(raised.value)
