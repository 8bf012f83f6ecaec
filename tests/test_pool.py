"""ConnectionPool: the behaviours the README promises, each on asyncio and trio."""

from __future__ import annotations

import logging
import os
import signal

import anyio
import psycopg
import pytest

import pgsd
from pgsd.testing import PostgresServer, free_port
from support import (
    CancelWhenRunning,
    assert_invariants,
    db_config,
    open_pool,
    server_connections,
    terminate_all,
    wait_until_gone,
)

pytestmark = pytest.mark.anyio

#: Scheduling delay a deadline may see on a loaded 2-core machine (seconds);
#: the deadlines themselves are asserted exactly on virtual time.
MARGIN = 0.5
SLEEP = "SELECT pg_sleep(60)"


# 1. never more than max_size --------------------------------------------------


async def test_never_more_than_max_size_server_connections(pg_server: PostgresServer) -> None:
    config = db_config(pg_server)
    samples: list[int] = []
    async with open_pool(config, min_size=0, max_size=3) as pool:

        async def borrower() -> None:
            for _ in range(10):
                async with pool.connection() as conn:
                    await conn.execute("SELECT pg_sleep(0.002)")

        async def sampler(done: anyio.Event) -> None:
            while not done.is_set() and len(samples) < 500:
                samples.append(await server_connections(pg_server, config.application_name))

        done = anyio.Event()
        async with anyio.create_task_group() as outer:
            outer.start_soon(sampler, done)
            async with anyio.create_task_group() as tg:
                for _ in range(30):
                    tg.start_soon(borrower)
            done.set()
        stats = pool.stats()
        assert stats.acquires == 300
        assert stats.size <= 3
        assert_invariants(stats)
    assert samples
    assert max(samples) <= 3


# 2. FIFO, acquire timeout, enclosing scopes ----------------------------------


async def test_waiters_are_served_first_come_first_served(pg_server: PostgresServer) -> None:
    order: list[int] = []
    async with open_pool(db_config(pg_server), min_size=1, max_size=1) as pool:
        await pool.wait_ready()

        async def waiter(i: int) -> None:
            async with pool.connection():
                order.append(i)

        async with anyio.create_task_group() as tg, pool.connection():
            for i in range(20):
                tg.start_soon(waiter, i)
                await anyio.wait_all_tasks_blocked()
            assert pool.stats().waiting == 20
        assert order == list(range(20))
        assert_invariants(pool.stats())


async def test_acquire_timeout_fires_on_time_when_the_pool_is_busy(
    pg_server: PostgresServer,
) -> None:
    async with open_pool(db_config(pg_server), max_size=1, acquire_timeout=1.0) as pool:
        async with pool.connection():
            start = anyio.current_time()
            with pytest.raises(pgsd.PoolTimeout) as info:
                async with pool.connection():
                    pass
            elapsed = anyio.current_time() - start
        assert 1.0 <= elapsed < 1.0 + MARGIN  # exact to the tick: test_pool_scheduling.py
        assert "1 s" in str(info.value)
        stats = pool.stats()
        assert stats.timeouts == 1
        assert stats.waiting == 0
        assert_invariants(stats)


async def test_acquire_timeout_fires_on_time_when_the_server_is_down() -> None:
    config = pgsd.DatabaseConfig(
        host="127.0.0.1", port=free_port(), dbname="x", user="x", connect_timeout=1
    )
    async with open_pool(config, acquire_timeout=1.0) as pool:
        start = anyio.current_time()
        with pytest.raises(pgsd.PoolTimeout) as info:
            async with pool.connection():
                pass
        elapsed = anyio.current_time() - start
        assert 1.0 <= elapsed < 1.0 + MARGIN  # exact to the tick: test_pool_scheduling.py
        message = str(info.value)
        assert "down" in message
        assert "last connection error" in message
        assert pool.state == "down"
        assert isinstance(pool.last_error, pgsd.ServerUnavailable)


async def test_per_call_timeout_overrides_acquire_timeout(pg_server: PostgresServer) -> None:
    async with open_pool(db_config(pg_server), max_size=1, acquire_timeout=30) as pool:
        async with pool.connection():
            start = anyio.current_time()
            with pytest.raises(pgsd.PoolTimeout):
                async with pool.connection(timeout=0.3):
                    pass
            assert 0.3 <= anyio.current_time() - start < 0.3 + MARGIN


async def test_enclosing_cancel_scope_is_honoured_while_waiting(
    pg_server: PostgresServer,
) -> None:
    async with open_pool(db_config(pg_server), max_size=1, acquire_timeout=30) as pool:
        async with pool.connection():
            start = anyio.current_time()
            with pytest.raises(TimeoutError):
                with anyio.fail_after(0.3):
                    async with pool.connection():
                        pass
            assert anyio.current_time() - start < 0.3 + MARGIN
            assert pool.stats().waiting == 0
        assert_invariants(pool.stats())


async def test_one_more_waiter_than_max_waiting_is_refused_at_once(
    pg_server: PostgresServer,
) -> None:
    async with open_pool(db_config(pg_server), max_size=1, max_waiting=2) as pool:
        async with anyio.create_task_group() as tg, pool.connection():
            for _ in range(2):
                tg.start_soon(_borrow_once, pool)
            await anyio.wait_all_tasks_blocked()
            with pytest.raises(pgsd.TooManyWaiters):
                async with pool.connection():
                    pass
        assert pool.stats().acquires == 3


async def _borrow_once(pool: pgsd.ConnectionPool) -> None:
    async with pool.connection() as conn:
        await conn.execute("SELECT 1")


# 3. cancelled waiters strand nothing -------------------------------------------


async def test_waiter_cancelled_at_the_moment_of_handover_strands_nothing(
    pg_server: PostgresServer,
) -> None:
    async with open_pool(db_config(pg_server), min_size=1, max_size=1) as pool:
        await pool.wait_ready()
        for _ in range(100):
            async with anyio.create_task_group() as tg:
                scope = anyio.CancelScope()

                async def waiter(scope: anyio.CancelScope = scope) -> None:
                    with scope:
                        async with pool.connection() as conn:
                            await conn.execute("SELECT 1")

                async with pool.connection():
                    tg.start_soon(waiter)
                    await anyio.wait_all_tasks_blocked()
                # The connection was handed to the waiter on release, with no
                # checkpoint in between: the waiter has not run yet.
                scope.cancel()
            stats = pool.stats()
            assert stats.size == 1
            assert stats.idle == 1
            assert stats.waiting == 0
            assert_invariants(stats)
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")


# 4. and 5. returns come back clean; cleanup shielded and bounded -------------


async def test_open_transaction_is_rolled_back_on_return(pg_server: PostgresServer) -> None:
    async with open_pool(db_config(pg_server), max_size=1) as pool:
        async with pool.connection() as conn:
            await conn.set_autocommit(False)
            await conn.execute("CREATE TEMP TABLE leftover (x int)")
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        async with pool.connection() as conn:
            assert conn.autocommit
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            cur = await conn.execute("SELECT to_regclass('pg_temp.leftover') IS NULL")
            assert await cur.fetchone() == (True,)


async def test_failed_transaction_is_rolled_back_on_return(pg_server: PostgresServer) -> None:
    async with open_pool(db_config(pg_server), max_size=1) as pool:
        async with pool.connection() as conn:
            await conn.execute("BEGIN")
            with pytest.raises(psycopg.errors.DivisionByZero):
                await conn.execute("SELECT 1 / 0")
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        async with pool.connection() as conn:
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            cur = await conn.execute("SELECT 1")
            assert await cur.fetchone() == (1,)
        assert pool.stats().connections_closed == 0


async def test_query_running_when_the_borrower_is_cancelled_is_stopped(
    pg_server: PostgresServer,
) -> None:
    async with open_pool(db_config(pg_server), max_size=1) as pool:
        async with pool.connection() as conn:
            pid = conn.info.backend_pid
        canceller = CancelWhenRunning(pg_server, pid, SLEEP)
        with canceller.scope:
            async with pool.connection() as conn, anyio.create_task_group() as tg:
                tg.start_soon(canceller.run)
                await conn.execute(SLEEP)
        assert canceller.scope.cancelled_caught
        async with pool.connection() as conn:
            assert conn.info.backend_pid == pid
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            cur = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(60)%%'"
                " AND state = 'active'"
            )
            assert await cur.fetchone() == (0,)


async def test_cleanup_is_shielded_and_bounded_when_the_server_hangs(
    pg_server: PostgresServer,
) -> None:
    config = db_config(pg_server, cancel_grace=0.5)
    async with open_pool(config, max_size=1) as pool:
        start = anyio.current_time()
        with anyio.move_on_after(0.5) as scope:
            async with pool.connection() as conn:
                pid = conn.info.backend_pid
                async with conn.transaction():
                    await conn.execute("SELECT 1")
                    os.kill(pid, signal.SIGSTOP)
                    await conn.execute("SELECT 2")
        left = anyio.current_time()
        assert scope.cancelled_caught
        # The borrower leaves at its deadline: the pool cancels the query on
        # the server (bounded by cancel_grace) in its own task.
        assert left - start < 0.5 + 0.3
        try:
            async with pool.connection() as conn:
                # The stuck connection was closed after cancel_grace and replaced.
                assert anyio.current_time() - left < 0.5 + 1.0
                assert conn.info.backend_pid != pid
                cur = await conn.execute("SELECT 1")
                assert await cur.fetchone() == (1,)
        finally:
            os.kill(pid, signal.SIGCONT)
            pg_server.execute("SELECT pg_terminate_backend(%s)", [pid])
        stats = pool.stats()
        assert stats.connections_closed >= 1
        assert_invariants(stats)


async def test_a_cancelled_borrower_is_not_held_while_its_query_is_cancelled(
    pg_server: PostgresServer,
) -> None:
    async with open_pool(db_config(pg_server), max_size=2) as pool:
        async with pool.connection() as conn:
            canceller = CancelWhenRunning(pg_server, conn.info.backend_pid, SLEEP)
        with canceller.scope:
            async with pool.connection() as conn, anyio.create_task_group() as tg:
                tg.start_soon(canceller.run)
                await conn.execute(SLEEP)
        assert canceller.scope.cancelled_caught
        # Left at once: the pool cancels the query on the server in its own task.
        assert anyio.current_time() - canceller.cancelled_at < MARGIN
        # The same connection comes back idle once the server has cancelled.
        async with pool.connection() as conn, pool.connection() as other:
            for c in (conn, other):
                assert c.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert pool.stats().connections_closed == 0


# 6. dead connections found before a borrower meets them; healing --------------


@pytest.mark.matrix
async def test_terminated_idle_connections_are_invisible_to_the_next_borrowers(
    pg_server: PostgresServer,
) -> None:
    config = db_config(pg_server)
    async with open_pool(config, min_size=3, max_size=3) as pool:
        await pool.wait_ready()
        await terminate_all(pg_server, config.application_name)
        for _ in range(10):
            async with pool.connection() as conn:
                cur = await conn.execute("SELECT 1")
                assert await cur.fetchone() == (1,)
        lost = pool.stats().connections_lost
        assert lost >= 1
        # The same for one-shot statements: checked first, a dead idle
        # connection never fails a statement that did not reach the server.
        # Replacements still being opened would escape the termination (and
        # keep the server from showing none of the pool's connections).
        await pool.wait_ready()
        await terminate_all(pg_server, config.application_name)
        for n in range(10):
            assert await pool.fetchval("SELECT %s::int", [n]) == n
        stats = pool.stats()
        assert stats.connections_lost > lost
        assert_invariants(stats)


@pytest.mark.matrix
async def test_server_restart_waiters_time_out_then_the_pool_heals(
    own_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgsd")
    events: list[str] = []
    config = db_config(own_server, connect_timeout=2)
    options = pgsd.PoolConfig(
        min_size=2, max_size=3, acquire_timeout=1.0, reconnect_initial=0.05, reconnect_max=0.2
    )
    async with pgsd.ConnectionPool(
        config,
        options,
        on_down=lambda name, error: events.append(f"down {type(error).__name__}"),
        on_recovered=lambda name, error: events.append("recovered"),
    ) as pool:
        await pool.wait_ready()
        own_server.stop()
        # Borrowers meet the dead connections' replacement attempts, not errors...
        with pytest.raises(pgsd.PoolTimeout) as info:
            for _ in range(10):
                async with pool.connection() as conn:
                    await conn.execute("SELECT 1")
        assert "down" in str(info.value)
        assert pool.state == "down"
        own_server.start()
        await pool.wait_ready(timeout=10)
        assert pool.state == "up"
        for _ in range(5):
            async with pool.connection() as conn:
                cur = await conn.execute("SELECT 1")
                assert await cur.fetchone() == (1,)
        stats = pool.stats()
        assert stats.size >= 2
        assert stats.reconnect_attempts >= 1
        assert stats.connections_lost >= 1
        assert_invariants(stats)
    down_lines = [r for r in caplog.records if "is down" in r.getMessage()]
    recovered_lines = [r for r in caplog.records if "recovered" in r.getMessage()]
    assert len(down_lines) == 1
    assert len(recovered_lines) == 1
    assert events == ["down ServerUnavailable", "recovered"]


async def test_pool_ping_returns_the_round_trip(pg_server: PostgresServer) -> None:
    async with open_pool(db_config(pg_server)) as pool:
        latency = await pool.ping()
        assert 0 < latency < 5


@pytest.mark.matrix
async def test_pool_rejects_a_server_older_than_the_minimum(pg_server: PostgresServer) -> None:
    async with open_pool(db_config(pg_server), min_server_version=990000) as pool:
        with anyio.fail_after(10):
            with pytest.raises(pgsd.UnsupportedServerVersion) as info:
                async with pool.connection():
                    pass
        assert info.value.minimum == 990000


@pytest.mark.matrix
async def test_server_version_is_logged_once(
    pg_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgsd.pool")
    async with open_pool(db_config(pg_server), min_size=3, max_size=3) as pool:
        await pool.wait_ready()
    lines = [r for r in caplog.records if "PostgreSQL" in r.getMessage()]
    assert len(lines) == 1


# 7. lifetime jitter ------------------------------------------------------------


async def test_lifetime_jitter_spreads_expiries(pg_server: PostgresServer) -> None:
    async with open_pool(
        db_config(pg_server), min_size=8, max_size=8, max_lifetime=100, lifetime_jitter=0.5
    ) as pool:
        await pool.wait_ready()
        entries = list(pool._entries)
        lifetimes = [e.expires - e.created for e in entries]
    assert all(50 <= life <= 100 for life in lifetimes)
    assert max(lifetimes) - min(lifetimes) > 5  # 8 draws over a 50 s range


# 8. statistics ------------------------------------------------------------------


async def test_stats_count_acquires_and_waits(pg_server: PostgresServer) -> None:
    async with open_pool(db_config(pg_server), max_size=2) as pool:
        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(_borrow_once, pool)
        stats = pool.stats()
        assert stats.acquires == 10
        assert stats.state == "up"
        assert stats.connections_opened >= 1
        assert stats.wait_time_total >= stats.wait_time_max >= 0
        assert_invariants(stats)
    closed = pool.stats()
    assert closed.state == "closed"
    assert closed.connections_closed == closed.connections_opened


# 9. closing -----------------------------------------------------------------------


async def test_close_with_a_borrower_that_never_returns_is_bounded(
    pg_server: PostgresServer,
) -> None:
    config = db_config(pg_server)
    pool = pgsd.ConnectionPool(config, pgsd.PoolConfig(close_timeout=0.5))
    borrowed = anyio.Event()
    async with anyio.create_task_group() as tg:

        async def never_returns() -> None:
            async with pool.connection():
                borrowed.set()
                await anyio.sleep_forever()

        async with pool:
            tg.start_soon(never_returns)
            await borrowed.wait()
            start = anyio.current_time()
        assert anyio.current_time() - start < 0.5 + 0.5
        tg.cancel_scope.cancel()
    await wait_until_gone(pg_server, config.application_name)
    assert pool.stats().size == 0


async def test_close_fails_waiters_with_pool_closed(pg_server: PostgresServer) -> None:
    errors: list[BaseException] = []
    async with anyio.create_task_group() as tg:
        async with open_pool(db_config(pg_server), max_size=1, close_timeout=0.5) as pool:

            async def waiter() -> None:
                try:
                    async with pool.connection():
                        pass
                except pgsd.PoolClosed as ex:
                    errors.append(ex)

            async with pool.connection():
                tg.start_soon(waiter)
                await anyio.wait_all_tasks_blocked()
                await pool.close()
    assert len(errors) == 1
    with pytest.raises(pgsd.PoolClosed):
        async with pool.connection():
            pass


# 10. leak detection -----------------------------------------------------------------


class _EventHandler(logging.Handler):
    def __init__(self, event: anyio.Event) -> None:
        super().__init__(logging.WARNING)
        self.event = event
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self.event.set()


async def test_connection_held_past_leak_threshold_is_reported_with_the_borrower_stack(
    pg_server: PostgresServer,
) -> None:
    reported = anyio.Event()
    handler = _EventHandler(reported)
    logging.getLogger("pgsd.pool").addHandler(handler)
    try:
        async with open_pool(db_config(pg_server), leak_threshold=0.2) as pool:
            async with pool.connection():
                with anyio.fail_after(5):
                    await reported.wait()
            assert pool.stats().leaks == 1
    finally:
        logging.getLogger("pgsd.pool").removeHandler(handler)
    assert len(handler.messages) == 1
    assert "test_connection_held_past_leak_threshold" in handler.messages[0]


# hooks ---------------------------------------------------------------------------------


async def test_configure_hook_runs_on_each_new_connection(pg_server: PostgresServer) -> None:
    async def configure(conn: pgsd.Connection) -> None:
        await conn.execute("SET application_name TO 'configured'")

    async with open_pool(db_config(pg_server), configure=configure) as pool:
        async with pool.connection() as conn:
            cur = await conn.execute("SHOW application_name")
            assert await cur.fetchone() == ("configured",)


async def test_failing_configure_hook_connection_is_never_lent(pg_server: PostgresServer) -> None:
    async def configure(conn: pgsd.Connection) -> None:  # noqa: ASYNC124 (hooks are awaited)
        raise RuntimeError("configure failed on purpose")

    async with open_pool(db_config(pg_server), configure=configure, acquire_timeout=0.5) as pool:
        with pytest.raises(pgsd.PoolTimeout) as info:
            async with pool.connection():
                pass
        assert "configure failed on purpose" in str(info.value)
        assert pool.stats().size == 0


async def test_configure_hook_leaving_a_transaction_open_is_refused(
    pg_server: PostgresServer,
) -> None:
    async def configure(conn: pgsd.Connection) -> None:
        await conn.execute("BEGIN")

    async with open_pool(db_config(pg_server), configure=configure, acquire_timeout=0.5) as pool:
        with pytest.raises(pgsd.PoolTimeout) as info:
            async with pool.connection():
                pass
        assert "transaction open" in str(info.value)


async def test_failing_reset_hook_gets_the_connection_discarded(pg_server: PostgresServer) -> None:
    async def reset(conn: pgsd.Connection) -> None:  # noqa: ASYNC124 (hooks are awaited)
        raise RuntimeError("reset failed on purpose")

    async with open_pool(db_config(pg_server), reset=reset, max_size=1) as pool:
        async with pool.connection() as conn:
            first = conn.info.backend_pid
        async with pool.connection() as conn:
            assert conn.info.backend_pid != first
        assert pool.stats().connections_closed >= 1


async def test_reset_hook_leaving_a_transaction_open_gets_the_connection_discarded(
    pg_server: PostgresServer,
) -> None:
    async def reset(conn: pgsd.Connection) -> None:
        await conn.execute("BEGIN")

    async with open_pool(db_config(pg_server), reset=reset, max_size=1) as pool:
        async with pool.connection() as conn:
            first = conn.info.backend_pid
        async with pool.connection() as conn:
            assert conn.info.backend_pid != first
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


async def test_reset_hook_runs_on_return(pg_server: PostgresServer) -> None:
    async def reset(conn: pgsd.Connection) -> None:
        await conn.execute("RESET ALL")

    async with open_pool(db_config(pg_server), reset=reset, max_size=1) as pool:
        async with pool.connection() as conn:
            await conn.execute("SET statement_timeout TO '5s'")
        async with pool.connection() as conn:
            cur = await conn.execute("SHOW statement_timeout")
            assert await cur.fetchone() == ("0",)


async def test_a_configuration_mistake_fails_at_once_not_after_the_timeout(
    pg_server: PostgresServer,
) -> None:
    config = db_config(pg_server, dbname="no_such_database")
    async with open_pool(config, acquire_timeout=30) as pool:
        with anyio.fail_after(5):
            with pytest.raises(pgsd.DatabaseNotFound):
                async with pool.connection():
                    pass
            with pytest.raises(pgsd.DatabaseNotFound):
                await pool.wait_ready()
        assert pool.stats().timeouts == 0


@pytest.mark.matrix
async def test_wait_ready_with_min_size_zero_returns_at_once(pg_server: PostgresServer) -> None:
    async with open_pool(db_config(pg_server), min_size=0) as pool:
        with anyio.fail_after(1):
            await pool.wait_ready()
        assert pool.stats().size == 0


async def test_a_read_only_refusal_evicts_the_connection_when_a_primary_is_wanted(
    pg_server: PostgresServer,
) -> None:
    config = db_config(pg_server, target_session_attrs="read-write")
    async with open_pool(config, max_size=1) as pool:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            async with pool.connection() as conn:
                first = conn.info.backend_pid
                # What a demoted primary answers to a write.
                await conn.execute("SET default_transaction_read_only TO on")
                await conn.execute("CREATE TABLE pgsd_never_made (x int)")
        async with pool.connection() as conn:
            assert conn.info.backend_pid != first
        assert pool.stats().connections_lost == 1


async def test_a_read_only_refusal_keeps_the_connection_when_any_server_will_do(
    pg_server: PostgresServer,
) -> None:
    async with open_pool(db_config(pg_server), max_size=1) as pool:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            async with pool.connection() as conn:
                first = conn.info.backend_pid
                await conn.execute("SET default_transaction_read_only TO on")
                await conn.execute("CREATE TABLE pgsd_never_made (x int)")
        async with pool.connection() as conn:
            assert conn.info.backend_pid == first


async def test_a_borrower_cancelled_while_its_connection_is_pinged_strands_nothing(
    pg_server: PostgresServer,
) -> None:
    async with open_pool(db_config(pg_server), max_size=1, ping_after_idle=0) as pool:
        await pool.wait_ready()
        for _ in range(20):
            with anyio.CancelScope() as scope:
                scope.cancel()  # cancelled before the ping's answer can arrive
                async with pool.connection():
                    pass
            stats = pool.stats()
            assert stats.in_use == 0
            assert_invariants(stats)
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT 1")
            assert await cur.fetchone() == (1,)
