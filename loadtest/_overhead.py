"""What the server-process design costs per operation: a socket round trip vs a direct call.

    python loadtest/_overhead.py [--backend asyncio|trio] [-n 5000] [--dsn DSN]

Measures, one operation at a time (no contention), the median over rounds:

* ``direct``: `Operations.run` called in the event loop, as the server
  process calls it for each request, without socket or framing;
* ``socket``: the same request from a blocking client through the Unix
  socket (framing, JSON, two context switches);
* ``socket+gevent``: the same from a gevent-patched client, as a Locust user
  sends it.

for ``noop`` (the pure cost of the hop) and ``point_read`` (a real
operation): wall-clock µs per operation, and for the socket clients also the
client's own CPU µs (what a Locust process spends per request, before
Locust's statistics). Without ``--dsn`` it starts a throwaway server.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

_ROUNDS = 5
_OPS = ("noop", "point_read")


def _per_op(run: Callable[[], Any], count: int) -> list[float]:
    """The medians over rounds of the wall-clock and CPU time per call, in µs."""
    walls, cpus = [], []
    for _ in range(_ROUNDS):
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(count):
            run()
        walls.append((time.perf_counter() - wall) / count * 1e6)
        cpus.append((time.process_time() - cpu) / count * 1e6)
    return [statistics.median(walls), statistics.median(cpus)]


async def _direct(dsn: str, count: int) -> dict[str, list[float]]:
    import anyio

    import pgsd
    from _fault import FaultSchedule
    from _operations import Operations, prepare_table

    config = pgsd.ConnectorConfig(databases={"bench": pgsd.DatabaseConfig.from_dsn(dsn)})
    results = {}
    async with pgsd.DatabaseConnector(config) as connector, anyio.create_task_group() as tg:
        await prepare_table(connector, "bench", 1000)
        ops = Operations(
            connector=connector,
            database="bench",
            rows=1000,
            fault=FaultSchedule("none", at=0, duration=0),
            task_group=tg,
            info={},
        )
        for op in _OPS:
            samples = []
            for _ in range(_ROUNDS):
                start = time.perf_counter()
                for _ in range(count):
                    await ops.run({"op": op})
                samples.append((time.perf_counter() - start) / count * 1e6)
            results[op] = [statistics.median(samples)]
    return results


def _through_socket(path: str, count: int) -> dict[str, list[float]]:
    from _wire import Channel

    with Channel(path, 30.0) as channel:
        return {op: _per_op(functools.partial(channel.request, {"op": op}), count) for op in _OPS}


def _client_main(path: str, count: int) -> None:
    """The gevent-patched client, in a process of its own (as in Locust)."""
    from gevent import monkey  # type: ignore[import-untyped]

    monkey.patch_all()
    print(json.dumps(_through_socket(path, count)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("-n", "--count", type=int, default=5000)
    parser.add_argument("--dsn")
    parser.add_argument("--gevent-client", metavar="SOCKET", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gevent_client:
        _client_main(args.gevent_client, args.count)
        return
    if args.dsn:
        _measure(args.dsn, args)
        return
    from pgsd.testing import PostgresServer

    with PostgresServer() as server:
        _measure(server.dsn(), args)


def _measure(dsn: str, args: argparse.Namespace) -> None:
    import anyio

    from _client import ServerOptions, ServerProcess

    rows = {"direct": anyio.run(_direct, dsn, args.count, backend=args.backend)}
    process = ServerProcess(ServerOptions(backend=args.backend, dsn=dsn))
    process.start()
    try:
        rows["socket"] = _through_socket(process.socket_path, args.count)
        client = subprocess.run(
            [sys.executable, __file__, f"--gevent-client={process.socket_path}", f"-n{args.count}"],
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        )
        rows["socket+gevent"] = json.loads(client.stdout)
    finally:
        process.stop()
    print(f"{args.backend}: µs per operation, median of {_ROUNDS} rounds of {args.count}")
    print(f"{'':15}" + "".join(f"{op + ' wall':>17}{'client CPU':>12}" for op in _OPS))
    for name, row in rows.items():
        cells = ""
        for op in _OPS:
            wall, *cpu = row[op]
            cells += f"{wall:17.1f}" + (f"{cpu[0]:12.1f}" if cpu else f"{'':12}")
        print(f"{name:15}{cells}")


if __name__ == "__main__":
    main()
