"""Load-test pgsd with Locust: ``locust -f loadtest/`` (web UI, headless, distributed).

Locust users are greenlets; pgsd runs on asyncio or trio. gevent's
monkey-patching leaves neither usable in this process, so each Locust
process that runs users (a standalone one, or each worker; never the
master) starts a pgsd server process without gevent (``_server.py``) and
the users send it requests over a Unix socket, one connection per user.

Reported to Locust's statistics:

* ``pgsd <op>``: each operation (point_read, write_tx, slow, burst), timed in
  the server process from before the acquire to after the release;
* ``pool wait``: every acquire's wait for a connection;
* ``pool timeout``: every PoolTimeout (a failure; the operation it cut short
  is not counted again under its own name).

Names get a `` (fault window)`` suffix when the operation overlapped the
deliberate fault (``--pgsd-fault``), so a check can tell the two apart.
"""

from __future__ import annotations

import atexit
import json
import logging
import re
import time
from typing import Any, Final

from flask import Response, request
from locust import User, constant, events, task
from locust.argument_parser import LocustArgumentParser
from locust.env import Environment
from locust.runners import MasterRunner, Runner, WorkerRunner
from locust.web import WebUI

from _client import START_TIMEOUT, ServerOptions, ServerProcess, ServerStartError
from _poolview import COLUMNS, FAULT_SUFFIX, format_table, pool_row, total_row
from _wire import ChannelClosed, ProtocolError

logger = logging.getLogger("pgsd.loadtest")

_TAB: Final = "pgsd-pool"
_REQUEST_TYPE: Final = "pgsd"
_POOL_TYPE: Final = "pool"
# Operations still running when the users stop end within the acquire
# timeout plus the slowest operation; this covers the latter.
_SETTLE_MARGIN: Final = 5.0
# A master waits 0.5 s for its workers' final reports: a worker settles
# for less, so that its report arrives.
_WORKER_SETTLE: Final = 0.3
_SETTLE_POLL: Final = 0.05


# -- options -------------------------------------------------------------------


@events.init_command_line_parser.add_listener
def _add_options(parser: LocustArgumentParser, **_kwargs: Any) -> None:
    # The server process starts with the Locust process, so these cannot
    # change from the web UI's start form.
    def option(name: str, **kwargs: Any) -> None:
        parser.add_argument(name, include_in_web_ui=False, **kwargs)

    option("--pgsd-backend", choices=("asyncio", "trio"), default="asyncio", help="event loop")
    option("--pgsd-dsn", help="the database to load (default: an embedded throwaway server)")
    option("--pgsd-config", help="a pgsd TOML file; its first database, or --pgsd-db")
    option("--pgsd-db", help="the database of --pgsd-config to load")
    option("--pgsd-pool-size", type=int, help="max_size (default 5; with a config, the file's)")
    option("--pgsd-acquire-timeout", type=float, help="seconds (default 5; or the file's)")
    option("--pgsd-burst-size", type=int, default=10, help="reads per burst (default 10)")
    option("--pgsd-fault", choices=("none", "restart", "blackhole"), default="none")
    option("--pgsd-fault-at", type=float, default=10.0, help="seconds into the run (default 10)")
    option("--pgsd-fault-duration", type=float, default=3.0, help="seconds (default 3)")


def server_options(parsed: Any) -> ServerOptions:
    """The server process's settings from Locust's parsed options.

    Raises:
        ValueError: options that contradict each other or are out of range.
    """
    if parsed.pgsd_dsn and parsed.pgsd_config:
        raise ValueError("--pgsd-dsn and --pgsd-config exclude each other")
    if parsed.pgsd_db and not parsed.pgsd_config:
        raise ValueError("--pgsd-db names a database of --pgsd-config")
    if parsed.pgsd_fault == "restart" and (parsed.pgsd_dsn or parsed.pgsd_config):
        raise ValueError(
            "--pgsd-fault restart restarts the embedded server only: the harness"
            " never restarts a server it did not start (use blackhole, or no --pgsd-dsn)"
        )
    if parsed.pgsd_pool_size is not None and parsed.pgsd_pool_size < 1:
        raise ValueError("--pgsd-pool-size must be at least 1")
    if parsed.pgsd_acquire_timeout is not None and parsed.pgsd_acquire_timeout <= 0:
        raise ValueError("--pgsd-acquire-timeout must be positive")
    if parsed.pgsd_fault_at < 0 or parsed.pgsd_fault_duration < 0:
        raise ValueError("--pgsd-fault-at and --pgsd-fault-duration must not be negative")
    if not 1 <= parsed.pgsd_burst_size <= 1000:
        raise ValueError("--pgsd-burst-size must be from 1 to 1000")
    return ServerOptions(
        backend=parsed.pgsd_backend,
        dsn=parsed.pgsd_dsn,
        config=parsed.pgsd_config,
        db=parsed.pgsd_db,
        pool_size=parsed.pgsd_pool_size,
        acquire_timeout=parsed.pgsd_acquire_timeout,
        fault=parsed.pgsd_fault,
        fault_at=parsed.pgsd_fault_at,
        fault_duration=parsed.pgsd_fault_duration,
    )


# -- this process's share of the harness ---------------------------------------


class Harness:
    """The server process this Locust process runs, and the pool statistics it shows."""

    def __init__(self) -> None:
        self.server: ServerProcess | None = None
        self.burst_size = 10
        #: The pool's acquire timeout, as the server process reports it.
        self.acquire_timeout = 5.0
        #: Seconds a user waits for one reply before giving up on it.
        self.request_timeout = 60.0
        self.is_master = False
        self.is_worker = False
        #: ``--csv PREFIX``: the final report goes to ``PREFIX_pgsd.json`` too.
        self.csv_prefix: str | None = None
        self._own_stats: dict[str, Any] | None = None
        #: On a master: the last stats reply of each worker's server process.
        self.worker_stats: dict[str, dict[str, Any]] = {}

    def start(self, options: ServerOptions) -> None:
        """Start the server process (not on a master).

        Raises:
            ServerStartError: it did not start.
        """
        self.server = ServerProcess(options)
        # A worker keeps talking to its master meanwhile: this waits cooperatively.
        info = self.server.start()
        self.acquire_timeout = float(info["acquire_timeout"])
        self.request_timeout = 60.0 + 4 * self.acquire_timeout + options.fault_duration
        logger.info(
            "pgsd server process %s: %s on %s, %s; pool of %s, acquire timeout %g s",
            info["pid"],
            info["backend"],
            info["target"],
            info["server_version"],
            info["max_size"],
            info["acquire_timeout"],
        )

    def stop(self) -> None:
        """Stop the server process, if any (idempotent)."""
        server, self.server = self.server, None
        if server is not None:
            code = server.stop()
            if code:
                logger.warning("the pgsd server process exited with status %s", code)

    def own_stats(self) -> dict[str, Any] | None:
        """The server process's stats reply, or the last one it gave."""
        server = self.server
        if server is None or not server.wait_ready(0):
            return self._own_stats
        try:
            reply = server.control({"op": "stats"})
        except (ChannelClosed, ProtocolError, OSError) as exc:
            logger.warning("no pool statistics from the pgsd server process: %s", exc)
        else:
            self._own_stats = reply
        return self._own_stats

    def settle(self, limit: float) -> None:
        """Wait up to ``limit`` seconds for the operations stopped users left running.

        The final statistics then show every connection back in the pool.
        """
        deadline = time.monotonic() + limit
        while self.server is not None:
            stats = self.own_stats()
            if stats is None or (stats["pool"]["in_use"] == 0 and stats["pool"]["waiting"] == 0):
                return
            if time.monotonic() >= deadline:
                return
            time.sleep(_SETTLE_POLL)  # gevent's sleep: the hub keeps running

    def replies(self) -> dict[str, dict[str, Any]]:
        """Stats replies by process: this one's, or on a master every worker's."""
        if self.is_master:
            return dict(sorted(self.worker_stats.items()))
        own = self.own_stats()
        return {"local": own} if own is not None else {}

    def rows(self) -> list[dict[str, Any]]:
        """Pool statistics table rows, with a total when several processes report."""
        rows = [pool_row(process, reply) for process, reply in self.replies().items()]
        if len(rows) > 1:
            rows.append(total_row(rows))
        return rows

    def arm_fault(self) -> None:
        """Start the fault's clock in the server process."""
        if self.server is not None and self.server.options.fault != "none":
            self.server.control({"op": "fault"})


HARNESS = Harness()
atexit.register(HARNESS.stop)


# -- Locust events ---------------------------------------------------------------


@events.init.add_listener
def _on_init(environment: Environment, runner: Runner, web_ui: WebUI | None, **_kw: Any) -> None:
    parsed = environment.parsed_options
    assert parsed is not None  # always set when run by the locust command
    try:
        options = server_options(parsed)
    except ValueError as exc:
        raise SystemExit(f"pgsd: {exc}") from None
    HARNESS.burst_size = parsed.pgsd_burst_size
    HARNESS.is_master = isinstance(runner, MasterRunner)
    HARNESS.is_worker = isinstance(runner, WorkerRunner)
    HARNESS.csv_prefix = parsed.csv_prefix
    if web_ui is not None:
        _extend_web_ui(web_ui, (parsed.web_base_path or "").rstrip("/"))
    if HARNESS.is_master:
        return  # the workers run the users, and the server processes
    try:
        HARNESS.start(options)
    except ServerStartError as exc:
        raise SystemExit(f"pgsd: {exc}") from None


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_kw: Any) -> None:
    HARNESS.arm_fault()


@events.test_stop.add_listener
def _on_test_stop(environment: Environment, **_kw: Any) -> None:
    if HARNESS.is_worker:
        HARNESS.settle(_WORKER_SETTLE)
    else:
        HARNESS.settle(HARNESS.acquire_timeout + _SETTLE_MARGIN)


@events.report_to_master.add_listener
def _on_report_to_master(client_id: str, data: dict[str, Any], **_kw: Any) -> None:
    stats = HARNESS.own_stats()
    if stats is not None:
        data["pgsd_pool"] = stats


@events.worker_report.add_listener
def _on_worker_report(client_id: str, data: dict[str, Any], **_kw: Any) -> None:
    stats = data.get("pgsd_pool")
    if stats is not None:
        HARNESS.worker_stats[client_id] = stats


@events.quit.add_listener
def _on_quit(exit_code: int, **_kw: Any) -> None:
    try:
        if not HARNESS.is_worker:
            _final_report()
    finally:
        HARNESS.stop()


def _final_report() -> None:
    """Print the pool statistics; with ``--csv PREFIX`` also write ``PREFIX_pgsd.json``."""
    replies = HARNESS.replies()
    rows = HARNESS.rows()
    print(f"\npgsd pool statistics\n{format_table(rows)}\n", flush=True)
    if HARNESS.csv_prefix:
        with open(f"{HARNESS.csv_prefix}_pgsd.json", "w", encoding="utf-8") as file:
            json.dump({"processes": replies, "rows": rows}, file, indent=2)


# -- the web UI: a "pgsd pool" tab and /pgsd/pool ----------------------------------


def _extend_web_ui(web_ui: WebUI, base_path: str) -> None:
    app = web_ui.app
    assert app is not None  # created with the WebUI
    web_ui.template_args["extended_tabs"] = [{"title": "pgsd pool", "key": _TAB}]
    web_ui.template_args["extended_tables"] = [
        {"key": _TAB, "structure": [{"key": key, "title": title} for key, title in COLUMNS]}
    ]
    web_ui.template_args["extended_csv_files"] = [
        {"href": "./pgsd/pool", "title": "Download pgsd pool statistics (JSON)"}
    ]

    @app.after_request
    def _add_pool_rows(response: Response) -> Response:
        # The UI polls /stats/requests; the tab's rows ride along with it.
        if not request.path.endswith("/stats/requests") or not response.is_json:
            return response
        data = response.get_json()
        data["extended_stats"] = [{"key": _TAB, "data": HARNESS.rows()}]
        response.set_data(json.dumps(data))
        return response

    @app.route(f"{base_path}/pgsd/pool")
    @web_ui.auth_required_if_enabled
    def _pool_json() -> dict[str, Any]:
        return {"processes": HARNESS.replies(), "rows": HARNESS.rows()}


# -- the user ----------------------------------------------------------------------


class PgsdOperationError(Exception):
    """An operation failed in the pgsd server process (its kind and message)."""


class PgsdPoolTimeout(PgsdOperationError):
    """pgsd.PoolTimeout: no connection within the acquire timeout."""


# Process ids and durations in messages would make one failure row per value.
_VARYING: Final = re.compile(r"pid \d+|\d+(\.\d+)? m?s\b")


def _failure_text(kind: str, message: str | None) -> str:
    """A failure's text, without the details that would split one error into many rows."""
    text = (message or "").splitlines()[0] if message else ""
    if kind == "PoolTimeout":
        # "pool 'x' (...): no connection within 5 s waiting ...; state up, size 5/5, ..."
        head, _, rest = text.partition(";")
        state = re.search(r"state (\w+)", rest)
        return f"{head}; pool {state.group(1)}" if state else head
    return f"{kind}: {_VARYING.sub('...', text)}"


class PgsdUser(User):
    """Borrows pgsd connections as fast as it can, through the server process.

    Task weights: point reads 10, write transactions 3, slow queries (200 ms,
    to drive the pool into exhaustion) 1, bursts of concurrent reads 1.
    """

    wait_time = constant(0)

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self._channel: Any = None

    def on_start(self) -> None:
        server = HARNESS.server
        if server is None or not server.wait_ready(START_TIMEOUT):
            raise RuntimeError("the pgsd server process is not running")

    def on_stop(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    @task(10)
    def point_read(self) -> None:
        self._call({"op": "point_read"})

    @task(3)
    def write_tx(self) -> None:
        self._call({"op": "write_tx"})

    @task(1)
    def slow(self) -> None:
        self._call({"op": "slow"})

    @task(1)
    def burst(self) -> None:
        self._call({"op": "burst", "size": HARNESS.burst_size})

    def _call(self, message: dict[str, Any]) -> None:
        try:
            if self._channel is None:
                assert HARNESS.server is not None
                self._channel = HARNESS.server.channel(HARNESS.request_timeout)
            reply = self._channel.request(message)
        except (ChannelClosed, ProtocolError, OSError) as exc:
            # The channel closed itself; the next call opens a new one.
            self._channel = None
            self._fire(_REQUEST_TYPE, message["op"], 0.0, PgsdOperationError(f"harness: {exc}"))
            return
        self._report(message["op"], reply)

    def _report(self, op: str, reply: dict[str, Any]) -> None:
        suffix = FAULT_SUFFIX if reply.get("fault") else ""
        latency_ms = reply["latency"] * 1000
        for wait in reply["waits"]:
            self._fire(_POOL_TYPE, "wait" + suffix, wait * 1000)
        error, message = reply["error"], reply["message"]
        timeout_text = (
            _failure_text("PoolTimeout", message)
            if error == "PoolTimeout"
            else "PoolTimeout in a burst that also met another error"
        )
        for _ in range(reply["timeouts"]):
            self._fire(_POOL_TYPE, "timeout" + suffix, latency_ms, PgsdPoolTimeout(timeout_text))
        if error == "PoolTimeout":
            return  # counted under "pool timeout" alone
        failure = None if error is None else PgsdOperationError(_failure_text(error, message))
        self._fire(_REQUEST_TYPE, op + suffix, latency_ms, failure)

    def _fire(
        self, request_type: str, name: str, ms: float, exception: Exception | None = None
    ) -> None:
        self.environment.events.request.fire(
            request_type=request_type,
            name=name,
            response_time=ms,
            response_length=0,
            exception=exception,
            context={},
        )
