"""Helpers the tests share: unique names, invariants, counting server connections, leaks."""

from __future__ import annotations

import contextlib
import datetime
import gc
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import time
import warnings
from collections.abc import AsyncIterator, Iterator, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import jsonschema
import psycopg

import pgsd
from pgsd.testing import PostgresServer

_names = itertools.count()


def unique_name(prefix: str = "pgsd_test") -> str:
    """A name no other test of this run uses (an application_name, a role...)."""
    return f"{prefix}_{os.getpid()}_{next(_names)}"


async def until(condition: Any, polls: int = 1000, pace: float = 0.01) -> None:
    """Let the program's tasks run until *condition()* holds: at most *polls* times *pace* s."""
    for _ in range(polls):
        if condition():
            return
        await anyio.sleep(pace)
    raise AssertionError("the condition never held")


def db_config(
    server: PostgresServer, *, user: str | None = None, **overrides: Any
) -> pgsd.DatabaseConfig:
    """A config with an application_name of its own, to find its connections on the server."""
    overrides.setdefault("application_name", unique_name())
    return pgsd.DatabaseConfig.from_dsn(server.dsn(user=user), **overrides)


def invariants_hold(stats: pgsd.PoolStats) -> bool:
    """``size == idle + in_use``, ``size + opening <= max_size``, nothing negative."""
    return (
        stats.size == stats.idle + stats.in_use
        and stats.size + stats.opening <= stats.max_size
        and min(stats.size, stats.idle, stats.in_use, stats.opening, stats.waiting) >= 0
        and (stats.wait_time_max <= stats.wait_time_total or stats.acquires == 0)
    )


def assert_invariants(stats: pgsd.PoolStats) -> None:
    """Fail, showing the statistics, unless :func:`invariants_hold`."""
    assert invariants_hold(stats), stats


async def server_connections(server: PostgresServer, application_name: str) -> int:
    """How many connections with this application_name the server has now."""
    async with await pgsd.connect(server.dsn()) as observer:
        cur = await observer.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            [application_name],
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


@contextlib.asynccontextmanager
async def open_pool(
    config: pgsd.DatabaseConfig, **pool_options: Any
) -> AsyncIterator[pgsd.ConnectionPool]:
    """A pool with these options; once closed, its invariants hold and it holds nothing."""
    async with pgsd.ConnectionPool(config, pgsd.PoolConfig(**pool_options)) as pool:
        yield pool
    assert_invariants(pool.stats())
    assert pool.stats().size == 0


@dataclass
class Tally:
    """What a load's cycles did; counters only, so that counting holds no memory."""

    cycles: int = 0
    lent: int = 0
    queries: int = 0
    handovers: int = 0
    cancelled_waiting: int = 0
    timeouts: int = 0
    cancelled_mid_query: int = 0


#: The keys of `ConnectionReport.to_dict()` (and of each database in
#: ``pgsd check --json``, which adds ``missing``, ``burst`` and ``pool``).
REPORT_KEYS = frozenset(
    {
        "name",
        "ok",
        "error",
        "latency_ms",
        "version",
        "supported",
        "permissions",
        "tls",
        "tls_version",
        "tls_cipher",
        "host",
        "port",
        "role",
        "lag_seconds",
        "replica_state",
        "replicas",
    }
)
VERSION_KEYS = frozenset({"major", "minor", "num", "text"})


class PoolWarnings(logging.Handler):
    """The pool's warnings as they are logged, with the event loop's time of each."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((anyio.current_time(), record.getMessage()))

    @property
    def messages(self) -> list[str]:
        return [message for _, message in self.records]


@contextlib.contextmanager
def pool_warnings() -> Iterator[PoolWarnings]:
    """Record what ``pgsd.pool`` warns of inside the block."""
    handler = PoolWarnings()
    logger = logging.getLogger("pgsd.pool")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


class CancelWhenRunning:
    """Cancels a scope once a backend runs a query: a timer would race the query's start.

    Start `run` in a task beside the query; ``cancelled_at`` is when it
    cancelled (``anyio.current_time()``).
    """

    def __init__(self, server: PostgresServer, pid: int, query: str) -> None:
        self.server = server
        self.pid = pid
        self.query = query
        self.scope = anyio.CancelScope()
        self.cancelled_at = float("nan")

    async def run(self) -> None:
        async with await pgsd.connect(self.server.dsn()) as observer:
            for _ in range(1000):
                cur = await observer.execute(
                    "SELECT state, query FROM pg_stat_activity, pg_sleep(0.005) WHERE pid = %s",
                    [self.pid],
                )
                if await cur.fetchone() == ("active", self.query):
                    self.cancelled_at = anyio.current_time()
                    self.scope.cancel()
                    return
        raise AssertionError(f"backend {self.pid} never ran {self.query!r}")


async def wait_until_gone(server: PostgresServer, application_name: str) -> None:
    """Backends exit just after their client closes: poll, bounded in count."""
    for _ in range(1000):
        if await server_connections(server, application_name) == 0:
            return
    raise AssertionError(f"server connections of {application_name} did not go away")


async def terminate_all(server: PostgresServer, application_name: str) -> None:
    """Terminate every backend of *application_name* and wait until those are gone.

    Only those: a pool may open replacements meanwhile (its maintenance
    replaces a dead idle connection within a second), which are not waited for.
    """
    rows = server.execute(
        "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
        [application_name],
    )
    pids = [pid for pid, _ in rows]
    # pg_terminate_backend only signals: wait until the backends have gone.
    for _ in range(1000):
        left = server.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", [pids])
        if left == [(0,)]:
            return
        await anyio.sleep(0.01)
    raise AssertionError(f"terminated backends {pids} of {application_name} did not go away")


class Watch:
    """Samples a pool until stopped: its server connections, and its statistics.

    ``most`` is the largest number of server connections seen with the
    pool's application_name (``pg_stat_activity``, through a connection of
    its own that is reopened after a fault); ``broken`` holds every
    statistics snapshot that breaks an invariant.
    """

    def __init__(
        self, server: PostgresServer, pool: pgsd.ConnectionPool, pace: float, max_samples: int
    ) -> None:
        self.server = server
        self.pool = pool
        self.pace = pace
        self.max_samples = max_samples
        self.most = 0
        self.samples = 0
        self.broken: list[pgsd.PoolStats] = []
        self._stopped = anyio.Event()

    def stop(self) -> None:
        self._stopped.set()

    async def run(self) -> None:
        observer: pgsd.Connection | None = None
        try:
            for _ in range(self.max_samples):
                if self._stopped.is_set():
                    return
                stats = self.pool.stats()
                if not invariants_hold(stats):
                    self.broken.append(stats)
                observer = await self._sample(observer)
                with anyio.move_on_after(self.pace):
                    await self._stopped.wait()
        finally:
            if observer is not None:
                with anyio.move_on_after(CLOSE_WAIT, shield=True):
                    await observer.close()

    async def _sample(self, observer: pgsd.Connection | None) -> pgsd.Connection | None:
        try:
            if observer is None:
                observer = await pgsd.connect(self.server.dsn(connect_timeout=1))
            cur = await observer.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                [self.pool.config.application_name],
            )
            row = await cur.fetchone()
        except (pgsd.ConnectError, psycopg.Error):
            # The server is down or restarting: none of the pool's
            # connections is on it now. Reconnect at the next sample.
            if observer is not None:
                await observer.close()
            return None
        assert row is not None
        self.most = max(self.most, int(row[0]))
        self.samples += 1
        return observer


@contextlib.asynccontextmanager
async def watching(
    server: PostgresServer, pool: pgsd.ConnectionPool, *, pace: float, max_samples: int
) -> AsyncIterator[Watch]:
    """Run a :class:`Watch` beside the block, every ``pace`` seconds, bounded in count."""
    watch = Watch(server, pool, pace, max_samples)
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch.run)
        try:
            yield watch
        finally:
            watch.stop()


#: How long a leak check waits for backends to exit after their clients closed.
#: Bound on a test's own clean-up await (closing a connection needs no I/O wait).
CLOSE_WAIT = 5.0
LEFTOVER_WAIT = 5.0
#: The pace of that wait's polls of pg_stat_activity, and their bound in count.
LEFTOVER_POLL_PACE = 0.002
LEFTOVER_POLLS = 2500

#: A backend, told apart from a later one with a reused pid by its start time.
BackendKey = tuple[int, datetime.datetime]


@dataclass(frozen=True)
class Backend:
    """One client backend in ``pg_stat_activity``."""

    pid: int
    backend_start: datetime.datetime
    application_name: str
    usename: str | None
    datname: str | None
    state: str | None
    query: str | None

    @property
    def key(self) -> BackendKey:
        return self.pid, self.backend_start

    def __str__(self) -> str:
        return (
            f"pid {self.pid}: application_name={self.application_name!r}"
            f" usename={self.usename!r} datname={self.datname!r}"
            f" state={self.state!r} query={self.query!r}"
        )


class ServerBackends:
    """A server's client backends, seen through a synchronous connection of its own.

    :meth:`snapshot` before a test and :meth:`left_over` after it give the
    connections the test opened and did not close. The observing connection
    is opened on first use, reopened if something (a test terminating
    backends) broke it, and never counted.
    """

    _QUERY = (
        "SELECT pid, backend_start, application_name, usename, datname, state, query"
        " FROM pg_stat_activity"
        " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
    )

    def __init__(self, server: PostgresServer, *, wait: float = LEFTOVER_WAIT) -> None:
        self.server = server
        self.wait = wait
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def backends(self) -> list[Backend]:
        """The server's client backends now, except the observing one."""
        try:
            return self._backends()
        except psycopg.OperationalError:
            self.close()
            return self._backends()

    def _backends(self) -> list[Backend]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                self.server.dsn(connect_timeout=5, application_name="pgsd_leak_check"),
                autocommit=True,
            )
        return [Backend(*row) for row in self._conn.execute(self._QUERY)]

    def snapshot(self) -> frozenset[BackendKey]:
        """The backends there now, to leave out of a later :meth:`left_over`."""
        return frozenset(backend.key for backend in self.backends())

    def left_over(self, before: Set[BackendKey]) -> list[Backend]:
        """The backends not in ``before`` that are still there after up to ``wait`` seconds.

        A backend exits just after its client closes the socket: poll until
        the new ones are gone or the deadline passes.
        """
        deadline = time.monotonic() + self.wait
        new = self._new(before)
        for _ in range(LEFTOVER_POLLS):
            if not new or time.monotonic() >= deadline:
                break
            time.sleep(LEFTOVER_POLL_PACE)
            new = self._new(before)
        return new

    def _new(self, before: Set[BackendKey]) -> list[Backend]:
        return [backend for backend in self.backends() if backend.key not in before]


def collect_garbage() -> list[str]:
    """Run a full collection; return what finalizers warned or raised, as text.

    A psycopg connection collected while still open warns (ResourceWarning)
    from ``__del__``. Caught here, the warning or error is kept as text
    only: a kept exception would hold the object, and its server connection,
    open through its traceback.
    """
    problems: list[str] = []

    def unraisable_hook(unraisable: sys.UnraisableHookArgs) -> None:
        where = unraisable.err_msg or "Exception ignored in"
        problems.append(f"{where} {unraisable.object!r}: {unraisable.exc_value!r}")

    previous = sys.unraisablehook
    sys.unraisablehook = unraisable_hook
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gc.collect()
    finally:
        sys.unraisablehook = previous
    problems.extend(f"{w.category.__name__}: {w.message}" for w in caught)
    return problems


# -- the command line and the docs ----------------------------------------------------

#: Bound on one ``pgsd`` command run by a test.
CLI_TIMEOUT = 120
CONFIG_GUIDE = Path(__file__).resolve().parent.parent / "docs" / "guides" / "configuration.md"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without libpq variables or PGSD_CONFIG, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PGSD_"))}
    env.update(extra)
    return env


def run_pgsd(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m pgsd ARGS`` in ``cwd``, its output captured (default env: `clean_env`)."""
    return subprocess.run(
        [sys.executable, "-m", "pgsd", *args],
        cwd=cwd,
        env=env if env is not None else clean_env(),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


def config_guide_example() -> str:
    """The configuration guide's TOML example of a file (the one with a per-database pool)."""
    blocks = re.findall(r"```toml\n(.*?)```", CONFIG_GUIDE.read_text(), re.DOTALL)
    [example] = [block for block in blocks if "[databases.target.pool]" in block]
    return str(example)


def check_document_errors(document: object, schema: str = "pgsd-check") -> list[str]:
    """What in ``document`` its published JSON Schema (``docs/SCHEMA.schema.json``) refuses."""
    path = CONFIG_GUIDE.parent.parent / f"{schema}.schema.json"
    validator = jsonschema.Draft202012Validator(json.loads(path.read_text()))
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]
