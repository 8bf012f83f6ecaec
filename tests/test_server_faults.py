"""Real server faults, each followed by the pool's recovery, on asyncio and trio.

The faults are the server's own: ``kill -9`` of the postmaster, a clean
restart, ``pg_terminate_backend`` of busy and of idle connections, and
``idle_session_timeout``. Throughout each test a watcher samples, through a
connection of its own, how many server connections carry the pool's unique
``application_name`` (never more than ``max_size``) and checks the pool's
statistics invariants. After each fault the pool must heal and no error may
reach a borrower any more.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

import pgsd
from pgsd.testing import PostgresServer
from support import assert_invariants, db_config, unique_name, watching

pytestmark = pytest.mark.anyio

#: The acquire timeout of the pools that meet a dead server.
ACQUIRE_TIMEOUT = 1.0
#: What a PoolTimeout may come later than its timeout: scheduling on a
#: shared two-core machine, plus the pings of the dead connections.
TIMEOUT_MARGIN = 0.5
#: Fast retries, so that a test sees the pool heal within a second.
FAST_RECONNECT: dict[str, Any] = {"reconnect_initial": 0.05, "reconnect_max": 0.2}
#: Bounds on a poll of the server (and of /proc): iterations, and their pace.
POLLS = 1000
POLL_PACE = 0.01
#: The watcher's pace and its bound on samples.
SAMPLE_PACE = 0.005
MAX_SAMPLES = 20_000


# -- looking at the server ------------------------------------------------------


async def backend_pids(
    server: PostgresServer, application_name: str, *, busy: bool = False
) -> set[int]:
    """The server processes of a pool's connections; with ``busy``, those in ``pg_sleep``."""
    query = "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
    if busy:
        query += " AND state = 'active' AND query LIKE 'SELECT pg_sleep%%'"
    async with await pgsd.connect(server.dsn()) as observer:
        cur = await observer.execute(query, [application_name])
        return {int(row[0]) for row in await cur.fetchall()}


async def wait_for_busy(server: PostgresServer, application_name: str, count: int) -> set[int]:
    """Poll until ``count`` of the pool's connections run ``pg_sleep``; return their pids."""
    for _ in range(POLLS):
        pids = await backend_pids(server, application_name, busy=True)
        if len(pids) >= count:
            return pids
        await anyio.sleep(POLL_PACE)
    raise AssertionError(f"{count} connections of {application_name} never got busy")


async def terminate(server: PostgresServer, pids: set[int]) -> None:
    async with await pgsd.connect(server.dsn()) as observer:
        cur = await observer.execute(
            "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", [sorted(pids)]
        )
        assert [row[0] for row in await cur.fetchall()] == [True] * len(pids)


async def wait_until_exited(server: PostgresServer, pids: set[int]) -> None:
    """pg_terminate_backend and the server's timeouts only signal: poll until the backends exit."""
    async with await pgsd.connect(server.dsn()) as observer:
        for _ in range(POLLS):
            cur = await observer.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", [sorted(pids)]
            )
            if await cur.fetchone() == (0,):
                return
            await anyio.sleep(POLL_PACE)
    raise AssertionError(f"backends {sorted(pids)} did not exit")


async def wait_until_closed(server: PostgresServer, application_name: str) -> None:
    """After the pool closed: poll until the server holds none of its connections."""
    for _ in range(POLLS):
        if not await backend_pids(server, application_name):
            return
        await anyio.sleep(POLL_PACE)
    raise AssertionError(f"connections of {application_name} outlived their pool")


def postmaster_children(server: PostgresServer) -> set[int]:
    """The pids of the postmaster's children (backends and auxiliary processes)."""
    parent = server.postmaster_pid()
    assert parent is not None
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _proc_stat(stat)
        if fields is not None and int(fields[1]) == parent:
            children.add(int(stat.parent.name))
    return children


def _proc_stat(path: Path) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...)."""
    try:
        text = path.read_text()
    except OSError:
        return None  # the process has exited
    # The command name is in parentheses and may itself hold spaces.
    return text.rsplit(")", 1)[1].split()


def _alive(pid: int) -> bool:
    fields = _proc_stat(Path(f"/proc/{pid}/stat"))
    return fields is not None and fields[0] != "Z"


async def wait_for_exit(pids: set[int]) -> None:
    """Backends of a killed postmaster exit when they notice; a new one refuses to
    start while they still hold the shared memory."""
    for _ in range(POLLS):
        if not any(_alive(pid) for pid in pids):
            return
        await anyio.sleep(POLL_PACE)
    raise AssertionError(f"processes {sorted(pids)} outlived their postmaster")


# -- borrowers --------------------------------------------------------------------


async def run_borrowers(pool: pgsd.ConnectionPool, tasks: int, rounds: int) -> set[int]:
    """``tasks`` concurrent borrowers, ``rounds`` queries each; return the backend pids seen.

    Any error a borrower meets propagates: the callers expect none.
    """
    pids: set[int] = set()

    async def borrower() -> None:
        for _ in range(rounds):
            async with pool.connection() as conn:
                cur = await conn.execute("SELECT pg_backend_pid()")
                row = await cur.fetchone()
                assert row is not None
                pids.add(int(row[0]))

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for _ in range(tasks):
                tg.start_soon(borrower)
    return pids


async def borrow_expecting_timeouts(
    pool: pgsd.ConnectionPool, tasks: int
) -> list[tuple[pgsd.PoolTimeout | None, float]]:
    """``tasks`` concurrent borrowers of a pool whose server is gone.

    Returns, per borrower, the error it met and how long it waited.
    """
    outcomes: list[tuple[pgsd.PoolTimeout | None, float]] = []

    async def borrower() -> None:
        start = anyio.current_time()
        try:
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
        except pgsd.PoolTimeout as ex:
            outcomes.append((ex, anyio.current_time() - start))
        else:
            outcomes.append((None, anyio.current_time() - start))

    with anyio.fail_after(ACQUIRE_TIMEOUT + 10):
        async with anyio.create_task_group() as tg:
            for _ in range(tasks):
                tg.start_soon(borrower)
    return outcomes


async def wait_until_no_connection_is_opening(pool: pgsd.ConnectionPool) -> None:
    """Connections the borrowers asked for may still be opening: let them finish (bounded)."""
    for _ in range(POLLS):
        if pool.stats().opening == 0:
            return
        await anyio.sleep(POLL_PACE)
    raise AssertionError(f"connections still opening: {pool.stats()}")


def pool_log_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "pgsd.pool" and text in r.getMessage()]


# -- kill -9 of the postmaster -------------------------------------------------------


async def test_kill_9_of_the_postmaster_the_pool_goes_down_then_heals_to_min_size(
    own_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgsd")
    events: list[str] = []
    config = db_config(own_server, connect_timeout=2)
    options = pgsd.PoolConfig(
        min_size=2, max_size=4, acquire_timeout=ACQUIRE_TIMEOUT, **FAST_RECONNECT
    )
    async with (
        pgsd.ConnectionPool(
            config,
            options,
            on_down=lambda name, error: events.append(f"down {type(error).__name__}"),
            on_recovered=lambda name, error: events.append("recovered"),
        ) as pool,
        watching(own_server, pool, pace=SAMPLE_PACE, max_samples=MAX_SAMPLES) as watch,
    ):
        await pool.wait_ready()
        old = await run_borrowers(pool, tasks=4, rounds=10)
        await wait_until_no_connection_is_opening(pool)
        before = pool.stats()
        assert before.size >= 2

        # Every pool backend exists now, so the snapshot holds them all: a
        # backend forked later would not be waited for below, and could still
        # answer a borrower before noticing that its postmaster is gone.
        children = postmaster_children(own_server)
        own_server.kill()
        await wait_for_exit(children)

        # The dead connections are found before they are lent: the
        # borrowers wait, then time out saying why.
        outcomes = await borrow_expecting_timeouts(pool, tasks=3)
        for error, waited in outcomes:
            assert isinstance(error, pgsd.PoolTimeout)
            message = str(error)
            assert "state down" in message
            assert "has been down for" in message
            assert "last connection error" in message
            assert ACQUIRE_TIMEOUT <= waited < ACQUIRE_TIMEOUT + TIMEOUT_MARGIN
        down = pool.stats()
        assert down.state == "down"
        assert down.size == 0
        assert down.timeouts == 3
        assert down.connections_lost == before.size
        assert isinstance(pool.last_error, pgsd.ServerUnavailable)
        assert events == ["down ServerUnavailable"]

        # Crash recovery, then the pool refills to min_size by itself.
        await anyio.to_thread.run_sync(own_server.start)
        await pool.wait_ready(timeout=10)
        healed = pool.stats()
        assert healed.state == "up"
        assert healed.size >= options.min_size
        assert events == ["down ServerUnavailable", "recovered"]

        pids = await run_borrowers(pool, tasks=4, rounds=10)
        assert pids.isdisjoint(old)
        assert pids <= await backend_pids(own_server, config.application_name)
        stats = pool.stats()
        assert stats.connections_lost == before.size
        assert stats.errors >= 1
        assert stats.reconnect_attempts >= 1
        assert stats.timeouts == 3
        assert_invariants(stats)
    assert watch.samples > 0
    await wait_until_closed(own_server, config.application_name)
    assert watch.broken == []
    assert 0 < watch.most <= options.max_size
    down_lines = pool_log_lines(caplog, "is down")
    assert [r.levelno for r in down_lines] == [logging.WARNING]
    recovered_lines = pool_log_lines(caplog, "recovered")
    assert [r.levelno for r in recovered_lines] == [logging.INFO]


# -- clean restart under load ---------------------------------------------------------


class RestartRun:
    """Borrowers in a bounded loop of queries across a restart; what each attempt met.

    Each attempt is classed as ``before`` (over before the restart began),
    ``after`` (started once the pool had healed) or ``during`` (the rest:
    the restart may break those). Each borrower stops after ``after_heal``
    attempts started after the heal.
    """

    #: A bound on each borrower's loop; far above what a run needs.
    MAX_ROUNDS = 100_000

    def __init__(self, pool: pgsd.ConnectionPool, after_heal: int) -> None:
        self.pool = pool
        self.after_heal = after_heal
        self.restart_at = float("inf")
        self.healed_at = float("inf")
        self.ok = {"before": 0, "during": 0, "after": 0}
        self.errors: dict[str, list[Exception]] = {"before": [], "during": [], "after": []}
        self.warmed = anyio.Event()

    def _phase(self, started: float) -> str:
        if started >= self.healed_at:
            return "after"
        return "before" if anyio.current_time() < self.restart_at else "during"

    async def borrower(self) -> None:
        done_after = 0
        for _ in range(self.MAX_ROUNDS):
            started = anyio.current_time()
            try:
                async with self.pool.connection() as conn:
                    cur = await conn.execute("SELECT 1")
                    assert await cur.fetchone() == (1,)
            except (pgsd.PoolTimeout, psycopg.OperationalError) as ex:
                phase = self._phase(started)
                self.errors[phase].append(ex)
            else:
                phase = self._phase(started)
                self.ok[phase] += 1
                if self.ok["before"] >= 200:
                    self.warmed.set()
            if phase == "after":
                done_after += 1
                if done_after >= self.after_heal:
                    return


async def test_clean_restart_while_borrowers_run_no_error_once_the_pool_has_healed(
    own_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgsd")
    tasks, after_heal = 8, 30
    config = db_config(own_server, connect_timeout=2)
    options = pgsd.PoolConfig(min_size=2, max_size=4, acquire_timeout=2.0, **FAST_RECONNECT)
    recovered = anyio.Event()
    async with (
        pgsd.ConnectionPool(
            config, options, on_recovered=lambda name, error: recovered.set()
        ) as pool,
        watching(own_server, pool, pace=SAMPLE_PACE, max_samples=MAX_SAMPLES) as watch,
    ):
        await pool.wait_ready()
        run = RestartRun(pool, after_heal)
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for _ in range(tasks):
                    tg.start_soon(run.borrower)
                await run.warmed.wait()
                before = pool.stats()
                run.restart_at = anyio.current_time()
                # In a thread: the borrowers keep running while the server
                # shuts down and starts again.
                await anyio.to_thread.run_sync(own_server.restart)
                await recovered.wait()
                await pool.wait_ready(timeout=10)
                run.healed_at = anyio.current_time()
        stats = pool.stats()
    assert run.errors["before"] == []
    assert run.errors["after"] == []
    assert run.ok["after"] == tasks * after_heal
    # Every connection of the old server was found broken, and only those.
    assert before.size <= stats.connections_lost <= before.size + before.opening
    assert stats.errors >= 1
    assert stats.reconnect_attempts >= 1
    assert stats.state == "up"
    assert_invariants(stats)
    await wait_until_closed(own_server, config.application_name)
    assert watch.broken == []
    assert 0 < watch.most <= options.max_size
    assert len(pool_log_lines(caplog, "is down")) == 1
    assert len(pool_log_lines(caplog, "recovered")) == 1


# -- pg_terminate_backend --------------------------------------------------------------


async def test_terminated_busy_connections_fail_their_borrowers_and_are_replaced(
    pg_server: PostgresServer,
) -> None:
    config = db_config(pg_server)
    options = pgsd.PoolConfig(min_size=3, max_size=3)
    errors: list[psycopg.OperationalError] = []

    async def sleeper() -> None:
        with pytest.raises(psycopg.OperationalError) as info:
            async with pool.connection() as conn:
                await conn.execute("SELECT pg_sleep(60)")
        errors.append(info.value)

    async with (
        pgsd.ConnectionPool(config, options) as pool,
        watching(pg_server, pool, pace=SAMPLE_PACE, max_samples=MAX_SAMPLES) as watch,
    ):
        await pool.wait_ready()
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(sleeper)
                busy = await wait_for_busy(pg_server, config.application_name, 3)
                await terminate(pg_server, busy)
        assert len(errors) == 3
        assert all(isinstance(error, psycopg.errors.AdminShutdown) for error in errors)
        assert pool.stats().connections_lost == 3

        await wait_until_exited(pg_server, busy)
        await pool.wait_ready(timeout=10)
        pids = await run_borrowers(pool, tasks=3, rounds=10)
        assert pids.isdisjoint(busy)
        stats = pool.stats()
        assert stats.connections_lost == 3
        assert stats.errors == 0
        assert stats.size == 3
        assert_invariants(stats)
    await wait_until_closed(pg_server, config.application_name)
    assert watch.broken == []
    assert 0 < watch.most <= options.max_size


async def test_terminated_idle_connections_are_invisible_to_the_next_borrowers(
    pg_server: PostgresServer,
) -> None:
    config = db_config(pg_server)
    options = pgsd.PoolConfig(min_size=3, max_size=3)
    async with (
        pgsd.ConnectionPool(config, options) as pool,
        watching(pg_server, pool, pace=SAMPLE_PACE, max_samples=MAX_SAMPLES) as watch,
    ):
        await pool.wait_ready()
        idle = await backend_pids(pg_server, config.application_name)
        assert len(idle) == 3
        await terminate(pg_server, idle)
        await wait_until_exited(pg_server, idle)
        pids = await run_borrowers(pool, tasks=3, rounds=10)
        assert pids.isdisjoint(idle)
        stats = pool.stats()
        assert stats.connections_lost == 3
        assert stats.errors == 0
        assert stats.acquires == 30
        assert_invariants(stats)
    await wait_until_closed(pg_server, config.application_name)
    assert watch.broken == []
    assert 0 < watch.most <= options.max_size


# -- idle_session_timeout -----------------------------------------------------------------

#: The server closes a session idle this long (PostgreSQL 14+).
IDLE_SESSION_TIMEOUT = "300ms"


@pytest.fixture
def short_idle_role(pg_server: PostgresServer) -> Iterator[str]:
    """A role whose sessions the server closes after IDLE_SESSION_TIMEOUT idle."""
    assert pg_server.major >= 14, (
        f"idle_session_timeout needs PostgreSQL 14 or later; this server is {pg_server.major}:"
        " run this test on a newer server (PGSD_TEST_PG)"
    )
    role = unique_name()
    pg_server.create_role(role)
    pg_server.execute(f"ALTER ROLE {role} SET idle_session_timeout = '{IDLE_SESSION_TIMEOUT}'")
    try:
        yield role
    finally:
        pg_server.execute(f"DROP ROLE {role}")


async def fill(pool: pgsd.ConnectionPool, count: int) -> None:
    """Borrow ``count`` connections at once, so that the pool opens that many."""
    all_in = anyio.Event()
    held = 0

    async def hold() -> None:
        nonlocal held
        async with pool.connection():
            held += 1
            if held == count:
                all_in.set()
            await all_in.wait()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for _ in range(count):
                tg.start_soon(hold)


@pytest.mark.parametrize(
    "ping_after_idle",
    [
        # Idle longer than this: pinged before it is lent.
        pytest.param(0.1, id="ping-after-idle"),
        # Never pinged for idling: only the server's FATAL message, unasked
        # input on an idle socket, gets the connection checked.
        pytest.param(60.0, id="heard-from-the-server"),
    ],
)
async def test_idle_session_timeout_expiries_are_invisible_to_the_next_borrowers(
    pg_server: PostgresServer, short_idle_role: str, ping_after_idle: float
) -> None:
    config = db_config(pg_server, user=short_idle_role)
    # min_size 0: nothing reopens the expired connections before the
    # borrowers come, so they meet them.
    options = pgsd.PoolConfig(min_size=0, max_size=3, ping_after_idle=ping_after_idle)
    async with (
        pgsd.ConnectionPool(config, options) as pool,
        watching(pg_server, pool, pace=SAMPLE_PACE, max_samples=MAX_SAMPLES) as watch,
    ):
        async with pool.connection() as conn:
            cur = await conn.execute("SHOW idle_session_timeout")
            assert await cur.fetchone() == (IDLE_SESSION_TIMEOUT,)
        await fill(pool, 3)
        expired = await backend_pids(pg_server, config.application_name)
        assert len(expired) == 3
        await wait_until_exited(pg_server, expired)

        pids = await run_borrowers(pool, tasks=3, rounds=10)
        assert pids.isdisjoint(expired)
        stats = pool.stats()
        assert stats.connections_lost >= 3
        assert stats.errors == 0
        assert_invariants(stats)
    assert watch.broken == []
    assert 0 < watch.most <= options.max_size
    await wait_until_closed(pg_server, config.application_name)
