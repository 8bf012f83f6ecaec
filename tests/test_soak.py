"""Stability soak: many acquire/release cycles, with queries and cancellations.

``TASKS`` tasks share a pool of ``MAX_SIZE`` for ``PGSD_SOAK_CYCLES`` cycles
(default 20,000, a few seconds), and stop by themselves after
``PGSD_SOAK_SECONDS`` (default 60) whatever the count. A cycle borrows a
connection and runs ``SELECT 1``, or runs nothing, or is cancelled in the
middle of a query, or is a waiter cancelled while it waits. Afterwards
nothing may have leaked: the process's memory grew less than 5 MB after a
warm-up, the server holds no connection of the pool once it is closed (and
never held more than ``MAX_SIZE``), and the statistics add up. ``just soak``
runs a million cycles on each backend and prints the figures (``-s``).
"""

from __future__ import annotations

import gc
import os
import random
import time
from pathlib import Path

import anyio
import psycopg
import pytest

import pgsd
from pgsd.testing import PostgresServer
from support import Tally, invariants_hold, wait_until_gone, watching

CYCLES = int(os.environ.get("PGSD_SOAK_CYCLES", "20000"))
SECONDS = float(os.environ.get("PGSD_SOAK_SECONDS", "60"))
TASKS = 50
MAX_SIZE = 5
#: Memory is measured after this fraction of the cycles, and at the end.
WARM_UP = 0.1
MAX_RSS_GROWTH = 5 * 1024 * 1024
#: The share of each kind of cycle; the rest run ``SELECT 1``.
NO_QUERY = 0.3
CANCELLED_MID_QUERY = 0.005
CANCELLED_WAITING = 0.01
#: The "tiny" deadline of the cancelled cycles, in seconds.
TINY = 0.001
SEED = 20_240_601
#: Bounds on a poll of the server: iterations, and their pace.
POLLS = 1000
POLL_PACE = 0.01
SAMPLE_PACE = 0.01

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.soak,
    # The run stops itself after SECONDS; closing and checking take far less than a minute.
    pytest.mark.timeout(SECONDS + 60),
]


def rss_bytes() -> int:
    """The process's resident memory, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class Soak:
    """Tasks that share one pool and run cycles until a count or a deadline."""

    def __init__(self, pool: pgsd.ConnectionPool) -> None:
        self.pool = pool
        self.tally = Tally()

    async def run(self, until: int, deadline: float) -> None:
        """Run cycles with TASKS tasks until ``until`` cycles in all, or ``deadline``."""
        async with anyio.create_task_group() as tg:
            for task in range(TASKS):
                rng = random.Random(SEED * 1000 + task + self.tally.cycles)
                tg.start_soon(self._task, until, deadline, rng)

    async def _task(self, until: int, deadline: float, rng: random.Random) -> None:
        tally = self.tally
        while tally.cycles < until and time.monotonic() < deadline:
            tally.cycles += 1
            draw = rng.random()
            if draw < CANCELLED_MID_QUERY:
                await self._cancelled_mid_query(inside=rng.random() < 0.5)
            elif draw < CANCELLED_MID_QUERY + CANCELLED_WAITING:
                await self._cancelled_waiting()
            elif draw < CANCELLED_MID_QUERY + CANCELLED_WAITING + NO_QUERY:
                async with self.pool.connection():
                    tally.lent += 1
            else:
                await self._select_1()

    async def _select_1(self) -> None:
        async with self.pool.connection() as conn:
            self.tally.lent += 1
            cur = await conn.execute("SELECT 1")
            assert await cur.fetchone() == (1,)
            self.tally.queries += 1

    async def _cancelled_mid_query(self, *, inside: bool) -> None:
        """A borrower whose deadline falls in the middle of a query.

        With ``inside``, the borrower catches its own timeout and returns
        the connection normally; otherwise the cancellation goes through the
        pool's exit.
        """
        with anyio.CancelScope() as outer:
            async with self.pool.connection() as conn:
                self.tally.lent += 1
                with anyio.CancelScope() as scope:
                    (scope if inside else outer).deadline = anyio.current_time() + TINY
                    await conn.execute("SELECT pg_sleep(1)")
        assert scope.cancelled_caught or outer.cancelled_caught
        self.tally.cancelled_mid_query += 1

    async def _cancelled_waiting(self) -> None:
        """A waiter with a tiny deadline: usually cancelled while it waits."""
        with anyio.move_on_after(TINY) as scope:
            async with self.pool.connection():
                # No checkpoint in here: once lent, the cycle completes.
                self.tally.lent += 1
        if scope.cancelled_caught:
            self.tally.cancelled_waiting += 1


async def wait_until_settled(pool: pgsd.ConnectionPool) -> None:
    """Cancelled queries are settled by the pool's own tasks: wait until all are back."""
    for _ in range(POLLS):
        if pool.stats().in_use == 0:
            return
        await anyio.sleep(POLL_PACE)
    raise AssertionError(f"connections still in use after the run: {pool.stats()}")


async def test_soak_of_acquire_release_cycles_leaks_nothing(
    pg_server: PostgresServer, anyio_backend: str
) -> None:
    config = pgsd.DatabaseConfig.from_dsn(
        pg_server.dsn(), application_name=f"pgsd_soak_{os.getpid()}_{anyio_backend}"
    )
    warm_up = max(1, int(CYCLES * WARM_UP))
    async with pgsd.ConnectionPool(config, pgsd.PoolConfig(max_size=MAX_SIZE)) as pool:
        await pool.wait_ready()
        soak = Soak(pool)
        deadline = time.monotonic() + SECONDS
        async with watching(
            pg_server, pool, pace=SAMPLE_PACE, max_samples=int((SECONDS + 60) / SAMPLE_PACE)
        ) as watch:
            await soak.run(warm_up, deadline)
            gc.collect()
            rss_start, start, warmed = rss_bytes(), time.monotonic(), soak.tally.cycles
            await soak.run(CYCLES, deadline)
            gc.collect()
            rss_end, elapsed = rss_bytes(), time.monotonic() - start
            await wait_until_settled(pool)
        stats = pool.stats()
        tally = soak.tally
        # Check the pool still lends clean connections, all at once.
        async with pool.connection() as a, pool.connection() as b:
            for conn in (a, b):
                assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
                cur = await conn.execute("SELECT 1")
                assert await cur.fetchone() == (1,)
    await wait_until_gone(pg_server, config.application_name)

    capped = tally.cycles < CYCLES
    measured = tally.cycles - warmed
    print(
        f"\nsoak [{anyio_backend}]: {tally.cycles:,} cycles"
        f"{f' (time cap of {SECONDS:g} s reached before {CYCLES:,})' if capped else ''};"
        f" after the warm-up {measured:,} cycles in {elapsed:.1f} s"
        f" = {measured / elapsed if elapsed else 0:,.0f} cycles/s;"
        f" RSS {rss_start / 2**20:.1f} MB after the warm-up,"
        f" {rss_end / 2**20:.1f} MB at the end ({(rss_end - rss_start) / 2**20:+.2f} MB);"
        f" {tally.queries:,} queries, {tally.cancelled_mid_query:,} cancelled mid-query,"
        f" {tally.cancelled_waiting:,} waiters cancelled;"
        f" at most {watch.most} server connections in {watch.samples:,} samples"
    )
    assert tally.cycles >= warm_up or capped
    assert rss_end - rss_start < MAX_RSS_GROWTH
    assert watch.samples > 0
    assert 0 < watch.most <= MAX_SIZE
    assert watch.broken == []
    # Every cycle borrowed once, except the waiters cancelled before they got one.
    assert stats.acquires == tally.lent == tally.cycles - tally.cancelled_waiting
    assert tally.cancelled_mid_query > 0
    assert tally.cancelled_waiting > 0
    assert stats.state == "up"
    assert stats.timeouts == 0
    assert stats.errors == 0
    assert stats.connections_lost == 0
    assert stats.connections_closed == 0
    assert stats.leaks == 0
    assert stats.waiting == 0
    assert stats.size == stats.idle <= MAX_SIZE
    assert invariants_hold(stats)
