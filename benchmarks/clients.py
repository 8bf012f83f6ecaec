"""The pools under test, each behind the same small interface.

A scenario is written once against `BenchPool`: open a pool of a given size
on the running event loop, then call its operations. Adding a scenario that
needs a new operation means adding one method here per library.

Each library is imported only when its pool is first opened, so that a
process measuring one client's memory (``peak_rss.py``) loads that library
alone. Every pool is given the same PostgreSQL URL, which libpq (pgsd,
psycopg_pool) and asyncpg all accept as it is.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    import asyncpg  # type: ignore[import-untyped]
    import psycopg_pool

    import pgsd

__all__ = [
    "CLIENTS",
    "OPEN_TIMEOUT",
    "PEERS",
    "POINT_ROWS",
    "POINT_TABLE",
    "BenchPool",
    "Client",
    "client_named",
]

#: How long opening a pool may take until all its connections are up.
OPEN_TIMEOUT = 30.0
#: The point reads' table, and its rows' ids (1 to POINT_ROWS).
POINT_TABLE = "bench_point"
POINT_ROWS = 10_000
#: A point read by primary key, in each driver's placeholder style.
_POINT = f"SELECT id, name, team, created FROM {POINT_TABLE} WHERE id = "
_POINT_PSYCOPG = _POINT + "%s"
_POINT_ASYNCPG = _POINT + "$1"


class BenchPool(abc.ABC):
    """One library's pool, open on the current event loop."""

    #: What the library raises when ``acquire_timeout`` passes without a connection.
    timeout_errors: tuple[type[BaseException], ...]

    @classmethod
    @abc.abstractmethod
    def open(
        cls, url: str, size: int, *, acquire_timeout: float | None = None
    ) -> AbstractAsyncContextManager[BenchPool]:
        """Open a pool of ``size`` connections and wait until all are connected.

        ``acquire_timeout`` bounds each wait for a connection (default: the
        library's own default).
        """

    @abc.abstractmethod
    async def acquire_release(self) -> None:
        """Borrow a connection and give it back without using it."""

    @abc.abstractmethod
    async def select_one(self) -> None:
        """Borrow a connection, run ``SELECT 1``, read the row, give it back."""

    @abc.abstractmethod
    async def point_read(self, key: int) -> None:
        """Borrow a connection, read the row whose id is ``key``, give it back."""

    async def one_shot_select_one(self) -> None:
        """``SELECT 1`` the library's fastest way for one statement (default: borrowing)."""
        await self.select_one()

    async def one_shot_point_read(self, key: int) -> None:
        """The point read the library's fastest way for one statement (default: borrowing)."""
        await self.point_read(key)

    @abc.abstractmethod
    def size(self) -> int:
        """How many connections the pool holds now, lent or idle."""

    @abc.abstractmethod
    def borrow(self) -> AbstractAsyncContextManager[int]:
        """Hold a connection for the block; yields its server process id.

        The process id (known to the driver, no query) tells the pool's
        connections apart. Raises one of :attr:`timeout_errors` when no
        connection comes within the acquire timeout.
        """


class _PsycopgStylePool(BenchPool):
    """A pool lending psycopg connections with ``async with pool.connection()``.

    pgsd's pool and psycopg_pool's are used exactly alike here, so that only
    the pools differ between their columns.
    """

    _pool: Any

    async def acquire_release(self) -> None:
        async with self._pool.connection():
            pass

    async def select_one(self) -> None:
        async with self._pool.connection() as conn:
            cur = await conn.execute("SELECT 1")
            await cur.fetchone()

    async def point_read(self, key: int) -> None:
        async with self._pool.connection() as conn:
            cur = await conn.execute(_POINT_PSYCOPG, (key,))
            await cur.fetchone()

    @asynccontextmanager
    async def borrow(self) -> AsyncIterator[int]:
        async with self._pool.connection() as conn:
            yield conn.info.backend_pid


class PgsdPool(_PsycopgStylePool):
    def __init__(self, pool: pgsd.ConnectionPool) -> None:
        import pgsd

        self._pool = pool
        self.timeout_errors = (pgsd.PoolTimeout,)

    @classmethod
    @asynccontextmanager
    async def open(
        cls, url: str, size: int, *, acquire_timeout: float | None = None
    ) -> AsyncIterator[BenchPool]:
        import pgsd

        config = pgsd.DatabaseConfig.from_dsn(url)
        options: dict[str, Any] = {}
        if acquire_timeout is not None:
            options["acquire_timeout"] = acquire_timeout
        pool_config = pgsd.PoolConfig(min_size=size, max_size=size, **options)
        async with pgsd.ConnectionPool(config, pool_config) as pool:
            # Not the acquire timeout, which may be short: psycopg_pool's wait().
            await pool.wait_ready(timeout=OPEN_TIMEOUT)
            yield cls(pool)

    async def one_shot_select_one(self) -> None:
        await self._pool.fetchval("SELECT 1")

    async def one_shot_point_read(self, key: int) -> None:
        await self._pool.fetchone(_POINT_PSYCOPG, (key,))

    def size(self) -> int:
        return self._pool.stats().size


class PsycopgPool(_PsycopgStylePool):
    def __init__(self, pool: psycopg_pool.AsyncConnectionPool) -> None:
        import psycopg_pool

        self._pool = pool
        self.timeout_errors = (psycopg_pool.PoolTimeout,)

    @classmethod
    @asynccontextmanager
    async def open(
        cls, url: str, size: int, *, acquire_timeout: float | None = None
    ) -> AsyncIterator[BenchPool]:
        import psycopg_pool

        options: dict[str, Any] = {}
        if acquire_timeout is not None:
            options["timeout"] = acquire_timeout
        # Autocommit, as pgsd's connections are: otherwise every SELECT
        # opens a transaction that the pool rolls back on return.
        async with psycopg_pool.AsyncConnectionPool(
            url,
            min_size=size,
            max_size=size,
            kwargs={"autocommit": True},
            open=False,
            **options,
        ) as pool:
            await pool.wait(timeout=OPEN_TIMEOUT)
            yield cls(pool)

    def size(self) -> int:
        return self._pool.get_stats()["pool_size"]


class AsyncpgPool(BenchPool):
    def __init__(self, pool: asyncpg.Pool, acquire_timeout: float | None) -> None:
        self._pool = pool
        self._timeout = acquire_timeout
        # asyncpg's acquire timeout is asyncio's: the built-in TimeoutError.
        self.timeout_errors = (TimeoutError,)

    @classmethod
    @asynccontextmanager
    async def open(
        cls, url: str, size: int, *, acquire_timeout: float | None = None
    ) -> AsyncIterator[BenchPool]:
        import asyncpg

        # asyncpg's defaults otherwise, including the reset query it runs
        # on every release. It has no pool-wide acquire timeout (it waits
        # forever by default): each acquire is given it.
        with anyio.fail_after(OPEN_TIMEOUT):
            pool = await asyncpg.create_pool(url, min_size=size, max_size=size)
        async with pool:
            yield cls(pool, acquire_timeout)

    async def acquire_release(self) -> None:
        async with self._pool.acquire(timeout=self._timeout):
            pass

    async def select_one(self) -> None:
        async with self._pool.acquire(timeout=self._timeout) as conn:
            await conn.fetchval("SELECT 1")

    async def point_read(self, key: int) -> None:
        async with self._pool.acquire(timeout=self._timeout) as conn:
            await conn.fetchrow(_POINT_ASYNCPG, key)

    async def one_shot_select_one(self) -> None:
        # asyncpg's own one-statement API: acquire, run, release in one call
        # (its timeout bounds the query, not the acquire, which waits forever).
        await self._pool.fetchval("SELECT 1")

    async def one_shot_point_read(self, key: int) -> None:
        await self._pool.fetchrow(_POINT_ASYNCPG, key)

    def size(self) -> int:
        size: int = self._pool.get_size()
        return size

    @asynccontextmanager
    async def borrow(self) -> AsyncIterator[int]:
        async with self._pool.acquire(timeout=self._timeout) as conn:
            yield conn.get_server_pid()


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


def client_named(name: str) -> Client:
    """The client called ``name``.

    Raises:
        KeyError: no client has that name.
    """
    for client in CLIENTS:
        if client.name == name:
            return client
    raise KeyError(name)
