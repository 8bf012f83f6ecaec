"""The TOML file loader: `load_config` builds a `ConnectorConfig` from a file.

The loader owns the file's layout only: its tables, the keys it accepts,
``dsn``, ``password_env`` and ``password_command``. Each value is checked by the config classes
in `._config`, and their `ConfigError` is re-raised naming the file and the
dotted key. Other libpq keywords and relative file names go to libpq as written.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from ._config import (
    POOL_HOOKS,
    ConnectorConfig,
    DatabaseConfig,
    PoolConfig,
    is_libpq_keyword,
    short_repr,
)
from ._credentials import PasswordCommand
from ._errors import ConfigError, is_secret_key

__all__ = ["load_config"]

_POOL_FILE_KEYS = tuple(f.name for f in dataclasses.fields(PoolConfig) if f.name not in POOL_HOOKS)
_DATABASE_FILE_KEYS = (
    *(
        f.name
        for f in dataclasses.fields(DatabaseConfig)
        if f.name not in ("pool", "name", "password_provider")  # a function: not in a file
    ),
    "dsn",
    "password_env",
    "password_command",
    "pool",
)
#: What a replica's own table may set (credentials it does not set come from the primary).
_REPLICA_FILE_KEYS = tuple(
    key
    for key in _DATABASE_FILE_KEYS
    if key not in ("dsn", "password_env", "password_command", "pool", "replicas")
    and not key.startswith(("max_replica", "replica_"))
)
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+(\[[0-9]+\])?")  # a list index, as in replicas[0]
# What a TOML basic string escapes: the quote, the backslash and control characters.
_KEY_ESCAPE = re.compile(r'["\\\x00-\x1f\x7f]')


def load_config(
    path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None
) -> ConnectorConfig:
    """Read a TOML configuration file.

    The file has a ``[pool]`` table of defaults and one ``[databases.NAME]``
    table per database, holding `DatabaseConfig` keys, or a ``dsn`` that the
    other keys override. ``password_env = "VAR"`` reads the password from
    the environment variable VAR (in *environ*, by default `os.environ`);
    ``password_command = ["vault", "read", "-field=password", "db/app"]``
    runs that program for every new connection and uses the first line of
    its output (`PasswordCommand`). Other libpq keywords
    (``keepalives_idle = 30``) are passed through as ``extra``.
    ``[databases.NAME.pool]`` overrides the ``[pool]`` keys it sets.
    Relative file names (``passfile``, ``sslrootcert``...) are passed to
    libpq as written.

    Raises `ConfigError` naming the file, the dotted key and the problem for
    a missing or unreadable file, invalid TOML, an unknown key, a value of
    the wrong type or out of range, or an unset ``password_env`` variable.
    """
    file = os.fspath(path)
    document = _read_toml(file)
    try:
        return _build_connector(document, os.environ if environ is None else environ)
    except ConfigError as exc:
        raise ConfigError(exc.problem, path=file, key=exc.key) from None


def _read_toml(file: str) -> dict[str, Any]:
    try:
        with open(file, "rb") as stream:
            data = stream.read()
    except FileNotFoundError:
        raise ConfigError("file not found", path=file) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror}", path=file) from None
    except ValueError:  # open() refuses a name with a NUL character
        raise ConfigError("the file name contains a NUL character", path=file) from None
    try:
        return tomllib.loads(data.decode())
    except UnicodeDecodeError:
        raise ConfigError("not valid UTF-8", path=file) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", path=file) from None
    except ValueError:  # int() refuses more than sys.get_int_max_str_digits() digits
        raise ConfigError("invalid TOML: an integer has too many digits", path=file) from None
    except RecursionError:
        problem = "invalid TOML: arrays or inline tables are nested too deeply"
        raise ConfigError(problem, path=file) from None


def _build_connector(document: dict[str, Any], environ: Mapping[str, str]) -> ConnectorConfig:
    _check_keys(document, ("pool", "databases"), ())
    pool_defaults = _table(document.get("pool", {}), "pool")
    _check_keys(pool_defaults, _POOL_FILE_KEYS, ("pool",))
    with _key_prefix("pool"):
        pool = PoolConfig(**pool_defaults)
    tables = _database_tables(document)
    databases = {
        name: _build_database(name, table, pool_defaults, environ) for name, table in tables.items()
    }
    return ConnectorConfig(databases=databases, pool=pool)


def _database_tables(document: dict[str, Any]) -> dict[str, Any]:
    if "databases" not in document:
        raise ConfigError("missing: add a [databases.NAME] table per database", key="databases")
    tables = _table(document["databases"], "databases")
    if not tables:
        raise ConfigError("no database configured: add a [databases.NAME] table", key="databases")
    if "" in tables:
        raise ConfigError("database names must not be empty", key="databases")
    return tables


def _build_database(
    name: str, raw: object, pool_defaults: dict[str, Any], environ: Mapping[str, str]
) -> DatabaseConfig:
    table = dict(_table(raw, _dotted("databases", name)))
    prefix = ("databases", name)
    _check_keys(table, _DATABASE_FILE_KEYS, prefix, allow=is_libpq_keyword)
    dsn = table.pop("dsn", None)
    _move_libpq_keywords(table, prefix)
    _resolve_password(table, environ, prefix)
    _password_command(table, prefix)
    if table.get("prepare_threshold") is False:
        # TOML has no null: "prepare_threshold = false" means never prepare.
        table["prepare_threshold"] = None
    for key in ("pool", "replica_pool"):
        if key in table:
            table[key] = _database_pool(table[key], pool_defaults, (*prefix, key))
    if isinstance(table.get("replicas"), list):
        table["replicas"] = [
            _replica(item, (*prefix, f"replicas[{index}]"))
            for index, item in enumerate(table["replicas"])
        ]
    with _key_prefix(_dotted(*prefix)):
        if dsn is None:
            return DatabaseConfig(name=name, **table)
        return DatabaseConfig.from_dsn(dsn, name=name, **table)


def _move_libpq_keywords(table: dict[str, Any], prefix: tuple[str, ...]) -> None:
    """Move keys that are libpq keywords without a field of their own into ``extra``."""
    extra = dict(_table(table.get("extra", {}), _dotted(*prefix, "extra")))
    for key in [k for k in table if k not in _DATABASE_FILE_KEYS]:
        value = table.pop(key)
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            # Never echo what may be a secret (sslpassword) of the wrong type.
            shown = type(value).__name__ if is_secret_key(key) else short_repr(value)
            raise ConfigError(
                f"must be a string or a number, got {shown}", key=_dotted(*prefix, key)
            )
        extra[key] = value
    if extra:
        table["extra"] = extra


def _resolve_password(
    table: dict[str, Any], environ: Mapping[str, str], prefix: tuple[str, ...]
) -> None:
    if "password_env" not in table:
        return
    variable = table.pop("password_env")
    key = _dotted(*prefix, "password_env")
    if not isinstance(variable, str) or not variable:
        raise ConfigError(
            f"must be an environment variable name, got {short_repr(variable)}", key=key
        )
    if "password" in table:
        raise ConfigError("set either password or password_env, not both", key=key)
    password = environ.get(variable)
    if not password:
        state = "is not set" if password is None else "is empty"
        raise ConfigError(f"environment variable {variable!r} {state}", key=key)
    table["password"] = password


def _password_command(table: dict[str, Any], prefix: tuple[str, ...]) -> None:
    if "password_command" not in table:
        return
    argv = table.pop("password_command")
    key = _dotted(*prefix, "password_command")
    if "password" in table:
        raise ConfigError(
            "set one of password, password_env and password_command, not several", key=key
        )
    with _key_prefix(_dotted(*prefix)):
        table["password_provider"] = PasswordCommand(argv)


def _replica(raw: object, prefix: tuple[str, ...]) -> object:
    """A replica in a file: a DSN string, or a table of its own settings."""
    if not isinstance(raw, dict):
        return raw  # a DSN, or a value the config reports as wrong
    table = dict(raw)
    _check_keys(table, _REPLICA_FILE_KEYS, prefix, allow=is_libpq_keyword)
    _move_libpq_keywords(table, prefix)
    with _key_prefix(_dotted(*prefix)):
        return DatabaseConfig(**table)


def _database_pool(
    raw: object, pool_defaults: dict[str, Any], prefix: tuple[str, ...]
) -> PoolConfig:
    overrides = _table(raw, _dotted(*prefix))
    _check_keys(overrides, _POOL_FILE_KEYS, prefix)
    with _key_prefix(_dotted(*prefix)):
        return PoolConfig(**{**pool_defaults, **overrides})


def _table(value: object, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"must be a table, got {short_repr(value)}", key=key)
    return value


def _check_keys(
    table: dict[str, Any],
    known: tuple[str, ...],
    prefix: tuple[str, ...],
    *,
    allow: Callable[[str], bool] = lambda key: False,
) -> None:
    for key in table:
        if key in known or allow(key):
            continue
        if key in POOL_HOOKS:
            problem = f"a callable cannot be set in a file; set it in code: PoolConfig({key}=...)"
        else:
            close = difflib.get_close_matches(key, known, n=1)
            problem = f"unknown key (did you mean {close[0]!r}?)" if close else "unknown key"
        raise ConfigError(problem, key=_dotted(*prefix, key))


def _dotted(*parts: str) -> str:
    """Join TOML keys, quoting those that are not bare keys: ``databases."my db".port``."""
    return ".".join(part if _BARE_KEY.fullmatch(part) else _quoted(part) for part in parts)


def _quoted(part: str) -> str:
    escaped = _KEY_ESCAPE.sub(_escape, part)
    return f'"{escaped}"'


def _escape(match: re.Match[str]) -> str:
    char = match[0]
    return "\\" + char if char in '"\\' else f"\\u{ord(char):04X}"


@contextmanager
def _key_prefix(prefix: str) -> Iterator[None]:
    """Qualify the key of a `ConfigError` raised inside with *prefix*."""
    try:
        yield
    except ConfigError as exc:
        key = f"{prefix}.{exc.key}" if exc.key else prefix
        raise ConfigError(exc.problem, key=key) from None
