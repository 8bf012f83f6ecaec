"""What the tasks of a scenario do, on the running event loop.

Nothing here imports pytest or a pool library: the same code runs inside
the benchmark session and in the child processes that measure memory.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import anyio
import anyio.abc

from clients import BenchPool

__all__ = [
    "Attempt",
    "HoldRound",
    "hold_round",
    "out_of_order",
    "percentile",
    "run_started_tasks",
    "run_tasks",
]


def _share(op: Callable[[], Awaitable[None]], total: int) -> Callable[[], Awaitable[None]]:
    """A task's loop: call ``op`` until ``total`` calls, shared by every task, are made."""
    remaining = total

    async def loop() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await op()

    return loop


async def run_tasks(op: Callable[[], Awaitable[None]], total: int, tasks: int) -> None:
    """Run ``op`` ``total`` times over ``tasks`` tasks, each looping until none are left."""
    worker = _share(op, total)
    async with anyio.create_task_group() as tg:
        for _ in range(tasks):
            tg.start_soon(worker)


async def run_started_tasks(
    op: Callable[[], Awaitable[None]],
    total: int,
    tasks: int,
    *,
    task_status: anyio.abc.TaskStatus[anyio.Event] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """As `run_tasks`, with the tasks started first: they wait for the event it reports.

    ``task_status.started(go)`` once every task is started and waits for
    ``go``; the operations begin when ``go`` is set, and the call returns
    when they are all done.
    """
    loop = _share(op, total)
    go = anyio.Event()
    waiting = 0
    all_waiting = anyio.Event()

    async def worker() -> None:
        nonlocal waiting
        waiting += 1
        if waiting == tasks:
            all_waiting.set()
        await go.wait()
        await loop()

    async with anyio.create_task_group() as tg:
        for _ in range(tasks):
            tg.start_soon(worker)
        await all_waiting.wait()
        task_status.started(go)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One request for a connection, on the round's event clock.

    The clock counts events (a task starting to wait, a connection being
    given back), so that the order of grants is the order in which the pool
    made them, not the order in which the event loop happened to resume
    the tasks: trio, for one, runs the tasks woken in one batch in either
    order.
    """

    #: When the task started waiting.
    asked: int
    #: When it was served: the release that freed the connection it got (or
    #: ``asked``, when the connection was already free); for a timeout, when
    #: the task saw the error.
    ended: int
    granted: bool
    #: Seconds from asking to holding the connection, or to the timeout error.
    wait: float


@dataclass(frozen=True)
class HoldRound:
    """One exhaustion round: every task's attempts and the round's duration."""

    attempts: list[Attempt]
    duration: float

    @property
    def grants(self) -> int:
        return sum(1 for attempt in self.attempts if attempt.granted)

    @property
    def timeouts(self) -> int:
        return len(self.attempts) - self.grants


async def hold_round(pool: BenchPool, tasks: int, holds: int, hold: float) -> HoldRound:
    """``tasks`` tasks each borrow a connection ``holds`` times and keep it ``hold`` s.

    The hold is a sleep with the connection in hand, not a query: every
    client then holds for the same time, with no driver or server work in
    it, so waits and their order are the pool's alone. A task that times out
    goes on to its next attempt.
    """
    clock = itertools.count()
    released_at: dict[int, int] = {}  # server pid -> clock at its last release
    attempts: list[Attempt] = []

    async def task() -> None:
        for _ in range(holds):
            asked = next(clock)
            start = time.perf_counter()
            try:
                async with pool.borrow() as pid:
                    wait = time.perf_counter() - start
                    served = max(released_at.get(pid, -1), asked)
                    attempts.append(Attempt(asked, served, True, wait))
                    await anyio.sleep(hold)
                    # Stamped before the pool takes it back: a pool that hands
                    # it straight to a waiter does so on the way out.
                    released_at[pid] = next(clock)
            except pool.timeout_errors:
                attempts.append(Attempt(asked, next(clock), False, time.perf_counter() - start))

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(tasks):
            tg.start_soon(task)
    return HoldRound(attempts, time.perf_counter() - start)


def out_of_order(attempts: Sequence[Attempt]) -> int:
    """How many grants went to a task while one that asked earlier still waited.

    ``attempts`` must come from one round (one clock). A grant is out of
    order when some attempt asked before it and ended (served or timed out)
    after it.
    """
    count = 0
    latest_end = -1  # the latest end among the attempts that asked earlier
    for attempt in sorted(attempts, key=lambda a: a.asked):
        if attempt.granted and latest_end > attempt.ended:
            count += 1
        latest_end = max(latest_end, attempt.ended)
    return count


def percentile(values: Sequence[float], pct: float) -> float:
    """The nearest-rank percentile (``pct`` in 0..100) of non-empty ``values``.

    Raises:
        ValueError: ``values`` is empty.
    """
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]
