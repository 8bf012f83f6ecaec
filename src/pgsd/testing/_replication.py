"""A streaming standby of a throwaway primary, and its promotion."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import psycopg

from ._binaries import ServerNotFound
from ._process import free_port
from ._server import PostgresServer

__all__ = ["StandbyServer", "promote", "start_standby"]

logger = logging.getLogger("pgsd.testing")

#: How long a new standby may take to connect to its primary and stream.
_STREAM_TIMEOUT = 30.0
#: How long the primary may take to accept a replication connection after
#: ``pg_hba.conf`` was changed and reloaded.
_HBA_TIMEOUT = 10.0
#: How long dropping the standby's slot may wait for its WAL sender to exit.
_SLOT_DROP_TIMEOUT = 5.0
_POLL_INTERVAL = 0.05
#: What the primary needs: ``-X stream`` takes two WAL senders while the
#: backup runs, the standby one afterwards, and the standby has a slot.
_NEEDED = {"max_wal_senders": 2, "max_replication_slots": 1}


class StandbyServer(PostgresServer):
    """A hot standby streaming from a running :class:`PostgresServer`.

    Made by :func:`start_standby`, which also prepares the primary. The
    data directory is a ``pg_basebackup`` of the primary, taken as the OS
    user the servers run as; the standby streams through a replication slot
    of its own, so the primary keeps the WAL it has not received yet. It runs
    on its own free port and is stopped, restarted and cleaned up like any
    :class:`PostgresServer`; cleaning up also drops its slot on the primary
    when the primary still runs.

    Args:
        primary: the running primary to copy and stream from.
        settings: ``postgresql.conf`` settings of the standby's own, written
            after those copied from the primary.
    """

    def __init__(self, primary: PostgresServer, *, settings: dict[str, str] | None = None) -> None:
        super().__init__(binaries=primary.binaries, settings=settings, superuser=primary.superuser)
        self.primary = primary

    def __repr__(self) -> str:
        state = f"port={self.port}" if self.running else "stopped"
        return f"<StandbyServer {self.major} {state} of port {self.primary.port}>"

    @property
    def slot_name(self) -> str:
        """The replication slot on the primary, also the standby's ``application_name``."""
        return f"pgsd_standby_{self.port}"

    def wait_streaming(self, timeout: float = _STREAM_TIMEOUT) -> None:
        """Wait until the standby is in recovery and the primary streams to it.

        Raises:
            RuntimeError: not streaming within ``timeout`` seconds; the
                standby's log is in the message.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._in_recovery() and self._primary_streams():
                return
            time.sleep(_POLL_INTERVAL)
        raise RuntimeError(
            f"the standby on port {self.port} is not streaming from port"
            f" {self.primary.port} after {timeout:g} s:\n{self.log()[-4000:]}"
        )

    def wait_caught_up(self, timeout: float = _STREAM_TIMEOUT) -> None:
        """Wait until the standby has replayed everything the primary wrote so far.

        Raises:
            RuntimeError: not caught up within ``timeout`` seconds.
        """
        target = self._flush_primary()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            [(caught_up,)] = self.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", [target])
            if caught_up:
                return
            time.sleep(_POLL_INTERVAL)
        raise RuntimeError(
            f"the standby on port {self.port} did not replay up to {target} in {timeout:g} s"
        )

    def cleanup(self) -> None:
        """Stop the standby, remove its directory and drop its slot on the primary."""
        try:
            super().cleanup()
        finally:
            if self.port and self.primary.running:
                self._drop_slot()

    # -- internals ---------------------------------------------------------

    def _initdb(self) -> None:
        # The data directory is a copy of the primary's, not a new cluster.
        if not self.port:
            self.port = free_port(self.host)
        conninfo = self.primary.dsn(application_name=self.slot_name, connect_timeout=10)
        self._run(
            self.binaries.program("pg_basebackup"),
            "--pgdata",
            str(self.datadir),
            "--dbname",
            conninfo,
            "--write-recovery-conf",
            "--wal-method=stream",
            "--create-slot",
            "--slot",
            self.slot_name,
            "--checkpoint=fast",
            "--no-sync",
        )
        assert self._base is not None
        # The copied postgresql.conf points at the primary's socket directory.
        own = {
            **self.settings,
            "hot_standby": "on",
            "unix_socket_directories": str(self._base / "socket"),
        }
        with (self.datadir / "postgresql.conf").open("a") as conf:
            for key, value in own.items():
                conf.write(f"{key} = '{value}'\n")

    def _flush_primary(self) -> str:
        """Flush the primary's WAL; return its end, the end of a whole record.

        The servers commit asynchronously: a commit may still sit in the WAL
        buffers, unsent. A transaction that writes WAL (a logical decoding
        message, which nothing reads) and commits synchronously flushes
        everything written before it.
        """
        with psycopg.connect(self.primary.dsn(), autocommit=True) as conn:
            conn.execute("SET synchronous_commit TO local")
            conn.execute("SELECT pg_logical_emit_message(true, %s, %s)", ["pgsd", "flush"])
            row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        return str(row[0])

    def _in_recovery(self) -> bool:
        try:
            [(in_recovery,)] = self.execute("SELECT pg_is_in_recovery()")
        except psycopg.OperationalError:
            return False  # not accepting connections yet
        return bool(in_recovery)

    def _primary_streams(self) -> bool:
        rows = self.primary.execute(
            "SELECT 1 FROM pg_stat_replication WHERE application_name = %s AND state = 'streaming'",
            [self.slot_name],
        )
        return bool(rows)

    def _drop_slot(self) -> None:
        """Drop the slot once its WAL sender has noticed the standby is gone."""
        deadline = time.monotonic() + _SLOT_DROP_TIMEOUT
        try:
            while time.monotonic() < deadline:
                rows = self.primary.execute(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                    [self.slot_name],
                )
                if not rows:
                    return
                if not rows[0][0]:
                    self.primary.execute("SELECT pg_drop_replication_slot(%s)", [self.slot_name])
                    return
                time.sleep(_POLL_INTERVAL)
        except psycopg.Error as ex:
            logger.warning("could not drop replication slot %s: %s", self.slot_name, ex)
            return
        logger.warning("replication slot %s still active: left on the primary", self.slot_name)


def start_standby(
    primary: PostgresServer,
    *,
    settings: dict[str, str] | None = None,
    timeout: float = _STREAM_TIMEOUT,
) -> StandbyServer:
    """Start a hot standby of ``primary``, streaming, on a free port of 127.0.0.1.

    The primary must run with ``wal_level`` ``replica`` (or ``logical``), at
    least 2 ``max_wal_senders`` and 1 ``max_replication_slots`` (PostgreSQL's
    defaults since 10). A ``pg_hba.conf`` line that lets the superuser make
    replication connections from 127.0.0.1 is added to the primary when
    missing, and the primary reloaded. Returns once the standby is in
    recovery and the primary shows it streaming. Use the result as a context
    manager, or call its ``cleanup()``.

    Args:
        primary: a running :class:`PostgresServer`.
        settings: ``postgresql.conf`` settings for the standby.
        timeout: seconds to wait for streaming to begin.

    Raises:
        ServerNotFound: the primary's binaries have no ``pg_basebackup``.
        RuntimeError: the primary is not running or not configured for
            replication, ``pg_basebackup`` or the standby failed, or the
            standby was not streaming within ``timeout``; the standby's
            files are removed then.
    """
    if not primary.running:
        raise RuntimeError("the primary is not running")
    basebackup = Path(primary.binaries.program("pg_basebackup"))
    if not basebackup.exists():
        raise ServerNotFound(f"{basebackup} does not exist: a standby cannot be made")
    _check_replication_settings(primary)
    _allow_replication(primary)
    standby = StandbyServer(primary, settings=settings)
    try:
        standby.start()
        standby.wait_streaming(timeout)
    except BaseException:
        standby.cleanup()
        raise
    logger.info("standby on %s:%s streams from port %s", standby.host, standby.port, primary.port)
    return standby


def promote(server: PostgresServer, *, timeout: float = 30.0) -> None:
    """Promote a standby to primary and wait until it accepts writes.

    Raises:
        RuntimeError: the promotion did not finish within ``timeout`` seconds.
        psycopg.Error: the server is not a standby (``recovery is not in
            progress``) or could not be reached.
    """
    seconds = max(1, math.ceil(timeout))
    [(done,)] = server.execute(f"SELECT pg_promote(wait => true, wait_seconds => {seconds})")
    if not done:
        raise RuntimeError(f"the standby on port {server.port} was not promoted in {seconds} s")
    logger.info("server on %s:%s promoted to primary", server.host, server.port)


def _check_replication_settings(primary: PostgresServer) -> None:
    rows = primary.execute(
        "SELECT name, setting FROM pg_settings"
        " WHERE name IN ('wal_level', 'max_wal_senders', 'max_replication_slots')"
    )
    current = dict(rows)
    problems = [
        f"{name} = {current[name]} (at least {least} needed)"
        for name, least in _NEEDED.items()
        if int(current[name]) < least
    ]
    if current["wal_level"] not in ("replica", "logical"):
        problems.append(f"wal_level = {current['wal_level']} (replica needed)")
    if problems:
        raise RuntimeError(
            f"the primary on port {primary.port} cannot stream to a standby: "
            + "; ".join(problems)
            + " (pass them in PostgresServer(settings=...))"
        )


def _allow_replication(primary: PostgresServer) -> None:
    """Let the superuser replicate over 127.0.0.1; wait until the primary agrees."""
    line = f"host replication {primary.superuser} 127.0.0.1/32 trust"
    hba = primary.datadir / "pg_hba.conf"
    if line not in (text.strip() for text in hba.read_text().splitlines()):
        with hba.open("a") as file:
            file.write(line + "\n")
        primary.execute("SELECT pg_reload_conf()")
    # The reload is a signal: poll until a replication connection is let in.
    deadline = time.monotonic() + _HBA_TIMEOUT
    while True:
        try:
            psycopg.connect(primary.dsn(replication="true", connect_timeout=2)).close()
        except psycopg.OperationalError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(_POLL_INTERVAL)
        else:
            return
