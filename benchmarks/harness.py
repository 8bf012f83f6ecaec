"""What the scenarios run on: sizes, event loops in threads, timed batches.

pytest-benchmark times synchronous calls, so each event loop runs in a
blocking portal (its own thread) for the whole session, and every measured
round is one batch of many operations handed to that loop: the thread hop
into the loop is then noise.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass

from anyio.from_thread import BlockingPortal, start_blocking_portal
from pytest_benchmark.fixture import BenchmarkFixture

from clients import BenchPool, Client
from report import Result

__all__ = ["FULL", "SHORT", "Bench", "Portals", "Sizes"]


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


FULL = Sizes(form="full", rounds=10, acquire_ops=20_000, select_ops=10_000)
SHORT = Sizes(form="short", rounds=5, acquire_ops=5_000, select_ops=3_000)


class Portals:
    """One event loop per backend, each in its own thread, started on first use."""

    def __init__(self, stack: ExitStack) -> None:
        self._stack = stack
        self._portals: dict[str, BlockingPortal] = {}

    def get(self, backend: str) -> BlockingPortal:
        if backend not in self._portals:
            self._portals[backend] = self._stack.enter_context(start_blocking_portal(backend))
        return self._portals[backend]


class Bench:
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
        self.client = client
        self.pool = pool
        self._benchmark = benchmark
        self._portal = portal
        self._sizes = sizes
        self._results = results

    def run(
        self, scenario: str, batch: Callable[[], Awaitable[object]], ops: int, *, per_op: bool
    ) -> None:
        """Time ``batch`` (``ops`` operations) each round; record ops/s or µs/op."""
        benchmark = self._benchmark
        benchmark.group = scenario
        benchmark.extra_info.update(scenario=scenario, client=self.client.name, ops_per_round=ops)
        benchmark.pedantic(
            self._portal.call, args=(batch,), rounds=self._sizes.rounds, warmup_rounds=1
        )
        if benchmark.stats is None:  # --benchmark-disable: ran once, untimed
            return
        median = benchmark.stats.stats.median
        value = median / ops * 1e6 if per_op else ops / median
        benchmark.extra_info["us_per_op" if per_op else "ops_per_s"] = value
        self._results.append(Result(scenario, self.client.name, value, per_op))
