"""Driving psycopg's and libpq's non-blocking generators on anyio.

psycopg's generators say which socket they wait on and for what (read,
write or both); they are resumed with what the socket became ready for.
This module does the waiting with the backend's socket waits
(``anyio.wait_readable`` / ``anyio.wait_writable``), so the same generators
run under asyncio and trio:

* `Driver` drives a generator on a connection's socket (queries, COPY,
  notifications) and can resume it after a cancellation;
* `drive_conn` drives one that names its own socket (connect, cancel),
  optionally bounded by a timeout;
* `connect_gen` and `cancel_gen` are libpq's non-blocking connect and
  cancel, as generators for `drive_conn`;
* `poll_ready` tells whether a socket is ready now, without waiting.
"""

from __future__ import annotations

import select
from collections.abc import Awaitable, Callable
from time import monotonic
from typing import Any, Final, TypeVar

import anyio
from psycopg import errors as e
from psycopg import pq
from psycopg._encodings import conninfo_encoding
from psycopg.abc import PQGen, PQGenConn
from psycopg.waiting import Ready, Wait

from ._backend import FdWaiter, current_backend

__all__ = [
    "WAIT_R",
    "Driver",
    "cancel_gen",
    "connect_gen",
    "drive_conn",
    "poll_ready",
]

RV = TypeVar("RV")

WAIT_R: Final = Wait.R
_WAIT_W: Final = Wait.W
_READY_R: Final = Ready.R
_READY_W: Final = Ready.W
_POLL_OK: Final = pq.PollingStatus.OK
_POLL_READING: Final = pq.PollingStatus.READING
_POLL_WRITING: Final = pq.PollingStatus.WRITING
_POLL_FAILED: Final = pq.PollingStatus.FAILED
_BAD: Final = pq.ConnStatus.BAD


def poll_ready(fileno: int, state: int) -> int:
    """The readiness of ``fileno`` right now, without waiting."""
    events = (select.POLLIN if state & WAIT_R else 0) | (select.POLLOUT if state & _WAIT_W else 0)
    poller = select.poll()
    poller.register(fileno, events)
    ready = 0
    for _, ev in poller.poll(0):
        if ev & (select.POLLIN | select.POLLERR | select.POLLHUP):
            ready |= _READY_R
        if ev & select.POLLOUT:
            ready |= _READY_W
    return ready


async def _wait_either(waiter: FdWaiter) -> int:
    """Wait until the socket is readable or writable; return which."""
    result = 0

    async def wait(ready: Callable[[], Awaitable[None]], flag: int, scope: Any) -> None:
        nonlocal result
        await ready()
        result |= flag
        scope.cancel()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait, waiter.readable, _READY_R, tg.cancel_scope)
            tg.start_soon(wait, waiter.writable, _READY_W, tg.cancel_scope)
    except* OSError as group:
        # The socket was closed under both waits: one error, as a single wait gives.
        raise group.exceptions[0] from None  # noqa: ASYNC123 (an OSError is all it says)
    return result


async def _wait_fd(waiter: FdWaiter, fileno: int, state: int) -> int:
    """Wait until the socket is ready for ``state``; return the readiness."""
    if state == WAIT_R:
        await waiter.readable()
        return _READY_R
    # A socket asked for writing is nearly always writable: a zero-timeout
    # poll is cheaper than a trip through the event loop.
    ready = poll_ready(fileno, state)
    if ready:
        await anyio.lowlevel.checkpoint()
        return ready
    if state == _WAIT_W:
        await waiter.writable()
        return _READY_W
    # Read and write: libpq must be able to read while its send buffer is
    # full, or both ends could block on each other.
    return await _wait_either(waiter)


class Driver:
    """Drives one psycopg generator, remembering where it stopped.

    Kept as an object so that, when the caller is cancelled, the same
    generator can be resumed to read the server's answer to the cancel
    request.
    """

    __slots__ = ("gen", "state")

    def __init__(self, gen: PQGen[Any]) -> None:
        self.gen = gen
        self.state: int | None = None

    async def run(self, waiter: FdWaiter, fileno: int, deadline: float | None = None) -> Any:
        """Drive the generator to its end; with a ``deadline``, as psycopg's ``wait_async``.

        Like psycopg, at the deadline the generator is given what the socket
        holds once more, so that data already there is processed and a
        timeout of 0 polls once instead of returning nothing.

        Raises:
            psycopg.errors._WaitTimeout: the deadline passed first.
        """
        global _last_cancel_check, _last_yield
        gen = self.gen
        try:
            if self.state is not None:
                state = self.state
            else:
                try:
                    state = next(gen)
                except StopIteration as ex:
                    # Done with what libpq had already read (the rows of a
                    # stream(), a COPY round): psycopg's rule, let the loop
                    # run at least every _MAX_BUSY seconds, or a long stream
                    # starves every other task and ignores cancellation.
                    if monotonic() - _last_yield >= _MAX_BUSY:
                        await anyio.lowlevel.checkpoint()
                        _last_yield = monotonic()
                    return ex.value
            while True:
                self.state = state
                if deadline is None:
                    ready = await _wait_fd(waiter, fileno, state)
                else:
                    try:
                        ready = await _wait_fd_until(
                            current_backend().time, deadline, waiter, fileno, state
                        )
                    except e._WaitTimeout:
                        ready = poll_ready(fileno, state)
                        if not ready:
                            raise
                        gen.send(ready)  # done in time if this raises StopIteration
                        raise
                now = _last_yield = monotonic()
                if now - _last_cancel_check >= _MAX_BUSY:
                    # A socket that is always ready (rows pouring in) makes
                    # every wait end at once, and anyio on asyncio does not
                    # cancel a task whose wait has just ended: look for a
                    # cancellation now and then, or it would never land.
                    _last_cancel_check = now
                    await anyio.lowlevel.checkpoint_if_cancelled()
                state = gen.send(ready)
        except StopIteration as ex:
            return ex.value
        except OSError as ex:
            raise e.OperationalError("connection socket closed") from ex


#: The longest the loop is kept busy by generators that need not wait (psycopg's
#: figure), and the longest a cancellation may wait for a busy connection to see it.
_MAX_BUSY: Final = 0.005
# When a wait last let the event loop run; when one last looked for a cancellation.
_last_yield = 0.0
_last_cancel_check = 0.0


async def drive_conn(gen: PQGenConn[RV], timeout: float | None = None) -> RV:  # noqa: ASYNC109
    """Drive a generator that names its own socket (connect, cancel).

    Each wait registers the socket afresh and drops the registration when it
    ends: within one attempt libpq may close its socket and open another
    (``sslmode=prefer`` or ``allow`` and ``gssencmode=prefer`` retry on a new
    socket when the server refuses the first try), usually under the same
    number, and a registration kept across that would watch a socket that no
    longer exists.

    Raises:
        psycopg.errors._WaitTimeout: ``timeout`` seconds passed first.
    """
    backend = current_backend()
    deadline = None if timeout is None else backend.time() + timeout
    try:
        fileno, state = next(gen)
        while True:
            waiter = backend.fd_waiter(fileno)
            try:
                if deadline is None:
                    ready = await _wait_fd(waiter, fileno, state)
                else:
                    ready = await _wait_fd_until(backend.time, deadline, waiter, fileno, state)
            finally:
                waiter.forget()
            fileno, state = gen.send(ready)
    except StopIteration as ex:
        rv: RV = ex.value
        return rv
    except OSError as ex:
        raise e.OperationalError("connection socket closed") from ex


#: The longest single timer of a bounded wait. A timer outlives a wait that
#: ends early (asyncio and trio both drop cancelled timers lazily), so a
#: bounded wait is made of short ones: a connect that has returned leaves no
#: timer behind for longer than this, whatever its ``connect_timeout``.
_WAIT_SLICE: Final = 0.1


async def _wait_fd_until(
    clock: Callable[[], float], deadline: float, waiter: FdWaiter, fileno: int, state: int
) -> int:
    """`_wait_fd`, giving up at ``deadline``.

    Raises:
        psycopg.errors._WaitTimeout: the deadline passed first.
    """
    while True:
        remaining = deadline - clock()
        if remaining <= 0:
            raise e._WaitTimeout("wait timeout expired")
        with anyio.move_on_after(min(_WAIT_SLICE, remaining)):
            return await _wait_fd(waiter, fileno, state)


def connect_gen(pgconn: pq.abc.PGconn, conninfo: str) -> PQGenConn[None]:
    """libpq's non-blocking connect, as psycopg's, except that the caller owns ``pgconn``.

    psycopg's generator makes its PGconn itself and leaves it to the garbage
    collector when abandoned (a timeout); here the caller finishes it at
    once. psycopg's errors carry a copy of the failed PGconn's parameters,
    password included; these carry the PGconn itself, which the caller
    finishes, so the error holds no secret.
    """
    while True:
        if pgconn.status == _BAD:
            message = pgconn.get_error_message(conninfo_encoding(conninfo))
            raise e.OperationalError(f"connection is bad: {message}", pgconn=pgconn)
        status = pgconn.connect_poll()
        if status == _POLL_OK:
            break
        if status in (_POLL_READING, _POLL_WRITING):
            wait = WAIT_R if status == _POLL_READING else _WAIT_W
            while not (yield pgconn.socket, wait):
                pass
        elif status == _POLL_FAILED:
            message = pgconn.get_error_message(conninfo_encoding(conninfo))
            raise e.OperationalError(f"connection failed: {message}", pgconn=pgconn)
        else:
            raise e.InternalError(f"unexpected poll status: {status}", pgconn=pgconn)
    pgconn.nonblocking = 1


def cancel_gen(pgconn: pq.abc.PGconn) -> PQGenConn[None]:
    """Send a cancel request without blocking (libpq 17 and later)."""
    cancel_conn = pgconn.cancel_conn()
    try:
        cancel_conn.start()
        while True:
            status = cancel_conn.poll()
            if status == _POLL_OK:
                return
            if status == _POLL_FAILED:
                raise e.OperationalError(f"cancellation failed: {cancel_conn.get_error_message()}")
            wait = WAIT_R if status == _POLL_READING else _WAIT_W
            while not (yield cancel_conn.socket, wait):
                pass
    finally:
        # Also when abandoned at the grace deadline: never leak the socket.
        cancel_conn.finish()
