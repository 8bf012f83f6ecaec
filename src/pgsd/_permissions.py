"""What the connected role may do: attributes, privileges, predefined roles, requirements.

A requirement is a string naming one privilege:

- ``database:PRIV``: on the current database; CONNECT, CREATE, TEMPORARY
  (or TEMP).
- ``schema:NAME:PRIV``: USAGE or CREATE.
- ``table:SCHEMA.NAME:PRIV`` or ``table:NAME:PRIV`` (found through the
  search path): SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES or
  TRIGGER, on any relation with table privileges (views and sequences too).
  A table counts as granted only together with USAGE on its schema,
  without which it cannot be reached.
- ``role:NAME``: the user has the privileges of role NAME, directly or
  through inherited membership (``pg_has_role(..., 'USAGE')``): a
  membership that needs ``SET ROLE`` first does not count.

Privilege names and the kind are case-insensitive. Names follow SQL
identifier rules, as in ``to_regclass``: unquoted names fold to lower case,
double quotes keep case, dots, colons and any other character (``""`` for a
double quote). A name that is not a plain identifier must be quoted. An
object that does not exist is missing, for a superuser too; a superuser
holds every privilege on every object that exists.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Literal

from psycopg import AsyncConnection

from ._errors import ConfigError, InsufficientPrivileges
from ._version import fetch_row

__all__ = [
    "PREDEFINED_ROLES",
    "PermissionReport",
    "Requirement",
    "RoleAttributes",
    "check_permissions",
    "parse_requirement",
    "parse_requirements",
    "require_permissions",
]

#: Predefined roles reported in :attr:`PermissionReport.roles`, where the
#: server has them (``pg_read_all_data`` is new in PostgreSQL 14).
PREDEFINED_ROLES = ("pg_read_all_data", "pg_monitor", "pg_read_all_settings", "pg_read_all_stats")

RequirementKind = Literal["database", "schema", "table", "role"]

_DATABASE_PRIVILEGES = ("CONNECT", "CREATE", "TEMPORARY")
_SCHEMA_PRIVILEGES = ("USAGE", "CREATE")
# MAINTAIN (PostgreSQL 17) is left out: older servers raise on it, which
# would abort the caller's transaction.
_TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
_PRIVILEGES: dict[str, tuple[str, ...]] = {
    "database": (*_DATABASE_PRIVILEGES, "TEMP"),
    "schema": _SCHEMA_PRIVILEGES,
    "table": _TABLE_PRIVILEGES,
}
_FORMS = "database:PRIV, schema:NAME:PRIV, table:[SCHEMA.]NAME:PRIV or role:NAME"

# One part of a dotted name: "quoted, with "" for a quote", or a bare SQL
# identifier: a letter or _, then letters, digits, _ and $, where every
# non-ASCII character counts as a letter (as the server's lexer has it)
# except white space.
_NAME_PART_RE = re.compile(
    r'\s*(?:"((?:[^"]|"")+)"'
    r"|((?:(?!\s)[A-Za-z_\x80-\U0010ffff])(?:(?!\s)[A-Za-z0-9_$\x80-\U0010ffff])*))\s*"
)
# The server folds only ASCII letters of unquoted names.
_FOLD = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


@dataclass(frozen=True, slots=True)
class Requirement:
    """One parsed requirement string.

    Attributes:
        text: the string as given; :attr:`PermissionReport.missing` repeats it.
        kind: database, schema, table or role.
        name: the schema, table or role name, as stored in the catalog;
            None for a database requirement.
        schema: a table's schema, or None (search path).
        privilege: upper case, TEMP spelled TEMPORARY; None for a role.
    """

    text: str
    kind: RequirementKind
    name: str | None = None
    schema: str | None = None
    privilege: str | None = None


@dataclass(frozen=True, slots=True)
class RoleAttributes:
    """Role attributes other than superuser (see ``CREATE ROLE``)."""

    createdb: bool
    createrole: bool
    replication: bool
    bypassrls: bool


@dataclass(frozen=True, slots=True)
class PermissionReport:
    """What the connected role may do, and which requirements it lacks.

    Attributes:
        user: the current user (the role privileges are checked for).
        is_superuser: whether it is a superuser.
        attributes: its other role attributes.
        database: the current database.
        database_privileges: held on it, of CONNECT, CREATE and TEMPORARY.
        schemas: USAGE and CREATE held, for every schema that is not a
            system schema (``pg_*``, ``information_schema``).
        roles: the :data:`PREDEFINED_ROLES` whose privileges the user has
            (``pg_has_role(..., 'USAGE')``).
        required: the requirement strings checked.
        missing: those not granted, as given and in the same order.
    """

    user: str
    is_superuser: bool
    attributes: RoleAttributes
    database: str
    database_privileges: frozenset[str]
    schemas: Mapping[str, frozenset[str]] = field(hash=False)
    roles: frozenset[str]
    required: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # A read-only copy, so that the frozen report cannot change through it.
        object.__setattr__(self, "schemas", MappingProxyType(dict(self.schemas)))

    def __reduce__(self) -> tuple[Any, ...]:
        # A mappingproxy cannot be pickled; __post_init__ wraps the dict again.
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["schemas"] = dict(self.schemas)
        return type(self), tuple(values.values())

    @property
    def ok(self) -> bool:
        """True when no requirement is missing."""
        return not self.missing


def parse_requirement(text: str) -> Requirement:
    """Parse one requirement string (forms in this module's documentation).

    Raises:
        ConfigError: the string is not a requirement (or not a string).
    """
    if not isinstance(text, str):
        raise ConfigError(f"a permission requirement must be a string, got {type(text).__name__}")
    kind, colon, rest = text.partition(":")
    kind = kind.strip().lower()
    if not colon or kind not in ("database", "schema", "table", "role"):
        raise _malformed(text, "it does not start with database:, schema:, table: or role:")
    if "\0" in text:
        raise _malformed(text, "it contains a NUL character")
    if not _is_unicode(text):
        # The server could not be sent it: UTF-8 has no form for a lone surrogate.
        raise _malformed(text, "it contains an unpaired surrogate")
    if kind == "database":
        return Requirement(text, "database", privilege=_privilege(text, "database", rest))
    parts, rest = _split_name(text, rest)
    if kind == "role":
        if len(parts) != 1 or rest:
            raise _malformed(text, "a role name is one identifier")
        return Requirement(text, "role", name=parts[0])
    if not rest.startswith(":"):
        raise _malformed(text, "the privilege is missing")
    privilege = _privilege(text, kind, rest[1:])
    if kind == "schema":
        if len(parts) != 1:
            raise _malformed(text, "a schema name is one identifier")
        return Requirement(text, "schema", name=parts[0], privilege=privilege)
    if len(parts) > 2:
        raise _malformed(text, "a table name is NAME or SCHEMA.NAME")
    schema = parts[0] if len(parts) == 2 else None
    return Requirement(text, "table", name=parts[-1], schema=schema, privilege=privilege)


def _is_unicode(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _split_name(text: str, rest: str) -> tuple[list[str], str]:
    """Split a dotted SQL name off the front of ``rest``: (parts, what follows)."""
    parts: list[str] = []
    pos = 0
    while True:
        match = _NAME_PART_RE.match(rest, pos)
        if match is None:
            raise _malformed(text, "a name is missing, badly quoted or not an identifier")
        quoted, bare = match.groups()
        parts.append(quoted.replace('""', '"') if quoted is not None else bare.translate(_FOLD))
        pos = match.end()
        if pos < len(rest) and rest[pos] not in ".:":
            why = f"unexpected {rest[pos]!r} after a name (quote names that are not identifiers)"
            raise _malformed(text, why)
        if not rest.startswith(".", pos):
            return parts, rest[pos:]
        pos += 1


def _privilege(text: str, kind: str, word: str) -> str:
    privilege = word.strip().upper()
    if privilege not in _PRIVILEGES[kind]:
        allowed = ", ".join(_PRIVILEGES[kind])
        raise _malformed(text, f"a {kind} privilege is one of {allowed}")
    return "TEMPORARY" if privilege == "TEMP" else privilege


def _malformed(text: str, why: str) -> ConfigError:
    return ConfigError(f"{text!r} is not a permission requirement ({_FORMS}): {why}")


def parse_requirements(required: Iterable[str] | None) -> tuple[Requirement, ...]:
    """Parse requirement strings, keeping their order.

    Raises:
        ConfigError: one of them is not a requirement.
        TypeError: ``required`` is a single string, not an iterable of them.
    """
    if isinstance(required, str):
        raise TypeError("required must be an iterable of requirement strings, not a string")
    return tuple(parse_requirement(text) for text in required or ())


# One round trip. Everything is looked up by OID, never by a name for the
# has_*_privilege() functions: given 's.t', has_table_privilege() and
# to_regclass() raise when the user lacks USAGE on s, which would abort the
# caller's transaction. Only a bare table name goes through to_regclass():
# the search path skips schemas without USAGE instead of raising.
# Functions and catalogs are qualified so that a search_path cannot shadow them.
_QUERY = """\
WITH me AS (
    SELECT r.rolname, r.rolsuper, r.rolcreatedb, r.rolcreaterole, r.rolreplication,
        r.rolbypassrls
    FROM pg_catalog.pg_roles AS r
    WHERE r.rolname = CURRENT_USER
), db AS (
    SELECT d.oid, d.datname
    FROM pg_catalog.pg_database AS d
    WHERE d.datname = pg_catalog.current_database()
), schemas AS (
    SELECT
        pg_catalog.array_agg(n.nspname::text ORDER BY n.nspname) AS names,
        pg_catalog.array_agg(pg_catalog.has_schema_privilege(n.oid, 'USAGE')
            ORDER BY n.nspname) AS has_usage,
        pg_catalog.array_agg(pg_catalog.has_schema_privilege(n.oid, 'CREATE')
            ORDER BY n.nspname) AS has_create
    FROM pg_catalog.pg_namespace AS n
    WHERE n.nspname !~ '^pg_' AND n.nspname <> 'information_schema'
), req AS (
    SELECT q.ord, q.kind, q.privilege, q.name, CASE
        WHEN q.kind <> 'table' THEN NULL
        WHEN q.nsp IS NULL THEN pg_catalog.to_regclass(pg_catalog.quote_ident(q.name))::oid
        ELSE (
            SELECT c.oid
            FROM pg_catalog.pg_class AS c
            JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
            WHERE n.nspname = q.nsp::name AND c.relname = q.name::name
        )
    END AS table_oid
    FROM ROWS FROM (
        pg_catalog.unnest(%(kinds)s::text[]),
        pg_catalog.unnest(%(schemas)s::text[]),
        pg_catalog.unnest(%(names)s::text[]),
        pg_catalog.unnest(%(privileges)s::text[])
    ) WITH ORDINALITY AS q (kind, nsp, name, privilege, ord)
), granted AS (
    SELECT req.ord, CASE req.kind
        WHEN 'database' THEN pg_catalog.has_database_privilege(db.oid, req.privilege)
        WHEN 'schema' THEN (
            SELECT pg_catalog.has_schema_privilege(n.oid, req.privilege)
            FROM pg_catalog.pg_namespace AS n
            WHERE n.nspname = req.name::name
        )
        WHEN 'table' THEN (
            SELECT pg_catalog.has_schema_privilege(c.relnamespace, 'USAGE')
                AND pg_catalog.has_table_privilege(c.oid, req.privilege)
            FROM pg_catalog.pg_class AS c
            WHERE c.oid = req.table_oid
        )
        WHEN 'role' THEN (
            SELECT pg_catalog.pg_has_role(a.oid, 'USAGE')
            FROM pg_catalog.pg_roles AS a
            WHERE a.rolname = req.name::name
        )
    END AS granted
    FROM req CROSS JOIN db
)
SELECT
    me.rolname::text, me.rolsuper, me.rolcreatedb, me.rolcreaterole, me.rolreplication,
    me.rolbypassrls,
    db.datname::text,
    ARRAY(
        SELECT p.privilege
        FROM pg_catalog.unnest(%(database_privileges)s::text[]) AS p (privilege)
        WHERE pg_catalog.has_database_privilege(db.oid, p.privilege)
    ),
    schemas.names, schemas.has_usage, schemas.has_create,
    -- Only roles that exist: pg_has_role() raises on an unknown name.
    ARRAY(
        SELECT a.rolname::text
        FROM pg_catalog.pg_roles AS a
        WHERE a.rolname = ANY (%(predefined)s::text[])
            AND pg_catalog.pg_has_role(a.oid, 'USAGE')
    ),
    ARRAY(SELECT COALESCE(g.granted, false) FROM granted AS g ORDER BY g.ord)
FROM me CROSS JOIN db CROSS JOIN schemas
"""


def _query_params(requirements: tuple[Requirement, ...]) -> dict[str, Any]:
    return {
        "kinds": [r.kind for r in requirements],
        "schemas": [r.schema for r in requirements],
        "names": [r.name for r in requirements],
        "privileges": [r.privilege for r in requirements],
        "database_privileges": list(_DATABASE_PRIVILEGES),
        "predefined": list(PREDEFINED_ROLES),
    }


def _schemas(
    names: list[str] | None, usage: list[bool], create: list[bool]
) -> dict[str, frozenset[str]]:
    # array_agg() over no schemas at all is NULL.
    if names is None:
        return {}
    return {
        name: frozenset(p for p, held in (("USAGE", u), ("CREATE", c)) if held)
        for name, u, c in zip(names, usage, create, strict=True)
    }


def _report(row: tuple[Any, ...], requirements: tuple[Requirement, ...]) -> PermissionReport:
    user, superuser, createdb, createrole, replication, bypassrls, database = row[:7]
    db_privileges, schema_names, usage, create, roles, granted = row[7:]
    return PermissionReport(
        user=user,
        is_superuser=superuser,
        attributes=RoleAttributes(createdb, createrole, replication, bypassrls),
        database=database,
        database_privileges=frozenset(db_privileges),
        schemas=_schemas(schema_names, usage, create),
        roles=frozenset(roles),
        required=tuple(r.text for r in requirements),
        missing=tuple(r.text for r, ok in zip(requirements, granted, strict=True) if not ok),
    )


async def check_permissions(
    conn: AsyncConnection[Any], required: Iterable[str] | None = None
) -> PermissionReport:
    """Report what the connected role may do, and which of ``required`` it lacks.

    One query. Works on PostgreSQL 13 and later, in autocommit mode and
    inside the caller's transaction, which it leaves open and unharmed; a
    transaction it had to open itself it rolls back.

    Raises:
        ConfigError: a requirement string is malformed.
        TypeError: ``required`` is a single string.
        psycopg.Error: the query failed (the connection is broken, or the
            caller's transaction has already failed).
    """
    requirements = parse_requirements(required)
    row = await fetch_row(conn, _QUERY, _query_params(requirements))
    return _report(row, requirements)


async def require_permissions(
    conn: AsyncConnection[Any], required: Iterable[str]
) -> PermissionReport:
    """Like :func:`check_permissions`, but fail unless every requirement is granted.

    Raises:
        InsufficientPrivileges: some are missing; it lists them.
        ConfigError: a requirement string is malformed.
        TypeError: ``required`` is a single string.
        psycopg.Error: the query failed.
    """
    report = await check_permissions(conn, required)
    if not report.ok:
        raise InsufficientPrivileges(missing=report.missing, user=report.user)
    return report
