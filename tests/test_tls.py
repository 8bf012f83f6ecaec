"""TLS end to end against real servers: sslmode, certificates, client certificates, reports.

One TLS server serves the module. Its certificate names ``localhost`` only,
so that ``verify-full`` succeeds for ``localhost`` and fails for 127.0.0.1;
``cert_users`` makes one role log in with a client certificate. The
session's server, without TLS, stands for a server that offers none.
"""

from __future__ import annotations

import json
import re
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

import pgsd
from pgsd.testing import PostgresServer, TLSFiles
from support import run_pgsd

pytestmark = pytest.mark.anyio

#: A role that logs in with a client certificate only.
CERT_USER = "pgsd_tls_cert_user"
#: A role with a client certificate of its own, not allowed to log in as CERT_USER.
OTHER_USER = "pgsd_tls_other_user"
#: Connecting, checking and closing here takes well under this.
BOUND = 15.0
CLI_TIMEOUT = 120
TLS_VERSION = re.compile(r"TLSv1\.[23]")


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return TLSFiles.generate(
        tmp_path_factory.mktemp("tls"),
        server_names=("localhost",),
        client_users=(CERT_USER, OTHER_USER),
    )


@pytest.fixture(scope="module")
def tls_server(tls_files: TLSFiles) -> Iterator[PostgresServer]:
    with PostgresServer(tls=tls_files, cert_users=(CERT_USER,)) as server:
        server.create_role(CERT_USER)
        yield server


def database(
    server: PostgresServer, *, host: str = "127.0.0.1", user: str | None = None, **kwargs: Any
) -> pgsd.DatabaseConfig:
    """A config for the ``postgres`` database, the superuser unless ``user`` is given."""
    return pgsd.DatabaseConfig(
        host=host,
        port=server.port,
        dbname="postgres",
        user=user or server.superuser,
        connect_timeout=10,
        **kwargs,
    )


def client_certificate(files: TLSFiles, user: str) -> dict[str, str]:
    cert = files.clients[user]
    return {"sslcert": str(cert.cert), "sslkey": str(cert.key)}


async def server_side_tls(conn: pgsd.Connection) -> tuple[bool, str | None, str | None]:
    """What the server says about this connection's TLS: on, protocol, client certificate DN."""
    cur = await conn.execute(
        "SELECT ssl, version, client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
    )
    row = await cur.fetchone()
    assert row is not None
    return row[0], row[1], row[2]


async def connect_error(config: pgsd.DatabaseConfig) -> pgsd.ConnectError:
    """The error connecting with *config* raises; fails if it connects."""
    with anyio.fail_after(BOUND), pytest.raises(pgsd.ConnectError) as info:
        conn = await pgsd.connect(config)
        await conn.close()
    assert isinstance(info.value.__cause__, psycopg.OperationalError)
    return info.value


# --- the server's side ----------------------------------------------------------


def test_private_keys_are_readable_by_their_owner_only(tls_files: TLSFiles) -> None:
    keys = [tls_files.server_key, *(cert.key for cert in tls_files.clients.values())]
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert stat.S_IMODE(tls_files.ca_cert.stat().st_mode) == 0o644


def test_the_server_key_belongs_to_the_user_the_server_runs_as(tls_server: PostgresServer) -> None:
    settings = dict(
        tls_server.execute(
            "SELECT name, setting FROM pg_settings"
            " WHERE name IN ('ssl', 'ssl_cert_file', 'ssl_key_file', 'ssl_ca_file')"
        )
    )
    assert settings["ssl"] == "on"
    key = Path(settings["ssl_key_file"]).stat()
    assert stat.S_IMODE(key.st_mode) == 0o600
    assert key.st_uid == tls_server.datadir.stat().st_uid


def test_a_server_started_with_tls_true_makes_certificates_for_localhost_and_its_ip() -> None:
    with PostgresServer(tls=True, cert_users=(CERT_USER,)) as server:
        server.create_role(CERT_USER)
        files = server.tls
        assert files is not None
        assert files.server_names == ("localhost", "127.0.0.1")
        # verify-full to the IP address, and a login by client certificate.
        conninfo = make_conninfo(
            host="127.0.0.1",
            port=server.port,
            dbname="postgres",
            user=CERT_USER,
            sslmode="verify-full",
            sslrootcert=str(files.ca_cert),
            connect_timeout=10,
            **client_certificate(files, CERT_USER),
        )
        with psycopg.connect(conninfo) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (CERT_USER,)
            assert conn.pgconn.ssl_in_use


def test_cert_users_need_a_tls_server() -> None:
    with pytest.raises(ValueError, match="cert_users needs a server with tls"):
        PostgresServer(cert_users=(CERT_USER,))


def test_an_hba_kind_must_be_one_postgresql_knows() -> None:
    with pytest.raises(ValueError, match="hba must be one of host, hostssl, hostnossl"):
        PostgresServer(tls=True, hba="hostgssenc")


def test_a_tls_only_hba_needs_a_tls_server() -> None:
    with pytest.raises(ValueError, match='hba="hostssl" needs a server with tls'):
        PostgresServer(hba="hostssl")


def test_plain_tcp_still_works_on_a_tls_server(tls_server: PostgresServer) -> None:
    conninfo = tls_server.dsn(sslmode="disable", connect_timeout=10)
    with psycopg.connect(conninfo) as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)


# --- sslmode that succeeds --------------------------------------------------------


@pytest.mark.matrix
@pytest.mark.parametrize(
    ("sslmode", "host"),
    [("require", "127.0.0.1"), ("verify-ca", "127.0.0.1"), ("verify-full", "localhost")],
)
async def test_sslmode_connects_encrypted_and_the_report_shows_the_protocol(
    tls_server: PostgresServer, tls_files: TLSFiles, sslmode: str, host: str
) -> None:
    config = database(tls_server, host=host, sslmode=sslmode, sslrootcert=str(tls_files.ca_cert))
    connector_config = pgsd.ConnectorConfig(databases={"secure": config})
    with anyio.fail_after(BOUND):
        async with pgsd.DatabaseConnector(connector_config) as connector:
            report = await connector.verify_connection("secure")
            async with connector.get_connection("secure") as conn:
                ssl, version, _ = await server_side_tls(conn)
    assert report.ok, report.error
    assert report.tls is True
    assert ssl is True
    assert report.tls_version is not None
    assert TLS_VERSION.fullmatch(report.tls_version)
    assert report.tls_version == version
    assert report.tls_cipher
    data = report.to_dict()
    assert (data["tls"], data["tls_version"], data["tls_cipher"]) == (
        True,
        report.tls_version,
        report.tls_cipher,
    )


# --- sslmode that fails -----------------------------------------------------------


@pytest.mark.matrix
async def test_a_server_certificate_from_another_ca_cannot_be_verified(
    tls_server: PostgresServer, tls_files: TLSFiles
) -> None:
    config = database(tls_server, sslmode="verify-ca", sslrootcert=str(tls_files.other_ca_cert))
    err = await connect_error(config)
    assert type(err) is pgsd.TLSError
    message = str(err)
    assert "SSL error: certificate verify failed" in message
    assert "the server's certificate could not be verified: set sslrootcert" in message


@pytest.mark.matrix
async def test_verify_full_to_a_name_the_certificate_lacks_names_the_mismatch(
    tls_server: PostgresServer, tls_files: TLSFiles
) -> None:
    config = database(tls_server, sslmode="verify-full", sslrootcert=str(tls_files.ca_cert))
    err = await connect_error(config)
    assert type(err) is pgsd.TLSError
    message = str(err)
    assert re.search(
        r'server certificate for "localhost"( \(and \d+ other names?\))?'
        r' does not match host name "127\.0\.0\.1"',
        message,
    ), message
    assert "the server's certificate does not name the host connected to" in message


async def test_verify_ca_without_the_root_certificate_file_says_so(
    tls_server: PostgresServer, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-ca.crt"
    err = await connect_error(database(tls_server, sslmode="verify-ca", sslrootcert=str(missing)))
    assert type(err) is pgsd.TLSError
    assert f'root certificate file "{missing}" does not exist' in str(err)
    assert "need sslrootcert" in str(err)


async def test_sslmode_require_against_a_server_without_tls_is_a_tls_error(
    pg_server: PostgresServer,
) -> None:
    err = await connect_error(database(pg_server, sslmode="require"))
    assert type(err) is pgsd.TLSError
    assert "server does not support SSL, but SSL was required" in str(err)
    assert "the server does not offer it" in str(err)


# --- client certificates ----------------------------------------------------------


@pytest.mark.matrix
async def test_a_client_certificate_logs_in_its_role(
    tls_server: PostgresServer, tls_files: TLSFiles
) -> None:
    config = database(
        tls_server,
        user=CERT_USER,
        sslmode="verify-full",
        host="localhost",
        sslrootcert=str(tls_files.ca_cert),
        **client_certificate(tls_files, CERT_USER),
    )
    with anyio.fail_after(BOUND):
        async with await pgsd.connect(config) as conn:
            cur = await conn.execute("SELECT current_user")
            assert await cur.fetchone() == (CERT_USER,)
            ssl, _, client_dn = await server_side_tls(conn)
    assert ssl is True
    assert client_dn == f"/CN={CERT_USER}"


@pytest.mark.matrix
async def test_a_cert_role_without_a_client_certificate_is_refused_clearly(
    tls_server: PostgresServer, tmp_path: Path
) -> None:
    # A path that does not exist: libpq then sends no certificate, whatever
    # ~/.postgresql holds.
    config = database(
        tls_server, user=CERT_USER, sslmode="require", sslcert=str(tmp_path / "none.crt")
    )
    err = await connect_error(config)
    assert type(err) is pgsd.TLSError
    message = str(err)
    assert "connection requires a valid client certificate" in message
    assert "the server refused the client certificate: set sslcert and sslkey" in message


async def test_a_cert_role_without_tls_is_told_to_use_tls(tls_server: PostgresServer) -> None:
    err = await connect_error(database(tls_server, user=CERT_USER, sslmode="disable"))
    assert type(err) is pgsd.TLSError
    assert "no encryption" in str(err)
    assert "only over TLS" in str(err)


async def test_another_roles_client_certificate_is_refused(
    tls_server: PostgresServer, tls_files: TLSFiles
) -> None:
    config = database(
        tls_server, user=CERT_USER, sslmode="require", **client_certificate(tls_files, OTHER_USER)
    )
    err = await connect_error(config)
    assert type(err) is pgsd.TLSError
    assert f'certificate authentication failed for user "{CERT_USER}"' in str(err)


# --- pools and reports --------------------------------------------------------------


async def test_a_pool_with_a_tls_mistake_fails_at_once_not_after_the_timeout(
    tls_server: PostgresServer, tls_files: TLSFiles
) -> None:
    config = database(tls_server, sslmode="verify-ca", sslrootcert=str(tls_files.other_ca_cert))
    async with pgsd.ConnectionPool(config, pgsd.PoolConfig(acquire_timeout=30)) as pool:
        with anyio.fail_after(5):
            with pytest.raises(pgsd.TLSError, match="could not be verified"):
                async with pool.connection():
                    pass
            with pytest.raises(pgsd.TLSError):
                await pool.wait_ready()
        stats = pool.stats()
    assert stats.timeouts == 0
    assert stats.size == 0
    assert stats.errors >= 1


async def test_the_report_of_a_tls_mistake_explains_it(
    tls_server: PostgresServer, tls_files: TLSFiles
) -> None:
    config = database(tls_server, sslmode="verify-ca", sslrootcert=str(tls_files.other_ca_cert))
    connector_config = pgsd.ConnectorConfig(
        databases={"wrong_ca": config}, pool=pgsd.PoolConfig(acquire_timeout=30)
    )
    with anyio.fail_after(BOUND):
        async with pgsd.DatabaseConnector(connector_config) as connector:
            start = anyio.current_time()
            report = await connector.verify_connection("wrong_ca")
            elapsed = anyio.current_time() - start
    assert not report.ok
    assert report.error is not None
    assert "the server's certificate could not be verified" in report.error
    assert (report.tls, report.tls_version, report.tls_cipher) == (None, None, None)
    # Told at once, not after connect_timeout (10 s) or acquire_timeout.
    assert elapsed < 5


# --- pgsd check -------------------------------------------------------------------------


def pgsd_check(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_pgsd("check", *args, cwd=cwd)


def verify_full_dsn(server: PostgresServer, files: TLSFiles, ca: Path | None = None) -> str:
    return make_conninfo(
        host="localhost",
        port=server.port,
        dbname="postgres",
        user=server.superuser,
        sslmode="verify-full",
        sslrootcert=str(ca or files.ca_cert),
        connect_timeout=10,
    )


def negotiated_version(server: PostgresServer) -> str:
    with psycopg.connect(server.dsn(sslmode="require", connect_timeout=10)) as conn:
        row = conn.execute(
            "SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        ).fetchone()
    assert row is not None
    return str(row[0])


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_pgsd_check_shows_the_tls_protocol_in_its_table(
    tls_server: PostgresServer, tls_files: TLSFiles, tmp_path: Path, backend: str
) -> None:
    dsn = verify_full_dsn(tls_server, tls_files)
    result = pgsd_check("--backend", backend, dsn, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    header = next(line for line in result.stdout.splitlines() if "database" in line)
    row = next(line for line in result.stdout.splitlines() if " ok " in line)
    column = [cell.strip() for cell in header.split("┃")].index("tls")
    assert [cell.strip() for cell in row.split("│")][column] == negotiated_version(tls_server)


def test_pgsd_check_json_has_the_tls_version_and_cipher(
    tls_server: PostgresServer, tls_files: TLSFiles, tmp_path: Path
) -> None:
    result = pgsd_check("--json", verify_full_dsn(tls_server, tls_files), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    database = json.loads(result.stdout)["databases"][0]
    assert database["tls"] is True
    assert database["tls_version"] == negotiated_version(tls_server)
    assert isinstance(database["tls_cipher"], str)
    assert database["tls_cipher"]


def test_pgsd_check_explains_a_tls_mistake_and_fails(
    tls_server: PostgresServer, tls_files: TLSFiles, tmp_path: Path
) -> None:
    dsn = verify_full_dsn(tls_server, tls_files, ca=tls_files.other_ca_cert)
    result = pgsd_check("--json", dsn, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    database = json.loads(result.stdout)["databases"][0]
    assert database["ok"] is False
    assert "the server's certificate could not be verified" in database["error"]
    assert (database["tls"], database["tls_version"], database["tls_cipher"]) == (None, None, None)
    assert "Traceback" not in result.stderr
