"""Changing a running pool: `drain`, `resize`, `pause` and `resume`; `wait_ready`.

Each takes effect at once and costs the hot path nothing it did not pay
already: `ConnectionPool._put_back`, where every connection comes back,
closes one that was drained (`Entry.retired`) or that the pool no longer
has room for, and parks one while the pool is paused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio

from .._errors import PoolClosed
from .entry import Entry
from .lending import timeout_error

if TYPE_CHECKING:
    from .pool import ConnectionPool

__all__ = ["Operations"]

logger = logging.getLogger("pgsd.pool")


class Operations:
    """The run-time operations of `ConnectionPool`, and waiting for it to be ready."""

    async def wait_ready(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until the pool holds ``min_size`` connections (at once when it is 0).

        Raises:
            PoolTimeout: not ready within ``timeout`` (default
                ``acquire_timeout``); the message gives the last error.
            PoolClosed: the pool is closed.
            AuthenticationError, DatabaseNotFound: the first connection
                attempts failed in a way waiting cannot cure.
            TLSError, UnsupportedServerVersion: the same.
        """
        pool: ConnectionPool = self  # type: ignore[assignment]
        limit = pool._acquire_timeout if timeout is None else timeout
        with anyio.move_on_after(limit):
            while len(pool._entries) < pool._min_size:
                if pool._closed:
                    raise PoolClosed(f"pool {pool.name!r} is closed")
                error = pool._availability.fail_fast_error(connections=len(pool._entries))
                if error is not None:
                    raise error
                await pool._wait_changed()
            return
        raise timeout_error(pool, limit, "to open")

    async def drain(self) -> int:
        """Replace every connection: for new credentials, a new server behind a name, new settings.

        Idle connections are closed now, lent ones when they come back,
        pipelined ones once their statements are answered; new ones are
        opened (with the current credentials) as demand needs. Nobody waiting
        for a connection fails because of a drain. Returns when no old
        connection remains, or after ``close_timeout``.

        Returns:
            How many old connections were still out when it returned (0:
            all replaced); each is closed when it comes back.

        Raises:
            PoolClosed: the pool is closed.
        """
        pool: ConnectionPool = self  # type: ignore[assignment]
        _check_open(pool)
        old = set(pool._entries)
        for entry in old:
            entry.retired = True
        logger.info("pool %r: draining %d connections", pool.name, len(old))
        _close_idle(pool, lambda entry: entry.retired)
        with anyio.move_on_after(pool.pool_config.close_timeout):
            while old & pool._entries and not pool._closed:
                await pool._wait_changed()
        left = len(old & pool._entries)
        if left:
            logger.warning(
                "pool %r: %d drained connections still lent after %g s;"
                " each is closed when it comes back",
                pool.name,
                left,
                pool.pool_config.close_timeout,
            )
        return left

    def resize(self, min_size: int | None = None, max_size: int | None = None) -> None:
        """Change the pool's sizes now; the sizes not given stay.

        Growing opens connections as ``min_size`` and the demand call for.
        Shrinking closes idle connections first (the least recently used)
        and lent ones when they come back, until the pool holds no more than
        the new ``max_size``.

        Raises:
            ConfigError: the sizes are invalid, as `PoolConfig` checks them
                (``min_size`` above ``max_size``, ``max_size`` below 1...).
            PoolClosed: the pool is closed.
        """
        pool: ConnectionPool = self  # type: ignore[assignment]
        _check_open(pool)
        changes = {"min_size": min_size, "max_size": max_size}
        config = pool.pool_config.replace(**{k: v for k, v in changes.items() if v is not None})
        pool.pool_config = config
        pool._min_size = config.min_size
        pool._max_size = config.max_size
        excess = len(pool._entries) - config.max_size
        if excess > 0:
            _close_idle(pool, lambda entry: True, limit=excess)
        logger.info(
            "pool %r: resized to min_size %d, max_size %d",
            pool.name,
            config.min_size,
            config.max_size,
        )
        pool._filler.grow()
        pool._notify()

    def pause(self) -> None:
        """Stop lending and opening connections, for planned maintenance or a switchover.

        While paused, `connection()` and one-shot statements wait (their
        acquire timeouts run), no connection is opened, and connections
        already lent carry on; those given back wait for `resume`.
        ``stats().state`` is ``paused``. Pausing a paused pool does nothing.

        Raises:
            PoolClosed: the pool is closed.
        """
        pool: ConnectionPool = self  # type: ignore[assignment]
        _check_open(pool)
        if pool._paused:
            return
        pool._paused = True
        pool._parked.extend(pool._idle)
        pool._idle.clear()
        logger.info("pool %r: paused", pool.name)
        pool._notify()

    def resume(self) -> None:
        """Lend and open connections again, to the waiters first, in their order."""
        pool: ConnectionPool = self  # type: ignore[assignment]
        if not pool._paused:
            return
        pool._paused = False
        parked, pool._parked = list(pool._parked), type(pool._parked)()
        logger.info("pool %r: resumed", pool.name)
        for entry in parked:
            pool._put_back(entry)
        pool._filler.grow()
        pool._notify()


def _check_open(pool: ConnectionPool) -> None:
    if pool._closed:
        raise PoolClosed(f"pool {pool.name!r} is closed")


def _close_idle(pool: ConnectionPool, which: Callable[[Entry], bool], limit: int = -1) -> None:
    """Close up to *limit* (-1: all) idle or parked connections *which* selects, oldest first."""
    for queue in (pool._idle, pool._parked):
        for entry in list(queue):  # the least recently used first
            if limit == 0:
                return
            if which(entry):
                queue.remove(entry)
                pool._discard(entry)
                limit -= 1
