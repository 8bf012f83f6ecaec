"""A pool's statistics: one frozen snapshot, taken at any time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["PoolState", "PoolStats"]

#: ``opening``: no connection attempt has finished yet; ``up``: the last one
#: succeeded; ``down``: the last one failed and the pool is retrying;
#: ``closed``: the pool was closed.
PoolState = Literal["opening", "up", "down", "closed"]


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
