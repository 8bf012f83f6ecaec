"""psycopg's AsyncConnection, driven by anyio on asyncio and trio alike.

psycopg 3 waits on its socket through asyncio (``loop.add_reader``), guards
the connection with an ``asyncio.Lock``, resolves host names through
asyncio and, when a query is interrupted, cancels it and then waits again
without a deadline. :class:`Connection` replaces each of these pieces:

* ``wait()`` drives psycopg's non-blocking generators with
  ``anyio.wait_readable`` / ``anyio.wait_writable``, so every psycopg feature
  built on it (cursors, server-side cursors, transactions, pipeline mode,
  COPY, notifications) runs under asyncio and trio;
* ``connect()`` drives libpq's connect poll the same way, resolves host
  names with anyio, and bounds every attempt by ``connect_timeout``;
* the lock is an anyio lock;
* cancellation is bounded: when the caller's cancel scope fires while a
  query runs, the server is sent a cancel request and the connection gets
  ``cancel_grace`` seconds to become idle; if it does not, it is closed.
  The cancellation then propagates.

Two helper modules do the lower-level work: ``._driver`` drives psycopg's
and libpq's non-blocking generators on the backend's socket waits, and
``._attempts`` resolves host names and makes the connection attempts.

This relies on a few psycopg internals (listed in ``PSYCOPG_INTERNALS``);
the supported psycopg versions are pinned in pyproject.toml and a test
checks that each internal is still there.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Final, TypeVar, overload

import anyio
import psycopg
from psycopg import errors as e
from psycopg import generators, pq
from psycopg._capabilities import capabilities
from psycopg.abc import PQGen
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import AsyncRowFactory, Row, TupleRow
from psycopg.transaction import OutOfOrderTransactionNesting

from ._attempts import DEFAULT_CONNECT_TIMEOUT, as_seconds, attempt_timeout, connect_pgconn
from ._backend import FdWaiter, Lock, current_backend, install_psycopg_shims
from ._config import DatabaseConfig
from ._credentials import fetch_password
from ._driver import WAIT_R, Driver, cancel_gen, drive_conn, poll_ready
from ._errors import connect_error_from, redact
from ._internals import PSYCOPG_CONNECTION_ATTRIBUTES, PSYCOPG_INTERNALS

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "PSYCOPG_CONNECTION_ATTRIBUTES",
    "PSYCOPG_INTERNALS",
    "Connection",
    "attempt_timeout",
    "connect",
]

logger = logging.getLogger("pgsd.connection")

install_psycopg_shims()

RV = TypeVar("RV")

_ACTIVE: Final = pq.TransactionStatus.ACTIVE
#: libpq's transaction statuses by number (0 to 4): a lookup, not an enum call.
_TRANSACTION_STATUSES: Final = tuple(sorted(pq.TransactionStatus, key=int))
_BAD: Final = pq.ConnStatus.BAD
_COPY_STATES: Final = frozenset(
    (pq.ExecStatus.COPY_IN, pq.ExecStatus.COPY_OUT, pq.ExecStatus.COPY_BOTH)
)

#: Seconds a cancelled query may take to stop before its connection is closed.
DEFAULT_CANCEL_GRACE: Final = 2.0


class Connection(psycopg.AsyncConnection[Row]):
    """A psycopg ``AsyncConnection`` that runs under asyncio and trio.

    Everything psycopg's connection offers works the same on both backends.
    On top of it, cancellation is bounded: if the task running a query is
    cancelled, a cancel request goes to the server and the connection has
    ``cancel_grace`` seconds to become idle, after which it is closed.
    """

    __module__ = "pgsd"

    #: Seconds a cancelled query may take to stop before the connection is closed.
    cancel_grace: float = DEFAULT_CANCEL_GRACE
    # Set while pinging: an interrupted ping closes the connection at once,
    # since a connection that does not answer a ping is not worth saving.
    _abort_on_interrupt: bool = False
    _fd_waiter: FdWaiter | None = None
    #: Set by a pool for the connections it owns: a query interrupted by a
    #: cancellation is left to the pool to :meth:`settle` (cancel request,
    #: drain) after the borrower is gone, so that a cancelled borrower is not
    #: held up by a server that does not answer.
    settle_later: bool = False
    _unsettled: tuple[Driver, FdWaiter, int] | None = None
    # Set when the lock was released with a query still running (see _lock_released).
    _abandoned: bool = False

    def __init__(self, pgconn: pq.abc.PGconn, row_factory: Any = None) -> None:
        if row_factory is None:
            super().__init__(pgconn)
        else:
            super().__init__(pgconn, row_factory)
        # psycopg's asyncio.Lock breaks under trio once contended; anyio's
        # refuses what psycopg needs (see Lock).
        self.lock = _ConnectionLock(self)  # type: ignore[assignment]

    @classmethod
    async def connect(
        cls,
        conninfo: str = "",
        *,
        autocommit: bool = False,
        prepare_threshold: int | None = 5,
        context: Any = None,
        row_factory: Any = None,
        cursor_factory: Any = None,
        **kwargs: Any,
    ) -> Connection[Any]:
        """Connect to a server: psycopg's ``connect()``, on either backend.

        Each host of a multi-host conninfo, and each address a host name
        resolves to, is tried in turn. Each attempt gets ``connect_timeout``
        seconds, counted as libpq and psycopg count it (whole seconds, at
        least 2; a string, an int or a float, in the conninfo or as a
        keyword); without one, or with 0, `DEFAULT_CONNECT_TIMEOUT`.

        Raises:
            psycopg.OperationalError: no attempt succeeded (the message lists
                each attempt's failure).
            psycopg.ProgrammingError: ``connect_timeout`` is not a number.
        """
        params = await cls._get_connection_params(conninfo, **kwargs)
        return await cls._connect(
            params,
            attempt_timeout(params),
            autocommit=autocommit,
            prepare_threshold=prepare_threshold,
            context=context,
            row_factory=row_factory,
            cursor_factory=cursor_factory,
        )

    @classmethod
    async def _connect(
        cls,
        params: dict[str, Any],
        seconds: float,
        *,
        autocommit: bool,
        prepare_threshold: int | None,
        context: Any,
        row_factory: Any,
        cursor_factory: Any,
    ) -> Connection[Any]:
        """`connect` with each attempt bounded by exactly ``seconds``."""
        pgconn = await connect_pgconn(params, seconds)
        rv: Connection[Any] = cls(pgconn)
        rv._autocommit = bool(autocommit)
        if row_factory:
            rv.row_factory = row_factory
        if cursor_factory:
            rv.cursor_factory = cursor_factory
        if context:
            rv._adapters = psycopg.adapt.AdaptersMap(context.adapters)
        rv.prepare_threshold = prepare_threshold
        return rv

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        """Commit if the block succeeded, then close; on error just close.

        Closing rolls back on the server, and needs no wait that a
        cancellation could interrupt: the connection is never left open.
        """
        try:
            if exc_type is None and not self.closed:
                await self.commit()  # noqa: ASYNC102 (the block succeeded: an ordinary commit)
        finally:
            self.abort()

    @asynccontextmanager
    async def transaction(
        self, savepoint_name: str | None = None, force_rollback: bool = False
    ) -> AsyncIterator[psycopg.AsyncTransaction]:
        """A transaction block, as psycopg's, whose rollback survives cancellation.

        When the block is left by an exception (a cancellation included),
        the rollback runs shielded from cancellation and bounded by
        ``cancel_grace``; if it cannot finish in time the connection is
        closed.
        """
        tx = _Transaction(self, savepoint_name, force_rollback)
        if self._pipeline:
            async with self.pipeline(), tx, self.pipeline():
                yield tx
        else:
            async with tx:
                yield tx

    async def wait(
        self,
        gen: PQGen[RV],
        interval: float = 0.0,
        timeout: float | None = None,  # noqa: ASYNC109 (psycopg's own signature)
    ) -> RV:
        """Consume a psycopg generator operating on this connection.

        Raises:
            psycopg.errors._WaitTimeout: ``timeout`` expired (psycopg's
                ``notifies()`` expects exactly this).
        """
        if self._unsettled is not None:
            raise e.OperationalError(
                "the connection's last query was interrupted and is being cancelled:"
                " return the connection to its pool"
            )
        driver = Driver(gen)
        fileno = self.pgconn.socket
        waiter = self._fd_waiter
        if waiter is None:
            waiter = self._fd_waiter = current_backend().fd_waiter(fileno)
        if self._abandoned:
            self._abandoned = False
            await self._settle_after_interrupt(None, waiter, fileno)  # shielded and bounded
            if self.closed:
                raise e.OperationalError(
                    "the connection was closed: an abandoned query did not stop"
                    f" within {self.cancel_grace:g} s"
                )
        try:
            if timeout is None:
                result: RV = await driver.run(waiter, fileno)
                return result
            result = await driver.run(waiter, fileno, current_backend().time() + timeout)
            return result
        except (anyio.get_cancelled_exc_class(), KeyboardInterrupt):
            if self._abort_on_interrupt:
                self.abort()
            elif self.settle_later and self.pgconn.transaction_status == _ACTIVE:
                self._unsettled = (driver, waiter, fileno)
            else:
                # Shielded and bounded by cancel_grace inside.
                await self._settle_after_interrupt(driver, waiter, fileno)  # noqa: ASYNC102
            raise
        except Exception:
            if self.pgconn.status == _BAD:
                # libpq closed the socket itself (connection lost).
                self._fd_waiter = None
                waiter.forget()
            raise

    async def ping(self, timeout: float = 5.0) -> float:  # noqa: ASYNC109
        """Send an empty query; return the round trip in seconds.

        A connection that does not answer within ``timeout`` seconds is
        closed (no cancel request, no grace period).

        Raises:
            psycopg.OperationalError: the connection is broken, or closed
                for not answering in time.
        """
        start = anyio.current_time()
        self._abort_on_interrupt = True
        try:
            with anyio.move_on_after(timeout):
                await self.execute("")
                return anyio.current_time() - start
        finally:
            self._abort_on_interrupt = False
        self.abort()
        raise e.OperationalError(f"no answer to a ping within {timeout:g} s: connection closed")

    def input_pending(self) -> bool:
        """Whether the server sent something unasked while the connection was idle.

        On an idle connection this means a notice, a notification, or the
        FATAL message of a terminated backend: worth a ping before lending.
        """
        if self.closed:
            return True
        try:
            return bool(poll_ready(self.pgconn.socket, WAIT_R))
        except (OSError, e.OperationalError):
            return True

    def socket_waiter(self) -> FdWaiter:
        """The waiter on this connection's socket: the pool's pipelines wait on it too."""
        if self._fd_waiter is None:
            self._fd_waiter = current_backend().fd_waiter(self.pgconn.socket)
        return self._fd_waiter

    @property
    def transaction_status(self) -> pq.TransactionStatus:
        """libpq's transaction status: ``IDLE``, ``ACTIVE`` (a command runs), ``INTRANS``..."""
        return _TRANSACTION_STATUSES[self.pgconn.transaction_status]

    @property
    def unsettled(self) -> bool:
        """Whether an interrupted query awaits :meth:`settle` (pooled connections)."""
        return self._unsettled is not None

    async def settle(self) -> None:
        """Finish what an interrupted query left: cancel it on the server, bounded.

        Pools call this on a connection whose borrower was cancelled during
        a query; the connection is then idle, or closed if the server did
        not answer within ``cancel_grace``.
        """
        unsettled, self._unsettled = self._unsettled, None
        if unsettled is not None:
            await self._settle_after_interrupt(*unsettled)

    async def _settle_after_interrupt(
        self, driver: Driver | None, waiter: FdWaiter, fileno: int
    ) -> None:
        """Leave the connection idle, or closed, after the caller was interrupted.

        The server is asked to cancel the query; the interrupted generator
        (``driver``, if any) is resumed, and whatever results remain are read
        and dropped (a ``stream()`` left with rows still coming has many).
        Shielded, so that the cleanup itself cannot be cancelled, and bounded
        by ``cancel_grace``, so that a server that does not answer (half-open
        TCP, black-holed network) cannot hang the caller.
        """
        if self.closed or self.pgconn.transaction_status != _ACTIVE:
            return
        # asyncio's own task.cancel(), repeated meanwhile, waits for it too.
        await current_backend().to_completion(
            functools.partial(_cancel_and_drain, self, driver, waiter, fileno)
        )

    def _lock_released(self) -> None:
        """Called as the lock is released: note an operation abandoned half-way.

        An operation that ends normally leaves the connection idle before it
        releases the lock. One that is still ACTIVE was given up: an async
        generator such as ``cursor.stream()`` closed where it could not wait
        (trio closes abandoned generators in a cancelled scope), or a cleanup
        that a cancellation cut short. psycopg on asyncio would have cancelled
        the query and read the rest; `wait` does the same before the next
        operation, so the connection stays usable.
        """
        pgconn = self.pgconn
        if (
            self._unsettled is None
            and not self._closed
            and pgconn.transaction_status == _ACTIVE
            and not pgconn.pipeline_status
        ):
            self._abandoned = True

    async def _send_cancel(self) -> None:
        """Ask the server to cancel the running query."""
        if capabilities.has_cancel_safe():
            await drive_conn(cancel_gen(self.pgconn))
        else:
            # libpq before 17 only has a blocking cancel: run it in a thread
            # that is abandoned if the grace period ends first.
            cancel = self.pgconn.get_cancel()
            await anyio.to_thread.run_sync(cancel.cancel, abandon_on_cancel=True)

    async def cancel_safe(self, *, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Ask the server to cancel the current operation, waiting at most ``timeout`` s.

        Raises:
            psycopg.errors.CancellationTimeout: no answer within ``timeout``.
        """
        if not self._should_cancel():
            return
        if not capabilities.has_cancel_safe():
            await self._send_cancel()  # libpq before 17: in a thread, as psycopg does
            return
        try:
            await drive_conn(cancel_gen(self.pgconn), timeout or None)
        except e._WaitTimeout:
            raise e.CancellationTimeout("cancellation timeout expired") from None

    def abort(self) -> None:
        """Close at once, without waiting: tasks waiting on the socket wake up.

        A pool uses it for a connection it gives up on. Unlike :meth:`close`
        it never yields to the event loop.
        """
        waiter, self._fd_waiter = self._fd_waiter, None
        if waiter is not None:  # also when libpq closed the socket itself (lost)
            if self.pgconn.status == _BAD:
                waiter.forget()
            else:
                waiter.close()
        if self.closed:
            return
        self._closed = True
        self.pgconn.finish()

    async def close(self) -> None:
        """Close the connection (no I/O wait: libpq sends Terminate and closes)."""
        self.abort()
        await anyio.lowlevel.checkpoint()


class _ConnectionLock(Lock):
    """The connection's lock, telling the connection when it is released."""

    __slots__ = ("_conn",)

    def __init__(self, conn: Connection[Any]) -> None:
        super().__init__()
        self._conn = weakref.ref(conn)  # the connection holds its lock: no cycle

    def release(self) -> None:
        conn = self._conn()
        if conn is not None:
            conn._lock_released()
        super().release()


async def _cancel_and_drain(
    conn: Connection[Any], driver: Driver | None, waiter: FdWaiter, fileno: int
) -> None:
    """`Connection._settle_after_interrupt`'s work: shielded, bounded by ``cancel_grace``."""
    pgconn = conn.pgconn
    settled = False
    with anyio.CancelScope(shield=True) as scope:
        scope.deadline = anyio.current_time() + conn.cancel_grace
        try:
            await conn._send_cancel()
            if driver is not None:
                with contextlib.suppress(e.QueryCanceled):
                    await driver.run(waiter, fileno)
            while pgconn.transaction_status == _ACTIVE and not pgconn.pipeline_status:
                results = await Driver(generators.fetch_many(pgconn)).run(waiter, fileno)
                if not results or results[-1].status in _COPY_STATES:
                    break  # nothing more to read, or COPY, which only ends by closing
        except e.Error as ex:
            logger.debug("error while cancelling query: %s", redact(str(ex)))
        settled = not scope.cancel_called
    if not settled or pgconn.transaction_status == _ACTIVE:
        logger.warning(
            "query not stopped %.1f s after cancellation: closing the connection",
            conn.cancel_grace,
        )
        conn.abort()


class _Transaction(psycopg.AsyncTransaction):
    """psycopg's transaction block with a shielded, bounded exit on error."""

    _conn: Connection[Any]

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool:
        if exc_type is None:
            # The block succeeded: an ordinary commit, which a cancellation may interrupt.
            return await super().__aexit__(exc_type, exc_val, exc_tb)  # noqa: ASYNC102
        conn = self._conn
        if conn.unsettled:
            # Its pool rolls back once the query is cancelled; psycopg must know
            # the block is over, or the pool's rollback is refused as inside it.
            self._pop_savepoint("rollback")
            return False
        exit_ = super().__aexit__

        async def roll_back() -> bool:
            with anyio.CancelScope(shield=True) as scope:
                scope.deadline = anyio.current_time() + conn.cancel_grace
                try:
                    return await exit_(exc_type, exc_val, exc_tb)
                except OutOfOrderTransactionNesting:
                    # The caller's mistake, which psycopg reports in place of the
                    # block's exception; the connection itself is fine.
                    raise
                except e.Error as ex:
                    # The block's own exception matters more than the rollback's.
                    logger.debug("rollback after error failed: %s", redact(str(ex)))
            if scope.cancel_called:
                logger.warning(
                    "rollback not done in %.1f s: closing the connection", conn.cancel_grace
                )
            conn.abort()
            return False

        # asyncio's own task.cancel(), repeated meanwhile, waits for it too.
        return await current_backend().to_completion(roll_back)  # noqa: ASYNC102 - shielded in it


# The keywords of Connection.connect that are not libpq parameters.
_PSYCOPG_OPTIONS: Final = ("prepare_threshold", "context", "cursor_factory")


@overload
async def connect(
    target: DatabaseConfig | str,
    *,
    autocommit: bool = True,
    row_factory: AsyncRowFactory[Row],
    **kwargs: Any,
) -> Connection[Row]: ...


@overload
async def connect(
    target: DatabaseConfig | str,
    *,
    autocommit: bool = True,
    row_factory: None = None,
    **kwargs: Any,
) -> Connection[TupleRow]: ...


async def connect(
    target: DatabaseConfig | str,
    *,
    autocommit: bool = True,
    row_factory: AsyncRowFactory[Any] | None = None,
    **kwargs: Any,
) -> Connection[Any]:
    """Open one connection, with no pool, under asyncio or trio.

    Args:
        target: a :class:`DatabaseConfig`, or a DSN (URL or key=value).
        autocommit: connections start in autocommit mode, as pooled ones do;
            open a transaction with ``async with conn.transaction()``.
        row_factory: how rows come back (psycopg's ``dict_row``...); the
            connection's type follows it.
        kwargs: psycopg's ``prepare_threshold``, ``cursor_factory`` and
            ``context``, or libpq parameters, which take precedence over the
            target's (``connect_timeout`` as in `DatabaseConfig`: seconds,
            fractions allowed, a number or its text).

    Raises:
        pgsd.ConfigError: the DSN cannot be parsed, or ``connect_timeout``
            is not a positive number.
        pgsd.ConnectError: the server could not be reached or refused the
            connection; the subclass says why (``AuthenticationError``,
            ``DatabaseNotFound``, ``ConnectTimeout``, ``ServerUnavailable``,
            ``TooManyConnections``, ``TLSError``) and the psycopg error is
            the ``__cause__``; ``PasswordProviderError`` when the config's
            ``password_provider`` gave no password.
    """
    config = target if isinstance(target, DatabaseConfig) else DatabaseConfig.from_dsn(target)
    if "connect_timeout" in kwargs:
        config = config.replace(connect_timeout=as_seconds(kwargs.pop("connect_timeout")))
    if config.password_provider is not None:
        password = await fetch_password(config)
        config = config.replace(password=password, password_provider=None)
    options = {name: kwargs.pop(name) for name in _PSYCOPG_OPTIONS if name in kwargs}
    options.setdefault("prepare_threshold", config.prepare_threshold)
    try:
        # The other keywords are libpq's, added to the conninfo as psycopg does.
        params = conninfo_to_dict(config.conninfo(), **kwargs)
        conn = await Connection._connect(
            params,
            config.connect_timeout,
            autocommit=autocommit,
            row_factory=row_factory,
            context=options.get("context"),
            cursor_factory=options.get("cursor_factory"),
            prepare_threshold=options["prepare_threshold"],
        )
    except e.Error as ex:
        err = connect_error_from(
            ex, database=config.display_name, host=config.host, port=config.port
        )
        logger.debug("connect to %s failed: %s", config.display_name, err)
        raise err from ex
    conn.cancel_grace = config.cancel_grace
    logger.debug(
        "connected to %s at %s:%s (server pid %s)",
        config.display_name,
        conn.info.host,
        conn.info.port,
        conn.info.backend_pid,
    )
    return conn
