"""A Starlette app with a pgsd connector in its lifespan, on asyncio or trio.

    export SOURCE_DSN=postgresql://app@db1.internal/app TARGET_DSN=postgresql://app@db2.internal/app
    hypercorn examples/starlette_app.py:app                       # on asyncio
    hypercorn --worker-class trio examples/starlette_app.py:app   # the same app on trio
    uvicorn --app-dir examples starlette_app:app                  # any ASGI server on asyncio

Routes:

    GET /counts/{table}   the table's row counts in source and target, counted at once
    GET /health           each pool's state (up, down...), no connection borrowed
    GET /stats            each pool's state, size and waiters

The connector's pools live as long as the app: opened before the first
request, closed after the last one (the lifespan runs in one task, which
owns the connector's task group). The handlers use anyio, so the app runs
unchanged on either event loop.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import AsyncIterator

import anyio
import psycopg
from psycopg import sql
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import pgsd

DATABASES = ("source", "target")
#: A table's name, or a schema's and a table's: plain identifiers only.
TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?")


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, pgsd.DatabaseConnector]]:
    config = pgsd.ConnectorConfig(
        databases={
            name: pgsd.DatabaseConfig.from_dsn(os.environ[f"{name.upper()}_DSN"])
            for name in DATABASES
        },
        pool=pgsd.PoolConfig(max_size=5, acquire_timeout=2),
    )
    async with pgsd.DatabaseConnector(config) as connector:
        yield {"connector": connector}  # request.state.connector in every handler


async def counts(request: Request) -> JSONResponse:
    connector: pgsd.DatabaseConnector = request.state.connector
    table = request.path_params["table"]
    if not TABLE.fullmatch(table):
        return JSONResponse({"error": "give a table as name or schema.name"}, 400)
    query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(*table.split(".")))
    found: dict[str, int] = {}
    missing: list[str] = []
    failed: dict[str, str] = {}

    async def count(name: str) -> None:
        try:
            found[name] = await connector.fetchval(name, query)
        except psycopg.errors.UndefinedTable:
            missing.append(name)
        except (pgsd.PgsdError, psycopg.Error) as error:  # down, busy, refused: say which
            failed[name] = type(error).__name__

    try:
        with anyio.fail_after(5):  # one deadline for both; the query the server runs is cancelled
            async with anyio.create_task_group() as tg:
                for name in DATABASES:
                    tg.start_soon(count, name)
    except TimeoutError:
        return JSONResponse({"error": "the databases did not answer within 5 s"}, 504)
    if failed:
        return JSONResponse({"error": failed}, 503)
    if missing:
        return JSONResponse({"error": f"no table {table} in {', '.join(sorted(missing))}"}, 404)
    return JSONResponse({**found, "agree": found["source"] == found["target"]})


async def health(request: Request) -> JSONResponse:  # noqa: ASYNC124 - sync would run in a thread
    # Each pool's state, read without borrowing a connection: a busy pool is healthy.
    connector: pgsd.DatabaseConnector = request.state.connector
    states = {name: stats.state for name, stats in connector.stats().items()}
    healthy = all(state == "up" for state in states.values())
    return JSONResponse(states, 200 if healthy else 503)


async def stats(request: Request) -> JSONResponse:  # noqa: ASYNC124 - sync would run in a thread
    connector: pgsd.DatabaseConnector = request.state.connector
    return JSONResponse(
        {
            name: {"state": s.state, "size": s.size, "in_use": s.in_use, "waiting": s.waiting}
            for name, s in connector.stats().items()
        }
    )


app = Starlette(
    routes=[
        Route("/counts/{table}", counts),
        Route("/health", health),
        Route("/stats", stats),
    ],
    lifespan=lifespan,
)
