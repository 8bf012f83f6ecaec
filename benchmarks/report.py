"""The session's figures and the table comparing pgsd with its peers."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Result", "format_table"]


@dataclass(frozen=True)
class Result:
    """One scenario's median for one client."""

    scenario: str
    client: str
    #: ops/s, or µs per operation when ``per_op`` is true.
    value: float
    per_op: bool

    @property
    def unit(self) -> str:
        return "µs/op" if self.per_op else "ops/s"

    def speedup_over(self, other: Result) -> float:
        """How many times faster this client was than ``other`` (> 1: faster)."""
        ratio = self.value / other.value
        return 1 / ratio if self.per_op else ratio

    def formatted(self) -> str:
        if self.per_op:
            return f"{self.value:.2f} {self.unit}"
        return f"{self.value:,.0f} {self.unit}"


def format_table(
    results: Sequence[Result], *, order: Sequence[str], pgsd: Iterable[str], peers: Sequence[str]
) -> list[str]:
    """One row per scenario and client (in ``order``); pgsd's rows get a ratio per peer."""
    pgsd = set(pgsd)
    header = ["scenario", "client", "median", *(f"vs {peer}" for peer in peers)]
    rows = [header]
    for scenario in dict.fromkeys(result.scenario for result in results):
        by_client = {r.client: r for r in results if r.scenario == scenario}
        clients = [name for name in order if name in by_client]
        for i, client in enumerate(clients):
            result = by_client[client]
            row = [scenario if i == 0 else "", client, result.formatted()]
            for peer in peers:
                other = by_client.get(peer)
                if client in pgsd and other is not None:
                    row.append(f"{result.speedup_over(other):.2f}x")
                else:
                    row.append("")
            rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return [line.rstrip() for line in lines]
