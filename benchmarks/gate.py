"""The CI gate: pgsd against its peers, from ratios measured in the same run.

Absolute figures depend on the machine and on what else runs on it; the
ratio of two clients measured minutes apart on the same machine much less
so. Each check compares pgsd (on each backend) with a peer from the same
session, with a threshold well below what is measured on a quiet machine,
so that noise on a shared CI runner does not fail the build. The speed
checks compare each client's fastest round: load from other processes only
ever slows a round down, so the fastest is the least disturbed, where a
median still moves with a burst of load that lasts a few rounds. The FIFO
and timeout checks are exact: they do not depend on speed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from report import Result

__all__ = [
    "ACQUIRE_MIN_SPEEDUP",
    "MANY_TASKS_MIN_SHARE",
    "ONE_SHOT_MIN_SPEEDUP",
    "SELECT_100_MIN_SPEEDUP",
    "Check",
    "evaluate",
]

#: pgsd's SELECT 1 throughput at 100 tasks over psycopg_pool's, at least.
SELECT_100_MIN_SPEEDUP = 1.3
#: psycopg_pool's uncontended acquire+release time over pgsd's, at least
#: (1.0: pgsd is no slower).
ACQUIRE_MIN_SPEEDUP = 1.0
#: pgsd's one-shot statements at 100 tasks over each peer's fastest way to
#: run one statement, at least.
ONE_SHOT_MIN_SPEEDUP = {"psycopg_pool": 2.0, "asyncpg": 1.7}
#: pgsd's one-shot SELECT 1 at 1000 tasks as a share of its own at 100, at least.
MANY_TASKS_MIN_SHARE = 0.5

SELECT_100 = "SELECT 1, 100 tasks"
ONE_SHOT_100 = ("one-shot SELECT 1, 100 tasks", "one-shot point read, 100 tasks")
ONE_SHOT_1000 = "one-shot SELECT 1, 1000 tasks"
ACQUIRE = "acquire+release, 1 task"
OUT_OF_ORDER = "exhaustion: grants out of FIFO order"
TIMEOUTS = "exhaustion: timeouts"
PEER = "psycopg_pool"


@dataclass(frozen=True)
class Check:
    """One condition of the gate and how this run fared."""

    name: str
    passed: bool
    detail: str


def _find(results: Sequence[Result], scenario: str, client: str) -> Result | None:
    return next((r for r in results if r.scenario == scenario and r.client == client), None)


def _speedup(
    results: Sequence[Result], scenario: str, client: str, minimum: float, peer: str = PEER
) -> Check:
    name = f"{scenario}: {client} vs {peer} >= {minimum:g}x"
    mine, theirs = _find(results, scenario, client), _find(results, scenario, peer)
    if mine is None or theirs is None:
        return Check(name, False, "not measured in this run")
    ratio = mine.speedup_over(theirs, best=True)
    median = mine.speedup_over(theirs)
    if ratio is None or median is None:
        return Check(name, False, f"no ratio ({mine.formatted()} vs {theirs.formatted()})")
    detail = (
        f"{ratio:.2f}x in the fastest rounds ({median:.2f}x in the medians:"
        f" {mine.formatted()} vs {theirs.formatted()})"
    )
    return Check(name, ratio >= minimum, detail)


def _holds_up(results: Sequence[Result], client: str) -> Check:
    """More tasks do not collapse pgsd's one-shot throughput (its own two figures)."""
    name = f"{ONE_SHOT_1000} vs 100 tasks: {client} >= {MANY_TASKS_MIN_SHARE:g}x"
    many, few = _find(results, ONE_SHOT_1000, client), _find(results, ONE_SHOT_100[0], client)
    if many is None or few is None:
        return Check(name, False, "not measured in this run")
    share = many.speedup_over(few, best=True)
    if share is None:
        return Check(name, False, f"no ratio ({many.formatted()} vs {few.formatted()})")
    detail = f"{share:.2f}x in the fastest rounds ({many.formatted()} vs {few.formatted()})"
    return Check(name, share >= MANY_TASKS_MIN_SHARE, detail)


def _zero(results: Sequence[Result], scenario: str, client: str) -> Check:
    name = f"{scenario}: {client} = 0"
    mine = _find(results, scenario, client)
    if mine is None:
        return Check(name, False, "not measured in this run")
    return Check(name, mine.value == 0, mine.formatted())


def evaluate(results: Sequence[Result], pgsd_clients: Sequence[str]) -> list[Check]:
    """Every check of the gate, for each of pgsd's clients (backends).

    A figure missing from the run (a scenario deselected, a client that
    failed) fails its check: the gate never passes for want of evidence.
    """
    checks = []
    for client in pgsd_clients:
        checks += [
            _speedup(results, SELECT_100, client, SELECT_100_MIN_SPEEDUP),
            _speedup(results, ACQUIRE, client, ACQUIRE_MIN_SPEEDUP),
            *(
                _speedup(results, scenario, client, minimum, peer)
                for scenario in ONE_SHOT_100
                for peer, minimum in ONE_SHOT_MIN_SPEEDUP.items()
            ),
            _holds_up(results, client),
            _zero(results, OUT_OF_ORDER, client),
            _zero(results, TIMEOUTS, client),
        ]
    return checks
