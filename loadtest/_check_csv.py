"""Check a Locust run of the pgsd harness from its CSV files.

    python loadtest/_check_csv.py PREFIX [--p95-ms 1500] [--expect-fault] [--processes N]

PREFIX is what ``locust --csv PREFIX`` was given. The run fails the check
when:

* no request ran, or no point read did;
* any request failed outside the deliberate fault window: only names
  carrying the `` (fault window)`` suffix may have failures, and only when
  ``PREFIX_pgsd.json`` records a fault that happened;
* the 95th percentile of ``pgsd point_read`` exceeds ``--p95-ms``;
* ``--expect-fault`` and the fault did not happen, or ``--processes N`` and
  not N server processes reported (a distributed run).

Prints one summary line (and the failures, if any); exits 0 when the run
passes, 1 when it does not, 2 when the files cannot be read.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from _poolview import FAULT_SUFFIX

__all__ = ["DEFAULT_P95_MS", "Verdict", "check", "main"]

#: The default bound on the point reads' p95 (see loadtest/README.md).
DEFAULT_P95_MS: Final = 1500.0
_POINT_READ: Final = ("pgsd", "point_read")


@dataclass
class Verdict:
    """What the check found; ``problems`` empty means the run passed."""

    requests: int = 0
    failures_outside: int = 0
    failures_inside: int = 0
    point_read_p95_ms: float | None = None
    faults: list[dict[str, Any]] = field(default_factory=list)
    processes: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self, label: str, bound: float) -> str:
        p95 = "none" if self.point_read_p95_ms is None else f"{self.point_read_p95_ms:g} ms"
        windows = "; ".join(_describe_window(fault) for fault in self.faults) or "no fault"
        return (
            f"{label}: {'OK' if self.ok else 'FAILED'}: {self.requests} requests,"
            f" {self.failures_outside} failures outside the fault window"
            f" ({self.failures_inside} inside), point_read p95 {p95} (bound {bound:g} ms),"
            f" {windows}"
        )


def _describe_window(fault: dict[str, Any]) -> str:
    if fault.get("offset") is None:
        return f"{fault.get('mode')} fault did not happen"
    return f"{fault['mode']} at +{fault['offset']:.1f} s for {fault.get('length') or 0:.1f} s"


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file as dicts.

    Raises:
        OSError: the file cannot be read.
    """
    with path.open(newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def _happened(fault: dict[str, Any]) -> bool:
    return fault.get("mode", "none") != "none" and fault.get("offset") is not None


def check(
    stats: list[dict[str, str]],
    report: dict[str, Any] | None,
    *,
    p95_bound_ms: float = DEFAULT_P95_MS,
    expect_fault: bool = False,
    processes: int | None = None,
) -> Verdict:
    """Check a run's ``_stats.csv`` rows and its ``_pgsd.json`` report (if written)."""
    verdict = Verdict()
    replies = (report or {}).get("processes", {})
    verdict.processes = len(replies) if report is not None else None
    verdict.faults = [
        r["fault"] for r in replies.values() if r.get("fault", {}).get("mode", "none") != "none"
    ]
    _check_counts(stats, verdict)
    _check_failures(stats, verdict)
    _check_p95(stats, verdict, p95_bound_ms)
    if expect_fault and not any(_happened(fault) for fault in verdict.faults):
        verdict.problems.append("a fault was expected, and none happened")
    for fault in verdict.faults:
        if fault.get("error"):
            verdict.problems.append(f"the {fault['mode']} fault failed: {fault['error']}")
    if processes is not None and verdict.processes != processes:
        verdict.problems.append(
            f"{processes} server processes were expected to report, {verdict.processes} did"
        )
    return verdict


def _check_counts(stats: list[dict[str, str]], verdict: Verdict) -> None:
    for row in stats:
        if row["Name"] == "Aggregated":
            verdict.requests = int(row["Request Count"])
    if verdict.requests == 0:
        verdict.problems.append("no request ran")


def _check_failures(stats: list[dict[str, str]], verdict: Verdict) -> None:
    may_fail = any(_happened(fault) for fault in verdict.faults)
    for row in stats:
        failures = int(row["Failure Count"])
        if row["Name"] == "Aggregated" or not failures:
            continue
        label = f"{row['Type']} {row['Name']}"
        if row["Name"].endswith(FAULT_SUFFIX):
            verdict.failures_inside += failures
            if not may_fail:
                verdict.problems.append(f"{label}: {failures} failures, and no fault happened")
        else:
            verdict.failures_outside += failures
            verdict.problems.append(f"{label}: {failures} failures outside the fault window")


def _check_p95(stats: list[dict[str, str]], verdict: Verdict, bound: float) -> None:
    for row in stats:
        if (row["Type"], row["Name"]) == _POINT_READ and int(row["Request Count"]):
            verdict.point_read_p95_ms = float(row["95%"])
    if verdict.point_read_p95_ms is None:
        verdict.problems.append("no point read ran")
    elif verdict.point_read_p95_ms > bound:
        verdict.problems.append(
            f"point_read p95 {verdict.point_read_p95_ms:g} ms exceeds {bound:g} ms"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Check a run; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prefix", help="the --csv prefix of the run")
    parser.add_argument("--p95-ms", type=float, default=DEFAULT_P95_MS)
    parser.add_argument("--expect-fault", action="store_true")
    parser.add_argument("--processes", type=int, help="server processes expected to report")
    args = parser.parse_args(argv)
    try:
        stats = read_rows(Path(f"{args.prefix}_stats.csv"))
        failures_path = Path(f"{args.prefix}_failures.csv")
        failures = read_rows(failures_path) if failures_path.exists() else []
        report_path = Path(f"{args.prefix}_pgsd.json")
        report = json.loads(report_path.read_text()) if report_path.exists() else None
    except (OSError, ValueError) as exc:
        print(f"{args.prefix}: cannot read the run's files: {exc}", file=sys.stderr)
        return 2
    verdict = check(
        stats,
        report,
        p95_bound_ms=args.p95_ms,
        expect_fault=args.expect_fault,
        processes=args.processes,
    )
    print(verdict.summary(Path(args.prefix).name, args.p95_ms))
    for problem in verdict.problems:
        print(f"  - {problem}")
    if not verdict.ok:
        for row in failures:
            print(f"  failure: {row['Method']} {row['Name']}: {row['Error']} x{row['Occurrences']}")
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
