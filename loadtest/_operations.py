"""What a Locust user asks the pgsd server process to do, run through a connector.

Each load operation borrows connections from one pool and answers with its
latency (from before the acquire to after the release), every acquire's
wait, its PoolTimeouts, and its error kind. Runs in the pgsd server
process, on asyncio or trio.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Final

import anyio
import anyio.abc

import pgsd
from _fault import FaultSchedule

__all__ = ["LOAD_OPS", "TABLE", "Operations", "prepare_table"]

TABLE: Final = "loadtest_items"
#: Ids above the initial rows that ``write_tx`` may insert.
_EXTRA_IDS: Final = 100
_MAX_BURST: Final = 1000
_SLOW_SECONDS: Final = 0.2
# Any constant: serialises table creation among server processes sharing a database.
_LOCK_KEY: Final = 7_210_901

_CREATE = f"""CREATE TABLE IF NOT EXISTS {TABLE} (
    id integer PRIMARY KEY, value text NOT NULL, updated timestamptz NOT NULL)"""
_FILL = f"""INSERT INTO {TABLE} (id, value, updated)
    SELECT g, md5(g::text), now() FROM generate_series(1, %s) AS g
    ON CONFLICT (id) DO NOTHING"""
_POINT_READ = f"SELECT id, value, updated FROM {TABLE} WHERE id = %s"
_LOCK_ROW = f"SELECT value FROM {TABLE} WHERE id = %s FOR UPDATE"
_UPSERT = f"""INSERT INTO {TABLE} (id, value, updated) VALUES (%s, %s, now())
    ON CONFLICT (id) DO UPDATE SET value = excluded.value, updated = excluded.updated"""
_SLOW = "SELECT pg_sleep(%s)"

#: The operations Locust users run (the others are control requests).
LOAD_OPS: Final = ("point_read", "write_tx", "slow", "burst")


async def prepare_table(
    connector: pgsd.DatabaseConnector, database: str, rows: int
) -> pgsd.ServerVersion:
    """Create and fill the harness's table if needed; return the server's version.

    Raises:
        PoolTimeout: the database cannot be reached within the acquire timeout.
        psycopg.Error: the role may not create or fill the table.
    """
    async with connector.get_connection(database) as conn:
        version = await connector.get_version(conn)
        async with conn.transaction():
            # Server processes of a distributed run may share one database.
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", [_LOCK_KEY])
            await conn.execute(_CREATE)
            await conn.execute(_FILL, [rows])
    return version


class _Outcome:
    """What one operation met: acquire waits, PoolTimeouts, the first error."""

    __slots__ = ("error", "message", "timeouts", "waits")

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.timeouts = 0
        self.error: str | None = None
        self.message: str | None = None

    def fail(self, exc: Exception) -> None:
        """Record an error; any other error outranks a PoolTimeout."""
        timeout = isinstance(exc, pgsd.PoolTimeout)
        if timeout:
            self.timeouts += 1
        if self.error is None or (self.error == "PoolTimeout" and not timeout):
            self.error = "PoolTimeout" if timeout else type(exc).__name__
            self.message = str(exc)[:500]

    def reply(self, op: str, latency: float, fault: bool) -> dict[str, Any]:
        return {
            "ok": self.error is None,
            "op": op,
            "latency": latency,
            "waits": self.waits,
            "timeouts": self.timeouts,
            "error": self.error,
            "message": self.message,
            "fault": fault,
        }


class _Borrow:
    """``connector.get_connection`` that records how long the acquire waited."""

    __slots__ = ("_lease", "_outcome")

    def __init__(self, connector: pgsd.DatabaseConnector, database: str, outcome: _Outcome) -> None:
        self._lease = connector.get_connection(database)
        self._outcome = outcome

    async def __aenter__(self) -> pgsd.Connection[Any]:
        start = time.perf_counter()
        conn = await self._lease.__aenter__()
        self._outcome.waits.append(time.perf_counter() - start)
        return conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        # The pool's return is shielded and bounded by cancel_grace.
        return await self._lease.__aexit__(exc_type, exc, tb)  # noqa: ASYNC102


_Load = Callable[[dict[str, Any], _Outcome], Awaitable[None]]
_Control = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclasses.dataclass(kw_only=True)
class Operations:
    """The requests the server process answers, on one database of a connector.

    Load operations (`LOAD_OPS`) reply ``ok``, ``latency`` (seconds, waits
    included), ``waits`` (each acquire's wait), ``timeouts`` (PoolTimeouts),
    ``error`` (``"PoolTimeout"``, another exception's class name, or None),
    ``message`` and ``fault`` (the operation overlapped the fault window).
    Control requests: ``noop``, ``stats`` and ``fault`` (arm the schedule).
    """

    connector: pgsd.DatabaseConnector
    database: str
    rows: int
    fault: FaultSchedule
    task_group: anyio.abc.TaskGroup
    info: dict[str, Any]

    def __post_init__(self) -> None:
        self._load: dict[str, _Load] = {
            "point_read": self._point_read,
            "write_tx": self._write_tx,
            "slow": self._slow,
            "burst": self._burst,
        }
        self._control: dict[str, _Control] = {
            "noop": self._noop,
            "stats": self._stats,
            "fault": self._arm_fault,
        }

    async def run(self, request: dict[str, Any]) -> dict[str, Any]:
        """Answer one request; never raises for a failed operation."""
        op = request.get("op")
        if not isinstance(op, str):
            return _bad_request(f"no op in {request!r}")
        control = self._control.get(op)
        if control is not None:
            return await control(request)
        load = self._load.get(op)
        if load is None:
            return _bad_request(f"unknown op {op!r}")
        outcome = _Outcome()
        start = time.perf_counter()
        try:
            await load(request, outcome)
        except Exception as exc:  # reported to Locust, not raised: the load goes on
            outcome.fail(exc)
        end = time.perf_counter()
        return outcome.reply(op, end - start, self.fault.overlaps(start, end))

    def _borrow(self, outcome: _Outcome) -> _Borrow:
        return _Borrow(self.connector, self.database, outcome)

    async def _point_read(self, request: dict[str, Any], outcome: _Outcome) -> None:
        async with self._borrow(outcome) as conn:
            cur = await conn.execute(_POINT_READ, [random.randint(1, self.rows)])
            await cur.fetchone()

    async def _write_tx(self, request: dict[str, Any], outcome: _Outcome) -> None:
        item = random.randint(1, self.rows + _EXTRA_IDS)
        async with self._borrow(outcome) as conn, conn.transaction():
            await conn.execute(_LOCK_ROW, [item])
            await conn.execute(_UPSERT, [item, f"v{random.getrandbits(32):08x}"])

    async def _slow(self, request: dict[str, Any], outcome: _Outcome) -> None:
        async with self._borrow(outcome) as conn:
            await conn.execute(_SLOW, [_SLOW_SECONDS])

    async def _burst(self, request: dict[str, Any], outcome: _Outcome) -> None:
        size = request.get("size", 10)
        if not isinstance(size, int) or not 1 <= size <= _MAX_BURST:
            raise ValueError(f"burst size must be an integer from 1 to {_MAX_BURST}, got {size!r}")
        async with anyio.create_task_group() as tg:
            for _ in range(size):
                tg.start_soon(self._one_of_burst, request, outcome)

    async def _one_of_burst(self, request: dict[str, Any], outcome: _Outcome) -> None:
        try:
            await self._point_read(request, outcome)
        except Exception as exc:  # one failed read must not cancel its siblings
            outcome.fail(exc)

    async def _noop(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    async def _stats(self, request: dict[str, Any]) -> dict[str, Any]:
        stats = self.connector.stats()[self.database]
        return {
            "ok": True,
            **self.info,
            "pool": dataclasses.asdict(stats),
            "fault": self.fault.describe(),
        }

    async def _arm_fault(self, request: dict[str, Any]) -> dict[str, Any]:
        self.fault.arm(self.task_group)
        return {"ok": True, "fault": self.fault.describe()}


def _bad_request(message: str) -> dict[str, Any]:
    return {"ok": False, "error": "BadRequest", "message": message}
