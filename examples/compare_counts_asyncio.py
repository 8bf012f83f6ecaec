"""Compare a table's row counts in two databases, on asyncio.

    python examples/compare_counts_asyncio.py SOURCE_DSN TARGET_DSN TABLE

Prints one line per database and whether the counts agree; exits with 1
when they differ. Both counts are read at once, each through its own pool.
"""

from __future__ import annotations

import asyncio
import sys

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
    async with pgsd.DatabaseConnector(config) as connector, asyncio.TaskGroup() as tg:
        counts = {
            name: tg.create_task(connector.fetchval(name, query)) for name in config.databases
        }
    for name, count in counts.items():
        print(f"{name}: {count.result()} rows in {table}")
    same = counts["source"].result() == counts["target"].result()
    print("the counts agree" if same else "the counts differ")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(*sys.argv[1:4])))
