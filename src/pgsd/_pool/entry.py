"""One pooled connection and the bookkeeping the pool keeps about it."""

from __future__ import annotations

import traceback
from collections.abc import Awaitable, Callable
from typing import Any, Final

from psycopg import pq

from .._config import DatabaseConfig
from .._connection import Connection

__all__ = ["ACTIVE", "IDLE", "PING_TIMEOUT", "ConnectionFactory", "Entry"]

IDLE: Final = pq.TransactionStatus.IDLE
ACTIVE: Final = pq.TransactionStatus.ACTIVE
#: A ping (before lending, or a health check of an idle connection) gets at most this long.
PING_TIMEOUT: Final = 5.0

#: Opens one connection for the pool: `pgsd.connect` unless told otherwise.
#: What the pool uses of it is `Connection`'s pool interface: ``abort()``,
#: ``ping()``, ``input_pending()``, ``settle()``, ``settle_later``,
#: ``unsettled``, ``transaction_status``, ``closed``, ``broken``,
#: ``autocommit``, ``cancel_grace``, ``rollback()``, ``set_autocommit()``
#: and ``info.server_version``.
ConnectionFactory = Callable[[DatabaseConfig], Awaitable[Connection[Any]]]


class Entry:
    """A connection in the pool, idle or lent.

    Attributes:
        conn: the connection.
        created: when it was opened (the pool's clock).
        expires: when it is closed instead of lent again (``max_lifetime``,
            jittered).
        last_used: when it was last given back (idle expiry counts from here).
        checked: when a health check last passed (never moves ``last_used``).
        borrowed_at, stack: when and where it was lent, kept only with
            ``leak_threshold``.
        leak_reported: whether this loan was reported as a leak.
        retired: set by `drain`: closed when it comes back, never lent again.
    """

    __slots__ = (
        "borrowed_at",
        "checked",
        "conn",
        "created",
        "expires",
        "last_used",
        "leak_reported",
        "lent_at",
        "pipeline",
        "retired",
        "stack",
    )

    def __init__(self, conn: Connection[Any], now: float, lifetime: float) -> None:
        self.conn = conn
        self.created = now
        self.expires = now + lifetime
        self.last_used = now
        self.checked = now
        self.borrowed_at = 0.0
        self.stack: traceback.StackSummary | None = None
        self.leak_reported = False
        self.lent_at = now  # when it was last lent (the use-time histogram)
        self.pipeline: Any = None  # a `Pipeline` while one-shot statements use it
        self.retired = False  # drained: closed instead of lent again
