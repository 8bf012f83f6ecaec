"""Passwords that change: ``password_provider`` and ``password_command``, against a real server.

A provider is called for every new connection and never for a lent one,
within ``connect_timeout``; its failures are `PasswordProviderError`
attempts that name it and never hold its output. A role's password is
changed while a pool runs: new connections use the new one, lent ones
carry on.
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import pgsd
from pgsd.testing import PostgresServer
from support import unique_name

pytestmark = pytest.mark.anyio

#: Every password here carries it, so that a scan finds any of them.
MARK = "Rt5wQ8"
#: A generous bound on anything that should end at once (a loaded CI machine).
BOUND = 30


@pytest.fixture
def role(pg_server: PostgresServer) -> Any:
    name = unique_name("rotating")
    pg_server.create_role(name, password=f"{MARK}-first")
    yield name
    pg_server.execute(f'DROP ROLE IF EXISTS "{name}"')


def config_for(
    server: PostgresServer, user: str, provider: Any, **overrides: Any
) -> pgsd.DatabaseConfig:
    """A config with no password of its own: only the provider gives one."""
    return pgsd.DatabaseConfig(
        host=server.host,
        port=server.port,
        dbname="postgres",
        user=user,
        password_provider=provider,
        application_name=unique_name(),
        **overrides,
    )


def no_secret_in(caplog: pytest.LogCaptureFixture, *texts: object) -> None:
    formatter = logging.Formatter("%(levelname)s %(name)s %(message)s")
    logged = [formatter.format(record) for record in caplog.records]
    shown = [*logged, *(str(text) for text in texts), *(repr(text) for text in texts)]
    assert not [text for text in shown if MARK in text]


async def test_a_rotated_password_is_used_by_new_connections_and_lent_ones_carry_on(
    pg_server: PostgresServer, role: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    current = [f"{MARK}-first"]
    calls = [0]

    async def provider(config: pgsd.DatabaseConfig) -> str:
        await anyio.lowlevel.checkpoint()  # as a real provider would
        calls[0] += 1
        return current[0]

    config = config_for(pg_server, role, provider)
    pool_config = pgsd.PoolConfig(min_size=1, max_size=2)
    async with pgsd.ConnectionPool(config, pool_config) as pool:
        await pool.wait_ready()
        assert calls[0] == 1
        for _ in range(5):  # lending an open connection asks for no password
            assert await pool.fetchval("SELECT 1") == 1
        assert calls[0] == 1
        async with pool.connection() as lent:
            pg_server.execute(f"ALTER ROLE \"{role}\" PASSWORD '{MARK}-second'")
            current[0] = f"{MARK}-second"
            # The pool's only connection is lent: the next borrower gets a new
            # one, which logs in with the new password.
            async with pool.connection() as fresh:
                cur = await fresh.execute("SELECT current_user")
                assert await cur.fetchone() == (role,)
            assert calls[0] == 2
            cur = await lent.execute("SELECT 2")  # opened with the old one, still fine
            assert await cur.fetchone() == (2,)
        stats = pool.stats()
        assert stats.errors == 0
    no_secret_in(caplog, config, stats)


async def test_a_provider_with_an_old_password_fails_as_authentication_would(
    pg_server: PostgresServer, role: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    pg_server.execute(f"ALTER ROLE \"{role}\" PASSWORD '{MARK}-rotated'")

    def stale(config: pgsd.DatabaseConfig) -> str:
        return f"{MARK}-first"

    with pytest.raises(pgsd.AuthenticationError) as info:
        await pgsd.connect(config_for(pg_server, role, stale))
    no_secret_in(caplog, info.value)


async def test_a_plain_provider_runs_in_a_worker_thread(
    pg_server: PostgresServer, role: str
) -> None:
    threads: list[threading.Thread] = []

    def provider(config: pgsd.DatabaseConfig) -> str:
        threads.append(threading.current_thread())
        return f"{MARK}-first"

    async with await pgsd.connect(config_for(pg_server, role, provider)) as conn:
        cur = await conn.execute("SELECT current_user")
        assert await cur.fetchone() == (role,)
    assert len(threads) == 1
    assert threads[0] is not threading.current_thread()


async def test_a_failing_provider_is_named_and_its_error_kept_without_secrets(
    pg_server: PostgresServer, role: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    async def vault_token(config: pgsd.DatabaseConfig) -> str:
        await anyio.lowlevel.checkpoint()  # as a real provider would
        raise RuntimeError(f"vault sealed (password={MARK}-leaked)")

    with pytest.raises(pgsd.PasswordProviderError) as info:
        await pgsd.connect(config_for(pg_server, role, vault_token))
    message = str(info.value)
    assert "vault_token" in message
    assert "vault sealed" in message
    assert isinstance(info.value, pgsd.ConnectError)
    # Summarised, not chained: the provider's own error may quote what it read.
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__
    no_secret_in(caplog, info.value)


@pytest.mark.parametrize(
    ("answer", "problem"),
    [("", "returned an empty password"), (42, "returned int, not a str")],
    ids=["empty", "not-a-string"],
)
async def test_a_provider_returning_no_usable_password(
    pg_server: PostgresServer, role: str, answer: Any, problem: str
) -> None:
    async def provider(config: pgsd.DatabaseConfig) -> Any:
        await anyio.lowlevel.checkpoint()  # as a real provider would
        return answer

    with pytest.raises(pgsd.PasswordProviderError, match=problem):
        await pgsd.connect(config_for(pg_server, role, provider))


async def test_a_provider_that_hangs_is_bounded_by_connect_timeout(
    pg_server: PostgresServer, role: str
) -> None:
    async def hangs(config: pgsd.DatabaseConfig) -> str:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    with anyio.fail_after(BOUND), pytest.raises(pgsd.PasswordProviderError, match="within 1 s"):
        await pgsd.connect(config_for(pg_server, role, hangs, connect_timeout=1.0))


async def test_a_pool_retries_a_failing_provider_and_heals(
    pg_server: PostgresServer, role: str, caplog: pytest.LogCaptureFixture
) -> None:
    failures = [2]

    async def flaky(config: pgsd.DatabaseConfig) -> str:
        await anyio.lowlevel.checkpoint()  # as a real provider would
        if failures[0]:
            failures[0] -= 1
            raise OSError("token service unreachable")
        return f"{MARK}-first"

    pool_config = pgsd.PoolConfig(min_size=1, max_size=1, reconnect_initial=0.01)
    async with pgsd.ConnectionPool(config_for(pg_server, role, flaky), pool_config) as pool:
        with anyio.fail_after(BOUND):
            assert await pool.fetchval("SELECT current_user") == role
        stats = pool.stats()
    assert stats.errors == 2  # counted as failed attempts, retried with backoff
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("flaky failed: OSError: token service unreachable" in m for m in warned)


def test_password_and_provider_together_are_refused() -> None:
    with pytest.raises(pgsd.ConfigError) as info:
        pgsd.DatabaseConfig(host="h", password="x", password_provider=lambda c: "y")
    assert info.value.key == "password_provider"


def test_a_provider_must_be_callable() -> None:
    with pytest.raises(pgsd.ConfigError) as info:
        pgsd.DatabaseConfig(host="h", password_provider="vault read")  # type: ignore[arg-type]
    assert info.value.key == "password_provider"


def test_the_repr_names_the_provider_and_only_a_commands_program() -> None:
    def get_token(config: pgsd.DatabaseConfig) -> str:
        return "x"

    assert "password_provider=<" in repr(pgsd.DatabaseConfig(host="h", password_provider=get_token))
    command = pgsd.PasswordCommand(["vault", "read", f"-token={MARK}"])
    shown = repr(pgsd.DatabaseConfig(host="h", password_provider=command))
    assert "PasswordCommand('vault', 2 arguments)" in shown
    assert MARK not in shown


# -- password_command --------------------------------------------------------------


def python(code: str) -> list[str]:
    """An argument list running *code* in this interpreter: a real program, no shell."""
    return [sys.executable, "-c", code]


async def test_a_command_gives_the_first_line_of_its_output(
    pg_server: PostgresServer, role: str
) -> None:
    command = pgsd.PasswordCommand(python(f"print('{MARK}-first'); print('ignored')"))
    async with await pgsd.connect(config_for(pg_server, role, command)) as conn:
        cur = await conn.execute("SELECT current_user")
        assert await cur.fetchone() == (role,)


async def test_a_failing_command_quotes_its_error_output_without_the_secret(
    pg_server: PostgresServer, role: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    code = (
        "import sys; print('" + MARK + "-out'); "
        "sys.stderr.write('denied for " + MARK + "-out, password=" + MARK + "-2\\n'); sys.exit(3)"
    )
    command = pgsd.PasswordCommand(python(code))
    with pytest.raises(pgsd.PasswordProviderError) as info:
        await pgsd.connect(config_for(pg_server, role, command))
    message = str(info.value)
    assert "exited with status 3" in message
    assert "denied for ***" in message
    assert repr(sys.executable) in message
    no_secret_in(caplog, info.value)


async def test_a_command_that_prints_nothing(pg_server: PostgresServer, role: str) -> None:
    command = pgsd.PasswordCommand(python("pass"))
    with pytest.raises(pgsd.PasswordProviderError, match="printed no password"):
        await pgsd.connect(config_for(pg_server, role, command))


async def test_a_command_that_cannot_start(pg_server: PostgresServer, role: str) -> None:
    command = pgsd.PasswordCommand(["/nonexistent/pgsd-vault"])
    with pytest.raises(pgsd.PasswordProviderError, match="could not start"):
        await pgsd.connect(config_for(pg_server, role, command))


async def test_a_command_that_hangs_is_stopped_within_its_bound(
    pg_server: PostgresServer, role: str, tmp_path: Path
) -> None:
    marker = tmp_path / "pid"
    code = f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    command = pgsd.PasswordCommand(python(code), timeout=1.0)
    with anyio.fail_after(BOUND), pytest.raises(pgsd.PasswordProviderError, match="stopped"):
        await pgsd.connect(config_for(pg_server, role, command))
    pid = int(await anyio.Path(marker).read_text())
    assert not await anyio.Path(f"/proc/{pid}").exists()  # killed and reaped, not left running


@pytest.mark.parametrize(
    "argv",
    [[], "vault read", ["vault", ""], ["vault", 3], ["va\0ult"]],
    ids=["empty", "a-string", "empty-argument", "not-a-string", "nul"],
)
def test_a_bad_command_is_refused(argv: Any) -> None:
    with pytest.raises(pgsd.ConfigError) as info:
        pgsd.PasswordCommand(argv)
    assert info.value.key == "password_command"


def test_password_command_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "pgsd.toml"
    path.write_text(
        '[databases.app]\nhost = "h"\n'
        'password_command = ["vault", "read", "-field=password", "db/app"]\n'
    )
    database = pgsd.load_config(path).databases["app"]
    assert database.password_provider == pgsd.PasswordCommand(
        ["vault", "read", "-field=password", "db/app"]
    )


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ('password_command = "vault read"', "databases.app.password_command"),
        ('password_command = ["vault"]\npassword = "x"', "databases.app.password_command"),
        ('password_command = ["vault"]\npassword_env = "HOME"', "databases.app.password_command"),
        ('password_provider = "vault"', "databases.app.password_provider"),
    ],
    ids=["a-string", "with-password", "with-password-env", "provider-in-a-file"],
)
def test_a_bad_password_command_in_a_file_names_its_key(
    tmp_path: Path, body: str, key: str
) -> None:
    path = tmp_path / "pgsd.toml"
    path.write_text(f'[databases.app]\nhost = "h"\n{body}\n')
    with pytest.raises(pgsd.ConfigError) as info:
        pgsd.load_config(path)
    assert info.value.key == key
