"""What a check of one database found, and the check itself.

`verify_pool` borrows a connection from a pool and fills a
`ConnectionReport`; it turns every way a database can be down, refuse the
role or misbehave into the report's ``error``, and raises only for
cancellation.

The TLS protocol and cipher come from libpq's ``PQsslAttribute``, which
psycopg does not wrap: it is called through ctypes in the very libpq psycopg
loaded, found by psycopg's implementation and checked by its version. When
that library cannot be found they are reported as unknown.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import importlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import anyio
import psycopg
from psycopg import pq

from ._connection import Connection
from ._errors import PgsdError, UnsupportedServerVersion, redact
from ._permissions import PermissionReport, check_permissions
from ._pool import ConnectionPool
from ._pool.replicas import Replica
from ._version import ServerVersion, get_version

__all__ = ["ConnectionReport", "failure_report", "verify_pool"]

#: What `verify_pool` turns into a report instead of raising: the ways
#: a database can be down, refuse us, or misbehave. Not BaseException:
#: cancellation and KeyboardInterrupt must go through.
_VERIFY_ERRORS: Final = (PgsdError, psycopg.Error, OSError, TimeoutError)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionReport:
    """Whether a database can be reached, which version it runs, and what the role may do.

    Made by `DatabaseConnector.verify_connection`, which never raises for a
    database that is down or misconfigured: the failure is described here.
    Fields that could not be found out are None. No field ever holds a
    password or other secret.

    Attributes:
        name: the database's name in the connector.
        ok: True when the database was reached, its version is supported
            and no required privilege is missing.
        error: what went wrong, as a message without secrets; None when
            ``ok``. Names the missing privileges or the unsupported
            version when those are the problem.
        latency_ms: the round trip of one ping on a pooled connection, in
            milliseconds; None if no connection was obtained.
        version: the server's version; known from the refusal even when the
            pool refused the server as too old.
        supported: whether the version is at least the pool's
            ``min_server_version``; None if the version is unknown.
        permissions: what the connected role may do, checked against the
            database's ``required`` list; None if not checked.
        tls: whether the connection is encrypted with TLS; None if no
            connection was obtained.
        tls_version: the TLS protocol version, as libpq names it
            (``"TLSv1.3"``); None without TLS or if unknown.
        tls_cipher: the TLS cipher suite (``"TLS_AES_256_GCM_SHA384"``);
            None without TLS or if unknown.
        host: the host (or socket directory) the connection went to, as
            libpq reports it; None if no connection was obtained.
        port: the port the connection went to; None if no connection was
            obtained.
        role: ``"primary"``, or ``"replica"`` for the report of a read
            replica (in its primary's ``replicas``).
        lag_seconds: a replica's lag behind its primary at its last check;
            None for a primary, or when unknown.
        replica_state: a replica's standing (``fresh``, ``lagging``,
            ``promoted``, ``down``, ``unknown``; see `PoolStats`); None for a
            primary.
        replicas: a primary's read replicas, a report each. A replica is ok
            when its own checks pass and it is fresh; the primary's ``ok``
            requires every replica's, and its ``error`` names those that
            are not.
    """

    name: str
    ok: bool
    error: str | None = None
    latency_ms: float | None = None
    version: ServerVersion | None = None
    supported: bool | None = None
    permissions: PermissionReport | None = None
    tls: bool | None = None
    tls_version: str | None = None
    tls_cipher: str | None = None
    host: str | None = None
    port: int | None = None
    role: str = "primary"
    lag_seconds: float | None = None
    replica_state: str | None = None
    replicas: tuple[ConnectionReport, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Return the report as plain JSON types (str, int, float, bool, None, list, dict).

        Sets become sorted lists; a version becomes
        ``{"major", "minor", "num", "text"}``; permissions become
        ``{"user", "is_superuser", "missing", "ok", "roles",
        "database_privileges"}``; ``replicas`` a list of such dicts.
        """
        return {
            "name": self.name,
            "ok": self.ok,
            "error": self.error,
            "latency_ms": self.latency_ms,
            "version": _version_dict(self.version),
            "supported": self.supported,
            "permissions": _permissions_dict(self.permissions),
            "tls": self.tls,
            "tls_version": self.tls_version,
            "tls_cipher": self.tls_cipher,
            "host": self.host,
            "port": self.port,
            "role": self.role,
            "lag_seconds": self.lag_seconds,
            "replica_state": self.replica_state,
            "replicas": [replica.to_dict() for replica in self.replicas],
        }


def _version_dict(version: ServerVersion | None) -> dict[str, Any] | None:
    if version is None:
        return None
    return {
        "major": version.major,
        "minor": version.minor,
        "num": version.num,
        "text": version.text,
    }


def _permissions_dict(report: PermissionReport | None) -> dict[str, Any] | None:
    if report is None:
        return None
    return {
        "user": report.user,
        "is_superuser": report.is_superuser,
        "missing": list(report.missing),
        "ok": report.ok,
        "roles": sorted(report.roles),
        "database_privileges": sorted(report.database_privileges),
    }


async def verify_pool(pool: ConnectionPool, timeout: float) -> ConnectionReport:  # noqa: ASYNC109
    """Borrow a connection from ``pool`` and check it; describe any failure in the report.

    Waits at most ``timeout`` seconds for a connection, and again at most
    ``timeout`` seconds for the checks on it (ping, version, permissions
    against ``pool.config.required``).
    """
    report = await _Verification(pool, timeout).run()
    replica_set = pool._replicas
    if replica_set is None:
        return report
    await replica_set.first_round()
    found: dict[int, ConnectionReport] = {}

    async def check(index: int, replica: Replica) -> None:
        found[index] = await _verify_replica(replica, timeout)

    async with anyio.create_task_group() as tg:
        for index, replica in enumerate(replica_set.replicas):
            tg.start_soon(check, index, replica)
    replicas = tuple(found[index] for index in range(len(found)))
    failed = [f"replica {r.name!r}: {r.error}" for r in replicas if not r.ok]
    return dataclasses.replace(
        report,
        ok=report.ok and not failed,
        error="; ".join(filter(None, [report.error, *failed])) or None,
        replicas=replicas,
    )


async def _verify_replica(replica: Replica, timeout: float) -> ConnectionReport:  # noqa: ASYNC109
    """A replica's own checks, with its standing: ok only when fresh too."""
    report = await _Verification(replica.pool, timeout).run()
    now, max_lag = anyio.current_time(), replica.config.max_replica_lag
    fresh = replica.usable(now, max_lag)
    return dataclasses.replace(
        report,
        ok=report.ok and fresh,
        error=report.error or (None if fresh else replica.why_not(now, max_lag)),
        role="replica",
        lag_seconds=replica.lag,
        replica_state=replica.state,
    )


def failure_report(name: str, exc: BaseException) -> ConnectionReport:
    """A report for a database that could not even be given a pool."""
    return ConnectionReport(name=name, ok=False, error=redact(_message(exc)))


class _Verification:
    """One check of one pool: what it found so far, kept when a step fails."""

    def __init__(self, pool: ConnectionPool, timeout: float) -> None:
        self.pool = pool
        self.timeout = timeout
        self.step = "waiting for a connection"
        self.error: str | None = None
        self.latency_ms: float | None = None
        self.version: ServerVersion | None = None
        self.supported: bool | None = None
        self.permissions: PermissionReport | None = None
        self.tls: bool | None = None
        self.tls_version: str | None = None
        self.tls_cipher: str | None = None
        self.host: str | None = None
        self.port: int | None = None

    async def run(self) -> ConnectionReport:
        try:
            async with self.pool.connection(self.timeout) as conn:
                # The checks get their own deadline: a server that accepted
                # the connection may still stop answering.
                with anyio.fail_after(self.timeout):
                    await self._examine(conn)
        except _VERIFY_ERRORS as exc:
            self._failed(exc)
        return self._report()

    async def _examine(self, conn: Connection[Any]) -> None:
        self.host = conn.info.host
        self.port = conn.info.port
        self.tls = bool(conn.pgconn.ssl_in_use)
        if self.tls:
            self.tls_version = _ssl_attribute(conn, "protocol")
            self.tls_cipher = _ssl_attribute(conn, "cipher")
        self.step = "pinging"
        self.latency_ms = await conn.ping(self.timeout) * 1000.0
        self.step = "reading the server version"
        self.version = await get_version(conn)
        self.supported = self.version.is_supported(self.pool.pool_config.min_server_version)
        self.step = "checking permissions"
        self.permissions = await check_permissions(conn, self.pool.config.required)

    def _failed(self, exc: BaseException) -> None:
        unsupported = _unsupported(exc)
        if unsupported is not None:
            # The pool refused the server; the refusal says which version it is.
            self.version = self.version or ServerVersion.from_num(unsupported.version_num)
            self.supported = False
        if isinstance(exc, TimeoutError) and not isinstance(exc, PgsdError):
            text = f"no answer from the server within {self.timeout:g} s while {self.step}"
        elif self.step == "waiting for a connection":
            text = _message(exc)
        else:
            text = f"{self.step} failed: {_message(exc)}"
        self.error = redact(text)

    def _finding(self) -> str | None:
        """Why a database that answered every check is still not ok."""
        if self.version is not None and self.supported is False:
            minimum = self.pool.pool_config.min_server_version
            return str(
                UnsupportedServerVersion(self.version.num, minimum=minimum, database=self.pool.name)
            )
        if self.permissions is not None and self.permissions.missing:
            missing = ", ".join(self.permissions.missing)
            return f"missing privileges for role {self.permissions.user!r}: {missing}"
        return None

    def _report(self) -> ConnectionReport:
        error = self.error or self._finding()
        return ConnectionReport(
            name=self.pool.name,
            ok=error is None and self.supported is True and self.permissions is not None,
            error=error,
            latency_ms=self.latency_ms,
            version=self.version,
            supported=self.supported,
            permissions=self.permissions,
            tls=self.tls,
            tls_version=self.tls_version,
            tls_cipher=self.tls_cipher,
            host=self.host,
            port=self.port,
        )


def _ssl_attribute(conn: Connection[Any], name: str) -> str | None:
    """libpq's ``PQsslAttribute`` of a connection: ``protocol``, ``cipher``...; None if unknown."""
    function = _libpq_ssl_attribute()
    pointer = getattr(conn.pgconn, "pgconn_ptr", None)
    if function is None or pointer is None:
        return None
    value = function(pointer, name.encode())
    return value.decode() if isinstance(value, bytes) else None


@functools.cache
def _libpq_ssl_attribute() -> Callable[[int, bytes], bytes | None] | None:
    """``PQsslAttribute`` from the libpq psycopg uses, or None when it cannot be found.

    Only a library of the very version psycopg reports is used: a function
    of another libpq build given this PGconn would read garbage.
    """
    for candidate in _libpq_candidates():
        try:
            library = ctypes.CDLL(candidate)
            if library.PQlibVersion() != pq.version():
                continue
            function = library.PQsslAttribute
        except (OSError, AttributeError):
            continue
        function.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        function.restype = ctypes.c_char_p
        return function
    return None


def _libpq_candidates() -> Iterator[str]:
    """Where the libpq psycopg loaded is; opening it again gives the loaded library."""
    if pq.__impl__ == "binary":
        # The wheel bundles its own libpq next to the extension.
        package = Path(importlib.import_module("psycopg_binary").__file__ or "").parent
        for folder in (package.parent / "psycopg_binary.libs", package / ".dylibs"):
            yield from sorted(str(path) for path in folder.glob("libpq*"))
    elif pq.__impl__ == "python":
        yield importlib.import_module("psycopg.pq._pq_ctypes").pq._name
    else:  # the C extension, linked against the system's libpq
        yield "libpq.5.dylib" if sys.platform == "darwin" else "libpq.so.5"


def _unsupported(exc: BaseException) -> UnsupportedServerVersion | None:
    """The version refusal behind an error, if that is what it is."""
    for candidate in (exc, exc.__cause__):
        if isinstance(candidate, UnsupportedServerVersion):
            return candidate
    return None


def _message(exc: BaseException) -> str:
    text = str(exc).strip()
    return text or type(exc).__name__
