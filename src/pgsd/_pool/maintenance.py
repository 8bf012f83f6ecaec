"""The pool's housekeeping: idle and lifetime expiry, leak reports, health checks.

One task ticks every second; each tick is synchronous and quick (expire,
report leaks, start health checks, top the pool up), so nothing in it waits
for the network. Health checks ping idle connections in tasks of their own,
at most `MAX_CHECKS` at a time: a black-holed network delays no expiry, no
leak report and no refill, only the checks themselves (each bounded by
`PING_TIMEOUT`).

A connection is checked when it has been neither used nor checked for
``health_check_interval`` seconds, or when the server sent it something
unasked (a terminated backend's last words). A passed check never counts as
use: idle expiry still counts from the last loan.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

import anyio
import anyio.abc
import psycopg

from .entry import PING_TIMEOUT, Entry
from .lending import take_back_interrupted

if TYPE_CHECKING:
    from .pool import ConnectionPool

__all__ = ["MAX_CHECKS", "TICK", "Maintenance"]

logger = logging.getLogger("pgsd.pool")

#: Seconds between two maintenance ticks.
TICK: Final = 1.0
#: Health checks running at once, per pool.
MAX_CHECKS: Final = 4


class Maintenance:
    """Runs one pool's housekeeping until `stop` (the pool's maintenance task)."""

    __slots__ = ("_checking", "_pool", "_scope", "_stopped")

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self._checking = 0
        self._scope: anyio.CancelScope | None = None
        self._stopped = anyio.Event()

    async def run_maintenance(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Tick until stopped; the health checks are this task's children."""
        try:
            with anyio.CancelScope() as self._scope:
                async with anyio.create_task_group() as checks:
                    task_status.started()
                    while True:
                        await anyio.sleep(TICK)
                        self.tick(checks)
        finally:
            self._stopped.set()

    async def stop(self) -> None:
        """Cancel the ticks and the checks under way, and wait until they have ended.

        A cancelled check gives its connection back (closed if the ping had
        started), so that closing the pool never closes a socket under a task.
        """
        if self._scope is not None:
            self._scope.cancel()
            await self._stopped.wait()

    def tick(self, checks: anyio.abc.TaskGroup) -> None:
        pool = self._pool
        pc = pool.pool_config
        now = pool._now()
        self._expire_idle(now)
        if pc.leak_threshold is not None:
            self._report_leaks(now, pc.leak_threshold)
        interval = pc.health_check_interval
        for entry in list(pool._idle):  # the longest idle first
            if self._checking >= MAX_CHECKS:
                break
            if now - max(entry.last_used, entry.checked) >= interval or entry.conn.input_pending():
                pool._idle.remove(entry)
                self._checking += 1
                checks.start_soon(self._check, entry)
        pool._filler.grow()

    def _expire_idle(self, now: float) -> None:
        """Close idle connections past their lifetime, or idle too long above ``min_size``."""
        pool = self._pool
        max_idle = pool.pool_config.max_idle
        for entry in list(pool._idle):
            too_old = now >= entry.expires
            too_idle = now - entry.last_used >= max_idle and len(pool._entries) > pool._min_size
            if too_old or too_idle:
                pool._idle.remove(entry)
                pool._discard(entry)

    async def _check(self, entry: Entry) -> None:
        pool = self._pool
        try:
            await entry.conn.ping(PING_TIMEOUT)
        except psycopg.Error:
            pool._counters.lost += 1
            pool._discard(entry)
        except BaseException:
            take_back_interrupted(pool, entry)
            raise
        else:
            entry.checked = pool._now()
            pool._put_back(entry)
        finally:
            self._checking -= 1

    def _report_leaks(self, now: float, threshold: float) -> None:
        pool = self._pool
        for entry in pool._entries:
            if entry.stack is None or entry.leak_reported:
                continue
            if now - entry.borrowed_at >= threshold:
                entry.leak_reported = True
                pool._counters.leaks += 1
                logger.warning(
                    "pool %r: a connection has been held for %.1f s (leak_threshold %g s);"
                    " it was borrowed at:\n%s",
                    pool.name,
                    now - entry.borrowed_at,
                    threshold,
                    "".join(entry.stack.format()),
                )
