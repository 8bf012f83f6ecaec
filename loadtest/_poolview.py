"""Pool statistics of the pgsd server processes, as table rows and text.

A ``stats`` reply of one server process becomes one row; on a Locust
master the rows of every worker are shown with their total.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

__all__ = ["COLUMNS", "FAULT_SUFFIX", "describe_fault", "format_table", "pool_row", "total_row"]

#: Appended to the Locust name of an operation that overlapped the fault window.
FAULT_SUFFIX: Final = " (fault window)"

#: (key, title) of every column, in order: the web UI tab and the printed table.
COLUMNS: Final = (
    ("process", "Process"),
    ("backend", "Backend"),
    ("state", "State"),
    ("size", "Size"),
    ("idle", "Idle"),
    ("in_use", "In use"),
    ("waiting", "Waiting"),
    ("acquires", "Acquires"),
    ("wait_avg_ms", "Wait avg (ms)"),
    ("wait_max_ms", "Wait max (ms)"),
    ("timeouts", "Timeouts"),
    ("errors", "Connect errors"),
    ("connections_lost", "Lost"),
    ("reconnect_attempts", "Reconnects"),
    ("fault", "Fault window"),
)
_SUMMED: Final = (
    "size",
    "idle",
    "in_use",
    "waiting",
    "acquires",
    "timeouts",
    "errors",
    "connections_lost",
    "reconnect_attempts",
)


def describe_fault(fault: Mapping[str, Any] | None) -> str:
    """``restart at +8.0 s for 2.6 s``, ``blackhole armed for +8 s``, or ``none``."""
    if not fault or fault.get("mode", "none") == "none":
        return "none"
    mode = fault["mode"]
    if fault.get("error"):
        return f"{mode} failed: {fault['error']}"
    if fault.get("offset") is None:
        state = "armed" if fault.get("armed") else "not armed"
        return f"{mode} {state}, at +{fault['at']:g} s"
    if fault.get("length") is None:
        return f"{mode} since +{fault['offset']:.1f} s"
    return f"{mode} at +{fault['offset']:.1f} s for {fault['length']:.1f} s"


def pool_row(process: str, reply: Mapping[str, Any]) -> dict[str, Any]:
    """One table row from a server process's ``stats`` reply."""
    pool = reply["pool"]
    acquires = pool["acquires"]
    average = pool["wait_time_total"] / acquires if acquires else 0.0
    row = {key: pool[key] for key in _SUMMED}
    row.update(
        process=process,
        backend=reply.get("backend", ""),
        state=pool["state"],
        wait_avg_ms=round(average * 1000, 2),
        wait_max_ms=round(pool["wait_time_max"] * 1000, 1),
        fault=describe_fault(reply.get("fault")),
    )
    return row


def total_row(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The sum of several processes' rows (averages weighted by acquires)."""
    rows = list(rows)
    total: dict[str, Any] = {key: sum(row[key] for row in rows) for key in _SUMMED}
    acquires = total["acquires"]
    weighted = sum(row["wait_avg_ms"] * row["acquires"] for row in rows)
    total.update(
        process="total",
        backend=",".join(sorted({row["backend"] for row in rows})),
        state=",".join(sorted({row["state"] for row in rows})),
        wait_avg_ms=round(weighted / acquires, 2) if acquires else 0.0,
        wait_max_ms=max((row["wait_max_ms"] for row in rows), default=0.0),
        fault="",
    )
    return total


def format_table(rows: Iterable[Mapping[str, Any]]) -> str:
    """A fixed-width text table of rows, one line each, under a header."""
    rows = list(rows)
    cells = [[title for _, title in COLUMNS]]
    cells += [[str(row.get(key, "")) for key, _ in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        for line in cells
    ]
    return "\n".join(line.rstrip() for line in lines)
