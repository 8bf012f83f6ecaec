"""A Starlette app with a pgsd connector in its lifespan, on asyncio or trio.

    export SOURCE_DSN=postgresql://app@db1.internal/app TARGET_DSN=postgresql://app@db2.internal/app
    hypercorn examples/starlette_app.py:app                       # on asyncio
    hypercorn --worker-class trio examples/starlette_app.py:app   # the same app on trio
    uvicorn --app-dir examples starlette_app:app                  # any ASGI server on asyncio

Routes:

    GET /counts/{table}   the table's row counts in source and target, counted at once
    GET /health           a ping of each database, each within one second
    GET /stats            each pool's state, size and waiters

The connector's pools live as long as the app: opened before the first
request, closed after the last one (the lifespan runs in one task, which
owns the connector's task group). The handlers use anyio, so the app runs
unchanged on either event loop.
"""

from __future__ import annotations

import contextlib
import os
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


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, pgsd.DatabaseConnector]]:
    config = pgsd.ConnectorConfig(
        databases={
            name: pgsd.DatabaseConfig.from_dsn(os.environ[f"{name.upper()}_DSN"])
            for name in DATABASES
        },
        pool=pgsd.PoolConfig(max_size=5, acquire_timeout=5),
    )
    async with pgsd.DatabaseConnector(config) as connector:
        yield {"connector": connector}  # request.state.connector in every handler


async def counts(request: Request) -> JSONResponse:
    connector: pgsd.DatabaseConnector = request.state.connector
    table = request.path_params["table"]
    query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(*table.split(".")))
    found: dict[str, int] = {}
    missing: list[str] = []

    async def count(name: str) -> None:
        try:
            found[name] = await connector.fetchval(name, query)
        except psycopg.errors.UndefinedTable:
            missing.append(name)

    try:
        with anyio.fail_after(5):  # one deadline for both; a query past it stops on the server
            async with anyio.create_task_group() as tg:
                for name in DATABASES:
                    tg.start_soon(count, name)
    except TimeoutError:
        return JSONResponse({"error": "the databases did not answer within 5 s"}, 504)
    if missing:
        return JSONResponse({"error": f"no table {table} in {', '.join(sorted(missing))}"}, 404)
    return JSONResponse({**found, "agree": found["source"] == found["target"]})


async def health(request: Request) -> JSONResponse:
    connector: pgsd.DatabaseConnector = request.state.connector
    result: dict[str, dict[str, object]] = {}

    async def check(name: str) -> None:
        result[name] = {"ok": False, "error": "no answer within 1 s"}
        with anyio.move_on_after(1):
            try:
                latency = await connector.ping(name)
            except (pgsd.PgsdError, psycopg.Error) as error:
                result[name] = {"ok": False, "error": type(error).__name__}
            else:
                result[name] = {"ok": True, "latency_ms": round(latency * 1000, 2)}

    async with anyio.create_task_group() as tg:
        for name in DATABASES:
            tg.start_soon(check, name)
    healthy = all(entry["ok"] for entry in result.values())
    return JSONResponse(result, 200 if healthy else 503)


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
