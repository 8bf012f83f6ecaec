"""Cursors as psycopg's: the parity suite's query half.

Each scenario runs on stock ``psycopg.AsyncConnection`` on asyncio and on
``pgsd.Connection`` on the test's backend (see ``tests/parity.py``), and
both must come to the same outcome; each test then checks that outcome
against what psycopg documents. Covered: client-side cursors (fetching,
scrolling, attributes, several results, ``executemany``), server-side
cursors, raw and client-binding cursors, binary results, row factories,
types, errors, ``stream()`` (finished, in chunks, left early, closed,
dropped, failing, in a transaction), prepared statements, cancellation, a
connection closed under a running query and two tasks sharing one
connection.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import anyio
import psycopg
import pytest
from psycopg import AsyncClientCursor, AsyncRawCursor
from psycopg.rows import args_row, class_row, dict_row, kwargs_row, namedtuple_row
from psycopg.types.json import Json

from parity import DIVISION_BY_ZERO, ConnectionClass, Raised, assert_same, attempt, tx_status
from pgsd.testing import PostgresServer

pytestmark = pytest.mark.anyio


@pytest.fixture
def dsn(pg_server: PostgresServer) -> str:
    """Every scenario here runs on the session's server."""
    return pg_server.dsn()


IDLE = "IDLE"
INTRANS = "INTRANS"
INERROR = "INERROR"

#: Far more rows than socket buffers hold: a stream left early is still running.
ENDLESS = "SELECT generate_series(1, 10000000) AS g"
SLEEP = "SELECT pg_sleep(10)"
#: Polls of pg_stat_activity (each sleeping 5 ms on the server) before giving up.
POLLS = 2000
#: Cleanup in a finally block waits at most this, shielded.
CLEANUP_WAIT = 10.0


async def one(conn: psycopg.AsyncConnection[Any], query: str = "SELECT 1") -> Any:
    cur = await conn.execute(query)
    return await cur.fetchone()


async def wait_until_running(observer: psycopg.AsyncConnection[Any], pid: int, query: str) -> None:
    """Poll pg_stat_activity until backend ``pid`` runs ``query``, bounded in count."""
    for _ in range(POLLS):
        cur = await observer.execute(
            "SELECT state, query FROM pg_stat_activity, pg_sleep(0.005) WHERE pid = %s", [pid]
        )
        if await cur.fetchone() == ("active", query):
            return
    raise AssertionError(f"backend {pid} never ran {query!r}")


async def interrupt_running_query(
    conn: psycopg.AsyncConnection[Any],
    observer: psycopg.AsyncConnection[Any],
    interrupt: Callable[[], Awaitable[Any]],
) -> tuple[Any, bool]:
    """Run SLEEP on ``conn`` in a task; ``interrupt`` once the server runs it.

    Returns what the query came to and whether it ended well before SLEEP would.
    """
    outcome: dict[str, Any] = {}

    async def query() -> None:
        outcome["query"] = await attempt(conn.execute(SLEEP), "finished")

    pid = conn.info.backend_pid
    started = anyio.current_time()
    async with anyio.create_task_group() as tg:
        tg.start_soon(query)
        await wait_until_running(observer, pid, SLEEP)
        await interrupt()
    return outcome["query"], anyio.current_time() - started < 8


async def roll_back_and_close(
    conn: psycopg.AsyncConnection[Any], cur: psycopg.AsyncServerCursor[Any]
) -> str:
    """The transaction status a failure left; then it is rolled back, the cursor closed."""
    left = tx_status(conn)
    await conn.rollback()
    await cur.close()
    return left


async def prepared(conn: psycopg.AsyncConnection[Any]) -> list[tuple[str, str]]:
    """The session's prepared statements, asked for without preparing the question."""
    cur = await conn.execute(
        "SELECT name, statement FROM pg_prepared_statements ORDER BY name", prepare=False
    )
    return await cur.fetchall()


@dataclass(frozen=True)
class Point:
    x: int
    y: int


def as_args(*values: Any) -> tuple[str, tuple[Any, ...]]:
    return ("args", values)


def as_kwargs(**values: Any) -> tuple[str, dict[str, Any]]:
    return ("kwargs", values)


# --- client-side cursor --------------------------------------------------------------


async def fetch_methods(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn) as conn:
        cur = await conn.execute("SELECT g FROM generate_series(1, 8) AS g")
        return (
            await cur.fetchone(),
            await cur.fetchmany(2),
            await cur.fetchmany(),  # arraysize, 1 by default
            await cur.fetchall(),
            await cur.fetchone(),
            await cur.fetchmany(3),
            await cur.fetchall(),
        )


async def test_client_cursor_fetch_methods_walk_the_result(dsn: str) -> None:
    result = await assert_same(fetch_methods, dsn)
    assert result == ((1,), [(2,), (3,)], [(4,)], [(5,), (6,), (7,), (8,)], None, [], [])


async def async_iteration(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn) as conn:
        cur = await conn.execute("SELECT g, g * 2 FROM generate_series(1, 5) AS g")
        first = await cur.fetchone()
        rest = [row async for row in cur]
        again = [row async for row in cur]
        return first, rest, again


async def test_client_cursor_async_iteration_yields_the_remaining_rows(dsn: str) -> None:
    result = await assert_same(async_iteration, dsn)
    assert result == ((1, 2), [(2, 4), (3, 6), (4, 8), (5, 10)], [])


async def scroll_within(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn) as conn:
        cur = await conn.execute("SELECT g FROM generate_series(0, 9) AS g")
        seen = []
        await cur.scroll(3)
        seen.append(await cur.fetchone())
        await cur.scroll(-2)
        seen.append(await cur.fetchone())
        await cur.scroll(7, "absolute")
        seen.append(await cur.fetchone())
        await cur.scroll(0, mode="absolute")
        seen.append(await cur.fetchone())
        seen.append(cur.rownumber)
        return seen


async def test_client_cursor_scroll_relative_and_absolute(dsn: str) -> None:
    result = await assert_same(scroll_within, dsn)
    assert result == [(3,), (2,), (7,), (0,), 1]


async def scroll_out_of_range(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn) as conn:
        cur = await conn.execute("SELECT g FROM generate_series(0, 4) AS g")
        await cur.fetchmany(2)
        beyond = [(10, "relative"), (-3, "relative"), (5, "absolute"), (-1, "absolute")]
        outcomes = [
            await attempt(cur.scroll(value, mode), "moved", catch=IndexError)
            for value, mode in beyond
        ]
        outcomes.append(await attempt(cur.scroll(1, "sideways"), "moved", catch=ValueError))
        outcomes.append(cur.rownumber)
        outcomes.append(await cur.fetchone())
        return outcomes


async def test_client_cursor_scroll_out_of_range_raises_and_keeps_the_position(dsn: str) -> None:
    result = await assert_same(scroll_out_of_range, dsn)
    out_of_bound = Raised(IndexError, None, "position out of bound")
    assert result == [
        out_of_bound,
        out_of_bound,
        out_of_bound,
        out_of_bound,
        Raised(ValueError, None, "bad mode: sideways. It should be 'relative' or 'absolute'"),
        2,
        (2,),
    ]


async def attribute_after_each(
    cls: ConnectionClass, dsn: str, attribute: str, queries: list[str]
) -> Any:
    """The cursor's ``attribute`` before the first query and after each."""
    async with await cls.connect(dsn) as conn:
        cur = conn.cursor()
        seen = [getattr(cur, attribute)]
        for query in queries:
            await cur.execute(query)
            seen.append(getattr(cur, attribute))
        return seen


@pytest.mark.parametrize(
    ("attribute", "before", "after_each"),
    [
        pytest.param(
            "rowcount",
            -1,
            [
                ("CREATE TEMP TABLE rc (x int)", -1),
                ("INSERT INTO rc SELECT generate_series(1, 7)", 7),
                ("UPDATE rc SET x = x + 1 WHERE x > 4", 3),
                ("SELECT x FROM rc", 7),
                ("DELETE FROM rc WHERE x > 100", 0),
            ],
            id="rowcount-counts-rows-returned-or-affected",
        ),
        pytest.param(
            "statusmessage",
            None,
            [
                ("CREATE TEMP TABLE sm (x int)", "CREATE TABLE"),
                ("INSERT INTO sm VALUES (1), (2)", "INSERT 0 2"),
                ("SELECT * FROM sm", "SELECT 2"),
                ("UPDATE sm SET x = 3 WHERE x = 1", "UPDATE 1"),
                ("DELETE FROM sm", "DELETE 2"),
            ],
            id="statusmessage-is-the-command-tag",
        ),
    ],
)
async def test_client_cursor_attribute_after_each_statement(
    dsn: str, attribute: str, before: Any, after_each: list[tuple[str, Any]]
) -> None:
    queries = [query for query, _ in after_each]
    result = await assert_same(attribute_after_each, dsn, attribute, queries)
    assert result == [before, *(value for _, value in after_each)]


async def rownumbers(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn) as conn:
        cur = conn.cursor()
        numbers = [cur.rownumber]
        await cur.execute("SELECT generate_series(1, 6)")
        numbers.append(cur.rownumber)
        await cur.fetchone()
        numbers.append(cur.rownumber)
        await cur.fetchmany(3)
        numbers.append(cur.rownumber)
        await cur.fetchall()
        numbers.append(cur.rownumber)
        await cur.execute("CREATE TEMP TABLE rn (x int)")
        numbers.append(cur.rownumber)
        return numbers


async def test_client_cursor_rownumber_follows_the_fetches(dsn: str) -> None:
    result = await assert_same(rownumbers, dsn)
    assert result == [None, 0, 1, 4, 6, None]


async def descriptions(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn) as conn:
        cur = conn.cursor()
        before = cur.description
        await cur.execute(
            "SELECT 1 AS i, 'a'::text AS t, 1.5::numeric AS n, now() AS ts,"
            " '{}'::jsonb AS j, ARRAY[1] AS arr, NULL::bytea AS b, true AS \"Mixed Case\""
        )
        described = [(col.name, col.type_code) for col in cur.description or []]
        await cur.execute("CREATE TEMP TABLE d (x int)")
        return before, described, cur.description


async def test_client_cursor_description_gives_names_and_type_codes(dsn: str) -> None:
    result = await assert_same(descriptions, dsn)
    assert result == (
        None,
        [
            ("i", 23),
            ("t", 25),
            ("n", 1700),
            ("ts", 1184),
            ("j", 3802),
            ("arr", 1007),
            ("b", 17),
            ("Mixed Case", 16),
        ],
        None,
    )


async def several_statements(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn) as conn:
        cur = await conn.execute(
            "CREATE TEMP TABLE ns (x int); INSERT INTO ns VALUES (1), (2);"
            " SELECT x FROM ns ORDER BY x; SELECT 'a', 'b'"
        )
        sets = []
        for _ in range(10):
            rows = await cur.fetchall() if cur.description is not None else None
            sets.append((cur.statusmessage, cur.rowcount, rows))
            if not cur.nextset():
                break
        after = cur.nextset()
        await cur.set_result(-2)
        by_index = await cur.fetchall()
        walked = [(c.statusmessage, c.rowcount) async for c in cur.results()]
        return sets, after, by_index, walked


async def test_nextset_walks_the_results_of_several_statements(dsn: str) -> None:
    result = await assert_same(several_statements, dsn)
    assert result == (
        [
            ("CREATE TABLE", -1, None),
            ("INSERT 0 2", 2, None),
            ("SELECT 2", 2, [(1,), (2,)]),
            ("SELECT 1", 1, [("a", "b")]),
        ],
        None,
        [(1,), (2,)],
        # From the current result on.
        [("SELECT 2", 2), ("SELECT 1", 1)],
    )


async def executemany_plain(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn) as conn:
        await conn.execute("CREATE TEMP TABLE em (x int, y text)")
        cur = conn.cursor()
        await cur.executemany("INSERT INTO em VALUES (%s, %s)", [(i, str(i)) for i in range(10)])
        count = cur.rowcount
        fetched = await attempt(cur.fetchone(), "fetched")
        await cur.executemany("UPDATE em SET y = 'odd' WHERE x = %s", [(1,), (3,), (42,)])
        updated = cur.rowcount
        check = await conn.execute("SELECT count(*), count(*) FILTER (WHERE y = 'odd') FROM em")
        return count, fetched, updated, await check.fetchone(), tx_status(conn)


async def test_executemany_without_returning_counts_the_affected_rows(dsn: str) -> None:
    result = await assert_same(executemany_plain, dsn)
    assert result == (
        10,
        Raised(psycopg.ProgrammingError, None, "no result available"),
        2,
        (10, 2),
        INTRANS,
    )


async def executemany_returning(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn) as conn:
        await conn.execute("CREATE TEMP TABLE emr (id serial, x int)")
        cur = conn.cursor()
        await cur.executemany(
            "INSERT INTO emr (x) VALUES (%s) RETURNING id, x * 10",
            [(i,) for i in range(1, 5)],
            returning=True,
        )
        first = await cur.fetchall()
        sets = [await c.fetchall() async for c in cur.results()]
        return first, sets, cur.rowcount


async def test_executemany_returning_gives_one_result_per_parameter_set(dsn: str) -> None:
    result = await assert_same(executemany_returning, dsn)
    assert result == (
        [(1, 10)],
        [[], [(2, 20)], [(3, 30)], [(4, 40)]],
        1,
    )


async def cursor_close(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn) as conn:
        async with conn.cursor() as cur:
            await cur.execute("SELECT 1")
        return cur.closed, await attempt(cur.execute("SELECT 2")), await one(conn)


async def test_a_closed_cursor_refuses_to_execute(dsn: str) -> None:
    result = await assert_same(cursor_close, dsn)
    assert result == (True, Raised(psycopg.InterfaceError, None, "the cursor is closed"), (1,))


# --- server-side cursor ----------------------------------------------------------------


async def server_iteration(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn) as conn:
        async with conn.cursor("it") as cur:
            cur.itersize = 7
            await cur.execute("SELECT g, g::text FROM generate_series(1, 20) AS g")
            rows = [row async for row in cur]
            number = cur.rownumber
        return len(rows), rows[0], rows[6], rows[7], rows[-1], number, cur.closed, tx_status(conn)


async def test_server_cursor_iterates_in_pages_of_itersize(dsn: str) -> None:
    result = await assert_same(server_iteration, dsn)
    assert result == (20, (1, "1"), (7, "7"), (8, "8"), (20, "20"), 20, True, INTRANS)


async def server_fetchmany(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn) as conn:
        cur = conn.cursor("fm")
        try:
            await cur.execute("SELECT g FROM generate_series(1, 10) AS g")
            seen: list[Any] = [cur.rownumber]
            seen.append(await cur.fetchmany(3))
            seen.append(await cur.fetchmany())  # arraysize, 1 by default
            seen.append(await cur.fetchone())
            seen.append(cur.rownumber)
            seen.append(await cur.fetchmany(100))
            seen.append(await cur.fetchmany(2))
            seen.append(await cur.fetchone())
            seen.append(cur.rownumber)
            return seen
        finally:
            with anyio.move_on_after(CLEANUP_WAIT, shield=True):
                await cur.close()


async def test_server_cursor_fetchmany_fetches_in_batches(dsn: str) -> None:
    result = await assert_same(server_fetchmany, dsn)
    assert result == [
        0,
        [(1,), (2,), (3,)],
        [(4,)],
        (5,),
        5,
        [(6,), (7,), (8,), (9,), (10,)],
        [],
        None,
        10,
    ]


async def server_fetchall(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn) as conn:
        async with conn.cursor("fa") as cur:
            await cur.execute("SELECT g, g * g FROM generate_series(1, 500) AS g")
            first = await cur.fetchone()
            rest = await cur.fetchall()
            again = await cur.fetchall()
            return first, len(rest), rest[0], rest[-1], again, cur.rownumber


async def test_server_cursor_fetchall_fetches_the_rest(dsn: str) -> None:
    result = await assert_same(server_fetchall, dsn)
    assert result == ((1, 1), 499, (2, 4), (500, 250000), [], 500)


async def server_scroll(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn) as conn:
        async with conn.cursor("sc", scrollable=True) as cur:
            await cur.execute("SELECT g FROM generate_series(0, 9) AS g")
            seen: list[Any] = [await cur.fetchmany(5)]
            await cur.scroll(-3)
            seen.append((cur.rownumber, await cur.fetchone()))
            await cur.scroll(0, "absolute")
            seen.append((cur.rownumber, await cur.fetchone()))
            await cur.scroll(8, "absolute")
            seen.append((cur.rownumber, await cur.fetchone()))
            await cur.scroll(-9)
            seen.append((cur.rownumber, await cur.fetchall()))
            return seen


async def test_server_cursor_scrollable_scrolls_both_ways(dsn: str) -> None:
    result = await assert_same(server_scroll, dsn)
    assert result == [
        [(0,), (1,), (2,), (3,), (4,)],
        (2, (2,)),
        (0, (0,)),
        (8, (8,)),
        (0, [(0,), (1,), (2,), (3,), (4,), (5,), (6,), (7,), (8,), (9,)]),
    ]


async def server_no_scroll(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn) as conn:
        cur = conn.cursor("ns", scrollable=False)
        await cur.execute("SELECT g FROM generate_series(0, 9) AS g")
        await cur.fetchmany(4)
        scrolled = await attempt(cur.scroll(-2), "scrolled")
        return scrolled, await roll_back_and_close(conn, cur), await one(conn)


async def test_server_cursor_not_scrollable_refuses_to_go_back(dsn: str) -> None:
    result = await assert_same(server_no_scroll, dsn)
    scrolled, after, row = result
    assert isinstance(scrolled, Raised)
    assert scrolled.type is psycopg.errors.ObjectNotInPrerequisiteState
    assert scrolled.sqlstate == "55000"
    assert "cursor can only scan forward" in scrolled.message
    assert (after, row) == (INERROR, (1,))


async def server_withhold(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn) as conn:
        cur = conn.cursor("wh", withhold=True)
        await cur.execute("SELECT g FROM generate_series(1, 4) AS g")
        first = await cur.fetchone()
        await conn.commit()
        committed = tx_status(conn)
        rest = await cur.fetchall()
        await cur.close()
        listed = await conn.execute("SELECT count(*) FROM pg_cursors WHERE name = 'wh'")
        return first, committed, rest, await listed.fetchone()


async def test_server_cursor_withhold_survives_the_commit(dsn: str) -> None:
    result = await assert_same(server_withhold, dsn)
    assert result == ((1,), IDLE, [(2,), (3,), (4,)], (0,))


async def server_without_hold(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn) as conn:
        cur = conn.cursor("nh")
        await cur.execute("SELECT g FROM generate_series(1, 4) AS g")
        first = await cur.fetchone()
        await conn.commit()
        fetched = await attempt(cur.fetchall(), "fetched")
        return first, fetched, await roll_back_and_close(conn, cur)


async def test_server_cursor_without_hold_is_gone_after_the_commit(dsn: str) -> None:
    result = await assert_same(server_without_hold, dsn)
    assert result == (
        (1,),
        Raised(psycopg.errors.InvalidCursorName, "34000", 'cursor "nh" does not exist'),
        # FETCH runs outside any transaction: psycopg sends no BEGIN for it.
        IDLE,
    )


async def server_close(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn) as conn:
        cur = conn.cursor("cl")
        await cur.execute("SELECT g FROM generate_series(1, 4) AS g")
        listed = "SELECT count(*) FROM pg_cursors WHERE name = 'cl'"
        before = await one(conn, listed)
        await cur.close()
        after = await one(conn, listed)
        fetched = await attempt(cur.fetchone(), "fetched")
        await cur.close()  # a second close does nothing
        return before, cur.closed, after, fetched, tx_status(conn)


async def test_server_cursor_close_drops_it_on_the_server(dsn: str) -> None:
    result = await assert_same(server_close, dsn)
    assert result == (
        (1,),
        True,
        (0,),
        Raised(psycopg.InterfaceError, None, "the cursor is closed"),
        INTRANS,
    )


async def server_declare_error(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn) as conn:
        cur = conn.cursor("de")
        declared = await attempt(cur.execute("SELECT * FROM pgsd_no_such_table"), "declared")
        return declared, await roll_back_and_close(conn, cur), tx_status(conn), await one(conn)


async def test_server_cursor_error_in_declare_fails_the_transaction(dsn: str) -> None:
    result = await assert_same(server_declare_error, dsn)
    declared, *rest = result
    assert isinstance(declared, Raised)
    assert declared.type is psycopg.errors.UndefinedTable
    assert declared.sqlstate == "42P01"
    assert 'relation "pgsd_no_such_table" does not exist' in declared.message
    assert rest == [INERROR, IDLE, (1,)]


# --- other cursor classes ------------------------------------------------------------------


async def raw_cursor(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn, cursor_factory=AsyncRawCursor) as conn:
        cur = conn.cursor()
        await cur.execute("SELECT $1::int + $2::int, $2::text", [40, 2])
        row = await cur.fetchone()
        via_conn = await conn.execute("SELECT $1::text || $1::text", ["ab"])
        percent = await attempt(conn.execute("SELECT %s::int", [1]))
        return type(cur).__name__, row, type(via_conn).__name__, await via_conn.fetchone(), percent


async def test_raw_cursor_from_cursor_factory_uses_dollar_placeholders(dsn: str) -> None:
    result = await assert_same(raw_cursor, dsn)
    name, row, via_name, via_row, percent = result
    assert (name, row, via_name, via_row) == (
        "AsyncRawCursor",
        (42, "2"),
        "AsyncRawCursor",
        ("abab",),
    )
    assert isinstance(percent, Raised)
    assert percent.type is psycopg.errors.SyntaxError
    assert percent.sqlstate == "42601"


async def raw_cursor_by_attribute(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn) as conn:
        default = type(conn.cursor()).__name__
        conn.cursor_factory = AsyncRawCursor
        cur = conn.cursor()
        await cur.execute("SELECT $1::int * 2", [21])
        return default, type(cur).__name__, await cur.fetchone()


async def test_raw_cursor_set_as_the_connections_cursor_factory(dsn: str) -> None:
    result = await assert_same(raw_cursor_by_attribute, dsn)
    assert result == ("AsyncCursor", "AsyncRawCursor", (42,))


async def client_cursor_factory(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn, cursor_factory=AsyncClientCursor) as conn:
        cur = conn.cursor()
        mogrified = cur.mogrify("SELECT %s, %s, %s", [1, "it's", None])
        await cur.execute("SELECT %s::int; SELECT %s::text", [1, "two"])
        first = await cur.fetchall()
        cur.nextset()
        second = await cur.fetchall()
        return type(cur).__name__, mogrified, first, second


async def test_client_cursor_from_cursor_factory_binds_on_the_client(dsn: str) -> None:
    result = await assert_same(client_cursor_factory, dsn)
    assert result == ("AsyncClientCursor", "SELECT 1, 'it''s', NULL", [(1,)], [("two",)])


async def client_cursor_direct(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn) as conn:
        async with AsyncClientCursor(conn) as cur:
            # The server sees the values inlined in the query text.
            await cur.execute("SELECT current_query(), %s || %s, %s", ["a", "b", Decimal("1.25")])
            row = await cur.fetchone()
        # The same query on the connection's own cursor is bound on the server.
        server_side = await conn.execute("SELECT current_query(), %s::text", ["a"])
        return type(cur).__name__, row, await server_side.fetchone()


async def test_client_cursor_made_on_a_connection_binds_on_the_client(dsn: str) -> None:
    result = await assert_same(client_cursor_direct, dsn)
    assert result == (
        "AsyncClientCursor",
        ("SELECT current_query(), 'a' || 'b', 1.25", "ab", Decimal("1.25")),
        ("SELECT current_query(), $1::text", "a"),
    )


# --- binary results, row factories, types ------------------------------------------------

TYPES_QUERY = (
    "SELECT NULL::int, 42, 'text'::text, 1234.5678::numeric,"
    " '2024-01-02 03:04:05.123456+00'::timestamptz, '{\"a\": [1, null, \"x\"]}'::json,"
    " '{\"b\": true}'::jsonb, ARRAY[1, NULL, 3], ARRAY['a', 'b c'], '\\x00ff10'::bytea,"
    " true, 1.5::float8, '2024-02-29'::date"
)
TYPES_VALUES = (
    None,
    42,
    "text",
    Decimal("1234.5678"),
    datetime.datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=datetime.UTC),
    {"a": [1, None, "x"]},
    {"b": True},
    [1, None, 3],
    ["a", "b c"],
    b"\x00\xff\x10",
    True,
    1.5,
    datetime.date(2024, 2, 29),
)


async def types_and_nulls(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn) as conn:
        cur = await conn.execute(TYPES_QUERY)
        row = await cur.fetchone()
        assert row is not None
        return tuple((type(value).__name__, value) for value in row)


async def test_nulls_and_types_load_as_python_values(dsn: str) -> None:
    result = await assert_same(types_and_nulls, dsn)
    assert tuple(value for _, value in result) == TYPES_VALUES
    assert [name for name, _ in result] == [type(value).__name__ for value in TYPES_VALUES]


async def parameters_round_trip(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn) as conn:
        params = [
            None,
            Decimal("-0.001"),
            datetime.datetime(2020, 5, 6, 7, 8, 9, tzinfo=datetime.UTC),
            Json({"k": [1, 2]}),
            [1, 2, None],
            b"\x00\x01",
            "naïve",
        ]
        cur = await conn.execute(
            "SELECT %s::int, %s, %s, %s, %s, %s, %s, pg_typeof(%s)::text", [*params, params[1]]
        )
        return await cur.fetchone()


async def test_python_values_round_trip_as_parameters(dsn: str) -> None:
    result = await assert_same(parameters_round_trip, dsn)
    assert result == (
        None,
        Decimal("-0.001"),
        datetime.datetime(2020, 5, 6, 7, 8, 9, tzinfo=datetime.UTC),
        {"k": [1, 2]},
        [1, 2, None],
        b"\x00\x01",
        "naïve",
        "numeric",
    )


async def binary_execute(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn) as conn:
        cur = conn.cursor()
        await cur.execute(TYPES_QUERY, binary=True)
        binary_row = await cur.fetchone()
        assert cur.pgresult is not None
        binary_formats = [cur.pgresult.fformat(i) for i in range(cur.pgresult.nfields)]
        await cur.execute(TYPES_QUERY)
        text_row = await cur.fetchone()
        assert cur.pgresult is not None
        text_formats = {cur.pgresult.fformat(i) for i in range(cur.pgresult.nfields)}
        return binary_row, set(binary_formats), text_row == binary_row, text_formats


async def test_execute_binary_returns_the_same_values_in_binary(dsn: str) -> None:
    result = await assert_same(binary_execute, dsn)
    assert result == (TYPES_VALUES, {1}, True, {0})


async def binary_cursor(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn) as conn:
        cur = conn.cursor(binary=True)
        await cur.execute("SELECT %s::int, %s::text, ARRAY[%s::numeric]", [7, "x", Decimal("2.5")])
        row = await cur.fetchone()
        assert cur.pgresult is not None
        formats = [cur.pgresult.fformat(i) for i in range(cur.pgresult.nfields)]
        await cur.execute("SELECT 1", binary=False)
        assert cur.pgresult is not None
        return row, formats, cur.pgresult.fformat(0)


async def test_binary_cursor_returns_binary_results(dsn: str) -> None:
    result = await assert_same(binary_cursor, dsn)
    assert result == ((7, "x", [Decimal("2.5")]), [1, 1, 1], 0)


ROW_QUERY = "SELECT g AS x, g * 10 AS y FROM generate_series(1, 2) AS g"


async def row_factory_on_connect(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn, row_factory=dict_row) as conn:
        cur = await conn.execute(ROW_QUERY)
        rows = await cur.fetchall()
        # A cursor's own factory overrides the connection's.
        own = conn.cursor(row_factory=class_row(Point))
        await own.execute(ROW_QUERY)
        return rows, await own.fetchall(), await one(conn, "SELECT 1 AS one")


async def test_row_factory_on_connect_shapes_every_row(dsn: str) -> None:
    result = await assert_same(row_factory_on_connect, dsn)
    assert result == (
        [{"x": 1, "y": 10}, {"x": 2, "y": 20}],
        [Point(1, 10), Point(2, 20)],
        {"one": 1},
    )


async def row_factories_per_cursor(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn) as conn:
        shaped = {}
        for name, factory in [
            ("dict", dict_row),
            ("class", class_row(Point)),
            ("args", args_row(as_args)),
            ("kwargs", kwargs_row(as_kwargs)),
        ]:
            cur = conn.cursor(row_factory=factory)
            await cur.execute(ROW_QUERY)
            shaped[name] = await cur.fetchall()
        cur = conn.cursor(row_factory=namedtuple_row)
        await cur.execute(ROW_QUERY)
        rows = await cur.fetchall()
        shaped["namedtuple"] = [(type(row).__name__, row._fields, tuple(row)) for row in rows]
        # Writable on a cursor that already has a result.
        cur = await conn.execute(ROW_QUERY)
        first = await cur.fetchone()
        cur.row_factory = dict_row
        shaped["switched"] = [first, await cur.fetchone()]
        async with conn.cursor("named", row_factory=dict_row) as named:
            await named.execute(ROW_QUERY)
            shaped["server"] = await named.fetchall()
        return shaped


async def test_row_factories_per_cursor_shape_its_rows(dsn: str) -> None:
    result = await assert_same(row_factories_per_cursor, dsn)
    assert result == {
        "dict": [{"x": 1, "y": 10}, {"x": 2, "y": 20}],
        "class": [Point(1, 10), Point(2, 20)],
        "args": [("args", (1, 10)), ("args", (2, 20))],
        "kwargs": [("kwargs", {"x": 1, "y": 10}), ("kwargs", {"x": 2, "y": 20})],
        "namedtuple": [("Row", ("x", "y"), (1, 10)), ("Row", ("x", "y"), (2, 20))],
        "switched": [(1, 10), {"x": 2, "y": 20}],
        "server": [{"x": 1, "y": 10}, {"x": 2, "y": 20}],
    }


# --- errors --------------------------------------------------------------------------------


async def error_in_autocommit(cls: ConnectionClass, dsn: str, query: str) -> Any:
    async with await cls.connect(dsn, autocommit=True) as conn:
        return await attempt(conn.execute(query)), tx_status(conn), await one(conn)


async def test_syntax_error_raises_and_leaves_the_connection_usable(dsn: str) -> None:
    result = await assert_same(error_in_autocommit, dsn, "SELEC 1")
    raised, *rest = result
    assert isinstance(raised, Raised)
    assert raised.type is psycopg.errors.SyntaxError
    assert raised.sqlstate == "42601"
    assert 'syntax error at or near "SELEC"' in raised.message
    assert rest == [IDLE, (1,)]


async def test_division_by_zero_in_autocommit_leaves_the_connection_usable(dsn: str) -> None:
    result = await assert_same(error_in_autocommit, dsn, "SELECT 1 / (SELECT 0)")
    assert result == (DIVISION_BY_ZERO, IDLE, (1,))


async def division_by_zero(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn) as conn:
        outcomes: list[Any] = []
        for query in ["SELECT 1 / (SELECT 0)", "SELECT 1"]:
            outcomes.append(await attempt(conn.execute(query)))
            outcomes.append(tx_status(conn))
        await conn.rollback()
        outcomes.append(tx_status(conn))
        outcomes.append(await one(conn))
        outcomes.append(tx_status(conn))
        return outcomes


async def test_division_by_zero_fails_the_transaction_until_rollback(dsn: str) -> None:
    result = await assert_same(division_by_zero, dsn)
    assert result == [
        DIVISION_BY_ZERO,
        INERROR,
        Raised(
            psycopg.errors.InFailedSqlTransaction,
            "25P02",
            "current transaction is aborted, commands ignored until end of transaction block",
        ),
        INERROR,
        IDLE,
        (1,),
        INTRANS,
    ]


# --- stream() --------------------------------------------------------------------------------


async def stream_finished(cls: ConnectionClass, dsn: str, size: int) -> Any:
    async with await cls.connect(dsn) as conn:
        cur = conn.cursor()
        rows = [row async for row in cur.stream("SELECT g, g::text FROM generate_series(1, 50) g")]
        if size > 1:
            chunked = [
                row
                async for row in cur.stream("SELECT g FROM generate_series(1, 25) AS g", size=size)
            ]
        else:
            chunked = None
        return len(rows), rows[0], rows[-1], chunked, tx_status(conn), await one(conn)


@pytest.mark.parametrize(
    ("size", "chunked"),
    [
        pytest.param(1, None, id="to-the-end"),
        pytest.param(
            10,
            [(g,) for g in range(1, 26)],
            id="in-chunks",
            marks=pytest.mark.skipif(
                psycopg.pq.version() < 170000, reason="stream(size=...) needs libpq 17 or later"
            ),
        ),
    ],
)
async def test_stream_yields_every_row(dsn: str, size: int, chunked: Any) -> None:
    result = await assert_same(stream_finished, dsn, size)
    assert result == (50, (1, "1"), (50, "50"), chunked, INTRANS, (1,))


async def stream_left_early(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn, autocommit=True) as conn:
        cur = conn.cursor()
        seen = []
        async with contextlib.aclosing(cur.stream(ENDLESS)) as rows:
            async for row in rows:
                seen.append(row)
                if len(seen) == 3:
                    break
        return seen, tx_status(conn), await one(conn, "SELECT 'after'"), tx_status(conn)


async def test_stream_left_early_leaves_the_connection_usable(dsn: str) -> None:
    result = await assert_same(stream_left_early, dsn)
    assert result == ([(1,), (2,), (3,)], IDLE, ("after",), IDLE)


async def stream_aclosed(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn, autocommit=True) as conn:
        rows = conn.cursor().stream(ENDLESS)
        first = await anext(rows)
        second = await anext(rows)
        await rows.aclose()
        try:
            await anext(rows)
        except StopAsyncIteration:
            exhausted = True
        else:
            exhausted = False
        return first, second, exhausted, tx_status(conn), await one(conn, "SELECT 'after'")


async def test_stream_closed_early_with_aclose_leaves_the_connection_usable(dsn: str) -> None:
    result = await assert_same(stream_aclosed, dsn)
    assert result == ((1,), (2,), True, IDLE, ("after",))


async def stream_dropped(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn, autocommit=True) as conn:
        rows = conn.cursor().stream(ENDLESS)
        first = await anext(rows)
        del rows
        gc.collect()
        after = await one(conn, "SELECT 'after'")
        return first, after, tx_status(conn), await one(conn, "SELECT 'again'")


# trio's own warning, for any async generator it sees collected unfinished.
@pytest.mark.filterwarnings("ignore:Async generator:ResourceWarning")
async def test_stream_dropped_unfinished_leaves_the_connection_usable(dsn: str) -> None:
    result = await assert_same(stream_dropped, dsn)
    assert result == ((1,), ("after",), IDLE, ("again",))


async def stream_error(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn, autocommit=True) as conn:
        seen: list[int] = []

        async def read() -> None:
            async for row in conn.cursor().stream(
                "SELECT 1000 / (500 - g) FROM generate_series(1, 1000) AS g"
            ):
                seen.append(row[0])  # noqa: PERF401 (the rows before the error count)

        raised = await attempt(read(), "finished")
        return len(seen), seen[:2], raised, tx_status(conn), await one(conn)


async def test_stream_error_mid_way_raises_after_the_rows_before_it(dsn: str) -> None:
    result = await assert_same(stream_error, dsn)
    assert result == (
        499,
        [2, 2],
        DIVISION_BY_ZERO,
        IDLE,
        (1,),
    )


STREAM_TABLE = "pgsd_parity_stream_commit"


async def stream_in_transaction(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn, autocommit=True) as conn:
        await conn.execute(f"DROP TABLE IF EXISTS {STREAM_TABLE}")
        await conn.execute(f"CREATE TABLE {STREAM_TABLE} (x int)")
        try:
            async with conn.transaction():
                inserted = [
                    row[0]
                    async for row in conn.cursor().stream(
                        f"INSERT INTO {STREAM_TABLE} SELECT generate_series(1, 5) RETURNING x"
                    )
                ]
                during = tx_status(conn)
            async with await cls.connect(dsn) as other:
                seen = await one(other, f"SELECT array_agg(x ORDER BY x) FROM {STREAM_TABLE}")
            return inserted, during, tx_status(conn), seen
        finally:
            with anyio.move_on_after(CLEANUP_WAIT, shield=True):
                await conn.execute(f"DROP TABLE {STREAM_TABLE}")


async def test_stream_inside_a_transaction_is_committed_with_it(dsn: str) -> None:
    result = await assert_same(stream_in_transaction, dsn)
    assert result == ([1, 2, 3, 4, 5], INTRANS, IDLE, ([1, 2, 3, 4, 5],))


# --- prepared statements ---------------------------------------------------------------------

PREPARE_QUERY = "SELECT %s::int + 1"
PREPARED = ("_pg3_0", "SELECT $1::int + 1")


async def prepared_after_each(
    cls: ConnectionClass, dsn: str, times: int, threshold: Any, prepare: bool | None
) -> Any:
    kwargs = {} if threshold == "default" else {"prepare_threshold": threshold}
    async with await cls.connect(dsn, autocommit=True, **kwargs) as conn:
        counts = []
        results = []
        for i in range(times):
            cur = await conn.execute(PREPARE_QUERY, [i], prepare=prepare)
            results.append(await cur.fetchone())
            counts.append(len(await prepared(conn)))
        return counts, results == [(i + 1,) for i in range(times)], await prepared(conn)


# Executes of one query, with prepare_threshold= given on connect or not ("default") and
# prepare= on each execute: how many statements are prepared after each, and which at the end.
@pytest.mark.parametrize(
    ("times", "threshold", "prepare", "counts", "statements"),
    [
        pytest.param(3, 0, None, [1, 1, 1], [PREPARED], id="threshold-0-prepares-on-the-first"),
        pytest.param(2, "default", True, [1, 1], [PREPARED], id="prepare-true-prepares-at-once"),
        pytest.param(3, 0, False, [0, 0, 0], [], id="prepare-false-never-even-with-threshold-0"),
        pytest.param(8, None, None, [0] * 8, [], id="threshold-none-never-prepares"),
        pytest.param(2, None, True, [0, 0], [], id="threshold-none-ignores-prepare-true"),
        pytest.param(
            8,
            "default",
            None,
            [0, 0, 0, 0, 0, 1, 1, 1],
            [PREPARED],
            id="default-threshold-prepares-on-the-sixth",
        ),
    ],
)
async def test_statements_are_prepared_as_threshold_and_prepare_say(
    dsn: str,
    times: int,
    threshold: Any,
    prepare: bool | None,
    counts: list[int],
    statements: list[tuple[str, str]],
) -> None:
    result = await assert_same(prepared_after_each, dsn, times, threshold, prepare)
    assert result == (counts, True, statements)


# --- cancellation, closing, sharing ------------------------------------------------------------


async def cancel_running_query(cls: ConnectionClass, dsn: str, how: str) -> Any:
    async with (
        await cls.connect(dsn, autocommit=True) as conn,
        await cls.connect(dsn, autocommit=True) as observer,
    ):
        # psycopg has both: cancel() asks the server in a blocking call, cancel_safe() awaits it.
        async def cancel() -> None:
            if how == "cancel_safe":
                await conn.cancel_safe()
            else:
                conn.cancel()

        query, quick = await interrupt_running_query(conn, observer, cancel)
        return query, quick, tx_status(conn), await one(conn), conn.closed


CANCELED = Raised(psycopg.errors.QueryCanceled, "57014", "canceling statement due to user request")


@pytest.mark.parametrize("how", ["cancel_safe", "cancel"], ids=["cancel_safe", "blocking-cancel"])
async def test_cancel_from_another_task_stops_the_query(dsn: str, how: str) -> None:
    result = await assert_same(cancel_running_query, dsn, how)
    assert result == (CANCELED, True, IDLE, (1,), False)


async def cancel_idle(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn) as conn:
        await conn.cancel_safe()
        conn.cancel()
        first = tx_status(conn)
        row = await one(conn, "SELECT 'still here'")
        await conn.cancel_safe()
        return first, row, tx_status(conn), await one(conn), conn.closed


async def test_cancel_on_an_idle_connection_does_nothing(dsn: str) -> None:
    result = await assert_same(cancel_idle, dsn)
    assert result == (IDLE, ("still here",), INTRANS, (1,), False)


async def close_during_query(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn, autocommit=True) as observer:
        conn = await cls.connect(dsn, autocommit=True)
        pid = conn.info.backend_pid
        try:
            query, quick = await interrupt_running_query(conn, observer, conn.close)
        finally:
            with anyio.move_on_after(CLEANUP_WAIT, shield=True):
                await conn.close()
                # The backend sleeps on without noticing its client went away.
                await observer.execute("SELECT pg_terminate_backend(%s)", [pid])
        after = await attempt(conn.execute("SELECT 1"))
        return query, quick, conn.closed, tx_status(conn), after


async def test_closing_the_connection_during_a_query_fails_the_query(dsn: str) -> None:
    result = await assert_same(close_during_query, dsn)
    assert result == (
        Raised(psycopg.OperationalError, None, "connection socket closed"),
        True,
        True,
        "UNKNOWN",
        Raised(psycopg.OperationalError, None, "the connection is closed"),
    )


async def two_tasks(cls: ConnectionClass, dsn: str) -> Any:
    async with await cls.connect(dsn, autocommit=True) as conn:
        results: dict[str, list[Any]] = {"a": [], "b": []}

        async def worker(name: str, offset: int) -> None:
            for i in range(8):
                cur = await conn.execute(
                    "SELECT %s::int, pg_sleep(0.005)::text, pg_backend_pid()", [offset + i]
                )
                row = await cur.fetchone()
                assert row is not None
                results[name].append(row[0])
                cur = conn.cursor()
                await cur.executemany("SELECT %s", [(1,), (2,)])

        async with anyio.create_task_group() as tg:
            tg.start_soon(worker, "a", 0)
            tg.start_soon(worker, "b", 100)
        return results, tx_status(conn), await one(conn)


async def test_two_tasks_share_one_connection_one_query_at_a_time(dsn: str) -> None:
    result = await assert_same(two_tasks, dsn)
    assert result == (
        {"a": list(range(8)), "b": list(range(100, 108))},
        IDLE,
        (1,),
    )
