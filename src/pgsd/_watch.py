"""``pgsd check --watch``: the pools' state, refreshed live until Ctrl-C.

After the checks, the connector stays open and every interval the table
(or, with ``--json``, one JSON document on one line) shows each pool's
state, sizes, waiters and wait p99 (on a terminal, one table updated in
place; into a file or a pipe, one table per refresh). SIGINT or SIGTERM ends the watch
cleanly: the connector closes and the command exits with the checks' code.
"""

from __future__ import annotations

import datetime
import json
import math
import signal
import sys
from typing import Any

import anyio
import anyio.abc
from rich.console import Console
from rich.live import Live
from rich.table import Table

from ._connector import DatabaseConnector
from ._stats import PoolStats

__all__ = ["watch"]


async def watch(connector: DatabaseConnector, interval: float, *, as_json: bool) -> None:
    """Show the pools every *interval* seconds until SIGINT or SIGTERM."""
    async with anyio.create_task_group() as tg:
        await tg.start(_until_signal, tg.cancel_scope)  # listening before the first refresh
        if as_json:
            while True:
                print(json.dumps(_document(connector)), flush=True)
                await anyio.sleep(interval)
        console = Console()
        if not console.is_terminal:  # a file or a pipe: one table after another
            console = Console(width=200)
            while True:
                console.print(_table(connector))
                sys.stdout.flush()
                await anyio.sleep(interval)
        with Live(_table(connector), console=console, auto_refresh=False) as live:
            while True:
                live.update(_table(connector), refresh=True)
                await anyio.sleep(interval)


async def _until_signal(
    scope: anyio.CancelScope, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for _ in signals:
            scope.cancel()
            return


def _document(connector: DatabaseConnector) -> dict[str, Any]:
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
    return {"time": now, "pools": {stats.name: _pool(stats) for stats in _every_pool(connector)}}


def _every_pool(connector: DatabaseConnector) -> list[PoolStats]:
    """Every pool's statistics, each primary followed by its read replicas."""
    return [pool for stats in connector.stats().values() for pool in (stats, *stats.replicas)]


def _pool(stats: PoolStats) -> dict[str, Any]:
    p99 = stats.wait_time.quantile(0.99)
    return {
        "state": stats.state,
        "size": stats.size,
        "min_size": stats.min_size,
        "max_size": stats.max_size,
        "in_use": stats.in_use,
        "idle": stats.idle,
        "waiting": stats.waiting,
        "acquires": stats.acquires,
        "timeouts": stats.timeouts,
        "errors": stats.errors,
        # An upper bound (the bucket's); null above the last bucket.
        "wait_p99_ms": None if math.isinf(p99) else round(p99 * 1000, 3),
        "role": stats.role,
        "lag_seconds": stats.lag_seconds,
        "replica_state": stats.replica_state,
    }


def _table(connector: DatabaseConnector) -> Table:
    now = datetime.datetime.now().strftime("%H:%M:%S")
    table = Table(title=f"pgsd pools at {now} (Ctrl-C to stop)", title_justify="left")
    for column in ("database", "state", "size", "in use", "idle", "waiting", "wait p99"):
        table.add_column(column)
    for stats in _every_pool(connector):
        row = _pool(stats)
        p99 = row["wait_p99_ms"]
        state = row["state"]
        color = "green" if state == "up" else "yellow" if state in ("opening", "paused") else "red"
        name = stats.name
        if stats.role == "replica":
            name = f"  {name}"
            state = f"{state}, {stats.replica_state}"
            if stats.lag_seconds is not None:
                state += f", lag {stats.lag_seconds:.1f} s"
            if stats.replica_state != "fresh":
                color = "red"
        table.add_row(
            name,
            f"[{color}]{state}[/{color}]",
            f"{stats.size}/{stats.max_size}",
            str(stats.in_use),
            str(stats.idle),
            str(stats.waiting),
            "> 30 s" if p99 is None else f"<= {p99:g} ms",
        )
    return table
