"""The tasks waiting for a connection: served in arrival order, timed out at their deadlines.

A waiter is parked on a one-shot `Waker` and woken exactly once, with a
connection or with an error. One task (`WaiterQueue.expire`) times out
every waiter at its deadline, so that waiting costs no cancel scope and no
timer per task. Waiters with the default timeout arrive in deadline order
and sit in a plain queue; those with their own timeout sit in a heap.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio

from .._backend import Waker
from .._errors import PoolTimeout
from .entry import Entry

if TYPE_CHECKING:
    from .pipeline import Statement

__all__ = ["Waiter", "WaiterQueue"]


class Waiter:
    """A task waiting for a connection: woken once, with a connection or an error."""

    __slots__ = ("deadline", "done", "entry", "error", "statement", "waker")

    def __init__(self, deadline: float, waker: Waker, statement: Statement | None = None) -> None:
        self.deadline = deadline
        #: A one-shot statement's: sent as soon as a pipeline has room for it.
        self.statement = statement
        self.done = False
        self.entry: Entry | None = None
        self.error: BaseException | None = None
        self.waker = waker

    def __lt__(self, other: Waiter) -> bool:
        return self.deadline < other.deadline


class WaiterQueue:
    """Waiters in arrival order (FIFO grants) and in deadline order (timeouts).

    Attributes:
        count: waiters not yet woken (the ``waiting`` gauge).
    """

    __slots__ = ("_default", "_fifo", "_others", "_scope", "_target", "count")

    def __init__(self) -> None:
        self._fifo: deque[Waiter] = deque()
        self._default: deque[Waiter] = deque()
        self._others: list[Waiter] = []
        self._scope: anyio.CancelScope | None = None
        self._target = float("inf")
        self.count = 0

    def add(
        self,
        deadline: float,
        waker: Waker,
        *,
        default_timeout: bool,
        statement: Statement | None = None,
    ) -> Waiter:
        """Queue a waiter; *default_timeout* says its deadline keeps arrival order."""
        waiter = Waiter(deadline, waker, statement)
        self._fifo.append(waiter)
        self.count += 1
        if default_timeout:
            self._default.append(waiter)
        else:
            heapq.heappush(self._others, waiter)
        if deadline < self._target and self._scope is not None:
            self._scope.cancel()  # the deadline task sleeps too long
        return waiter

    def grant(self, entry: Entry) -> bool:
        """Hand *entry* to the first waiter still waiting; False when there is none."""
        fifo = self._fifo
        while fifo:
            waiter = fifo.popleft()
            if waiter.done:
                continue
            waiter.done = True
            waiter.entry = entry
            self.count -= 1
            waiter.waker.set()
            self._forget_served()
            return True
        return False

    def take_statement(self) -> Statement | None:
        """The first waiter's statement, to send now, if the first waiter is a statement's.

        The waiter leaves the queue unwoken: its task wakes when the
        statement ends. None when nobody waits, or a borrower is first (it
        waits for a whole connection).
        """
        fifo = self._fifo
        while fifo and fifo[0].done:
            fifo.popleft()
        if not fifo or fifo[0].statement is None:
            return None
        waiter = fifo.popleft()
        waiter.done = True
        self.count -= 1
        self._forget_served()
        return waiter.statement

    def fail(self, waiter: Waiter, error: BaseException) -> None:
        """Wake *waiter* with *error*, unless it was woken already."""
        if not waiter.done:
            waiter.done = True
            waiter.error = error
            self.count -= 1
            waiter.waker.set()

    def fail_all(self, error: BaseException) -> None:
        """Wake every waiter with *error* and forget them."""
        for waiter in self._fifo:
            self.fail(waiter, error)
        self._fifo.clear()
        self._default.clear()
        self._others.clear()

    def abandon(self, waiter: Waiter) -> Entry | None:
        """A waiter was cancelled: the connection it was handed meanwhile, if any."""
        if not waiter.done:
            waiter.done = True
            self.count -= 1
            return None
        entry, waiter.entry = waiter.entry, None
        return entry

    def expire_due(self, now: float) -> None:
        """Time out every waiter whose deadline is *now* or earlier."""
        queue = self._default
        while queue and (queue[0].done or queue[0].deadline <= now):
            self.fail(queue.popleft(), PoolTimeout())
        heap = self._others
        while heap and (heap[0].done or heap[0].deadline <= now):
            self.fail(heapq.heappop(heap), PoolTimeout())
        fifo = self._fifo
        while fifo and fifo[0].done:
            fifo.popleft()

    def next_deadline(self) -> float:
        """The earliest deadline among the waiters (infinity when none)."""
        self._forget_served()
        target = float("inf")
        if self._default:
            target = self._default[0].deadline
        if self._others:
            target = min(target, self._others[0].deadline)
        return target

    async def expire(self, now: Callable[[], float]) -> None:
        """Run forever: time out waiters at their deadlines (the pool's deadline task)."""
        while True:
            self._target = self.next_deadline()
            with anyio.CancelScope() as scope:
                self._scope = scope
                await anyio.sleep_until(self._target)
            self._scope = None
            self.expire_due(now())

    def _forget_served(self) -> None:
        """Drop served waiters from the deadline queues (FIFO: they are at the front)."""
        queue = self._default
        while queue and queue[0].done:
            queue.popleft()
        heap = self._others
        while heap and heap[0].done:
            heapq.heappop(heap)
