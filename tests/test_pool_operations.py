"""Changing a running pool against a real server: drain, resize, pause and resume.

Each is checked from the server's side too (which backends exist), on
asyncio and trio: a drain replaces every connection without failing a
waiter, a shrink never leaves more than the new ``max_size``, and a paused
pool lends and opens nothing while lent connections carry on.
"""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import psycopg
import pytest

import pgsd
from pgsd.testing import PostgresServer
from support import (
    assert_invariants,
    db_config,
    open_pool,
    server_connections,
    unique_name,
    until,
)

pytestmark = pytest.mark.anyio

#: A generous bound on what should end at once, for a loaded CI machine.
BOUND = 30


async def backend_pids(server: PostgresServer, application_name: str) -> set[int]:
    """The server processes of this application's connections."""
    async with await pgsd.connect(server.dsn()) as observer:
        cur = await observer.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", [application_name]
        )
        return {row[0] for row in await cur.fetchall()}


# -- drain -------------------------------------------------------------------------


async def test_drain_replaces_idle_now_and_lent_on_return(pg_server: PostgresServer) -> None:
    config = db_config(pg_server)
    left: list[int] = []
    async with open_pool(config, min_size=3, max_size=4) as pool:
        await pool.wait_ready()

        async def drain() -> None:
            left.append(await pool.drain())

        with anyio.fail_after(BOUND):
            async with anyio.create_task_group() as tg:
                async with pool.connection() as lent:
                    lent_pid = lent.info.backend_pid
                    before = await backend_pids(pg_server, config.application_name)
                    assert len(before) == 3
                    tg.start_soon(drain)
                    # The idle ones are replaced while the lent one carries on.
                    await until(lambda: pool.stats().connections_closed >= 2)
                    cur = await lent.execute("SELECT pg_backend_pid()")
                    assert await cur.fetchone() == (lent_pid,)
                    assert not left  # the drain waits for the lent one
        assert left == [0]  # returned once the lent one came back, and was closed
        await until(lambda: pool.stats().size >= 3)
        after = await backend_pids(pg_server, config.application_name)
        assert not after & before  # every connection is new
        assert await pool.fetchval("SELECT 1") == 1
        assert_invariants(pool.stats())


async def test_no_waiter_fails_because_of_a_drain(pg_server: PostgresServer) -> None:
    config = db_config(pg_server)
    results: list[Any] = []
    async with open_pool(config, min_size=2, max_size=2) as pool:
        await pool.wait_ready()
        before = await backend_pids(pg_server, config.application_name)

        async def borrower(n: int) -> None:
            async with pool.connection() as conn:
                cur = await conn.execute("SELECT %s::int", [n])
                results.append((await cur.fetchone(), conn.info.backend_pid))

        async def statement(n: int) -> None:
            results.append(((await pool.fetchval("SELECT %s::int", [n]),), None))

        with anyio.fail_after(BOUND):
            async with anyio.create_task_group() as tg:
                for n in range(20):
                    tg.start_soon(borrower if n % 2 else statement, n)
                tg.start_soon(pool.drain)
                for n in range(20, 40):
                    tg.start_soon(borrower if n % 2 else statement, n)
        assert sorted(row[0] for row, _ in results) == list(range(40))
        after = await backend_pids(pg_server, config.application_name)
        assert not after & before
        assert pool.stats().timeouts == 0


async def test_drain_opens_new_connections_with_the_current_password(
    pg_server: PostgresServer,
) -> None:
    role = unique_name("drained")
    pg_server.create_role(role, password="first-one")
    current = ["first-one"]
    try:

        async def provider(config: pgsd.DatabaseConfig) -> str:
            await anyio.lowlevel.checkpoint()
            return current[0]

        config = pgsd.DatabaseConfig(
            host=pg_server.host,
            port=pg_server.port,
            dbname="postgres",
            user=role,
            password_provider=provider,
        )
        async with open_pool(config, min_size=2, max_size=2) as pool:
            await pool.wait_ready()
            pg_server.execute(f"ALTER ROLE \"{role}\" PASSWORD 'second-one'")
            current[0] = "second-one"
            with anyio.fail_after(BOUND):
                assert await pool.drain() == 0
                await pool.wait_ready()
            assert pool.stats().errors == 0
            assert await pool.fetchval("SELECT current_user") == role
    finally:
        pg_server.execute(f'DROP ROLE IF EXISTS "{role}"')


async def test_drain_gives_up_waiting_after_close_timeout(pg_server: PostgresServer) -> None:
    config = db_config(pg_server)
    async with open_pool(config, min_size=1, max_size=2, close_timeout=0.2) as pool:
        async with pool.connection() as held:
            with anyio.fail_after(BOUND):
                assert await pool.drain() == 1  # still lent: closed when it comes back
            cur = await held.execute("SELECT 1")
            assert await cur.fetchone() == (1,)
            closed = pool.stats().connections_closed
        assert pool.stats().connections_closed == closed + 1


# -- resize ------------------------------------------------------------------------


async def test_shrinking_closes_idle_first_and_lent_ones_on_return(
    pg_server: PostgresServer,
) -> None:
    config = db_config(pg_server)
    async with open_pool(config, min_size=4, max_size=4) as pool:
        await pool.wait_ready()
        async with pool.connection(), pool.connection(), pool.connection():
            pool.resize(min_size=1, max_size=2)
            stats = pool.stats()
            assert (stats.size, stats.idle, stats.max_size) == (3, 0, 2)
        stats = pool.stats()
        assert (stats.size, stats.idle) == (2, 2)
        await until(lambda: pool.stats().opening == 0)
        assert await server_connections(pg_server, config.application_name) == 2
        assert pool.pool_config.max_size == 2


async def test_growing_serves_waiters_at_once(pg_server: PostgresServer) -> None:
    config = db_config(pg_server)
    async with open_pool(config, min_size=1, max_size=1) as pool:
        async with pool.connection():
            with anyio.fail_after(BOUND):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(pool.fetchval, "SELECT 1")
                    await until(lambda: pool.stats().waiting == 1)
                    pool.resize(max_size=3)
            # The waiter got a new connection while the only one was lent.
            assert pool.stats().size == 2


async def test_resize_under_load_never_exceeds_the_new_max(pg_server: PostgresServer) -> None:
    config = db_config(pg_server)
    async with open_pool(config, min_size=0, max_size=6) as pool:

        async def borrower() -> None:
            for _ in range(10):
                async with pool.connection() as conn:
                    await conn.execute("SELECT 1")

        with anyio.fail_after(BOUND):
            async with anyio.create_task_group() as tg:
                for _ in range(12):
                    tg.start_soon(borrower)
                await until(lambda: pool.stats().size >= 3)
                pool.resize(max_size=2)
                opened = pool.stats().connections_opened + pool.stats().opening
        stats = pool.stats()
        assert stats.size <= 2
        assert stats.connections_opened <= opened  # none opened past the new bound
        assert await server_connections(pg_server, config.application_name) <= 2


@pytest.mark.parametrize(
    ("sizes", "key"),
    [
        ({"min_size": 5, "max_size": 2}, "min_size"),
        ({"max_size": 0}, "max_size"),
        ({"max_size": "10"}, "max_size"),
    ],
    ids=["min-above-max", "zero", "not-an-int"],
)
async def test_resize_is_validated_like_pool_config(
    pg_server: PostgresServer, sizes: dict[str, Any], key: str
) -> None:
    async with open_pool(db_config(pg_server), min_size=1, max_size=3) as pool:
        with pytest.raises(pgsd.ConfigError) as info:
            pool.resize(**sizes)
        assert info.value.key == key
        assert pool.stats().max_size == 3  # unchanged


# -- pause and resume ----------------------------------------------------------------


async def test_a_paused_pool_lends_and_opens_nothing_and_lent_ones_carry_on(
    pg_server: PostgresServer,
) -> None:
    config = db_config(pg_server)
    async with open_pool(config, min_size=1, max_size=3, acquire_timeout=0.3) as pool:
        await pool.wait_ready()
        async with pool.connection() as lent:
            pool.pause()
            assert pool.stats().state == "paused"
            opened = pool.stats().connections_opened
            with pytest.raises(pgsd.PoolTimeout, match="paused"):
                async with pool.connection():
                    raise AssertionError("lent while paused")
            with pytest.raises(pgsd.PoolTimeout):
                await pool.fetchval("SELECT 1")
            cur = await lent.execute("SELECT 2")
            assert await cur.fetchone() == (2,)
        stats = pool.stats()
        assert stats.connections_opened == opened  # no connection opened while paused
        assert (stats.idle, stats.in_use, stats.state) == (1, 0, "paused")
        pool.resume()
        assert pool.stats().state == "up"
        assert await pool.fetchval("SELECT 3") == 3


async def test_waiters_are_served_in_order_on_resume(pg_server: PostgresServer) -> None:
    order: list[int] = []
    async with open_pool(db_config(pg_server), min_size=1, max_size=1) as pool:
        await pool.wait_ready()
        pool.pause()

        async def borrower(n: int) -> None:
            async with pool.connection():
                order.append(n)

        with anyio.fail_after(BOUND):
            async with anyio.create_task_group() as tg:
                for n in range(5):
                    tg.start_soon(borrower, n)
                    await until(lambda n=n: pool.stats().waiting == n + 1)  # type: ignore[misc]
                pool.resume()
    assert order == list(range(5))


async def test_pause_and_resume_are_idempotent_and_refused_when_closed(
    pg_server: PostgresServer,
) -> None:
    async with open_pool(db_config(pg_server), min_size=1) as pool:
        pool.resume()  # not paused: nothing
        pool.pause()
        pool.pause()
        pool.resume()
        assert pool.stats().state in ("up", "opening")
    with pytest.raises(pgsd.PoolClosed):
        pool.pause()
    with pytest.raises(pgsd.PoolClosed):
        pool.resize(max_size=2)
    with pytest.raises(pgsd.PoolClosed):
        await pool.drain()


async def test_a_paused_pool_closes_cleanly(pg_server: PostgresServer) -> None:
    config = db_config(pg_server)
    async with open_pool(config, min_size=2, max_size=2) as pool:
        await pool.wait_ready()
        pool.pause()
    assert await server_connections(pg_server, config.application_name) == 0


# -- which errors evict ------------------------------------------------------------------

#: A code of the program's own: class PG, which PostgreSQL does not use.
OWN_CODE_RAISED = "DO $$ BEGIN RAISE SQLSTATE 'PGS01'; END $$"


@pytest.mark.parametrize(
    ("evict_sqlstates", "replaced"),
    [((), False), (["PGS01"], True), (["pg"], True), (["PGS02"], False)],
    ids=["built-in-rules-keep-it", "the-code", "its-class-any-case", "another-code"],
)
async def test_evict_sqlstates_replace_the_connection_an_error_came_from(
    pg_server: PostgresServer, evict_sqlstates: list[str], replaced: bool
) -> None:
    async with open_pool(
        db_config(pg_server), min_size=1, max_size=1, evict_sqlstates=evict_sqlstates
    ) as pool:
        first = await pool.fetchval("SELECT pg_backend_pid()")
        with pytest.raises(psycopg.Error) as info:
            async with pool.connection() as conn:
                await conn.execute(OWN_CODE_RAISED)
        assert info.value.sqlstate == "PGS01"
        second = await pool.fetchval("SELECT pg_backend_pid()")
        assert (second != first) is replaced
        # The same rule for a one-shot statement's error.
        with pytest.raises(psycopg.Error):
            await pool.execute(OWN_CODE_RAISED)
        third = await pool.fetchval("SELECT pg_backend_pid()")
        assert (third != second) is replaced


@pytest.mark.parametrize(
    "value", ["08", ["5"], ["57P0!"], [8], ["08000X"]], ids=["a-string", "1", "bang", "int", "6"]
)
def test_evict_sqlstates_must_be_codes_or_classes(value: Any) -> None:
    with pytest.raises(pgsd.ConfigError) as info:
        pgsd.PoolConfig(evict_sqlstates=value)
    assert info.value.key == "evict_sqlstates"


def test_evict_sqlstates_in_a_file(tmp_path: Any) -> None:
    path = tmp_path / "pgsd.toml"
    path.write_text('[pool]\nevict_sqlstates = ["08", "xx001"]\n[databases.a]\nhost = "h"\n')
    assert pgsd.load_config(path).pool.evict_sqlstates == ("08", "XX001")


# -- distributions ------------------------------------------------------------------------


async def test_wait_use_and_connect_times_are_histograms(pg_server: PostgresServer) -> None:
    async with open_pool(db_config(pg_server), min_size=1, max_size=1) as pool:
        await pool.wait_ready()
        for _ in range(3):
            async with pool.connection():
                pass  # served at once: a wait of 0
        hold = 0.2

        async def holder(started: anyio.Event) -> None:
            async with pool.connection():
                started.set()
                await anyio.sleep(hold)  # the duration measured, not a synchronisation

        started = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(holder, started)
            await started.wait()
            async with pool.connection():  # waits for the holder's connection
                pass
        stats = pool.stats()
    wait, use, connect = stats.wait_time, stats.use_time, stats.connect_time
    assert wait.count == stats.acquires == 5
    assert wait.counts[0] >= 4  # the four served at once, in the first bucket
    assert wait.quantile(1.0) >= hold / 2  # the one that waited for the holder
    assert use.count == 5
    assert use.sum >= hold
    assert use.quantile(1.0) >= hold
    assert connect.count == stats.connections_opened >= 1
    assert 0 < connect.sum < BOUND


def test_a_histograms_quantile_is_its_buckets_bound() -> None:
    from pgsd._stats import BUCKETS

    counts = [0] * (len(BUCKETS) + 1)
    counts[1], counts[4], counts[-1] = 90, 9, 1  # <= 1 ms, <= 10 ms, above 30 s
    histogram = pgsd.Histogram(BUCKETS, tuple(counts), 40.0)
    assert histogram.count == 100
    assert histogram.quantile(0.5) == 0.001
    assert histogram.quantile(0.99) == 0.01
    assert histogram.quantile(1.0) == float("inf")
    assert pgsd.Histogram(BUCKETS, (0,) * len(counts), 0.0).quantile(0.99) == 0.0
