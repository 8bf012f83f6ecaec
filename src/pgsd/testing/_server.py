"""A throwaway PostgreSQL server in a temporary directory, on 127.0.0.1."""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from ._binaries import PostgresBinaries, find_binaries
from ._process import ServiceProcess, free_port
from ._tls import TLSFiles

__all__ = ["PostgresServer", "free_port"]

logger = logging.getLogger("pgsd.testing")

_START_TIMEOUT = 60
_HBA = """\
local all all trust
{cert_users}{kind} all {superuser} 127.0.0.1/32 trust
{kind} all {superuser} ::1/128 trust
{kind} all all 127.0.0.1/32 scram-sha-256
{kind} all all ::1/128 scram-sha-256
"""
_HBA_KINDS = ("host", "hostssl", "hostnossl")
# Before the generic lines: these roles log in over TLS with a client
# certificate, and are refused outright without TLS rather than falling
# through to a password.
_HBA_CERT = """\
hostssl all "{user}" 127.0.0.1/32 cert
hostssl all "{user}" ::1/128 cert
hostnossl all "{user}" 127.0.0.1/32 reject
hostnossl all "{user}" ::1/128 reject
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


def _conf_value(key: str, value: object) -> str:
    """A ``postgresql.conf`` value, quoted: a value cannot spill into another line."""
    if not re.fullmatch(r"[a-z][a-z0-9_.]*", key):
        raise ValueError(f"not a server setting name: {key!r}")
    text = str(value)
    if "\n" in text or "\r" in text or "\0" in text:
        raise ValueError(f"the value of {key} must be one line")
    return "'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


class PostgresServer(ServiceProcess):
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
        tls: serve TLS (``ssl = on``) with these certificates, or with
            certificates made for the occasion when True (their
            `TLSFiles` is :attr:`tls` once started: a server certificate
            for ``localhost`` and 127.0.0.1 and one client certificate per
            ``cert_users`` role). Connections without TLS keep working.
        cert_users: roles that must log in over TLS with a client
            certificate whose common name is the role (``hostssl ... cert``
            in ``pg_hba.conf``; without TLS they are refused). The roles
            themselves are not created.
        hba: the kind of ``pg_hba.conf`` line that admits TCP connections:
            ``"host"`` (with or without TLS), ``"hostssl"`` (TLS only) or
            ``"hostnossl"`` (without TLS only, even when the server offers
            TLS: libpq's default ``sslmode=prefer`` is then refused over TLS
            and must retry without it).

    Raises:
        ValueError: ``cert_users`` without ``tls``, ``hba="hostssl"``
            without ``tls``, an unknown ``hba``, a role name that
            ``pg_hba.conf`` cannot hold, or a setting that is not one line
            under a setting's name.
    """

    _name = "postgres"

    def __init__(
        self,
        *,
        version: int | None = None,
        binaries: PostgresBinaries | None = None,
        settings: dict[str, str] | None = None,
        superuser: str = "postgres",
        tls: TLSFiles | bool = False,
        cert_users: Sequence[str] = (),
        hba: str = "host",
    ) -> None:
        if cert_users and tls is False:
            raise ValueError("cert_users needs a server with tls")
        if hba not in _HBA_KINDS:
            raise ValueError(f"hba must be one of {', '.join(_HBA_KINDS)}, not {hba!r}")
        if hba == "hostssl" and tls is False:
            raise ValueError('hba="hostssl" needs a server with tls')
        for user in cert_users:
            if not user or any(char in user for char in '"\n\r'):
                raise ValueError(f"role name {user!r} cannot be written in pg_hba.conf")
        if binaries is None:
            env_version = os.environ.get("PGSD_TEST_PG")
            if version is None and env_version:
                version = int(env_version)
            binaries = find_binaries(version)
        super().__init__()
        self.binaries = binaries
        self.superuser = superuser
        self.settings = {**_SETTINGS, **(settings or {})}
        for key, value in self.settings.items():
            _conf_value(key, value)  # fail now, not after initdb
        self._passwords: dict[str, str] = {}
        self.cert_users = tuple(cert_users)
        self.hba = hba
        self._tls_wanted = tls
        self._tls: TLSFiles | None = None

    def __repr__(self) -> str:
        state = f"port={self.port}" if self.running else "stopped"
        return f"<PostgresServer {self.binaries.major} {state}>"

    # -- lifecycle ---------------------------------------------------------

    @property
    def major(self) -> int:
        """The server's major version."""
        return self.binaries.major

    @property
    def tls(self) -> TLSFiles | None:
        """The certificates the server uses, once started with ``tls``; else None."""
        return self._tls

    @property
    def datadir(self) -> Path:
        """The data directory (exists once started)."""
        if self._base is None:
            raise RuntimeError("the server has not been started")
        return self._base / "data"

    def start(self) -> None:
        """Create the cluster (the first time) and start the server.

        Raises:
            RuntimeError: initdb or the server failed; the server log is in
                the message.
        """
        if self.running:
            return
        if self._base is None:
            base = self._make_base("pgsd-pg-")
            (base / "socket").mkdir()
            self._chown(base / "socket")
            self._install_tls(base)
            self._initdb()
        if not self.port:
            self.port = free_port(self.host)
        with self._logfile.open("ab") as log:
            self._spawn(
                [self.binaries.program("postgres"), "-D", str(self.datadir), "-p", str(self.port)],
                log,
            )
        logger.info("PostgreSQL %s started on %s:%s", self.major, self.host, self.port)

    def _probe(self) -> None:
        psycopg.connect(self.dsn(connect_timeout=2)).close()

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``mode``: smart, fast or immediate); keep its files."""
        signals = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
        self._stop_with(signals[mode])

    def restart(self) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start()

    def kill(self) -> None:
        """``kill -9`` the postmaster, as a crash would; its files stay.

        The backends notice that their postmaster died and exit; the next
        :meth:`start` runs crash recovery.
        """
        super().kill()

    def postmaster_pid(self) -> int | None:
        """The postmaster's process id, or None when it is not running."""
        return self._proc.pid if self._proc is not None else None

    def _shutdown(self) -> None:
        self.stop("immediate")  # nothing to keep: no checkpoint needed

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
        """Create a role that logs in with a password; return the password.

        ``options`` is trusted SQL appended to ``CREATE ROLE`` (``"CREATEDB"``,
        ``"CONNECTION LIMIT 1"``): never pass it text from outside the test.
        """
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
        if self._base is None:
            raise RuntimeError("the server has not been started")
        return self._base / "server.log"

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
        cert_users = "".join(_HBA_CERT.format(user=user) for user in self.cert_users)
        hba = _HBA.format(superuser=self.superuser, cert_users=cert_users, kind=self.hba)
        (self.datadir / "pg_hba.conf").write_text(hba)
        with (self.datadir / "postgresql.conf").open("a") as conf:
            assert self._base is not None
            settings = {**self.settings, "unix_socket_directories": str(self._base / "socket")}
            for key, value in settings.items():
                conf.write(f"{key} = {_conf_value(key, value)}\n")

    def _install_tls(self, base: Path) -> None:
        """Give the server its own copies of its certificate, key and CA, owned by its OS user.

        PostgreSQL refuses a key that others may read, and the server's OS
        user may not be able to enter the directory the files came from.
        """
        if self._tls_wanted is False:
            return
        if isinstance(self._tls_wanted, TLSFiles):
            files = self._tls_wanted
        else:
            files = TLSFiles.generate(base / "tls", client_users=self.cert_users)
        own = base / "server-tls"
        own.mkdir(mode=0o700)
        self._chown(own)
        settings = {"ssl": "on"}
        for setting, source, name, mode in (
            ("ssl_cert_file", files.server_cert, "server.crt", 0o644),
            ("ssl_key_file", files.server_key, "server.key", 0o600),
            ("ssl_ca_file", files.ca_cert, "ca.crt", 0o644),
        ):
            target = own / name
            shutil.copyfile(source, target)
            target.chmod(mode)
            self._chown(target)
            settings[setting] = str(target)
        # Explicit settings win, so a test can still change any of these.
        self.settings = {**settings, **self.settings}
        self._tls = files

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
