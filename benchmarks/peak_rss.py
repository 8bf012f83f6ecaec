"""Peak resident memory of one client running the ``SELECT 1`` workload.

``test_memory.py`` runs this script in a fresh process per client, so that
one library's memory does not mask another's: a process's peak RSS is a
high-water mark, and only the client's own library is imported here
(`clients` imports each library when its pool is opened).

Usage: ``python peak_rss.py CLIENT URL --size 5 --tasks 100 --ops 10000
--rounds 3``. Prints one JSON object: ``{"client": ..., "peak_mb": ...}``
(MB: 10^6 bytes).
"""

from __future__ import annotations

import argparse
import json

import anyio

from clients import Client, client_named
from workload import run_tasks


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB.

    Read from ``VmHWM`` in ``/proc/self/status`` (Linux, in KiB), the high-water
    mark of this program's own memory. ``getrusage``'s ``ru_maxrss`` would
    not do: Linux carries it over ``exec`` from the forked parent, so every
    child would report at least the benchmark session's size.

    Raises:
        RuntimeError: the system does not report it (not Linux).
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError("no VmHWM in /proc/self/status")


async def workload(client: Client, url: str, size: int, tasks: int, ops: int, rounds: int) -> None:
    """Open the client's pool and run ``rounds`` rounds of ``ops`` queries over ``tasks`` tasks."""
    async with client.pool.open(url, size) as pool:
        for _ in range(rounds):
            await run_tasks(pool.select_one, ops, tasks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("client")
    parser.add_argument("url")
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--tasks", type=int, required=True)
    parser.add_argument("--ops", type=int, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    args = parser.parse_args()
    client = client_named(args.client)
    anyio.run(
        workload,
        client,
        args.url,
        args.size,
        args.tasks,
        args.ops,
        args.rounds,
        backend=client.backend,
    )
    print(json.dumps({"client": client.name, "peak_mb": peak_rss_mb()}))


if __name__ == "__main__":
    main()
