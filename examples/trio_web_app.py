"""A trio program that serves a web app over two databases with Hypercorn.

    python examples/trio_web_app.py SOURCE_DSN TARGET_DSN [PORT]

    GET /counts/{table}   the table's row counts in source and target, counted at once
    GET /health           each pool's state (up, down...), no connection borrowed

The program's structure is trio's: the connector is opened first, the
server runs inside it in a nursery, and Ctrl-C or SIGTERM stops the server,
then closes the pools. Nothing outlives ``trio.run``. The handlers use trio
directly (nurseries, ``trio.fail_after``); pgsd needs nothing more.
"""

from __future__ import annotations

import re
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
#: A table's name, or a schema's and a table's: plain identifiers only.
TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?")


async def counts(request: Request) -> JSONResponse:
    connector: pgsd.DatabaseConnector = request.app.state.connector
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
        with trio.fail_after(5):  # one deadline for both; the query the server runs is cancelled
            async with trio.open_nursery() as nursery:
                for name in DATABASES:
                    nursery.start_soon(count, name)
    except trio.TooSlowError:
        return JSONResponse({"error": "the databases did not answer within 5 s"}, 504)
    if failed:
        return JSONResponse({"error": failed}, 503)
    if missing:
        return JSONResponse({"error": f"no table {table} in {', '.join(sorted(missing))}"}, 404)
    return JSONResponse({**found, "agree": found["source"] == found["target"]})


async def health(request: Request) -> JSONResponse:  # noqa: ASYNC124 - sync would run in a thread
    # Each pool's state, read without borrowing a connection: a busy pool is healthy.
    connector: pgsd.DatabaseConnector = request.app.state.connector
    states = {name: stats.state for name, stats in connector.stats().items()}
    healthy = all(state == "up" for state in states.values())
    return JSONResponse(states, 200 if healthy else 503)


async def main(source: str, target: str, port: int = 8000) -> None:
    config = pgsd.ConnectorConfig(
        databases={
            "source": pgsd.DatabaseConfig.from_dsn(source),
            "target": pgsd.DatabaseConfig.from_dsn(target),
        },
        pool=pgsd.PoolConfig(max_size=5, acquire_timeout=2),
    )
    app = Starlette(routes=[Route("/counts/{table}", counts), Route("/health", health)])
    server = Config()
    server.bind = [f"127.0.0.1:{port}"]
    # Signals are received from the start: Ctrl-C while the pools open stops the
    # program as cleanly as Ctrl-C while it serves.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

        async def until_signalled() -> None:
            async for _ in signals:
                return

        async with pgsd.DatabaseConnector(config) as connector:
            app.state.connector = connector
            async with trio.open_nursery() as nursery:
                urls = await nursery.start(
                    partial(serve, app, server, shutdown_trigger=until_signalled)
                )
                print(f"serving on {urls[0]}", flush=True)
    print("stopped; pools closed", flush=True)


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(f"usage: {sys.argv[0]} SOURCE_DSN TARGET_DSN [PORT]")
    trio.run(main, *sys.argv[1:3], int(sys.argv[3]) if len(sys.argv) == 4 else 8000)
