"""Growing the pool: how many connections are wanted, and the attempts that open them.

Attempts are tasks in the pool's task group. While the database is up they
run side by side, as many as the demand (lent connections plus waiters,
at least ``min_size``, at most ``max_size``) calls for; while it is down,
one at a time, spaced by the backoff. A new connection is checked (server
version, the ``configure`` hook) before the pool sees it.
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Any

import anyio

from .._connection import Connection
from .._errors import PgsdError, UnsupportedServerVersion
from .._version import get_version
from .entry import IDLE, ConnectionFactory, Entry

if TYPE_CHECKING:
    from .pool import ConnectionPool

__all__ = ["Filler"]

logger = logging.getLogger("pgsd.pool")


class Filler:
    """Opens connections for one pool, up to what its demand wants.

    Attributes:
        opening: attempts under way (the ``opening`` gauge).
    """

    __slots__ = ("_factory", "_pool", "_version_logged", "opening")

    def __init__(self, pool: ConnectionPool, factory: ConnectionFactory) -> None:
        self._pool = pool
        self._factory = factory
        self._version_logged = False
        self.opening = 0

    def wanted_size(self) -> int:
        """The connections the demand (lent and waited for) and ``min_size`` call for."""
        pool = self._pool
        demand = len(pool._entries) - len(pool._idle) + pool._waiters.count
        return max(pool._min_size, min(pool._max_size, demand))

    def grow(self) -> None:
        """Start attempts up to the wanted size."""
        pool = self._pool
        size = len(pool._entries)
        if size + self.opening >= pool._max_size or pool._closed or pool._task_group is None:
            return  # full (the usual case under load), closed, or not open
        if pool._paused:
            return
        missing = self.wanted_size() - size - self.opening
        if pool._availability.state == "down":
            # One attempt at a time while the server is away, with backoff.
            missing = min(missing, 1 - self.opening)
        for _ in range(missing):
            self.opening += 1
            pool._task_group.start_soon(self._attempt)

    def _still_wanted(self) -> bool:
        """Whether an attempt under way is still needed (counting itself)."""
        pool = self._pool
        return not pool._closed and len(pool._entries) + self.opening <= self.wanted_size()

    async def _attempt(self) -> None:
        """Open one connection, retrying with backoff while it is wanted."""
        pool = self._pool
        availability = pool._availability
        added = False
        try:
            while not pool._closed and not pool._paused:
                if availability.state == "down":
                    pool._counters.reconnects += 1
                started = pool._now()
                try:
                    conn = await self._connect()
                except Exception as ex:
                    self._failed(ex)
                    # While the server is away one attempt at a time is enough.
                    if not self._still_wanted() or (
                        availability.state == "down" and self.opening > 1
                    ):
                        return
                    await anyio.sleep(availability.backoff.next_delay())
                    continue
                pool._counters.connected(pool._now() - started)
                self.opening -= 1
                added = True
                self._add(conn)
                return
        finally:
            if not added:
                self.opening -= 1
                pool._notify()

    async def _connect(self) -> Connection[Any]:
        pool = self._pool
        pc = pool.pool_config
        conn = await self._factory(pool.config)
        try:
            num = conn.info.server_version
            if num < pc.min_server_version:
                raise UnsupportedServerVersion(
                    num, minimum=pc.min_server_version, database=pool.name
                )
            if not self._version_logged:
                # Claimed before the await: connections open concurrently.
                self._version_logged = True
                try:
                    version = await get_version(conn)
                except BaseException:
                    self._version_logged = False
                    raise
                logger.info(
                    "pool %r: %s at %s",
                    pool.name,
                    version.text.split(" on ")[0],
                    pool.config.address,
                )
            if pc.configure is not None:
                await pc.configure(conn)
                if conn.transaction_status != IDLE:
                    raise PgsdError(
                        f"pool {pool.name!r}: the configure hook left a transaction open"
                    )
        except BaseException:
            conn.abort()
            raise
        return conn

    def _add(self, conn: Connection[Any]) -> None:
        pool = self._pool
        pool._counters.opened += 1
        if pool._closed:
            pool._counters.closed += 1
            conn.abort()
            return
        if pool._availability.state != "up":
            pool._availability.attempt_succeeded()
        pc = pool.pool_config
        lifetime = pc.max_lifetime * (1.0 - pc.lifetime_jitter * random.random())
        entry = Entry(conn, pool._now(), lifetime)
        conn.settle_later = True
        pool._entries.add(entry)
        pool._put_back(entry)
        # wait_ready() counts connections: wake it even when a waiter got this one.
        pool._notify()

    def _failed(self, error: BaseException) -> None:
        pool = self._pool
        pool._counters.errors += 1
        availability = pool._availability
        availability.attempt_failed(error, connections=len(pool._entries))
        if availability.fail_fast_error(connections=len(pool._entries)) is error:
            pool._waiters.fail_all(error)
