"""No password reaches a message: every failure path runs with a known secret, all output scanned.

Each test runs a path with the password ``SECRET`` in the DSN or the
config, then looks for the secret (and its URL-quoted and conninfo-quoted
forms, which share the marker ``MARK``) in everything a user could see:
exception messages, reprs and formatted tracebacks with their chained
causes, log records at DEBUG with their tracebacks, reports and their JSON,
statistics, and the output of ``pgsd check`` in both forms. Also: a
password need never be inline, because the environment, a passfile and a
service file all work.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import traceback
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import anyio.lowlevel
import pytest
from psycopg.conninfo import make_conninfo

import pgsd
from pgsd.testing import FaultProxy, PostgresServer, free_port
from support import clean_env, db_config, run_pgsd, unique_name

pytestmark = pytest.mark.anyio

#: Distinctive, in every form a password takes in a DSN.
MARK = "Pw7qK9"
#: Space, quotes, "@", "/" and "%": every quoting rule of URLs and conninfo.
SECRET = f"{MARK} x'y\"@z/%"

CLI_TIMEOUT = 120
#: A password command that prints the secret (from the environment).
COMMAND_PRINTING = "import os; print(os.environ['KEEPER_PASSWORD'])"
#: A password command that prints the secret, complains with it, and fails.
COMMAND_FAILING = (
    "import os, sys; p = os.environ['KEEPER_PASSWORD']; print(p);"
    " sys.stderr.write('vault refused ' + p); sys.exit(1)"
)


def exposed(text: str) -> bool:
    return MARK in text


class Scan:
    """Everything a failure showed: messages, reprs, tracebacks, logs."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog
        self.texts: list[tuple[str, str]] = []

    def add(self, what: str, text: object) -> None:
        self.texts.append((what, text if isinstance(text, str) else repr(text)))

    def error(self, what: str, exc: BaseException) -> None:
        """The exception and every one chained to it, as a user could print them."""
        self.add(f"{what}: traceback", "".join(traceback.format_exception(exc)))
        seen: set[int] = set()
        current: BaseException | None = exc
        while current is not None and id(current) not in seen:
            seen.add(id(current))
            self.add(f"{what}: str({type(current).__name__})", str(current))
            self.add(f"{what}: repr({type(current).__name__})", repr(current))
            self.add(f"{what}: args", current.args)
            self.add(f"{what}: attributes", vars(current) if hasattr(current, "__dict__") else "")
            current = current.__cause__ or current.__context__

    def logs(self) -> None:
        formatter = logging.Formatter("%(levelname)s %(name)s %(message)s")
        for record in self.caplog.records:
            self.add(f"log {record.name}", formatter.format(record))
            self.add(f"log {record.name}: args", record.args)

    def assert_clean(self) -> None:
        self.logs()
        assert self.texts, "nothing was scanned"
        leaks = [what for what, text in self.texts if exposed(text)]
        assert not leaks, f"the password shows in: {leaks}"


@pytest.fixture
def scan(caplog: pytest.LogCaptureFixture) -> Iterator[Scan]:
    caplog.set_level(logging.DEBUG)
    result = Scan(caplog)
    yield result
    result.assert_clean()


@pytest.fixture(scope="module")
def keeper(pg_server: PostgresServer) -> Iterator[str]:
    """A role whose password is SECRET."""
    name = unique_name("secret_keeper")
    pg_server.create_role(name, password=SECRET)
    yield name
    pg_server.execute(f'DROP ROLE "{name}"')


def url(
    server: PostgresServer | FaultProxy, user: str, password: str, dbname: str = "postgres"
) -> str:
    return f"postgresql://{user}:{quote(password, safe='')}@{server.host}:{server.port}/{dbname}"


@pytest.fixture
async def blackhole(pg_server: PostgresServer, anyio_backend: str) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(pg_server.host, pg_server.port) as proxy:
        proxy.set_mode("blackhole")
        yield proxy


# -- the secret's forms ---------------------------------------------------------


def test_every_form_of_the_secret_carries_the_mark() -> None:
    forms = [SECRET, quote(SECRET, safe=""), make_conninfo(password=SECRET)]
    assert all(exposed(form) for form in forms)
    assert not exposed(pgsd._errors.redact(make_conninfo(host="db1", password=SECRET)))


def test_the_scan_finds_the_secret_in_a_cause_an_attribute_and_a_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    for plant in ("cause", "attribute", "log"):
        caplog.clear()
        probe = Scan(caplog)
        try:
            try:
                raise OSError(f"connect to db1 password={SECRET}" if plant == "cause" else "x")
            except OSError as cause:
                err = pgsd.ConfigError("bad")
                if plant == "attribute":
                    err.dsn = SECRET  # type: ignore[attr-defined]
                raise err from cause
        except pgsd.ConfigError as err:
            probe.error("planted", err)
        if plant == "log":
            logging.getLogger("pgsd.test").debug("tried %s", SECRET)
        with pytest.raises(AssertionError, match="the password shows in"):
            probe.assert_clean()


# -- connecting -----------------------------------------------------------------


async def test_a_wrong_password_in_any_form(
    pg_server: PostgresServer, keeper: str, scan: Scan
) -> None:
    wrong = SECRET + "-not"
    targets: list[str | pgsd.DatabaseConfig] = [
        url(pg_server, keeper, wrong),
        make_conninfo(pg_server.dsn(user=keeper, password=wrong)),
        db_config(pg_server, user=keeper, password=wrong),
    ]
    for target in targets:
        with pytest.raises(pgsd.AuthenticationError) as info:
            await pgsd.connect(target)
        scan.error("wrong password", info.value)
        scan.add("target config", target if isinstance(target, pgsd.DatabaseConfig) else "")


async def test_an_unknown_database_with_the_right_password(
    pg_server: PostgresServer, keeper: str, scan: Scan
) -> None:
    for target in (
        url(pg_server, keeper, SECRET, dbname="no_such_db"),
        db_config(pg_server, user=keeper, password=SECRET, dbname="no_such_db"),
    ):
        with pytest.raises(pgsd.DatabaseNotFound) as info:
            await pgsd.connect(target)
        scan.error("unknown database", info.value)


async def test_tls_required_by_a_server_without_it(
    pg_server: PostgresServer, keeper: str, scan: Scan
) -> None:
    with pytest.raises(pgsd.TLSError) as info:
        await pgsd.connect(url(pg_server, keeper, SECRET) + "?sslmode=require")
    assert "SSL" in str(info.value)
    scan.error("tls", info.value)


async def test_a_connect_timeout(blackhole: FaultProxy, keeper: str, scan: Scan) -> None:
    target = f"{url(blackhole, keeper, SECRET)}?connect_timeout=1"
    with anyio.fail_after(10), pytest.raises(pgsd.ConnectTimeout) as info:
        await pgsd.connect(target)
    scan.error("connect timeout", info.value)


async def test_unparsable_dsns(scan: Scan) -> None:
    for dsn in (
        f"postgresql://app:{SECRET}@[db1/app",
        f"host=db1 password='{SECRET}",
        f"postgresql://app:{quote(SECRET, safe='')}@db1/app?bogus=1",
    ):
        with pytest.raises(pgsd.ConfigError) as info:
            await pgsd.connect(dsn)
        scan.error("bad dsn", info.value)


async def test_a_good_connection_shows_no_password(
    pg_server: PostgresServer, keeper: str, scan: Scan
) -> None:
    async with await pgsd.connect(url(pg_server, keeper, SECRET)) as conn:
        scan.add("connection", repr(conn))
        scan.add("info.dsn", conn.info.dsn)
        cur = await conn.execute("SELECT current_user")
        assert await cur.fetchone() == (keeper,)


# -- pools and the connector ------------------------------------------------------


async def test_a_pool_that_cannot_log_in(
    pg_server: PostgresServer, keeper: str, scan: Scan
) -> None:
    downs: list[BaseException | None] = []
    database = db_config(pg_server, user=keeper, password=SECRET + "-not")
    pool_config = pgsd.PoolConfig(min_size=1, acquire_timeout=5)
    async with pgsd.ConnectionPool(
        database, pool_config, on_down=lambda name, err: downs.append(err)
    ) as pool:
        with anyio.fail_after(10), pytest.raises(pgsd.AuthenticationError) as info:
            async with pool.connection():
                pass
        scan.error("pool login", info.value)
        assert pool.last_error is not None
        scan.error("pool last_error", pool.last_error)
        scan.add("pool", repr(pool))
        scan.add("stats", pool.stats())
    assert downs, "on_down was not called"
    for err in downs:
        assert err is not None
        scan.error("on_down", err)
    with pytest.raises(pgsd.PoolClosed) as closed:
        async with pool.connection():
            pass
    scan.error("pool closed", closed.value)


async def refused(
    scan: Scan, what: str, expected: type[BaseException], target: pgsd.DatabaseConfig
) -> BaseException:
    """Connecting to *target* raises *expected*, which the scan reads."""
    with pytest.raises(expected) as info:
        await pgsd.connect(target)
    scan.error(what, info.value)
    return info.value


def provided(server: PostgresServer, user: str, provider: Any) -> pgsd.DatabaseConfig:
    """A config whose password comes from *provider* alone."""
    return pgsd.DatabaseConfig(
        host=server.host, port=server.port, dbname="postgres", user=user, password_provider=provider
    )


async def test_a_password_provider_in_every_outcome(
    pg_server: PostgresServer, keeper: str, scan: Scan
) -> None:
    """Right, wrong, failing with the secret in its own error: the secret shows nowhere."""
    answers = iter([SECRET, SECRET + "-not"])

    async def provider(config: pgsd.DatabaseConfig) -> str:
        await anyio.lowlevel.checkpoint()  # as a real provider would
        answer = next(answers, None)
        if answer is None:
            raise RuntimeError(f"vault said password={SECRET}")
        return answer

    database = provided(pg_server, keeper, provider)
    scan.add("config", database)
    async with await pgsd.connect(database) as conn:
        scan.add("connection", repr(conn))
    await refused(scan, "provider, wrong password", pgsd.AuthenticationError, database)
    await refused(scan, "provider failing", pgsd.PasswordProviderError, database)


async def test_a_password_command_that_fails_after_printing_the_secret(
    pg_server: PostgresServer, keeper: str, scan: Scan
) -> None:
    code = f"import sys; print({SECRET!r}); sys.stderr.write('rejected ' + {SECRET!r}); sys.exit(1)"
    command = pgsd.PasswordCommand([sys.executable, "-c", code])
    database = provided(pg_server, keeper, command)
    scan.add("config", database)
    failed = await refused(scan, "command failing", pgsd.PasswordProviderError, database)
    assert "rejected ***" in str(failed)


async def test_a_pool_timing_out_on_a_silent_server(
    blackhole: FaultProxy, keeper: str, scan: Scan
) -> None:
    database = pgsd.DatabaseConfig.from_dsn(url(blackhole, keeper, SECRET), connect_timeout=0.5)
    pool_config = pgsd.PoolConfig(min_size=1, acquire_timeout=1.5, reconnect_max=0.2)
    async with pgsd.ConnectionPool(database, pool_config) as pool:
        with anyio.fail_after(10), pytest.raises(pgsd.PoolTimeout) as info:
            async with pool.connection():
                pass
        assert "last connection error" in str(info.value)
        scan.error("pool timeout", info.value)


async def test_reports_of_every_kind_of_database(
    pg_server: PostgresServer, keeper: str, scan: Scan
) -> None:
    databases = {
        "good": db_config(pg_server, user=keeper, password=SECRET),
        "wrong_password": db_config(pg_server, user=keeper, password=SECRET + "-not"),
        "no_database": db_config(pg_server, user=keeper, password=SECRET, dbname="no_such_db"),
        "gone": db_config(
            pg_server, user=keeper, password=SECRET, port=free_port(), connect_timeout=1
        ),
    }
    connector_config = pgsd.ConnectorConfig(
        databases=databases, pool=pgsd.PoolConfig(acquire_timeout=3)
    )
    scan.add("connector config", repr(connector_config))
    with anyio.fail_after(30):
        async with pgsd.DatabaseConnector(connector_config) as connector:
            reports = await connector.verify_all()
            scan.add("connector", repr(connector))
            scan.add("stats", connector.stats())
    assert [name for name, report in reports.items() if report.ok] == ["good"]
    for name, report in reports.items():
        scan.add(f"report {name}", repr(report))
        scan.add(f"report {name} json", json.dumps(report.to_dict()))
        if name != "good":
            assert report.error


# -- pgsd check ---------------------------------------------------------------------


def keeper_table(
    name: str,
    server: PostgresServer,
    keeper: str,
    password: str = 'password_env = "KEEPER_PASSWORD"',
) -> str:
    """A config file's table for the keeper; its password in $KEEPER_PASSWORD by default."""
    return f"""
[databases.{name}]
host = "{server.host}"
port = {server.port}
dbname = "postgres"
user = "{keeper}"
{password}
"""


def command(code: str) -> str:
    """A ``password_command`` running *code* in this Python."""
    return f"password_command = {json.dumps([sys.executable, '-c', code])}"


def run_check(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_pgsd("check", "-v", *args, cwd=cwd, env=env)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("form", ["table", "json"])
def test_pgsd_check_output_and_debug_log(
    pg_server: PostgresServer, keeper: str, tmp_path: Path, backend: str, form: str
) -> None:
    path = tmp_path / "pgsd.toml"
    path.write_text(
        keeper_table("from_env", pg_server, keeper)
        + f"""

[databases.wrong_inline]
dsn = "{url(pg_server, keeper, SECRET + "-not")}"

[databases.no_database]
dsn = "{url(pg_server, keeper, SECRET, dbname="no_such_db")}"

[databases.tls_refused]
dsn = "{url(pg_server, keeper, SECRET)}?sslmode=require"
"""
        + keeper_table("from_command", pg_server, keeper, command(COMMAND_PRINTING))
        # Retried until connect_timeout: a failing provider is an attempt like any other.
        + keeper_table(
            "command_failing", pg_server, keeper, command(COMMAND_FAILING) + "\nconnect_timeout = 2"
        )
    )
    env = clean_env(KEEPER_PASSWORD=SECRET)
    extra = ["--json"] if form == "json" else []
    result = run_check("--backend", backend, "--config", str(path), *extra, cwd=tmp_path, env=env)
    assert result.returncode == 1, result.stderr
    assert "DEBUG" in result.stderr  # -v logged at debug level
    if form == "json":
        by_name = {db["name"]: db for db in json.loads(result.stdout)["databases"]}
        assert by_name["from_env"]["ok"] is True
        assert by_name["from_command"]["ok"] is True
        assert not by_name["wrong_inline"]["ok"]
        assert "exited with status 1" in by_name["command_failing"]["error"]
    assert not exposed(result.stdout), "the password shows on stdout"
    assert not exposed(result.stderr), "the password shows on stderr"


def test_pgsd_check_dsn_arguments_with_a_bad_one(
    pg_server: PostgresServer, keeper: str, tmp_path: Path
) -> None:
    env = clean_env()
    result = run_check(
        "--json",
        url(pg_server, keeper, SECRET),
        f"postgresql://{keeper}:{quote(SECRET, safe='')}@[broken",
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert not exposed(result.stdout)
    assert not exposed(result.stderr)


# -- passwords that are not inline ----------------------------------------------------


async def test_password_from_the_environment_through_the_config_file(
    pg_server: PostgresServer, keeper: str, tmp_path: Path, scan: Scan
) -> None:
    path = tmp_path / "pgsd.toml"
    path.write_text(keeper_table("source", pg_server, keeper))
    loaded = pgsd.load_config(path, environ={"KEEPER_PASSWORD": SECRET})
    scan.add("loaded config", repr(loaded))
    async with await pgsd.connect(loaded.databases["source"]) as conn:
        cur = await conn.execute("SELECT current_user")
        assert await cur.fetchone() == (keeper,)


def passfile(tmp_path: Path, server: PostgresServer, user: str) -> Path:
    path = tmp_path / "pgpass"
    escaped = SECRET.replace("\\", "\\\\").replace(":", "\\:")
    path.write_text(f"{server.host}:{server.port}:*:{user}:{escaped}\n")
    path.chmod(0o600)  # libpq ignores a passfile others can read
    return path


async def test_password_from_a_passfile(
    pg_server: PostgresServer, keeper: str, tmp_path: Path, scan: Scan
) -> None:
    database = db_config(
        pg_server, user=keeper, password=None, passfile=str(passfile(tmp_path, pg_server, keeper))
    )
    scan.add("config", repr(database))
    async with await pgsd.connect(database) as conn:
        cur = await conn.execute("SELECT current_user")
        assert await cur.fetchone() == (keeper,)


async def test_password_from_a_service_and_its_passfile(
    pg_server: PostgresServer,
    keeper: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    scan: Scan,
) -> None:
    services = tmp_path / "pg_service.conf"
    services.write_text(
        f"[keeper]\nhost={pg_server.host}\nport={pg_server.port}\ndbname=postgres\n"
        f"user={keeper}\npassfile={passfile(tmp_path, pg_server, keeper)}\n"
    )
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    database = pgsd.DatabaseConfig(service="keeper")
    async with await pgsd.connect(database) as conn:
        cur = await conn.execute("SELECT current_user")
        assert await cur.fetchone() == (keeper,)
    # The same service with a wrong passfile fails without showing the file's secret.
    (tmp_path / "pgpass").write_text(f"*:*:*:{keeper}:{SECRET}-not\n")
    with pytest.raises(pgsd.AuthenticationError) as info:
        await pgsd.connect(database)
    scan.error("service", info.value)


async def test_password_from_pgpassword(
    pg_server: PostgresServer, keeper: str, monkeypatch: pytest.MonkeyPatch, scan: Scan
) -> None:
    monkeypatch.setenv("PGPASSWORD", SECRET)
    database = db_config(pg_server, user=keeper, password=None)
    async with await pgsd.connect(database) as conn:
        scan.add("connection", repr(conn))
    monkeypatch.setenv("PGPASSWORD", SECRET + "-not")
    with pytest.raises(pgsd.AuthenticationError) as info:
        await pgsd.connect(database)
    scan.error("PGPASSWORD", info.value)
