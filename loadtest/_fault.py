"""The deliberate fault of a load test: a server restart or a network black hole.

Runs in the pgsd server process. The schedule is armed when the Locust run
starts (the ``fault`` request), fires ``at`` seconds later, and records its
window so that operations overlapping it can be told apart from the rest.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Final, Literal, get_args

import anyio
import anyio.abc

from pgsd.testing import FaultProxy, PostgresServer

__all__ = ["FAULT_MODES", "FaultMode", "FaultSchedule"]

logger = logging.getLogger("pgsd.loadtest")

FaultMode = Literal["none", "restart", "blackhole"]
FAULT_MODES: Final = tuple(get_args(FaultMode))


class FaultSchedule:
    """One fault, ``at`` seconds after :meth:`arm`, lasting ``duration`` seconds.

    * ``restart``: stop the embedded server (fast shutdown: every backend is
      terminated), keep it down for ``duration`` seconds, start it again on
      the same port.
    * ``blackhole``: switch the proxy between the pool and the server to
      black-hole every connection for ``duration`` seconds, then back to
      pass.

    The window runs from the moment the fault begins to the moment it ends
    (server accepting again, proxy forwarding again), on the
    ``time.perf_counter`` clock that operations are timed with.

    Raises:
        ValueError: ``restart`` without a server the process owns,
            ``blackhole`` without a proxy, or a negative time.
    """

    def __init__(
        self,
        mode: FaultMode,
        *,
        at: float,
        duration: float,
        server: PostgresServer | None = None,
        proxy: FaultProxy | None = None,
    ) -> None:
        if at < 0 or duration < 0:
            raise ValueError("--pgsd-fault-at and --pgsd-fault-duration must not be negative")
        if mode == "restart" and server is None:
            raise ValueError(
                "--pgsd-fault restart needs the embedded server: the harness restarts only"
                " a server it started (leave out --pgsd-dsn and --pgsd-config)"
            )
        if mode == "blackhole" and proxy is None:
            raise ValueError("--pgsd-fault blackhole needs the fault proxy")
        self.mode = mode
        self.at = at
        self.duration = duration
        self._server = server
        self._proxy = proxy
        self._armed_at: float | None = None
        self._start: float | None = None
        self._end: float | None = None
        self._wall_start: float | None = None
        self._wall_end: float | None = None
        self._error: str | None = None

    def arm(self, task_group: anyio.abc.TaskGroup) -> None:
        """Start the clock (once; later calls do nothing)."""
        if self.mode == "none" or self._armed_at is not None:
            return
        self._armed_at = time.perf_counter()
        task_group.start_soon(self._run, name="pgsd loadtest fault")

    @property
    def window(self) -> tuple[float, float | None] | None:
        """``(start, end)`` on the ``perf_counter`` clock; end None while it lasts; None before."""
        if self._start is None:
            return None
        return (self._start, self._end)

    def overlaps(self, start: float, end: float) -> bool:
        """Whether an operation that ran from ``start`` to ``end`` overlapped the window."""
        fault_start = self._start
        if fault_start is None or end < fault_start:
            return False
        return self._end is None or start <= self._end

    def describe(self) -> dict[str, Any]:
        """The schedule and, once it happened, the window (wall-clock seconds)."""
        armed = self._armed_at
        return {
            "mode": self.mode,
            "at": self.at,
            "duration": self.duration,
            "armed": armed is not None,
            "start": self._wall_start,
            "end": self._wall_end,
            "offset": None if armed is None or self._start is None else self._start - armed,
            "length": None if self._start is None or self._end is None else self._end - self._start,
            "error": self._error,
        }

    async def _run(self) -> None:
        await anyio.sleep(self.at)
        self._begin()
        try:
            if self.mode == "restart":
                await self._restart()
            else:
                await self._blackhole()
        except Exception as exc:  # the run goes on; the report shows what failed
            self._error = f"{type(exc).__name__}: {exc}"
            logger.exception("the %s fault failed", self.mode)
        finally:
            self._finish()

    def _begin(self) -> None:
        self._start = time.perf_counter()
        self._wall_start = time.time()
        logger.warning("fault: %s for %.1f s begins", self.mode, self.duration)

    def _finish(self) -> None:
        self._end = time.perf_counter()
        self._wall_end = time.time()
        assert self._start is not None
        logger.warning("fault: %s ended after %.2f s", self.mode, self._end - self._start)

    async def _restart(self) -> None:
        server = self._server
        assert server is not None
        # PostgresServer is synchronous: its waits must not stop the event loop.
        await anyio.to_thread.run_sync(server.stop)
        await anyio.sleep(self.duration)
        await anyio.to_thread.run_sync(server.start)

    async def _blackhole(self) -> None:
        proxy = self._proxy
        assert proxy is not None
        proxy.set_mode("blackhole")
        try:
            await anyio.sleep(self.duration)
        finally:
            proxy.set_mode("pass")
