"""Whether a database is up: its state, last error, backoff, fail-fast rule and callbacks."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from .._backoff import Backoff
from .._config import PoolConfig
from .._errors import fails_fast, redact, unreachable
from .._stats import PoolState

__all__ = ["Availability", "StateCallback"]

logger = logging.getLogger("pgsd.pool")

StateCallback = Callable[[str, BaseException | None], Any]
Spawn = Callable[[Callable[[], Coroutine[Any, Any, None]]], None]


class Availability:
    """One database's up/down state, as its connection attempts report it.

    ``opening`` until the first attempt ends, then ``up`` or ``down``;
    ``closed`` at the end. Going down and coming back are logged once and
    reported to the callbacks; while down, attempts are spaced by
    exponential backoff with jitter.

    Attributes:
        state: see `PoolState`.
        last_error: the last failed attempt's error, cleared by a success.
        down_since: when the database went down (the pool's clock).
        ever_up: whether an attempt ever succeeded.
        backoff: the delays between attempts.
    """

    __slots__ = (
        "_address",
        "_changed",
        "_name",
        "_now",
        "_on_down",
        "_on_recovered",
        "_spawn",
        "backoff",
        "down_since",
        "ever_up",
        "last_error",
        "state",
    )

    def __init__(
        self,
        name: str,
        address: str,
        pool_config: PoolConfig,
        *,
        on_down: StateCallback | None,
        on_recovered: StateCallback | None,
        changed: Callable[[], None],
    ) -> None:
        self._name = name
        self._address = address
        self._on_down = on_down
        self._on_recovered = on_recovered
        self._changed = changed
        self._now: Callable[[], float] = lambda: 0.0
        self._spawn: Spawn | None = None
        self.state: PoolState = "opening"
        self.last_error: BaseException | None = None
        self.down_since = 0.0
        self.ever_up = False
        self.backoff = Backoff(pool_config)

    def start(self, now: Callable[[], float], spawn: Spawn) -> None:
        """Use the pool's clock, and its task group for the callbacks."""
        self._now = now
        self._spawn = spawn

    def set_state(self, state: PoolState) -> None:
        self.state = state
        self._changed()

    def attempt_failed(self, error: BaseException, *, connections: int) -> None:
        """Record a failed attempt; the database goes down unless others are alive."""
        self.last_error = error
        if self.state in ("up", "opening") and (unreachable(error) or not connections):
            self.down_since = self._now()
            self.set_state("down")
            logger.warning(
                "pool %r: database %s is down, retrying with backoff: %s",
                self._name,
                self._address,
                redact(str(error)),
            )
            self._callback(self._on_down, error)

    def attempt_succeeded(self) -> None:
        """Record a successful attempt: up, backoff reset, recovery reported."""
        was = self.state
        self.ever_up = True
        self.backoff.reset()
        self.set_state("up")
        if was == "down":
            since = self._now() - self.down_since
            logger.info(
                "pool %r: database %s recovered after %.1f s", self._name, self._address, since
            )
            self._callback(self._on_recovered, None)
        self.last_error = None

    def fail_fast_error(self, *, connections: int) -> BaseException | None:
        """The last error, when the pool has no connection and waiting is unlikely to help."""
        error = self.last_error
        if error is None or connections:
            return None
        return error if fails_fast(error, ever_connected=self.ever_up) else None

    def describe(self) -> list[str]:
        """What a timeout message says about the database, secrets redacted."""
        parts = []
        if self.state == "down":
            parts.append(f"the database has been down for {self._now() - self.down_since:.1f} s")
        if self.last_error is not None and self.state != "up":
            parts.append(f"last connection error: {redact(str(self.last_error))}")
        return parts

    def _callback(self, callback: StateCallback | None, error: BaseException | None) -> None:
        if callback is None or self._spawn is None:
            return
        name = self._name

        async def run() -> None:
            try:
                result = callback(name, error)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("pool %r: state callback failed", name)

        self._spawn(run)
