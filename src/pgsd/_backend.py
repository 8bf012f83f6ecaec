"""The few event-loop primitives pgsd needs, for asyncio and for trio.

This is the only module that imports asyncio or trio. Everything else is
written once against anyio and these primitives, which exist because the
generic ones cost too much on the hot path:

* a clock (``loop.time`` / ``trio.current_time``, without anyio's dispatch);
* a one-shot wake-up (a future on asyncio, a task reschedule on trio), far
  cheaper than an ``anyio.Event``: the pool makes one per handover;
* a socket wait. On asyncio, registering and removing a reader around every
  wait costs two ``epoll_ctl`` calls and the selector's bookkeeping, so the
  reader stays registered while the connection lives; it is removed when
  readiness arrives with nobody waiting (epoll is level-triggered), when the
  connection closes, and when libpq closes the socket by itself (a broken
  connection): a stale registration would make asyncio skip registering the
  next socket that reuses the number, and a wait on it would never end.
"""

from __future__ import annotations

import asyncio
import errno
import weakref
from collections.abc import Callable
from typing import Any, Protocol

import sniffio

__all__ = ["Backend", "FdWaiter", "Waker", "current_backend"]


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

    async def readable(self) -> None:
        await self._lowlevel.wait_readable(self._fileno)

    async def writable(self) -> None:
        await self._lowlevel.wait_writable(self._fileno)

    def close(self) -> None:
        self._lowlevel.notify_closing(self._fileno)

    def forget(self) -> None:
        pass  # trio keeps no registration between waits


class _TrioBackend:
    name = "trio"

    def __init__(self) -> None:
        global _trio_lowlevel
        import trio  # only when trio runs: it is an optional dependency

        _trio_lowlevel = trio.lowlevel
        self.time = trio.current_time
        self._checkpoint = trio.lowlevel.checkpoint

    def waker(self) -> Waker:
        return _TrioWaker()

    def fd_waiter(self, fileno: int) -> FdWaiter:
        return _TrioFdWaiter(fileno)

    async def checkpoint(self) -> None:
        await self._checkpoint()


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
