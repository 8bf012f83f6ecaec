"""Event loops on virtual time: a test of scheduling runs in no wall-clock time.

When every task waits, the clock jumps to the next timer. On trio that is
`trio.testing.MockClock` with ``autojump_threshold=0``; on asyncio it is
`VirtualTimeLoop`, whose clock stands still while tasks run and whose
selector, when nothing is ready, moves it forward by the time it was asked
to block instead of blocking. Only
for code that waits on timers and on other tasks, never on sockets or
threads: a socket's answer does not come sooner because the clock jumped.
"""

from __future__ import annotations

import asyncio
import selectors
from typing import Any

import trio.testing

__all__ = ["VirtualTimeLoop", "virtual_backend"]


class _JumpingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        ready = super().select(0)
        if ready or (timeout is not None and timeout <= 0):
            return ready  # type: ignore[no-any-return]
        if timeout is None:
            return super().select(None)  # type: ignore[no-any-return]
        self._loop.jumped += timeout
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An asyncio loop whose clock jumps to the next timer whenever all tasks wait."""

    def __init__(self) -> None:
        self.jumped = 0.0
        super().__init__(_JumpingSelector(self))

    def time(self) -> float:
        return self.jumped  # the clock moves only when it jumps, as trio's MockClock


def virtual_backend(name: str) -> tuple[str, dict[str, Any]]:
    """An ``anyio_backend`` value: *name* (asyncio or trio) on a fresh virtual clock."""
    if name == "asyncio":
        return ("asyncio", {"loop_factory": VirtualTimeLoop})
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})
