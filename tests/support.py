"""Helpers the pool tests share: unique names, invariants, counting server connections."""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import AsyncIterator
from typing import Any

import anyio
import psycopg

import pgsd
from pgsd.testing import PostgresServer

_names = itertools.count()


def unique_name(prefix: str = "pgsd_test") -> str:
    """A name no other test of this run uses (an application_name, a role...)."""
    return f"{prefix}_{os.getpid()}_{next(_names)}"


def db_config(
    server: PostgresServer, *, user: str | None = None, **overrides: Any
) -> pgsd.DatabaseConfig:
    """A config with an application_name of its own, to find its connections on the server."""
    overrides.setdefault("application_name", unique_name())
    return pgsd.DatabaseConfig.from_dsn(server.dsn(user=user), **overrides)


def invariants_hold(stats: pgsd.PoolStats) -> bool:
    """``size == idle + in_use``, ``size + opening <= max_size``, nothing negative."""
    return (
        stats.size == stats.idle + stats.in_use
        and stats.size + stats.opening <= stats.max_size
        and min(stats.size, stats.idle, stats.in_use, stats.opening, stats.waiting) >= 0
        and (stats.wait_time_max <= stats.wait_time_total or stats.acquires == 0)
    )


def assert_invariants(stats: pgsd.PoolStats) -> None:
    """Fail, showing the statistics, unless :func:`invariants_hold`."""
    assert invariants_hold(stats), stats


async def server_connections(server: PostgresServer, application_name: str) -> int:
    """How many connections with this application_name the server has now."""
    async with await pgsd.connect(server.dsn()) as observer:
        cur = await observer.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            [application_name],
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def wait_until_gone(server: PostgresServer, application_name: str) -> None:
    """Backends exit just after their client closes: poll, bounded in count."""
    for _ in range(1000):
        if await server_connections(server, application_name) == 0:
            return
    raise AssertionError(f"server connections of {application_name} did not go away")


class Watch:
    """Samples a pool until stopped: its server connections, and its statistics.

    ``most`` is the largest number of server connections seen with the
    pool's application_name (``pg_stat_activity``, through a connection of
    its own that is reopened after a fault); ``broken`` holds every
    statistics snapshot that breaks an invariant.
    """

    def __init__(
        self, server: PostgresServer, pool: pgsd.ConnectionPool, pace: float, max_samples: int
    ) -> None:
        self.server = server
        self.pool = pool
        self.pace = pace
        self.max_samples = max_samples
        self.most = 0
        self.samples = 0
        self.broken: list[pgsd.PoolStats] = []
        self._stopped = anyio.Event()

    def stop(self) -> None:
        self._stopped.set()

    async def run(self) -> None:
        observer: pgsd.Connection | None = None
        try:
            for _ in range(self.max_samples):
                if self._stopped.is_set():
                    return
                stats = self.pool.stats()
                if not invariants_hold(stats):
                    self.broken.append(stats)
                observer = await self._sample(observer)
                with anyio.move_on_after(self.pace):
                    await self._stopped.wait()
        finally:
            if observer is not None:
                await observer.close()

    async def _sample(self, observer: pgsd.Connection | None) -> pgsd.Connection | None:
        try:
            if observer is None:
                observer = await pgsd.connect(self.server.dsn(connect_timeout=1))
            cur = await observer.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                [self.pool.config.application_name],
            )
            row = await cur.fetchone()
        except (pgsd.ConnectError, psycopg.Error):
            # The server is down or restarting: none of the pool's
            # connections is on it now. Reconnect at the next sample.
            if observer is not None:
                await observer.close()
            return None
        assert row is not None
        self.most = max(self.most, int(row[0]))
        self.samples += 1
        return observer


@contextlib.asynccontextmanager
async def watching(
    server: PostgresServer, pool: pgsd.ConnectionPool, *, pace: float, max_samples: int
) -> AsyncIterator[Watch]:
    """Run a :class:`Watch` beside the block, every ``pace`` seconds, bounded in count."""
    watch = Watch(server, pool, pace, max_samples)
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch.run)
        try:
            yield watch
        finally:
            watch.stop()
