"""``pgsd check``: what to check, checking it, and the embedded demo server.

This module holds the logic; ``_cli.py`` parses the command line and shows
the results.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from . import __version__
from ._config import ConnectorConfig, DatabaseConfig, PoolConfig
from ._config_file import load_config
from ._connector import DatabaseConnector
from ._errors import ConfigError
from ._reports import ConnectionReport
from ._stats import PoolStats

if TYPE_CHECKING:
    from .testing import PostgresServer

__all__ = [
    "BurstResult",
    "CheckResult",
    "DatabaseCheck",
    "choose_config",
    "embedded_demo",
    "run_checks",
]

#: The libpq environment variables that describe a database to connect to.
LIBPQ_ENV = (
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGDATABASE",
    "PGUSER",
    "PGSERVICE",
    "PGPASSFILE",
    "PGSSLMODE",
)
#: The short burst run through each reachable database's pool.
BURST_TASKS = 10
BURST_QUERIES_PER_TASK = 5
BURST_TIME_LIMIT = 10.0
#: The demo's reader role lacks exactly this, on purpose.
DEMO_MISSING = "table:app.secrets:SELECT"


@dataclass(frozen=True, slots=True)
class BurstResult:
    """A short burst of concurrent queries through one pool."""

    queries: int
    failed: int
    p50_ms: float | None
    max_ms: float | None
    error: str | None

    @property
    def ok(self) -> bool:
        """True when every query succeeded."""
        return self.failed == 0 and self.error is None


@dataclass(frozen=True, slots=True)
class DatabaseCheck:
    """One database's report, burst and pool statistics."""

    report: ConnectionReport
    burst: BurstResult | None
    stats: PoolStats | None

    @property
    def ok(self) -> bool:
        """Reachable, supported, privileges granted, and the burst went through."""
        return self.report.ok and (self.burst is None or self.burst.ok)


@dataclass(frozen=True, slots=True)
class CheckResult:
    """Every database checked, in configuration order."""

    backend: str
    databases: tuple[DatabaseCheck, ...]
    demo: bool = False
    notes: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """True when every database passed."""
        return all(check.ok for check in self.databases)

    def exit_code(self) -> int:
        """0 when all passed, 1 otherwise; the demo passes when it behaved as designed."""
        if self.demo:
            return 0 if _demo_as_designed(self.databases) else 1
        return 0 if self.ok else 1

    def to_dict(self) -> dict[str, Any]:
        """The JSON document ``pgsd check --json`` prints (schema: docs/check.md)."""
        return {
            "pgsd": __version__,
            "backend": self.backend,
            "ok": self.ok,
            "demo": self.demo,
            "databases": [_check_dict(check) for check in self.databases],
        }


def _check_dict(check: DatabaseCheck) -> dict[str, Any]:
    data = check.report.to_dict()
    data["ok"] = check.ok
    data["missing"] = list(check.report.permissions.missing) if check.report.permissions else []
    data["burst"] = None
    if check.burst is not None:
        data["burst"] = {
            "queries": check.burst.queries,
            "failed": check.burst.failed,
            "p50_ms": check.burst.p50_ms,
            "max_ms": check.burst.max_ms,
            "error": check.burst.error,
        }
    data["pool"] = None
    if check.stats is not None:
        stats = check.stats
        data["pool"] = {
            "state": stats.state,
            "size": stats.size,
            "max_size": stats.max_size,
            "acquires": stats.acquires,
            "timeouts": stats.timeouts,
            "errors": stats.errors,
            "wait_time_max_ms": round(stats.wait_time_max * 1000, 3),
        }
    return data


def _demo_as_designed(checks: Sequence[DatabaseCheck]) -> bool:
    by_name = {check.report.name: check for check in checks}
    admin, reader = by_name.get("demo_admin"), by_name.get("demo_reader")
    if admin is None or reader is None or not admin.ok:
        return False
    permissions = reader.report.permissions
    return (
        reader.report.error is not None
        and permissions is not None
        and list(permissions.missing) == [DEMO_MISSING]
        and reader.burst is not None
        and reader.burst.ok
    )


# -- choosing what to check ------------------------------------------------------


def choose_config(
    *,
    config_path: str | None,
    dsns: Sequence[str],
    names: Sequence[str],
    require: Sequence[str],
    environ: Mapping[str, str],
    cwd: Path,
) -> ConnectorConfig | None:
    """The databases to check, or None for the embedded demo.

    In order: ``--config`` (or ``PGSD_CONFIG``), DSNs given on the command
    line, ``./pgsd.toml``, the libpq environment (``PGHOST`` and friends);
    with none of these, None.

    Raises:
        ConfigError: a bad file, DSN, database name or privilege string.
    """
    path = config_path or environ.get("PGSD_CONFIG")
    if path is None and not dsns and (cwd / "pgsd.toml").exists():
        path = str(cwd / "pgsd.toml")
    if path is not None and dsns:
        raise ConfigError("give a config file or DSNs, not both", key="dsn")
    if path is not None:
        config = load_config(path, environ=environ)
    elif dsns:
        config = ConnectorConfig(
            databases={
                _dsn_name(i, dsn): DatabaseConfig.from_dsn(dsn) for i, dsn in enumerate(dsns)
            }
        )
    elif any(environ.get(var) for var in LIBPQ_ENV):
        config = ConnectorConfig(databases={"default": DatabaseConfig()})
    else:
        return None
    return _select(config, names, require)


def _dsn_name(index: int, dsn: str) -> str:
    database = DatabaseConfig.from_dsn(dsn)
    return f"{index + 1}:{database.display_name}"


def _select(
    config: ConnectorConfig, names: Sequence[str], require: Sequence[str]
) -> ConnectorConfig:
    if names:
        unknown = [name for name in names if name not in config.databases]
        if unknown:
            known = ", ".join(config.databases) or "none"
            raise ConfigError(
                f"no database named {', '.join(map(repr, unknown))} (configured: {known})",
                key="--db",
            )
        databases = {name: config.databases[name] for name in names}
    else:
        databases = dict(config.databases)
    if require:
        databases = {
            name: db.replace(required=(*db.required, *require)) for name, db in databases.items()
        }
    return ConnectorConfig(databases=databases, pool=config.pool)


# -- the embedded demo ---------------------------------------------------------------


@contextlib.contextmanager
def embedded_demo() -> Iterator[tuple[ConnectorConfig, PostgresServer]]:
    """Start a throwaway server with a demo database and a limited role.

    The ``demo_admin`` database entry connects as the superuser; the
    ``demo_reader`` entry connects as a role with CONNECT and USAGE but no
    SELECT on ``app.secrets``, and requires it: one passing and one failing
    requirement. Everything is removed on exit, also on Ctrl-C.

    Raises:
        pgsd.testing.ServerNotFound: no PostgreSQL server binaries here.
    """
    # Only here: pgsd.testing brings the subprocess and installer machinery,
    # which nothing but the demo needs.
    from .testing import PostgresServer

    with PostgresServer() as server:
        server.create_database("pgsd_demo")
        password = server.create_role("pgsd_demo_reader")
        for statement in (
            "CREATE SCHEMA app",
            "CREATE TABLE app.secrets (id int, secret text)",
            "CREATE TABLE app.public_notes (id int, note text)",
            "GRANT USAGE ON SCHEMA app TO pgsd_demo_reader",
            "GRANT SELECT ON app.public_notes TO pgsd_demo_reader",
        ):
            server.execute(statement, dbname="pgsd_demo")
        common: dict[str, Any] = {"host": server.host, "port": server.port, "dbname": "pgsd_demo"}
        config = ConnectorConfig(
            databases={
                "demo_admin": DatabaseConfig(
                    **common,
                    user=server.superuser,
                    required=("database:CONNECT", "database:CREATE", "role:pg_monitor"),
                ),
                "demo_reader": DatabaseConfig(
                    **common,
                    user="pgsd_demo_reader",
                    password=password,
                    required=("database:CONNECT", "table:app.public_notes:SELECT", DEMO_MISSING),
                ),
            },
            pool=PoolConfig(max_size=5, acquire_timeout=10),
        )
        yield config, server


# -- checking ------------------------------------------------------------------------------


async def run_checks(
    config: ConnectorConfig,
    *,
    backend: str,
    on_report: Callable[[str, ConnectionReport], object] | None = None,
    demo: bool = False,
    then: Callable[[DatabaseConnector, CheckResult], Awaitable[object]] | None = None,
) -> CheckResult:
    """Verify every database concurrently, then run a short burst through each pool.

    *then* is awaited with the connector, still open, and the result
    (``--watch``).
    """
    async with DatabaseConnector(config) as connector:
        reports = await connector.verify_all(on_report=on_report)
        bursts: dict[str, BurstResult] = {}
        async with anyio.create_task_group() as task_group:
            for name, report in reports.items():
                if report.host is not None:  # reached the server
                    task_group.start_soon(_burst_into, connector, name, bursts)
        stats = connector.stats()
        checks = tuple(
            DatabaseCheck(report=reports[name], burst=bursts.get(name), stats=stats.get(name))
            for name in reports
        )
        result = CheckResult(backend=backend, databases=checks, demo=demo)
        if then is not None:
            await then(connector, result)
    return result


async def _burst_into(
    connector: DatabaseConnector, name: str, results: dict[str, BurstResult]
) -> None:
    results[name] = await burst(connector, name)


async def burst(connector: DatabaseConnector, name: str) -> BurstResult:
    """``BURST_TASKS`` tasks each running ``BURST_QUERIES_PER_TASK`` queries, bounded."""
    latencies: list[float] = []
    failures: list[str] = []

    async def task() -> None:
        for _ in range(BURST_QUERIES_PER_TASK):
            start = anyio.current_time()
            try:
                async with connector.get_connection(name) as conn:
                    await conn.execute("SELECT 1")
            except Exception as ex:  # reported, not raised: a check never crashes
                failures.append(f"{type(ex).__name__}: {ex}")
            else:
                latencies.append(anyio.current_time() - start)

    error = None
    with anyio.move_on_after(BURST_TIME_LIMIT) as scope:
        async with anyio.create_task_group() as task_group:
            for _ in range(BURST_TASKS):
                task_group.start_soon(task)
    if scope.cancelled_caught:
        error = f"the burst did not finish in {BURST_TIME_LIMIT:g} s"
    elif failures:
        error = failures[0]
    total = BURST_TASKS * BURST_QUERIES_PER_TASK
    return BurstResult(
        queries=total,
        failed=total - len(latencies),
        p50_ms=round(statistics.median(latencies) * 1000, 3) if latencies else None,
        max_ms=round(max(latencies) * 1000, 3) if latencies else None,
        error=error,
    )
