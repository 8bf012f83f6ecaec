"""Reconnect delays: exponential, capped, with jitter."""

from __future__ import annotations

import random
from collections.abc import Callable

from ._config import PoolConfig

__all__ = ["Backoff"]


class Backoff:
    """The delays between failed connection attempts.

    The n-th delay (from 0) is ``min(reconnect_max, reconnect_initial *
    reconnect_multiplier ** n)``, shortened by a random fraction of up to
    ``reconnect_jitter`` so that many clients that lost the same server do
    not come back in step.
    """

    __slots__ = ("_attempt", "_base", "_config", "_random")

    def __init__(self, config: PoolConfig, *, rng: Callable[[], float] = random.random) -> None:
        self._config = config
        self._random = rng
        self._attempt = 0
        self._base = config.reconnect_initial

    @property
    def attempts(self) -> int:
        """Failed attempts since the last success."""
        return self._attempt

    def next_delay(self) -> float:
        """The delay before the next attempt; counts one more failure."""
        c = self._config
        base = min(c.reconnect_max, self._base)
        # Grow step by step and stop at the cap: no overflow, however long the outage.
        self._base = min(c.reconnect_max, self._base * c.reconnect_multiplier)
        self._attempt += 1
        return base * (1.0 - c.reconnect_jitter * self._random())

    def reset(self) -> None:
        """Start again from ``reconnect_initial`` (after a success)."""
        self._attempt = 0
        self._base = self._config.reconnect_initial
