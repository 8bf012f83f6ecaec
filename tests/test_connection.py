"""The connection layer on asyncio and trio: psycopg's features, bounded cancellation."""

from __future__ import annotations

import contextlib
import inspect
import os
import signal
import socket
from collections.abc import Iterator
from typing import Any

import anyio
import psycopg
import pytest
from psycopg.rows import dict_row

import pgsd
from parity import assert_same
from pgsd.testing import PostgresServer, free_port
from support import CancelWhenRunning

pytestmark = pytest.mark.anyio

#: A query that runs until it is cancelled.
SLEEP = "SELECT pg_sleep(60)"


async def backend_state(pg_server: PostgresServer, pid: int) -> str | None:
    async with await pgsd.connect(pg_server.dsn()) as observer:
        cur = await observer.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", [pid])
        row = await cur.fetchone()
    return row[0] if row else None


@pytest.mark.matrix
async def test_connect_returns_pgsd_connection_in_autocommit(conn: pgsd.Connection) -> None:
    assert isinstance(conn, pgsd.Connection)
    assert isinstance(conn, psycopg.AsyncConnection)
    assert conn.autocommit
    cur = await conn.execute("SELECT 1 + %s", [41])
    assert await cur.fetchone() == (42,)
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


@pytest.mark.matrix
async def test_connect_accepts_database_config(pg_server: PostgresServer) -> None:
    config = pgsd.DatabaseConfig(
        host=pg_server.host, port=pg_server.port, dbname="postgres", user=pg_server.superuser
    )
    async with await pgsd.connect(config) as conn:
        cur = await conn.execute("SELECT current_setting('application_name')")
        assert await cur.fetchone() == ("pgsd",)
    assert conn.closed


@pytest.mark.matrix
async def test_fetch_many_rows_and_types(conn: pgsd.Connection) -> None:
    cur = await conn.execute(
        "SELECT g, g::text, g * 1.5 FROM generate_series(1, 1000) AS s(g) ORDER BY 1"
    )
    first = await cur.fetchmany(10)
    rest = await cur.fetchall()
    assert first[0] == (1, "1", 1.5)
    assert len(first) + len(rest) == 1000
    assert rest[-1][0] == 1000


@pytest.mark.matrix
async def test_transaction_commits_and_rolls_back(conn: pgsd.Connection) -> None:
    await conn.execute("CREATE TEMP TABLE t (x int)")
    async with conn.transaction():
        await conn.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(ZeroDivisionError):
        async with conn.transaction():
            await conn.execute("INSERT INTO t VALUES (2)")
            raise ZeroDivisionError
    cur = await conn.execute("SELECT array_agg(x) FROM t")
    assert await cur.fetchone() == ([1],)
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


async def test_server_side_cursor_streams_rows(conn: pgsd.Connection) -> None:
    async with conn.transaction(), conn.cursor("big") as cur:
        cur.itersize = 100
        await cur.execute("SELECT g FROM generate_series(1, 2500) AS g")
        total = 0
        count = 0
        async for (value,) in cur:
            total += value
            count += 1
    assert count == 2500
    assert total == 2500 * 2501 // 2


async def test_copy_in_and_out(conn: pgsd.Connection) -> None:
    await conn.execute("CREATE TEMP TABLE c (id int, name text)")
    cur = conn.cursor()
    async with cur.copy("COPY c (id, name) FROM STDIN") as copy:
        for i in range(5000):
            await copy.write_row((i, f"name {i}"))
    async with cur.copy("COPY (SELECT id, name FROM c ORDER BY id) TO STDOUT") as copy:
        out = [row async for row in copy.rows()]
    assert len(out) == 5000
    assert out[4999] == ("4999", "name 4999")


async def test_pipeline_mode_batches_queries(conn: pgsd.Connection) -> None:
    async with conn.pipeline():
        cursors = [await conn.execute("SELECT %s::int", [i]) for i in range(50)]
    values = [(await cur.fetchone()) for cur in cursors]
    assert values == [(i,) for i in range(50)]


async def test_executemany(conn: pgsd.Connection) -> None:
    await conn.execute("CREATE TEMP TABLE m (x int)")
    cur = conn.cursor()
    await cur.executemany("INSERT INTO m VALUES (%s)", [(i,) for i in range(200)])
    cur = await conn.execute("SELECT count(*) FROM m")
    assert await cur.fetchone() == (200,)


async def test_notifies_are_received(pg_server: PostgresServer, conn: pgsd.Connection) -> None:
    await conn.execute("LISTEN pgsd_test")
    async with await pgsd.connect(pg_server.dsn()) as sender:
        await sender.execute("NOTIFY pgsd_test, 'hello'")
    received = [n async for n in conn.notifies(timeout=10, stop_after=1)]
    assert [n.payload for n in received] == ["hello"]
    assert received[0].channel == "pgsd_test"


async def test_notifies_timeout_returns_without_messages(conn: pgsd.Connection) -> None:
    await conn.execute("LISTEN pgsd_silent")
    received = [n async for n in conn.notifies(timeout=0.2)]
    assert received == []
    cur = await conn.execute("SELECT 1")
    assert await cur.fetchone() == (1,)


async def test_concurrent_tasks_share_one_connection_serially(conn: pgsd.Connection) -> None:
    results: list[int] = []

    async def query(i: int) -> None:
        cur = await conn.execute("SELECT %s::int, pg_sleep(0.01)", [i])
        row = await cur.fetchone()
        assert row is not None
        results.append(row[0])

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(query, i)
    assert sorted(results) == list(range(20))


@pytest.mark.matrix
async def test_cancelled_query_is_stopped_on_the_server(
    pg_server: PostgresServer, conn: pgsd.Connection
) -> None:
    pid = conn.info.backend_pid
    canceller = CancelWhenRunning(pg_server, pid, SLEEP)
    with canceller.scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(canceller.run)
            await conn.execute(SLEEP)
    elapsed = anyio.current_time() - canceller.cancelled_at
    assert canceller.scope.cancelled_caught
    assert elapsed < conn.cancel_grace + 1.0
    # The connection is idle and usable again; the server query is gone.
    assert not conn.closed
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert await backend_state(pg_server, pid) == "idle"
    cur = await conn.execute("SELECT 7")
    assert await cur.fetchone() == (7,)


async def test_cancelled_query_in_transaction_is_rolled_back(
    pg_server: PostgresServer, conn: pgsd.Connection
) -> None:
    canceller = CancelWhenRunning(pg_server, conn.info.backend_pid, SLEEP)
    with canceller.scope:
        async with conn.transaction(), anyio.create_task_group() as tg:
            tg.start_soon(canceller.run)
            await conn.execute(SLEEP)
    assert canceller.scope.cancelled_caught
    # transaction() rolled back on the way out, shielded from the cancellation.
    assert not conn.closed
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    cur = await conn.execute("SELECT 1")
    assert await cur.fetchone() == (1,)


@pytest.fixture
def stopped_backend() -> Iterator[list[int]]:
    """Pids to SIGSTOP during a test; they are resumed afterwards."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


async def test_cancel_is_bounded_when_the_server_does_not_answer(
    pg_server: PostgresServer, stopped_backend: list[int]
) -> None:
    conn = await pgsd.connect(pg_server.dsn())
    conn.cancel_grace = 0.5
    pid = conn.info.backend_pid
    # A stopped backend neither answers the query nor acts on the cancel request.
    os.kill(pid, signal.SIGSTOP)
    stopped_backend.append(pid)
    start = anyio.current_time()
    with anyio.move_on_after(0.5) as scope:
        await conn.execute("SELECT 1")
    elapsed = anyio.current_time() - start
    assert scope.cancelled_caught
    assert elapsed < 0.5 + conn.cancel_grace + 1.0
    assert conn.closed
    os.kill(pid, signal.SIGCONT)
    pg_server.execute("SELECT pg_terminate_backend(%s)", [pid])


async def test_query_in_an_already_cancelled_scope_leaves_connection_idle(
    conn: pgsd.Connection,
) -> None:
    with anyio.CancelScope() as scope:
        scope.cancel()
        await conn.execute("SELECT pg_sleep(60)")
    assert scope.cancelled_caught
    assert not conn.closed
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections (kernel backlog) and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield int(sock.getsockname()[1])


async def test_connect_timeout_against_a_silent_server(silent_port: int) -> None:
    config = pgsd.DatabaseConfig(
        host="127.0.0.1", port=silent_port, dbname="x", user="x", connect_timeout=0.5
    )
    start = anyio.current_time()
    with pytest.raises(pgsd.ConnectTimeout) as info:
        await pgsd.connect(config)
    elapsed = anyio.current_time() - start
    assert 0.4 < elapsed < 3.0
    assert str(silent_port) in str(info.value)
    assert isinstance(info.value.__cause__, psycopg.OperationalError)


async def test_connect_refused_port_is_server_unavailable() -> None:
    port = free_port()
    with pytest.raises(pgsd.ServerUnavailable) as info:
        await pgsd.connect(f"host=127.0.0.1 port={port} dbname=app user=app")
    message = str(info.value)
    assert "127.0.0.1" in message
    assert str(port) in message
    assert isinstance(info.value, pgsd.ConnectError)
    assert isinstance(info.value.__cause__, psycopg.OperationalError)


@pytest.mark.matrix
async def test_wrong_password_is_authentication_error(pg_server: PostgresServer) -> None:
    pg_server.create_role("pw_user", password="right-one")
    try:
        with pytest.raises(pgsd.AuthenticationError) as info:
            await pgsd.connect(pg_server.dsn(user="pw_user", password="s3cr3t-Pa55"))
        assert "s3cr3t-Pa55" not in str(info.value)
        assert "s3cr3t-Pa55" not in repr(info.value)
        assert "pw_user" in str(info.value) or "postgres" in str(info.value)
        conn = await pgsd.connect(pg_server.dsn(user="pw_user"))
        await conn.close()
    finally:
        pg_server.execute("DROP ROLE pw_user")


@pytest.mark.matrix
async def test_unknown_database_is_database_not_found(pg_server: PostgresServer) -> None:
    with pytest.raises(pgsd.DatabaseNotFound) as info:
        await pgsd.connect(pg_server.dsn(dbname="no_such_db"))
    assert "no_such_db" in str(info.value)


@pytest.mark.matrix
async def test_connection_limit_is_too_many_connections(pg_server: PostgresServer) -> None:
    pg_server.create_role("limited_user", options="CONNECTION LIMIT 1")
    try:
        async with await pgsd.connect(pg_server.dsn(user="limited_user")):
            with pytest.raises(pgsd.TooManyConnections):
                await pgsd.connect(pg_server.dsn(user="limited_user"))
    finally:
        pg_server.execute("DROP ROLE limited_user")


async def test_multi_host_conninfo_skips_a_dead_host(pg_server: PostgresServer) -> None:
    dead = free_port()
    dsn = (
        f"host=127.0.0.1,{pg_server.host} port={dead},{pg_server.port} "
        f"dbname=postgres user={pg_server.superuser} target_session_attrs=read-write"
    )
    async with await pgsd.connect(dsn) as conn:
        assert conn.info.port == pg_server.port


async def test_multi_host_failure_lists_every_attempt() -> None:
    ports = [free_port(), free_port()]
    dsn = f"host=127.0.0.1,127.0.0.1 port={ports[0]},{ports[1]} dbname=x user=x"
    with pytest.raises(pgsd.ServerUnavailable) as info:
        await pgsd.connect(dsn)
    cause = str(info.value.__cause__)
    assert str(ports[0]) in cause
    assert str(ports[1]) in cause


async def test_host_name_is_resolved_without_blocking(pg_server: PostgresServer) -> None:
    async with await pgsd.connect(pg_server.dsn().replace("127.0.0.1", "localhost")) as conn:
        assert conn.info.hostaddr in ("127.0.0.1", "::1")


async def test_secrets_absent_from_repr_logs_and_errors(
    pg_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "s3cr3t-Pa55"
    caplog.set_level("DEBUG")
    config = pgsd.DatabaseConfig.from_dsn(pg_server.dsn(password=secret), connect_timeout=5)
    assert secret not in repr(config)
    assert secret not in str(config)
    # The superuser is trusted: any password works.
    async with await pgsd.connect(config) as conn:
        assert secret not in repr(conn)
    with pytest.raises(pgsd.ConnectError) as info:
        await pgsd.connect(f"postgresql://nobody_here:{secret}@127.0.0.1:{pg_server.port}/postgres")
    assert secret not in str(info.value)
    assert secret not in repr(info.value)
    assert secret not in caplog.text
    assert caplog.records, "connect events are logged"


async def test_closed_connection_refuses_queries(conn: pgsd.Connection) -> None:
    await conn.close()
    with pytest.raises(psycopg.OperationalError):
        await conn.execute("SELECT 1")


def test_psycopg_internals_used_are_present() -> None:
    from pgsd._connection import PSYCOPG_INTERNALS

    missing = []
    for path in PSYCOPG_INTERNALS:
        module_name, _, rest = path.partition(".")
        obj: object = __import__(module_name)
        try:
            for part in rest.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            missing.append(path)
    assert not missing, f"psycopg {psycopg.__version__} changed internals pgsd uses: {missing}"
    # psycopg takes the connection's lock by this name, which pgsd replaces.
    assert "async with self.lock" in inspect.getsource(psycopg.AsyncConnection.commit)
    params = list(inspect.signature(psycopg.AsyncConnection.wait).parameters)
    assert params == ["self", "gen", "interval", "timeout"]


def test_psycopg_queued_copy_writer_uses_the_helpers_pgsd_replaces() -> None:
    from psycopg import _copy_async
    from psycopg.copy import AsyncQueuedLibpqWriter

    from pgsd._backend import PSYCOPG_COPY_SHIMS

    # Installed when pgsd is imported, each delegating to psycopg's own on asyncio.
    assert getattr(_copy_async.aspawn, "_pgsd_shim", False)
    # The writer still starts, joins and feeds its worker through these names
    # (looked up in its module at call time); if psycopg moves to others, the
    # queued writer breaks on trio and this says where to look.
    sources = {
        "AQueue": inspect.getsource(AsyncQueuedLibpqWriter.__init__),
        "aspawn": inspect.getsource(AsyncQueuedLibpqWriter.write),
        "agather": inspect.getsource(AsyncQueuedLibpqWriter.finish),
    }
    assert set(sources) == set(PSYCOPG_COPY_SHIMS)
    for name, source in sources.items():
        assert f"{name}(" in source, f"psycopg's queued COPY writer no longer calls {name}()"


def test_pgsd_connect_takes_the_options_psycopg_connect_takes() -> None:
    theirs = inspect.signature(psycopg.AsyncConnection.connect).parameters
    ours = inspect.signature(pgsd.Connection.connect).parameters
    assert list(ours) == list(theirs)
    for name, parameter in theirs.items():
        assert ours[name].kind == parameter.kind, name
        assert ours[name].default == parameter.default, name


async def test_psycopg_connection_attributes_used_are_present(pg_server: PostgresServer) -> None:
    from pgsd._connection import PSYCOPG_CONNECTION_ATTRIBUTES

    async with await pgsd.connect(pg_server.dsn()) as conn:
        missing = [a for a in PSYCOPG_CONNECTION_ATTRIBUTES if a not in vars(conn)]
    assert not missing, f"psycopg {psycopg.__version__} renamed connection attributes: {missing}"


def test_psycopg_version_is_a_tested_minor() -> None:
    major, minor = (int(x) for x in psycopg.__version__.split(".")[:2])
    assert (major, minor) == (3, 3), (
        f"pgsd is tested with psycopg 3.3, found {psycopg.__version__}: "
        "check src/pgsd/_connection.py against the new version and update the pin"
    )


async def test_queries_log_nothing_at_info(
    conn: pgsd.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="pgsd")
    for i in range(50):
        await conn.execute("SELECT %s", [i])
    async with conn.transaction():
        await conn.execute("SELECT 1")
    assert [r for r in caplog.records if r.name.startswith("pgsd")] == []


async def test_a_connection_libpq_dropped_does_not_break_the_next_one(
    pg_server: PostgresServer,
) -> None:
    # libpq closes the socket itself when the server goes away; the socket
    # number is then reused by the next connection, which must still work.
    for _ in range(3):
        async with await pgsd.connect(pg_server.dsn()) as doomed:
            await doomed.execute("SELECT 1")
            pg_server.execute("SELECT pg_terminate_backend(%s)", [doomed.info.backend_pid])
            with pytest.raises(psycopg.OperationalError):
                for _ in range(100):
                    await doomed.execute("SELECT 1")
            async with await pgsd.connect(pg_server.dsn()) as fresh:
                with anyio.fail_after(5):
                    cur = await fresh.execute("SELECT 2")
                    assert await cur.fetchone() == (2,)


async def test_connect_takes_a_row_factory(pg_server: PostgresServer) -> None:
    async with await pgsd.connect(pg_server.dsn(), row_factory=dict_row) as conn:
        cur = await conn.execute("SELECT 1 AS one, 'two' AS two")
        assert await cur.fetchone() == {"one": 1, "two": "two"}


async def test_a_stream_cancelled_mid_way_leaves_the_connection_usable(
    conn: pgsd.Connection,
) -> None:
    # The cancel request stops the query; the rows already sent are read and
    # dropped, within cancel_grace, instead of closing the connection.
    # (psycopg closes it: under a cancel scope its own cleanup is cancelled too.)
    count = 0
    with anyio.CancelScope() as scope:
        async for _ in conn.cursor().stream("SELECT generate_series(1, 10000000)"):
            count += 1
            if count == 3:
                scope.cancel()  # the next wait for a row is cancelled
    assert scope.cancelled_caught
    # Rows libpq has already read are yielded without a wait: the
    # cancellation lands within milliseconds, at the next look for one.
    assert 3 <= count < 10_000_000
    assert not conn.closed
    cur = await conn.execute("SELECT 'usable'")
    assert await cur.fetchone() == ("usable",)


async def stream_beside_a_ticker(cls: type[psycopg.AsyncConnection[Any]], dsn: str) -> Any:
    """How often another task ran while a stream read rows that were already there."""
    async with await cls.connect(dsn, autocommit=True) as conn:
        ticks = 0
        done = False

        async def ticker() -> None:
            nonlocal ticks
            while not done:
                ticks += 1
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            await anyio.lowlevel.checkpoint()
            before = ticks
            count = 0
            async for _ in conn.cursor().stream("SELECT generate_series(1, 200000)"):
                count += 1
            during = ticks - before
            done = True
        return count, during > 5


async def test_a_long_stream_lets_other_tasks_run_as_psycopg(pg_server: PostgresServer) -> None:
    # psycopg lets the event loop run at least every 5 ms even when libpq has
    # the next rows already: a long stream must not starve other tasks.
    result = await assert_same(stream_beside_a_ticker, pg_server.dsn())
    assert result == (200000, True)
