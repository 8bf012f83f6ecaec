"""The Locust harness (loadtest/): framing, checker, operations, server process, headless runs.

Locust itself is never imported here: importing it monkey-patches this
process with gevent, after which trio cannot run. Locust runs in
subprocesses; the harness's own modules (which never import gevent) are
imported from loadtest/.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

import pgsd
from pgsd.testing import FaultProxy, PostgresServer

LOADTEST = Path(__file__).resolve().parents[1] / "loadtest"
if str(LOADTEST) not in sys.path:
    sys.path.insert(0, str(LOADTEST))

import _check_csv  # noqa: E402
import _poolview  # noqa: E402
import _smoke  # noqa: E402
import _wire  # noqa: E402
from _client import ServerOptions, ServerProcess, ServerStartError  # noqa: E402
from _fault import FaultSchedule  # noqa: E402
from _operations import Operations, prepare_table  # noqa: E402

LOCUST = Path(sys.executable).with_name("locust")
#: Scheduling delay a deadline may see on a loaded machine (seconds).
MARGIN = 0.25
#: A server process closes its pool (close_timeout 5 s) and exits within this.
EXIT_BOUND = 15.0

_names = itertools.count()


def unique_name() -> str:
    return f"pgsd_loadtest_{os.getpid()}_{next(_names)}"


# -- framing --------------------------------------------------------------------


def test_frames_decode_whatever_the_chunking() -> None:
    messages = [{"op": "point_read"}, {"ok": True, "waits": [0.5, 1e-6], "text": "é"}]
    data = b"".join(_wire.encode(m) for m in messages)
    decoder = _wire.FrameDecoder()
    received = []
    for i in range(len(data)):
        decoder.feed(data[i : i + 1])
        message = decoder.next_message()
        if message is not None:
            received.append(message)
    assert received == messages
    assert not decoder.pending


def test_several_frames_in_one_chunk_come_out_in_order() -> None:
    decoder = _wire.FrameDecoder()
    decoder.feed(_wire.encode({"n": 1}) + _wire.encode({"n": 2}) + _wire.encode({"n": 3})[:5])
    assert decoder.next_message() == {"n": 1}
    assert decoder.next_message() == {"n": 2}
    assert decoder.next_message() is None
    assert decoder.pending


def test_a_frame_announcing_more_than_the_limit_is_refused() -> None:
    decoder = _wire.FrameDecoder()
    decoder.feed((_wire.MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(_wire.ProtocolError, match="exceeds"):
        decoder.next_message()


@pytest.mark.parametrize("payload", [b"[1, 2]", b"not json", b"\xff\xfe"])
def test_a_frame_must_hold_a_json_object(payload: bytes) -> None:
    decoder = _wire.FrameDecoder()
    decoder.feed(len(payload).to_bytes(4, "big") + payload)
    with pytest.raises(_wire.ProtocolError):
        decoder.next_message()


def test_encoding_a_message_over_the_limit_is_refused() -> None:
    with pytest.raises(_wire.ProtocolError, match="exceeds"):
        _wire.encode({"blob": "x" * _wire.MAX_FRAME})


def _serve_once(listener: socket.socket, reply: bytes) -> None:
    """Accept one connection, read one request, send ``reply`` and close."""
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(10)
        conn.recv(65536)
        conn.sendall(reply)


@pytest.mark.parametrize(
    ("reply", "error"),
    [(b"", _wire.ChannelClosed), (_wire.encode({"ok": True})[:6], _wire.ChannelClosed)],
)
def test_channel_raises_when_the_peer_closes_before_a_whole_reply(
    tmp_path: Path, reply: bytes, error: type[Exception]
) -> None:
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        peer = threading.Thread(target=_serve_once, args=(listener, reply))
        peer.start()
        try:
            with _wire.Channel(path, 10.0) as channel, pytest.raises(error):
                channel.request({"op": "noop"})
        finally:
            peer.join(10)
    assert not peer.is_alive()


# -- the CSV checker ---------------------------------------------------------------


def stats_row(
    kind: str, name: str, count: int, failures: int = 0, p95: float = 10
) -> dict[str, str]:
    return {
        "Type": kind,
        "Name": name,
        "Request Count": str(count),
        "Failure Count": str(failures),
        "95%": str(p95),
    }


def report(fault: dict[str, Any] | None = None, processes: int = 1) -> dict[str, Any]:
    fault = fault or {"mode": "none"}
    return {"processes": {f"p{i}": {"fault": fault} for i in range(processes)}}


HAPPENED = {"mode": "restart", "offset": 8.0, "length": 1.2, "error": None}
NOT_HAPPENED = {"mode": "blackhole", "offset": None, "length": None, "armed": True}


def clean_run(p95: float = 10) -> list[dict[str, str]]:
    return [
        stats_row("pgsd", "point_read", 100, p95=p95),
        stats_row("pool", "wait", 100),
        stats_row("", "Aggregated", 200),
    ]


def test_checker_passes_a_clean_run() -> None:
    verdict = _check_csv.check(clean_run(), report())
    assert verdict.ok, verdict.problems
    assert verdict.requests == 200
    assert verdict.point_read_p95_ms == 10


def test_checker_fails_a_run_without_requests() -> None:
    stats = [stats_row("", "Aggregated", 0)]
    verdict = _check_csv.check(stats, report())
    assert "no request ran" in verdict.problems
    assert "no point read ran" in verdict.problems


def test_checker_fails_failures_outside_the_fault_window() -> None:
    stats = [*clean_run(), stats_row("pool", "timeout", 3, failures=3)]
    verdict = _check_csv.check(stats, report(HAPPENED))
    assert not verdict.ok
    assert verdict.failures_outside == 3


def test_checker_accepts_failures_inside_a_fault_window_that_happened() -> None:
    suffix = _poolview.FAULT_SUFFIX
    stats = [*clean_run(), stats_row("pool", "timeout" + suffix, 7, failures=7)]
    verdict = _check_csv.check(stats, report(HAPPENED), expect_fault=True)
    assert verdict.ok, verdict.problems
    assert verdict.failures_inside == 7


def test_checker_fails_fault_window_failures_when_no_fault_happened() -> None:
    suffix = _poolview.FAULT_SUFFIX
    stats = [*clean_run(), stats_row("pgsd", "slow" + suffix, 2, failures=2)]
    verdict = _check_csv.check(stats, report(NOT_HAPPENED))
    assert not verdict.ok


def test_checker_fails_an_expected_fault_that_did_not_happen() -> None:
    verdict = _check_csv.check(clean_run(), report(NOT_HAPPENED), expect_fault=True)
    assert "a fault was expected, and none happened" in verdict.problems


def test_checker_fails_a_point_read_p95_over_the_bound() -> None:
    verdict = _check_csv.check(clean_run(p95=2000), report(), p95_bound_ms=1500)
    assert not verdict.ok
    assert "exceeds 1500 ms" in verdict.problems[0]


def test_checker_counts_the_server_processes_that_reported() -> None:
    assert _check_csv.check(clean_run(), report(processes=2), processes=2).ok
    assert not _check_csv.check(clean_run(), report(processes=1), processes=2).ok


def test_checker_command_reads_the_files_and_sets_its_status(tmp_path: Path) -> None:
    prefix = tmp_path / "run"
    header = "Type,Name,Request Count,Failure Count,95%\n"
    Path(f"{prefix}_stats.csv").write_text(header + "pgsd,point_read,5,0,12\n,Aggregated,5,0,12\n")
    Path(f"{prefix}_pgsd.json").write_text(json.dumps(report()))
    assert _check_csv.main([str(prefix)]) == 0
    Path(f"{prefix}_stats.csv").write_text(header + "pgsd,point_read,5,1,12\n,Aggregated,5,1,12\n")
    assert _check_csv.main([str(prefix)]) == 1
    assert _check_csv.main([str(tmp_path / "missing")]) == 2


def test_pool_rows_total_weights_the_average_wait_by_acquires() -> None:
    def reply(acquires: int, wait_total: float) -> dict[str, Any]:
        pool = dict.fromkeys(("size", "idle", "in_use", "waiting", "timeouts", "errors"), 1)
        pool.update(connections_lost=0, reconnect_attempts=0, state="up")
        pool.update(acquires=acquires, wait_time_total=wait_total, wait_time_max=0.5)
        return {"backend": "trio", "pool": pool, "fault": {"mode": "none"}}

    rows = [_poolview.pool_row("a", reply(100, 1.0)), _poolview.pool_row("b", reply(300, 9.0))]
    assert rows[0]["wait_avg_ms"] == 10.0
    total = _poolview.total_row(rows)
    assert total["acquires"] == 400
    assert total["wait_avg_ms"] == 25.0
    assert total["size"] == 2
    assert "total" in _poolview.format_table([*rows, total]).splitlines()[-1]


def test_restart_fault_needs_a_server_the_process_owns() -> None:
    with pytest.raises(ValueError, match="embedded server"):
        FaultSchedule("restart", at=1, duration=1, server=None)


# -- operations, in process, on both event loops ------------------------------------


@contextlib.asynccontextmanager
async def operations(
    config: pgsd.DatabaseConfig, fault: FaultSchedule | None = None, **pool: Any
) -> AsyncIterator[tuple[Operations, pgsd.DatabaseConnector]]:
    connector_config = pgsd.ConnectorConfig(databases={"db": config}, pool=pgsd.PoolConfig(**pool))
    async with pgsd.DatabaseConnector(connector_config) as connector:
        await prepare_table(connector, "db", 50)
        async with anyio.create_task_group() as tg:
            yield (
                Operations(
                    connector=connector,
                    database="db",
                    rows=50,
                    fault=fault or FaultSchedule("none", at=0, duration=0),
                    task_group=tg,
                    info={"backend": "test"},
                ),
                connector,
            )
            tg.cancel_scope.cancel()


def config_for(server: PostgresServer, **overrides: Any) -> pgsd.DatabaseConfig:
    overrides.setdefault("application_name", unique_name())
    return pgsd.DatabaseConfig.from_dsn(server.dsn(), **overrides)


@pytest.mark.anyio
async def test_each_load_operation_reports_latency_and_waits(pg_server: PostgresServer) -> None:
    async with operations(config_for(pg_server), max_size=3) as (ops, _):
        replies = {op: await ops.run({"op": op}) for op in ("point_read", "write_tx", "slow")}
        replies["burst"] = await ops.run({"op": "burst", "size": 4})
    for op, reply in replies.items():
        assert reply["ok"], reply
        assert reply["error"] is None
        assert reply["timeouts"] == 0
        assert reply["fault"] is False
        assert reply["latency"] >= max(reply["waits"]), op
    assert [len(replies[op]["waits"]) for op in replies] == [1, 1, 1, 4]
    assert replies["slow"]["latency"] >= 0.2


@pytest.mark.anyio
async def test_pool_timeout_is_reported_as_its_own_kind(pg_server: PostgresServer) -> None:
    timeout = 0.2
    config = config_for(pg_server)
    async with operations(config, max_size=1, acquire_timeout=timeout) as (ops, connector):
        async with connector.get_connection("db"):
            reply = await ops.run({"op": "point_read"})
            burst = await ops.run({"op": "burst", "size": 3})
        stats = await ops.run({"op": "stats"})
    assert reply["error"] == "PoolTimeout"
    assert reply["timeouts"] == 1
    assert reply["waits"] == []
    assert timeout <= reply["latency"] <= timeout + MARGIN
    assert (burst["error"], burst["timeouts"]) == ("PoolTimeout", 3)
    assert stats["pool"]["timeouts"] == 4


@pytest.mark.anyio
async def test_other_errors_are_named_by_their_class(pg_server: PostgresServer) -> None:
    async with operations(config_for(pg_server)) as (ops, _):
        bad_size = await ops.run({"op": "burst", "size": 0})
        unknown = await ops.run({"op": "drop_everything"})
    assert (bad_size["ok"], bad_size["error"], bad_size["timeouts"]) == (False, "ValueError", 0)
    assert (unknown["ok"], unknown["error"]) == (False, "BadRequest")


async def wait_for_window(fault: FaultSchedule, *, ended: bool) -> tuple[float, float | None]:
    """Poll the schedule until its window began (or ended), bounded in time."""
    with anyio.fail_after(10):
        while True:
            window = fault.window
            if window is not None and (window[1] is not None or not ended):
                return window
            await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_blackhole_window_tags_the_operations_it_overlaps(pg_server: PostgresServer) -> None:
    duration = 0.5
    async with FaultProxy(pg_server.host, pg_server.port) as proxy:
        config = config_for(pg_server, **proxy.dsn_params())
        fault = FaultSchedule("blackhole", at=0, duration=duration, proxy=proxy)
        async with operations(config, fault) as (ops, _):
            before = await ops.run({"op": "point_read"})
            await ops.run({"op": "fault"})
            await wait_for_window(fault, ended=False)
            during = await ops.run({"op": "point_read"})
            start, end = await wait_for_window(fault, ended=True)
            after = await ops.run({"op": "point_read"})
            described = (await ops.run({"op": "stats"}))["fault"]
    assert (before["fault"], during["fault"], after["fault"]) == (False, True, False)
    assert during["ok"]  # held back by the black hole, then served
    assert end is not None
    assert duration <= end - start <= duration + MARGIN
    assert described["mode"] == "blackhole"
    assert described["length"] == pytest.approx(end - start)
    assert fault.overlaps(start - 2, start - 1) is False
    assert fault.overlaps(start - 1, start) is True
    assert fault.overlaps(end + 1, end + 2) is False


# -- the server process --------------------------------------------------------------


def is_running(pid: int) -> bool:
    return _smoke.is_running(pid)


def wait_exited(pid: int, bound: float = EXIT_BOUND) -> None:
    """Poll until ``pid`` is gone, bounded in time."""
    deadline = time.monotonic() + bound
    while is_running(pid):
        assert time.monotonic() < deadline, f"process {pid} still runs after {bound} s"
        time.sleep(0.05)


def harness_connections(server: PostgresServer, application_name: str) -> int:
    rows = server.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", [application_name]
    )
    return int(rows[0][0])


def wait_no_connections(server: PostgresServer, application_name: str) -> None:
    """Backends exit just after their client closes: poll, bounded in count."""
    for _ in range(500):
        if harness_connections(server, application_name) == 0:
            return
    raise AssertionError(f"server connections of {application_name} did not go away")


@pytest.fixture
def app_dsn(pg_server: PostgresServer) -> Iterator[tuple[str, str]]:
    """A DSN to the session's server, with an application_name of its own."""
    name = unique_name()
    yield pg_server.dsn(application_name=name), name
    wait_no_connections(pg_server, name)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_server_process_runs_without_gevent_and_stops_clean(
    app_dsn: tuple[str, str], backend: str
) -> None:
    dsn, _ = app_dsn
    process = ServerProcess(ServerOptions(backend=backend, dsn=dsn))
    info = process.start()
    socket_dir = Path(process.socket_path).parent
    try:
        assert info["gevent"] is False
        assert info["backend"] == backend
        with process.channel(10.0) as channel:
            assert channel.request({"op": "noop"}) == {"ok": True}
            reply = channel.request({"op": "point_read"})
        assert reply["ok"], reply
        assert process.control({"op": "stats"})["pool"]["acquires"] >= 2
    finally:
        code = process.stop()
    assert code == 0
    assert not is_running(info["pid"])
    assert not socket_dir.exists()


def test_server_process_loads_a_config_files_database_with_its_pool_settings(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    name = unique_name()
    config = tmp_path / "pgsd.toml"
    config.write_text(
        "[pool]\nmax_size = 3\nacquire_timeout = 7\n"
        f'[databases.first]\ndsn = "{pg_server.dsn(application_name="unused")}"\n'
        f'[databases.second]\ndsn = "{pg_server.dsn(application_name=name)}"\n'
    )
    process = ServerProcess(ServerOptions(config=str(config), db="second"))
    info = process.start()
    try:
        assert "database 'second'" in info["target"]
        assert (info["max_size"], info["acquire_timeout"]) == (3, 7)
        assert harness_connections(pg_server, name) >= 1
    finally:
        assert process.stop() == 0
    wait_no_connections(pg_server, name)
    overridden = ServerProcess(ServerOptions(config=str(config), pool_size=2, acquire_timeout=1))
    info = overridden.start()
    overridden.stop()
    assert "database 'first'" in info["target"]
    assert (info["max_size"], info["acquire_timeout"]) == (2, 1)


def read_line(stream: Any, timeout: float) -> str:
    """One line from a pipe, waiting at most ``timeout`` seconds."""
    readable, _, _ = select.select([stream], [], [], timeout)
    assert readable, f"no line within {timeout} s"
    return str(stream.readline().decode())


def test_server_process_exits_when_its_parent_dies(app_dsn: tuple[str, str]) -> None:
    dsn, _ = app_dsn
    parent_code = (
        f"import json, sys; sys.path.insert(0, {str(LOADTEST)!r})\n"
        "from _client import ServerOptions, ServerProcess\n"
        f"process = ServerProcess(ServerOptions(dsn={dsn!r}))\n"
        "info = process.start()\n"
        "print(json.dumps([info['pid'], process.socket_path]), flush=True)\n"
        "sys.stdin.read()  # until killed\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        pid, path = json.loads(read_line(parent.stdout, 120))
        assert is_running(pid)
    finally:
        parent.kill()
        parent.wait(30)
        assert parent.stdin is not None
        assert parent.stdout is not None
        parent.stdin.close()
        parent.stdout.close()
    wait_exited(pid)
    # The parent died before it could remove the socket's directory.
    socket_dir = Path(path).parent
    assert not Path(path).exists()  # the server process removes its socket
    socket_dir.rmdir()


def test_server_process_on_sigterm_removes_its_embedded_server() -> None:
    process = ServerProcess(ServerOptions(backend="trio"))
    info = process.start()
    try:
        assert info["target"].startswith("embedded PostgreSQL")
        port = int(info["target"].rsplit(":", 1)[1])
        os.kill(info["pid"], signal.SIGTERM)
        wait_exited(info["pid"])
    finally:
        code = process.stop()
    assert code == 0
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(host="127.0.0.1", port=port, user="postgres", connect_timeout=2).close()


def test_restart_fault_is_refused_for_a_server_the_process_does_not_own(
    app_dsn: tuple[str, str],
) -> None:
    dsn, _ = app_dsn
    process = ServerProcess(ServerOptions(dsn=dsn, fault="restart"))
    with pytest.raises(ServerStartError, match="embedded server"):
        process.start()
    assert process.pid is None


def test_server_processes_sharing_a_new_database_create_its_table_once(
    pg_server: PostgresServer,
) -> None:
    dbname = unique_name()
    pg_server.create_database(dbname)
    name = unique_name()
    dsn = pg_server.dsn(dbname, application_name=name)
    processes = [ServerProcess(ServerOptions(dsn=dsn)) for _ in range(2)]
    errors: list[BaseException] = []

    def start(process: ServerProcess) -> None:
        try:
            process.start()
        except BaseException as exc:  # noqa: ASYNC103, ASYNC104 (a thread, not a task)
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(p,)) for p in processes]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not any(thread.is_alive() for thread in threads)
        assert errors == []
        rows = pg_server.execute("SELECT count(*) FROM loadtest_items", dbname=dbname)
        assert rows == [(1000,)]
    finally:
        for process in processes:
            process.stop()
    wait_no_connections(pg_server, name)


# -- Locust, headless, in a subprocess -------------------------------------------------


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_headless_locust_run_has_requests_no_failures_and_leaves_nothing(
    app_dsn: tuple[str, str], backend: str, tmp_path: Path
) -> None:
    dsn, _ = app_dsn
    prefix = tmp_path / backend
    command = _smoke.locust_command(
        users=5,
        spawn_rate=5,
        run_time=5,
        csv=prefix,
        extra=[f"--pgsd-backend={backend}", f"--pgsd-dsn={dsn}"],
    )
    log = tmp_path / "locust.log"
    with log.open("wb") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=90).returncode
    output = log.read_text()
    assert code == 0, output
    pids = _smoke.server_pids(log)
    assert len(pids) == 1, output
    assert _smoke.leftover_servers([log]) == []
    stats = _check_csv.read_rows(Path(f"{prefix}_stats.csv"))
    pool_report = json.loads(Path(f"{prefix}_pgsd.json").read_text())
    verdict = _check_csv.check(stats, pool_report, p95_bound_ms=float("inf"))
    assert verdict.ok, (verdict.problems, output)
    assert verdict.requests > 0
    assert verdict.failures_outside == verdict.failures_inside == 0
    (process,) = pool_report["processes"].values()
    assert process["backend"] == backend
    assert process["pool"]["acquires"] > 0
    assert "pgsd pool statistics" in output


def test_locust_refuses_a_restart_fault_on_a_server_it_does_not_own(
    app_dsn: tuple[str, str],
) -> None:
    dsn, _ = app_dsn
    command = _smoke.locust_command(
        users=1,
        spawn_rate=1,
        run_time=1,
        extra=[f"--pgsd-dsn={dsn}", "--pgsd-fault=restart"],
    )
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "restarts the embedded server only" in result.stderr
    assert _smoke.server_pids_in(result.stdout + result.stderr) == []
