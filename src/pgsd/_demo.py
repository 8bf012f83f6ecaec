"""A short tour: start a throwaway server, connect, and report what pgsd finds."""

from __future__ import annotations

import anyio

from ._connection import connect
from ._permissions import check_permissions
from ._version import get_version
from .testing import PostgresServer, ServerNotFound


async def _tour(server: PostgresServer, backend: str) -> None:
    print(f"pgsd on {backend}: throwaway PostgreSQL {server.major} at {server.host}:{server.port}")
    async with await connect(server.dsn()) as conn:
        version = await get_version(conn)
        print(f"  server version   {version.major}.{version.minor} ({version.num})")
        cur = await conn.execute("SELECT count(*) FROM generate_series(1, 100000)")
        print(f"  a query          counted {(await cur.fetchone() or (0,))[0]} rows")
        report = await check_permissions(conn, ["database:CONNECT", "role:pg_monitor"])
        print(f"  connected as     {report.user} (superuser: {report.is_superuser})")
        print(f"  required privileges granted: {report.ok}")
        with anyio.move_on_after(0.2):
            await conn.execute("SELECT pg_sleep(60)")
        state = "idle" if not conn.closed else "closed"
        print(f"  a 60 s query cancelled after 0.2 s; the connection is {state}")


def run_demo(backend: str) -> int:
    """Run the tour under ``backend``; return the process exit code."""
    try:
        server = PostgresServer()
    except ServerNotFound as ex:
        print(f"pgsd demo: {ex}")
        return 1
    with server:
        anyio.run(_tour, server, backend, backend=backend)
    return 0
