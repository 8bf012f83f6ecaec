"""The server's version: what libpq reports, what the server says, and the minimum we accept."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import anyio
from psycopg import AsyncConnection
from psycopg.pq import TransactionStatus
from psycopg.rows import tuple_row

from ._errors import UnsupportedServerVersion

__all__ = [
    "MIN_SERVER_VERSION",
    "ServerVersion",
    "check_supported",
    "get_version",
    "parse_version_num",
]

MIN_SERVER_VERSION = 130000
"""The oldest server pgsd works with, as a ``server_version_num`` (13.0)."""

# How long fetch_row's own rollback may take on a connection with no
# ``cancel_grace`` (psycopg's): the default of pgsd's connections.
_ROLLBACK_GRACE = 2.0

# The number scheme changed with PostgreSQL 10: 9.6.24 is 90624, 15.4 is 150004.
_FIRST_TWO_PART_NUM = 100000

# "15.18 (Debian ...)", "18beta1", "9.6.24", or version()'s "PostgreSQL 15.4 on ...".
_VERSION_RE = re.compile(r"\s*(?:PostgreSQL\s+)?(\d+)(?:\.(\d+)(?:\.(\d+))?)?")


@dataclass(frozen=True, slots=True, order=True)
class ServerVersion:
    """A PostgreSQL server's version.

    Versions compare (and hash) by :attr:`num` alone, so a version read
    from libpq equals one parsed from a string.

    Attributes:
        major: the major release, e.g. 15 (9 for 9.6.24).
        minor: the minor (bug-fix) release for PostgreSQL 10 and later,
            e.g. 4 for 15.4; for older servers the second part, 6 for
            9.6.24, whose bug-fix release is in :attr:`patch`.
        num: libpq's ``server_version_num``, e.g. 150004.
        text: what ``SELECT version()`` said, or "" when not known.
    """

    major: int = field(compare=False)
    minor: int = field(compare=False)
    num: int
    text: str = field(default="", compare=False)

    @classmethod
    def from_num(cls, num: int, text: str = "") -> ServerVersion:
        """Split a ``server_version_num`` into major and minor.

        Raises:
            ValueError: ``num`` is not positive (libpq reports 0 when it
                does not know the version).
        """
        if num <= 0:
            raise ValueError(f"not a server version number: {num}")
        if num >= _FIRST_TWO_PART_NUM:
            return cls(major=num // 10000, minor=num % 10000, num=num, text=text)
        return cls(major=num // 10000, minor=num // 100 % 100, num=num, text=text)

    @property
    def patch(self) -> int:
        """The bug-fix release of a server older than 10 (24 for 9.6.24), else 0."""
        return self.num % 100 if self.num < _FIRST_TWO_PART_NUM else 0

    @property
    def supported(self) -> bool:
        """Whether pgsd supports this server (:data:`MIN_SERVER_VERSION` or later)."""
        return self.is_supported()

    def is_supported(self, minimum: int = MIN_SERVER_VERSION) -> bool:
        """Whether this version is at least ``minimum``.

        A ``minimum`` below :data:`MIN_SERVER_VERSION` is raised to it: the
        minimum can be made stricter, never looser.
        """
        return self.num >= max(minimum, MIN_SERVER_VERSION)

    def __str__(self) -> str:
        if self.num < _FIRST_TWO_PART_NUM:
            return f"{self.major}.{self.minor}.{self.patch}"
        return f"{self.major}.{self.minor}"


def parse_version_num(text: str) -> int:
    """Turn a version string into a ``server_version_num``, as libpq does.

    Accepts ``server_version`` values ("15.18 (Debian 15.18-0+deb12u1)",
    "18beta1", "9.6.24") and the output of ``SELECT version()``. A
    pre-release counts as its ``.0`` release: "18beta1" is 180000.

    Raises:
        ValueError: the string does not start with a version number.
    """
    match = _VERSION_RE.match(text)
    if match is None:
        raise ValueError(f"not a PostgreSQL version: {text!r}")
    major, minor, patch = (int(part) if part else None for part in match.groups())
    assert major is not None  # the regex requires it
    # The same three cases as libpq's pqSaveParameterStatus().
    if patch is not None:
        return (100 * major + (minor or 0)) * 100 + patch
    if minor is not None:
        return major * 10000 + minor if major >= 10 else (100 * major + minor) * 100
    return major * 10000


async def get_version(conn: AsyncConnection[Any]) -> ServerVersion:
    """The version of the server ``conn`` is connected to.

    The number comes from libpq; the text costs one query. Works in
    autocommit mode and inside the caller's transaction, which it leaves
    open; a transaction it had to open itself it rolls back.

    Raises:
        psycopg.Error: the query failed (the connection is broken, or the
            caller's transaction has already failed).
    """
    row = await fetch_row(conn, "SELECT pg_catalog.version()")
    return ServerVersion.from_num(conn.info.server_version, text=str(row[0]))


def check_supported(
    version: ServerVersion,
    minimum: int = MIN_SERVER_VERSION,
    database: str | None = None,
) -> None:
    """Refuse a server older than ``minimum`` (never lower than PostgreSQL 13).

    Args:
        version: the server's version.
        minimum: the oldest accepted ``server_version_num``; a value below
            :data:`MIN_SERVER_VERSION` is raised to it.
        database: the configured database name, for the error message.

    Raises:
        UnsupportedServerVersion: the server is too old.
    """
    minimum = max(minimum, MIN_SERVER_VERSION)
    if version.num < minimum:
        raise UnsupportedServerVersion(version_num=version.num, minimum=minimum, database=database)


async def fetch_row(conn: AsyncConnection[Any], query: Any, params: Any = None) -> tuple[Any, ...]:
    """Run a one-row query without leaving a transaction behind.

    Without autocommit, psycopg opens a transaction for the first query;
    if that is the case here, the transaction is ours and is rolled back.
    A transaction the caller had open is left as it is.
    """
    opens_transaction = (
        not conn.autocommit and conn.info.transaction_status == TransactionStatus.IDLE
    )
    try:
        # tuple_row: the caller's connection may have any row factory.
        async with conn.cursor(row_factory=tuple_row) as cursor:
            await cursor.execute(query, params)
            row = await cursor.fetchone()
    finally:
        if opens_transaction:
            # Ours to end, also when the caller is cancelled: shielded, and
            # bounded like any clean-up after a cancellation.
            grace = getattr(conn, "cancel_grace", _ROLLBACK_GRACE)
            with anyio.CancelScope(shield=True, deadline=anyio.current_time() + grace):
                await conn.rollback()
    if row is None:
        raise RuntimeError("the query returned no row")
    return row
