"""The pool's scheduling on virtual time, against fake connections.

FIFO grants, deadlines, backoff gaps, lifetime jitter, the leak threshold
and the health-check cadence, asserted to the virtual clock's tick with no
wall-clock time spent and nothing left to a loaded machine's scheduler.
These are in addition to the real-server tests of the same behaviour
(test_pool.py, test_pool_maintenance.py, test_server_faults.py), never
instead of them: a fake connection proves the pool's timing, not its
dealings with PostgreSQL.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from psycopg import pq

import pgsd
from support import PoolWarnings, pool_warnings
from virtual_time import virtual_backend

pytestmark = pytest.mark.anyio

CONFIG = pgsd.DatabaseConfig.from_dsn("host=127.0.0.1 port=1 dbname=fake user=fake")
#: The pool's maintenance tick (seconds of virtual time).
TICK = 1.0
#: How often `until` looks (seconds of virtual time).
STEP = 0.01
#: What virtual time may differ by from the exact figure (float arithmetic).
EPSILON = 1e-6


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return virtual_backend(str(request.param))


class FakeCursor:
    async def __aenter__(self) -> FakeCursor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    async def execute(self, query: Any, params: Any = None) -> None:
        await anyio.lowlevel.checkpoint()

    async def fetchone(self) -> tuple[str]:
        return ("PostgreSQL 17.0 (fake) on nowhere",)


class FakeInfo:
    server_version = 170000
    transaction_status = pq.TransactionStatus.IDLE


class FakeConnection:
    """What the pool uses of a `pgsd.Connection`, with no server behind it."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.closed = False
        self.broken = False
        self.autocommit = True
        self.settle_later = False
        self.unsettled = False
        self.cancel_grace = 1.0
        self.transaction_status = pq.TransactionStatus.IDLE
        self.info = FakeInfo()
        self.pings: list[float] = []
        self.closed_at: float | None = None

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self.closed_at = anyio.current_time()

    def input_pending(self) -> bool:
        return False

    async def ping(self, timeout: float = 5.0) -> float:  # noqa: ASYNC109
        self.pings.append(anyio.current_time())
        await anyio.lowlevel.checkpoint()
        return 0.0

    def cursor(self, **kwargs: Any) -> FakeCursor:
        return FakeCursor()


class FakeFactory:
    """Opens fake connections; the first *failures* attempts fail as a server that is away."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.attempts: list[float] = []
        self.connections: list[FakeConnection] = []

    async def __call__(self, config: pgsd.DatabaseConfig) -> FakeConnection:
        self.attempts.append(anyio.current_time())
        await anyio.lowlevel.checkpoint()
        if len(self.attempts) <= self.failures:
            raise pgsd.ServerUnavailable("connection refused", database="fake")
        conn = FakeConnection(len(self.connections))
        self.connections.append(conn)
        return conn


def fake_pool(factory: FakeFactory, **options: Any) -> pgsd.ConnectionPool:
    return pgsd.ConnectionPool(
        CONFIG, pgsd.PoolConfig(**options), name="fake", connection_factory=factory
    )


async def until(condition: Any, limit: float = 60.0) -> None:
    """Let the pool's tasks run until *condition* holds (bounded, in virtual time)."""
    with anyio.fail_after(limit):
        for _ in range(int(limit / STEP) + 1):
            if condition():
                return
            await anyio.sleep(STEP)
    raise AssertionError("condition never held")


@pytest.fixture
def warnings_logged() -> Iterator[PoolWarnings]:
    with pool_warnings() as handler:
        yield handler


async def test_waiters_are_served_in_arrival_order(anyio_backend: Any) -> None:
    factory = FakeFactory()
    served: list[int] = []
    async with fake_pool(factory, min_size=1, max_size=1) as pool:
        await pool.wait_ready()

        async def borrow(number: int) -> None:
            async with pool.connection():
                served.append(number)
                await anyio.sleep(0.5)

        async with anyio.create_task_group() as tg:
            async with pool.connection():
                for number in range(10):
                    tg.start_soon(borrow, number)
                    await until(lambda n=number: pool.stats().waiting == n + 1)
            # Released: each waiter in turn, in the order it came.
        assert served == list(range(10))
        assert len(factory.connections) == 1


async def test_waiters_time_out_at_their_own_deadlines(anyio_backend: Any) -> None:
    factory = FakeFactory()
    ended: dict[float, float] = {}
    async with fake_pool(factory, min_size=1, max_size=1, acquire_timeout=10) as pool:
        await pool.wait_ready()

        async def wait(limit: float | None) -> None:
            start = anyio.current_time()
            with pytest.raises(pgsd.PoolTimeout) as raised:
                async with pool.connection(limit):
                    pass
            ended[10.0 if limit is None else limit] = anyio.current_time() - start
            assert "no connection within" in str(raised.value)

        async with pool.connection(), anyio.create_task_group() as tg:
            for timeout in (None, 7.0, 3.0, 5.0):
                tg.start_soon(wait, timeout)
        assert sorted(ended) == [3.0, 5.0, 7.0, 10.0]
        for limit, waited in ended.items():
            assert abs(waited - limit) < EPSILON, (limit, waited)
        assert pool.stats().timeouts == 4
        assert pool.stats().waiting == 0


async def test_failed_attempts_are_spaced_by_the_backoff(anyio_backend: Any) -> None:
    factory = FakeFactory(failures=6)
    options = {
        "min_size": 1,
        "max_size": 1,
        "reconnect_initial": 1.0,
        "reconnect_multiplier": 2.0,
        "reconnect_max": 8.0,
        "reconnect_jitter": 0.25,
    }
    async with fake_pool(factory, **options) as pool:
        await pool.wait_ready(timeout=120)
        assert pool.state == "up"
        stats = pool.stats()
    attempts = factory.attempts
    assert len(attempts) == 7
    gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    for n, gap in enumerate(gaps):
        base = min(8.0, 1.0 * 2.0**n)
        assert base * 0.75 - EPSILON <= gap <= base + EPSILON, (n, gap)
    assert stats.errors == 6
    assert stats.reconnect_attempts == 6  # the first failure made the database down


async def test_lifetimes_are_spread_by_the_jitter(anyio_backend: Any) -> None:
    factory = FakeFactory()
    size = 20
    async with fake_pool(
        factory, min_size=size, max_size=size, max_lifetime=100.0, lifetime_jitter=0.2
    ) as pool:
        await pool.wait_ready()
        first = factory.connections[:size]
        await until(lambda: all(conn.closed for conn in first), limit=200)
        opened_at = factory.attempts[0]
        ages = [conn.closed_at - opened_at for conn in first if conn.closed_at is not None]
        await until(lambda: pool.stats().size == size)
    assert len(ages) == size
    # Each closed at the first tick past its lifetime, within [80, 100].
    assert all(80.0 - EPSILON <= age <= 100.0 + TICK + EPSILON for age in ages), ages
    assert max(ages) - min(ages) > 2 * TICK  # spread, not all at once


async def test_a_leak_is_reported_at_the_first_tick_past_the_threshold(
    anyio_backend: Any, warnings_logged: PoolWarnings
) -> None:
    factory = FakeFactory()
    async with fake_pool(factory, min_size=1, max_size=1, leak_threshold=5.0) as pool:
        await pool.wait_ready()
        async with pool.connection():
            borrowed = anyio.current_time()
            await anyio.sleep(20)
            stats = pool.stats()
    leaks = [(at, text) for at, text in warnings_logged.records if "held for" in text]
    assert len(leaks) == 1  # reported once per loan
    assert 5.0 - EPSILON <= leaks[0][0] - borrowed <= 5.0 + TICK + EPSILON
    assert "leak_threshold 5 s" in leaks[0][1]
    assert stats.leaks == 1


async def test_idle_connections_are_checked_every_health_check_interval(
    anyio_backend: Any,
) -> None:
    factory = FakeFactory()
    async with fake_pool(factory, min_size=1, max_size=1, health_check_interval=10.0) as pool:
        await pool.wait_ready()
        opened = anyio.current_time()
        await anyio.sleep(35)
    conn = factory.connections[0]
    assert len(conn.pings) == 3
    checks = [opened, *conn.pings]
    for earlier, later in itertools.pairwise(checks):
        assert 10.0 - EPSILON <= later - earlier <= 10.0 + TICK + EPSILON
