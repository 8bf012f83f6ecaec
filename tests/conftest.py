"""Fixtures: a throwaway PostgreSQL server per test session, both event loops."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

import pgsd
from pgsd.testing import PostgresServer


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run every async test under asyncio and under trio."""
    return str(request.param)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """The session's server: the newest installed, or PGSD_TEST_PG's major."""
    with PostgresServer() as server:
        yield server


@pytest.fixture
async def conn(pg_server: PostgresServer, anyio_backend: str) -> AsyncIterator[pgsd.Connection]:
    """A superuser connection to the ``postgres`` database."""
    connection = await pgsd.connect(pg_server.dsn())
    try:
        yield connection
    finally:
        await connection.close()
