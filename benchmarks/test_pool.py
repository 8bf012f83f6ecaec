"""Pool overhead and throughput, for every client on the same server."""

from __future__ import annotations

import pytest

from harness import Bench, Sizes


def test_acquire_release(bench: Bench, sizes: Sizes) -> None:
    """One task borrows and returns an idle connection: the pool's own cost."""
    ops = sizes.acquire_ops
    pool = bench.pool

    async def batch() -> None:
        for _ in range(ops):
            await pool.acquire_release()

    bench.run("acquire+release, 1 task", batch, ops, per_op=True)


@pytest.mark.parametrize("tasks", [5, 100, 1000])
def test_select_one(bench: Bench, sizes: Sizes, tasks: int) -> None:
    """``SELECT 1`` through a pool of 5, from as many tasks as connections, and more."""
    ops = sizes.select_ops
    bench.run_tasks(f"SELECT 1, {tasks} tasks", bench.pool.select_one, ops, tasks, vs_pgbench=True)
