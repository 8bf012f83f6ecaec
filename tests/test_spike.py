"""HikariCP's spike scenario: a burst of requests on an idle pool over a slow network.

50 requests arrive at once at a pool of at most 10 connections whose every
new connection takes 150 ms to open (a :class:`FaultProxy` in ``delay``
mode). The pool must grow to meet the burst without ever exceeding its
size, serve the requests first come first served, and time none out.
"""

from __future__ import annotations

import anyio
import anyio.abc
import pytest

import pgsd
from pgsd.testing import FaultProxy, PostgresServer
from support import unique_name

pytestmark = pytest.mark.anyio

REQUESTS = 50
MAX_SIZE = 10
CONNECT_DELAY = 0.15
ACQUIRE_TIMEOUT = 5.0
#: How long each request holds its connection: long enough that one
#: connection cannot absorb the burst before the others are open.
HOLD_QUERY = "SELECT pg_sleep(0.05)"


class _Spike:
    """What the requests of one spike saw."""

    def __init__(self, pool: pgsd.ConnectionPool) -> None:
        self.pool = pool
        self.started: list[int] = []
        self.granted: list[int] = []
        self.waits: list[float] = []
        self.stats: list[pgsd.PoolStats] = []
        #: Per grant: (request, requests started after it, requests still waiting).
        self.queue_at_grant: list[tuple[int, int, int]] = []

    async def request(
        self, i: int, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Borrow a connection, run a short query, give it back."""
        lease = self.pool.connection()
        self.started.append(i)
        start = anyio.current_time()
        # The starter resumes only after this task has queued in the pool:
        # entering the lease runs, without a checkpoint, up to the wait.
        task_status.started()
        async with lease as conn:
            self.waits.append(anyio.current_time() - start)
            self.granted.append(i)
            stats = self.pool.stats()
            self.stats.append(stats)
            later = len(self.started) - 1 - self.started.index(i)
            self.queue_at_grant.append((i, later, stats.waiting))
            await conn.execute(HOLD_QUERY)


async def count_server_connections(
    server: PostgresServer, application_name: str, samples: list[int], done: anyio.Event
) -> None:
    """Sample the pool's backends in pg_stat_activity until ``done`` (bounded)."""
    async with await pgsd.connect(server.dsn()) as observer:
        while not done.is_set() and len(samples) < 10_000:
            cur = await observer.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                [application_name],
            )
            row = await cur.fetchone()
            assert row is not None
            samples.append(int(row[0]))


async def test_a_spike_on_an_idle_pool_is_served_in_order_within_max_size(
    pg_server: PostgresServer,
) -> None:
    server_samples: list[int] = []
    async with FaultProxy(pg_server.host, pg_server.port) as proxy:
        config = pgsd.DatabaseConfig.from_dsn(
            pg_server.dsn(), **proxy.dsn_params(), application_name=unique_name()
        )
        options = pgsd.PoolConfig(min_size=1, max_size=MAX_SIZE, acquire_timeout=ACQUIRE_TIMEOUT)
        async with pgsd.ConnectionPool(config, options) as pool:
            await pool.wait_ready()
            proxy.set_mode("delay", connect_delay=CONNECT_DELAY)
            spike = _Spike(pool)
            done = anyio.Event()
            with anyio.fail_after(ACQUIRE_TIMEOUT + 5):
                async with anyio.create_task_group() as sampling:
                    sampling.start_soon(
                        count_server_connections,
                        pg_server,
                        config.application_name,
                        server_samples,
                        done,
                    )
                    async with anyio.create_task_group() as tg:
                        for i in range(REQUESTS):
                            await tg.start(spike.request, i)
                    done.set()
            final = pool.stats()
        accepted = len(proxy.accept_times)

    # All served, none near its timeout.
    assert sorted(spike.granted) == list(range(REQUESTS))
    assert len(spike.waits) == REQUESTS
    assert max(spike.waits) < ACQUIRE_TIMEOUT
    # The spike outlasted what one connection could serve: some requests
    # waited for new connections, which took CONNECT_DELAY to open.
    assert max(spike.waits) >= CONNECT_DELAY
    assert final.timeouts == 0
    assert final.acquires == REQUESTS
    # First come, first served. Requests woken together resume in an order
    # the event loop picks (trio shuffles them on purpose), so the order in
    # which they resume is not the order in which the pool served them. What
    # each request checks is the pool's queue when it resumes: every request
    # that arrived before it was served already, so at most the requests that
    # arrived after it can still be waiting.
    assert len(spike.queue_at_grant) == REQUESTS
    for request, arrived_later, waiting in spike.queue_at_grant:
        assert waiting <= arrived_later, (request, arrived_later, waiting)
    # The resume order strays from the arrival order only among requests
    # served together: while one has yet to resume, the others can be handed
    # at most the MAX_SIZE - 1 other connections.
    for position, request in enumerate(spike.granted):
        assert abs(position - request) < MAX_SIZE, spike.granted
    # Grown to meet the spike, never beyond max_size: in connections
    # attempted (all at once, as the requests queued), in the pool's own
    # accounting, and on the server. How many of the attempts completed
    # while requests still waited depends on the machine's load.
    assert accepted == MAX_SIZE
    assert final.connections_opened <= MAX_SIZE
    assert max(s.size for s in spike.stats) > 1
    assert all(s.size + s.opening <= MAX_SIZE for s in spike.stats)
    assert server_samples
    assert max(server_samples) <= MAX_SIZE
