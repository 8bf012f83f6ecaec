"""The exception hierarchy, the classification of connect errors, and redaction."""

from __future__ import annotations

import pickle
import socket

import psycopg
import psycopg.errors
import pytest

import pgsd
from pgsd import _errors
from pgsd._errors import connect_error_from, format_address, redact

SECRET = "s3cr3t-Pa55"

ALL_ERRORS = [
    pgsd.PgsdError,
    pgsd.ConfigError,
    pgsd.ConnectError,
    pgsd.AuthenticationError,
    pgsd.DatabaseNotFound,
    pgsd.ConnectTimeout,
    pgsd.ServerUnavailable,
    pgsd.TLSError,
    pgsd.TooManyConnections,
    pgsd.PoolTimeout,
    pgsd.PoolClosed,
    pgsd.TooManyWaiters,
    pgsd.UnsupportedServerVersion,
    pgsd.InsufficientPrivileges,
]
CONNECT_KINDS = [
    pgsd.AuthenticationError,
    pgsd.DatabaseNotFound,
    pgsd.ConnectTimeout,
    pgsd.ServerUnavailable,
    pgsd.TLSError,
    pgsd.TooManyConnections,
]


def classify(exc: BaseException, host: str | None = "db1", port: str | int | None = 5432):
    return connect_error_from(exc, database="source", host=host, port=port)


def operational(message: str) -> psycopg.OperationalError:
    return psycopg.OperationalError(message)


def refused(host: str, port: int) -> str:
    return (
        f'connection failed: connection to server at "{host}", port {port} failed:'
        " Connection refused\n\tIs the server running on that host and accepting"
        " TCP/IP connections?"
    )


# --- the hierarchy -----------------------------------------------------------


@pytest.mark.parametrize("cls", ALL_ERRORS)
def test_every_error_derives_from_pgsd_error(cls: type[Exception]) -> None:
    assert issubclass(cls, pgsd.PgsdError)


@pytest.mark.parametrize("cls", ALL_ERRORS)
def test_every_error_is_shown_as_a_pgsd_name(cls: type[Exception]) -> None:
    assert cls.__module__ == "pgsd"
    assert repr(cls) == f"<class 'pgsd.{cls.__name__}'>"


@pytest.mark.parametrize("cls", ALL_ERRORS)
def test_every_error_has_a_one_line_docstring(cls: type[Exception]) -> None:
    assert cls.__doc__
    assert "\n" not in cls.__doc__.strip()


@pytest.mark.parametrize("cls", CONNECT_KINDS)
def test_connect_kinds_derive_from_connect_error(cls: type[Exception]) -> None:
    assert issubclass(cls, pgsd.ConnectError)


@pytest.mark.parametrize("cls", [pgsd.PoolTimeout, pgsd.PoolClosed, pgsd.TooManyWaiters])
def test_pool_errors_take_a_plain_message(cls: type[Exception]) -> None:
    assert str(cls("pool 'source' is closed")) == "pool 'source' is closed"


# --- ConfigError -------------------------------------------------------------


def test_config_error_message_names_path_key_and_problem() -> None:
    err = pgsd.ConfigError(
        "must be an integer between 1 and 65535, got 'abc'",
        path="pgsd.toml",
        key="databases.source.port",
    )
    assert str(err) == (
        "pgsd.toml: databases.source.port: must be an integer between 1 and 65535, got 'abc'"
    )
    assert (err.path, err.key) == ("pgsd.toml", "databases.source.port")
    assert err.problem == "must be an integer between 1 and 65535, got 'abc'"


def test_config_error_omits_missing_path_and_key() -> None:
    assert str(pgsd.ConfigError("bad", key="max_size")) == "max_size: bad"
    assert str(pgsd.ConfigError("bad", path="pgsd.toml")) == "pgsd.toml: bad"
    err = pgsd.ConfigError("bad")
    assert str(err) == "bad"
    assert (err.path, err.key) == (None, None)


def test_config_error_scrubs_passwords_from_the_problem() -> None:
    err = pgsd.ConfigError(f"cannot parse host=h password={SECRET}", key="dsn")
    assert SECRET not in str(err)
    assert SECRET not in err.problem


# --- other errors with attributes --------------------------------------------


def test_unsupported_server_version_names_both_versions() -> None:
    err = pgsd.UnsupportedServerVersion(120022, minimum=130000, database="source")
    assert (err.version_num, err.minimum, err.database) == (120022, 130000, "source")
    message = str(err)
    assert "'source'" in message
    assert "12.22 (120022)" in message
    assert "13.0 (130000)" in message
    assert "upgrade the server" in message
    assert "min_server_version" not in message


def test_unsupported_server_version_suggests_lowering_a_raised_minimum() -> None:
    err = pgsd.UnsupportedServerVersion(150004, minimum=160000)
    assert err.database is None
    assert "lower min_server_version" in str(err)


def test_unsupported_server_version_shows_pre_10_versions_with_three_parts() -> None:
    assert "9.6.24 (90624)" in str(pgsd.UnsupportedServerVersion(90624))


def test_insufficient_privileges_lists_what_is_missing() -> None:
    err = pgsd.InsufficientPrivileges(["schema:app:USAGE", "role:pg_monitor"], user="app")
    assert err.missing == ("schema:app:USAGE", "role:pg_monitor")
    assert err.user == "app"
    assert str(err) == "role 'app' lacks required privileges: schema:app:USAGE, role:pg_monitor"


def test_insufficient_privileges_without_a_user() -> None:
    err = pgsd.InsufficientPrivileges(("database:CREATE",))
    assert err.user is None
    assert "the current role" in str(err)


@pytest.mark.parametrize(
    "err",
    [
        pgsd.ConfigError("bad", path="pgsd.toml", key="pool.max_size"),
        pgsd.ConnectError("boom", database="source", host="db1", port=5432, sqlstate="08006"),
        pgsd.AuthenticationError("denied", database="source", host="db1", port="5432,5433"),
        pgsd.TLSError("SSL error: certificate verify failed", database="source", host="db1"),
        pgsd.UnsupportedServerVersion(120000, minimum=140000, database="source"),
        pgsd.InsufficientPrivileges(["database:CONNECT"], user="app"),
        pgsd.PoolTimeout("no connection within 30 s"),
    ],
    ids=lambda err: type(err).__name__,
)
def test_errors_survive_pickling(err: pgsd.PgsdError) -> None:
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is type(err)
    assert str(copy) == str(err)
    assert vars(copy) == vars(err)


# --- connect_error_from: classification ---------------------------------------


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        (
            'connection failed: connection to server at "10.0.0.1", port 5432 failed:'
            ' FATAL:  password authentication failed for user "app"',
            pgsd.AuthenticationError,
        ),
        (
            'connection failed: connection to server at "10.0.0.1", port 5432 failed:'
            " fe_sendauth: no password supplied",
            pgsd.AuthenticationError,
        ),
        (
            "connection failed: SCRAM authentication requires libpq version 10 or above",
            pgsd.AuthenticationError,
        ),
        (
            'connection failed: FATAL:  no pg_hba.conf entry for host "10.0.0.9", user "app"',
            pgsd.AuthenticationError,
        ),
        ('connection failed: FATAL:  role "app" does not exist', pgsd.AuthenticationError),
        (
            'connection failed: connection to server at "10.0.0.1", port 5432 failed:'
            ' FATAL:  database "app" does not exist',
            pgsd.DatabaseNotFound,
        ),
        (
            'connection failed: connection to server at "10.0.0.1", port 5432 failed:'
            " timeout expired",
            pgsd.ConnectTimeout,
        ),
        (refused("10.0.0.1", 5432), pgsd.ServerUnavailable),
        (
            "could not connect to server: Connection refused\n"
            "\tIs the server running on host db1 and accepting TCP/IP connections on port 5432?",
            pgsd.ServerUnavailable,
        ),
        (
            'connection is bad: connection to server on socket "/run/postgresql/.s.PGSQL.5432"'
            " failed: No such file or directory",
            pgsd.ServerUnavailable,
        ),
        (
            'connection failed: could not translate host name "db1" to address:'
            " Name or service not known",
            pgsd.ServerUnavailable,
        ),
        (
            "failed to resolve host 'db1': [Errno -2] Name or service not known",
            pgsd.ServerUnavailable,
        ),
        (
            "connection failed: server closed the connection unexpectedly\n"
            "\tThis probably means the server terminated abnormally",
            pgsd.ServerUnavailable,
        ),
        ("connection failed: FATAL:  the database system is starting up", pgsd.ServerUnavailable),
        (
            "connection failed: FATAL:  the database system is shutting down",
            pgsd.ServerUnavailable,
        ),
        ("connection failed: FATAL:  sorry, too many clients already", pgsd.TooManyConnections),
        (
            'connection failed: FATAL:  too many connections for role "app"',
            pgsd.TooManyConnections,
        ),
        (
            "connection failed: FATAL:  remaining connection slots are reserved for"
            " non-replication superuser connections",
            pgsd.TooManyConnections,
        ),
        (
            "connection failed: received invalid response to SSL negotiation: H",
            pgsd.ConnectError,
        ),
    ],
)
def test_libpq_messages_are_classified(message: str, kind: type[pgsd.ConnectError]) -> None:
    err = classify(operational(message))
    assert type(err) is kind
    assert err.sqlstate is None


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (psycopg.errors.InvalidPassword("denied"), pgsd.AuthenticationError),
        (psycopg.errors.InvalidAuthorizationSpecification("denied"), pgsd.AuthenticationError),
        (psycopg.errors.InvalidCatalogName("no such database"), pgsd.DatabaseNotFound),
        (psycopg.errors.TooManyConnections("full"), pgsd.TooManyConnections),
        (psycopg.errors.CannotConnectNow("starting up"), pgsd.ServerUnavailable),
    ],
    ids=lambda value: type(value).__name__,
)
def test_sqlstate_decides_over_the_message(
    exc: psycopg.Error, kind: type[pgsd.ConnectError]
) -> None:
    err = classify(exc)
    assert type(err) is kind
    assert err.sqlstate == exc.sqlstate


def test_an_unknown_sqlstate_is_kept_on_a_plain_connect_error() -> None:
    err = classify(psycopg.errors.ProtocolViolation("unexpected message"))
    assert type(err) is pgsd.ConnectError
    assert err.sqlstate == "08P01"
    assert "SQLSTATE 08P01" in str(err)


def test_psycopg_connection_timeout_is_a_connect_timeout() -> None:
    err = classify(psycopg.errors.ConnectionTimeout("connection timeout expired"))
    assert type(err) is pgsd.ConnectTimeout
    assert "connection timeout expired" in str(err)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (TimeoutError(), pgsd.ConnectTimeout),
        (ConnectionRefusedError(111, "Connection refused"), pgsd.ServerUnavailable),
        (socket.gaierror(-2, "Name or service not known"), pgsd.ServerUnavailable),
        (ConnectionResetError(104, "reset by peer"), pgsd.ServerUnavailable),
        (RuntimeError("something else"), pgsd.ConnectError),
    ],
    ids=lambda value: type(value).__name__,
)
def test_errors_from_the_event_loop_are_classified(
    exc: BaseException, kind: type[pgsd.ConnectError]
) -> None:
    assert type(classify(exc)) is kind


def test_with_several_hosts_the_first_line_decides() -> None:
    message = "\n".join(
        [
            refused("10.0.0.2", 5433),
            "Multiple connection attempts failed. All failures were:",
            "- host: '10.0.0.1', port: '5432', hostaddr: '10.0.0.1': connection failed:"
            ' FATAL:  password authentication failed for user "app"',
            "- host: '10.0.0.2', port: '5433', hostaddr: '10.0.0.2': " + refused("10.0.0.2", 5433),
        ]
    )
    err = classify(operational(message), host="10.0.0.1,10.0.0.2", port="5432,5433")
    assert type(err) is pgsd.ServerUnavailable
    assert "10.0.0.1:5432, 10.0.0.2:5433" in str(err)


def tls_failed(detail: str) -> str:
    """A TLS failure as psycopg reports it from libpq 18 (the texts of real runs)."""
    return f'connection failed: connection to server at "127.0.0.1", port 5432 failed: {detail}'


@pytest.mark.parametrize(
    ("detail", "advice"),
    [
        (
            "SSL error: certificate verify failed",
            "the server's certificate could not be verified: set sslrootcert to the CA"
            " certificate that signed it",
        ),
        (
            'server certificate for "localhost" (and 1 other name) does not match host name'
            ' "127.0.0.1"',
            "the server's certificate does not name the host connected to",
        ),
        (
            'server certificate for "db1.internal" does not match host name "db2.internal"',
            "the server's certificate does not name the host connected to",
        ),
        (
            "server does not support SSL, but SSL was required",
            "sslmode requires TLS but the server does not offer it",
        ),
        (
            'root certificate file "/root/.postgresql/root.crt" does not exist\nEither provide'
            " the file, use the system's trusted roots with sslrootcert=system, or change"
            " sslmode to disable server certificate verification.",
            "sslmode verify-ca and verify-full need sslrootcert",
        ),
        (
            "FATAL:  connection requires a valid client certificate",
            "the server refused the client certificate",
        ),
        (
            'FATAL:  certificate authentication failed for user "app"',
            "the server refused the client certificate",
        ),
        ("SSL error: tlsv1 alert unknown ca", "the server refused the client certificate"),
        (
            'FATAL:  pg_hba.conf rejects connection for host "127.0.0.1", user "app",'
            ' database "postgres", no encryption',
            "the server accepts this connection only over TLS",
        ),
        (
            'certificate present, but not private key file "/etc/pgsd/client.key"',
            "the client certificate or its key cannot be used",
        ),
        (
            'could not load private key file "/etc/pgsd/client.key": key values mismatch',
            "the client certificate or its key cannot be used",
        ),
        (
            'private key file "/etc/pgsd/client.key" has group or world access; file must have'
            " permissions u=rw (0600) or less if owned by the current user, or permissions"
            " u=rw,g=r (0640) or less if owned by root",
            "the client certificate or its key cannot be used",
        ),
        (
            'could not read certificate file "/etc/pgsd/client.crt": no start line',
            "the client certificate or its key cannot be used",
        ),
    ],
)
def test_tls_failures_say_why_and_what_to_change(detail: str, advice: str) -> None:
    err = classify(operational(tls_failed(detail)))
    assert type(err) is pgsd.TLSError
    assert isinstance(err, pgsd.ConnectError)
    message = str(err)
    assert detail.split("\n", 1)[0] in message
    assert advice in message
    assert "Either provide the file" not in message  # the first line only


def test_a_tls_failure_without_a_known_cause_gets_the_general_tls_hint() -> None:
    err = pgsd.TLSError("something about TLS", database="source", host="db1", port=5432)
    assert str(err).endswith(
        "; check sslmode, sslrootcert (the CA certificate that signed the server's"
        " certificate), that the host name is one the server's certificate names,"
        " and sslcert/sslkey"
    )


@pytest.mark.parametrize(
    "detail",
    [
        # The server went away during the handshake: an outage, not a TLS mistake.
        "SSL error: unexpected eof while reading",
        "SSL SYSCALL error: EOF detected",
        "server closed the connection unexpectedly\n\tThis probably means the server"
        " terminated abnormally\n\tbefore or while processing the request.",
    ],
)
def test_a_connection_lost_during_the_handshake_is_not_a_tls_error(detail: str) -> None:
    assert type(classify(operational(tls_failed(detail)))) is pgsd.ServerUnavailable


def test_a_refused_client_certificate_is_not_a_password_problem() -> None:
    err = classify(
        operational(tls_failed('FATAL:  certificate authentication failed for user "app"'))
    )
    assert type(err) is pgsd.TLSError
    assert "password" not in str(err)


def test_a_pg_hba_reject_line_for_unencrypted_connections_only_asks_for_tls() -> None:
    plain = (
        'FATAL:  pg_hba.conf rejects connection for host "127.0.0.1", user "app", database "app"'
    )
    assert type(classify(operational(tls_failed(plain)))) is pgsd.AuthenticationError
    err = classify(operational(tls_failed(plain + ", no encryption")))
    assert type(err) is pgsd.TLSError


def test_with_sslmode_prefer_the_attempt_with_tls_decides() -> None:
    # libpq retries without TLS and reports both attempts, the TLS one first.
    message = "\n".join(
        [
            tls_failed("FATAL:  connection requires a valid client certificate"),
            'connection to server at "127.0.0.1", port 5432 failed: FATAL:  pg_hba.conf'
            ' rejects connection for host "127.0.0.1", user "app", database "app",'
            " no encryption",
        ]
    )
    err = classify(operational(message))
    assert type(err) is pgsd.TLSError
    assert "the server refused the client certificate" in str(err)


def test_later_lines_classify_when_the_first_does_not() -> None:
    message = "connection failed: something odd\nFATAL:  sorry, too many clients already"
    assert type(classify(operational(message))) is pgsd.TooManyConnections


# --- connect_error_from: the message ------------------------------------------


@pytest.mark.parametrize(
    ("message", "hint"),
    [
        (
            'FATAL:  password authentication failed for user "app"',
            "check the user name and password (password_env, passfile or PGPASSWORD)",
        ),
        ('FATAL:  database "app" does not exist', "check dbname"),
        ("timeout expired", "raise connect_timeout or check the network"),
        (
            "Connection refused",
            "check that the server is running and accepts TCP connections on db1:5432",
        ),
        (
            "FATAL:  sorry, too many clients already",
            "raise the server's max_connections or lower pool max_size",
        ),
        ("invalid response to SSL negotiation", "check host, port, sslmode"),
    ],
)
def test_message_says_what_to_check(message: str, hint: str) -> None:
    assert hint in str(classify(operational(message)))


def test_message_names_database_host_and_port() -> None:
    err = classify(operational(refused("db1", 6543)), host="db1", port=6543)
    assert (err.database, err.host, err.port) == ("source", "db1", 6543)
    message = str(err)
    assert message.startswith("cannot connect to database 'source' at db1:6543: ")
    assert 'connection to server at "db1", port 6543 failed: Connection refused' in message


def test_message_carries_only_the_first_line_of_libpq_text() -> None:
    err = classify(operational(refused("db1", 5432)))
    assert "Is the server running" not in str(err)
    assert err.detail == 'connection to server at "db1", port 5432 failed: Connection refused'


def test_message_names_the_libpq_defaults_when_host_and_port_are_unset() -> None:
    err = classify(operational("Connection refused"), host=None, port=None)
    assert "at the libpq default host and port" in str(err)


def test_message_names_the_unix_socket_for_a_socket_directory() -> None:
    err = classify(operational("No such file or directory"), host="/run/postgresql", port=5432)
    assert type(err) is pgsd.ServerUnavailable
    assert "accepts connections on the Unix socket /run/postgresql/.s.PGSQL.5432" in str(err)


def test_message_brackets_an_ipv6_address() -> None:
    err = classify(operational("Connection refused"), host="::1", port=5432)
    assert "[::1]:5432" in str(err)


def test_very_long_libpq_text_is_shortened() -> None:
    err = classify(operational("connection failed: " + "x" * 5000))
    assert len(err.detail) <= 500
    assert err.detail.endswith("...")


def test_an_exception_without_text_is_named_by_its_type() -> None:
    err = classify(TimeoutError())
    assert "TimeoutError" in str(err)


def test_an_exception_whose_str_fails_is_still_classified() -> None:
    class Broken(Exception):
        def __str__(self) -> str:
            raise ValueError("no text")

    err = classify(Broken())
    assert type(err) is pgsd.ConnectError
    assert "Broken" in str(err)


@pytest.mark.parametrize(
    "message",
    [
        f"connection failed: invalid dsn host=db1 password={SECRET} dbname=app",
        f"connection failed: invalid dsn host=db1 password='{SECRET} x' dbname=app",
        f"connection failed: bad url postgresql://app:{SECRET}@db1:5432/app",
        f'connection failed: FATAL:  password authentication failed password="{SECRET}"',
        f"PGPASSWORD={SECRET} Connection refused",
    ],
)
def test_no_password_leaks_into_the_error(message: str) -> None:
    err = classify(operational(message))
    assert SECRET not in str(err)
    assert SECRET not in repr(err)
    assert SECRET not in err.detail
    assert SECRET not in str(pickle.loads(pickle.dumps(err)))


def test_the_constructor_scrubs_its_detail_too() -> None:
    err = pgsd.ConnectError(f"password={SECRET}", database="source")
    assert SECRET not in str(err)


# --- redact and format_address -------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"host=h password={SECRET} port=5", "host=h password=*** port=5"),
        (f"host=h password = '{SECRET} \\' x' port=5", "host=h password = *** port=5"),
        (f"sslpassword={SECRET}", "sslpassword=***"),
        (f"PGPASSWORD={SECRET}", "PGPASSWORD=***"),
        (f"oauth_client_secret={SECRET}", "oauth_client_secret=***"),
        (f"{{'password': '{SECRET}', 'user': 'u'}}", "{'password': '***', 'user': 'u'}"),
        (f"postgresql://app:{SECRET}@db1/app", "postgresql://app:***@db1/app"),
        (f"postgres://:{SECRET}@db1/app", "postgres://:***@db1/app"),
        (f"postgresql://app:{SECRET}@with@at@db1/app", "postgresql://app:***@db1/app"),
        ("postgresql://app@db1:5432/app", "postgresql://app@db1:5432/app"),
        ("postgresql://db1:5432,db2:5433/app", "postgresql://db1:5432,db2:5433/app"),
        (
            'FATAL:  password authentication failed for user "app"',
            'FATAL:  password authentication failed for user "app"',
        ),
        ("fe_sendauth: no password supplied", "fe_sendauth: no password supplied"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("db1", 5432, "db1:5432"),
        ("db1", None, "db1:(libpq default port)"),
        (None, 6432, "(libpq default host):6432"),
        (None, None, "the libpq default host and port"),
        ("db1,db2", "5432,5433", "db1:5432, db2:5433"),
        ("db1,db2", 5432, "db1:5432, db2:5432"),
        ("db1,db2,db3", "5432,5433", "hosts db1,db2,db3 ports 5432,5433"),
        ("/run/postgresql", 5432, "the Unix socket /run/postgresql/.s.PGSQL.5432"),
        ("::1", 5432, "[::1]:5432"),
    ],
)
def test_format_address(host: str | None, port: str | int | None, expected: str) -> None:
    assert format_address(host, port) == expected


# What the pool does after an error --------------------------------------------


def _with_sqlstate(sqlstate: str | None) -> Exception:
    error = Exception("x")
    error.sqlstate = sqlstate  # type: ignore[attr-defined]
    return error


@pytest.mark.parametrize(
    ("sqlstate", "wants_primary", "expected"),
    [
        ("08006", False, True),  # connection failure
        ("08003", False, True),  # connection does not exist
        ("57P01", False, True),  # admin shutdown
        ("57P02", False, True),  # crash shutdown
        ("57P03", False, True),  # cannot connect now
        ("25006", True, True),  # read-only transaction, on a database asking for a primary
        ("25006", False, False),  # ... on one that does not
        ("23505", True, False),  # unique violation: the statement's fault, not the connection's
        ("57014", False, False),  # query cancelled
        (None, False, False),
    ],
)
def test_which_errors_evict_a_connection(
    sqlstate: str | None, wants_primary: bool, expected: bool
) -> None:
    assert _errors.evicts(_with_sqlstate(sqlstate), wants_primary=wants_primary) is expected
    assert _errors.evicts(None, wants_primary=wants_primary) is False


def test_which_failed_attempts_make_a_database_unreachable_or_fail_fast() -> None:
    unavailable = pgsd.ServerUnavailable("the server is not answering", database="db")
    timeout = pgsd.ConnectTimeout("no answer in 5 s", database="db")
    auth = pgsd.AuthenticationError("password authentication failed", database="db")
    old = pgsd.UnsupportedServerVersion(120000, minimum=130000, database="db")
    assert _errors.unreachable(unavailable)
    assert _errors.unreachable(timeout)
    assert not _errors.unreachable(auth)
    assert _errors.fails_fast(auth, ever_connected=False)
    assert not _errors.fails_fast(auth, ever_connected=True)
    assert _errors.fails_fast(old, ever_connected=True)
    assert not _errors.fails_fast(unavailable, ever_connected=False)
