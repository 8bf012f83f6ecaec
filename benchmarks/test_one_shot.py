"""One statement at a time from many tasks: lent connections, and one-shot statements.

Each scenario runs 5, 100 and 1000 tasks on a pool of 5. The lent form
borrows a connection for each statement, as every pool can. The one-shot
form runs the statement each library's fastest way for one statement:
pgsd's ``fetchval``/``fetchone`` (pipelined across the tasks), asyncpg's
``pool.fetchval``/``fetchrow`` (acquire, run, release in one call), and
psycopg_pool, which has no such call, through a lent connection.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import pytest

from harness import Bench, Sizes

TASKS = [5, 100, 1000]


def _keyed(op: Callable[[int], Awaitable[None]], rows: int) -> Callable[[], Awaitable[None]]:
    """``op`` with a random key from 1 to ``rows`` at each call."""
    pick = random.Random(0).randint

    def call() -> Awaitable[None]:
        return op(pick(1, rows))

    return call


@pytest.mark.parametrize("tasks", TASKS)
def test_one_shot_select_one(bench: Bench, sizes: Sizes, tasks: int) -> None:
    """``SELECT 1`` as one-shot statements."""
    ops = sizes.select_ops
    op = bench.pool.one_shot_select_one
    bench.run_tasks(f"one-shot SELECT 1, {tasks} tasks", op, ops, tasks, vs_pgbench=True)


@pytest.mark.parametrize("tasks", TASKS)
def test_point_read(bench: Bench, sizes: Sizes, point_rows: int, tasks: int) -> None:
    """A row by primary key (random among ``point_rows``) through a lent connection."""
    ops = sizes.select_ops
    op = _keyed(bench.pool.point_read, point_rows)
    bench.run_tasks(f"point read, {tasks} tasks", op, ops, tasks)


@pytest.mark.parametrize("tasks", TASKS)
def test_one_shot_point_read(bench: Bench, sizes: Sizes, point_rows: int, tasks: int) -> None:
    """A row by primary key as one-shot statements."""
    ops = sizes.select_ops
    op = _keyed(bench.pool.one_shot_point_read, point_rows)
    bench.run_tasks(f"one-shot point read, {tasks} tasks", op, ops, tasks)
