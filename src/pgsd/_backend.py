"""The few event-loop primitives pgsd needs, for asyncio and for trio.

This is the only module that imports asyncio or trio. Everything else is
written once against anyio and these primitives, which exist because the
generic ones cost too much on the hot path:

* a clock (``loop.time`` / ``trio.current_time``, without anyio's dispatch);
* a one-shot wake-up (a future on asyncio, a task reschedule on trio), far
  cheaper than an ``anyio.Event``: the pool makes one per handover;
* a lock any task may release (psycopg's connection lock, see `Lock`);
* a socket wait. On asyncio, registering and removing a reader around every
  wait costs two ``epoll_ctl`` calls and the selector's bookkeeping, so the
  reader stays registered while the connection lives; it is removed when
  readiness arrives with nobody waiting (epoll is level-triggered), when the
  connection closes, and when libpq closes the socket by itself (a broken
  connection): a stale registration would make asyncio skip registering the
  next socket that reuses the number, and a wait on it would never end.

psycopg's queued COPY writer (``psycopg.copy.AsyncQueuedLibpqWriter``)
starts its worker with ``asyncio.create_task`` and queues through an
``asyncio.Queue``: `install_psycopg_shims` gives the module that holds it
versions of those three names that do exactly what psycopg's do under
asyncio and the same with trio's primitives under trio.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import math
import weakref
from collections import deque
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Final, Protocol, TypeVar

import sniffio
from anyio.lowlevel import checkpoint_if_cancelled

__all__ = ["Backend", "FdWaiter", "Lock", "Waker", "current_backend", "install_psycopg_shims"]


T = TypeVar("T")


class Waker(Protocol):
    """A one-shot wake-up for one waiting task."""

    def set(self) -> None:
        """Wake the waiter (now or when it starts waiting); idempotent."""

    async def wait(self) -> None:
        """Wait until :meth:`set`; cancellable."""


class FdWaiter(Protocol):
    """Waits on one socket."""

    async def readable(self) -> None:
        """Wait until the socket is readable (or closed by :meth:`close`)."""

    async def writable(self) -> None:
        """Wait until the socket is writable."""

    def close(self) -> None:
        """Stop watching before the socket is closed; wake a waiter with OSError."""

    def forget(self) -> None:
        """Stop watching a socket that was already closed (by libpq)."""


class Backend(Protocol):
    """The running event loop's primitives."""

    name: str
    time: Callable[[], float]

    def waker(self) -> Waker:
        """A new one-shot wake-up."""

    def fd_waiter(self, fileno: int) -> FdWaiter:
        """A waiter for the socket ``fileno``."""

    async def checkpoint(self) -> None:
        """Let other tasks run; raise if cancelled."""

    async def to_completion(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run ``fn()`` to its end, then raise a cancellation that came meanwhile.

        For clean-ups that are shielded and bounded inside ``fn``. A cancel
        scope (anyio's, trio's) cannot reach into a shielded scope; asyncio's
        own ``task.cancel()`` can, so on asyncio ``fn`` runs in a task of its
        own and such a cancellation waits for it, however often it comes. Its
        result is lost when a cancellation is raised: ``fn`` finishes its work
        itself.
        """


# -- asyncio -------------------------------------------------------------------


class _FutureWaker:
    __slots__ = ("_future",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._future: asyncio.Future[None] = loop.create_future()

    def set(self) -> None:
        if not self._future.done():
            self._future.set_result(None)

    async def wait(self) -> None:
        await self._future


def _closed_error() -> OSError:
    return OSError(errno.EBADF, "the connection's socket was closed")


class _AsyncioFdWaiter:
    __slots__ = ("_fileno", "_loop", "_reader", "_registered", "_unclaimed")

    def __init__(self, loop: asyncio.AbstractEventLoop, fileno: int) -> None:
        self._loop = loop
        self._fileno = fileno
        self._reader: asyncio.Future[None] | None = None
        self._registered = False
        self._unclaimed = 0

    def _on_readable(self) -> None:
        future, self._reader = self._reader, None
        if future is not None:
            self._unclaimed = 0
            if not future.done():
                future.set_result(None)
            return
        # Nobody waits. Once is normal: the woken task runs only in the next
        # loop iteration, after the selector has reported the same data
        # again. Twice in a row means data nobody will read soon (a notice,
        # a terminated backend): level-triggered, this would fire at every
        # iteration, so stop watching until the next wait.
        self._unclaimed += 1
        if self._unclaimed >= 2:
            self._unregister()

    def _register(self) -> None:
        loop = self._loop
        try:
            loop.add_reader(self._fileno, self._on_readable)
        except OSError:
            # A registration left by a socket closed behind asyncio's back.
            loop.remove_reader(self._fileno)
            loop.add_reader(self._fileno, self._on_readable)
        self._registered = True

    def _unregister(self) -> None:
        self._unclaimed = 0
        if self._registered:
            self._registered = False
            self._loop.remove_reader(self._fileno)

    async def readable(self) -> None:
        self._unclaimed = 0
        if not self._registered:
            self._register()
        future = self._reader = self._loop.create_future()
        try:
            await future
        finally:
            if self._reader is future:
                self._reader = None

    async def writable(self) -> None:
        loop = self._loop
        future: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not future.done():
                future.set_result(None)

        loop.add_writer(self._fileno, ready)
        try:
            await future
        finally:
            loop.remove_writer(self._fileno)

    def close(self) -> None:
        self._unregister()
        future, self._reader = self._reader, None
        if future is not None and not future.done():
            future.set_exception(_closed_error())

    def forget(self) -> None:
        # remove_reader on a closed descriptor is safe: the selector drops its
        # record and ignores the kernel's EBADF.
        self.close()


class _AsyncioBackend:
    name = "asyncio"

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.time = loop.time

    def waker(self) -> Waker:
        return _FutureWaker(self._loop)

    def fd_waiter(self, fileno: int) -> FdWaiter:
        return _AsyncioFdWaiter(self._loop, fileno)

    async def checkpoint(self) -> None:
        await asyncio.sleep(0)

    async def to_completion(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        task = self._loop.create_task(fn())
        cancelled: asyncio.CancelledError | None = None
        while True:
            try:
                result = await asyncio.shield(task)
            except asyncio.CancelledError as ex:  # noqa: ASYNC103 - raised below, once fn ends
                if task.done():
                    raise  # fn itself was cancelled (its own bound): not ours to hold
                cancelled = ex  # task.cancel() of the caller: after fn ends
                continue  # noqa: ASYNC104 - held, not swallowed: raised below
            break
        if cancelled is not None:
            raise cancelled
        return result


_asyncio_backends: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _AsyncioBackend] = (
    weakref.WeakKeyDictionary()
)


def _asyncio_backend() -> _AsyncioBackend:
    loop = asyncio.get_running_loop()
    backend = _asyncio_backends.get(loop)
    if backend is None:
        backend = _asyncio_backends[loop] = _AsyncioBackend(loop)
    return backend


# -- trio ------------------------------------------------------------------------

_trio_lowlevel: Any = None  # trio.lowlevel, set when the trio backend is first used
_trio_closed_error: Any = None  # trio.ClosedResourceError, likewise


class _TrioWaker:
    __slots__ = ("_done", "_task")

    def __init__(self) -> None:
        self._done = False
        self._task: Any = None

    def set(self) -> None:
        self._done = True
        task, self._task = self._task, None
        if task is not None:
            _trio_lowlevel.reschedule(task)

    async def wait(self) -> None:
        lowlevel = _trio_lowlevel
        if self._done:
            await lowlevel.checkpoint()
            return
        self._task = lowlevel.current_task()

        def abort(_: Any) -> Any:
            self._task = None
            return lowlevel.Abort.SUCCEEDED

        await lowlevel.wait_task_rescheduled(abort)


class _TrioFdWaiter:
    __slots__ = ("_fileno", "_lowlevel")

    def __init__(self, fileno: int) -> None:
        self._fileno = fileno
        self._lowlevel = _trio_lowlevel

    # trio wakes a task whose socket another task closes (close() below) with
    # trio.ClosedResourceError; the protocol promises OSError, as on asyncio.

    async def readable(self) -> None:
        try:
            await self._lowlevel.wait_readable(self._fileno)
        except _trio_closed_error as ex:
            raise _closed_error() from ex

    async def writable(self) -> None:
        try:
            await self._lowlevel.wait_writable(self._fileno)
        except _trio_closed_error as ex:
            raise _closed_error() from ex

    def close(self) -> None:
        self._lowlevel.notify_closing(self._fileno)

    def forget(self) -> None:
        pass  # trio keeps no registration between waits


class _TrioBackend:
    name = "trio"

    def __init__(self) -> None:
        global _trio_closed_error, _trio_lowlevel
        import trio  # only when trio runs: it is an optional dependency

        _trio_lowlevel = trio.lowlevel
        _trio_closed_error = trio.ClosedResourceError
        self.time = trio.current_time
        self._checkpoint = trio.lowlevel.checkpoint

    def waker(self) -> Waker:
        return _TrioWaker()

    def fd_waiter(self, fileno: int) -> FdWaiter:
        return _TrioFdWaiter(fileno)

    async def checkpoint(self) -> None:
        await self._checkpoint()

    async def to_completion(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        return await fn()  # a shielded scope inside fn is all trio needs


_trio_backend: _TrioBackend | None = None


def current_backend() -> Backend:
    """The primitives of the event loop running this task.

    Raises:
        RuntimeError: not inside asyncio or trio.
    """
    global _trio_backend
    library = sniffio.current_async_library()
    if library == "asyncio":
        return _asyncio_backend()
    if library == "trio":
        if _trio_backend is None:
            _trio_backend = _TrioBackend()
        return _trio_backend
    raise RuntimeError(f"pgsd runs under asyncio or trio, not {library}")


# -- the connection lock ---------------------------------------------------------


class Lock:
    """A FIFO lock that any task may release: what psycopg expects of its connection lock.

    psycopg guards each connection with an ``asyncio.Lock``, which breaks
    under trio once contended. anyio's lock runs on both, but remembers its
    owner: it refuses a release from another task and raises when its owner
    acquires it again. psycopg relies on neither: an async generator
    abandoned while it holds the lock (a ``cursor.stream()`` left early) is
    finalized, and releases the lock, in another task, possibly while the
    task that abandoned it is already waiting to acquire it again.

    Uncontended, acquiring does not wait or let other tasks run (as
    asyncio's lock); it only raises if the caller's scope is already
    cancelled, as anyio's lock does, so that nothing is sent to the server
    on behalf of a caller that is already cancelled. Contended, the lock is
    handed to the longest waiter.
    """

    __slots__ = ("_locked", "_waiters")

    def __init__(self) -> None:
        self._locked = False
        self._waiters: deque[Waker] = deque()

    def locked(self) -> bool:
        """Whether some task holds the lock."""
        return self._locked

    async def acquire(self) -> bool:
        """Acquire the lock, waiting in line if it is held; cancellable while waiting."""
        if not self._locked:
            await checkpoint_if_cancelled()
            self._locked = True
            return True
        waker = current_backend().waker()
        self._waiters.append(waker)
        try:
            await waker.wait()
        except BaseException:
            try:
                self._waiters.remove(waker)
            except ValueError:
                # Handed over just as the wait was cancelled: pass it on.
                self.release()
            raise
        return True

    def release(self) -> None:
        """Release the lock, handing it to the longest waiter if there is one.

        Raises:
            RuntimeError: the lock is not held.
        """
        if not self._locked:
            raise RuntimeError("the lock is not held")
        if self._waiters:
            self._waiters.popleft().set()  # ownership passes with the wake-up
        else:
            self._locked = False

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self.release()


# -- psycopg's asyncio-only helpers, made to run on trio too --------------------

#: The names in ``psycopg._copy_async`` that `install_psycopg_shims` replaces.
PSYCOPG_COPY_SHIMS: Final = ("aspawn", "agather", "AQueue")


class _TrioQueue:
    """The part of ``asyncio.Queue`` psycopg's queued COPY writer uses, on trio."""

    def __init__(self, maxsize: int = 0) -> None:
        import trio

        self._send, self._receive = trio.open_memory_channel[Any](maxsize or math.inf)

    async def put(self, item: Any) -> None:
        await self._send.send(item)

    async def get(self) -> Any:
        return await self._receive.receive()


class _TrioWorker:
    """A task started without a nursery, as ``asyncio.create_task`` starts one, on trio.

    It runs as a trio system task, in a copy of its creator's context (as
    asyncio's tasks do); its outcome is kept for `join`, as asyncio keeps a
    task's, instead of crashing the run.
    """

    def __init__(self, coro: Coroutine[Any, Any, None], name: str | None) -> None:
        import trio

        self._done = trio.Event()
        self._error: BaseException | None = None
        trio.lowlevel.spawn_system_task(
            self._run, coro, name=name, context=contextvars.copy_context()
        )

    async def _run(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except BaseException as ex:  # noqa: ASYNC103 (kept for join(), as asyncio keeps a task's outcome)
            self._error = ex
        finally:
            self._done.set()

    async def join(self) -> None:
        await self._done.wait()
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _running_trio() -> bool:
    try:
        return sniffio.current_async_library() == "trio"
    except sniffio.AsyncLibraryNotFoundError:
        return False


def install_psycopg_shims() -> None:
    """Let psycopg's queued COPY writer run on trio; under asyncio nothing changes.

    The replacements call psycopg's own helpers whenever trio is not the
    running library, so psycopg behaves exactly as before for every caller
    on asyncio, pgsd's or not. Idempotent.
    """
    from psycopg import _copy_async as module

    copy_async: Any = module
    if getattr(copy_async.aspawn, "_pgsd_shim", False):
        return
    spawn, gather, queue = copy_async.aspawn, copy_async.agather, copy_async.AQueue

    def aspawn(
        f: Callable[..., Coroutine[Any, Any, None]],
        args: tuple[Any, ...] = (),
        name: str | None = None,
    ) -> Any:
        if _running_trio():
            return _TrioWorker(f(*args), name)
        return spawn(f, args, name)

    async def agather(*tasks: Any, timeout: float | None = None) -> None:  # noqa: ASYNC109
        if not any(isinstance(task, _TrioWorker) for task in tasks):
            await gather(*tasks, timeout=timeout)
            return
        import trio

        with trio.move_on_after(math.inf if timeout is None else timeout):
            for task in tasks:
                await task.join()

    def aqueue(maxsize: int = 0) -> Any:
        return _TrioQueue(maxsize) if _running_trio() else queue(maxsize)

    aspawn._pgsd_shim = True  # type: ignore[attr-defined]
    copy_async.aspawn = aspawn
    copy_async.agather = agather
    copy_async.AQueue = aqueue
