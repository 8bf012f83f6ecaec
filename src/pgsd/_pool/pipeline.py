"""One-shot statements pipelined on a connection: sent without waiting for earlier results.

Each statement is sent as Parse/Bind/Execute followed by its own Sync, so
that the server runs it in its own implicit transaction and an error stays
with it: the statements behind it run as if it had succeeded. Results come
back in the order the statements were sent; `Pipeline.run` (a task of the
pool's) reads them and wakes each statement's caller.

The statement path is lean on purpose: psycopg's query conversion and
parameter adaptation (`PostgresQuery`, with the connection's adapters), its
row loaders and its error classes, but no cursor, no generator and no lock
per statement. Simple-protocol strings with several statements are not
accepted here (the extended protocol runs one statement per Parse).
"""

from __future__ import annotations

import ctypes
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import psycopg
from psycopg import errors as e
from psycopg import pq
from psycopg._queries import PostgresQuery
from psycopg.adapt import Transformer
from psycopg.rows import RowFactory

from .._backend import Waker, current_backend
from .._connection import Connection
from .._errors import OutcomeUnknown

__all__ = ["Pipeline", "Statement"]

_TUPLES_OK: Final = pq.ExecStatus.TUPLES_OK
_COMMAND_OK: Final = pq.ExecStatus.COMMAND_OK
_FATAL_ERROR: Final = pq.ExecStatus.FATAL_ERROR
_PIPELINE_SYNC: Final = pq.ExecStatus.PIPELINE_SYNC
_EMPTY_QUERY: Final = pq.ExecStatus.EMPTY_QUERY


def _find_send_sync() -> Callable[[int], int] | None:
    """libpq's ``PQsendPipelineSync`` (libpq 17 and later), which psycopg does not wrap.

    ``PQpipelineSync`` writes to the socket at every Sync; its sibling only
    queues the Sync, so that statements sent together leave in one write.
    Found in the libpq psycopg itself loaded (its bundled copy in the
    binary package, or the one its ctypes implementation opened); None
    when it cannot be found, and every Sync then flushes.
    """
    if pq.version() < 170000:
        return None
    library: Any = None
    try:
        if pq.__impl__ == "python":
            from psycopg.pq import _pq_ctypes

            library = getattr(_pq_ctypes, "pq", None)
        elif pq.__impl__ == "binary":
            import psycopg_binary

            bundled = Path(psycopg_binary.__file__).parent.with_name("psycopg_binary.libs")
            found = sorted(bundled.glob("libpq-*.so*"))
            if len(found) == 1:
                library = ctypes.CDLL(str(found[0]))
        function = getattr(library, "PQsendPipelineSync", None)
    except (ImportError, OSError):
        return None
    if function is None:
        return None
    function.argtypes = [ctypes.c_void_p]
    function.restype = ctypes.c_int
    result: Callable[[int], int] = function
    return result


#: None when every Sync must go through psycopg (and flush).
_send_sync = _find_send_sync()


class Statement:
    """One statement of one caller: what to send, and what came back.

    Attributes:
        wire: the statement converted for the wire, once sent.
        pipeline: the pipeline it was sent on, once sent.
        result: the statement's result, once it ended without an error.
        error: the error it raised (psycopg's, or `OutcomeUnknown`), or
            the one that kept it from being sent.
        abandoned: the caller is gone; what comes back is dropped.
    """

    __slots__ = (
        "abandoned",
        "done",
        "error",
        "params",
        "pipeline",
        "query",
        "resent",
        "result",
        "waker",
        "wire",
    )

    def __init__(self, query: Any, params: Any, waker: Waker) -> None:
        self.query = query
        self.params = params
        self.waker = waker
        self.wire: PostgresQuery | None = None
        self.pipeline: Pipeline | None = None
        self.done = False
        self.abandoned = False
        self.resent = False
        self.result: pq.abc.PGresult | None = None
        self.error: BaseException | None = None

    def fail(self, error: BaseException) -> None:
        """End the statement with *error* and wake its caller."""
        self.error = error
        self.done = True
        self.waker.set()


class Pipeline:
    """The statements in flight on one connection, in the order they were sent.

    Attributes:
        in_flight: statements sent and not yet answered, oldest first.
        broken: the error that ended the pipeline (the connection is lost).
    """

    __slots__ = (
        "_ended",
        "_pgconn",
        "_results",
        "_running",
        "_tx",
        "_unflushed",
        "broken",
        "cancel_until",
        "conn",
        "entry",
        "in_flight",
        "on_room",
    )

    def __init__(self, conn: Connection[Any], entry: Any = None) -> None:
        self.conn = conn
        #: The pool's bookkeeping of the connection (None outside a pool).
        self.entry = entry
        self._pgconn = conn.pgconn
        self._tx = Transformer(conn)
        self.in_flight: deque[Statement] = deque()
        self.broken: BaseException | None = None
        self._unflushed = False
        self._ended = False  # the head statement's results ended; its Sync is next
        self._results: list[pq.abc.PGresult] = []
        self._running = False
        #: Until then, a statement cancelled that its caller did not leave was
        #: hit by a cancel request meant for the one before it: it is sent again.
        self.cancel_until = 0.0
        #: Called when a statement ends: room for one more.
        self.on_room: Callable[[], None] | None = None

    def start(self) -> None:
        """Enter pipeline mode (the connection is idle and owned by the pool)."""
        self._pgconn.enter_pipeline_mode()

    def finish(self) -> None:
        """Leave pipeline mode once nothing is in flight."""
        if self.broken is None and not self.in_flight:
            self._pgconn.exit_pipeline_mode()

    def send(self, statement: Statement) -> None:
        """Convert *statement* as psycopg would and send it with its Sync.

        The first statement on a quiet connection is flushed at once; one
        sent behind others stays in libpq's buffer until the reader's next
        turn (`run`), which flushes everything sent meanwhile in one write:
        the server is busy with the earlier ones until then.

        Raises:
            psycopg.Error, TypeError: the query or its parameters cannot be
                converted (nothing was sent).
            OutcomeUnknown: the connection was lost while sending.
        """
        pgq = statement.wire
        if pgq is None:
            pgq = PostgresQuery(self._tx)
            pgq.convert(statement.query, statement.params)
            statement.wire = pgq
        pgconn: Any = self._pgconn
        try:
            pgconn.send_query_params(
                pgq.query, pgq.params, param_types=pgq.types, param_formats=pgq.formats
            )
            if _send_sync is None:
                pgconn.pipeline_sync()  # flushes
                self._unflushed = pgconn.flush() != 0
            elif not pgconn.pgconn_ptr or _send_sync(pgconn.pgconn_ptr) != 1:
                raise e.OperationalError(pgconn.get_error_message())
            elif self.in_flight:
                self._unflushed = True
            else:
                self._unflushed = pgconn.flush() != 0
        except e.OperationalError as ex:
            self._lost(ex)
            raise OutcomeUnknown(
                f"the connection was lost while sending the statement: {ex}"
            ) from ex
        statement.pipeline = self
        self.in_flight.append(statement)

    @property
    def running(self) -> bool:
        """Whether the reading task runs."""
        return self._running

    def claim_reader(self) -> bool:
        """True when no task reads the results yet: the caller starts `run` then."""
        if self._running or not self.in_flight:
            return False
        self._running = True
        return True

    async def run(self, until: Statement | None = None) -> None:
        """Read results until nothing is in flight (or *until* has ended).

        The caller must have claimed the reading (`claim_reader`). A lost
        connection fails what was sent.
        """
        pgconn = self._pgconn
        waiter = self.conn.socket_waiter()
        try:
            while self.in_flight and self.broken is None:
                if until is not None and until.done:
                    return
                if self._unflushed:
                    self._unflushed = pgconn.flush() != 0
                if self._unflushed:
                    await waiter.writable()
                    continue
                await waiter.readable()
                pgconn.consume_input()
                self._dispatch()
        except (OSError, e.OperationalError) as ex:
            self._lost(ex)
        finally:
            self._running = False

    def _dispatch(self) -> None:
        pgconn = self._pgconn
        in_flight = self.in_flight
        while in_flight and not pgconn.is_busy():
            result = pgconn.get_result()
            if result is None:
                if self._ended:
                    return  # nothing more until the next read
                self._ended = True
                continue
            if result.status == _PIPELINE_SYNC:
                self._complete(in_flight.popleft())
                if self.on_room is not None:
                    self.on_room()
                continue
            self._results.append(result)

    def _complete(self, statement: Statement) -> None:
        results, self._results = self._results, []
        self._ended = False
        if statement.abandoned:
            statement.done = True
            statement.waker.set()  # for the task that cancels it on the server
            return
        for result in results:
            if result.status == _FATAL_ERROR:
                error = e.error_from_result(result, encoding=self.conn.info.encoding)
                if self._cancelled_by_mistake(error, statement):
                    statement.resent = True
                    self.send(statement)  # in its own transaction: nothing of it committed
                    return
                statement.error = error
                break
        else:
            statement.result = results[-1] if results else None
        statement.done = True
        statement.waker.set()

    def _cancelled_by_mistake(self, error: BaseException, statement: Statement) -> bool:
        if statement.resent or not isinstance(error, e.QueryCanceled) or not self.cancel_until:
            return False
        return current_backend().time() < self.cancel_until

    def _lost(self, error: BaseException) -> None:
        self.broken = error
        while self.in_flight:
            statement = self.in_flight.popleft()
            statement.fail(
                OutcomeUnknown(
                    "the connection was lost with the statement in flight: it may or may"
                    f" not have run ({error})"
                )
            )

    def rows(
        self, statement: Statement, row_factory: RowFactory[Any] | None, limit: int | None = None
    ) -> list[Any]:
        """The rows (the first *limit* of them) of a finished statement, by psycopg's loaders."""
        result = statement.result
        if result is None or result.status != _TUPLES_OK:
            return []
        tx = self._tx
        tx.set_pgresult(result)
        make_row: Any = (
            tuple if row_factory is None else row_factory(_ResultCursor(self.conn, result))  # type: ignore[arg-type]
        )
        count = result.ntuples if limit is None else min(limit, result.ntuples)
        return tx.load_rows(0, count, make_row)


def rowcount(statement: Statement) -> int:
    """Rows affected (or returned) by a finished statement; -1 when the command says none."""
    result = statement.result
    if result is None:
        return -1
    tuples = result.command_tuples
    return -1 if tuples is None else tuples


class _ResultCursor:
    """What a psycopg row factory reads of a cursor: the result, the encoding, the adapters."""

    def __init__(self, conn: Connection[Any], result: pq.abc.PGresult) -> None:
        self.connection = conn
        self.pgresult = result
        self.adapters = conn.adapters
        self._encoding = conn.info.encoding

    @property
    def description(self) -> list[psycopg.Column] | None:
        result = self.pgresult
        if not result.nfields:
            return None
        return [psycopg.Column(self, i) for i in range(result.nfields)]  # type: ignore[arg-type]
