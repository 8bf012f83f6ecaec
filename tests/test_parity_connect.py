"""Connecting as psycopg does, on libpq's default paths: the parity suite's connect half.

Each scenario runs on stock ``psycopg.AsyncConnection`` on asyncio and on
``pgsd.Connection`` on the test's backend (see ``tests/parity.py``). The
servers: the session's, without TLS; one with TLS on whose roles log in
with or without it; one with TLS on that admits connections without TLS
only (``hostnossl``); one that admits TLS only (``hostssl``). libpq's
default ``sslmode=prefer`` tries TLS first and, refused, retries without it
on a new socket inside the same attempt (``allow`` the other way round):
the paths users meet first.
"""

from __future__ import annotations

import collections
import gc
import math
import socket
import time
from collections.abc import Iterator
from typing import Any

import anyio
import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict, make_conninfo, timeout_from_conninfo

import pgsd
from conftest import PASSWORD_USER
from parity import ConnectionClass, Raised, assert_same, on_both
from pgsd._connection import DEFAULT_CONNECT_TIMEOUT, attempt_timeout
from pgsd.testing import PostgresServer, free_port

pytestmark = pytest.mark.anyio

#: Per attempt: a scenario that hangs shows as a timeout against psycopg's answer.
CONNECT_TIMEOUT = 5
#: psycopg's default per-attempt timeout, which pgsd replaces (README: differences).
PSYCOPG_DEFAULT_TIMEOUT = 130
#: A role with a password on the session's server (the TLS servers have PASSWORD_USER).
PLAIN_USER = "pgsd_parity_user"

SSLMODES = [None, "disable", "allow", "prefer", "require"]
# name -> (fixture, TLS offered, TLS required, TLS refused)
SERVERS = {
    "no-tls": ("pg_server", False, False, False),
    "tls": ("tls_server", True, False, False),
    "tls-hostnossl": ("tls_nossl_server", True, False, True),
    "tls-hostssl": ("tls_only_server", True, True, False),
}


@pytest.fixture(scope="module")
def plain_role(pg_server: PostgresServer) -> str:
    pg_server.create_role(PLAIN_USER)
    return PLAIN_USER


def server_and_user(request: pytest.FixtureRequest, name: str) -> tuple[PostgresServer, str]:
    fixture = SERVERS[name][0]
    server: PostgresServer = request.getfixturevalue(fixture)
    user = request.getfixturevalue("plain_role") if fixture == "pg_server" else PASSWORD_USER
    return server, user


async def connect_and_describe(cls: ConnectionClass, conninfo: str, **kwargs: Any) -> Any:
    """Connect; say whether libpq and the server see TLS, and where it landed."""
    async with await cls.connect(conninfo, **kwargs) as conn:
        cur = await conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        row = await cur.fetchone()
        assert row is not None
        return ("connected", conn.pgconn.ssl_in_use, row[0], conn.info.port)


def expected_tls(sslmode: str | None, offered: bool, required: bool, refused: bool) -> bool | None:
    """Whether libpq ends up with TLS (None: it cannot connect at all)."""
    mode = sslmode or "prefer"
    if mode == "disable":
        return None if required else False
    if mode == "allow":
        return required
    if mode == "prefer":
        return offered and not refused
    # require
    return None if not offered or refused else True


# --- sslmode x server x password --------------------------------------------------


@pytest.mark.matrix
@pytest.mark.parametrize("password_right", [True, False], ids=["password", "wrong-password"])
@pytest.mark.parametrize("sslmode", SSLMODES, ids=[str(mode) for mode in SSLMODES])
@pytest.mark.parametrize("server_name", list(SERVERS))
async def test_sslmode_against_each_server_as_psycopg(
    request: pytest.FixtureRequest, server_name: str, sslmode: str | None, password_right: bool
) -> None:
    server, user = server_and_user(request, server_name)
    params: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT}
    if sslmode is not None:
        params["sslmode"] = sslmode
    if not password_right:
        params["password"] = "not the password"
    conninfo = server.dsn(user=user, **params)
    started = time.monotonic()
    result = await assert_same(connect_and_describe, conninfo)
    tls = expected_tls(sslmode, *SERVERS[server_name][1:])
    if password_right and tls is not None:
        assert result == ("connected", tls, tls, server.port)
    else:
        assert isinstance(result, Raised)
        assert result.type is psycopg.OperationalError
        if password_right:
            assert "password authentication failed" not in result.message
        elif tls is not None:
            assert "password authentication failed" in result.message
    # Refusals are answered at once: nobody waited out a connect timeout.
    assert time.monotonic() - started < CONNECT_TIMEOUT


@pytest.mark.matrix
@pytest.mark.parametrize("gssencmode", [None, "disable", "prefer"])
async def test_gssencmode_without_kerberos_connects_as_psycopg(
    tls_server: PostgresServer, gssencmode: str | None
) -> None:
    # No Kerberos credentials here: libpq skips GSSAPI encryption under
    # prefer, the default, and goes on to TLS.
    params: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT}
    if gssencmode is not None:
        params["gssencmode"] = gssencmode
    result = await assert_same(connect_and_describe, tls_server.dsn(user=PASSWORD_USER, **params))
    assert result == ("connected", True, True, tls_server.port)


@pytest.mark.matrix
async def test_pgsd_connect_follows_libpq_defaults_against_a_hostnossl_server(
    tls_nossl_server: PostgresServer,
) -> None:
    # pgsd's own entry point, with a DatabaseConfig and no sslmode.
    config = pgsd.DatabaseConfig.from_dsn(tls_nossl_server.dsn(user=PASSWORD_USER))
    assert config.sslmode is None
    with anyio.fail_after(CONNECT_TIMEOUT):
        async with await pgsd.connect(config) as conn:
            assert not conn.pgconn.ssl_in_use


@pytest.mark.matrix
async def test_pgsd_connect_reports_a_wrong_password_at_once_on_a_tls_server(
    tls_server: PostgresServer,
) -> None:
    config = pgsd.DatabaseConfig.from_dsn(
        tls_server.dsn(user=PASSWORD_USER, password="not the password")
    )
    with anyio.fail_after(CONNECT_TIMEOUT), pytest.raises(pgsd.AuthenticationError):
        await pgsd.connect(config)


# --- several hosts, several addresses ----------------------------------------------


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


async def test_multi_host_skips_a_refusing_first_host_as_psycopg(pg_server: PostgresServer) -> None:
    dead = free_port()
    conninfo = make_conninfo(
        pg_server.dsn(connect_timeout=2),
        host="127.0.0.1,127.0.0.1",
        port=f"{dead},{pg_server.port}",
    )
    result = await assert_same(connect_and_describe, conninfo)
    assert result == ("connected", False, False, pg_server.port)


async def test_multi_host_skips_a_silent_first_host_after_its_timeout_as_psycopg(
    pg_server: PostgresServer, silent_port: int
) -> None:
    conninfo = make_conninfo(
        pg_server.dsn(connect_timeout=2),
        host="127.0.0.1,127.0.0.1",
        port=f"{silent_port},{pg_server.port}",
    )
    result = await assert_same(connect_and_describe, conninfo)
    assert result == ("connected", False, False, pg_server.port)


async def test_multi_host_failure_lists_every_attempt_as_psycopg(silent_port: int) -> None:
    dead = free_port()
    conninfo = f"host=127.0.0.1,127.0.0.1 port={dead},{silent_port} user=x connect_timeout=2"
    result = await assert_same(connect_and_describe, conninfo)
    assert isinstance(result, Raised)
    assert result.type is psycopg.errors.ConnectionTimeout
    assert "Multiple connection attempts failed" in result.message
    assert f"port: '{dead}'" in result.message
    assert f"port: '{silent_port}'" in result.message


@pytest.fixture
def several_addresses(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Names that resolve to several loopback addresses, through Python's resolver.

    psycopg and pgsd both resolve host names in Python (libpq then gets
    ``hostaddr``), so this is the resolver both see; this machine's own
    names resolve to one address each.
    """
    names: dict[str, list[str]] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name not in names:
            return real(host, port, *args, **kwargs)
        return [
            (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, int(port)))
            for address in names[name]
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return names


@pytest.mark.parametrize("first_works", [False, True])
async def test_a_name_with_several_addresses_is_tried_address_by_address_as_psycopg(
    pg_server: PostgresServer, several_addresses: dict[str, list[str]], first_works: bool
) -> None:
    # The server listens on 127.0.0.1 only: 127.0.0.2 refuses.
    addresses = ["127.0.0.2", "127.0.0.1"]
    several_addresses["pgsd-parity.test"] = addresses[::-1] if first_works else addresses
    conninfo = make_conninfo(pg_server.dsn(connect_timeout=2), host="pgsd-parity.test")
    result = await assert_same(connect_and_describe, conninfo)
    assert result == ("connected", False, False, pg_server.port)


async def test_a_name_whose_addresses_all_fail_lists_each_as_psycopg(
    pg_server: PostgresServer, several_addresses: dict[str, list[str]]
) -> None:
    several_addresses["pgsd-nowhere.test"] = ["127.0.0.2", "127.0.0.3"]
    conninfo = make_conninfo(pg_server.dsn(connect_timeout=2), host="pgsd-nowhere.test")
    result = await assert_same(connect_and_describe, conninfo)
    assert isinstance(result, Raised)
    assert result.type is psycopg.OperationalError
    assert "hostaddr: '127.0.0.2'" in result.message
    assert "hostaddr: '127.0.0.3'" in result.message


async def test_an_unknown_host_name_fails_as_psycopg() -> None:
    result = await assert_same(
        connect_and_describe, "host=pgsd-no-such-host.invalid user=x connect_timeout=2"
    )
    assert isinstance(result, Raised)
    assert result.type is psycopg.OperationalError
    assert "failed to resolve host 'pgsd-no-such-host.invalid'" in result.message


# --- connect_timeout in every form ---------------------------------------------------

TIMEOUT_FORMS = ["2", 2, 2.5, "2.5", 30, "0", 0, -1]


@pytest.mark.parametrize("value", TIMEOUT_FORMS, ids=[repr(v) for v in TIMEOUT_FORMS])
@pytest.mark.parametrize("where", ["keyword", "conninfo"])
async def test_connect_timeout_in_any_form_connects_as_psycopg(
    pg_server: PostgresServer, value: object, where: str
) -> None:
    if where == "keyword":
        result = await assert_same(connect_and_describe, pg_server.dsn(), connect_timeout=value)
    else:
        result = await assert_same(connect_and_describe, pg_server.dsn(connect_timeout=value))
    assert result == ("connected", False, False, pg_server.port)


async def test_connect_timeout_from_a_dict_of_strings_connects_as_psycopg(
    pg_server: PostgresServer,
) -> None:
    params = {k: str(v) for k, v in conninfo_to_dict(pg_server.dsn()).items()}
    params["connect_timeout"] = "3"
    result = await assert_same(connect_and_describe, "", **params)
    assert result == ("connected", False, False, pg_server.port)


@pytest.mark.parametrize("where", ["keyword", "conninfo"])
async def test_a_connect_timeout_that_is_not_a_number_fails_as_psycopg(
    pg_server: PostgresServer, where: str
) -> None:
    if where == "keyword":
        result = await assert_same(connect_and_describe, pg_server.dsn(), connect_timeout="soon")
    else:
        result = await assert_same(connect_and_describe, pg_server.dsn(connect_timeout="soon"))
    assert result == Raised(psycopg.ProgrammingError, None, "bad value for connect_timeout: 'soon'")


@pytest.mark.parametrize("value", ["2", 2, 2.9], ids=repr)
async def test_connect_timeout_bounds_an_attempt_against_a_silent_server_as_psycopg(
    silent_port: int, value: object
) -> None:
    async def timed(cls: ConnectionClass) -> Any:
        started = time.monotonic()
        try:
            await cls.connect(f"host=127.0.0.1 port={silent_port} user=x", connect_timeout=value)
        except psycopg.errors.ConnectionTimeout as exc:
            return (Raised.of(exc), time.monotonic() - started)
        return ("connected", None)

    reference, ours = await on_both(timed)
    assert (
        ours[0]
        == reference[0]
        == Raised(psycopg.errors.ConnectionTimeout, None, "connection timeout expired")
    )
    # Whole seconds, as libpq counts them: 2.9 means 2.
    for elapsed in (reference[1], ours[1]):
        assert 1.9 <= elapsed < 15


@given(
    value=st.one_of(
        st.integers(-5, 500),
        st.floats(-5, 500, allow_nan=False),
        st.integers(-5, 500).map(str),
        st.floats(-5, 500, allow_nan=False).map(str),
    )
)
def test_attempt_timeout_counts_as_psycopg_except_for_the_default(value: object) -> None:
    params = {"connect_timeout": value}
    theirs = timeout_from_conninfo(params)  # type: ignore[arg-type]
    ours = attempt_timeout(params)
    if theirs == PSYCOPG_DEFAULT_TIMEOUT and int(float(str(value))) <= 0:
        assert ours == DEFAULT_CONNECT_TIMEOUT
    else:
        assert ours == theirs


def test_attempt_timeout_without_a_setting_is_pgsds_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    assert timeout_from_conninfo({}) == PSYCOPG_DEFAULT_TIMEOUT
    assert attempt_timeout({}) == DEFAULT_CONNECT_TIMEOUT == 30.0


def test_attempt_timeout_reads_pgconnect_timeout_as_libpq(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "7")
    assert attempt_timeout({}) == timeout_from_conninfo({}) == 7


async def test_pgsd_connect_takes_connect_timeout_as_a_keyword_in_any_form(
    pg_server: PostgresServer,
) -> None:
    for value in ("3", 3, 0.5, "1.5"):
        async with await pgsd.connect(pg_server.dsn(), connect_timeout=value) as conn:
            assert not conn.closed
    with pytest.raises(pgsd.ConfigError, match="connect_timeout"):
        await pgsd.connect(pg_server.dsn(), connect_timeout="soon")


# --- nothing left behind ---------------------------------------------------------------

CYCLES = 200
WARM_UP = 30
#: Timer objects: asyncio's timer handles and the cancel scopes in trio's deadline heap.
TIMER_TYPES = frozenset({"TimerHandle", "CancelScope"})


async def object_growth(cls: ConnectionClass, conninfo: str) -> tuple[dict[str, int], int]:
    """Objects the collector tracks after CYCLES more connect/close cycles, by type;
    and how many timer objects are alive at the end.

    A task sleeps meanwhile, as a pool's maintenance does: a live timer due
    before the connects' deadlines keeps the loop from dropping their
    cancelled timers early, so a timer a connect leaves behind shows.
    """

    async def cycle(count: int) -> None:
        for _ in range(count):
            conn = await cls.connect(conninfo)
            await conn.close()

    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.sleep, SLEEPER)
        await cycle(WARM_UP)
        gc.collect()
        before = collections.Counter(type(o).__name__ for o in gc.get_objects())
        await cycle(CYCLES)
        gc.collect()
        after = collections.Counter(type(o).__name__ for o in gc.get_objects())
        tg.cancel_scope.cancel()
    growth = {name: after[name] - before[name] for name in after if after[name] != before[name]}
    return growth, sum(after[name] for name in TIMER_TYPES)


#: The sleeper is due before the connects' deadline (CONNECT_DEADLINE) and after the test.
SLEEPER = 50
CONNECT_DEADLINE = 60


async def test_connect_and_close_leave_nothing_behind_as_psycopg(
    pg_server: PostgresServer,
) -> None:
    # A connect that has returned must not keep its timeout's timer (an
    # asyncio timer handle with its context, a cancel scope in trio's
    # deadline heap) alive until the deadline: one object or more per cycle.
    # psycopg's count stays put, and so must ours.
    conninfo = pg_server.dsn(connect_timeout=CONNECT_DEADLINE)
    (theirs, their_timers), (ours, our_timers) = await on_both(object_growth, conninfo)
    growth = sum(ours.values())
    bound = max(math.ceil(CYCLES / 4), sum(theirs.values()))
    assert growth < bound, f"pgsd kept {growth} objects over {CYCLES} cycles: {ours}"
    assert our_timers <= their_timers + 5, (our_timers, their_timers)
