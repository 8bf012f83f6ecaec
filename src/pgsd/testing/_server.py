"""A throwaway PostgreSQL server in a temporary directory, on 127.0.0.1."""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from ._binaries import PostgresBinaries, ServerNotFound, find_binaries

__all__ = ["PostgresServer", "free_port"]

logger = logging.getLogger("pgsd.testing")

_START_TIMEOUT = 60
_HBA = """\
local all all trust
host all {superuser} 127.0.0.1/32 trust
host all {superuser} ::1/128 trust
host all all 127.0.0.1/32 scram-sha-256
host all all ::1/128 scram-sha-256
"""
# Durability off: these servers hold nothing worth keeping, and fsync on a
# shared 2-core machine makes every test slower.
_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "32MB",
    "password_encryption": "scram-sha-256",
    "log_min_messages": "warning",
    "log_line_prefix": "%m [%p] %u@%d ",
    "logging_collector": "off",
}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _server_user() -> pwd.struct_passwd | None:
    """The OS user to run the server as: None means the current user."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise ServerNotFound("running as root and neither 'postgres' nor 'nobody' exists")


class PostgresServer:
    """A PostgreSQL server in a temporary directory, listening on 127.0.0.1.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`::

        with PostgresServer() as server:
            conn = await pgsd.connect(server.dsn())

    Args:
        version: the major version to run (default: the newest installed,
            or ``PGSD_TEST_PG`` when set).
        binaries: explicit binaries, overriding ``version``.
        settings: extra ``postgresql.conf`` settings.
        superuser: the name of the bootstrap superuser.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        *,
        version: int | None = None,
        binaries: PostgresBinaries | None = None,
        settings: dict[str, str] | None = None,
        superuser: str = "postgres",
    ) -> None:
        if binaries is None:
            env_version = os.environ.get("PGSD_TEST_PG")
            if version is None and env_version:
                version = int(env_version)
            binaries = find_binaries(version)
        self.binaries = binaries
        self.superuser = superuser
        self.settings = {**_SETTINGS, **(settings or {})}
        self.port = 0
        self._passwords: dict[str, str] = {}
        self._base: Path | None = None
        self._user = _server_user()
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        state = f"port={self.port}" if self.running else "stopped"
        return f"<PostgresServer {self.binaries.major} {state}>"

    # -- lifecycle ---------------------------------------------------------

    @property
    def major(self) -> int:
        """The server's major version."""
        return self.binaries.major

    @property
    def datadir(self) -> Path:
        """The data directory (exists once started)."""
        if self._base is None:
            raise RuntimeError("the server has not been started")
        return self._base / "data"

    @property
    def running(self) -> bool:
        """Whether the postmaster is running."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Create the cluster (the first time) and start the server.

        Raises:
            RuntimeError: initdb or the server failed; the server log is in
                the message.
        """
        if self.running:
            return
        if self._base is None:
            self._base = Path(tempfile.mkdtemp(prefix="pgsd-pg-"))
            (self._base / "socket").mkdir()
            if self._user is not None:
                for path in (self._base, self._base / "socket"):
                    os.chown(path, self._user.pw_uid, self._user.pw_gid)
            self._initdb()
        if not self.port:
            self.port = free_port(self.host)
        # The postmaster is our child (not pg_ctl's) so that we can reap it
        # after a kill -9: a zombie would keep its pid file "alive".
        with self._logfile.open("ab") as log:
            self._proc = subprocess.Popen(
                [self.binaries.program("postgres"), "-D", str(self.datadir), "-p", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self._popen_kwargs(),
            )
        self._wait_ready()
        logger.info("PostgreSQL %s started on %s:%s", self.major, self.host, self.port)

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                raise RuntimeError(f"postgres exited at start:\n{self.log()[-4000:]}")
            try:
                psycopg.connect(self.dsn(connect_timeout=2)).close()
            except psycopg.OperationalError:
                time.sleep(0.05)
            else:
                return
        self.kill()
        raise RuntimeError(f"postgres did not start in {_START_TIMEOUT} s:\n{self.log()[-4000:]}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``mode``: smart, fast or immediate); keep its files."""
        proc = self._proc
        if proc is None:
            return
        sig = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()
        self._proc = None

    def restart(self) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start()

    def kill(self) -> None:
        """``kill -9`` the postmaster, as a crash would; its files stay.

        The backends notice that their postmaster died and exit; the next
        :meth:`start` runs crash recovery.
        """
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=30)
        self._proc = None

    def postmaster_pid(self) -> int | None:
        """The postmaster's process id, or None when it is not running."""
        return self._proc.pid if self._proc is not None else None

    def cleanup(self) -> None:
        """Stop the server and remove its directory."""
        try:
            self.stop("immediate")
        finally:
            if self._base is not None:
                shutil.rmtree(self._base, ignore_errors=True)
                self._base = None

    def __enter__(self) -> PostgresServer:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- connecting --------------------------------------------------------

    def dsn(
        self,
        dbname: str = "postgres",
        user: str | None = None,
        password: str | None = None,
        **params: Any,
    ) -> str:
        """A key=value conninfo for ``user`` (default the superuser) on ``dbname``.

        The password of a role made by :meth:`create_role` is filled in
        unless another is given.
        """
        user = user or self.superuser
        if password is None:
            password = self._passwords.get(user)
        return make_conninfo(
            host=self.host,
            port=self.port,
            dbname=dbname,
            user=user,
            password=password,
            **params,
        )

    def execute(
        self, sql: str, params: Sequence[Any] | None = None, *, dbname: str = "postgres"
    ) -> list[tuple[Any, ...]]:
        """Run one statement as the superuser and return its rows (if any)."""
        with psycopg.connect(self.dsn(dbname), autocommit=True) as conn:
            cur = conn.execute(sql.encode(), params)
            return cur.fetchall() if cur.description else []

    def create_role(
        self, name: str, *, password: str | None = None, login: bool = True, options: str = ""
    ) -> str:
        """Create a role that logs in with a password; return the password."""
        password = password or secrets.token_urlsafe(12)
        login_kw = "LOGIN" if login else "NOLOGIN"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(
                psycopg.sql.SQL("CREATE ROLE {} {} PASSWORD {} {}").format(
                    psycopg.sql.Identifier(name),
                    psycopg.sql.SQL(login_kw),
                    psycopg.sql.Literal(password),
                    psycopg.sql.SQL(options),
                )
            )
        self._passwords[name] = password
        return password

    def create_database(self, name: str, *, owner: str | None = None) -> None:
        """Create a database (owned by ``owner`` when given)."""
        query = psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name))
        if owner:
            query += psycopg.sql.SQL(" OWNER {}").format(psycopg.sql.Identifier(owner))
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(query)

    # -- internals ---------------------------------------------------------

    @property
    def _logfile(self) -> Path:
        assert self._base is not None
        return self._base / "server.log"

    def log(self) -> str:
        """The server's log so far."""
        try:
            return self._logfile.read_text(errors="replace")
        except OSError:
            return ""

    def _initdb(self) -> None:
        self._run(
            self.binaries.program("initdb"),
            "-D",
            str(self.datadir),
            "-U",
            self.superuser,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        hba = _HBA.format(superuser=self.superuser)
        (self.datadir / "pg_hba.conf").write_text(hba)
        with (self.datadir / "postgresql.conf").open("a") as conf:
            for key, value in self.settings.items():
                conf.write(f"{key} = '{value}'\n")
            assert self._base is not None
            conf.write(f"unix_socket_directories = '{self._base / 'socket'}'\n")

    def _popen_kwargs(self) -> dict[str, Any]:
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        for var in ("PGHOST", "PGPORT", "PGDATA", "PGUSER", "PGDATABASE", "PGPASSWORD"):
            env.pop(var, None)
        kwargs: dict[str, Any] = {"cwd": self._base, "env": env}
        if self._user is not None:
            kwargs.update(user=self._user.pw_uid, group=self._user.pw_gid, extra_groups=[])
        return kwargs

    def _run(self, *cmd: str) -> None:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=_START_TIMEOUT + 30,
            check=False,
            **self._popen_kwargs(),
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{Path(cmd[0]).name} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
            )
