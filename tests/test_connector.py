"""DatabaseConnector: many databases opened, verified, lent and closed together."""

from __future__ import annotations

import json
import logging
import secrets
import socket
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import pgsd
from pgsd.testing import PostgresServer, free_port
from support import REPORT_KEYS, VERSION_KEYS

pytestmark = pytest.mark.anyio

SECRET = "s3cr3t-Pa55"
WRONG_SECRET = "Wr0ng-Pa55w0rd"
#: Opening, verifying and closing a connector here takes well under this.
BOUND = 15.0


def unique(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(4)}"


def database(
    pg_server: PostgresServer, dbname: str = "postgres", **kwargs: Any
) -> pgsd.DatabaseConfig:
    """A superuser config for a database of the session's server."""
    return pgsd.DatabaseConfig(
        host=pg_server.host, port=pg_server.port, dbname=dbname, user=pg_server.superuser, **kwargs
    )


def unreachable(connect_timeout: float = 1.0) -> pgsd.DatabaseConfig:
    """A config for a port nothing listens on."""
    return pgsd.DatabaseConfig(
        host="127.0.0.1",
        port=free_port(),
        dbname="nowhere",
        user="nobody",
        connect_timeout=connect_timeout,
    )


def server_version_num(pg_server: PostgresServer) -> int:
    return int(pg_server.execute("SHOW server_version_num")[0][0])


@pytest.fixture(scope="module")
def two_databases(pg_server: PostgresServer) -> tuple[str, str]:
    first, second = unique("pgsd_connector"), unique("pgsd_connector")
    pg_server.create_database(first)
    pg_server.create_database(second)
    return first, second


@pytest.fixture
def config(pg_server: PostgresServer, two_databases: tuple[str, str]) -> pgsd.ConnectorConfig:
    """Two databases on the session's server and one that cannot be reached."""
    first, second = two_databases
    return pgsd.ConnectorConfig(
        databases={
            "first": database(pg_server, first),
            "second": database(pg_server, second),
            "unreachable": unreachable(),
        },
        pool=pgsd.PoolConfig(max_size=3, close_timeout=1.0),
    )


@pytest.fixture
def connector_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="pgsd")
    return caplog


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "pgsd.connector" and r.levelno == level
    ]


# -- opening ----------------------------------------------------------------


async def test_connector_opens_warm_pools_despite_an_unreachable_database(
    config: pgsd.ConnectorConfig,
) -> None:
    with anyio.fail_after(BOUND):
        async with pgsd.DatabaseConnector(config) as connector:
            assert connector.pool("first").state == "up"
            assert connector.pool("second").state == "up"
            assert connector.pool("unreachable").state == "down"
            assert connector.stats()["first"].size >= 1


async def test_opening_does_not_wait_out_an_unreachable_database_connect_timeout(
    pg_server: PostgresServer,
) -> None:
    config = pgsd.ConnectorConfig(
        databases={"up": database(pg_server), "down": unreachable(connect_timeout=10)}
    )
    with anyio.fail_after(BOUND):
        start = anyio.current_time()
        async with pgsd.DatabaseConnector(config) as connector:
            elapsed = anyio.current_time() - start
            assert connector.pool("up").state == "up"
    # A refused connection is a failed first attempt: no need to wait 10 s.
    assert elapsed < 5.0


async def test_open_logs_one_summary_line_and_warns_once_per_unreachable_database(
    config: pgsd.ConnectorConfig, connector_logs: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(BOUND):
        async with pgsd.DatabaseConnector(config):
            pass
    assert messages(connector_logs, logging.INFO) == ["3 databases: 2 up, 1 down"]
    [warning] = messages(connector_logs, logging.WARNING)
    assert "'unreachable'" in warning
    assert "cannot connect" in warning


async def test_on_down_is_called_with_the_unreachable_database_name(
    config: pgsd.ConnectorConfig,
) -> None:
    calls: list[tuple[str, BaseException | None]] = []
    called = anyio.Event()

    async def on_down(name: str, error: BaseException | None) -> None:  # noqa: ASYNC124
        calls.append((name, error))
        called.set()

    with anyio.fail_after(BOUND):
        async with pgsd.DatabaseConnector(config, on_down=on_down):
            await called.wait()
    assert [name for name, _ in calls] == ["unreachable"]
    assert isinstance(calls[0][1], pgsd.ConnectError)


async def test_a_connector_is_entered_only_once(config: pgsd.ConnectorConfig) -> None:
    connector = pgsd.DatabaseConnector(config)
    with anyio.fail_after(BOUND):
        async with connector:
            pass
        with pytest.raises(RuntimeError, match="only once"):
            await connector.__aenter__()


# -- verifying --------------------------------------------------------------


@pytest.mark.matrix
async def test_verify_all_reports_every_database_in_config_order(
    config: pgsd.ConnectorConfig, pg_server: PostgresServer
) -> None:
    expected_num = server_version_num(pg_server)
    with anyio.fail_after(BOUND):
        async with pgsd.DatabaseConnector(config) as connector:
            start = anyio.current_time()
            reports = await connector.verify_all()
            elapsed = anyio.current_time() - start
    assert list(reports) == ["first", "second", "unreachable"]
    for name in ("first", "second"):
        report = reports[name]
        assert report.name == name
        assert report.ok, report.error
        assert report.error is None
        assert report.version is not None
        assert report.version.num == expected_num
        assert report.version.text.startswith("PostgreSQL")
        assert report.supported is True
        assert report.permissions is not None
        assert report.permissions.is_superuser
        assert report.latency_ms is not None
        assert report.latency_ms > 0
        assert (report.tls, report.tls_version, report.tls_cipher) == (False, None, None)
        assert (report.host, report.port) == (pg_server.host, pg_server.port)
    down = reports["unreachable"]
    assert not down.ok
    assert down.error is not None
    assert "'unreachable'" in down.error
    assert (down.version, down.latency_ms, down.permissions, down.tls) == (None, None, None, None)
    # The unreachable database waits out its 1 s; the others answer meanwhile.
    assert elapsed < 2 * 1.0


@pytest.mark.matrix
async def test_verify_all_checks_databases_concurrently(pg_server: PostgresServer) -> None:
    config = pgsd.ConnectorConfig(
        databases={
            "up": database(pg_server),
            "down1": unreachable(connect_timeout=1.0),
            "down2": unreachable(connect_timeout=1.0),
        }
    )
    with anyio.fail_after(BOUND):
        async with pgsd.DatabaseConnector(config) as connector:
            start = anyio.current_time()
            reports = await connector.verify_all()
            elapsed = anyio.current_time() - start
    assert [r.ok for r in reports.values()] == [True, False, False]
    # One after the other, the two down databases would take 2 s at least.
    assert elapsed < 1.8


@pytest.mark.matrix
async def test_report_to_dict_is_json_ready(config: pgsd.ConnectorConfig) -> None:
    with anyio.fail_after(BOUND):
        async with pgsd.DatabaseConnector(config) as connector:
            reports = await connector.verify_all()
    data = json.loads(json.dumps({name: r.to_dict() for name, r in reports.items()}))
    first = data["first"]
    assert set(first) == REPORT_KEYS
    assert set(first["version"]) == VERSION_KEYS
    assert set(first["permissions"]) == {
        "user",
        "is_superuser",
        "missing",
        "ok",
        "roles",
        "database_privileges",
    }
    assert first["permissions"]["database_privileges"] == ["CONNECT", "CREATE", "TEMPORARY"]
    assert data["unreachable"]["version"] is None
    assert data["unreachable"]["permissions"] is None


@pytest.mark.matrix
async def test_missing_required_privileges_make_the_report_not_ok(
    pg_server: PostgresServer,
) -> None:
    role, dbname = unique("pgsd_limited"), unique("pgsd_limited")
    password = pg_server.create_role(role)
    pg_server.create_database(dbname)
    pg_server.execute(f'REVOKE ALL ON DATABASE "{dbname}" FROM PUBLIC')
    pg_server.execute(f'GRANT CONNECT ON DATABASE "{dbname}" TO "{role}"')
    required = ("database:CONNECT", "database:CREATE")
    limited = database(pg_server, dbname, required=required).replace(user=role, password=password)
    config = pgsd.ConnectorConfig(
        databases={"limited": limited, "admin": database(pg_server, dbname, required=required)}
    )
    with anyio.fail_after(BOUND):
        async with pgsd.DatabaseConnector(config) as connector:
            reports = await connector.verify_all()
    report = reports["limited"]
    assert not report.ok
    assert report.permissions is not None
    assert report.permissions.user == role
    assert report.permissions.missing == ("database:CREATE",)
    assert report.error is not None
    assert "missing privileges" in report.error
    assert "database:CREATE" in report.error
    assert report.supported is True
    assert report.version is not None
    assert reports["admin"].ok, reports["admin"].error


@pytest.mark.matrix
async def test_server_older_than_min_server_version_is_reported_unsupported(
    pg_server: PostgresServer,
) -> None:
    config = pgsd.ConnectorConfig(
        databases={
            "current": database(pg_server),
            "too_old": database(pg_server, pool=pgsd.PoolConfig(min_server_version=990000)),
        }
    )
    with anyio.fail_after(BOUND):
        async with pgsd.DatabaseConnector(config) as connector:
            reports = await connector.verify_all()
            with pytest.raises(pgsd.UnsupportedServerVersion):
                async with connector.get_connection("too_old"):
                    pass
    report = reports["too_old"]
    assert not report.ok
    assert report.supported is False
    assert report.version is not None
    assert report.version.num == server_version_num(pg_server)
    assert report.error is not None
    assert "older than the minimum" in report.error
    assert "min_server_version" in report.error
    assert reports["current"].ok, reports["current"].error


@pytest.mark.matrix
async def test_verify_connection_accepts_a_config(
    config: pgsd.ConnectorConfig, pg_server: PostgresServer
) -> None:
    with anyio.fail_after(BOUND):
        async with pgsd.DatabaseConnector(config) as connector:
            by_config = await connector.verify_connection(config.databases["second"])
            new = await connector.verify_connection(database(pg_server))
    assert by_config.name == "second"
    assert by_config.ok
    assert new.name == "postgres"
    assert new.ok


# -- lending ----------------------------------------------------------------


async def test_get_connection_by_name_runs_queries(
    config: pgsd.ConnectorConfig, two_databases: tuple[str, str]
) -> None:
    with anyio.fail_after(BOUND):
        async with pgsd.DatabaseConnector(config) as connector:
            async with connector.get_connection("first") as conn:
                assert isinstance(conn, pgsd.Connection)
                cur = await conn.execute("SELECT current_database()")
                assert await cur.fetchone() == (two_databases[0],)


async def test_get_connection_with_an_equal_config_uses_the_configured_pool(
    config: pgsd.ConnectorConfig, pg_server: PostgresServer, two_databases: tuple[str, str]
) -> None:
    same_but_unnamed = database(pg_server, two_databases[1])
    with anyio.fail_after(BOUND):
        async with pgsd.DatabaseConnector(config) as connector:
            before = connector.pool("second").stats().acquires
            for target in (config.databases["second"], same_but_unnamed):
                async with connector.get_connection(target) as conn:
                    cur = await conn.execute("SELECT current_database()")
                    assert await cur.fetchone() == (two_databases[1],)
            assert connector.pool("second").stats().acquires == before + 2
            assert list(connector.stats()) == ["first", "second", "unreachable"]


async def test_get_connection_with_a_new_config_opens_one_pool_for_it(
    config: pgsd.ConnectorConfig, pg_server: PostgresServer
) -> None:
    other = database(pg_server, "postgres", application_name="pgsd-other")

    async def query() -> None:
        async with connector.get_connection(other) as conn:
            cur = await conn.execute(
                "SELECT current_database(), current_setting('application_name')"
            )
            assert await cur.fetchone() == ("postgres", "pgsd-other")

    with anyio.fail_after(BOUND):
        async with pgsd.DatabaseConnector(config) as connector:
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(query)
            await query()
            assert list(connector.stats()) == ["first", "second", "unreachable", "postgres"]
            pool = connector.pool("postgres")
            assert pool.stats().acquires == 4
            assert pool.stats().max_size == config.pool.max_size
    assert pool.state == "closed"


async def test_stats_gives_every_pool_and_keeps_the_invariants(
    config: pgsd.ConnectorConfig,
) -> None:
    with anyio.fail_after(BOUND):
        async with pgsd.DatabaseConnector(config) as connector:
            async with connector.get_connection("first"):
                stats = connector.stats()
    assert list(stats) == ["first", "second", "unreachable"]
    assert stats["first"].in_use == 1
    assert stats["unreachable"].size == 0
    assert stats["unreachable"].state == "down"
    for name, s in stats.items():
        assert s.name == name
        assert s.size == s.idle + s.in_use
        assert s.size + s.opening <= s.max_size


async def test_unknown_database_name_is_a_config_error(config: pgsd.ConnectorConfig) -> None:
    match = r"'nope'.*'first', 'second', 'unreachable'"
    with anyio.fail_after(BOUND):
        async with pgsd.DatabaseConnector(config) as connector:
            with pytest.raises(pgsd.ConfigError, match=match):
                async with connector.get_connection("nope"):
                    pass
            with pytest.raises(pgsd.ConfigError, match=match):
                connector.pool("nope")
            with pytest.raises(pgsd.ConfigError, match=match):
                await connector.ping("nope")
            with pytest.raises(pgsd.ConfigError, match=match):
                await connector.verify_connection("nope")


async def test_ping_returns_the_round_trip_in_seconds(config: pgsd.ConnectorConfig) -> None:
    with anyio.fail_after(BOUND):
        async with pgsd.DatabaseConnector(config) as connector:
            seconds = await connector.ping("first")
    assert isinstance(seconds, float)
    assert 0 < seconds < BOUND


@pytest.mark.matrix
async def test_get_version_and_check_permissions_match_the_module_functions(
    config: pgsd.ConnectorConfig,
) -> None:
    with anyio.fail_after(BOUND):
        async with pgsd.DatabaseConnector(config) as connector:
            async with connector.get_connection("first") as conn:
                version = await connector.get_version(conn)
                expected = await pgsd.get_version(conn)
                report = await connector.check_permissions(conn, ["database:CONNECT"])
    assert (version.num, version.text) == (expected.num, expected.text)
    assert report.ok
    assert report.required == ("database:CONNECT",)


# -- closing ----------------------------------------------------------------


async def test_leaving_closes_a_connection_still_borrowed_in_another_task(
    pg_server: PostgresServer,
) -> None:
    close_timeout = 0.5
    config = pgsd.ConnectorConfig(
        databases={"main": database(pg_server)},
        pool=pgsd.PoolConfig(close_timeout=close_timeout),
    )
    borrowed: list[pgsd.Connection[Any]] = []
    lent = anyio.Event()

    async def borrower(connector: pgsd.DatabaseConnector) -> None:
        async with connector.get_connection("main") as conn:
            borrowed.append(conn)
            lent.set()
            await anyio.sleep_forever()  # never gives it back

    with anyio.fail_after(BOUND):
        async with anyio.create_task_group() as tg:
            async with pgsd.DatabaseConnector(config) as connector:
                # On purpose: the borrower outlives the connector it borrows from.
                tg.start_soon(borrower, connector)  # noqa: ASYNC111
                await lent.wait()
                start = anyio.current_time()
            elapsed = anyio.current_time() - start
            assert borrowed[0].closed
            assert connector.pool("main").state == "closed"
            assert connector.stats()["main"].size == 0
            tg.cancel_scope.cancel()
    assert elapsed < close_timeout + 2.0


async def test_cancelled_while_opening_closes_every_pool(pg_server: PostgresServer) -> None:
    # A listener that never accepts: the connection attempt waits for an
    # answer that does not come, so opening waits out connect_timeout.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        config = pgsd.ConnectorConfig(
            databases={
                "up": database(pg_server),
                "silent": database(pg_server, connect_timeout=30).replace(
                    port=silent.getsockname()[1]
                ),
            }
        )
        connector = pgsd.DatabaseConnector(config)
        with anyio.fail_after(BOUND), anyio.move_on_after(0.5) as scope:
            async with connector:
                pytest.fail("opened although a database never answered")
    assert scope.cancelled_caught
    for stats in connector.stats().values():
        assert (stats.state, stats.size, stats.opening) == ("closed", 0, 0)


async def test_leaving_when_cancelled_still_closes_every_pool(
    config: pgsd.ConnectorConfig,
) -> None:
    with anyio.fail_after(BOUND):
        with anyio.CancelScope() as scope:
            async with pgsd.DatabaseConnector(config) as connector:
                async with connector.get_connection("first") as conn:
                    await conn.execute("SELECT 1")
                scope.cancel()
                await anyio.lowlevel.checkpoint()
    assert scope.cancelled_caught
    assert conn.closed
    for stats in connector.stats().values():
        assert (stats.state, stats.size, stats.opening) == ("closed", 0, 0)


# -- secrets ----------------------------------------------------------------


async def test_no_password_appears_in_reports_errors_logs_or_reprs(
    pg_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    role = unique("pgsd_secret")
    pg_server.create_role(role, password=SECRET)
    good = database(pg_server).replace(user=role, password=SECRET)
    bad = good.replace(password=WRONG_SECRET, connect_timeout=1.0)
    config = pgsd.ConnectorConfig(databases={"good": good, "bad": bad})
    texts: list[str] = []
    with anyio.fail_after(BOUND):
        async with pgsd.DatabaseConnector(config) as connector:
            reports = await connector.verify_all()
            with pytest.raises(pgsd.AuthenticationError) as info:
                async with connector.get_connection("bad", timeout=0.2):
                    pass
            texts += [repr(connector), repr(connector.pool("bad")), repr(connector.stats())]
    assert reports["good"].ok, reports["good"].error
    assert not reports["bad"].ok
    assert reports["bad"].error is not None
    assert "authentication failed" in reports["bad"].error
    error: BaseException | None = info.value
    while error is not None:
        texts.append(str(error))
        error = error.__cause__ or error.__context__
    texts += [repr(reports), json.dumps({n: r.to_dict() for n, r in reports.items()})]
    texts += [repr(config), caplog.text]
    for text in texts:
        assert SECRET not in text
        assert WRONG_SECRET not in text
