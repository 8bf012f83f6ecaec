"""Compare a table's row counts in two databases, on trio.

    python examples/compare_counts_trio.py SOURCE_DSN TARGET_DSN TABLE

The same program as ``compare_counts_asyncio.py``: pgsd's API does not
change with the event loop, only the program's own concurrency does.
"""

from __future__ import annotations

import sys

import trio
from psycopg import sql

import pgsd


async def main(source: str, target: str, table: str) -> int:
    config = pgsd.ConnectorConfig(
        databases={
            "source": pgsd.DatabaseConfig.from_dsn(source),
            "target": pgsd.DatabaseConfig.from_dsn(target),
        }
    )
    query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(*table.split(".")))
    counts: dict[str, int] = {}

    async def count(connector: pgsd.DatabaseConnector, name: str) -> None:
        counts[name] = await connector.fetchval(name, query)

    async with pgsd.DatabaseConnector(config) as connector, trio.open_nursery() as nursery:
        for name in config.databases:
            nursery.start_soon(count, connector, name)
    for name in config.databases:
        print(f"{name}: {counts[name]} rows in {table}")
    same = counts["source"] == counts["target"]
    print("the counts agree" if same else "the counts differ")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(trio.run(main, *sys.argv[1:4]))
