"""Fuzzing: what a DSN, a config file or a requirement string holds gives a
valid configuration or a `ConfigError` naming the key, never another
exception, and never shows a secret it holds."""

from __future__ import annotations

import datetime
import math
import re
import string
import tempfile
import tomllib
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict

import pgsd
from pgsd._config import _LIBPQ_FIELDS
from pgsd._errors import is_secret_key
from pgsd._permissions import Requirement, parse_requirement, parse_requirements
from support import config_guide_example

# Fast properties get many examples; those that write a file, fewer. No
# deadline: the machine may be busy, and a slow example is not a failure.
MANY = settings(max_examples=400, deadline=None)
FILES = settings(max_examples=200, deadline=None)

LIBPQ_FIELDS = _LIBPQ_FIELDS

# Every secret marker ends with this character, which no other generated
# text contains: a marker found in a message came from where it was put.
MARK = "¤"
FIXED_SECRET = f"s3cr3t-Pa55{MARK}"

# Text other than secrets never holds the marker's character. TEXT_CHARS is
# what a TOML file can hold; ANY_CHARS adds, more often than chance would
# draw them, what libpq or UTF-8 cannot take: NUL and unpaired surrogates.
TEXT_CHARS = st.characters(codec="utf-8", exclude_characters=MARK + "\0")
ANY_CHARS = st.characters(exclude_characters=MARK) | st.sampled_from("\0\ud800\udfff")
texts = st.text(ANY_CHARS, max_size=12)
words = st.text(string.ascii_letters + string.digits + "_-.", min_size=1, max_size=10)
secret_markers = st.one_of(
    st.text(string.ascii_letters + string.digits, min_size=5, max_size=12),
    st.text(TEXT_CHARS, min_size=5, max_size=12),
).map(lambda s: s + MARK)
huge_digits = st.integers(min_value=4000, max_value=6000).map(lambda n: "9" * n)
odd_numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.sampled_from(
        ["", "0", "-1", "65535", "65536", "1e999", "nan", "inf", "1_0", "0x10", "\uff15"]
    ),
    huge_digits,
)
odd_ports = st.one_of(
    st.integers(min_value=-10, max_value=70000).map(str),
    odd_numbers,
    st.lists(st.integers(min_value=0, max_value=70000).map(str), max_size=4).map(",".join),
    texts,
)


T = TypeVar("T")


def built_or_config_error(build: Callable[[], T]) -> T | pgsd.ConfigError:
    """What *build* returns, or the ConfigError it raises; any other exception propagates."""
    try:
        return build()
    except pgsd.ConfigError as err:
        return err


# -- what an error shows --------------------------------------------------------------


def everything_shown(err: BaseException) -> str:
    """What a program, a log or a crash report can show of an error, chain included.

    The formatted traceback, and str() and repr() of every exception reachable
    through __cause__ and __context__, hidden ones too.
    """
    shown = ["".join(traceback.format_exception(err))]
    seen: set[int] = set()
    pending = [err]
    while pending:
        exc = pending.pop()
        if id(exc) in seen:
            continue
        seen.add(id(exc))
        shown += [str(exc), repr(exc)]
        pending += [e for e in (exc.__cause__, exc.__context__) if e is not None]
    return "\n".join(shown)


def assert_hidden(err: BaseException, secrets: Sequence[str]) -> None:
    shown = everything_shown(err)
    for secret in secrets:
        assert secret not in shown


def assert_conninfo_round_trips(config: pgsd.DatabaseConfig) -> None:
    expected = {
        key: str(value) for key in LIBPQ_FIELDS if (value := getattr(config, key)) is not None
    }
    expected["connect_timeout"] = str(max(2, math.ceil(config.connect_timeout)))
    expected.update(config.extra)
    assert conninfo_to_dict(config.conninfo()) == expected


def secrets_libpq_reads_as_secrets(dsn: str, secrets: Sequence[str]) -> list[str]:
    """The secrets that libpq reads as the value of a secret keyword, and of no other."""
    params = conninfo_to_dict(dsn)
    secret_values = [str(v) for k, v in params.items() if is_secret_key(k)]
    other_values = [str(v) for k, v in params.items() if not is_secret_key(k)]
    return [
        s
        for s in secrets
        if any(s in v for v in secret_values) and not any(s in v for v in other_values)
    ]


def check_dsn(dsn: str, secrets: Sequence[str] = ()) -> pgsd.DatabaseConfig | None:
    """Build a config from *dsn*: a valid one or a ConfigError, neither showing *secrets*."""
    config = built_or_config_error(lambda: pgsd.DatabaseConfig.from_dsn(dsn))
    if isinstance(config, pgsd.ConfigError):
        assert config.key is not None
        assert_hidden(config, secrets)
        return None
    assert_conninfo_round_trips(config)
    # And back: libpq counts connect_timeout in whole seconds, at least 2.
    whole_seconds = float(max(2, math.ceil(config.connect_timeout)))
    again = pgsd.DatabaseConfig.from_dsn(config.conninfo())
    assert again == config.replace(connect_timeout=whole_seconds)
    for secret in secrets_libpq_reads_as_secrets(dsn, secrets):
        assert secret not in repr(config)
        assert secret not in repr(pgsd.ConnectorConfig(databases={"db": config}))
    return config


# -- DSNs -----------------------------------------------------------------------------


def url_encoded(text: str) -> str:
    # An unpaired surrogate becomes bytes that are not UTF-8, as a careless encoder makes.
    return quote(text, safe="", errors="surrogatepass")


def kv_escaped(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def kv_quoted(text: str) -> str:
    """A key=value value as libpq reads it: bare when it can be, else in single quotes."""
    if re.fullmatch(r"[A-Za-z0-9_.,:/@-]+", text):
        return text
    return f"'{kv_escaped(text)}'"


def spellings(secret: str) -> list[str]:
    """A secret, and the forms it takes in a DSN."""
    return [secret, url_encoded(secret), kv_escaped(secret)]


class Dsn:
    """A DSN built from pieces; the pieces that hold a secret are never mutated."""

    def __init__(self) -> None:
        self.pieces: list[tuple[str, bool]] = []
        self.secrets: list[str] = []

    def add(self, text: str, *, secret: str | None = None) -> None:
        self.pieces.append((text, secret is not None))
        if secret is not None:
            self.secrets += spellings(secret)

    def text(self, draw: st.DrawFn) -> str:
        """The DSN, with a few random edits (insertions, deletions) outside the secrets."""
        pieces = [text for text, _ in self.pieces]
        editable = [i for i, (text, secret) in enumerate(self.pieces) if not secret]
        for _ in range(draw(st.integers(min_value=0, max_value=3)) if editable else 0):
            i = draw(st.sampled_from(editable))
            pos = draw(st.integers(min_value=0, max_value=len(pieces[i])))
            if draw(st.booleans()):
                char = draw(st.sampled_from("@:/?&=,'\"\\%[] \t#") | ANY_CHARS)
                pieces[i] = pieces[i][:pos] + char + pieces[i][pos:]
            else:
                pieces[i] = pieces[i][:pos] + pieces[i][pos + 1 :]
        return "".join(pieces)


QUERY_KEYS = (
    "host",
    "port",
    "dbname",
    "user",
    "sslmode",
    "application_name",
    "connect_timeout",
    "target_session_attrs",
    "options",
    "keepalives",
    "keepalives_idle",
    "gssencmode",
    "hostaddr",
    "bogus",
    "Host",
    "",
)
SECRET_KEYS = ("password", "sslpassword", "Password", "PASSWORD", "my_secret")


@st.composite
def url_dsns(draw: st.DrawFn) -> tuple[str, list[str]]:
    dsn = Dsn()
    dsn.add(draw(st.sampled_from(["postgresql://", "postgres://", "PostgreSQL://", "http://"])))
    user = draw(st.none() | words | texts)
    if user is not None:
        dsn.add(url_encoded(user) if draw(st.booleans()) else user)
        if draw(st.booleans()):
            password = draw(secret_markers)
            dsn.add(":" + url_encoded(password), secret=password)
        dsn.add("@")
    hosts = []
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        host = draw(words | st.sampled_from(["[::1]", "[::1", "[]", "127.0.0.1", ""]) | texts)
        port = draw(st.none() | odd_ports)
        hosts.append(host if port is None else f"{host}:{port}")
    dsn.add(",".join(hosts))
    dbname = draw(st.none() | words | texts)
    if dbname is not None:
        dsn.add("/" + (url_encoded(dbname) if draw(st.booleans()) else dbname))
    separator = "?"
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        if draw(st.integers(min_value=0, max_value=4)) == 0:
            key = draw(st.sampled_from(SECRET_KEYS))
            password = draw(secret_markers)
            dsn.add(f"{separator}{key}={url_encoded(password)}", secret=password)
        else:
            key = draw(st.sampled_from(QUERY_KEYS))
            value = draw(words | odd_numbers | texts | st.sampled_from(["require", "read-write"]))
            dsn.add(f"{separator}{key}={url_encoded(value) if draw(st.booleans()) else value}")
        separator = "&"
    return dsn.text(draw), dsn.secrets


@st.composite
def keyword_dsns(draw: st.DrawFn) -> tuple[str, list[str]]:
    dsn = Dsn()
    for _ in range(draw(st.integers(min_value=0, max_value=6))):
        space = draw(st.sampled_from([" ", "  ", "\t", "\n", " \n "]))
        sign = draw(st.sampled_from(["=", " = ", "= ", " ="]))
        if draw(st.integers(min_value=0, max_value=3)) == 0:
            key = draw(st.sampled_from(SECRET_KEYS))
            password = draw(secret_markers)
            if draw(st.booleans()):
                dsn.add(f"{space}{key}{sign}{kv_quoted(password)}", secret=password)
            else:  # carelessly unquoted
                dsn.add(f"{space}{key}{sign}{password}", secret=password)
            continue
        key = draw(st.sampled_from(QUERY_KEYS))
        value = draw(words | odd_ports | texts | st.sampled_from(["verify-full", "primary"]))
        spelled = draw(
            st.sampled_from(
                [kv_quoted(value), value, "'" + value, "'" + value + "'", '"' + value + '"']
            )
        )
        dsn.add(f"{space}{key}{sign}{spelled}")
    return dsn.text(draw), dsn.secrets


@MANY
@given(st.text(ANY_CHARS) | st.text())
@example("port=" + "9" * 5000)
@example("host=db1 port=5432," + "9" * 5000)
@example("host=a\0b")
@example("host=\ud800")
def test_any_text_as_a_dsn_gives_a_config_or_a_config_error(dsn: str) -> None:
    check_dsn(dsn)


@MANY
@given(url_dsns())
@example(("postgresql://app:pa%zz" + FIXED_SECRET + "@db1/app", [FIXED_SECRET]))
@example(("postgresql://app:" + FIXED_SECRET + " x@db1/app", [FIXED_SECRET]))
@example(("postgresql://app:" + FIXED_SECRET + "/@db1/app", [FIXED_SECRET]))
def test_url_dsns_give_a_config_or_a_config_error_hiding_secrets(
    case: tuple[str, list[str]],
) -> None:
    check_dsn(*case)


@MANY
@given(keyword_dsns())
@example(("host=db1 password=" + FIXED_SECRET + " x", [FIXED_SECRET]))
@example(("host=db1 password= x " + FIXED_SECRET, [FIXED_SECRET]))
def test_keyword_dsns_give_a_config_or_a_config_error_hiding_secrets(
    case: tuple[str, list[str]],
) -> None:
    check_dsn(*case)


@MANY
@given(before=st.text(), after=st.text())
def test_a_password_in_any_text_is_never_shown(before: str, after: str) -> None:
    check_dsn(f"{before} password={FIXED_SECRET} {after}", [FIXED_SECRET])
    check_dsn(f"postgresql://app:{FIXED_SECRET}@{after}", [FIXED_SECRET])


@pytest.mark.anyio
@pytest.mark.parametrize(
    "dsn",
    [
        "port=" + "9" * 5000,
        "host=/nonexistent\0b",
        "host=\ud800",
        f"postgresql://app:{FIXED_SECRET}@[db1/app",
    ],
)
async def test_connect_refuses_a_bad_dsn_before_connecting(anyio_backend: str, dsn: str) -> None:
    with pytest.raises(pgsd.ConfigError) as info:
        await pgsd.connect(dsn)
    assert info.value.key in ("dsn", "port")
    assert FIXED_SECRET not in everything_shown(info.value)


# -- TOML files -----------------------------------------------------------------------


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_string(key)


def toml_string(text: str) -> str:
    escaped = re.sub(
        r'["\\\x00-\x1f\x7f]',
        lambda m: "\\" + m[0] if m[0] in '"\\' else f"\\u{ord(m[0]):04X}",
        text,
    )
    return f'"{escaped}"'


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items())
        return "{" + items + "}"
    assert isinstance(value, datetime.datetime | datetime.date | datetime.time)
    return value.isoformat()


def toml_document(document: dict[str, Any]) -> str:
    """TOML for *document*: its tables as [headers], their values as key = value."""
    lines: list[str] = []

    def table(path: tuple[str, ...], content: dict[str, Any]) -> None:
        if path:
            lines.append("[" + ".".join(map(toml_key, path)) + "]")
        subtables = {k: v for k, v in content.items() if isinstance(v, dict) and v}
        lines.extend(
            f"{toml_key(k)} = {toml_value(v)}" for k, v in content.items() if k not in subtables
        )
        for key, value in subtables.items():
            table((*path, key), value)

    table((), document)
    return "\n".join(lines) + "\n"


toml_keys = st.text(TEXT_CHARS, max_size=8)
toml_scalars = st.one_of(
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(),
    st.text(TEXT_CHARS | st.just("\0"), max_size=10),
    st.datetimes(timezones=st.none() | st.just(datetime.UTC)),
    st.dates(),
    st.times(),
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(toml_keys, inner, max_size=3),
    max_leaves=6,
)

POOL_KEYS = (
    "min_size",
    "max_size",
    "acquire_timeout",
    "max_waiting",
    "max_idle",
    "max_lifetime",
    "lifetime_jitter",
    "health_check_interval",
    "ping_after_idle",
    "reconnect_initial",
    "reconnect_max",
    "reconnect_multiplier",
    "reconnect_jitter",
    "leak_threshold",
    "close_timeout",
    "min_server_version",
    "pipeline_depth",
    "evict_sqlstates",
    "configure",
    "max_sise",
)
DATABASE_KEYS = (
    *(key for key in LIBPQ_FIELDS if key != "password"),
    "cancel_grace",
    "prepare_threshold",
    "password_command",
    "password_provider",
    "required",
    "extra",
    "pool",
    "name",
    "keepalives",
    "keepalives_idle",
    "gssencmode",
    "hots",
)
PASSWORD_VARIABLE = "PGSD_FUZZ_PASSWORD"

requirement_lists = st.lists(
    st.sampled_from(["database:CONNECT", "schema:app:USAGE", "table:app.t:SELECT", "role:r"])
    | st.text(max_size=12),
    max_size=3,
)
edge_numbers = st.sampled_from(
    [0, -1, 2**31, 2**63, 2**64, 10**400, -(10**400), 1e308, math.inf, -math.inf, math.nan]
)
plausible_values = st.one_of(
    edge_numbers,
    st.integers(min_value=-2, max_value=70000),
    st.floats(min_value=-1, max_value=1e6),
    words,
    st.sampled_from(["require", "read-write", "db1,db2", "5432,5433", ""]),
    requirement_lists,
)


@st.composite
def pool_tables(draw: st.DrawFn) -> dict[str, Any]:
    keys = draw(st.lists(st.sampled_from(POOL_KEYS), max_size=4, unique=True))
    return {key: draw(plausible_values | toml_values) for key in keys}


@st.composite
def database_tables(draw: st.DrawFn, secrets: list[str]) -> dict[str, Any]:
    """A database's table, with secrets (added to *secrets*) in the places they may go."""
    keys = draw(st.lists(st.sampled_from(DATABASE_KEYS), max_size=5, unique=True))
    table: dict[str, Any] = {}
    for key in keys:
        if key == "pool":
            table[key] = draw(pool_tables() | toml_values)
        elif key == "extra":
            table[key] = draw(st.dictionaries(st.sampled_from(QUERY_KEYS), plausible_values))
        else:
            table[key] = draw(plausible_values | toml_values)
    secret_places = ["password", "sslpassword", "extra", "dsn", "password_env", "password_command"]
    for place in draw(st.lists(st.sampled_from(secret_places), max_size=2, unique=True)):
        secret = draw(secret_markers)
        secrets += spellings(secret)
        if place == "extra":
            table["extra"] = {"sslpassword": draw(st.sampled_from([secret, [secret]]))}
        elif place == "dsn":
            spelled = draw(
                st.sampled_from(
                    [
                        f"postgresql://app:{url_encoded(secret)}@db1/app",
                        f"host=db1 password={kv_quoted(secret)}",
                        f"host=db1 password={secret} port=0",
                    ]
                )
            )
            table["dsn"] = spelled
        elif place == "password_env":
            # The variable holds a secret of its own.
            table["password_env"] = PASSWORD_VARIABLE
        elif place == "password_command":
            # A token passed to the program: only the program is ever shown.
            table["password_command"] = draw(
                st.sampled_from([["vault", "read", f"-token={secret}"], ["vault", secret, 3]])
            )
        else:
            table[place] = draw(st.sampled_from([secret, [secret], {"x": secret}]))
    return table


@st.composite
def config_documents(draw: st.DrawFn) -> tuple[dict[str, Any], list[str], dict[str, str]]:
    """A config file's content, the secrets it holds, and the environment."""
    environ = {PASSWORD_VARIABLE: draw(secret_markers)}
    secrets_ = [environ[PASSWORD_VARIABLE]]
    document: dict[str, Any] = {}
    if draw(st.booleans()):
        document["pool"] = draw(pool_tables() | toml_values)
    names = draw(st.lists(words | toml_keys, max_size=3, unique=True))
    databases = {name: draw(database_tables(secrets_)) for name in names}
    document["databases"] = draw(st.just(databases) | toml_values)
    if draw(st.integers(min_value=0, max_value=5)) == 0:
        document[draw(toml_keys)] = draw(toml_values)
    return document, secrets_, environ


def check_config_file(
    content: str | bytes, secrets: Sequence[str], environ: dict[str, str]
) -> pgsd.ConnectorConfig | None:
    """Load *content* as a file: a valid config or a ConfigError, neither showing *secrets*."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "pgsd.toml"
        if isinstance(content, str):
            content = content.encode("utf-8", "surrogatepass")
        path.write_bytes(content)
        config = built_or_config_error(lambda: pgsd.load_config(path, environ=environ))
    if isinstance(config, pgsd.ConfigError):
        assert config.path == str(path)
        assert str(config).startswith(f"{path}: ")
        # A value's problem names its key; only an unreadable file names none.
        unreadable = config.problem.startswith(("invalid TOML: ", "not valid UTF-8"))
        assert config.key is not None or unreadable
        assert_hidden(config, secrets)
        return None
    for database in config.databases.values():
        assert_conninfo_round_trips(database)
    for secret in secrets:
        assert secret not in repr(config)
    return config


@FILES
@given(config_documents())
def test_config_files_give_a_config_or_a_config_error_hiding_secrets(
    case: tuple[dict[str, Any], list[str], dict[str, str]],
) -> None:
    document, secrets_, environ = case
    check_config_file(toml_document(document), secrets_, environ)


@FILES
@given(st.dictionaries(toml_keys, toml_values, max_size=4))
def test_any_toml_document_gives_a_config_or_a_config_error(document: dict[str, Any]) -> None:
    check_config_file(toml_document(document), [], {})


nested = st.integers(min_value=1, max_value=3000).flatmap(
    lambda n: st.sampled_from(
        [
            "a = " + "[" * n + "]" * n,
            "a = " + "{b = " * n + "1" + "}" * n,
            "[databases.a]\nrequired = " + "[" * n + "]" * n,
        ]
    )
)
long_integers = st.integers(min_value=1, max_value=6000).map(
    lambda n: f"[databases.a]\nport = 1{'0' * n}\n"
)


@FILES
@given(st.text() | st.binary() | nested | long_integers)
@example("a = " + "[" * 5000 + "]" * 5000)
@example("a = " + "{b = " * 2000 + "1" + "}" * 2000)
@example("a = 1" + "0" * 5000)
def test_any_text_as_a_config_file_gives_a_config_or_a_config_error(content: str | bytes) -> None:
    check_config_file(content, [], {})


GUIDE_EXAMPLE = config_guide_example()


def test_the_guide_example_loads() -> None:
    config = check_config_file(GUIDE_EXAMPLE, [], {"SOURCE_PGPASSWORD": FIXED_SECRET})
    assert config is not None
    assert config.databases["source"].password == FIXED_SECRET


@st.composite
def guide_mutations(draw: st.DrawFn) -> str:
    """The guide's example with a few lines replaced, removed, or cut short, or text inserted."""
    lines = GUIDE_EXAMPLE.splitlines()
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        i = draw(st.integers(min_value=0, max_value=len(lines) - 1))
        action = draw(st.sampled_from(["value", "line", "drop", "cut", "insert"]))
        key = lines[i].partition("=")[0].strip()
        if action == "value" and "=" in lines[i]:
            lines[i] = f"{key} = {toml_value(draw(toml_values))}"
        elif action == "line":
            lines[i] = f"{toml_key(draw(toml_keys))} = {toml_value(draw(toml_values))}"
        elif action == "drop":
            lines[i] = ""
        elif action == "cut":
            lines[i] = lines[i][: draw(st.integers(min_value=0, max_value=len(lines[i])))]
        else:
            pos = draw(st.integers(min_value=0, max_value=len(lines[i])))
            lines[i] = lines[i][:pos] + draw(texts) + lines[i][pos:]
    return "\n".join(lines) + "\n"


@FILES
@given(guide_mutations(), secret_markers)
def test_mutations_of_the_guide_example_give_a_config_or_a_config_error(
    content: str, secret: str
) -> None:
    check_config_file(content, [secret], {"SOURCE_PGPASSWORD": secret})


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(toml_keys, toml_values, max_size=4))
def test_the_toml_writer_writes_what_tomllib_reads(document: dict[str, Any]) -> None:
    # Compared as text, because nan != nan.
    text = toml_document(document)
    assert toml_document(tomllib.loads(text)) == text


# -- requirement strings --------------------------------------------------------------

KINDS = ("database", "schema", "table", "role", "Schema", " TABLE ", "sequence", "")
PRIVILEGES = (
    "CONNECT",
    "temp",
    "TEMPORARY",
    "USAGE",
    "create",
    "SELECT",
    " insert ",
    "TRIGGER",
    "MAINTAIN",
    "ALL",
    "",
)
hostile_names = st.text(
    st.sampled_from("\"'.:;-/*\\$ \tAZaz09_é€") | ANY_CHARS, min_size=1, max_size=12
)


def sql_quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@st.composite
def requirement_texts(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(KINDS) | texts)
    name_parts = draw(
        st.lists(hostile_names.map(sql_quoted) | words | hostile_names, min_size=0, max_size=3)
    )
    text = f"{kind}:{'.'.join(name_parts)}" if name_parts else f"{kind}:"
    if draw(st.booleans()):
        text += ":" + draw(st.sampled_from(PRIVILEGES) | texts)
    return text


def requoted(requirement: Requirement) -> str:
    """The requirement again, every name quoted."""
    if requirement.kind == "database":
        return f"database:{requirement.privilege}"
    assert requirement.name is not None
    name = sql_quoted(requirement.name)
    if requirement.schema is not None:
        name = f"{sql_quoted(requirement.schema)}.{name}"
    if requirement.kind == "role":
        return f"role:{name}"
    return f"{requirement.kind}:{name}:{requirement.privilege}"


def check_requirement(text: str) -> Requirement | None:
    requirement = built_or_config_error(lambda: parse_requirement(text))
    if isinstance(requirement, pgsd.ConfigError):
        assert "is not a permission requirement" in str(requirement)
        return None
    assert requirement.text == text
    again = parse_requirement(requoted(requirement))
    assert (again.kind, again.schema, again.name, again.privilege) == (
        requirement.kind,
        requirement.schema,
        requirement.name,
        requirement.privilege,
    )
    return requirement


@MANY
@given(st.text(ANY_CHARS) | st.text())
@example("schema:\ud800:USAGE")
@example('schema:"\ud800":USAGE')
def test_any_text_is_a_requirement_or_a_config_error(text: str) -> None:
    check_requirement(text)


@MANY
@given(requirement_texts())
@example('table:"x""; DROP TABLE victim; --"."t":SELECT')
@example("schema:semi;colon:USAGE")
def test_hostile_requirements_parse_and_round_trip_or_raise_config_error(text: str) -> None:
    check_requirement(text)


@MANY
@given(st.lists(requirement_texts() | st.text(max_size=10), max_size=4))
def test_requirement_lists_parse_in_order_or_raise_config_error(texts_: list[str]) -> None:
    parsed = built_or_config_error(lambda: parse_requirements(texts_))
    if isinstance(parsed, pgsd.ConfigError):
        assert any(check_requirement(text) is None for text in texts_)
    else:
        assert [r.text for r in parsed] == texts_


required_entries = st.one_of(
    requirement_texts(), st.none(), st.integers(), st.binary(max_size=4), st.lists(st.text())
)


@MANY
@given(st.lists(required_entries, max_size=4) | toml_values)
def test_database_config_required_is_a_tuple_or_a_config_error(required: Any) -> None:
    config = built_or_config_error(lambda: pgsd.DatabaseConfig(required=required))
    if isinstance(config, pgsd.ConfigError):
        assert config.key == "required"
    else:
        assert config.required == tuple(required)
        assert all(isinstance(check_requirement(text), Requirement) for text in config.required)
