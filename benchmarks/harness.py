"""What the scenarios run on: sizes, event loops in threads, timed batches.

pytest-benchmark times synchronous calls, so each event loop runs in a
blocking portal (its own thread) for the whole session, and every measured
round is one batch of many operations handed to that loop: the thread hop
into the loop is then noise.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal
from pytest_benchmark.fixture import BenchmarkFixture

from clients import BenchPool, Client
from pgsd.testing import PostgresServer
from report import Better, Result
from workload import run_started_tasks

__all__ = ["FULL", "POOL_SIZE", "SHORT", "Bench", "Portals", "Recorder", "Sizes", "pg_url"]

#: Every pool under test has this many connections, opened before timing.
POOL_SIZE = 5


def pg_url(server: PostgresServer, port: int | None = None) -> str:
    """The server's URL (through ``port`` when given), which every client takes as it is."""
    return f"postgresql://{server.superuser}@{server.host}:{port or server.port}/postgres"


@dataclass(frozen=True)
class Sizes:
    """How much each benchmark measures."""

    form: str
    #: Measured rounds per benchmark, after one warm-up round.
    rounds: int
    #: Acquire+release pairs per round (one task).
    acquire_ops: int
    #: Queries per round, shared by all the tasks.
    select_ops: int
    #: Exhaustion: measured rounds, and connections each task borrows per round.
    exhaustion_rounds: int
    exhaustion_holds: int
    #: Connect storm: measured rounds (pools opened).
    storm_rounds: int
    #: How long pgbench runs.
    pgbench_seconds: int
    #: Peak RSS: rounds of ``select_ops`` queries the child process runs.
    rss_rounds: int


FULL = Sizes(
    form="full",
    rounds=10,
    acquire_ops=20_000,
    select_ops=10_000,
    exhaustion_rounds=5,
    exhaustion_holds=5,
    storm_rounds=10,
    pgbench_seconds=5,
    rss_rounds=3,
)
SHORT = Sizes(
    form="short",
    rounds=5,
    acquire_ops=5_000,
    select_ops=3_000,
    exhaustion_rounds=3,
    exhaustion_holds=3,
    storm_rounds=3,
    pgbench_seconds=2,
    rss_rounds=2,
)


class Portals:
    """One event loop per backend, each in its own thread, started on first use."""

    def __init__(self, stack: ExitStack) -> None:
        self._stack = stack
        self._portals: dict[str, BlockingPortal] = {}

    def get(self, backend: str) -> BlockingPortal:
        if backend not in self._portals:
            self._portals[backend] = self._stack.enter_context(start_blocking_portal(backend))
        return self._portals[backend]


class Recorder:
    """Records one client's figures: for the final table, and in the saved JSON.

    ``benchmark`` is needed only to :meth:`time` rounds; a test that times
    nothing must not request pytest-benchmark's fixture (unused, it warns).
    Figures also go to the benchmark's ``extra_info`` when there is one.
    """

    def __init__(
        self, client: str, results: list[Result], benchmark: BenchmarkFixture | None = None
    ) -> None:
        self._benchmark = benchmark
        self.client_name = client
        self._results = results

    @property
    def benchmark(self) -> BenchmarkFixture:
        if self._benchmark is None:
            raise RuntimeError("this recorder has no pytest-benchmark fixture")
        return self._benchmark

    def record(
        self,
        scenario: str,
        key: str,
        value: float,
        unit: str,
        better: Better | None,
        *,
        vs_pgbench: bool = False,
        best: float | None = None,
    ) -> None:
        """Add a figure to the table; ``key`` names it in the benchmark's ``extra_info``.

        ``best``: the figure from the fastest round, when rounds were timed.
        """
        if self._benchmark is not None:
            self._benchmark.extra_info[key] = value
        result = Result(scenario, self.client_name, value, unit, better, vs_pgbench, best)
        self._results.append(result)

    def time(
        self,
        group: str,
        target: Callable[[], Any],
        *,
        rounds: int,
        setup: Callable[[], Any] | None = None,
        teardown: Callable[[], Any] | None = None,
    ) -> tuple[float, float] | None:
        """Time ``target`` ``rounds`` times after one warm-up; return the median and fastest.

        In seconds per round. None under ``--benchmark-disable`` (the target
        then ran once, untimed). ``setup``, untimed before each round,
        returns the target's ``(args, kwargs)``.
        """
        benchmark = self.benchmark
        benchmark.group = group
        benchmark.extra_info.update(scenario=group, client=self.client_name)
        benchmark.pedantic(  # type: ignore[no-untyped-call]
            target, rounds=rounds, warmup_rounds=1, setup=setup, teardown=teardown
        )
        if benchmark.stats is None:
            return None
        stats = benchmark.stats.stats
        return float(stats.median), float(stats.min)


class Bench(Recorder):
    """Runs batches of one client's operations on its event loop and times them."""

    def __init__(
        self,
        benchmark: BenchmarkFixture,
        client: Client,
        portal: BlockingPortal,
        pool: BenchPool,
        sizes: Sizes,
        results: list[Result],
    ) -> None:
        super().__init__(client.name, results, benchmark)
        self.client = client
        self.pool = pool
        self.portal = portal
        self.sizes = sizes

    def run_rounds(self, group: str, batch: Callable[[], Awaitable[object]], rounds: int) -> None:
        """Run ``batch`` on the client's loop for a warm-up and ``rounds`` timed rounds."""
        self.time(group, lambda: self.portal.call(batch), rounds=rounds)

    def run(
        self,
        scenario: str,
        batch: Callable[[], Awaitable[object]],
        ops: int,
        *,
        per_op: bool,
        vs_pgbench: bool = False,
    ) -> None:
        """Time ``batch`` (``ops`` operations) each round; record ops/s or µs/op.

        ``vs_pgbench``: the figure (ops/s) is also given as a share of pgbench's.
        """
        timed = self.time(scenario, lambda: self.portal.call(batch), rounds=self.sizes.rounds)
        self._record_timed(scenario, timed, ops, per_op=per_op, vs_pgbench=vs_pgbench)

    def run_tasks(
        self,
        scenario: str,
        op: Callable[[], Awaitable[None]],
        ops: int,
        tasks: int,
        *,
        vs_pgbench: bool = False,
    ) -> None:
        """Time ``ops`` calls of ``op`` shared by ``tasks`` tasks; record ops/s.

        The tasks are started before each round, untimed (`run_started_tasks`):
        a round times the operations, not the event loop creating a thousand
        tasks, which would otherwise weigh most on the fastest client.
        """
        portal = self.portal

        def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
            return portal.start_task(run_started_tasks, op, ops, tasks), {}

        def go(finished: Future[None], gate: anyio.Event) -> None:
            portal.call(gate.set)
            finished.result()

        timed = self.time(scenario, go, rounds=self.sizes.rounds, setup=setup)
        self._record_timed(scenario, timed, ops, per_op=False, vs_pgbench=vs_pgbench)

    def _record_timed(
        self,
        scenario: str,
        timed: tuple[float, float] | None,
        ops: int,
        *,
        per_op: bool,
        vs_pgbench: bool,
    ) -> None:
        self.benchmark.extra_info["ops_per_round"] = ops
        if timed is None:  # --benchmark-disable: ran once, untimed
            return
        median, fastest = timed
        if per_op:
            us = median / ops * 1e6
            self.record(scenario, "us_per_op", us, "µs", "lower", best=fastest / ops * 1e6)
        else:
            self.record(
                scenario,
                "ops_per_s",
                ops / median,
                "ops/s",
                "higher",
                vs_pgbench=vs_pgbench,
                best=ops / fastest,
            )
