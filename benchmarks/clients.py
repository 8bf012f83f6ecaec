"""The pools under test, each behind the same small interface.

A scenario is written once against `BenchPool`: open a pool of a given size
on the running event loop, then call its operations. Adding a scenario that
needs a new operation means adding one method here per library.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import psycopg_pool
from psycopg.conninfo import conninfo_to_dict

import pgsd

__all__ = ["CLIENTS", "PEERS", "BenchPool", "Client"]


class BenchPool(abc.ABC):
    """One library's pool, open on the current event loop."""

    @classmethod
    @abc.abstractmethod
    def open(cls, dsn: str, size: int) -> AbstractAsyncContextManager[BenchPool]:
        """Open a pool of ``size`` connections and wait until all are connected."""

    @abc.abstractmethod
    async def acquire_release(self) -> None:
        """Borrow a connection and give it back without using it."""

    @abc.abstractmethod
    async def select_one(self) -> None:
        """Borrow a connection, run ``SELECT 1``, read the row, give it back."""


class PgsdPool(BenchPool):
    def __init__(self, pool: pgsd.ConnectionPool) -> None:
        self._pool = pool

    @classmethod
    @asynccontextmanager
    async def open(cls, dsn: str, size: int) -> AsyncIterator[BenchPool]:
        config = pgsd.DatabaseConfig.from_dsn(dsn)
        async with pgsd.ConnectionPool(
            config, pgsd.PoolConfig(min_size=size, max_size=size)
        ) as pool:
            await pool.wait_ready()
            yield cls(pool)

    async def acquire_release(self) -> None:
        async with self._pool.connection():
            pass

    async def select_one(self) -> None:
        async with self._pool.connection() as conn:
            cur = await conn.execute("SELECT 1")
            await cur.fetchone()


class PsycopgPool(BenchPool):
    def __init__(self, pool: psycopg_pool.AsyncConnectionPool) -> None:
        self._pool = pool

    @classmethod
    @asynccontextmanager
    async def open(cls, dsn: str, size: int) -> AsyncIterator[BenchPool]:
        # Autocommit, as pgsd's connections are: otherwise every SELECT
        # opens a transaction that the pool rolls back on return.
        async with psycopg_pool.AsyncConnectionPool(
            dsn, min_size=size, max_size=size, kwargs={"autocommit": True}, open=False
        ) as pool:
            await pool.wait()
            yield cls(pool)

    async def acquire_release(self) -> None:
        async with self._pool.connection():
            pass

    async def select_one(self) -> None:
        async with self._pool.connection() as conn:
            cur = await conn.execute("SELECT 1")
            await cur.fetchone()


class AsyncpgPool(BenchPool):
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    @asynccontextmanager
    async def open(cls, dsn: str, size: int) -> AsyncIterator[BenchPool]:
        # asyncpg's defaults otherwise, including the reset query it runs
        # on every release.
        async with asyncpg.create_pool(
            min_size=size, max_size=size, **_asyncpg_params(dsn)
        ) as pool:
            yield cls(pool)

    async def acquire_release(self) -> None:
        async with self._pool.acquire():
            pass

    async def select_one(self) -> None:
        async with self._pool.acquire() as conn:
            await conn.fetchval("SELECT 1")


#: libpq keywords and the names asyncpg gives them.
_ASYNCPG_KEYWORDS = {
    "host": "host",
    "port": "port",
    "dbname": "database",
    "user": "user",
    "password": "password",
}


def _asyncpg_params(dsn: str) -> dict[str, Any]:
    """asyncpg takes URLs, not libpq's key=value strings: pass the parts."""
    params = conninfo_to_dict(dsn)
    out = {theirs: params[ours] for ours, theirs in _ASYNCPG_KEYWORDS.items() if ours in params}
    if "port" in out:
        out["port"] = int(str(out["port"]))
    return out


@dataclass(frozen=True)
class Client:
    """A library on an event loop: one column of every comparison."""

    name: str
    backend: str
    pool: type[BenchPool]

    @property
    def is_pgsd(self) -> bool:
        return self.pool is PgsdPool


CLIENTS = (
    Client("pgsd-asyncio", "asyncio", PgsdPool),
    Client("pgsd-trio", "trio", PgsdPool),
    Client("psycopg_pool", "asyncio", PsycopgPool),
    Client("asyncpg", "asyncio", AsyncpgPool),
)
#: The clients pgsd's figures are divided by.
PEERS = tuple(client.name for client in CLIENTS if not client.is_pgsd)
