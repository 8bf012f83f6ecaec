"""pgsd behind PgBouncer, in session and in transaction pooling mode."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import anyio
import psycopg
import pytest

import pgsd
from pgsd.testing import PgBouncer, PostgresServer
from support import open_pool, server_connections, unique_name

pytestmark = pytest.mark.anyio

# PgBouncer 1.21 added tracking of protocol-level prepared statements in
# transaction mode (max_prepared_statements).
_TRACKS_PREPARED = (1, 21, 0)
_SAME_QUERY_RUNS = 10  # well over psycopg's default prepare_threshold of 5
# What PgBouncer's SHOW POOLS counts as the server connections of a pool.
_SERVER_STATES = ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login")


class Account:
    """A role and a database of its own on the test server."""

    def __init__(self, server: PostgresServer) -> None:
        self.role = unique_name()
        self.dbname = unique_name()
        self.password = server.create_role(self.role)
        server.create_database(self.dbname, owner=self.role)


@pytest.fixture(scope="module")
def account(pg_server: PostgresServer) -> Account:
    return Account(pg_server)


@pytest.fixture(scope="module")
def module_bouncer(pg_server: PostgresServer) -> Iterator[PgBouncer]:
    with PgBouncer(pg_server, pool_mode="session") as bouncer:
        yield bouncer


@pytest.fixture
def session_bouncer(module_bouncer: PgBouncer, account: Account) -> Iterator[PgBouncer]:
    """The module's session-mode PgBouncer, which the test leaves without server connections.

    PgBouncer keeps the server connections it opened for a test (the
    account's, and its superuser's for auth_query); closing them lets every
    test end with the server connections it caused closed.
    """
    yield module_bouncer
    module_bouncer.admin(f"KILL {account.dbname}")
    module_bouncer.admin(f"RESUME {account.dbname}")


def bouncer_config(bouncer: PgBouncer, account: Account, **overrides: Any) -> pgsd.DatabaseConfig:
    overrides.setdefault("application_name", unique_name())
    return pgsd.DatabaseConfig.from_dsn(bouncer.dsn(account.dbname, account.role), **overrides)


async def running_queries(server: PostgresServer, account: Account, text: str) -> int:
    async with await pgsd.connect(server.dsn()) as observer:
        cur = await observer.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE usename = %s AND state = 'active' AND query = %s",
            [account.role, text],
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def poll_running(server: PostgresServer, account: Account, text: str, want: int) -> None:
    """Wait, bounded in count, until ``want`` backends run ``text``."""
    for _ in range(1000):
        if await running_queries(server, account, text) == want:
            return
    raise AssertionError(f"never {want} backends running {text!r}")


def servers_of(bouncer: PgBouncer) -> list[dict[str, Any]]:
    """PgBouncer's SHOW SERVERS: every server connection it holds, in any pool."""
    return list(bouncer.admin("SHOW SERVERS"))


async def activity(server: PostgresServer, application_name: str) -> list[tuple[Any, ...]]:
    """The server's backends with this application_name: pid, start, state, query."""
    async with await pgsd.connect(server.dsn()) as observer:
        cur = await observer.execute(
            "SELECT pid, backend_start, state, left(query, 60) FROM pg_stat_activity"
            " WHERE application_name = %s",
            [application_name],
        )
        return await cur.fetchall()


def pool_row(bouncer: PgBouncer, account: Account) -> dict[str, Any]:
    """The SHOW POOLS row of the account's pool."""
    for row in bouncer.admin("SHOW POOLS"):
        if row["database"] == account.dbname and row["user"] == account.role:
            return row
    raise AssertionError(f"PgBouncer has no pool for {account.role}@{account.dbname}")


async def run_same_query(conn: pgsd.Connection, runs: int = _SAME_QUERY_RUNS) -> list[int]:
    results = []
    for i in range(runs):
        cur = await conn.execute("SELECT %s::int + 1", [i])
        row = await cur.fetchone()
        assert row is not None
        results.append(row[0])
    return results


async def run_on_two_clients(config: pgsd.DatabaseConfig) -> None:
    """Two clients run the same parameterised query many times, one after the other.

    Behind a transaction-mode PgBouncer with one server connection both
    clients share that connection.
    """
    async with await pgsd.connect(config) as first, await pgsd.connect(config) as second:
        assert await run_same_query(first) == list(range(1, _SAME_QUERY_RUNS + 1))
        assert await run_same_query(second) == list(range(1, _SAME_QUERY_RUNS + 1))


# -- the PgBouncer helper ---------------------------------------------------------


def test_version_is_the_one_the_admin_console_reports(session_bouncer: PgBouncer) -> None:
    rows = session_bouncer.admin("SHOW VERSION")
    assert rows == [{"version": f"PgBouncer {session_bouncer.version_text}"}]
    assert session_bouncer.version == PgBouncer.installed_version()
    assert session_bouncer.version >= (1, 0, 0)


async def test_roles_authenticate_with_their_password_through_pgbouncer(
    session_bouncer: PgBouncer, account: Account
) -> None:
    dsn = session_bouncer.dsn(account.dbname, account.role, password="not-the-password")
    with pytest.raises(pgsd.AuthenticationError):
        await pgsd.connect(dsn)
    async with await pgsd.connect(session_bouncer.dsn(account.dbname, account.role)) as conn:
        cur = await conn.execute("SELECT current_user, current_database()")
        assert await cur.fetchone() == (account.role, account.dbname)
        # The connection ends at PgBouncer, not at the server.
        assert conn.info.port == session_bouncer.port


# -- session mode -----------------------------------------------------------------


async def test_session_mode_pool_runs_queries_and_transactions(
    session_bouncer: PgBouncer, account: Account
) -> None:
    config = bouncer_config(session_bouncer, account)
    table = unique_name()
    async with open_pool(config, min_size=1, max_size=3) as pool:
        async with pool.connection() as conn:
            await conn.execute(f"CREATE TABLE {table} (n int)")
        async with pool.connection() as conn, conn.transaction():
            await conn.execute(f"INSERT INTO {table} VALUES (1)")
        with pytest.raises(ZeroDivisionError):
            async with pool.connection() as conn, conn.transaction():
                await conn.execute(f"INSERT INTO {table} VALUES (2)")
                raise ZeroDivisionError
        async with pool.connection() as conn:
            cur = await conn.execute(f"SELECT array_agg(n) FROM {table}")
            assert await cur.fetchone() == ([1],)
            await conn.execute(f"DROP TABLE {table}")
        assert pool.stats().acquires == 4


async def test_session_mode_keeps_session_state_across_borrows(
    session_bouncer: PgBouncer, account: Account
) -> None:
    async with open_pool(bouncer_config(session_bouncer, account), max_size=1) as pool:
        async with pool.connection() as conn:
            await conn.execute("SET statement_timeout = '12345ms'")
        async with pool.connection() as conn:
            cur = await conn.execute("SHOW statement_timeout")
            assert await cur.fetchone() == ("12345ms",)


async def test_session_mode_prepared_statements_with_the_default_threshold(
    session_bouncer: PgBouncer, account: Account
) -> None:
    config = bouncer_config(session_bouncer, account)
    assert config.prepare_threshold == 5
    async with open_pool(config, max_size=2) as pool:
        async with pool.connection() as conn:
            assert await run_same_query(conn) == list(range(1, _SAME_QUERY_RUNS + 1))
            cur = await conn.execute(
                "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE '\\_pg3\\_%%'"
            )
            # The query was prepared on the server connection behind this client.
            assert await cur.fetchone() == (1,)
        async with pool.connection() as conn:
            assert await run_same_query(conn) == list(range(1, _SAME_QUERY_RUNS + 1))


@pytest.mark.parametrize("pool_mode", ["session", "transaction"])
async def test_cancelling_a_borrower_stops_its_query_on_the_server_through_pgbouncer(
    pg_server: PostgresServer, account: Account, pool_mode: Literal["session", "transaction"]
) -> None:
    sleep = f"SELECT pg_sleep(60) -- {unique_name()}"
    with PgBouncer(pg_server, pool_mode=pool_mode, pool_size=1) as bouncer:
        # A cancel takes milliseconds; the long grace keeps a loaded machine
        # from turning it into a close.
        config = bouncer_config(bouncer, account, prepare_threshold=None, cancel_grace=10)
        await assert_cancel_stops_the_query(pg_server, account, config, sleep)


async def assert_cancel_stops_the_query(
    server: PostgresServer, account: Account, config: pgsd.DatabaseConfig, sleep: str
) -> None:
    async with open_pool(config, max_size=1) as pool:
        async with anyio.create_task_group() as tg:

            async def borrower() -> None:
                async with pool.connection() as conn:
                    await conn.execute(sleep)

            tg.start_soon(borrower)
            with anyio.fail_after(30):
                await poll_running(server, account, sleep, want=1)
            tg.cancel_scope.cancel()
        # The pool sent the cancel request to PgBouncer, which passed it on.
        with anyio.fail_after(30):
            await poll_running(server, account, sleep, want=0)
        async with pool.connection(timeout=30) as conn:
            cur = await conn.execute("SELECT 1")
            assert await cur.fetchone() == (1,)
        stats = pool.stats()
        # Cancelled, not closed: the same connection was lent again.
        assert stats.connections_opened == 1
        assert stats.connections_closed == 0


# -- transaction mode ---------------------------------------------------------------


async def test_transaction_mode_serves_many_clients_over_fewer_server_connections(
    pg_server: PostgresServer, account: Account
) -> None:
    clients, servers, borrows = 8, 2, 25
    table = unique_name()
    pg_server.execute(f"CREATE TABLE {table} (task int, n int)", dbname=account.dbname)
    pg_server.execute(f"GRANT ALL ON {table} TO {account.role}", dbname=account.dbname)
    with PgBouncer(pg_server, pool_mode="transaction", pool_size=servers) as bouncer:
        config = bouncer_config(bouncer, account, prepare_threshold=None)
        pool_rows: list[dict[str, Any]] = []
        backends: list[int] = []
        extra_seen: list[Any] = []
        async with open_pool(config, min_size=clients, max_size=clients) as pool:
            await pool.wait_ready(30)

            async def borrower(task: int) -> None:
                for n in range(borrows):
                    async with pool.connection() as conn, conn.transaction():
                        await conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", [task, n])
                        # Read back inside the transaction: one server connection.
                        cur = await conn.execute(
                            f"SELECT count(*) FROM {table} WHERE task = %s", [task]
                        )
                        assert await cur.fetchone() == (n + 1,)

            async def sampler(done: anyio.Event) -> None:
                while not done.is_set() and len(backends) < 200:
                    pool_rows.append(await anyio.to_thread.run_sync(pool_row, bouncer, account))
                    # PgBouncer gives each server connection its client's application_name.
                    count = await server_connections(pg_server, config.application_name)
                    backends.append(count)
                    if count > servers and not extra_seen:  # which ones, for the failure
                        extra_seen.append(await activity(pg_server, config.application_name))
                        extra_seen.append(await anyio.to_thread.run_sync(servers_of, bouncer))

            done = anyio.Event()
            with anyio.fail_after(60):
                async with anyio.create_task_group() as outer:
                    outer.start_soon(sampler, done)
                    async with anyio.create_task_group() as tg:
                        for task in range(clients):
                            tg.start_soon(borrower, task)
                    done.set()
            assert pool.stats().size == clients
            assert pool.stats().acquires == clients * borrows
        rows = pg_server.execute(f"SELECT count(*) FROM {table}", dbname=account.dbname)
        assert rows == [(clients * borrows,)]
    assert pool_rows
    assert backends
    assert max(sum(row[state] for state in _SERVER_STATES) for row in pool_rows) <= servers
    assert max(row["cl_active"] + row["cl_waiting"] for row in pool_rows) == clients
    assert max(backends) <= servers, extra_seen


async def test_transaction_mode_shares_session_state_between_clients(
    pg_server: PostgresServer, account: Account
) -> None:
    with PgBouncer(pg_server, pool_mode="transaction", pool_size=1) as bouncer:
        config = bouncer_config(bouncer, account, prepare_threshold=None)
        async with await pgsd.connect(config) as first, await pgsd.connect(config) as second:
            await first.execute("SET statement_timeout = '12345ms'")
            # One server connection behind both clients: the SET is not
            # the first client's any more, it is whoever's runs next.
            cur = await second.execute("SHOW statement_timeout")
            assert await cur.fetchone() == ("12345ms",)
            await second.execute("RESET statement_timeout")


async def test_prepared_statements_in_transaction_mode_with_the_default_threshold(
    pg_server: PostgresServer, account: Account
) -> None:
    version = PgBouncer.installed_version()
    if version >= _TRACKS_PREPARED:
        with PgBouncer(
            pg_server, pool_mode="transaction", pool_size=1, max_prepared_statements=100
        ) as bouncer:
            # PgBouncer prepares each statement on whichever server
            # connection runs it: the default threshold works.
            await run_on_two_clients(bouncer_config(bouncer, account))
    else:
        with pytest.raises(ValueError, match=r"1\.21"):
            PgBouncer(pg_server, pool_mode="transaction", max_prepared_statements=100)
        with PgBouncer(pg_server, pool_mode="transaction", pool_size=1) as bouncer:
            # The second client prepares "_pg3_0" on the server connection
            # where the first client already prepared it.
            with pytest.raises(psycopg.errors.DuplicatePreparedStatement):
                await run_on_two_clients(bouncer_config(bouncer, account))


async def test_prepare_threshold_none_works_in_transaction_mode_without_prepared_statements(
    pg_server: PostgresServer, account: Account
) -> None:
    # Without PgBouncer's tracking: older than 1.21, or turned off with 0.
    off = 0 if PgBouncer.installed_version() >= _TRACKS_PREPARED else None
    with PgBouncer(
        pg_server, pool_mode="transaction", pool_size=1, max_prepared_statements=off
    ) as bouncer:
        with pytest.raises(psycopg.errors.DuplicatePreparedStatement):
            await run_on_two_clients(bouncer_config(bouncer, account))
        await run_on_two_clients(bouncer_config(bouncer, account, prepare_threshold=None))
        config = bouncer_config(bouncer, account, prepare_threshold=None)
        async with open_pool(config, min_size=3, max_size=3) as pool:

            async def borrower() -> None:
                for _ in range(4):
                    async with pool.connection() as conn:
                        assert await run_same_query(conn) == list(range(1, _SAME_QUERY_RUNS + 1))

            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    for _ in range(3):
                        tg.start_soon(borrower)
            assert pool.stats().acquires == 12


# -- version and permissions ------------------------------------------------------------


@pytest.mark.parametrize("pool_mode", ["session", "transaction"])
async def test_get_version_and_check_permissions_through_pgbouncer(
    pg_server: PostgresServer, account: Account, pool_mode: Literal["session", "transaction"]
) -> None:
    async with await pgsd.connect(pg_server.dsn(account.dbname, account.role)) as direct:
        expected = await pgsd.get_version(direct)
    with PgBouncer(pg_server, pool_mode=pool_mode, pool_size=1) as bouncer:
        config = bouncer_config(
            bouncer, account, prepare_threshold=None, required=["database:CONNECT"]
        )
        async with open_pool(config, max_size=2) as pool, pool.connection() as conn:
            version = await pgsd.get_version(conn)
            report = await pgsd.check_permissions(
                conn, required=["database:CONNECT", "schema:public:CREATE", "role:pg_monitor"]
            )
    assert version == expected
    assert version.major == pg_server.major
    assert report.user == account.role
    assert not report.is_superuser
    assert report.missing == ("role:pg_monitor",)


@pytest.mark.parametrize("pool_mode", ["session", "transaction"])
async def test_one_shot_statements_through_pgbouncer(
    pg_server: PostgresServer, account: Account, pool_mode: Literal["session", "transaction"]
) -> None:
    with PgBouncer(pg_server, pool_mode=pool_mode, pool_size=2) as bouncer:
        # The default prepare_threshold: one-shot statements are never
        # prepared by name, so transaction mode needs nothing more.
        config = bouncer_config(bouncer, account)
        results: dict[int, Any] = {}
        # No more clients than server connections: in session mode a third
        # client would wait for one of them to disconnect.
        async with open_pool(config, max_size=2) as pool:

            async def one(n: int) -> None:
                results[n] = await pool.fetchone("SELECT %s::int, %s::text", [n, str(n)])

            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    for n in range(200):
                        tg.start_soon(one, n)
                with pytest.raises(psycopg.errors.DivisionByZero):
                    await pool.fetchval("SELECT 1 / 0")
                assert await pool.fetchval("SELECT 'after'") == "after"
            assert pool.stats().statements >= 202
        assert results == {n: (n, str(n)) for n in range(200)}
