"""The measures the table and the gate rely on, checked on made-up rounds."""

from __future__ import annotations

import pytest

from gate import evaluate
from report import Result, format_table
from workload import Attempt, out_of_order, percentile


def granted(asked: int, ended: int) -> Attempt:
    return Attempt(asked, ended, True, 0.0)


def test_fifo_grants_are_in_order() -> None:
    # A and B wait; releases at 2 and 3 go to A, then B.
    assert out_of_order([granted(0, 2), granted(1, 3)]) == 0


def test_order_of_resumption_does_not_count() -> None:
    # Both woken in one batch and B resumed first (trio may do that): the
    # releases, not the resumptions, give the order.
    assert out_of_order([granted(1, 3), granted(0, 2)]) == 0


def test_newcomer_served_before_an_older_waiter_is_out_of_order() -> None:
    # A waits from 0 and is served at 5; B asks at 1 and is served at once.
    assert out_of_order([granted(0, 5), granted(1, 1)]) == 1


def test_grant_while_an_older_waiter_times_out_is_out_of_order() -> None:
    timed_out = Attempt(0, 10, False, 1.0)
    assert out_of_order([timed_out, granted(1, 4), granted(11, 12)]) == 1


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    with pytest.raises(ValueError):
        percentile([], 50)


def _run(
    select_pgsd: float,
    acquire_pgsd: float,
    late: float,
    timeouts: float,
    one_shot: float = 3000.0,
    many: float = 2500.0,
) -> list[Result]:
    """A made-up run: pgsd's figures given, the peers' fixed (1000 ops/s, 10 µs, 0)."""
    results = []
    for client in ("pgsd-asyncio", "psycopg_pool"):
        mine = client != "psycopg_pool"
        results += [
            Result(
                "SELECT 1, 100 tasks", client, select_pgsd if mine else 1000.0, "ops/s", "higher"
            ),
            Result(
                "acquire+release, 1 task", client, acquire_pgsd if mine else 10.0, "µs", "lower"
            ),
            Result(
                "exhaustion: grants out of FIFO order", client, late if mine else 0.0, "%", None
            ),
            Result("exhaustion: timeouts", client, timeouts if mine else 0.0, "", None),
        ]
    for scenario in ("one-shot SELECT 1, 100 tasks", "one-shot point read, 100 tasks"):
        results += [
            Result(scenario, "pgsd-asyncio", one_shot, "ops/s", "higher"),
            Result(scenario, "psycopg_pool", 1000.0, "ops/s", "higher"),
            Result(scenario, "asyncpg", 1000.0, "ops/s", "higher"),
        ]
    results.append(Result("one-shot SELECT 1, 1000 tasks", "pgsd-asyncio", many, "ops/s", "higher"))
    return results


def test_gate_passes_a_run_within_thresholds() -> None:
    checks = evaluate(_run(2000.0, 3.0, 0.0, 0), ["pgsd-asyncio"])
    assert [check.passed for check in checks] == [True] * 9


@pytest.mark.parametrize(
    ("run", "failing"),
    [
        (_run(1200.0, 3.0, 0.0, 0), "SELECT 1, 100 tasks"),
        (_run(2000.0, 11.0, 0.0, 0), "acquire+release, 1 task"),
        (_run(2000.0, 3.0, 0.5, 0), "exhaustion: grants out of FIFO order"),
        (_run(2000.0, 3.0, 0.0, 1), "exhaustion: timeouts"),
        (_run(2000.0, 3.0, 0.0, 0, many=1400.0), "one-shot SELECT 1, 1000 tasks vs 100"),
    ],
)
def test_gate_fails_each_check(run: list[Result], failing: str) -> None:
    failed = [check.name for check in evaluate(run, ["pgsd-asyncio"]) if not check.passed]
    assert len(failed) == 1
    assert failed[0].startswith(failing)


def test_gate_sets_one_shot_statements_against_each_peer() -> None:
    # 1,800/s is 1.8x both peers: below the threshold against psycopg_pool
    # (2x), above the one against asyncpg (1.7x).
    failed = [
        check.name
        for check in evaluate(_run(2000.0, 3.0, 0.0, 0, 1800.0, 1500.0), ["pgsd-asyncio"])
        if not check.passed
    ]
    assert failed == [
        "one-shot SELECT 1, 100 tasks: pgsd-asyncio vs psycopg_pool >= 2x",
        "one-shot point read, 100 tasks: pgsd-asyncio vs psycopg_pool >= 2x",
    ]


def test_gate_fails_when_a_figure_is_missing() -> None:
    checks = evaluate(_run(2000.0, 3.0, 0.0, 0), ["pgsd-asyncio", "pgsd-trio"])
    failed = [check for check in checks if not check.passed]
    assert len(failed) == 9
    assert all("pgsd-trio" in check.name and "not measured" in check.detail for check in failed)


def test_table_gives_ratios_to_peers_and_shares_of_pgbench() -> None:
    results = [
        Result("SELECT 1, 100 tasks", "pgsd-asyncio", 3000.0, "ops/s", "higher", True),
        Result("SELECT 1, 100 tasks", "psycopg_pool", 1000.0, "ops/s", "higher", True),
        Result("pgbench", "pgbench", 30000.0, "ops/s", "higher"),
        Result("wait", "pgsd-asyncio", 100.0, "ms", "lower"),
        Result("wait", "psycopg_pool", 400.0, "ms", "lower"),
    ]
    order = ["pgsd-asyncio", "psycopg_pool"]
    lines = format_table(results, order=order, pgsd=["pgsd-asyncio"], peers=["psycopg_pool"])
    rows = [line.split() for line in lines[2:]]
    assert rows[0][-2:] == ["3.00x", "0.10x"]  # 3x psycopg_pool, a tenth of pgbench
    assert rows[1][-1] == "0.03x"  # psycopg_pool: a share of pgbench only
    assert rows[3][-1] == "4.00x"  # a quarter of the wait: 4x better


def test_gate_compares_the_fastest_rounds() -> None:
    # A burst of load slowed pgsd's middle rounds, not its fastest.
    run = _run(1200.0, 3.0, 0.0, 0)
    run[0] = Result("SELECT 1, 100 tasks", "pgsd-asyncio", 1200.0, "ops/s", "higher", best=2600.0)
    run[4] = Result("SELECT 1, 100 tasks", "psycopg_pool", 1000.0, "ops/s", "higher", best=1100.0)
    assert all(check.passed for check in evaluate(run, ["pgsd-asyncio"]))
