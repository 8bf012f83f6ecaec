"""Permission reports: requirement strings, and what a real server grants."""

from __future__ import annotations

import pickle
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg import sql
from psycopg.pq import TransactionStatus

import pgsd
from pgsd._errors import ConfigError, InsufficientPrivileges
from pgsd._permissions import Requirement, parse_requirement, parse_requirements
from pgsd.testing import PostgresServer

pytestmark = pytest.mark.anyio


# -- requirement strings ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("database:CONNECT", Requirement("", "database", privilege="CONNECT")),
        ("database:temp", Requirement("", "database", privilege="TEMPORARY")),
        ("Database:Temporary", Requirement("", "database", privilege="TEMPORARY")),
        ("schema:app:USAGE", Requirement("", "schema", name="app", privilege="USAGE")),
        ("schema:App:create", Requirement("", "schema", name="app", privilege="CREATE")),
        (
            "table:public.users:SELECT",
            Requirement("", "table", name="users", schema="public", privilege="SELECT"),
        ),
        ("table:users:trigger", Requirement("", "table", name="users", privilege="TRIGGER")),
        ("role:pg_monitor", Requirement("", "role", name="pg_monitor")),
        ("ROLE:PG_MONITOR", Requirement("", "role", name="pg_monitor")),
        (" table : app . users : select ", Requirement("", "table", "users", "app", "SELECT")),
    ],
)
def test_requirement_strings_parse(text: str, expected: Requirement) -> None:
    parsed = parse_requirement(text)
    assert parsed.text == text
    assert (parsed.kind, parsed.name, parsed.schema, parsed.privilege) == (
        expected.kind,
        expected.name,
        expected.schema,
        expected.privilege,
    )


def test_quoted_names_keep_case_dots_colons_and_quotes() -> None:
    parsed = parse_requirement('table:"My.App"."a:""b""":select')
    assert (parsed.schema, parsed.name) == ("My.App", 'a:"b"')


def test_unquoted_names_fold_only_ascii_letters() -> None:
    assert parse_requirement("schema:ÄPP:USAGE").name == "Äpp"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "database",
        "database:",
        "database:SELECT",
        "database:app:CONNECT",
        "schema:app",
        "schema:app:",
        "schema:app:SELECT",
        "schema:a.b:USAGE",
        "schema:app:USAGE:extra",
        "schema::USAGE",
        'schema:"app:USAGE',
        'schema:"":USAGE',
        "schema:a\0:USAGE",
        "table:app.users",
        "table:a.b.c:SELECT",
        "table:app.:SELECT",
        "table:users:MAINTAIN",
        "table:users:ALL",
        "role:",
        "role:a.b",
        "role:pg_monitor:MEMBER",
        "sequence:s:USAGE",
        "public.users:SELECT",
    ],
)
def test_malformed_requirement_strings_raise_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="is not a permission requirement"):
        parse_requirement(text)


@given(st.text(max_size=40))
def test_any_string_parses_or_raises_config_error(text: str) -> None:
    with suppress(ConfigError):
        parse_requirement(text)


@given(st.text(min_size=1, max_size=30).filter(lambda s: "\0" not in s))
def test_any_quoted_schema_name_round_trips(name: str) -> None:
    quoted = '"' + name.replace('"', '""') + '"'
    assert parse_requirement(f"schema:{quoted}:USAGE").name == name


def test_a_single_string_is_not_a_list_of_requirements() -> None:
    with pytest.raises(TypeError, match="not a string"):
        parse_requirements("schema:app:USAGE")


def test_no_requirements_parse_to_nothing() -> None:
    assert parse_requirements(None) == ()
    assert parse_requirements([]) == ()


@pytest.mark.parametrize(
    "text",
    [
        "schema:semi;colon:USAGE",
        "table:my-table:SELECT",
        "schema:1st:USAGE",
        "schema:Mixed Case:USAGE",
        "role:x'--",
        'schema:UPPER":USAGE',
        "table:public.victim; DROP TABLE victim:SELECT",
    ],
)
def test_unquoted_names_must_be_sql_identifiers(text: str) -> None:
    with pytest.raises(ConfigError, match="is not a permission requirement"):
        parse_requirement(text)


def test_quoted_names_may_hold_any_character() -> None:
    parsed = parse_requirement('table:"semi;colon"."my-table; --":SELECT')
    assert (parsed.schema, parsed.name) == ("semi;colon", "my-table; --")


def test_bare_names_take_dollars_digits_and_any_letter() -> None:
    assert parse_requirement("table:_app$1.Tête:SELECT").name == "tête"


def test_requirement_with_an_unpaired_surrogate_raises_config_error() -> None:
    # The server could not be sent it: psycopg would raise UnicodeEncodeError.
    with pytest.raises(ConfigError, match="an unpaired surrogate"):
        parse_requirement('schema:"\ud800":USAGE')


def test_a_requirement_that_is_not_a_string_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="must be a string, got int"):
        parse_requirement(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="must be a string, got NoneType"):
        parse_requirements([None])  # type: ignore[list-item]


# -- against a server -------------------------------------------------------


def _ident(name: str) -> str:
    return sql.Identifier(name).as_string(None)


@dataclass(frozen=True)
class AppDatabase:
    """A database whose PUBLIC privileges are revoked, with schemas to test on."""

    server: PostgresServer
    name: str

    def execute(self, statement: str) -> None:
        self.server.execute(statement, dbname=self.name)


@pytest.fixture(scope="module")
def app_db(pg_server: PostgresServer) -> Iterator[AppDatabase]:
    name = f"pgsd_perm_{secrets.token_hex(4)}"
    pg_server.create_database(name)
    db = AppDatabase(pg_server, name)
    db.execute(
        f"REVOKE ALL ON DATABASE {_ident(name)} FROM PUBLIC;"
        # Before PostgreSQL 15, PUBLIC may also create in public.
        " REVOKE ALL ON SCHEMA public FROM PUBLIC;"
        " CREATE SCHEMA app;"
        " CREATE TABLE app.users (id int);"
        ' CREATE SCHEMA "My App";'
        ' CREATE TABLE "My App"."Users" (id int);'
    )
    yield db
    pg_server.execute(f"DROP DATABASE {_ident(name)} WITH (FORCE)")


def _make_role(app_db: AppDatabase, options: str = "") -> Iterator[str]:
    """A login role with CONNECT on ``app_db`` and nothing else."""
    name = f"pgsd_role_{secrets.token_hex(4)}"
    app_db.server.create_role(name, options=options)
    app_db.execute(f"GRANT CONNECT ON DATABASE {_ident(app_db.name)} TO {_ident(name)}")
    yield name
    app_db.execute(f"DROP OWNED BY {_ident(name)}")
    app_db.server.execute(f"DROP ROLE {_ident(name)}")


@pytest.fixture
def role(app_db: AppDatabase) -> Iterator[str]:
    yield from _make_role(app_db)


@pytest.fixture
def noinherit_role(app_db: AppDatabase) -> Iterator[str]:
    yield from _make_role(app_db, "NOINHERIT")


@asynccontextmanager
async def connected(app_db: AppDatabase, role: str) -> AsyncIterator[pgsd.Connection]:
    async with await pgsd.connect(app_db.server.dsn(dbname=app_db.name, user=role)) as conn:
        yield conn


@pytest.mark.matrix
async def test_superuser_holds_every_privilege_on_existing_objects(
    conn: pgsd.Connection, pg_server: PostgresServer
) -> None:
    required = [
        "database:CONNECT",
        "database:CREATE",
        "database:TEMP",
        "schema:public:USAGE",
        "schema:public:CREATE",
        "table:pg_catalog.pg_class:SELECT",
        "table:pg_class:TRUNCATE",
        "role:pg_monitor",
        "role:pg_read_all_stats",
    ]
    report = await pgsd.check_permissions(conn, required)
    assert report.ok
    assert report.missing == ()
    assert report.required == tuple(required)
    assert report.user == pg_server.superuser
    assert report.is_superuser
    assert report.database == "postgres"
    assert report.database_privileges == {"CONNECT", "CREATE", "TEMPORARY"}
    assert report.schemas["public"] == {"USAGE", "CREATE"}
    assert report.attributes.createdb
    assert report.attributes.bypassrls


@pytest.mark.matrix
async def test_predefined_roles_are_reported_where_the_server_has_them(
    conn: pgsd.Connection, pg_server: PostgresServer
) -> None:
    report = await pgsd.check_permissions(conn)
    expected = {"pg_monitor", "pg_read_all_settings", "pg_read_all_stats"}
    if pg_server.major >= 14:
        expected.add("pg_read_all_data")
    assert report.roles == expected


@pytest.mark.matrix
async def test_pg_read_all_data_is_missing_where_the_server_lacks_it(
    conn: pgsd.Connection, pg_server: PostgresServer
) -> None:
    report = await pgsd.check_permissions(conn, ["role:pg_read_all_data"])
    assert report.ok is (pg_server.major >= 14)


@pytest.mark.matrix
async def test_superuser_still_misses_objects_that_do_not_exist(conn: pgsd.Connection) -> None:
    report = await pgsd.check_permissions(conn, ["schema:nope:USAGE", "role:nope"])
    assert report.missing == ("schema:nope:USAGE", "role:nope")


@pytest.mark.matrix
async def test_no_requirements_means_ok(conn: pgsd.Connection) -> None:
    report = await pgsd.check_permissions(conn)
    assert report.ok
    assert report.required == report.missing == ()


@pytest.mark.matrix
async def test_connect_only_role_misses_schema_and_table(app_db: AppDatabase, role: str) -> None:
    required = ["database:CONNECT", "schema:app:USAGE", "table:app.users:SELECT"]
    async with connected(app_db, role) as conn:
        report = await pgsd.check_permissions(conn, required)
    assert report.missing == ("schema:app:USAGE", "table:app.users:SELECT")
    assert not report.ok
    assert report.user == role
    assert not report.is_superuser
    assert report.attributes == pgsd.RoleAttributes(
        createdb=False, createrole=False, replication=False, bypassrls=False
    )
    assert report.database == app_db.name
    assert report.database_privileges == {"CONNECT"}
    assert report.schemas == {"app": set(), "My App": set(), "public": set()}
    assert report.roles == frozenset()


@pytest.mark.matrix
async def test_system_schemas_are_not_reported(conn: pgsd.Connection) -> None:
    report = await pgsd.check_permissions(conn)
    assert not {"pg_catalog", "pg_toast", "information_schema"} & report.schemas.keys()


@pytest.mark.matrix
async def test_granted_privileges_appear(app_db: AppDatabase, role: str) -> None:
    app_db.execute(f"GRANT USAGE ON SCHEMA app TO {_ident(role)}")
    app_db.execute(f"GRANT SELECT, UPDATE ON app.users TO {_ident(role)}")
    required = ["schema:app:USAGE", "table:app.users:select", "table:app.users:INSERT"]
    async with connected(app_db, role) as conn:
        report = await pgsd.check_permissions(conn, required)
    assert report.missing == ("table:app.users:INSERT",)
    assert report.schemas["app"] == {"USAGE"}


@pytest.mark.matrix
async def test_table_privilege_without_schema_usage_is_missing(
    app_db: AppDatabase, role: str
) -> None:
    app_db.execute(f"GRANT SELECT ON app.users TO {_ident(role)}")
    async with connected(app_db, role) as conn:
        report = await pgsd.check_permissions(conn, ["table:app.users:SELECT"])
    assert report.missing == ("table:app.users:SELECT",)


@pytest.mark.matrix
async def test_unqualified_table_is_found_through_the_search_path(
    app_db: AppDatabase, role: str
) -> None:
    app_db.execute(f"GRANT USAGE ON SCHEMA app TO {_ident(role)}")
    app_db.execute(f"GRANT SELECT ON app.users TO {_ident(role)}")
    async with connected(app_db, role) as conn:
        missing_before = (await pgsd.check_permissions(conn, ["table:users:SELECT"])).missing
        await conn.execute("SET search_path = app")
        missing_after = (await pgsd.check_permissions(conn, ["table:users:SELECT"])).missing
    assert missing_before == ("table:users:SELECT",)
    assert missing_after == ()


@pytest.mark.matrix
async def test_quoted_names_match_exactly(app_db: AppDatabase, role: str) -> None:
    app_db.execute(f'GRANT USAGE ON SCHEMA "My App" TO {_ident(role)}')
    app_db.execute(f'GRANT SELECT ON "My App"."Users" TO {_ident(role)}')
    exact = 'table:"My App"."Users":SELECT'
    folded = 'table:"My App".Users:SELECT'
    async with connected(app_db, role) as conn:
        report = await pgsd.check_permissions(conn, [exact, folded])
    assert report.missing == (folded,)


@pytest.mark.matrix
async def test_predefined_role_membership_is_inherited(app_db: AppDatabase, role: str) -> None:
    app_db.execute(f"GRANT pg_monitor TO {_ident(role)}")
    required = ["role:pg_monitor", "role:pg_read_all_stats", "role:pg_read_all_data"]
    async with connected(app_db, role) as conn:
        report = await pgsd.check_permissions(conn, required)
    # pg_monitor is itself a member of pg_read_all_settings and pg_read_all_stats.
    assert report.roles == {"pg_monitor", "pg_read_all_settings", "pg_read_all_stats"}
    assert report.missing == ("role:pg_read_all_data",)


@pytest.mark.matrix
async def test_membership_that_needs_set_role_does_not_count(
    app_db: AppDatabase, noinherit_role: str
) -> None:
    app_db.execute(f"GRANT pg_monitor TO {_ident(noinherit_role)}")
    async with connected(app_db, noinherit_role) as conn:
        report = await pgsd.check_permissions(conn, ["role:pg_monitor"])
    assert report.missing == ("role:pg_monitor",)
    assert report.roles == frozenset()


@pytest.mark.matrix
async def test_nonexistent_objects_are_missing_in_the_order_given(
    app_db: AppDatabase, role: str
) -> None:
    app_db.execute(f"GRANT USAGE ON SCHEMA app TO {_ident(role)}")
    required = [
        "table:nope.users:SELECT",
        "database:CONNECT",
        "role:nope",
        "table:app.nope:SELECT",
        "schema:nope:USAGE",
        "table:nope:SELECT",
    ]
    async with connected(app_db, role) as conn:
        report = await pgsd.check_permissions(conn, required)
    assert report.missing == tuple(r for r in required if r != "database:CONNECT")


@pytest.mark.matrix
async def test_malformed_requirement_raises_config_error(conn: pgsd.Connection) -> None:
    with pytest.raises(ConfigError):
        await pgsd.check_permissions(conn, ["database:CONNECT", "schema:app"])
    await conn.execute("SELECT 1")


@pytest.mark.matrix
async def test_require_permissions_raises_listing_what_is_missing(
    app_db: AppDatabase, role: str
) -> None:
    required = ["database:CONNECT", "schema:app:USAGE", "table:app.users:SELECT"]
    async with connected(app_db, role) as conn:
        with pytest.raises(InsufficientPrivileges) as info:
            await pgsd.require_permissions(conn, required)
    assert info.value.missing == ("schema:app:USAGE", "table:app.users:SELECT")
    assert info.value.user == role
    assert "schema:app:USAGE" in str(info.value)


@pytest.mark.matrix
async def test_require_permissions_returns_the_report_when_granted(
    conn: pgsd.Connection,
) -> None:
    report = await pgsd.require_permissions(conn, ["database:CONNECT"])
    assert report.ok


@pytest.mark.matrix
async def test_check_inside_a_transaction_leaves_it_open_and_healthy(
    app_db: AppDatabase, role: str
) -> None:
    # The role lacks USAGE on app: naming app.users by name would raise.
    app_db.execute(f"GRANT SELECT ON app.users TO {_ident(role)}")
    async with connected(app_db, role) as conn, conn.transaction():
        before = await _transaction_id(conn)
        report = await pgsd.check_permissions(conn, ["table:app.users:SELECT"])
        assert conn.info.transaction_status == TransactionStatus.INTRANS
        assert await _transaction_id(conn) == before
    assert report.missing == ("table:app.users:SELECT",)


async def _transaction_id(conn: pgsd.Connection) -> int:
    cursor = await conn.execute("SELECT txid_current()")
    row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.matrix
async def test_check_without_autocommit_leaves_no_transaction(conn: pgsd.Connection) -> None:
    await conn.set_autocommit(False)
    await pgsd.check_permissions(conn, ["database:CONNECT"])
    assert conn.info.transaction_status == TransactionStatus.IDLE


@pytest.mark.matrix
async def test_report_is_frozen(conn: pgsd.Connection) -> None:
    report = await pgsd.check_permissions(conn)
    with pytest.raises(AttributeError):
        report.user = "someone"  # type: ignore[misc]
    with pytest.raises(TypeError):
        report.schemas["x"] = frozenset()  # type: ignore[index]


@pytest.mark.matrix
async def test_report_pickles_and_hashes(conn: pgsd.Connection) -> None:
    report = await pgsd.check_permissions(conn, ["schema:nope:USAGE"])
    copy = pickle.loads(pickle.dumps(report))
    assert copy == report
    assert hash(copy) == hash(report)
    assert copy.missing == ("schema:nope:USAGE",)
