"""The session's figures and the table comparing pgsd with its peers."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = ["PGBENCH", "Result", "format_table"]

#: The client name of pgbench's figures: the C client's ceiling.
PGBENCH = "pgbench"

Better = Literal["higher", "lower"]

#: How each unit's figures are written.
_FORMATS = {
    "ops/s": "{:,.0f} ops/s",
    "µs": "{:.2f} µs",
    "ms": "{:.1f} ms",
    "MB": "{:.1f} MB",
    "%": "{:.1f} %",
    "": "{:,.0f}",
}


@dataclass(frozen=True)
class Result:
    """One figure of one scenario for one client."""

    scenario: str
    client: str
    value: float
    #: One of ``ops/s``, ``µs``, ``ms``, ``MB``, ``%``, or ``""`` for a count.
    unit: str
    #: Which way is better; None when a ratio would mean nothing (a count
    #: of failures, a share that should be 0).
    better: Better | None
    #: Whether to give this client's figure as a share of pgbench's
    #: (queries per second, pgbench's being the C client's ceiling).
    vs_pgbench: bool = False
    #: The same figure from the fastest round, for timed scenarios.
    best: float | None = None

    def speedup_over(self, other: Result, *, best: bool = False) -> float | None:
        """How many times better this figure is than ``other``'s (> 1: better).

        With ``best``, compares the fastest rounds when both have one.
        None when a ratio means nothing: no direction, or a zero figure.
        """
        mine, theirs = self.value, other.value
        if best and self.best is not None and other.best is not None:
            mine, theirs = self.best, other.best
        if self.better is None or mine <= 0 or theirs <= 0:
            return None
        ratio = mine / theirs
        return ratio if self.better == "higher" else 1 / ratio

    def formatted(self) -> str:
        return _FORMATS[self.unit].format(self.value)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def format_table(
    results: Sequence[Result], *, order: Sequence[str], pgsd: Iterable[str], peers: Sequence[str]
) -> list[str]:
    """One row per scenario and client (in ``order``, pgbench last).

    pgsd's rows get a ratio per peer; a client's queries per second in a
    scenario compared with pgbench get a share of pgbench's figure.
    """
    pgsd = set(pgsd)
    ceiling = next((r for r in results if r.client == PGBENCH), None)
    header = ["scenario", "client", "figure", *(f"vs {peer}" for peer in peers), "of pgbench"]
    rows = [header]
    for scenario in dict.fromkeys(result.scenario for result in results):
        by_client = {r.client: r for r in results if r.scenario == scenario}
        clients = [name for name in [*order, PGBENCH] if name in by_client]
        for i, client in enumerate(clients):
            result = by_client[client]
            row = [scenario if i == 0 else "", client, result.formatted()]
            for peer in peers:
                other = by_client.get(peer)
                ratio = None
                if client in pgsd and other is not None:
                    ratio = result.speedup_over(other)
                row.append(_ratio(ratio))
            share = None
            if result.vs_pgbench and ceiling is not None and ceiling.value > 0:
                share = result.value / ceiling.value
            row.append(_ratio(share))
            rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return [line.rstrip() for line in lines]
