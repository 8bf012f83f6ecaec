"""LISTEN on a connection of its own that survives reconnects: `ConnectionPool.listen`.

A listener opens one connection with the pool's settings (outside the
pool's ``max_size``: it is held for as long as the listener lives, and
would otherwise take a borrower's place), issues ``LISTEN`` for each
channel, and a task of the pool's reads its notifications into a bounded
buffer that the program iterates. When the connection is lost the task
reconnects with the pool's backoff, listens again, and puts a `ListenGap`
in the stream: notifications sent meanwhile are lost, and the program
should read the state they were about again. A full buffer either drops
what comes (``overflow="gap"``, reported as a gap) or stops reading
(``"block"``: the server holds them meanwhile).

Before the first notification, the listener checks that notifications
reach it at all: it sends one on a channel of its own through the pool
and waits for it. Behind a pooler in transaction or statement mode
(PgBouncer) LISTEN binds a server connection only for one transaction, and
this check fails with a clear `ListenError` instead of a silent stream.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, Self

import anyio
import anyio.abc
import psycopg
from psycopg import sql

from .._backoff import Backoff
from .._connection import Connection
from .._errors import ConfigError, ListenError, PgsdError, PoolClosed, summary
from .._validate import check_choice, check_int, check_positive
from .entry import PING_TIMEOUT

if TYPE_CHECKING:
    from .pool import ConnectionPool

__all__ = ["ListenGap", "Listener", "Listening", "Notification"]

logger = logging.getLogger("pgsd.listen")

#: How long the check that notifications arrive may wait for its own.
_PROBE_TIMEOUT: Final = 5.0
#: PostgreSQL's longest identifier (NAMEDATALEN - 1), a channel name included.
_MAX_CHANNEL_BYTES: Final = 63


@dataclass(frozen=True, slots=True)
class Notification:
    """One notification: its channel, its payload (``""`` when none) and the sender's pid."""

    channel: str
    payload: str
    pid: int


@dataclass(frozen=True, slots=True)
class ListenGap:
    """Notifications may have been missed here: read the state they were about again.

    Attributes:
        reason: ``"reconnected"`` (the connection was lost and made again;
            what was sent meanwhile is lost) or ``"overflow"`` (the buffer
            was full and ``overflow="gap"`` dropped some).
        dropped: how many were dropped (overflow); None when unknown
            (reconnected).
        error: why the connection was lost (reconnected), without secrets.
    """

    reason: Literal["reconnected", "overflow"]
    dropped: int | None = None
    error: str | None = None


Item = Notification | ListenGap
OnGap = Callable[[ListenGap], Awaitable[None] | None]


class Listener:
    """``async with pool.listen("jobs") as notifications: async for n in notifications``."""

    def __init__(
        self,
        resolve: Callable[[], Awaitable[ConnectionPool]],
        channels: tuple[str, ...],
        *,
        max_buffered: int,
        overflow: str,
        on_gap: OnGap | None,
        reconnect_timeout: float | None,
    ) -> None:
        if not channels:
            raise ConfigError("give at least one channel to listen on", key="channels")
        for channel in channels:
            if not isinstance(channel, str) or not channel:
                raise ConfigError(
                    f"channel names are non-empty strings, got {channel!r}", key="channels"
                )
            if len(channel.encode()) > _MAX_CHANNEL_BYTES or "\x00" in channel:
                # LISTEN would truncate it (with a mere notice), pg_notify refuses it.
                raise ConfigError(
                    f"channel {channel!r} is longer than PostgreSQL's {_MAX_CHANNEL_BYTES}"
                    " bytes or holds a NUL",
                    key="channels",
                )
        check_int("max_buffered", max_buffered, minimum=1)
        check_choice("overflow", overflow, ("gap", "block"))
        if overflow is None:  # which check_choice lets through, as for optional settings
            raise ConfigError("must be one of gap, block; got None", key="overflow")
        if reconnect_timeout is not None:
            check_positive("reconnect_timeout", reconnect_timeout)
        self._resolve = resolve
        self._pool: Any = None
        self.channels = tuple(dict.fromkeys(channels))
        self._max = max_buffered
        self._overflow = overflow
        self._on_gap = on_gap
        self._reconnect_timeout = reconnect_timeout
        self._buffer: deque[Item] = deque()
        self._dropped = 0
        self._dropped_total = 0
        self._failure: BaseException | None = None
        self._ended = False
        self._arrived: anyio.Event | None = None
        self._room: anyio.Event | None = None
        self._conn: Connection[Any] | None = None
        self._scope: anyio.CancelScope | None = None
        self._reader_done: anyio.Event | None = None
        #: A channel of its own, for the check that notifications arrive.
        self._probe = f"pgsd_probe_{secrets.token_hex(8)}"
        self._probed: anyio.Event | None = None
        self._entered = False

    # -- the context manager -----------------------------------------------------

    async def __aenter__(self) -> Self:
        """Connect, LISTEN, start reading, and check that notifications arrive.

        Raises:
            ConnectError: the first connection failed.
            ListenError: notifications do not reach this connection (a
                pooler in transaction mode in between).
            PoolClosed: the pool is closed.
            PoolTimeout: the pool could not send the check's notification.
        """
        self._pool = pool = await self._resolve()
        self._conn = await self._connect()
        self._arrived, self._room, self._reader_done = anyio.Event(), anyio.Event(), anyio.Event()
        try:
            task_group = pool._task_group
            if pool._closed or task_group is None:
                raise PoolClosed(f"pool {pool.name!r} is closed")
            # Started, not spawned: the reader runs (inside its try) before
            # anything is sent, and a pool closing later stops it visibly.
            await task_group.start(self._read)
            await self._check_delivery()
        except BaseException:
            await self.__aexit__(None, None, None)  # noqa: ASYNC102 (shielded, bounded)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop reading, UNLISTEN and close: shielded, within the pool's ``cancel_grace``."""
        self._ended = True
        self._wake()  # a consumer in another task sees the end
        with anyio.CancelScope(shield=True):
            if self._scope is not None:
                self._scope.cancel()
            if self._reader_done is not None:
                with anyio.move_on_after(self._grace):
                    await self._reader_done.wait()
            conn, self._conn = self._conn, None
            if conn is not None and not conn.closed:
                with anyio.move_on_after(self._grace):
                    with contextlib.suppress(psycopg.Error, OSError):
                        await conn.execute("UNLISTEN *")
                conn.abort()

    @property
    def _grace(self) -> float:
        grace: float = self._pool.config.cancel_grace
        return grace

    @property
    def buffered(self) -> int:
        """Notifications (and gaps) received and not yet taken by the program."""
        return len(self._buffer)

    @property
    def dropped(self) -> int:
        """Notifications dropped so far because the buffer was full (``overflow="gap"``)."""
        return self._dropped_total

    # -- iteration -----------------------------------------------------------------

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Notification | ListenGap:
        """The next notification, or a `ListenGap` where some may have been missed.

        With ``on_gap``, gaps are passed to it instead (awaited if it is a
        coroutine function) and only notifications are yielded.

        Raises:
            ListenError: the database stayed down past ``reconnect_timeout``.
            StopAsyncIteration: the listener was closed, or its pool.
        """
        while True:
            item = await self._take()
            if isinstance(item, ListenGap) and self._on_gap is not None:
                result = self._on_gap(item)
                if inspect.isawaitable(result):
                    await result
                continue
            return item

    async def _take(self) -> Item:
        while not self._buffer:
            if self._failure is not None:
                raise self._failure
            if self._ended or self._arrived is None:
                raise StopAsyncIteration
            if self._arrived.is_set():  # else other consumers wait on it too
                self._arrived = anyio.Event()
            await self._arrived.wait()
        item = self._buffer.popleft()
        if self._dropped and len(self._buffer) < self._max:
            self._buffer.append(ListenGap("overflow", dropped=self._dropped))
            self._dropped = 0
        self._room_freed()
        return item

    def _room_freed(self) -> None:
        if self._room is not None:
            self._room.set()

    # -- the reading task ---------------------------------------------------------------

    async def _read(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        try:
            with anyio.CancelScope() as scope:
                self._scope = scope
                task_status.started()
                while True:
                    conn = self._conn
                    assert conn is not None
                    try:
                        await self._read_until_quiet(conn)
                        # Nothing for a while: a connection that died without a
                        # word (no RST: a NAT, a failover) answers no ping.
                        await conn.ping(PING_TIMEOUT)
                    except (psycopg.OperationalError, OSError) as ex:
                        lost = summary(ex)
                        logger.warning(
                            "listener on %r lost its connection (%s): reconnecting",
                            self._pool.name,
                            lost,
                        )
                        conn.abort()
                        self._conn = await self._reconnect(lost)
                        self._push(ListenGap("reconnected", error=lost))
        except ListenError as ex:
            self._failure = ex
        finally:
            self._ended = True
            self._wake()
            if self._reader_done is not None:
                self._reader_done.set()

    async def _read_until_quiet(self, conn: Connection[Any]) -> None:
        """Take what arrives for ``health_check_interval`` seconds.

        One generator for the whole spell: closing psycopg's early would
        drop the rest of the batch it was yielding.
        """
        interval = self._pool.pool_config.health_check_interval
        async with contextlib.aclosing(conn.notifies(timeout=interval)) as notifies:
            async for notify in notifies:
                if notify.channel == self._probe:
                    if self._probed is not None:
                        self._probed.set()
                    continue
                await self._put(Notification(notify.channel, notify.payload, notify.pid))

    async def _put(self, item: Notification) -> None:
        while len(self._buffer) >= self._max:
            # Nobody takes anything before entering has ended: no blocking then.
            if self._overflow == "gap" or not self._entered:
                self._dropped += 1
                self._dropped_total += 1
                return
            self._room = anyio.Event()
            await self._room.wait()  # the server keeps them meanwhile
        if self._dropped:
            self._buffer.append(ListenGap("overflow", dropped=self._dropped))
            self._dropped = 0
        self._push(item)

    def _push(self, item: Item) -> None:
        self._buffer.append(item)
        self._wake()

    def _wake(self) -> None:
        if self._arrived is not None:
            self._arrived.set()

    # -- connections -----------------------------------------------------------------

    async def _connect(self) -> Connection[Any]:
        """A new connection that listens on every channel."""
        conn: Connection[Any] = await self._pool._filler._factory(self._pool.config)
        try:
            await conn.set_autocommit(True)
            for channel in (*self.channels, self._probe):
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        except BaseException:
            conn.abort()
            raise
        return conn

    async def _reconnect(self, lost: str) -> Connection[Any]:
        """Connect again with the pool's backoff, until ``reconnect_timeout`` (if set)."""
        backoff = Backoff(self._pool.pool_config)
        started = anyio.current_time()
        last = lost
        while True:
            delay = backoff.next_delay()
            limit = self._reconnect_timeout
            if limit is not None and anyio.current_time() + delay - started > limit:
                raise ListenError(
                    f"listener on {self._pool.name!r}: the database stayed down for more than"
                    f" {limit:g} s (reconnect_timeout); last error: {last}"
                )
            await anyio.sleep(delay)
            try:
                conn = await self._connect()
            except (PgsdError, psycopg.Error, OSError) as ex:
                error = summary(ex)
                if backoff.attempts == 1 or error != last:  # each new reason, once
                    logger.warning(
                        "listener on %r: reconnecting failed, retrying with backoff: %s",
                        self._pool.name,
                        error,
                    )
                last = error
                continue
            logger.info("listener on %r: reconnected, listening again", self._pool.name)
            return conn

    async def _check_delivery(self) -> None:
        """Send a notification on the probe channel through the pool; wait until it is read."""
        self._probed = probed = anyio.Event()
        await self._pool.execute("SELECT pg_notify(%s, '')", [self._probe])
        limit = min(_PROBE_TIMEOUT, self._pool.config.connect_timeout)
        with anyio.move_on_after(limit):
            await probed.wait()
            self._entered = True
            self._room_freed()
            return
        raise ListenError(
            f"listener on {self._pool.name!r}: a notification sent to this database did not"
            f" reach the listening connection within {limit:g} s. Behind a pooler in"
            " transaction or statement mode (PgBouncer) LISTEN cannot work: use a direct"
            " connection or a session-mode pool for listeners"
        )


class Listening:
    """`ConnectionPool.listen` and `ConnectionPool.notify`."""

    def listen(
        self,
        channel: str,
        *more_channels: str,
        max_buffered: int = 1000,
        overflow: str = "gap",
        on_gap: OnGap | None = None,
        reconnect_timeout: float | None = None,
    ) -> Listener:
        """Receive the notifications of one or more channels, across reconnects.

        ``async with pool.listen("jobs") as notifications: async for n in
        notifications`` yields a `Notification` per notification, and a
        `ListenGap` where some may have been missed (after a reconnect, or
        dropped by a full buffer).

        Args:
            channel: a channel's name, as given (quoted for ``LISTEN``: any
                string is one channel).
            more_channels: more channels, the same way.
            max_buffered: notifications kept for the program at most.
            overflow: with the buffer full, ``"gap"`` drops what comes and
                reports a gap; ``"block"`` stops reading (the server
                keeps them meanwhile).
            on_gap: called with each gap (awaited when it returns an
                awaitable) instead of yielding it.
            reconnect_timeout: seconds the database may stay down before
                the iteration raises `ListenError` (default: retry for
                as long as the listener lives).

        Raises:
            ConfigError: a channel or option is invalid (at once).
        """
        pool: ConnectionPool = self  # type: ignore[assignment]

        async def resolve() -> ConnectionPool:  # noqa: ASYNC124 (the Listener awaits it)
            return pool

        return Listener(
            resolve,
            (channel, *more_channels),
            max_buffered=max_buffered,
            overflow=overflow,
            on_gap=on_gap,
            reconnect_timeout=reconnect_timeout,
        )

    async def notify(self, channel: str, payload: str = "") -> None:
        """Send a notification (``pg_notify``, the channel and payload as parameters)."""
        pool: ConnectionPool = self  # type: ignore[assignment]
        await pool.execute("SELECT pg_notify(%s, %s)", [channel, payload])
