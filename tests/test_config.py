"""PoolConfig, DatabaseConfig, ConnectorConfig and load_config."""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import textwrap
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict

import pgsd
from support import config_guide_example

SECRET = "s3cr3t-Pa55"


async def hook(conn: Any) -> None:
    """A stand-in for a configure or reset hook."""


def write(tmp_path: Path, text: str, name: str = "pgsd.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def config_error(tmp_path: Path, text: str, **kwargs: Any) -> pgsd.ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(pgsd.ConfigError) as info:
        pgsd.load_config(path, **kwargs)
    assert info.value.path == str(path)
    assert str(info.value).startswith(f"{path}: ")
    return info.value


# --- PoolConfig ----------------------------------------------------------------


def test_pool_defaults() -> None:
    pool = pgsd.PoolConfig()
    assert (pool.min_size, pool.max_size, pool.acquire_timeout) == (1, 5, 30.0)
    assert (pool.max_waiting, pool.max_idle, pool.max_lifetime) == (0, 600.0, 1800.0)
    assert pool.lifetime_jitter == 0.05
    assert (pool.health_check_interval, pool.ping_after_idle) == (30.0, 0.5)
    assert (pool.reconnect_initial, pool.reconnect_max) == (0.1, 10.0)
    assert (pool.reconnect_multiplier, pool.reconnect_jitter) == (2.0, 0.1)
    assert (pool.leak_threshold, pool.close_timeout) == (None, 5.0)
    assert pool.min_server_version == 130000
    assert (pool.configure, pool.reset) == (None, None)


def test_pool_config_is_keyword_only_and_frozen() -> None:
    with pytest.raises(TypeError):
        pgsd.PoolConfig(1, 5)  # type: ignore[misc]
    pool = pgsd.PoolConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        pool.max_size = 10  # type: ignore[misc]


def test_pool_config_accepts_ints_for_durations_and_stores_floats() -> None:
    pool = pgsd.PoolConfig(acquire_timeout=5, max_idle=60, leak_threshold=2)
    assert pool.acquire_timeout == 5.0
    assert isinstance(pool.acquire_timeout, float)
    assert isinstance(pool.leak_threshold, float)


def test_pool_config_accepts_the_edges_of_its_ranges() -> None:
    pool = pgsd.PoolConfig(
        min_size=0,
        max_size=1,
        ping_after_idle=0,
        lifetime_jitter=0,
        reconnect_jitter=0.99,
        reconnect_multiplier=1,
        reconnect_initial=1,
        reconnect_max=1,
        min_server_version=170000,
    )
    assert (pool.min_size, pool.max_size) == (0, 1)


def test_pool_config_accepts_async_hooks() -> None:
    pool = pgsd.PoolConfig(configure=hook, reset=hook)
    assert pool.configure is hook
    assert pool.reset is hook


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("min_size", -1, "must be an integer >= 0, got -1"),
        ("min_size", True, "must be an integer >= 0, got True"),
        ("max_size", 0, "must be an integer >= 1, got 0"),
        ("max_size", 2.0, "must be an integer >= 1, got 2.0"),
        ("max_size", "5", "must be an integer >= 1, got '5'"),
        ("max_waiting", -1, "must be an integer >= 0, got -1"),
        ("min_server_version", 120000, "must be an integer >= 130000, got 120000"),
        ("acquire_timeout", 0, "must be a number > 0, got 0"),
        ("acquire_timeout", -1.5, "must be a number > 0, got -1.5"),
        ("acquire_timeout", math.inf, "must be a number > 0, got inf"),
        ("acquire_timeout", math.nan, "must be a number > 0, got nan"),
        ("acquire_timeout", True, "must be a number > 0, got True"),
        ("acquire_timeout", "30", "must be a number > 0, got '30'"),
        ("max_idle", 0, "must be a number > 0, got 0"),
        ("max_lifetime", 0, "must be a number > 0, got 0"),
        ("health_check_interval", 0, "must be a number > 0, got 0"),
        ("reconnect_initial", 0, "must be a number > 0, got 0"),
        ("reconnect_max", 0, "must be a number > 0, got 0"),
        ("close_timeout", 0, "must be a number > 0, got 0"),
        ("lifetime_jitter", 1, "must be a number >= 0 and < 1, got 1"),
        ("lifetime_jitter", -0.1, "must be a number >= 0 and < 1, got -0.1"),
        ("reconnect_jitter", 1.5, "must be a number >= 0 and < 1, got 1.5"),
        ("ping_after_idle", -1, "must be a number >= 0, got -1"),
        ("reconnect_multiplier", 0.5, "must be a number >= 1, got 0.5"),
        ("leak_threshold", 0, "must be a number > 0, got 0"),
        ("configure", "setup", "must be an async callable or None, got 'setup'"),
        ("reset", 42, "must be an async callable or None, got 42"),
    ],
)
def test_pool_config_rejects_invalid_values(key: str, value: object, problem: str) -> None:
    with pytest.raises(pgsd.ConfigError) as info:
        pgsd.PoolConfig(**{key: value})
    assert (info.value.key, info.value.path) == (key, None)
    assert str(info.value) == f"{key}: {problem}"


def test_pool_config_rejects_min_size_above_max_size() -> None:
    with pytest.raises(pgsd.ConfigError) as info:
        pgsd.PoolConfig(min_size=6, max_size=5)
    assert str(info.value) == "min_size: must not exceed max_size (5), got 6"


def test_pool_config_rejects_reconnect_initial_above_reconnect_max() -> None:
    with pytest.raises(pgsd.ConfigError) as info:
        pgsd.PoolConfig(reconnect_initial=20, reconnect_max=10)
    assert str(info.value) == "reconnect_initial: must not exceed reconnect_max (10), got 20"


def test_pool_config_replace_returns_a_validated_copy() -> None:
    pool = pgsd.PoolConfig()
    bigger = pool.replace(max_size=10)
    assert (bigger.max_size, pool.max_size) == (10, 5)
    with pytest.raises(pgsd.ConfigError, match="max_size"):
        pool.replace(max_size=0)


def test_pool_configs_compare_and_hash_by_value() -> None:
    assert pgsd.PoolConfig(max_size=3) == pgsd.PoolConfig(max_size=3)
    assert hash(pgsd.PoolConfig(max_size=3)) == hash(pgsd.PoolConfig(max_size=3))


# --- DatabaseConfig: fields ----------------------------------------------------


def test_database_defaults() -> None:
    db = pgsd.DatabaseConfig()
    assert (db.host, db.port, db.dbname, db.user, db.password) == (None,) * 5
    assert db.application_name == "pgsd"
    assert (db.connect_timeout, db.cancel_grace) == (30.0, 2.0)
    assert db.required == ()
    assert db.extra == {}
    assert (db.pool, db.name) == (None, None)


@pytest.mark.parametrize(
    ("port", "stored"),
    [(5432, 5432), ("6432", 6432), ("5432,5433", "5432,5433"), (",5433", ",5433")],
)
def test_database_port_accepts_an_int_or_one_port_per_host(
    port: int | str, stored: int | str
) -> None:
    assert pgsd.DatabaseConfig(port=port).port == stored


def test_database_required_accepts_any_iterable_and_stores_a_tuple() -> None:
    required = ["database:CONNECT", "schema:public:USAGE", "table:public.users:select"]
    db = pgsd.DatabaseConfig(required=iter([*required, "role:pg_monitor"]))
    assert db.required == (*required, "role:pg_monitor")


def test_database_extra_is_read_only_and_sorted_with_string_values() -> None:
    settings = {"keepalives_idle": 30, "keepalives": "1"}
    db = pgsd.DatabaseConfig(extra=settings)
    assert list(db.extra.items()) == [("keepalives", "1"), ("keepalives_idle", "30")]
    with pytest.raises(TypeError):
        db.extra["keepalives"] = "0"  # type: ignore[index]
    settings["keepalives"] = "0"
    assert db.extra["keepalives"] == "1"


def test_database_config_is_frozen_and_hashable() -> None:
    db = pgsd.DatabaseConfig(host="db1", extra={"keepalives": "1"}, pool=pgsd.PoolConfig())
    with pytest.raises(dataclasses.FrozenInstanceError):
        db.host = "db2"  # type: ignore[misc]
    same = pgsd.DatabaseConfig(host="db1", extra={"keepalives": "1"}, pool=pgsd.PoolConfig())
    assert db == same
    assert hash(db) == hash(same)
    assert {db: "pool"}[same] == "pool"


def test_database_config_survives_pickling() -> None:
    db = pgsd.DatabaseConfig(host="db1", password=SECRET, extra={"keepalives": "1"})
    assert pickle.loads(pickle.dumps(db)) == db


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("host", "", "must be a non-empty string, got ''"),
        ("host", 5, "must be a non-empty string, got 5"),
        ("dbname", "", "must be a non-empty string, got ''"),
        ("user", "", "must be a non-empty string, got ''"),
        ("name", "", "must be a non-empty string, got ''"),
        ("passfile", 1, "must be a string, got 1"),
        ("service", ["a"], "must be a string, got ['a']"),
        ("options", b"-c x=1", "must be a string, got b'-c x=1'"),
        ("application_name", None, "must be a string, got None"),
        ("port", 0, "must be an integer between 1 and 65535, got 0"),
        ("port", 65536, "must be an integer between 1 and 65535, got 65536"),
        ("port", "abc", "must be an integer between 1 and 65535, got 'abc'"),
        ("port", True, "must be an integer between 1 and 65535, got True"),
        ("port", 5432.0, "must be an integer between 1 and 65535, got 5432.0"),
        (
            "port",
            "5432,abc",
            "must be a comma-separated list of integers between 1 and 65535, got '5432,abc'",
        ),
        (
            "port",
            "5432,70000",
            "must be a comma-separated list of integers between 1 and 65535, got '5432,70000'",
        ),
        (
            "sslmode",
            "strict",
            "must be one of disable, allow, prefer, require, verify-ca, verify-full; got 'strict'",
        ),
        (
            "target_session_attrs",
            "writable",
            "must be one of any, read-write, read-only, primary, standby, prefer-standby;"
            " got 'writable'",
        ),
        ("connect_timeout", 0, "must be a number > 0, got 0"),
        ("connect_timeout", "30", "must be a number > 0, got '30'"),
        ("cancel_grace", -1, "must be a number > 0, got -1"),
        ("pool", {"max_size": 3}, "must be a PoolConfig or None, got {'max_size': 3}"),
    ],
)
def test_database_config_rejects_invalid_values(key: str, value: object, problem: str) -> None:
    with pytest.raises(pgsd.ConfigError) as info:
        pgsd.DatabaseConfig(**{key: value})
    assert (info.value.key, info.value.path) == (key, None)
    assert str(info.value) == f"{key}: {problem}"


def test_database_config_rejects_a_password_of_the_wrong_type_without_echoing_it() -> None:
    with pytest.raises(pgsd.ConfigError) as info:
        pgsd.DatabaseConfig(password=123456789)  # type: ignore[arg-type]
    assert str(info.value) == "password: must be a string, got int"


@pytest.mark.parametrize(
    ("required", "problem"),
    [
        ("database:CONNECT", "must be a list of privilege strings, got 'database:CONNECT'"),
        (42, "must be a list of privilege strings, got 42"),
        ([42], "entries must be strings, got 42"),
    ],
)
def test_database_config_rejects_required_of_the_wrong_type(required: object, problem: str) -> None:
    with pytest.raises(pgsd.ConfigError) as info:
        pgsd.DatabaseConfig(required=required)  # type: ignore[arg-type]
    assert str(info.value) == f"required: {problem}"


@pytest.mark.parametrize(
    "requirement",
    [
        "database",
        "database:",
        "database:USAGE",
        "schema:app",
        "schema::USAGE",
        "schema:app:SELECT",
        "table:public.:SELECT",
        "table:public.t:USAGE",
        "role:",
        "function:f:EXECUTE",
    ],
)
def test_database_config_rejects_malformed_required_privileges(requirement: str) -> None:
    with pytest.raises(pgsd.ConfigError) as info:
        pgsd.DatabaseConfig(required=["database:CONNECT", requirement])
    assert info.value.key == "required"
    assert str(info.value).startswith(f"required: {requirement!r} is not a permission requirement")


@pytest.mark.parametrize(
    "requirement",
    [
        "database:CONNECT",
        "database:temp",
        "schema:public:USAGE",
        "table:public.users:SELECT",
        "table:users:select",
        'table:"My Schema"."t.1":INSERT',
        "role:pg_monitor",
    ],
)
def test_database_config_accepts_what_check_permissions_understands(requirement: str) -> None:
    assert pgsd.DatabaseConfig(required=[requirement]).required == (requirement,)


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ({"host": "db1"}, "extra: host: set the host field instead"),
        ({"password": SECRET}, "extra: password: set the password field instead"),
        ({"bogus": "1"}, "extra: 'bogus' is not a libpq connection keyword"),
        ({"key with space": "1"}, "extra: 'key with space' is not a libpq connection keyword"),
        ({"keepalives": True}, "extra: keepalives: must be a string or a number"),
        ({"keepalives": None}, "extra: keepalives: must be a string or a number"),
        ([("keepalives", "1")], "extra: must be a mapping of libpq keywords to values"),
    ],
)
def test_database_config_rejects_invalid_extra(extra: object, problem: str) -> None:
    with pytest.raises(pgsd.ConfigError) as info:
        pgsd.DatabaseConfig(extra=extra)  # type: ignore[arg-type]
    assert info.value.key == "extra"
    assert str(info.value).startswith(problem)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    ("fields", "key", "problem"),
    [
        # libpq would cut the value at the NUL, silently.
        ({"host": "db1\0.evil"}, "host", "must not contain a NUL character"),
        ({"password": f"{SECRET}\0"}, "password", "must not contain a NUL character"),
        ({"port": "5432\0"}, "port", "must not contain a NUL character"),
        (
            {"application_name": "\ud800"},
            "application_name",
            "must be valid Unicode text: an unpaired surrogate at position 0",
        ),
        ({"extra": {"sslpassword": SECRET + "\0"}}, "extra", "sslpassword: must not contain a NUL"),
    ],
)
def test_database_config_rejects_text_libpq_cannot_take(
    fields: dict[str, Any], key: str, problem: str
) -> None:
    with pytest.raises(pgsd.ConfigError) as info:
        pgsd.DatabaseConfig(**fields)
    assert info.value.key == key
    assert problem in info.value.problem
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: pgsd.DatabaseConfig(connect_timeout=10**400),
            "connect_timeout: must be a number > 0, got 100000000000000000...0000000000000000000",
        ),
        (
            lambda: pgsd.PoolConfig(acquire_timeout=-(10**400)),
            "acquire_timeout: must be a number > 0, got -10000000000000000...0000000000000000000",
        ),
        (
            lambda: pgsd.PoolConfig(max_size=-(10**5000)),
            "max_size: must be an integer >= 1, got <an integer too long to show>",
        ),
        (
            lambda: pgsd.DatabaseConfig(port=10**5000),
            "port: must be an integer between 1 and 65535, got <an integer too long to show>",
        ),
        (
            lambda: pgsd.DatabaseConfig(extra={"keepalives_idle": 10**5000}),
            "extra: keepalives_idle: must be an integer between -2147483648 and 2147483647",
        ),
        (
            lambda: pgsd.DatabaseConfig(extra={"keepalives_idle": math.inf}),
            "extra: keepalives_idle: must be a finite number",
        ),
    ],
)
def test_config_rejects_numbers_out_of_range_without_crashing(
    make: Callable[[], object], message: str
) -> None:
    with pytest.raises(pgsd.ConfigError) as info:
        make()
    assert str(info.value) == message


def test_database_config_rejects_extra_keys_of_mixed_types() -> None:
    with pytest.raises(pgsd.ConfigError) as info:
        pgsd.DatabaseConfig(extra={"keepalives": "1", 1: "a"})  # type: ignore[dict-item]
    assert str(info.value) == "extra: 1 is not a libpq connection keyword"


def test_database_config_messages_shorten_long_and_deep_values() -> None:
    deep: list[Any] = []
    for _ in range(10_000):
        deep = [deep]
    with pytest.raises(pgsd.ConfigError) as info:
        pgsd.DatabaseConfig(host=deep)  # type: ignore[arg-type]
    assert str(info.value) == "host: must be a non-empty string, got [[[[[[[...]]]]]]]"
    with pytest.raises(pgsd.ConfigError) as info:
        pgsd.DatabaseConfig(sslmode="x" * 100_000)
    assert len(str(info.value)) < 200


def test_database_config_rejects_a_port_per_host_that_does_not_match_the_hosts() -> None:
    with pytest.raises(pgsd.ConfigError) as info:
        pgsd.DatabaseConfig(host="db1,db2", port="5432,5433,5434")
    assert str(info.value) == (
        "port: must be one port for all hosts or one per host (2), got 3: '5432,5433,5434'"
    )
    assert pgsd.DatabaseConfig(host="db1,db2", port="5432").port == 5432
    assert pgsd.DatabaseConfig(host="db1,db2", port="5432,").port == "5432,"


def test_database_config_replace_returns_a_validated_copy() -> None:
    db = pgsd.DatabaseConfig(host="db1")
    assert db.replace(port=6432).port == 6432
    with pytest.raises(pgsd.ConfigError, match="port"):
        db.replace(port=0)


# --- DatabaseConfig: secrets ---------------------------------------------------


def secretive_config() -> pgsd.DatabaseConfig:
    return pgsd.DatabaseConfig(
        host="db1", user="app", password=SECRET, extra={"sslpassword": SECRET}, name="source"
    )


@pytest.mark.parametrize("show", [repr, str, format], ids=["repr", "str", "format"])
def test_database_config_never_shows_the_password(show: Callable[[object], str]) -> None:
    text = show(secretive_config())
    assert SECRET not in text
    assert "password='***'" in text
    assert "'sslpassword': '***'" in text


def test_database_config_repr_shows_the_fields_that_are_set() -> None:
    db = pgsd.DatabaseConfig(host="db1", port=5432, dbname="app")
    assert repr(db) == "DatabaseConfig(host='db1', port=5432, dbname='app')"


def test_database_config_repr_does_not_mention_an_unset_password() -> None:
    assert "password" not in repr(pgsd.DatabaseConfig(host="db1"))


def test_connector_config_never_shows_a_password() -> None:
    config = pgsd.ConnectorConfig(databases={"source": secretive_config()})
    assert SECRET not in repr(config)
    assert SECRET not in str(config)


def test_conninfo_carries_the_password_for_the_driver() -> None:
    assert conninfo_to_dict(secretive_config().conninfo())["password"] == SECRET


# --- DatabaseConfig: conninfo, display_name, address ----------------------------


def test_conninfo_holds_set_fields_and_extra_only() -> None:
    db = pgsd.DatabaseConfig(
        host="db1",
        port=5432,
        dbname="app",
        user="app",
        sslmode="verify-full",
        sslrootcert="/etc/ssl/ca.crt",
        passfile="/etc/pgsd/pgpass",
        service="reporting",
        options="-c statement_timeout=5s",
        target_session_attrs="read-write",
        extra={"keepalives_idle": "30"},
        required=["database:CONNECT"],
        cancel_grace=1.0,
        name="source",
    )
    assert conninfo_to_dict(db.conninfo()) == {
        "host": "db1",
        "port": "5432",
        "dbname": "app",
        "user": "app",
        "passfile": "/etc/pgsd/pgpass",
        "service": "reporting",
        "sslmode": "verify-full",
        "sslrootcert": "/etc/ssl/ca.crt",
        "application_name": "pgsd",
        "options": "-c statement_timeout=5s",
        "target_session_attrs": "read-write",
        "connect_timeout": "30",
        "keepalives_idle": "30",
    }


@pytest.mark.parametrize(
    ("timeout", "libpq"), [(0.1, "2"), (1.0, "2"), (2.0, "2"), (2.1, "3"), (30, "30")]
)
def test_conninfo_rounds_connect_timeout_up_to_whole_seconds_of_at_least_two(
    timeout: float, libpq: str
) -> None:
    conninfo = pgsd.DatabaseConfig(connect_timeout=timeout).conninfo()
    assert conninfo_to_dict(conninfo)["connect_timeout"] == libpq


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"name": "source", "dbname": "app"}, "source"),
        ({"dbname": "app", "service": "reporting"}, "app"),
        ({"service": "reporting"}, "service reporting"),
        ({}, "(libpq default database)"),
    ],
)
def test_display_name(fields: dict[str, Any], expected: str) -> None:
    assert pgsd.DatabaseConfig(**fields).display_name == expected


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"host": "db1", "port": 6432}, "db1:6432"),
        ({"host": "db1"}, "db1:(libpq default port)"),
        ({}, "the libpq default host and port"),
        ({"host": "db1,db2", "port": "5432,5433"}, "db1:5432, db2:5433"),
    ],
)
def test_address(fields: dict[str, Any], expected: str) -> None:
    assert pgsd.DatabaseConfig(**fields).address == expected


# --- DatabaseConfig.from_dsn -----------------------------------------------------


def test_from_dsn_reads_a_url() -> None:
    db = pgsd.DatabaseConfig.from_dsn(
        "postgresql://app:p%40ss@db1:6432/app?sslmode=require&connect_timeout=10"
    )
    assert (db.host, db.port, db.dbname, db.user) == ("db1", 6432, "app", "app")
    assert (db.password, db.sslmode, db.connect_timeout) == ("p@ss", "require", 10.0)


def test_from_dsn_reads_a_postgres_url_with_several_hosts() -> None:
    db = pgsd.DatabaseConfig.from_dsn(
        "postgres://app@db1:5432,db2:5433/app?target_session_attrs=read-write"
    )
    assert (db.host, db.port) == ("db1,db2", "5432,5433")
    assert db.target_session_attrs == "read-write"


def test_from_dsn_reads_a_key_value_string() -> None:
    db = pgsd.DatabaseConfig.from_dsn("host=db1 port=5432 dbname=app user=app password='a b'")
    assert (db.host, db.port, db.dbname, db.user, db.password) == (
        "db1",
        5432,
        "app",
        "app",
        "a b",
    )


def test_from_dsn_puts_other_libpq_keywords_in_extra() -> None:
    db = pgsd.DatabaseConfig.from_dsn("host=db1 keepalives=1 sslnegotiation=postgres")
    assert db.extra == {"keepalives": "1", "sslnegotiation": "postgres"}


def test_from_dsn_of_an_empty_string_leaves_everything_to_libpq() -> None:
    assert pgsd.DatabaseConfig.from_dsn("") == pgsd.DatabaseConfig()


def test_from_dsn_overrides_win_and_extra_is_merged() -> None:
    db = pgsd.DatabaseConfig.from_dsn(
        "postgresql://app@db1/app?keepalives=1",
        host="db2",
        required=["database:CONNECT"],
        extra={"keepalives_idle": "30"},
        name="target",
    )
    assert (db.host, db.name, db.required) == ("db2", "target", ("database:CONNECT",))
    assert db.extra == {"keepalives": "1", "keepalives_idle": "30"}


@pytest.mark.parametrize(
    "dsn",
    [
        f"postgresql://app:{SECRET}@[db1/app",
        f"postgresql://app:{SECRET}@db1/app?bogus=1",
        f"host=db1 password={SECRET} dangling",
        f"host=db1 password='{SECRET}",
        f"host=db1 password={SECRET} bogus=1",
    ],
)
def test_from_dsn_rejects_an_unparsable_dsn_without_leaking_its_password(dsn: str) -> None:
    with pytest.raises(pgsd.ConfigError) as info:
        pgsd.DatabaseConfig.from_dsn(dsn)
    err = info.value
    assert err.key == "dsn"
    assert str(err).startswith("dsn: cannot parse the DSN: ")
    assert SECRET not in str(err)
    assert SECRET not in repr(err)
    assert err.__cause__ is None
    assert err.__suppress_context__


def test_from_dsn_says_a_bad_value_came_from_the_dsn() -> None:
    with pytest.raises(pgsd.ConfigError) as info:
        pgsd.DatabaseConfig.from_dsn("postgresql://app@db1:abc/app")
    assert str(info.value) == (
        "port: must be an integer between 1 and 65535, got 'abc' (from the dsn)"
    )


def test_from_dsn_rejects_a_non_numeric_connect_timeout() -> None:
    with pytest.raises(pgsd.ConfigError) as info:
        pgsd.DatabaseConfig.from_dsn("host=db1 connect_timeout=soon")
    assert str(info.value) == "connect_timeout: must be a number > 0, got 'soon' (from the dsn)"


@pytest.mark.parametrize(
    ("dsn", "key", "problem"),
    [
        ("port=" + "9" * 5000, "port", "must be an integer between 1 and 65535"),
        ("host=db1,db2 port=5432," + "9" * 5000, "port", "must be a comma-separated list"),
        ("host=db1\0 host=evil", "dsn", "must not contain a NUL character"),
        ("host=\ud800", "dsn", "must be valid Unicode text: an unpaired surrogate at position 5"),
        ("postgresql:///C2%80", "dsn", "cannot parse the DSN: a %-escape in the URL does not"),
        ("host=db1,db2 port=5432,5433,5434", "port", "one per host (2), got 3"),
    ],
)
def test_from_dsn_rejects_what_libpq_would_misread_or_psycopg_cannot_decode(
    dsn: str, key: str, problem: str
) -> None:
    with pytest.raises(pgsd.ConfigError) as info:
        pgsd.DatabaseConfig.from_dsn(dsn)
    assert info.value.key == key
    assert problem in info.value.problem


@pytest.mark.parametrize(
    "dsn",
    [
        # libpq quotes the token with the bad %-escape...
        f"postgresql://app:pa%zz{SECRET}@db1/app",
        # ...the URL with a space in it...
        f"postgresql://app:{SECRET} x@db1/app",
        # ...the word after an unquoted space...
        f"host=db1 password=ab {SECRET}",
        # ...and the whole URL when "://" is mistyped.
        f"postgresql//app:{SECRET}@db1/app",
        # "@host" forgotten, or a "/" in the password: read as host:port.
        f"postgresql://app:{SECRET}",
        f"postgresql://app:{SECRET}/@db1/app",
        # The password in a DSN whose port is wrong.
        f"host=db1 password={SECRET} port={SECRET}",
    ],
)
def test_from_dsn_errors_never_show_a_misplaced_password(dsn: str) -> None:
    with pytest.raises(pgsd.ConfigError) as info:
        pgsd.DatabaseConfig.from_dsn(dsn)
    err = info.value
    assert SECRET not in "".join(traceback.format_exception(err))
    assert SECRET not in repr(err)
    # Not even as the hidden context, where psycopg's error would quote it.
    assert err.__context__ is None
    assert err.__cause__ is None


def test_from_dsn_errors_show_libpq_quotes_of_a_dsn_without_secrets() -> None:
    with pytest.raises(pgsd.ConfigError) as info:
        pgsd.DatabaseConfig.from_dsn("host=db1 bogus=1")
    assert str(info.value) == 'dsn: cannot parse the DSN: invalid connection option "bogus"'


# --- round trips (hypothesis) -----------------------------------------------------

AWKWARD = " '\"\\@:/=,?#&%é€😀\t"
awkward_text = st.text(
    st.one_of(
        st.sampled_from(AWKWARD),
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    ),
    min_size=1,
    max_size=20,
)
hostnames = st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z][a-z0-9-]{0,10}){0,2}", fullmatch=True)
ports = st.integers(min_value=1, max_value=65535)


def optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)


@st.composite
def database_configs(draw: st.DrawFn) -> pgsd.DatabaseConfig:
    count = draw(st.integers(min_value=1, max_value=3))
    hosts = draw(st.lists(awkward_text.filter(lambda h: "," not in h), min_size=count))
    if count == 1:
        port: int | str | None = draw(optional(ports))
    else:
        port = ",".join(str(draw(ports)) for _ in hosts)
    return pgsd.DatabaseConfig(
        host=",".join(hosts),
        port=port,
        dbname=draw(optional(awkward_text)),
        user=draw(optional(awkward_text)),
        password=draw(optional(awkward_text)),
        sslmode=draw(st.sampled_from([None, "disable", "require", "verify-full"])),
        application_name=draw(awkward_text),
        options=draw(optional(awkward_text)),
        connect_timeout=float(draw(st.integers(min_value=2, max_value=86400))),
        extra=draw(
            st.dictionaries(
                st.sampled_from(["keepalives", "keepalives_idle", "sslpassword", "gssencmode"]),
                awkward_text,
            )
        ),
    )


@given(database_configs())
def test_conninfo_round_trips_through_from_dsn(db: pgsd.DatabaseConfig) -> None:
    assert pgsd.DatabaseConfig.from_dsn(db.conninfo()) == db


@given(database_configs(), awkward_text)
def test_repr_never_contains_the_password(db: pgsd.DatabaseConfig, suffix: str) -> None:
    db = db.replace(password=SECRET + suffix)
    assert SECRET not in repr(db)
    assert SECRET not in str(pgsd.ConnectorConfig(databases={"source": db}))


@given(
    user=awkward_text,
    password=awkward_text,
    host=st.one_of(hostnames, st.just("::1")),
    port=optional(ports),
    dbname=awkward_text,
)
def test_url_dsn_round_trips(
    user: str, password: str, host: str, port: int | None, dbname: str
) -> None:
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    userinfo = f"{quote(user, safe='')}:{quote(password, safe='')}"
    url = f"postgresql://{userinfo}@{netloc}/{quote(dbname, safe='')}?sslmode=require"
    db = pgsd.DatabaseConfig.from_dsn(url)
    expected = pgsd.DatabaseConfig(
        host=host, port=port, dbname=dbname, user=user, password=password, sslmode="require"
    )
    assert db == expected
    assert pgsd.DatabaseConfig.from_dsn(db.conninfo()) == db


# --- ConnectorConfig ----------------------------------------------------------------


def test_connector_config_names_each_database_after_its_key() -> None:
    config = pgsd.ConnectorConfig(
        databases={
            "source": pgsd.DatabaseConfig(host="db1"),
            "target": pgsd.DatabaseConfig(host="db2", name="other"),
        }
    )
    assert [db.name for db in config.databases.values()] == ["source", "target"]
    assert config.databases["target"].host == "db2"


def test_connector_config_databases_are_read_only() -> None:
    source = pgsd.DatabaseConfig(host="db1")
    databases = {"source": source}
    config = pgsd.ConnectorConfig(databases=databases)
    with pytest.raises(TypeError):
        config.databases["target"] = source  # type: ignore[index]
    databases["target"] = source
    assert list(config.databases) == ["source"]


def test_pool_config_of_a_database_is_its_own_else_the_default() -> None:
    own = pgsd.PoolConfig(max_size=10)
    default = pgsd.PoolConfig(max_size=3)
    config = pgsd.ConnectorConfig(
        databases={"source": pgsd.DatabaseConfig(), "target": pgsd.DatabaseConfig(pool=own)},
        pool=default,
    )
    assert config.pool_config("source") is default
    assert config.pool_config("target") is own


def test_connector_config_uses_the_default_pool_config() -> None:
    config = pgsd.ConnectorConfig(databases={"source": pgsd.DatabaseConfig()})
    assert config.pool == pgsd.PoolConfig()


def test_pool_config_of_an_unknown_database_raises_key_error() -> None:
    config = pgsd.ConnectorConfig(databases={"source": pgsd.DatabaseConfig()})
    with pytest.raises(KeyError, match="no database named 'missing' \\(configured: 'source'\\)"):
        config.pool_config("missing")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"databases": {"": pgsd.DatabaseConfig()}}, "databases: names must be non-empty"),
        ({"databases": {"x": "host=db1"}}, "databases.x: must be a DatabaseConfig"),
        ({"databases": [pgsd.DatabaseConfig()]}, "databases: must be a mapping"),
        (
            {"databases": {}, "pool": {"max_size": 3}},
            "pool: must be a PoolConfig, got {'max_size': 3}",
        ),
    ],
)
def test_connector_config_rejects_invalid_values(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(pgsd.ConfigError) as info:
        pgsd.ConnectorConfig(**kwargs)
    assert str(info.value).startswith(message)


def test_connector_configs_compare_and_hash_by_value() -> None:
    def make() -> pgsd.ConnectorConfig:
        return pgsd.ConnectorConfig(databases={"source": pgsd.DatabaseConfig(host="db1")})

    assert make() == make()
    assert hash(make()) == hash(make())


# --- load_config: reading ------------------------------------------------------------

DESIGN_EXAMPLE = config_guide_example()


def test_load_config_reads_the_documented_example(tmp_path: Path) -> None:
    path = write(tmp_path, DESIGN_EXAMPLE)
    config = pgsd.load_config(path, environ={"SOURCE_PGPASSWORD": SECRET})
    assert config.pool == pgsd.PoolConfig(max_size=5, acquire_timeout=30.0)
    assert config.databases["source"] == pgsd.DatabaseConfig(
        host="db1.internal",
        port=5432,
        dbname="app",
        user="pgsd",
        password=SECRET,
        sslmode="verify-full",
        sslrootcert="/etc/ssl/db-ca.crt",
        connect_timeout=30.0,
        required=("database:CONNECT", "schema:public:USAGE"),
        name="source",
    )
    target = config.databases["target"]
    assert (target.host, target.dbname, target.user) == ("db2.internal", "app", "pgsd")
    assert target.sslmode == "require"
    assert config.pool_config("target").max_size == 10
    assert config.pool_config("source") is config.pool


def test_load_config_defaults_apply_when_no_pool_table(tmp_path: Path) -> None:
    config = pgsd.load_config(write(tmp_path, '[databases.source]\nhost = "db1"\n'))
    assert config.pool == pgsd.PoolConfig()
    assert config.databases["source"].pool is None


def test_load_config_database_pool_merges_over_the_pool_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [pool]
        max_size = 4
        acquire_timeout = 12
        max_idle = 90

        [databases.source]
        host = "db1"

        [databases.source.pool]
        max_size = 8
        max_idle = 45.5
        """,
    )
    pool = pgsd.load_config(path).pool_config("source")
    assert (pool.max_size, pool.acquire_timeout, pool.max_idle) == (8, 12.0, 45.5)
    assert pool.min_size == 1


def test_load_config_explicit_keys_override_the_dsn(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [databases.target]
        dsn = "postgresql://pgsd@db2/app?sslmode=require&keepalives=1"
        dbname = "reports"
        sslmode = "verify-full"
        cancel_grace = 1
        """,
    )
    db = pgsd.load_config(path).databases["target"]
    assert (db.host, db.user, db.dbname, db.sslmode) == ("db2", "pgsd", "reports", "verify-full")
    assert db.cancel_grace == 1.0
    assert db.extra == {"keepalives": "1"}


def test_load_config_reads_password_env_from_os_environ_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGSD_TEST_PASSWORD", SECRET)
    path = write(tmp_path, '[databases.source]\npassword_env = "PGSD_TEST_PASSWORD"\n')
    assert pgsd.load_config(path).databases["source"].password == SECRET


def test_load_config_password_env_overrides_the_dsn_password(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [databases.source]
        dsn = "postgresql://app:old@db1/app"
        password_env = "SOURCE_PGPASSWORD"
        """,
    )
    config = pgsd.load_config(path, environ={"SOURCE_PGPASSWORD": SECRET})
    assert config.databases["source"].password == SECRET


def test_load_config_allows_an_inline_password(tmp_path: Path) -> None:
    path = write(tmp_path, f'[databases.source]\npassword = "{SECRET}"\n')
    db = pgsd.load_config(path).databases["source"]
    assert db.password == SECRET
    assert SECRET not in repr(db)


def test_load_config_passes_passfile_and_service_through_to_libpq(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [databases.source]
        service = "reporting"
        passfile = "/etc/pgsd/pgpass"
        """,
    )
    params = conninfo_to_dict(pgsd.load_config(path).databases["source"].conninfo())
    assert params["service"] == "reporting"
    assert params["passfile"] == "/etc/pgsd/pgpass"
    assert "password" not in params


def test_load_config_passes_other_libpq_keywords_through_as_extra(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [databases.source]
        host = "db1"
        keepalives_idle = 30
        sslnegotiation = "postgres"
        extra = { keepalives = "1" }
        """,
    )
    db = pgsd.load_config(path).databases["source"]
    assert db.extra == {"keepalives": "1", "keepalives_idle": "30", "sslnegotiation": "postgres"}
    assert "keepalives_idle=30" in db.conninfo()


def test_load_config_accepts_a_path_object_and_a_string(tmp_path: Path) -> None:
    path = write(tmp_path, '[databases.source]\nhost = "db1"\n')
    assert pgsd.load_config(path) == pgsd.load_config(os.fspath(path))


def test_load_config_keeps_the_file_order_of_databases(tmp_path: Path) -> None:
    path = write(tmp_path, "[databases.b]\n[databases.a]\n[databases.c]\n")
    assert list(pgsd.load_config(path).databases) == ["b", "a", "c"]


# --- load_config: errors -------------------------------------------------------------


def test_load_config_reports_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    with pytest.raises(pgsd.ConfigError) as info:
        pgsd.load_config(path)
    assert str(info.value) == f"{path}: file not found"
    assert (info.value.path, info.value.key) == (str(path), None)


def test_load_config_reports_an_unreadable_path(tmp_path: Path) -> None:
    with pytest.raises(pgsd.ConfigError) as info:
        pgsd.load_config(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}: cannot read the file: ")


def test_load_config_reports_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "pgsd.toml"
    path.write_bytes(b'[databases.source]\nhost = "\xff"\n')
    with pytest.raises(pgsd.ConfigError) as info:
        pgsd.load_config(path)
    assert str(info.value) == f"{path}: not valid UTF-8"


def test_load_config_reports_a_toml_syntax_error_with_its_line(tmp_path: Path) -> None:
    err = config_error(tmp_path, '[databases.source]\nhost = "db1"\nport 5432\n')
    assert err.key is None
    assert err.problem.startswith("invalid TOML: ")
    assert "line 3" in err.problem


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("[pool]\nmax_size = 5\n", "databases", "missing: add a [databases.NAME] table"),
        ("[databases]\n", "databases", "no database configured"),
        ('databases = "db1"\n', "databases", "must be a table, got 'db1'"),
        ('[databases]\n"" = {}\n', "databases", "database names must not be empty"),
        ("pool = 5\n[databases.a]\n", "pool", "must be a table, got 5"),
        ('[databases]\nsource = "db1"\n', "databases.source", "must be a table, got 'db1'"),
        ("[databases.a]\n[databases.a.pool]\n[other]\n", "other", "unknown key"),
        (
            "[pool]\nmax_sise = 3\n[databases.a]\n",
            "pool.max_sise",
            "unknown key (did you mean 'max_size'?)",
        ),
        ('[databases.a]\nhots = "db1"\n', "databases.a.hots", "unknown key (did you mean 'host'?)"),
        ('[databases.a]\nname = "db1"\n', "databases.a.name", "unknown key"),
        (
            '[databases.a]\nport = "abc"\n',
            "databases.a.port",
            "must be an integer between 1 and 65535, got 'abc'",
        ),
        (
            "[databases.a]\nport = 5432.0\n",
            "databases.a.port",
            "must be an integer between 1 and 65535, got 5432.0",
        ),
        (
            "[pool]\nmax_size = true\n[databases.a]\n",
            "pool.max_size",
            "must be an integer >= 1, got True",
        ),
        (
            '[pool]\nacquire_timeout = "30s"\n[databases.a]\n',
            "pool.acquire_timeout",
            "must be a number > 0, got '30s'",
        ),
        (
            "[pool]\nmin_size = 9\n[databases.a]\n",
            "pool.min_size",
            "must not exceed max_size (5), got 9",
        ),
        (
            '[pool]\nconfigure = "setup"\n[databases.a]\n',
            "pool.configure",
            "a callable cannot be set in a file",
        ),
        (
            '[databases.a.pool]\nreset = "x"\n',
            "databases.a.pool.reset",
            "a callable cannot be set in a file",
        ),
        (
            "[databases.a.pool]\nmax_size = 0\n",
            "databases.a.pool.max_size",
            "must be an integer >= 1, got 0",
        ),
        (
            "[databases.a.pool]\nmax_sise = 3\n",
            "databases.a.pool.max_sise",
            "unknown key (did you mean 'max_size'?)",
        ),
        ("[databases.a]\npool = 3\n", "databases.a.pool", "must be a table, got 3"),
        ('[databases.a]\nsslmode = "on"\n', "databases.a.sslmode", "must be one of disable, allow"),
        (
            '[databases.a]\nrequired = "database:CONNECT"\n',
            "databases.a.required",
            "must be a list of privilege strings",
        ),
        (
            '[databases.a]\nrequired = ["schema:app:SELECT"]\n',
            "databases.a.required",
            "'schema:app:SELECT' is not a permission requirement",
        ),
        (
            "[databases.a]\nkeepalives = true\n",
            "databases.a.keepalives",
            "must be a string or a number, got True",
        ),
        ('[databases.a]\nextra = "keepalives=1"\n', "databases.a.extra", "must be a table"),
        (
            '[databases.a]\nextra = { bogus = "1" }\n',
            "databases.a.extra",
            "'bogus' is not a libpq connection keyword",
        ),
        ("[databases.a]\ndsn = 5\n", "databases.a.dsn", "must be a string, got int"),
        ('[databases.a]\ndsn = "postgresql://db1:abc/app"\n', "databases.a.port", "(from the dsn)"),
        (
            "[databases.a]\npassword_env = 5\n",
            "databases.a.password_env",
            "must be an environment variable name, got 5",
        ),
        (
            '[databases."my.db"]\nport = 0\n',
            'databases."my.db".port',
            "must be an integer between 1 and 65535, got 0",
        ),
    ],
)
def test_load_config_reports_the_key_and_problem(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    err = config_error(tmp_path, text, environ={})
    assert err.key == key
    assert problem in err.problem
    assert str(err) == f"{err.path}: {key}: {err.problem}"


def test_load_config_spec_message_for_a_bad_port(tmp_path: Path) -> None:
    err = config_error(tmp_path, '[databases.source]\nport = "abc"\n')
    assert str(err) == (
        f"{err.path}: databases.source.port: must be an integer between 1 and 65535, got 'abc'"
    )


def test_load_config_reports_an_unset_password_env_variable(tmp_path: Path) -> None:
    err = config_error(
        tmp_path, '[databases.source]\npassword_env = "SOURCE_PGPASSWORD"\n', environ={}
    )
    assert err.key == "databases.source.password_env"
    assert err.problem == "environment variable 'SOURCE_PGPASSWORD' is not set"


def test_load_config_reports_an_empty_password_env_variable(tmp_path: Path) -> None:
    err = config_error(
        tmp_path,
        '[databases.source]\npassword_env = "SOURCE_PGPASSWORD"\n',
        environ={"SOURCE_PGPASSWORD": ""},
    )
    assert err.problem == "environment variable 'SOURCE_PGPASSWORD' is empty"


def test_load_config_rejects_both_password_and_password_env(tmp_path: Path) -> None:
    text = f'[databases.source]\npassword = "{SECRET}"\npassword_env = "SOURCE_PGPASSWORD"\n'
    err = config_error(tmp_path, text, environ={"SOURCE_PGPASSWORD": SECRET})
    assert err.key == "databases.source.password_env"
    assert err.problem == "set either password or password_env, not both"
    assert SECRET not in str(err)


def test_load_config_never_puts_the_environment_password_in_an_error(tmp_path: Path) -> None:
    text = '[databases.source]\npassword_env = "SOURCE_PGPASSWORD"\nport = 0\n'
    err = config_error(tmp_path, text, environ={"SOURCE_PGPASSWORD": SECRET})
    assert err.key == "databases.source.port"
    assert SECRET not in str(err)
    assert SECRET not in repr(err)


def test_load_config_never_puts_a_dsn_password_in_an_error(tmp_path: Path) -> None:
    text = f'[databases.source]\ndsn = "postgresql://app:{SECRET}@[db1/app"\n'
    err = config_error(tmp_path, text)
    assert err.key == "databases.source.dsn"
    assert err.problem.startswith("cannot parse the DSN: ")
    assert SECRET not in str(err)
    assert err.__cause__ is None
    assert err.__suppress_context__


def test_prepare_threshold_false_in_a_file_means_never_prepare(tmp_path: Path) -> None:
    path = tmp_path / "pgsd.toml"
    path.write_text('[databases.a]\nhost = "h"\nprepare_threshold = false\n')
    assert pgsd.load_config(path).databases["a"].prepare_threshold is None


def test_prepare_threshold_true_in_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pgsd.toml"
    path.write_text('[databases.a]\nhost = "h"\nprepare_threshold = true\n')
    with pytest.raises(pgsd.ConfigError) as info:
        pgsd.load_config(path)
    assert "databases.a.prepare_threshold" in str(info.value)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
        ("a = " + "{b = " * 2000 + "1" + "}" * 2000 + "\n", "nested too deeply"),
        ("a = 1" + "0" * 5000 + "\n", "an integer has too many digits"),
    ],
)
def test_load_config_reports_toml_that_python_cannot_read(
    tmp_path: Path, text: str, problem: str
) -> None:
    err = config_error(tmp_path, text)
    assert err.key is None
    assert err.problem.startswith("invalid TOML: ")
    assert problem in err.problem


def test_load_config_rejects_a_number_beyond_the_float_range(tmp_path: Path) -> None:
    err = config_error(tmp_path, f"[pool]\nacquire_timeout = 1{'0' * 400}\n[databases.a]\n")
    assert err.key == "pool.acquire_timeout"
    assert err.problem.startswith("must be a number > 0, got 1000")


def test_load_config_never_echoes_a_secret_keyword_of_the_wrong_type(tmp_path: Path) -> None:
    err = config_error(tmp_path, f'[databases.a]\nsslpassword = ["{SECRET}"]\n')
    assert (
        str(err) == f"{err.path}: databases.a.sslpassword: must be a string or a number, got list"
    )


def test_load_config_rejects_a_nul_in_a_value(tmp_path: Path) -> None:
    err = config_error(tmp_path, '[databases.a]\nhost = "db1\\u0000.evil"\n')
    assert err.key == "databases.a.host"
    assert err.problem == "must not contain a NUL character"


def test_load_config_escapes_control_characters_in_keys(tmp_path: Path) -> None:
    err = config_error(tmp_path, '[databases."a\\u0000b\\nc"]\nport = 0\n')
    assert err.key == 'databases."a\\u0000b\\u000Ac".port'


def test_load_config_reports_a_nul_in_the_file_name(tmp_path: Path) -> None:
    path = str(tmp_path / "pgsd\0.toml")
    with pytest.raises(pgsd.ConfigError) as info:
        pgsd.load_config(path)
    assert info.value.path == path
    assert info.value.problem == "the file name contains a NUL character"


# --- read replicas ------------------------------------------------------------


def test_a_replica_inherits_what_it_does_not_set_from_its_primary() -> None:
    secret = "s3cret-primary"
    primary = pgsd.DatabaseConfig(
        host="db1",
        dbname="app",
        user="svc",
        password=secret,
        sslmode="verify-full",
        target_session_attrs="read-write",
        connect_timeout=4,
        extra={"keepalives_idle": "30"},
        replicas=[
            "postgresql://db2.internal/other",
            "host=db3.internal port=5433",
            pgsd.DatabaseConfig(host="db4", user="reader", password="own", name="analytics"),
        ],
    )
    dsn_url, dsn_keywords, own = primary.replica_configs()
    assert (dsn_url.host, dsn_url.dbname, dsn_url.user) == ("db2.internal", "other", "svc")
    assert (dsn_keywords.host, dsn_keywords.port, dsn_keywords.dbname) == (
        "db3.internal",
        5433,
        "app",
    )
    for replica in (dsn_url, dsn_keywords):
        assert replica.password == secret
        assert replica.sslmode == "verify-full"
        assert replica.connect_timeout == 4
        assert replica.extra == {"keepalives_idle": "30"}
        assert replica.target_session_attrs is None  # a standby is never read-write
        assert secret not in repr(replica)
    assert (own.user, own.password, own.name) == ("reader", "own", "analytics")
    assert dsn_url.name == "app replica db2.internal"
    assert dsn_keywords.name == "app replica db3.internal:5433"
    assert primary.replicas[1] == pgsd.DatabaseConfig(host="db3.internal", port=5433)
    assert secret not in repr(primary)


def test_replica_settings_have_their_defaults_and_compare_by_value() -> None:
    plain = pgsd.DatabaseConfig(host="db1")
    assert (plain.replicas, plain.max_replica_lag, plain.replica_fallback) == ((), 10.0, "primary")
    assert plain.replica_pool is None
    assert plain.replica_configs() == ()
    one = pgsd.DatabaseConfig(host="db1", replicas=["host=db2"], max_replica_lag=5)
    assert one == pgsd.DatabaseConfig(host="db1", replicas=("host=db2",), max_replica_lag=5.0)
    assert hash(one) == hash(
        pgsd.DatabaseConfig(host="db1", replicas=["host=db2"], max_replica_lag=5)
    )


@pytest.mark.parametrize(
    ("changes", "key", "problem"),
    [
        ({"replicas": "host=db2"}, "replicas", "must be a list"),
        ({"replicas": [3]}, "replicas[0]", "must be a DatabaseConfig or a DSN string"),
        ({"replicas": ["port=5433"]}, "replicas[0]", "needs a host"),
        ({"replicas": ["host=db2", "host=db2"]}, "replicas[1]", "is given twice"),
        ({"replicas": ["host=db1"]}, "replicas[0]", "is given twice"),
        ({"replicas": ["host=db2 port=99999"]}, "replicas[0].port", "between 1 and 65535"),
        (
            {"replicas": [pgsd.DatabaseConfig(host="db2", replicas=["host=db3"])]},
            "replicas[0]",
            "cannot have replicas",
        ),
        ({"max_replica_lag": 0}, "max_replica_lag", "> 0"),
        ({"replica_fallback": "any"}, "replica_fallback", "one of primary, error"),
        ({"replica_fallback": None}, "replica_fallback", "one of primary, error"),
        ({"replica_pool": {"max_size": 3}}, "replica_pool", "must be a PoolConfig"),
    ],
)
def test_invalid_replica_settings_are_refused_naming_the_key(
    changes: dict[str, Any], key: str, problem: str
) -> None:
    with pytest.raises(pgsd.ConfigError) as raised:
        pgsd.DatabaseConfig(host="db1", **changes)
    assert raised.value.key == key
    assert problem in str(raised.value)


def test_a_replica_dsn_with_a_password_never_shows_it_in_the_error() -> None:
    with pytest.raises(pgsd.ConfigError) as raised:
        pgsd.DatabaseConfig(host="db1", replicas=["postgresql://u:hunter2@db2:99999/app"])
    assert "hunter2" not in str(raised.value)


def test_load_config_reads_replicas_their_lag_bound_fallback_and_pool(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [pool]
        max_size = 7
        [databases.app]
        host = "db1"
        dbname = "app"
        replicas = [
            "postgresql://db2.internal/app",
            "host=db3.internal",
            {host = "db4", port = 5433, keepalives_idle = 30},
        ]
        max_replica_lag = 5
        replica_fallback = "error"
        [databases.app.replica_pool]
        max_size = 20
        """,
    )
    app = pgsd.load_config(path).databases["app"]
    assert (app.max_replica_lag, app.replica_fallback) == (5.0, "error")
    assert app.replica_pool is not None
    assert app.replica_pool.max_size == 20
    hosts = [(r.host, r.port, r.dbname) for r in app.replica_configs()]
    assert hosts == [
        ("db2.internal", None, "app"),
        ("db3.internal", None, "app"),
        ("db4", 5433, "app"),
    ]
    assert app.replica_configs()[2].extra == {"keepalives_idle": "30"}
    assert pgsd.load_config(path) == pgsd.load_config(path)


def test_load_config_names_the_replica_key_that_is_wrong(tmp_path: Path) -> None:
    error = config_error(
        tmp_path,
        """
        [databases.app]
        host = "db1"
        replicas = [{host = "db4", password_command = ["vault"]}]
        """,
    )
    assert error.key == "databases.app.replicas[0].password_command"
    assert "unknown key" in str(error)
