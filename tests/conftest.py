"""Fixtures: a throwaway PostgreSQL server per test session, both event loops, leak checks."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest

import pgsd
from pgsd.testing import PostgresServer
from support import CLOSE_WAIT, BackendKey, ServerBackends, collect_garbage

#: A role that logs in with a password (SCRAM) on the TLS servers.
PASSWORD_USER = "pgsd_password_user"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run every async test under asyncio and under trio."""
    return str(request.param)


@pytest.fixture
def own_server() -> Iterator[PostgresServer]:
    """A server of the test's own, free to stop, kill and restart."""
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """The session's server: the newest installed, or PGSD_TEST_PG's major."""
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def tls_server() -> Iterator[PostgresServer]:
    """A server with TLS on whose roles log in with SCRAM, with or without TLS.

    libpq's default ``sslmode=prefer`` connects over TLS here; a wrong
    password fails over TLS and again without it, on a second socket, within
    one attempt.
    """
    with PostgresServer(tls=True) as server:
        server.create_role(PASSWORD_USER)
        yield server


@pytest.fixture(scope="session")
def tls_nossl_server() -> Iterator[PostgresServer]:
    """A server with TLS on whose ``pg_hba.conf`` admits connections without TLS only.

    libpq's default ``sslmode=prefer`` is refused over TLS and must retry
    without it on a new socket, within the same attempt.
    """
    with PostgresServer(tls=True, hba="hostnossl") as server:
        server.create_role(PASSWORD_USER)
        yield server


@pytest.fixture(scope="session")
def tls_only_server() -> Iterator[PostgresServer]:
    """A server whose ``pg_hba.conf`` admits connections over TLS only."""
    with PostgresServer(tls=True, hba="hostssl") as server:
        server.create_role(PASSWORD_USER)
        yield server


@pytest.fixture(scope="session")
def server_backends(pg_server: PostgresServer) -> Iterator[ServerBackends]:
    """The session server's client backends, for the leak check."""
    backends = ServerBackends(pg_server)
    try:
        yield backends
    finally:
        backends.close()


@pytest.fixture(autouse=True)
def no_leaked_connections(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves a connection open, on the server or in memory.

    For a test on the server or an event loop: a connection object dropped
    while still open warns from ``__del__`` when it is collected; a full
    collection after the test makes that this test's failure, not a later
    one's. For a test on the session server: every client backend that was
    not there before the test must be gone once its fixtures are torn down
    (backends exit just after their clients close, so this waits a few
    seconds for them).
    """
    uses_server = "pg_server" in request.fixturenames
    if not uses_server and "anyio_backend" not in request.fixturenames:
        yield
        return
    backends: ServerBackends | None = None
    before: frozenset[BackendKey] = frozenset()
    if uses_server:
        backends = request.getfixturevalue("server_backends")
        before = backends.snapshot()
    # A full collection of everything the session holds takes about 30 ms;
    # with what existed before the test frozen, it looks only at what the
    # test made, in about a millisecond.
    gc.freeze()
    try:
        yield
        dropped = collect_garbage()
    finally:
        gc.unfreeze()
    left = backends.left_over(before) if backends is not None else []
    problems: list[str] = []
    if dropped:
        listing = "\n".join(f"  {problem}" for problem in dropped)
        problems.append(f"objects dropped by the test warned when collected:\n{listing}")
    if left:
        assert backends is not None
        listing = "\n".join(f"  {backend}" for backend in left)
        problems.append(
            f"{len(left)} server connection(s) opened by the test still open"
            f" {backends.wait:g} s after it ended:\n{listing}"
        )
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
async def conn(pg_server: PostgresServer, anyio_backend: str) -> AsyncIterator[pgsd.Connection]:
    """A superuser connection to the ``postgres`` database."""
    connection = await pgsd.connect(pg_server.dsn())
    try:
        yield connection
    finally:
        with anyio.move_on_after(CLOSE_WAIT, shield=True):
            await connection.close()
