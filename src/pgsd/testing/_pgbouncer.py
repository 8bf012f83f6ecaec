"""A throwaway PgBouncer in front of a `PostgresServer`, on 127.0.0.1.

Authentication mirrors the server's: the server's superuser connects
without a password (it is also PgBouncer's admin), every other role
authenticates with SCRAM-SHA-256. PgBouncer keeps no password list of its
own: it looks each role's SCRAM secret up on the server (``auth_query``, run
as the superuser), the way a production PgBouncer is usually set up, so a
role created after the bouncer started can log in at once. Having checked
the client's SCRAM proof against that secret, PgBouncer logs in to the
server with the same secret (SCRAM pass-through).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row

from ._binaries import ServerNotFound
from ._process import ServiceProcess, free_port
from ._server import PostgresServer

__all__ = ["PgBouncer"]

logger = logging.getLogger("pgsd.testing")

_START_TIMEOUT = 30
_STOP_TIMEOUT = 10
# Where Debian puts the binary: /usr/sbin is not on an unprivileged PATH.
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin")
_VERSION = re.compile(rb"PgBouncer (\d+)\.(\d+)(?:\.(\d+))?")
#: The first release that keeps track of prepared statements in transaction mode.
PREPARED_STATEMENTS_SINCE = (1, 21, 0)
_HBA = """\
host all {superuser} 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
"""

PoolMode = Literal["session", "transaction"]


def _find_binary() -> str:
    path = shutil.which("pgbouncer")
    if path is None:
        search = os.pathsep.join(_SBIN_DIRS)
        path = shutil.which("pgbouncer", path=search)
    if path is None:
        raise ServerNotFound("no pgbouncer binary found (apt-get install pgbouncer)")
    return path


def _ini_value(value: object) -> str:
    text = str(value)
    if "\n" in text:
        raise ValueError(f"a pgbouncer.ini value cannot span lines: {text!r}")
    return text


class PgBouncer(ServiceProcess):
    """PgBouncer on a free port of 127.0.0.1, pooling connections to ``server``.

    Use it as a context manager around a running server::

        with PostgresServer() as server, PgBouncer(server, pool_mode="transaction") as bouncer:
            conn = await pgsd.connect(bouncer.dsn("app", "app_user"))

    Every database of the server is reachable through it under its own
    name; ``pgbouncer`` is the admin console (see :meth:`admin`).

    Args:
        server: the PostgreSQL server to pool connections to; it must be
            running while the bouncer is used.
        pool_mode: ``"session"`` (a server connection per client connection
            for its whole life) or ``"transaction"`` (a server connection
            per transaction).
        max_prepared_statements: PgBouncer's setting of that name
            (1.21 and later): how many prepared statements it tracks per
            server connection in transaction mode; None keeps PgBouncer's
            default.
        pool_size: server connections per database and user
            (``default_pool_size``).

    Raises:
        pgsd.testing.ServerNotFound: no ``pgbouncer`` binary is installed.
        ValueError: a bad ``pool_mode`` or ``pool_size``, or
            ``max_prepared_statements`` on a PgBouncer older than 1.21.
    """

    _name = "pgbouncer"
    _start_timeout = 30.0
    # In session mode a safe shutdown waits for clients to disconnect: the
    # kill after this long is what bounds it when one never does.
    _stop_timeout = 10.0

    def __init__(
        self,
        server: PostgresServer,
        *,
        pool_mode: PoolMode = "session",
        max_prepared_statements: int | None = None,
        pool_size: int = 20,
    ) -> None:
        super().__init__()
        self.binary = _find_binary()
        self.server = server
        self.pool_mode = pool_mode
        self.max_prepared_statements = max_prepared_statements
        self.pool_size = pool_size
        self._version: tuple[int, int, int] | None = None
        self._check_options()

    def _check_options(self) -> None:
        if self.pool_mode not in ("session", "transaction"):
            raise ValueError(f"pool_mode must be 'session' or 'transaction': {self.pool_mode!r}")
        if self.pool_size < 1:
            raise ValueError(f"pool_size must be at least 1: {self.pool_size}")
        if self.max_prepared_statements is None:
            return
        if self.max_prepared_statements < 0:
            raise ValueError(
                f"max_prepared_statements must be >= 0: {self.max_prepared_statements}"
            )
        if self.version < PREPARED_STATEMENTS_SINCE:
            needs = "max_prepared_statements needs PgBouncer 1.21 or later"
            raise ValueError(f"{needs}, this is {self.version_text}")

    def __repr__(self) -> str:
        state = f"port={self.port}" if self.running else "stopped"
        return f"<PgBouncer {self.version_text} {self.pool_mode} {state}>"

    # -- version -----------------------------------------------------------

    @classmethod
    def installed_version(cls) -> tuple[int, int, int]:
        """The installed PgBouncer's version, from ``pgbouncer --version``.

        Raises:
            pgsd.testing.ServerNotFound: no ``pgbouncer`` binary is installed.
            RuntimeError: its output names no version.
        """
        out = subprocess.run(
            [_find_binary(), "--version"], capture_output=True, timeout=30, check=False
        ).stdout
        match = _VERSION.search(out)
        if match is None:
            raise RuntimeError(f"pgbouncer --version printed no version: {out!r}")
        major, minor, patch = match.groups()
        return int(major), int(minor), int(patch or 0)

    @property
    def version(self) -> tuple[int, int, int]:
        """This PgBouncer's version, such as ``(1, 18, 0)``."""
        if self._version is None:
            self._version = self.installed_version()
        return self._version

    @property
    def version_text(self) -> str:
        """The version as PgBouncer prints it, such as ``"1.18.0"``."""
        return ".".join(map(str, self.version))

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Write the configuration and start PgBouncer; wait until it accepts connections.

        Raises:
            RuntimeError: the server is not running, or PgBouncer exited or
                did not accept connections within 30 s; its log is in the
                message.
        """
        if self.running:
            return
        if not self.server.running:
            raise RuntimeError("start the PostgresServer before its PgBouncer")
        if self._base is None:
            self._make_base("pgsd-pgbouncer-")
        if not self.port:
            self.port = free_port(self.host)
        self._write_config()
        assert self._base is not None
        self._spawn([self.binary, str(self._base / "pgbouncer.ini")])
        logger.info(
            "PgBouncer %s (%s pooling) started on %s:%s",
            self.version_text,
            self.pool_mode,
            self.host,
            self.port,
        )

    def _probe(self) -> None:
        self._admin_connection(connect_timeout=2).close()

    # -- connecting --------------------------------------------------------

    def dsn(
        self,
        dbname: str = "postgres",
        user: str | None = None,
        password: str | None = None,
        **params: Any,
    ) -> str:
        """A key=value conninfo for ``user`` on ``dbname`` through PgBouncer.

        As :meth:`PostgresServer.dsn`: the default user is the server's
        superuser, and the password of a role made by
        :meth:`PostgresServer.create_role` is filled in unless another is
        given.
        """
        direct = self.server.dsn(dbname, user, password, **params)
        return make_conninfo(direct, host=self.host, port=self.port)

    def admin(self, command: str) -> list[dict[str, Any]]:
        """Run an admin console command (``SHOW POOLS``, ``RELOAD``...); return its rows.

        Raises:
            psycopg.Error: PgBouncer refused the command.
        """
        with self._admin_connection() as conn:
            # The console speaks only the simple query protocol, which a
            # client-side-binding cursor uses.
            cur = psycopg.ClientCursor(conn, row_factory=dict_row)
            cur.execute(command)
            return cur.fetchall() if cur.description else []

    def _admin_connection(self, **params: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn("pgbouncer", **params), autocommit=True)

    # -- internals ---------------------------------------------------------

    @property
    def _logfile(self) -> Path:
        if self._base is None:
            raise RuntimeError("pgbouncer has not been started")
        return self._base / "pgbouncer.log"

    def _settings(self) -> dict[str, object]:
        assert self._base is not None
        superuser = self.server.superuser
        settings: dict[str, object] = {
            "listen_addr": self.host,
            "listen_port": self.port,
            # No Unix socket: loopback TCP only, and nothing left in /tmp.
            "unix_socket_dir": "",
            "logfile": self._base / "pgbouncer.log",
            "pidfile": self._base / "pgbouncer.pid",
            "auth_type": "hba",
            "auth_hba_file": self._base / "pg_hba.conf",
            "auth_file": self._base / "userlist.txt",
            "auth_user": superuser,
            "admin_users": superuser,
            "stats_users": superuser,
            "pool_mode": self.pool_mode,
            "default_pool_size": self.pool_size,
            "max_client_conn": 500,
        }
        if self.max_prepared_statements is not None:
            settings["max_prepared_statements"] = self.max_prepared_statements
        return settings

    def _write_config(self) -> None:
        assert self._base is not None
        superuser = self.server.superuser
        # Every database of the server, under its own name.
        lines = ["[databases]", f"* = host={self.server.host} port={self.server.port}", ""]
        lines.append("[pgbouncer]")
        lines.extend(f"{key} = {_ini_value(value)}" for key, value in self._settings().items())
        self._write("pgbouncer.ini", "\n".join(lines) + "\n")
        self._write("pg_hba.conf", _HBA.format(superuser=superuser))
        # Only the superuser is listed, without a password: the server
        # trusts it on loopback. Every other role's secret comes from the
        # server through auth_query.
        self._write("userlist.txt", f'"{superuser}" ""\n')

    def _write(self, name: str, text: str) -> None:
        assert self._base is not None
        path = self._base / name
        path.write_text(text)
        self._chown(path)
