"""A trio program that serves a web app over two databases with Hypercorn.

    python examples/trio_web_app.py SOURCE_DSN TARGET_DSN [PORT]

    GET /counts/{table}   the table's row counts in source and target, counted at once
    GET /health           a ping of each database, each within one second

The program's structure is trio's: the connector is opened first, the
server runs inside it in a nursery, and Ctrl-C or SIGTERM stops the server,
then closes the pools. Nothing outlives ``trio.run``. The handlers use trio
directly (nurseries, ``trio.fail_after``); pgsd needs nothing more.
"""

from __future__ import annotations

import signal
import sys
from functools import partial

import psycopg
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from psycopg import sql
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import pgsd

DATABASES = ("source", "target")


async def counts(request: Request) -> JSONResponse:
    connector: pgsd.DatabaseConnector = request.app.state.connector
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
        with trio.fail_after(5):  # one deadline for both; a query past it stops on the server
            async with trio.open_nursery() as nursery:
                for name in DATABASES:
                    nursery.start_soon(count, name)
    except trio.TooSlowError:
        return JSONResponse({"error": "the databases did not answer within 5 s"}, 504)
    if missing:
        return JSONResponse({"error": f"no table {table} in {', '.join(sorted(missing))}"}, 404)
    return JSONResponse({**found, "agree": found["source"] == found["target"]})


async def health(request: Request) -> JSONResponse:
    connector: pgsd.DatabaseConnector = request.app.state.connector
    result: dict[str, dict[str, object]] = {}

    async def check(name: str) -> None:
        result[name] = {"ok": False, "error": "no answer within 1 s"}
        with trio.move_on_after(1):
            try:
                latency = await connector.ping(name)
            except (pgsd.PgsdError, psycopg.Error) as error:
                result[name] = {"ok": False, "error": type(error).__name__}
            else:
                result[name] = {"ok": True, "latency_ms": round(latency * 1000, 2)}

    async with trio.open_nursery() as nursery:
        for name in DATABASES:
            nursery.start_soon(check, name)
    healthy = all(entry["ok"] for entry in result.values())
    return JSONResponse(result, 200 if healthy else 503)


async def until_signalled() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            return


async def main(source: str, target: str, port: int = 8000) -> None:
    config = pgsd.ConnectorConfig(
        databases={
            "source": pgsd.DatabaseConfig.from_dsn(source),
            "target": pgsd.DatabaseConfig.from_dsn(target),
        },
        pool=pgsd.PoolConfig(max_size=5, acquire_timeout=5),
    )
    app = Starlette(routes=[Route("/counts/{table}", counts), Route("/health", health)])
    server = Config()
    server.bind = [f"127.0.0.1:{port}"]
    async with pgsd.DatabaseConnector(config) as connector:
        app.state.connector = connector
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(
                partial(serve, app, server, shutdown_trigger=until_signalled)
            )
            print(f"serving on {urls[0]}", flush=True)
    print("stopped; pools closed", flush=True)


if __name__ == "__main__":
    source, target, *rest = sys.argv[1:4]
    trio.run(main, source, target, int(rest[0]) if rest else 8000)
