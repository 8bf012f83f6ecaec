"""A pool's statistics: one frozen snapshot, taken at any time."""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass
from typing import Any, Final, Literal

__all__ = ["BUCKETS", "Histogram", "PoolCounters", "PoolState", "PoolStats"]

#: The upper bounds (seconds, inclusive) of every histogram's buckets; one
#: more bucket holds what lies above the last. Fixed, so that dashboards can
#: add histograms across pools and processes.
BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


@dataclass(frozen=True, slots=True)
class Histogram:
    """A distribution of durations in seconds, in the fixed `BUCKETS`.

    Attributes:
        bounds: the buckets' upper bounds (`BUCKETS`).
        counts: how many durations fell in each bucket (not cumulative):
            ``counts[i]`` those above ``bounds[i - 1]`` and at most
            ``bounds[i]``; the last, one more than the bounds, those above
            the last bound.
        sum: the durations' total.
    """

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        """How many durations were recorded."""
        return sum(self.counts)

    def quantile(self, q: float) -> float:
        """An upper bound on the *q* quantile (0 to 1): its bucket's bound.

        0.0 when nothing was recorded; infinity when it lies above the
        last bound.
        """
        total = self.count
        if total == 0:
            return 0.0
        rank = max(1, math.ceil(q * total))
        seen = 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            seen += count
            if seen >= rank:
                return bound
        return math.inf


def _empty() -> list[int]:
    return [0] * (len(BUCKETS) + 1)


PoolState = Literal["opening", "up", "down", "paused", "closed"]
"""A pool's state: ``opening``, no connection attempt has finished yet; ``up``,
the last one succeeded; ``down``, the last one failed and the pool is
retrying; ``paused``, `ConnectionPool.pause` stopped lending; ``closed``, the
pool was closed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolStats:
    """A snapshot of one pool.

    Gauges describe this instant; counters count since the pool opened.
    Invariant: ``size == idle + in_use``, and ``size + opening <= max_size``
    (connections being opened are counted in ``opening``, not in ``size``).

    Attributes:
        name: the database's name.
        state: see :data:`PoolState`.
        min_size: the configured minimum.
        max_size: the configured maximum.
        size: open connections (gauge).
        idle: open connections waiting to be lent (gauge).
        in_use: connections lent out or being checked or cleaned (gauge).
        opening: connection attempts under way (gauge).
        waiting: tasks waiting for a connection (gauge).
        acquires: connections lent.
        wait_time_total: seconds spent waiting by all acquires.
        wait_time_max: the longest single wait, in seconds.
        timeouts: acquires that ended with ``PoolTimeout``.
        errors: failed connection attempts.
        connections_opened: connections opened.
        connections_closed: connections closed (for any reason).
        connections_lost: connections found broken (server gone, terminated,
            failed ping) and replaced.
        reconnect_attempts: connection attempts made while the database was
            down.
        leaks: connections reported as held longer than ``leak_threshold``.
        statements: one-shot statements answered (`fetchall` and the others).
        statements_in_flight: one-shot statements sent and not yet answered
            (gauge).
        pipeline_depth_max: the most one-shot statements in flight on one
            connection at once.
        wait_time: how long acquires waited for a connection (those served
            at once count as 0), as a `Histogram`.
        use_time: how long lent connections were held, from lending to
            their return.
        connect_time: how long opening each new connection took.
        role: ``"primary"``, or ``"replica"`` for a read replica's pool.
        lag_seconds: a replica's lag behind its primary at its last check
            (None for a primary, or a replica not measured yet).
        replica_state: a replica's standing at its last check: ``"fresh"``
            (serves reads), ``"lagging"``, ``"promoted"``, ``"down"`` or
            ``"unknown"`` (not checked yet); None for a primary.
        replicas: a primary's read replicas, each a snapshot of its own pool.
    """

    name: str
    state: PoolState
    min_size: int
    max_size: int
    size: int
    idle: int
    in_use: int
    opening: int
    waiting: int
    acquires: int
    wait_time_total: float
    wait_time_max: float
    timeouts: int
    errors: int
    connections_opened: int
    connections_closed: int
    connections_lost: int
    reconnect_attempts: int
    leaks: int
    statements: int
    statements_in_flight: int
    pipeline_depth_max: int
    wait_time: Histogram
    use_time: Histogram
    connect_time: Histogram
    role: str = "primary"
    lag_seconds: float | None = None
    replica_state: str | None = None
    replicas: tuple[PoolStats, ...] = ()


class PoolCounters:
    """The counters a pool keeps: plain slots, bumped in place on the hot path."""

    __slots__ = (
        "acquires",
        "closed",
        "connect_counts",
        "connect_sum",
        "depth_max",
        "errors",
        "leaks",
        "lost",
        "observer",
        "opened",
        "reconnects",
        "statements",
        "timeouts",
        "use_counts",
        "use_quick",
        "use_sum",
        "wait_counts",
        "wait_max",
        "wait_total",
        "waits",
    )

    def __init__(self) -> None:
        self.acquires = 0
        self.wait_total = 0.0
        self.wait_max = 0.0
        self.timeouts = 0
        self.errors = 0
        self.opened = 0
        self.closed = 0
        self.lost = 0
        self.reconnects = 0
        self.leaks = 0
        self.statements = 0
        self.depth_max = 0
        #: Bucket counts of the acquires that waited (those served at once are
        #: ``acquires - waits``, added to the first bucket in a snapshot).
        self.wait_counts = _empty()
        self.waits = 0
        #: Bucket counts and sum of use times; the hot path bumps them itself.
        self.use_counts = _empty()
        self.use_quick = 0  # holds within the first bucket, counted apart on the hot path
        self.use_sum = 0.0
        self.connect_counts = _empty()
        self.connect_sum = 0.0
        #: Told of each wait, use and connect time while the pool is
        #: instrumented (`pgsd.opentelemetry`); None otherwise.
        self.observer: Any = None

    def waited(self, seconds: float) -> None:
        """Count one acquire's wait."""
        self.wait_total += seconds
        if seconds > self.wait_max:
            self.wait_max = seconds
        self.wait_counts[bisect_left(BUCKETS, seconds)] += 1
        self.waits += 1

    def used(self, seconds: float) -> None:
        """Count how long a connection was held (the hot path inlines this)."""
        self.use_counts[bisect_left(BUCKETS, seconds)] += 1
        self.use_sum += seconds
        if self.observer is not None:
            self.observer.used(seconds)

    def connected(self, seconds: float) -> None:
        """Count how long opening a connection took."""
        self.connect_counts[bisect_left(BUCKETS, seconds)] += 1
        self.connect_sum += seconds
        if self.observer is not None:
            self.observer.connected(seconds)

    def snapshot(
        self,
        *,
        name: str,
        state: PoolState,
        min_size: int,
        max_size: int,
        size: int,
        idle: int,
        opening: int,
        waiting: int,
        in_flight: int,
    ) -> PoolStats:
        """The counters with the pool's gauges, frozen."""
        return PoolStats(
            name=name,
            state=state,
            min_size=min_size,
            max_size=max_size,
            size=size,
            idle=idle,
            in_use=size - idle,
            opening=opening,
            waiting=waiting,
            acquires=self.acquires,
            wait_time_total=self.wait_total,
            wait_time_max=self.wait_max,
            timeouts=self.timeouts,
            errors=self.errors,
            connections_opened=self.opened,
            connections_closed=self.closed,
            connections_lost=self.lost,
            reconnect_attempts=self.reconnects,
            leaks=self.leaks,
            statements=self.statements,
            statements_in_flight=in_flight,
            pipeline_depth_max=self.depth_max,
            wait_time=self._wait_histogram(),
            use_time=self._use_histogram(),
            connect_time=Histogram(BUCKETS, tuple(self.connect_counts), self.connect_sum),
        )

    def _use_histogram(self) -> Histogram:
        counts = list(self.use_counts)
        counts[0] += self.use_quick
        return Histogram(BUCKETS, tuple(counts), self.use_sum)

    def _wait_histogram(self) -> Histogram:
        counts = list(self.wait_counts)
        counts[0] += max(0, self.acquires - self.waits)  # served at once: no wait
        return Histogram(BUCKETS, tuple(counts), self.wait_total)
