"""Taking a connection back: clean it, or replace it, without holding up the borrower.

The hot path (`ConnectionPool._return_now`) takes back a connection that is
idle, in autocommit and not expired, with no reset hook. Everything else
comes here: a query still running is cancelled on the server in the pool's
own task; an open or failed transaction is rolled back; the ``reset`` hook
runs; a connection the borrower's error condemned (`evicts`), or that
cannot be cleaned within ``cancel_grace``, is closed and replaced.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

import anyio

from .._backend import current_backend
from .._errors import evicts, redact
from .entry import ACTIVE, IDLE, Entry

if TYPE_CHECKING:
    from .pool import ConnectionPool

__all__ = ["release"]

logger = logging.getLogger("pgsd.pool")


async def release(pool: ConnectionPool, entry: Entry, exc: BaseException | None) -> None:
    """Take *entry* back from a borrower whose block ended with *exc* (or None)."""
    conn = entry.conn
    if exc is None and pool._return_now(entry):
        return
    pool._counters.used(pool._now() - entry.lent_at)
    if conn.unsettled and pool._task_group is not None:
        # The borrower was cancelled mid-query: cancel it on the server in
        # the pool's own task, so that the borrower is not held up.
        pool._task_group.start_soon(_settle, pool, entry)
        return
    extra = pool.pool_config.evict_sqlstates
    if evicts(exc, wants_primary=pool._wants_primary, extra=extra) or conn.closed or conn.broken:
        pool._counters.lost += 1
        pool._discard(entry)
        return
    # In the borrower's task: asyncio's own task.cancel() of the borrower, which
    # goes through _restore's shield, waits for it (or the entry is stranded).
    await current_backend().to_completion(functools.partial(_take_back, pool, entry))


async def _take_back(pool: ConnectionPool, entry: Entry) -> None:
    _keep_if_clean(pool, entry, await _restore(pool, entry))


async def _settle(pool: ConnectionPool, entry: Entry) -> None:
    """Cancel an interrupted query (bounded), then clean and take back or replace."""
    await entry.conn.settle()
    _keep_if_clean(pool, entry, not entry.conn.closed and await _restore(pool, entry))


def _keep_if_clean(pool: ConnectionPool, entry: Entry, clean: bool) -> None:
    if clean:
        entry.last_used = pool._now()
        pool._put_back(entry)
    else:
        pool._discard(entry)


async def _restore(pool: ConnectionPool, entry: Entry) -> bool:
    """Roll back, reset and check: shielded from cancellation, bounded by ``cancel_grace``."""
    conn = entry.conn
    if pool._now() >= entry.expires:
        return False
    with anyio.CancelScope(shield=True) as scope:
        scope.deadline = pool._now() + conn.cancel_grace
        try:
            status = conn.transaction_status
            if status == ACTIVE:
                return False  # the borrower left a command running
            if status != IDLE:
                await conn.rollback()
            if not conn.autocommit:
                await conn.set_autocommit(True)
            if pool.pool_config.reset is not None:
                await pool.pool_config.reset(conn)
        except Exception as ex:
            logger.warning(
                "pool %r: could not clean a returned connection, replacing it: %s",
                pool.name,
                redact(str(ex)),
            )
            return False
    if scope.cancel_called:
        logger.warning(
            "pool %r: a returned connection took over %.1f s to clean, replacing it",
            pool.name,
            conn.cancel_grace,
        )
        return False
    return not conn.closed and conn.transaction_status == IDLE and conn.autocommit
