"""The ``pgsd`` command: ``pgsd check`` verifies databases and prints a report.

Exit codes: 0 every database passed; 1 a database failed or lacks a
required privilege; 2 a usage or configuration error; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from ._check import CheckResult, DatabaseCheck, choose_config, embedded_demo, run_checks
from ._config import ConnectorConfig
from ._connector import DatabaseConnector
from ._errors import ConfigError
from ._reports import ConnectionReport
from ._watch import watch

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``pgsd check [options] [DSN ...]``."""
    parser = argparse.ArgumentParser(
        prog="pgsd", description="PostgreSQL connection checks for asyncio and trio."
    )
    parser.add_argument("--version", action="version", version=f"pgsd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser(
        "check",
        help="verify databases: reachable, version, privileges, pool health",
        description=(
            "Verify every selected database concurrently. With no config file, no DSN and"
            " no PG* environment, start a throwaway local PostgreSQL and check a demo."
        ),
    )
    check.add_argument("dsns", nargs="*", metavar="DSN", help="postgresql:// URL or key=value")
    check.add_argument(
        "--config", metavar="FILE", help="TOML file (default: $PGSD_CONFIG, else ./pgsd.toml)"
    )
    check.add_argument(
        "--db", action="append", default=[], metavar="NAME", help="check only this database"
    )
    check.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    check.add_argument("--json", action="store_true", help="print a JSON document")
    check.add_argument(
        "--require",
        action="append",
        default=[],
        metavar="PRIV",
        help="require a privilege on every database (e.g. schema:public:USAGE)",
    )
    check.add_argument(
        "--watch",
        nargs="?",
        const=2.0,
        type=float,
        metavar="SECONDS",
        help="after the checks, show the pools every SECONDS (default 2) until Ctrl-C;"
        " with --json, one document per line and refresh",
    )
    check.add_argument("-v", "--verbose", action="store_true", help="debug logging to stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.ERROR,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return _check(args)
    except KeyboardInterrupt:
        print("pgsd check: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (pgsd check --json | head): not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED


def _check(args: argparse.Namespace) -> int:
    if args.watch is not None and not (args.watch > 0 and math.isfinite(args.watch)):
        print(
            f"pgsd check: --watch takes a positive number of seconds, got {args.watch:g}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        config = choose_config(
            config_path=args.config,
            dsns=args.dsns,
            names=args.db,
            require=args.require,
            environ=os.environ,
            cwd=Path.cwd(),
        )
    except ConfigError as ex:
        print(f"pgsd check: {ex}", file=sys.stderr)
        return EXIT_USAGE
    if config is not None:
        result = _run(config, args, demo=False)
    else:
        from .testing import ServerNotFound  # the demo's only: see embedded_demo

        try:
            with embedded_demo() as (config, server):
                if not args.json:
                    print(
                        f"No configuration given: checking a throwaway PostgreSQL {server.major}"
                        f" started from {server.binaries.bindir} on {server.host}:{server.port}"
                        " (removed on exit).",
                        file=sys.stderr,
                    )
                result = _run(config, args, demo=True)
        except ServerNotFound as ex:
            print(
                f"pgsd check: nothing to check and no local server to start: {ex}", file=sys.stderr
            )
            return EXIT_USAGE
    if args.watch is None:
        _print(result, as_json=args.json)
    return result.exit_code()


def _run(config: ConnectorConfig, args: argparse.Namespace, *, demo: bool) -> CheckResult:
    err = Console(stderr=True)
    show_progress = not args.json and err.is_terminal
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not show_progress,
    ) as progress:
        tasks = {name: progress.add_task(f"checking {name}", total=1) for name in config.databases}

        def on_report(name: str, report: ConnectionReport) -> None:
            status = "ok" if report.ok else "failed"
            progress.update(tasks[name], completed=1, description=f"{name}: {status}")

        then = None
        if args.watch is not None:

            async def then(connector: DatabaseConnector, result: CheckResult) -> None:
                progress.stop()
                if not args.json:
                    _print(result, as_json=False)  # the checks first, then the live table
                await watch(connector, args.watch, as_json=args.json)

        return anyio.run(
            lambda: run_checks(
                config, backend=args.backend, on_report=on_report, demo=demo, then=then
            ),
            backend=args.backend,
        )


def _print(result: CheckResult, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # a file or a pipe: no reason to wrap at 80
    table = Table(title=f"pgsd check ({result.backend})", title_justify="left")
    for column in ("database", "status", "server", "version", "latency", "tls", "user"):
        table.add_column(column)
    table.add_column("privileges")
    table.add_column("pool burst")
    for check in result.databases:
        table.add_row(*_row(check))
        for replica in check.report.replicas:
            table.add_row(*_replica_row(replica))
    console.print(table)
    for check in result.databases:
        if check.report.error:
            console.print(
                f"[bold]{check.report.name}[/bold]: {check.report.error}", highlight=False
            )
        elif check.burst is not None and check.burst.error:
            console.print(f"[bold]{check.report.name}[/bold]: {check.burst.error}", highlight=False)
    if result.demo:
        console.print(
            "demo_reader lacks table:app.secrets:SELECT on purpose: this is how a missing"
            " privilege is reported. Point pgsd check at your own databases with --config or a DSN."
        )


def _row(check: DatabaseCheck) -> list[str]:
    report = check.report
    burst = "-"
    if check.burst is not None:
        done = check.burst.queries - check.burst.failed
        burst = f"{done}/{check.burst.queries} ok"
        if check.burst.p50_ms is not None:
            burst += f", p50 {check.burst.p50_ms:.1f} ms"
    return [
        report.name,
        "[green]ok[/green]" if check.ok else "[red]FAILED[/red]",
        *_server_cells(report),
        _privileges_cell(report),
        burst,
    ]


def _replica_row(report: ConnectionReport) -> list[str]:
    """A read replica under its primary: its standing and lag in the status column."""
    status = report.replica_state or "unknown"
    if report.lag_seconds is not None:
        status += f", lag {report.lag_seconds:.1f} s"
    colour = "green" if report.ok else "red"
    return [
        f"  {report.name}",
        f"[{colour}]{status}[/{colour}]",
        *_server_cells(report),
        _privileges_cell(report),
        "-",
    ]


def _server_cells(report: ConnectionReport) -> list[str]:
    """Server, version, latency, TLS and user."""
    version = "-"
    if report.version is not None:
        version = f"{report.version.major}.{report.version.minor}"
        version += "" if report.supported else " (unsupported)"
    return [
        f"{report.host}:{report.port}" if report.host else "-",
        version,
        f"{report.latency_ms:.1f} ms" if report.latency_ms is not None else "-",
        _tls_cell(report),
        report.permissions.user if report.permissions is not None else "-",
    ]


def _privileges_cell(report: ConnectionReport) -> str:
    permissions = report.permissions
    if permissions is None:
        return "-"
    if permissions.missing:
        return "missing: " + ", ".join(permissions.missing)
    return f"{len(permissions.required)} required, all granted"


def _tls_cell(report: ConnectionReport) -> str:
    """The protocol of an encrypted connection ("TLSv1.3"), "no" without TLS, "-" unknown."""
    if report.tls is None:
        return "-"
    if not report.tls:
        return "no"
    return report.tls_version or "yes"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
