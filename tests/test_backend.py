"""The backend layer's primitives on asyncio and trio: the connection lock, psycopg's COPY helpers.

No server here: these are event-loop behaviours. What they are for is
tested against real servers in the parity suite (an abandoned ``stream()``,
the queued COPY writer on trio).
"""

from __future__ import annotations

import contextvars

import anyio
import anyio.lowlevel
import pytest
from psycopg import _copy_async

import pgsd._backend
from pgsd._backend import Lock, Waker, current_backend

pytestmark = pytest.mark.anyio


async def test_an_uncontended_lock_is_taken_without_letting_others_run() -> None:
    lock = Lock()
    ran = False

    async def other() -> None:
        nonlocal ran
        ran = True
        await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(other)
        await lock.acquire()
        assert lock.locked()
        assert not ran  # no checkpoint: the other task has not started
        lock.release()
    assert ran
    assert not lock.locked()


async def test_the_lock_is_handed_to_waiters_in_arrival_order() -> None:
    lock = Lock()
    order: list[int] = []

    async def take(i: int) -> None:
        async with lock:
            order.append(i)

    await lock.acquire()
    async with anyio.create_task_group() as tg:
        for i in range(5):
            tg.start_soon(take, i)
            await anyio.wait_all_tasks_blocked()
        lock.release()
    assert order == [0, 1, 2, 3, 4]
    assert not lock.locked()


async def test_another_task_may_release_the_lock() -> None:
    lock = Lock()
    await lock.acquire()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_release, lock)
        assert lock.locked()  # the other task has not run yet
    assert not lock.locked()


async def _release(lock: Lock) -> None:
    await anyio.lowlevel.checkpoint()
    lock.release()


async def test_the_holder_acquiring_again_waits_for_a_release_from_another_task() -> None:
    # As an asyncio.Lock: psycopg's abandoned stream() holds the lock in the
    # task that abandoned it, and releases it from the task that closes it.
    lock = Lock()
    await lock.acquire()
    got_it = False
    async with anyio.create_task_group() as tg:

        async def again() -> None:
            nonlocal got_it
            await lock.acquire()
            got_it = True

        tg.start_soon(again)
        await anyio.wait_all_tasks_blocked()
        assert not got_it
        lock.release()
    assert got_it
    lock.release()


async def test_acquiring_in_a_cancelled_scope_raises_and_leaves_the_lock_free() -> None:
    lock = Lock()
    with anyio.CancelScope() as scope:
        scope.cancel()
        await lock.acquire()
    assert scope.cancelled_caught
    assert not lock.locked()


async def test_a_waiter_cancelled_in_line_leaves_the_line() -> None:
    lock = Lock()
    order: list[str] = []
    await lock.acquire()
    async with anyio.create_task_group() as tg:
        scope = anyio.CancelScope()

        async def cancelled() -> None:
            with scope:
                async with lock:
                    order.append("cancelled")

        async def later() -> None:
            async with lock:
                order.append("later")

        tg.start_soon(cancelled)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(later)
        await anyio.wait_all_tasks_blocked()
        scope.cancel()
        await anyio.wait_all_tasks_blocked()
        lock.release()
    assert order == ["later"]
    assert not lock.locked()


async def test_a_waiter_cancelled_as_the_lock_is_handed_to_it_strands_nothing() -> None:
    lock = Lock()
    order: list[str] = []
    await lock.acquire()
    async with anyio.create_task_group() as tg:
        scope = anyio.CancelScope()

        async def first() -> None:
            with scope:
                async with lock:
                    order.append("first")

        async def second() -> None:
            async with lock:
                order.append("second")

        tg.start_soon(first)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(second)
        await anyio.wait_all_tasks_blocked()
        # Handed to the first waiter, which is cancelled before it runs: it
        # either takes the lock (the handover won) or passes it on.
        lock.release()
        scope.cancel()
    assert order[-1] == "second"
    assert not lock.locked()


class _Interrupted(BaseException):
    pass


class _LateInterruptedWaker:
    """Wakes, then raises: a cancellation delivered after the handover, as
    asyncio's task.cancel() does when it comes between the two."""

    def __init__(self, waker: Waker) -> None:
        self._waker = waker

    def set(self) -> None:
        self._waker.set()

    async def wait(self) -> None:
        await self._waker.wait()
        raise _Interrupted


async def test_a_waiter_interrupted_after_the_handover_passes_the_lock_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lock = Lock()
    await lock.acquire()
    order: list[str] = []
    backend = current_backend()

    class Backend:
        def waker(self) -> Waker:
            return _LateInterruptedWaker(backend.waker())

    async def first() -> None:
        with pytest.raises(_Interrupted):
            await lock.acquire()
        order.append("first interrupted")

    async def second() -> None:
        async with lock:
            order.append("second")

    async with anyio.create_task_group() as tg:
        monkeypatch.setattr(pgsd._backend, "current_backend", Backend)
        tg.start_soon(first)
        await anyio.wait_all_tasks_blocked()
        monkeypatch.undo()
        tg.start_soon(second)
        await anyio.wait_all_tasks_blocked()
        lock.release()
    assert order == ["first interrupted", "second"]
    assert not lock.locked()


def test_releasing_a_free_lock_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="not held"):
        Lock().release()


# --- psycopg's queued COPY writer's helpers --------------------------------------------

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")


async def test_the_copy_helpers_run_a_worker_and_a_queue_on_either_backend() -> None:
    queue = _copy_async.AQueue(maxsize=2)
    received: list[object] = []

    async def worker() -> None:
        received.append(request_id.get())
        while item := await queue.get():
            received.append(item)

    request_id.set("caller's")
    task = _copy_async.aspawn(worker)
    for item in (b"a", b"b", b"c", b""):  # more than maxsize: put() waits for the worker
        await queue.put(item)
    await _copy_async.agather(task)
    # The worker runs in a copy of its creator's context, as asyncio's tasks do.
    assert received == ["caller's", b"a", b"b", b"c"]


async def test_the_copy_helpers_hand_the_workers_error_to_the_join() -> None:
    async def worker() -> None:
        await anyio.lowlevel.checkpoint()
        raise ZeroDivisionError

    task = _copy_async.aspawn(worker)
    with pytest.raises(ZeroDivisionError):
        await _copy_async.agather(task)


def test_outside_an_event_loop_the_copy_queue_is_psycopgs_own() -> None:
    import asyncio

    assert isinstance(_copy_async.AQueue(), asyncio.Queue)


async def test_to_completion_runs_a_clean_up_to_its_end_whatever_cancels_its_caller(
    anyio_backend: str,
) -> None:
    """A cancel scope waits at a shield; asyncio's task.cancel() waits for the clean-up."""
    steps: list[str] = []
    release = anyio.Event()

    async def clean_up() -> str:
        with anyio.CancelScope(shield=True):
            steps.append("started")
            await release.wait()
            await anyio.lowlevel.checkpoint()
            steps.append("finished")
        return "done"

    async def caller() -> None:
        steps.append(await current_backend().to_completion(clean_up))

    if anyio_backend == "asyncio":
        import asyncio

        task = asyncio.get_running_loop().create_task(caller())
        await anyio.wait_all_tasks_blocked()
        for _ in range(3):  # however often
            task.cancel()
            await anyio.wait_all_tasks_blocked()
        assert steps == ["started"]
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert steps == ["started", "finished"]  # ended, then the cancellation was raised
        return
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(caller)
            await anyio.wait_all_tasks_blocked()
            scope.cancel()  # reaches the caller, not the shielded clean-up
            release.set()
    assert steps == ["started", "finished", "done"]  # a shield is all trio needs
