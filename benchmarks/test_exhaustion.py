"""Pool exhaustion: 100 tasks share 5 connections, each holding one for 20 ms.

Every task borrows a connection ``exhaustion_holds`` times per round, keeps
it 20 ms (a sleep with the connection in hand: see `workload.hold_round`)
and asks again at once, so 95 tasks are always waiting. A fair pool serves
them in arrival order and each waits about 95 * 20 ms / 5 = 380 ms, well
inside the 1 s acquire timeout; a pool that lets newcomers jump the queue
serves some of them quickly and leaves others to time out.
"""

from __future__ import annotations

import statistics

import pytest

from harness import Bench, Sizes
from workload import HoldRound, hold_round, out_of_order, percentile

TASKS = 100
HOLD = 0.02
ACQUIRE_TIMEOUT = 1.0


@pytest.fixture
def acquire_timeout() -> float:
    return ACQUIRE_TIMEOUT


def test_exhaustion(bench: Bench, sizes: Sizes) -> None:
    """Throughput, waits, timeouts and FIFO order with 20 tasks per connection."""
    holds = sizes.exhaustion_holds
    rounds: list[HoldRound] = []

    async def batch() -> None:
        rounds.append(await hold_round(bench.pool, TASKS, holds, HOLD))

    bench.run_rounds("exhaustion", batch, sizes.exhaustion_rounds)
    measured = rounds[-sizes.exhaustion_rounds :]  # without the warm-up round
    for one in measured:
        assert len(one.attempts) == TASKS * holds  # every attempt ended, one way or the other
    _record(bench, measured)


def _record(bench: Bench, measured: list[HoldRound]) -> None:
    waits = [attempt.wait * 1e3 for one in measured for attempt in one.attempts]
    grants = sum(one.grants for one in measured)
    late = sum(out_of_order(one.attempts) for one in measured)
    throughput = statistics.median(one.grants / one.duration for one in measured)
    bench.benchmark.extra_info.update(attempts=len(waits), grants=grants)
    bench.record("exhaustion: throughput", "grants_per_s", throughput, "ops/s", "higher")
    for pct in (50, 99):
        value = percentile(waits, pct)
        bench.record(f"exhaustion: wait p{pct}", f"wait_p{pct}_ms", value, "ms", "lower")
    bench.record("exhaustion: wait max", "wait_max_ms", max(waits), "ms", "lower")
    timeouts = sum(one.timeouts for one in measured)
    bench.record("exhaustion: timeouts", "timeouts", timeouts, "", None)
    share = 100 * late / grants if grants else 100.0
    bench.record("exhaustion: grants out of FIFO order", "out_of_order_pct", share, "%", None)
