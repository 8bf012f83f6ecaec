"""Helpers the pool tests share: unique names, invariants, counting server connections."""

from __future__ import annotations

import itertools
import os
from typing import Any

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
