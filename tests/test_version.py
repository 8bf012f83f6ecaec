"""Server versions: parsing, comparison, the minimum, and reading them from a server."""

from __future__ import annotations

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg.pq import TransactionStatus

import pgsd
from pgsd._errors import UnsupportedServerVersion
from pgsd._version import (
    MIN_SERVER_VERSION,
    ServerVersion,
    check_supported,
    fetch_row,
    parse_version_num,
)
from pgsd.testing import PostgresServer

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("text", "num"),
    [
        ("15.18 (Debian 15.18-0+deb12u1)", 150018),
        ("13.23", 130023),
        ("18beta1", 180000),
        ("17rc1", 170000),
        ("19devel", 190000),
        ("10.0", 100000),
        ("9.6.24", 90624),
        ("9.6devel", 90600),
        ("PostgreSQL 16.4 on x86_64-pc-linux-gnu, compiled by gcc 12.2.0, 64-bit", 160004),
    ],
)
def test_parse_version_num_reads_server_version_strings(text: str, num: int) -> None:
    assert parse_version_num(text) == num


@pytest.mark.parametrize("text", ["", "devel", "PostgreSQL", "v15.4", "fifteen"])
def test_parse_version_num_rejects_strings_without_a_number(text: str) -> None:
    with pytest.raises(ValueError, match="not a PostgreSQL version"):
        parse_version_num(text)


def test_from_num_splits_a_two_part_version() -> None:
    version = ServerVersion.from_num(150004, "PostgreSQL 15.4")
    assert (version.major, version.minor, version.patch) == (15, 4, 0)
    assert version.text == "PostgreSQL 15.4"
    assert str(version) == "15.4"


def test_from_num_splits_a_pre_10_version_into_three_parts() -> None:
    version = ServerVersion.from_num(90624)
    assert (version.major, version.minor, version.patch) == (9, 6, 24)
    assert str(version) == "9.6.24"


@pytest.mark.parametrize("num", [0, -1])
def test_from_num_rejects_unknown_version_numbers(num: int) -> None:
    with pytest.raises(ValueError, match="not a server version number"):
        ServerVersion.from_num(num)


@given(major=st.integers(10, 99), minor=st.integers(0, 99))
def test_two_part_versions_round_trip_through_text(major: int, minor: int) -> None:
    version = ServerVersion.from_num(major * 10000 + minor)
    assert (version.major, version.minor) == (major, minor)
    assert parse_version_num(str(version)) == version.num


@given(minor=st.integers(0, 6), patch=st.integers(0, 99))
def test_pre_10_versions_round_trip_through_text(minor: int, patch: int) -> None:
    version = ServerVersion.from_num(90000 + minor * 100 + patch)
    assert parse_version_num(str(version)) == version.num


@given(a=st.integers(1, 999999), b=st.integers(1, 999999))
def test_versions_order_by_number(a: int, b: int) -> None:
    va, vb = ServerVersion.from_num(a, "x"), ServerVersion.from_num(b, "y")
    assert (va < vb) == (a < b)
    assert (va == vb) == (a == b)


def test_versions_with_different_text_are_equal_and_hash_alike() -> None:
    from_libpq = ServerVersion.from_num(160004)
    from_query = ServerVersion.from_num(160004, "PostgreSQL 16.4 on x86_64")
    assert from_libpq == from_query
    assert len({from_libpq, from_query}) == 1


def test_server_version_is_frozen() -> None:
    version = ServerVersion.from_num(150004)
    with pytest.raises(AttributeError):
        version.num = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("num", "supported"), [(120022, False), (130000, True), (130023, True), (180000, True)]
)
def test_supported_means_postgresql_13_or_later(num: int, supported: bool) -> None:
    assert ServerVersion.from_num(num).supported is supported


def test_a_lower_minimum_cannot_admit_older_servers() -> None:
    assert not ServerVersion.from_num(120022).is_supported(minimum=90600)
    assert ServerVersion.from_num(150004).is_supported(minimum=150000)
    assert not ServerVersion.from_num(150004).is_supported(minimum=160000)


def test_check_supported_accepts_the_minimum() -> None:
    check_supported(ServerVersion.from_num(MIN_SERVER_VERSION))


def test_check_supported_refuses_an_old_server() -> None:
    with pytest.raises(UnsupportedServerVersion) as info:
        check_supported(ServerVersion.from_num(120022), database="source")
    assert (info.value.version_num, info.value.minimum) == (120022, MIN_SERVER_VERSION)
    assert info.value.database == "source"
    assert "12.22" in str(info.value)


def test_check_supported_honours_a_stricter_minimum() -> None:
    with pytest.raises(UnsupportedServerVersion) as info:
        check_supported(ServerVersion.from_num(150004), minimum=160000)
    assert info.value.minimum == 160000
    assert info.value.database is None


def test_check_supported_raises_a_lower_minimum_to_postgresql_13() -> None:
    with pytest.raises(UnsupportedServerVersion) as info:
        check_supported(ServerVersion.from_num(90624), minimum=90000)
    assert info.value.minimum == MIN_SERVER_VERSION


# -- against a server -------------------------------------------------------


@pytest.mark.matrix
async def test_get_version_matches_the_server(
    conn: pgsd.Connection, pg_server: PostgresServer
) -> None:
    version = await pgsd.get_version(conn)
    cursor = await conn.execute("SHOW server_version_num")
    row = await cursor.fetchone()
    assert row is not None
    assert version.num == int(row[0])
    assert version.major == pg_server.major
    assert version.text.startswith(f"PostgreSQL {pg_server.major}.")
    assert version.supported


@pytest.mark.matrix
async def test_get_version_inside_a_transaction_leaves_it_open(conn: pgsd.Connection) -> None:
    async with conn.transaction():
        await pgsd.get_version(conn)
        assert conn.info.transaction_status == TransactionStatus.INTRANS
        await conn.execute("SELECT 1")


@pytest.mark.matrix
async def test_get_version_without_autocommit_leaves_no_transaction(
    conn: pgsd.Connection,
) -> None:
    await conn.set_autocommit(False)
    await pgsd.get_version(conn)
    assert conn.info.transaction_status == TransactionStatus.IDLE


async def test_a_cancelled_one_row_query_still_rolls_back_its_own_transaction(
    conn: pgsd.Connection,
) -> None:
    await conn.set_autocommit(False)
    with anyio.move_on_after(0.2) as scope:
        await fetch_row(conn, "SELECT pg_sleep(30)")
    assert scope.cancelled_caught
    # The query was stopped on the server and the transaction it opened ended.
    assert conn.info.transaction_status == TransactionStatus.IDLE
    assert (await fetch_row(conn, "SELECT 1")) == (1,)
