"""Resolving host names and making libpq's connection attempts, as psycopg does.

A conninfo names one host or several, and a host name may resolve to
several addresses: `connect_pgconn` tries each in libpq's order (honouring
``load_balance_hosts`` and ``target_session_attrs=prefer-standby``),
resolving names with anyio rather than asyncio, and bounds every attempt by
its ``connect_timeout`` (`attempt_timeout`, `DEFAULT_CONNECT_TIMEOUT`). An
attempt that fails or times out never leaks its PGconn; when all fail, one
error lists each attempt's failure, in psycopg's words.
"""

from __future__ import annotations

import logging
import random
import socket
import warnings
from typing import Any, Final

import anyio
from psycopg import errors as e
from psycopg import pq
from psycopg._capabilities import capabilities
from psycopg._conninfo_utils import (
    get_param,
    get_param_def,
    gssapi_requested,
    is_ip_address,
    split_attempts,
)
from psycopg.conninfo import make_conninfo

from ._driver import connect_gen, drive_conn
from ._errors import redact

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "as_seconds",
    "attempt_timeout",
    "connect_pgconn",
]

logger = logging.getLogger("pgsd.connection")

#: Seconds per connection attempt when ``connect_timeout`` sets none (psycopg: 130).
DEFAULT_CONNECT_TIMEOUT: Final = 30.0
# libpq rounds any connect_timeout below 2 s up to 2 s.
_LIBPQ_MIN_TIMEOUT: Final = 2


async def _resolve(attempt: dict[str, Any]) -> list[dict[str, Any]]:
    """Resolve ``host`` into ``hostaddr`` with anyio, one attempt per address (as psycopg)."""
    host = get_param(attempt, "host")
    if not host or host.startswith("/") or host[1:2] == ":" or get_param(attempt, "hostaddr"):
        return [attempt]
    if is_ip_address(host):
        return [{**attempt, "hostaddr": host}]
    port = get_param(attempt, "port")
    if not port:
        port_def = get_param_def("port")
        port = (port_def and port_def.compiled) or "5432"
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [{**attempt, "hostaddr": str(info[4][0])} for info in infos]


async def _attempts(params: dict[str, Any]) -> list[dict[str, Any]]:
    """One connection attempt per host and address, in libpq's order (as psycopg).

    Raises:
        psycopg.OperationalError: no host could be resolved.
    """
    prefer_standby = get_param(params, "target_session_attrs") == "prefer-standby"
    if prefer_standby:
        params = {k: v for k, v in params.items() if k != "target_session_attrs"}
    attempts: list[dict[str, Any]] = []
    last_error: e.OperationalError | None = None
    for attempt in split_attempts(params):
        try:
            attempts.extend(await _resolve(attempt))
        except OSError as ex:
            last_error = e.OperationalError(f"failed to resolve host {attempt.get('host')!r}: {ex}")
            logger.debug("%s", last_error)
    if not attempts:
        assert last_error is not None
        raise last_error
    if get_param(params, "load_balance_hosts") == "random":
        random.shuffle(attempts)
    if prefer_standby:
        # First any standby, then whatever answers.
        attempts = [{**a, "target_session_attrs": "standby"} for a in attempts] + attempts
    return attempts


def _describe(attempt: dict[str, Any]) -> str:
    host, port, hostaddr = attempt.get("host"), attempt.get("port"), attempt.get("hostaddr")
    return f"host: {host!r}, port: {port!r}, hostaddr: {hostaddr!r}"


def attempt_timeout(params: dict[str, Any]) -> float:
    """The seconds each attempt gets, from ``connect_timeout``, by psycopg's rules.

    libpq's: whole seconds, at least 2; 0, a negative value or none at all
    means libpq's unbounded wait, which psycopg (130 s) and pgsd
    (`DEFAULT_CONNECT_TIMEOUT`) replace by a default. The value may be a
    string, an int or a float, in the conninfo, a keyword or ``PGCONNECT_TIMEOUT``.

    Raises:
        psycopg.ProgrammingError: the value is not a number.
    """
    value = get_param(params, "connect_timeout")
    if value is None:
        return DEFAULT_CONNECT_TIMEOUT
    try:
        seconds = int(float(value))
    except (TypeError, ValueError):
        raise e.ProgrammingError(f"bad value for connect_timeout: {value!r}") from None
    if seconds <= 0:
        return DEFAULT_CONNECT_TIMEOUT
    return float(max(seconds, _LIBPQ_MIN_TIMEOUT))


async def _connect_one(conninfo: str, seconds: float) -> pq.abc.PGconn:
    """One attempt, bounded by ``seconds``; the PGconn is never leaked.

    Raises:
        psycopg.errors.ConnectionTimeout: no connection within ``seconds``.
        psycopg.OperationalError: the attempt failed.
    """
    pgconn = pq.PGconn.connect_start(conninfo.encode())
    try:
        await drive_conn(connect_gen(pgconn, conninfo), seconds)
    except e._WaitTimeout:
        pgconn.finish()
        raise e.ConnectionTimeout("connection timeout expired") from None
    except BaseException:
        pgconn.finish()
        raise
    return pgconn


async def connect_pgconn(params: dict[str, Any], seconds: float) -> pq.abc.PGconn:
    """Try every attempt in turn, each bounded by ``seconds``, as psycopg does.

    Raises:
        psycopg.OperationalError: no attempt succeeded (with several, the
            message lists each one's failure, in psycopg's words).
    """
    errors: list[tuple[e.Error, str]] = []
    for attempt in await _attempts(params):
        descr = _describe(attempt)
        logger.debug("connection attempt: %s", descr)
        try:
            pgconn = await _connect_one(make_conninfo("", **attempt), seconds)
        except e.Error as ex:
            logger.debug("connection failed: %s: %s", descr, redact(str(ex)))
            errors.append((ex, descr))
        else:
            logger.debug("connection succeeded: %s", descr)
            if (
                capabilities.has_used_gssapi()
                and pgconn.used_gssapi
                and not gssapi_requested(params)
            ):
                warnings.warn(_GSSAPI_DEFAULT_WARNING, RuntimeWarning, stacklevel=3)
            return pgconn
    raise _combine(errors)


# psycopg warns in the same case: the default that made GSSAPI happen is not
# the same in every build of libpq.
_GSSAPI_DEFAULT_WARNING: Final = (
    "this connection uses GSSAPI only because of libpq's default"
    " gssencmode=prefer, and some psycopg[binary] builds default to 'disable':"
    " set gssencmode (or PGGSSENCMODE) to 'prefer' or 'require' to rely on it"
)


def _combine(errors: list[tuple[e.Error, str]]) -> e.Error:
    """One error for all failed attempts, of the last one's type."""
    last = errors[-1][0]
    if len(errors) == 1:
        return last.with_traceback(None)
    lines = [str(last), "Multiple connection attempts failed. All failures were:"]
    lines.extend(f"- {descr}: {error}" for error, descr in errors)
    combined = type(last)("\n".join(lines), pgconn=last.pgconn)
    return combined


def as_seconds(value: object) -> object:
    """A number given as text becomes a float; anything else is left to the config check."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value
