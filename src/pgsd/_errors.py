"""The exceptions pgsd raises, and the translation of psycopg's connect errors."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg
import psycopg.errors

__all__ = [
    "AuthenticationError",
    "ConfigError",
    "ConnectError",
    "ConnectTimeout",
    "DatabaseNotFound",
    "InsufficientPrivileges",
    "OutcomeUnknown",
    "PasswordProviderError",
    "PgsdError",
    "PoolClosed",
    "PoolTimeout",
    "ServerUnavailable",
    "TLSError",
    "TooManyConnections",
    "TooManyWaiters",
    "UnsupportedServerVersion",
    "connect_error_from",
    "format_address",
    "is_secret_key",
    "redact",
    "summary",
]

# libpq keywords whose values are secrets, as a regex alternation.
_SECRET_KEY = r"\w*(?:password|secret|scram_client_key|scram_server_key)\w*"
# A quoted value may contain escaped quotes; an unquoted one ends at whitespace.
_VALUE = r"""'(?:[^'\\]|\\.)*'?|"(?:[^"\\]|\\.)*"?|\S+"""
_SECRET_ASSIGNMENT = re.compile(rf"({_SECRET_KEY}\s*=\s*)(?:{_VALUE})", re.IGNORECASE)
# The same secret as a key in a dict or JSON repr: 'password': '...'.
_SECRET_ITEM = re.compile(rf"""(['"]{_SECRET_KEY}['"]\s*:\s*)(?:{_VALUE})""", re.IGNORECASE)
# URL userinfo "user:secret@". Greedy up to the last "@" of the token, because
# people do put a raw "@" in passwords and libpq's own parser is no guide here.
_URL_USERINFO = re.compile(r"([a-z][a-z0-9+.-]*://[^:/?#@\s]*):\S*@", re.IGNORECASE)

_MASK = "***"


def is_secret_key(name: str) -> bool:
    """Tell whether a libpq keyword (``password``, ``sslpassword``...) holds a secret."""
    return re.fullmatch(_SECRET_KEY, name, re.IGNORECASE) is not None


def summary(error: BaseException) -> str:
    """An error in one line for a log or a report: its first line, redacted, or its class."""
    text = redact(str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__


def redact(text: str) -> str:
    """Return *text* with anything that looks like a password replaced by ``***``.

    Scrubs ``password=...`` (quoted or not, and the other secret libpq keywords
    such as ``sslpassword``), ``'password': ...`` items and the
    ``user:secret@`` part of URLs. Never raises.
    """
    text = _SECRET_ASSIGNMENT.sub(rf"\g<1>{_MASK}", text)
    text = _SECRET_ITEM.sub(rf"\g<1>'{_MASK}'", text)
    return _URL_USERINFO.sub(rf"\g<1>:{_MASK}@", text)


def format_address(host: str | None, port: str | int | None) -> str:
    """Describe where libpq will connect, for messages: ``"db1:5432"``.

    Unset parts are named as libpq defaults (PGHOST, PGPORT or the Unix
    socket) rather than guessed, because libpq resolves them, not pgsd.
    """
    if host is None and port is None:
        return "the libpq default host and port"
    hosts = (host or "(libpq default host)").split(",")
    ports = str(port).split(",") if port is not None else ["(libpq default port)"]
    if len(ports) == 1:
        ports = ports * len(hosts)
    if len(ports) != len(hosts):
        return f"hosts {host} ports {port}"
    return ", ".join(_host_port(h, p) for h, p in zip(hosts, ports, strict=True))


def _host_port(host: str, port: str) -> str:
    if host.startswith("/"):
        return f"the Unix socket {host}/.s.PGSQL.{port}"
    if ":" in host:  # a bare IPv6 address
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _rebuild(cls: type[BaseException], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Unpickle an exception whose constructor takes keyword-only arguments."""
    return cls(*args, **kwargs)


class PgsdError(Exception):
    """The base class of every exception pgsd raises."""

    __module__ = "pgsd"


class ConfigError(PgsdError):
    """A configuration value, file or DSN is invalid."""

    __module__ = "pgsd"

    def __init__(
        self,
        problem: str,
        *,
        path: str | os.PathLike[str] | None = None,
        key: str | None = None,
    ) -> None:
        self.problem = redact(problem)
        self.path = os.fspath(path) if path is not None else None
        self.key = key
        parts = [part for part in (self.path, self.key) if part is not None]
        Exception.__init__(self, ": ".join([*parts, self.problem]))

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (type(self), (self.problem,), {"path": self.path, "key": self.key})


class ConnectError(PgsdError):
    """A connection to a database could not be established."""

    __module__ = "pgsd"
    hint = "check host, port, sslmode and the server's log"

    def __init__(
        self,
        detail: str = "",
        *,
        database: str,
        host: str | None = None,
        port: str | int | None = None,
        sqlstate: str | None = None,
    ) -> None:
        self.detail = redact(detail)
        self.database = database
        self.host = host
        self.port = port
        self.sqlstate = sqlstate
        Exception.__init__(self, self._message())

    def _message(self) -> str:
        where = f"cannot connect to database {self.database!r} at {self.address}"
        detail = f": {self.detail}" if self.detail else ""
        state = f" (SQLSTATE {self.sqlstate})" if self.sqlstate else ""
        return f"{where}{detail}{state}; {self._hint()}"

    def _hint(self) -> str:
        return self.hint

    @property
    def address(self) -> str:
        """Where the connection was attempted, as ``host:port``."""
        return format_address(self.host, self.port)

    def __reduce__(self) -> tuple[Any, ...]:
        kwargs = {
            "database": self.database,
            "host": self.host,
            "port": self.port,
            "sqlstate": self.sqlstate,
        }
        return _rebuild, (type(self), (self.detail,), kwargs)


class AuthenticationError(ConnectError):
    """The server rejected the user name, the password or the client's address."""

    __module__ = "pgsd"
    hint = (
        "check the user name and password (password_env, passfile or PGPASSWORD)"
        " and the server's pg_hba.conf"
    )


class PasswordProviderError(ConnectError):
    """The password provider (or ``password_command``) gave no password.

    The message names the provider (a command by its program alone) and
    never holds what it returned.
    """

    __module__ = "pgsd"
    hint = "check the password provider or command: it runs for every new connection"


class DatabaseNotFound(ConnectError):
    """The server is reachable but the database does not exist on it."""

    __module__ = "pgsd"
    hint = "check dbname: no database of that name exists on this server"


class ConnectTimeout(ConnectError):
    """The connection was not established within ``connect_timeout``."""

    __module__ = "pgsd"
    hint = "raise connect_timeout or check the network"


class ServerUnavailable(ConnectError):
    """The server could not be reached, or is starting up or shutting down."""

    __module__ = "pgsd"

    def _hint(self) -> str:
        if self.host is not None and self.host.startswith("/"):
            kind = "connections on"
        else:
            kind = "TCP connections on"
        return f"check that the server is running and accepts {kind} {self.address}"


class TLSError(ConnectError):
    """TLS could not be set up as configured: a certificate, key or ``sslmode`` problem."""

    __module__ = "pgsd"
    hint = (
        "check sslmode, sslrootcert (the CA certificate that signed the server's"
        " certificate), that the host name is one the server's certificate names,"
        " and sslcert/sslkey"
    )

    def _hint(self) -> str:
        # What went wrong, said plainly, and what to change; libpq's own
        # words are in the detail before it.
        for pattern, advice in _TLS_FAILURES:
            if pattern.search(self.detail):
                return advice
        return self.hint


class TooManyConnections(ConnectError):
    """The server refused the connection because all its slots are taken."""

    __module__ = "pgsd"
    hint = "raise the server's max_connections or lower pool max_size"


class PoolTimeout(PgsdError):
    """No connection became available within ``acquire_timeout``."""

    __module__ = "pgsd"


class ListenError(PgsdError):
    """A listener cannot deliver notifications.

    Notifications do not reach its connection (a pooler in transaction
    mode in between), or its database stayed down past the listener's
    ``reconnect_timeout``.
    """

    __module__ = "pgsd"


class NoReplicaAvailable(PgsdError):
    """A read asked for a replica (``read_only=True``) and none qualifies.

    Raised only with ``replica_fallback = "error"``; the message says why
    each replica was passed over (down, behind by more than
    ``max_replica_lag``, promoted, not checked yet).
    """

    __module__ = "pgsd"


class PoolClosed(PgsdError):
    """The pool is closed, or was closed while waiting for a connection."""

    __module__ = "pgsd"


class OutcomeUnknown(PgsdError, psycopg.OperationalError):
    """The connection was lost with a one-shot statement in flight.

    The statement may or may not have run (and committed): it is not
    retried. Also a `psycopg.OperationalError`, as a lost connection is.
    """

    __module__ = "pgsd"


class TooManyWaiters(PgsdError):
    """The pool's queue of waiters already holds ``max_waiting`` tasks."""

    __module__ = "pgsd"


class UnsupportedServerVersion(PgsdError):
    """The server is older than the minimum version pgsd accepts."""

    __module__ = "pgsd"

    def __init__(
        self, version_num: int, *, minimum: int = 130000, database: str | None = None
    ) -> None:
        self.version_num = version_num
        self.minimum = minimum
        self.database = database
        Exception.__init__(self, self._message())

    def _message(self) -> str:
        where = f"database {self.database!r}: " if self.database is not None else ""
        advice = "upgrade the server"
        if self.minimum > 130000:
            advice += " or lower min_server_version"
        return (
            f"{where}server version {_version_text(self.version_num)} ({self.version_num})"
            f" is older than the minimum {_version_text(self.minimum)} ({self.minimum});"
            f" {advice}"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        kwargs = {"minimum": self.minimum, "database": self.database}
        return _rebuild, (type(self), (self.version_num,), kwargs)


def _version_text(num: int) -> str:
    # server_version_num is MMmmpp before PostgreSQL 10 and MM00mm since.
    if num >= 100000:
        return f"{num // 10000}.{num % 10000}"
    return f"{num // 10000}.{num // 100 % 100}.{num % 100}"


class InsufficientPrivileges(PgsdError):
    """The role lacks privileges the configuration requires."""

    __module__ = "pgsd"

    def __init__(self, missing: Iterable[str], *, user: str | None = None) -> None:
        self.missing = tuple(missing)
        self.user = user
        role = f"role {user!r}" if user is not None else "the current role"
        Exception.__init__(self, f"{role} lacks required privileges: {', '.join(self.missing)}")

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (type(self), (self.missing,), {"user": self.user})


# Classification of connect failures. libpq reports most startup failures
# without a SQLSTATE, so the message text is matched as well.
_BY_SQLSTATE: dict[str, type[ConnectError]] = {
    "28P01": AuthenticationError,  # invalid_password
    "28000": AuthenticationError,  # invalid_authorization_specification
    "3D000": DatabaseNotFound,  # invalid_catalog_name
    "53300": TooManyConnections,  # too_many_connections
    "57P03": ServerUnavailable,  # cannot_connect_now
}

# What the pool does after an error: evict the connection, call the
# database down, or fail waiters at once. The rules live here, beside the
# classes they test, so that a new SQLSTATE rule has one place to go.

#: SQLSTATEs after which a connection is not worth keeping: connection
#: exceptions (class 08) and the server going away (admin shutdown, crash
#: shutdown, cannot connect now).
_EVICT_SQLSTATE_PREFIXES: tuple[str, ...] = ("08", "57P01", "57P02", "57P03")
#: cannot execute ... in a read-only transaction: a demoted primary.
_READ_ONLY_SQLSTATE = "25006"


def evicts(exc: BaseException | None, *, wants_primary: bool, extra: Sequence[str] = ()) -> bool:
    """Whether an error a borrower met means its connection is not worth keeping.

    A lost connection or a server shutting down; when the database asks for
    a read-write server, a write refused as read-only (SQLSTATE 25006) by a
    server that was the primary when connected and has been demoted; and
    the codes or classes in *extra* (``PoolConfig.evict_sqlstates``).
    """
    sqlstate = getattr(exc, "sqlstate", None)
    if not isinstance(sqlstate, str):
        return False
    if sqlstate.startswith(_EVICT_SQLSTATE_PREFIXES) or (
        extra and sqlstate.startswith(tuple(extra))
    ):
        return True
    return wants_primary and sqlstate == _READ_ONLY_SQLSTATE


def unreachable(error: BaseException) -> bool:
    """Whether a failed connection attempt means the server cannot be reached.

    One refused attempt beside live connections (the server's connection
    limit, a password being rotated) does not make a database down; a
    server that does not answer does.
    """
    return isinstance(error, (ServerUnavailable, ConnectTimeout))


def fails_fast(error: BaseException, *, ever_connected: bool) -> bool:
    """Whether waiting is unlikely to cure a failed connection attempt.

    A server older than the minimum always; a wrong password, a missing
    database or a TLS misconfiguration only before the first success: a
    mistake in the configuration should be seen at once, while after a
    success they are likely passing (rotation, restore, renewal).
    """
    if isinstance(error, UnsupportedServerVersion):
        return True
    return not ever_connected and isinstance(
        error, (AuthenticationError, DatabaseNotFound, TLSError)
    )


# TLS failures as libpq words them, each with what it means and what to do.
# They are configuration mistakes, not outages. A connection lost during the
# handshake ("SSL error: unexpected eof while reading") is not among them.
_TLS_FAILURES: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(
            r"server (?:certificate for|common name) \".*\"(?: \(and \d+ other names?\))?"
            r" does not match host name"
            r"|could not get server's host name from server certificate"
        ),
        "the server's certificate does not name the host connected to: connect with a"
        " host name the certificate lists, or have the certificate reissued for this name",
    ),
    (
        re.compile(r"certificate verify failed"),
        "the server's certificate could not be verified: set sslrootcert to the CA"
        " certificate that signed it, and check that it has not expired",
    ),
    (
        re.compile(
            r"root certificate file \".*\" does not exist|could not read root certificate file"
        ),
        "sslmode verify-ca and verify-full need sslrootcert: the CA certificate that"
        " signed the server's certificate",
    ),
    (
        re.compile(
            r"server does not support SSL, but SSL was required"
            r"|SSL support is not compiled in"
        ),
        "sslmode requires TLS but the server does not offer it: turn ssl on in the"
        " server's configuration, or connect with sslmode prefer or disable",
    ),
    (
        # A hostnossl ... reject line: this role may only connect over TLS.
        re.compile(r"pg_hba\.conf rejects connection .*, no encryption"),
        "the server accepts this connection only over TLS: connect with sslmode"
        " require, verify-ca or verify-full",
    ),
    (
        re.compile(
            r"connection requires a valid client certificate"
            r"|certificate authentication failed for user"
            r"|certificate validation \(clientcert=verify-full\) failed"
            r"|SSL error: \S+ alert (?:unknown ca|bad certificate|unsupported certificate"
            r"|certificate (?:required|expired|revoked|unknown))"
        ),
        "the server refused the client certificate: set sslcert and sslkey to a"
        " certificate signed by a CA in the server's ssl_ca_file, whose common name is"
        " the user name",
    ),
    (
        re.compile(
            r"certificate present, but not private key file"
            r"|private key file \".*\" (?:has group or world access|is not a regular file)"
            r"|could not (?:open|read|load|access) (?:certificate|private key) file"
        ),
        "the client certificate or its key cannot be used: check the files sslcert and"
        " sslkey name, that they belong together, and that the key is mode 0600",
    ),
)
_TLS_FAILURE = re.compile("|".join(f"(?:{pattern.pattern})" for pattern, _ in _TLS_FAILURES))

# Checked in order: a refused login can mention "could not connect" too, and
# a refused client certificate "authentication failed".
_BY_MESSAGE: tuple[tuple[re.Pattern[str], type[ConnectError]], ...] = (
    (_TLS_FAILURE, TLSError),
    (
        re.compile(
            r"password authentication failed|no password supplied|SCRAM"
            r"|authentication failed|no pg_hba\.conf entry|pg_hba\.conf rejects connection"
            r"|role \".*\" does not exist",
        ),
        AuthenticationError,
    ),
    (re.compile(r"database \".*\" does not exist"), DatabaseNotFound),
    (
        re.compile(
            r"too many (?:connections|clients)|remaining connection slots are reserved",
            re.IGNORECASE,
        ),
        TooManyConnections,
    ),
    (re.compile(r"timeout expired|timed out", re.IGNORECASE), ConnectTimeout),
    (
        re.compile(
            r"Connection refused|could not connect|No such file or directory"
            r"|could not translate host name|failed to resolve host"
            r"|server closed the connection unexpectedly|Connection reset"
            r"|SSL SYSCALL error|unexpected eof while reading"
            r"|Network is unreachable|No route to host"
            r"|the database system is (?:starting up|shutting down|in recovery mode)",
            re.IGNORECASE,
        ),
        ServerUnavailable,
    ),
)

_MAX_DETAIL = 500
_PSYCOPG_PREFIX = re.compile(r"^connection (?:failed|is bad): ")


def connect_error_from(
    exc: BaseException, *, database: str, host: str | None, port: str | int | None
) -> ConnectError:
    """Translate an error raised while connecting into the matching `ConnectError`.

    *exc* is usually a `psycopg.OperationalError` (or one of its SQLSTATE
    subclasses), but timeouts and socket errors raised by the event loop are
    classified too. The result's message names the database, host and port,
    carries the first line of the original message with secrets scrubbed,
    and says what to check. The caller chains it: ``raise err from exc``.
    Never raises.
    """
    text = redact(_text_of(exc))
    sqlstate = getattr(exc, "sqlstate", None)
    if not isinstance(sqlstate, str):
        sqlstate = None
    cls = _classify(exc, text, sqlstate)
    return cls(
        _first_line(text) or type(exc).__name__,
        database=database,
        host=host,
        port=port,
        sqlstate=sqlstate,
    )


def _classify(exc: BaseException, text: str, sqlstate: str | None) -> type[ConnectError]:
    if sqlstate in _BY_SQLSTATE:
        return _BY_SQLSTATE[sqlstate]
    if isinstance(exc, psycopg.errors.ConnectionTimeout | TimeoutError):
        return ConnectTimeout
    # With several hosts psycopg puts the last failure on the first line and
    # every attempt after it: the first line decides, the rest is a fallback.
    for candidate in (_first_line(text), text):
        for pattern, cls in _BY_MESSAGE:
            if pattern.search(candidate):
                return cls
    if isinstance(exc, socket.gaierror | ConnectionError):
        return ServerUnavailable
    return ConnectError


def _text_of(exc: BaseException) -> str:
    # A broken __str__ must not turn a connect failure into a crash here.
    try:
        return str(exc)
    except Exception:
        return type(exc).__name__


def _first_line(text: str) -> str:
    line = text.strip().split("\n", 1)[0].strip()
    # psycopg's prefix repeats what the ConnectError message already says.
    line = _PSYCOPG_PREFIX.sub("", line)
    if len(line) > _MAX_DETAIL:
        line = line[: _MAX_DETAIL - 3] + "..."
    return line
