"""Throwaway PostgreSQL servers on loopback, for tests, demos and benchmarks.

A :class:`PostgresServer` runs ``initdb`` into a fresh temporary directory,
starts ``postgres`` on a free port of 127.0.0.1 and removes everything when
stopped. PostgreSQL refuses to run as root, so when the calling process is
root the server runs as an unprivileged OS user (``postgres`` when it
exists, else ``nobody``).

The superuser connects without a password over loopback; every other role
authenticates with SCRAM, so wrong passwords fail the way they do in
production.
"""

from ._binaries import PostgresBinaries as PostgresBinaries
from ._binaries import ServerNotFound as ServerNotFound
from ._binaries import find_binaries as find_binaries
from ._pgbouncer import PgBouncer as PgBouncer
from ._server import PostgresServer as PostgresServer
from ._server import free_port as free_port

__all__ = [
    "PgBouncer",
    "PostgresBinaries",
    "PostgresServer",
    "ServerNotFound",
    "find_binaries",
    "free_port",
]
