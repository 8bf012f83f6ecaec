"""A pool's statistics: one frozen snapshot, taken at any time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["PoolCounters", "PoolState", "PoolStats"]

#: ``opening``: no connection attempt has finished yet; ``up``: the last one
#: succeeded; ``down``: the last one failed and the pool is retrying;
#: ``closed``: the pool was closed.
PoolState = Literal["opening", "up", "down", "paused", "closed"]


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


class PoolCounters:
    """The counters a pool keeps: plain slots, bumped in place on the hot path."""

    __slots__ = (
        "acquires",
        "closed",
        "depth_max",
        "errors",
        "leaks",
        "lost",
        "opened",
        "reconnects",
        "statements",
        "timeouts",
        "wait_max",
        "wait_total",
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

    def waited(self, seconds: float) -> None:
        """Count one acquire's wait."""
        self.wait_total += seconds
        if seconds > self.wait_max:
            self.wait_max = seconds

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
        )
