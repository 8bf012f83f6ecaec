"""Permission checks against objects with hostile names: right answers, nothing injected.

Schemas, tables, roles and the database itself carry names made to break out
of quoting (quotes, semicolons, comments, dollar quotes, backslashes...).
The checking role owns a sentinel table, ``victim``, and may create tables,
so a statement smuggled in through a name would succeed and leave a trace:
the sentinel gone or emptied, or a table named ``pwned``.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
from psycopg import sql
from psycopg.pq import TransactionStatus

import pgsd
from pgsd.testing import PostgresServer

pytestmark = pytest.mark.anyio

HOSTILE_NAMES = (
    'x"; DROP TABLE victim; --',
    "it's'; DELETE FROM victim; --",
    "x'); CREATE TABLE pwned (); --",
    "semi;colon",
    "dash -- comment",
    "/* block */ comment",
    "back\\slash\\",
    "$$; CREATE TABLE pwned (); $$",
    "with space",
    "UPPER",
    "Mixed Case",
    "dot.ted",
    "co:lon",
    '"quoted"',
)


def ident(*names: str) -> str:
    """A (qualified) SQL identifier, quoted by psycopg, for the statements that set up."""
    return sql.Identifier(*names).as_string(None)


def quoted(name: str) -> str:
    """A name quoted as requirement strings quote it."""
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class HostileDatabase:
    """A database (hostile name) of hostile schemas, each with a hostile table, and roles.

    The checker may use the schemas at even positions, and select from their
    tables at positions not divisible by three; it is a member of the roles
    at even positions. It owns ``public.victim`` (one row) and may create in
    ``public``.
    """

    server: PostgresServer
    name: str
    checker: str
    schemas: tuple[str, ...]
    tables: tuple[str, ...]
    roles: tuple[str, ...]

    def execute(self, statement: str) -> None:
        self.server.execute(statement, dbname=self.name)

    def schema_granted(self, i: int) -> bool:
        return i % 2 == 0

    def select_granted(self, i: int) -> bool:
        return i % 3 != 0

    def table_granted(self, i: int) -> bool:
        # Without USAGE on its schema, a table cannot be reached.
        return self.schema_granted(i) and self.select_granted(i)

    def role_granted(self, i: int) -> bool:
        return i % 2 == 0


@pytest.fixture(scope="module")
def hostile(pg_server: PostgresServer) -> Iterator[HostileDatabase]:
    token = secrets.token_hex(3)
    name = f'pgsd inj {token}"; DROP DATABASE postgres; --'
    checker = f"pgsd checker {token}'; DROP ROLE postgres; --"
    pg_server.create_database(name)
    pg_server.create_role(checker)
    db = HostileDatabase(
        server=pg_server,
        name=name,
        checker=checker,
        schemas=HOSTILE_NAMES,
        # Each schema holds a table named after the next name.
        tables=HOSTILE_NAMES[1:] + HOSTILE_NAMES[:1],
        roles=tuple(f"{role} {token}" for role in HOSTILE_NAMES),
    )
    statements = [
        f"REVOKE ALL ON DATABASE {ident(name)} FROM PUBLIC",
        f"GRANT CONNECT ON DATABASE {ident(name)} TO {ident(checker)}",
        "REVOKE ALL ON SCHEMA public FROM PUBLIC",
        f"GRANT USAGE, CREATE ON SCHEMA public TO {ident(checker)}",
        "CREATE TABLE public.victim (id int)",
        "INSERT INTO public.victim VALUES (1)",
        f"ALTER TABLE public.victim OWNER TO {ident(checker)}",
    ]
    for i, (schema, table) in enumerate(zip(db.schemas, db.tables, strict=True)):
        statements += [
            f"CREATE SCHEMA {ident(schema)}",
            f"CREATE TABLE {ident(schema, table)} (id int)",
        ]
        if db.schema_granted(i):
            statements.append(f"GRANT USAGE ON SCHEMA {ident(schema)} TO {ident(checker)}")
        if db.select_granted(i):
            statements.append(f"GRANT SELECT ON {ident(schema, table)} TO {ident(checker)}")
    for i, role in enumerate(db.roles):
        pg_server.execute(f"CREATE ROLE {ident(role)} NOLOGIN")
        if db.role_granted(i):
            pg_server.execute(f"GRANT {ident(role)} TO {ident(checker)}")
    db.execute(";\n".join(statements))
    yield db
    pg_server.execute(f"DROP DATABASE {ident(name)} WITH (FORCE)")
    for role in (*db.roles, checker):
        pg_server.execute(f"DROP ROLE {ident(role)}")


@asynccontextmanager
async def connected(db: HostileDatabase, user: str | None = None) -> AsyncIterator[pgsd.Connection]:
    async with await pgsd.connect(db.server.dsn(dbname=db.name, user=user)) as conn:
        yield conn


async def assert_sentinels_intact(db: HostileDatabase) -> None:
    """The victim still holds its row, no table is named pwned, postgres and the checker exist."""
    async with connected(db) as observer:
        cursor = await observer.execute(
            "SELECT (SELECT count(*) FROM public.victim),"
            " (SELECT count(*) FROM pg_catalog.pg_class WHERE relname = 'pwned')"
        )
        assert await cursor.fetchone() == (1, 0)
    async with await pgsd.connect(db.server.dsn()) as observer:
        cursor = await observer.execute(
            "SELECT count(*) FROM pg_catalog.pg_database WHERE datname = 'postgres'"
            " UNION ALL SELECT count(*) FROM pg_catalog.pg_roles WHERE rolname = %s",
            [db.checker],
        )
        assert await cursor.fetchall() == [(1,), (1,)]


def requirements_and_missing(db: HostileDatabase) -> tuple[list[str], list[str]]:
    """Correctly quoted requirements on every hostile object, and those the checker lacks."""
    required: list[str] = []
    missing: list[str] = []

    def expect(text: str, granted: bool) -> None:
        required.append(text)
        if not granted:
            missing.append(text)

    for i, (schema, table) in enumerate(zip(db.schemas, db.tables, strict=True)):
        expect(f"schema:{quoted(schema)}:USAGE", db.schema_granted(i))
        expect(f"schema:{quoted(schema)}:CREATE", False)
        expect(f"table:{quoted(schema)}.{quoted(table)}:SELECT", db.table_granted(i))
        expect(f"table:{quoted(schema)}.{quoted(table)}:INSERT", False)
    for i, role in enumerate(db.roles):
        expect(f"role:{quoted(role)}", db.role_granted(i))
    expect("database:CONNECT", True)
    expect("database:CREATE", False)
    expect("table:public.victim:DELETE", True)
    return required, missing


# Strings that follow the rules but name something else, or nothing.
MISQUOTED_BUT_VALID = (
    "schema:UPPER:USAGE",  # folds to upper, which does not exist
    'schema:"upper":USAGE',
    'schema:"mixed case":USAGE',
    "table:dot.ted:SELECT",  # schema dot, table ted
    'schema:"x""; DROP TABLE victim; -- ":USAGE',  # one space more than the name created
    'role:"x"""',
)

# Strings that break the rules: each is refused before anything is sent.
MALFORMED = (
    'schema:x"; DROP TABLE victim; --:USAGE',
    'schema:"x"; DROP TABLE victim; --":USAGE',
    'schema:"x\\"; DROP TABLE victim; --":USAGE',
    "schema:x'); CREATE TABLE pwned (); --:USAGE",
    "table:\"it's'; DELETE FROM victim; --.t:SELECT",
    "role:x'); CREATE TABLE pwned (); --",
    "schema:semi;colon:USAGE",
    "schema:dash -- comment:USAGE",
    "schema:/* block */ comment:USAGE",
    "schema:back\\slash\\:USAGE",
    "schema:$$; CREATE TABLE pwned (); $$:USAGE",
    "schema:with space:USAGE",
    "schema:Mixed Case:USAGE",
    "schema:co:lon:USAGE",
    'schema:""quoted"":USAGE',
    'schema:"UPPER:USAGE',
    'schema:UPPER":USAGE',
    "table:public.victim; DROP TABLE victim:SELECT",
    "table:public.victim:SELECT; DROP TABLE victim",
    "database:CONNECT; DROP TABLE victim",
    "role:pg_monitor'--",
)


async def test_hostile_names_get_the_right_answers(hostile: HostileDatabase) -> None:
    required, missing = requirements_and_missing(hostile)
    async with connected(hostile, hostile.checker) as conn:
        report = await pgsd.check_permissions(conn, required)
    assert report.missing == tuple(missing)
    assert report.required == tuple(required)
    assert report.user == hostile.checker
    assert report.database == hostile.name
    for i, schema in enumerate(hostile.schemas):
        expected = {"USAGE"} if hostile.schema_granted(i) else set()
        assert report.schemas[schema] == expected
    await assert_sentinels_intact(hostile)


async def test_superuser_holds_every_hostile_object_that_exists(hostile: HostileDatabase) -> None:
    required, _ = requirements_and_missing(hostile)
    async with connected(hostile) as conn:
        report = await pgsd.check_permissions(conn, [*required, *MISQUOTED_BUT_VALID])
    assert report.missing == MISQUOTED_BUT_VALID
    await assert_sentinels_intact(hostile)


async def test_names_quoted_wrongly_but_validly_are_other_names(hostile: HostileDatabase) -> None:
    async with connected(hostile, hostile.checker) as conn:
        report = await pgsd.check_permissions(conn, MISQUOTED_BUT_VALID)
    assert report.missing == MISQUOTED_BUT_VALID
    await assert_sentinels_intact(hostile)


async def test_bare_hostile_table_names_are_found_through_the_search_path(
    hostile: HostileDatabase,
) -> None:
    granted = [i for i in range(len(hostile.schemas)) if hostile.table_granted(i)]
    refused = [i for i in range(len(hostile.schemas)) if not hostile.table_granted(i)]
    async with connected(hostile, hostile.checker) as conn:
        for i in (granted[0], refused[0], refused[-1]):
            schema, table = hostile.schemas[i], hostile.tables[i]
            await conn.execute(f"SET search_path TO {ident(schema)}")
            report = await pgsd.check_permissions(conn, [f"table:{quoted(table)}:SELECT"])
            assert report.ok is hostile.table_granted(i), (schema, table)
    await assert_sentinels_intact(hostile)


async def test_malformed_requirements_raise_config_error_and_send_nothing(
    hostile: HostileDatabase,
) -> None:
    async with connected(hostile, hostile.checker) as conn, conn.transaction():
        before = await transaction_id(conn)
        for text in MALFORMED:
            with pytest.raises(pgsd.ConfigError, match="is not a permission requirement"):
                await pgsd.check_permissions(conn, ["database:CONNECT", text])
            with pytest.raises(pgsd.ConfigError, match="is not a permission requirement"):
                await pgsd.require_permissions(conn, [text])
            # Not even a failed statement: the transaction has not aborted.
            assert conn.info.transaction_status == TransactionStatus.INTRANS, text
        assert await transaction_id(conn) == before
    await assert_sentinels_intact(hostile)


def test_malformed_requirements_are_refused_by_the_config_too() -> None:
    for text in MALFORMED:
        with pytest.raises(pgsd.ConfigError) as info:
            pgsd.DatabaseConfig(required=[text])
        assert info.value.key == "required"


@pytest.mark.parametrize("autocommit", [True, False])
async def test_hostile_checks_leave_the_callers_transaction_unharmed(
    hostile: HostileDatabase, autocommit: bool
) -> None:
    required, missing = requirements_and_missing(hostile)
    async with connected(hostile, hostile.checker) as conn:
        await conn.set_autocommit(autocommit)
        async with conn.transaction():
            await conn.execute("INSERT INTO public.victim VALUES (2)")
            before = await transaction_id(conn)
            report = await pgsd.check_permissions(conn, required)
            with pytest.raises(pgsd.InsufficientPrivileges) as info:
                await pgsd.require_permissions(conn, required)
            assert conn.info.transaction_status == TransactionStatus.INTRANS
            assert await transaction_id(conn) == before
            cursor = await conn.execute("SELECT count(*) FROM public.victim")
            assert await cursor.fetchone() == (2,)
            await conn.execute("DELETE FROM public.victim WHERE id = 2")
        assert conn.info.transaction_status == TransactionStatus.IDLE
    assert report.missing == info.value.missing == tuple(missing)
    await assert_sentinels_intact(hostile)


async def transaction_id(conn: pgsd.Connection) -> int:
    cursor = await conn.execute("SELECT txid_current()")
    row = await cursor.fetchone()
    assert row is not None
    return int(row[0])
