"""Read replicas of a pool's database: a pool per standby, their lag, and where reads go.

A database configured with ``replicas`` gets a `ReplicaSet` beside its
pool: one `ConnectionPool` per standby (sized by ``replica_pool``, healing
as any pool does), and a task that measures every standby's lag each
``check_interval``. Reads that ask for a replica (``read_only=True``) go
to a fresh one, the least busy first; writes never see them.

What "fresh" means: a standby is in recovery and has replayed everything
the primary had written at most ``max_replica_lag`` seconds ago. Every
interval the task samples the primary's WAL position, and asks every
standby how far it has replayed (each on its own beat: one that does not
answer delays no other); a standby's lag is how long ago the newest sample
it has replayed was taken, and it ages until the next check answers. An
idle primary's position does not move, so a standby that has replayed it
is fresh however old its last transaction is; a primary that cannot be
sampled adds no samples, so the lag it would vouch for grows until the
standbys stop qualifying (pgsd cannot know what a primary it does not
reach has written).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import deque
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.abc
import psycopg

from .._config import DatabaseConfig
from .._errors import NoReplicaAvailable, PgsdError, summary
from .lending import DeferredLease

if TYPE_CHECKING:
    from .._stats import PoolStats
    from .entry import ConnectionFactory
    from .pool import ConnectionPool

__all__ = ["ReplicaSet"]

logger = logging.getLogger("pgsd.pool")

#: The primary's WAL position, as bytes from the start (pg_lsn minus 0/0).
_PRIMARY_POSITION: Final = "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"
#: A standby's standing: in recovery, replayed position, a WAL receiver running.
_STANDBY_PROBE: Final = (
    "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn() - '0/0'::pg_lsn,"
    " EXISTS (SELECT FROM pg_stat_wal_receiver)"
)


def check_interval(max_lag: float) -> float:
    """Seconds between lag checks: a fifth of the bound, from 0.1 s to 1 s."""
    return min(1.0, max(0.1, max_lag / 5))


class Replica:
    """One standby: its pool and what its last check found."""

    __slots__ = ("checked_at", "config", "lag", "pool", "reason", "state", "streaming")

    def __init__(self, pool: ConnectionPool, config: DatabaseConfig) -> None:
        self.pool = pool
        self.config = config
        #: ``unknown``, ``fresh``, ``lagging``, ``promoted`` or ``down``.
        self.state = "unknown"
        self.lag: float | None = None
        self.streaming: bool | None = None
        self.reason = "not checked yet"
        #: When the last check that measured ``lag`` began.
        self.checked_at = 0.0

    def usable(self, now: float, max_lag: float) -> bool:
        """Fresh at its last check, and still: the lag grows while no check answers."""
        return (
            self.state == "fresh"
            and self.pool.state == "up"
            and (self.lag or 0.0) + (now - self.checked_at) <= max_lag
        )

    def why_not(self, now: float, max_lag: float) -> str:
        if self.state == "fresh" and self.pool.state != "up":
            return f"its pool is {self.pool.state}"
        if self.state == "fresh":
            return (
                f"not checked for {now - self.checked_at:.1f} s, so perhaps more than"
                f" max_replica_lag={max_lag:g} s behind"
            )
        return self.reason


class ReplicaSet:
    """The standbys of one primary pool, opened and closed with it."""

    def __init__(self, primary: ConnectionPool, factory: ConnectionFactory | None) -> None:
        from .pool import ConnectionPool

        config = primary.config
        pool_config = config.replica_pool or primary.pool_config
        self.primary = primary
        self.replicas = [
            Replica(ConnectionPool(rc, pool_config, name=rc.name, connection_factory=factory), rc)
            for rc in config.replica_configs()
        ]
        self.max_lag = config.max_replica_lag
        self.fallback = config.replica_fallback
        self.interval = check_interval(self.max_lag)
        #: A check that does not answer within this is a standby down.
        self.timeout = max(1.0, 2 * self.interval)
        self._samples: deque[tuple[float, int]] = deque()
        self._window = self.max_lag + 2 * self.interval + self.timeout
        self._turn = 0
        self._falling_back = False
        self._checked: anyio.Event | None = None
        self._stop: anyio.Event | None = None
        self._done: anyio.Event | None = None

    # -- lifecycle ---------------------------------------------------------------

    async def run_replicas(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Open every standby's pool, check them until stopped, then close them."""
        self._checked, self._stop, self._done = anyio.Event(), anyio.Event(), anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                for replica in self.replicas:
                    await tg.start(_keep_open, replica.pool)
                tg.start_soon(self._watch)
                task_status.started()
                await self._stop.wait()
                tg.cancel_scope.cancel()  # each pool's close is shielded and bounded
        finally:
            self._done.set()

    def stop(self) -> None:
        """Start closing every standby's pool (each within its own ``close_timeout``)."""
        if self._stop is not None:
            self._stop.set()

    async def wait_closed(self) -> None:
        """Wait until every standby's pool is closed (after `stop`)."""
        if self._done is not None:
            await self._done.wait()

    # -- checks ------------------------------------------------------------------

    async def _watch(self) -> None:
        """Sample the primary, and check each standby, each on its own beat.

        Independent loops: a standby that does not answer holds up neither
        the samples nor the other standbys' checks.
        """
        await self._sample()
        pending = len(self.replicas)

        async def check_loop(replica: Replica) -> None:
            nonlocal pending
            known = False
            while True:
                await self._check(replica)
                if not known and replica.state != "unknown":
                    # A standby behind the first sample (a primary that writes)
                    # is known at a later check, once samples are behind it.
                    known = True
                    pending -= 1
                    if pending == 0 and self._checked is not None:
                        self._checked.set()  # every standby's standing known
                await anyio.sleep(self.interval)

        async with anyio.create_task_group() as tg:
            for replica in self.replicas:
                tg.start_soon(check_loop, replica)
            while True:
                await anyio.sleep(self.interval)
                await self._sample()

    async def _sample(self) -> None:
        """Note the primary's WAL position, and forget samples older than needed."""
        now = self.primary._now()
        position = await self._primary_position()
        samples = self._samples
        if position is not None:
            samples.append((now, position))
        while len(samples) > 1 and samples[0][0] < now - self._window:
            samples.popleft()

    async def _primary_position(self) -> int | None:
        with anyio.move_on_after(self.timeout):
            try:
                return int(await self.primary.fetchval(_PRIMARY_POSITION))
            except (psycopg.Error, PgsdError) as ex:
                logger.debug(
                    "pool %r: no WAL position for lag checks: %s",
                    self.primary.name,
                    summary(ex),
                )
        return None

    async def _check(self, replica: Replica) -> None:
        started = self.primary._now()
        row: Any = None
        try:
            with anyio.fail_after(self.timeout):
                row = await replica.pool.fetchone(_STANDBY_PROBE)
        except TimeoutError:
            self._set(replica, "down", f"no answer to the lag check within {self.timeout:g} s")
            return
        except (psycopg.Error, PgsdError) as ex:
            self._set(replica, "down", summary(ex))
            return
        in_recovery, replayed, receiving = row
        self._note_streaming(replica, bool(in_recovery and receiving))
        if not in_recovery:
            replica.lag = None
            self._set(replica, "promoted", "not in recovery: promoted, no longer a standby")
            return
        replica.lag = lag = self._lag(started, int(replayed) if replayed is not None else None)
        replica.checked_at = started
        if lag is None:
            self._set(replica, "unknown", "its lag is unknown: the primary has not been sampled")
        elif lag < 0:
            replica.lag = None
            self._set(
                replica,
                "unknown",
                "behind every sample of the primary taken so far: its lag is not known yet",
            )
        elif lag > self.max_lag:
            self._set(
                replica,
                "lagging",
                f"{lag:.1f} s behind the primary (max_replica_lag={self.max_lag:g})",
            )
        else:
            self._set(replica, "fresh", "fresh")

    def _note_streaming(self, replica: Replica, streaming: bool) -> None:
        """Log a standby that stops (or starts again) receiving WAL from a primary.

        One that has stopped, from this primary or from any, is not passed
        over for that alone: it is fresh for as long as the primary writes
        nothing it has not replayed, and goes ``lagging`` when it writes.
        """
        if streaming != replica.streaming and replica.streaming is not None:
            if streaming:
                logger.info(
                    "replica %r of %r receives WAL again", replica.pool.name, self.primary.name
                )
            else:
                logger.warning(
                    "replica %r of %r receives no WAL (no WAL receiver runs): it is no"
                    " longer replicating, and goes stale once the primary writes",
                    replica.pool.name,
                    self.primary.name,
                )
        replica.streaming = streaming

    def _lag(self, at: float, replayed: int | None) -> float | None:
        """How long ago the primary had written no more than *replayed*.

        None without a sample, -1.0 when behind every sample while they
        cover less than ``max_lag``.
        """
        samples = self._samples
        if not samples or replayed is None:
            return None
        for taken, position in reversed(samples):
            if position <= replayed:
                return max(0.0, at - taken)
        # Behind every sample: at least as old as the oldest, more is unknown.
        # Past the bound that is enough to say; before it, it says nothing (-1).
        oldest = at - samples[0][0]
        return oldest if oldest > self.max_lag else -1.0

    def _set(self, replica: Replica, state: str, reason: str) -> None:
        if state != replica.state and not (replica.state == "unknown" and state == "fresh"):
            level = logging.INFO if state == "fresh" else logging.WARNING
            logger.log(level, "replica %r of %r: %s", replica.pool.name, self.primary.name, reason)
        replica.state = state
        replica.reason = reason

    # -- routing -----------------------------------------------------------------

    async def first_round(self) -> None:
        """Wait until every standby's standing is known (at most a check's timeout)."""
        if self._checked is not None and not self._checked.is_set():
            with anyio.move_on_after(self.timeout + 2 * self.interval):
                await self._checked.wait()

    async def route(self) -> ConnectionPool:
        """The pool a read goes to: a fresh standby's, the least busy first.

        Waits for the first round of checks (at most their timeout). With
        none fresh: the primary (logged once), or `NoReplicaAvailable`.
        """
        await self.first_round()
        now = self.primary._now()
        best: Replica | None = None
        best_load = math.inf
        count = len(self.replicas)
        self._turn = turn = (self._turn + 1) % count
        for offset in range(count):
            replica = self.replicas[(turn + offset) % count]
            if not replica.usable(now, self.max_lag):
                continue
            pool = replica.pool
            load = (len(pool._entries) - len(pool._idle) + pool._waiters.count) / pool._max_size
            if load < best_load:
                best, best_load = replica, load
        if best is not None:
            if self._falling_back:
                self._falling_back = False
                logger.info("pool %r: reads go to its replicas again", self.primary.name)
            return best.pool
        reasons = "; ".join(
            f"{r.pool.name} ({r.config.address}): {r.why_not(now, self.max_lag)}"
            for r in self.replicas
        )
        if self.fallback == "error":
            raise NoReplicaAvailable(
                f"pool {self.primary.name!r}: no replica can serve reads: {reasons}"
            )
        if not self._falling_back:
            self._falling_back = True
            logger.warning(
                "pool %r: no replica can serve reads, they go to the primary: %s",
                self.primary.name,
                reasons,
            )
        return self.primary

    def lease(self, timeout: float | None) -> DeferredLease:
        """``pool.connection(read_only=True)``: the pool is chosen on entering."""
        return DeferredLease(self.route, timeout)

    # -- reports -----------------------------------------------------------------

    def stats(self) -> tuple[PoolStats, ...]:
        return tuple(
            dataclasses.replace(
                r.pool.stats(), role="replica", lag_seconds=r.lag, replica_state=r.state
            )
            for r in self.replicas
        )


async def _keep_open(
    pool: ConnectionPool, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    async with pool:
        task_status.started()
        await anyio.sleep_forever()
