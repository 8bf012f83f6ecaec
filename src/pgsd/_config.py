"""Configuration classes: pool settings, database settings and the connector's databases.

Each class checks its own values and raises `ConfigError` naming the field.
Everything libpq already does (PG* environment variables, the passfile, the
service file, several hosts) is passed through to libpq, not re-implemented.
The TOML file loader, `load_config`, is in `._config_file`.
The value checks the classes share are in `._validate`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ._credentials import PasswordProvider, check_provider, describe
from ._dsn import libpq_text_problem, may_be_secret, parse_dsn
from ._errors import ConfigError, format_address, is_secret_key
from ._permissions import parse_requirement
from ._replica_config import REPLICA_FALLBACKS, check_replicas, replica_configs
from ._validate import (
    FrozenMap,
    check_choice,
    check_int,
    check_libpq_text,
    check_number,
    check_optional_str,
    check_password,
    check_positive,
    check_sqlstates,
    check_str,
    field_default,
    number_text,
    short_repr,
)

__all__ = [
    "POOL_HOOKS",
    "ConnectorConfig",
    "DatabaseConfig",
    "PoolConfig",
    "is_libpq_keyword",
    "short_repr",
]

# --- PoolConfig --------------------------------------------------------------

_POOL_INTS = {
    "min_size": 0,
    "max_size": 1,
    "max_waiting": 0,
    "min_server_version": 130000,
    "pipeline_depth": 1,
}
_POOL_POSITIVE = (
    "acquire_timeout",
    "max_idle",
    "max_lifetime",
    "health_check_interval",
    "reconnect_initial",
    "reconnect_max",
    "close_timeout",
)
_POOL_FRACTIONS = ("lifetime_jitter", "reconnect_jitter")
#: The PoolConfig fields that hold callables, which a config file cannot set.
POOL_HOOKS = ("configure", "reset")


@dataclass(frozen=True, kw_only=True, slots=True)
class PoolConfig:
    """How a pool sizes, times out, checks and replaces its connections.

    Durations are in seconds. The defaults follow the peers (HikariCP,
    psycopg_pool): a small pool, 30 s to acquire, idle connections closed
    after 10 minutes, every connection replaced after 30 minutes (minus up
    to 5 % jitter so connections opened together do not expire together).

    Raises `ConfigError` (with ``key`` set to the field) for an invalid value.
    """

    #: Connections kept open even when idle.
    min_size: int = 1
    #: Connections never exceeded, counted on the server.
    max_size: int = 5
    #: How long `connection()` waits before raising `PoolTimeout`.
    acquire_timeout: float = 30.0
    #: Waiters allowed in the queue; one more gets `TooManyWaiters`. 0 = unbounded.
    max_waiting: int = 0
    #: One-shot statements (`fetchall`, ...) in flight on one connection; 1 = no pipelining.
    pipeline_depth: int = 16
    #: An idle connection above ``min_size`` is closed after this long.
    max_idle: float = 600.0
    #: Every connection is replaced after this long (with jitter below).
    max_lifetime: float = 1800.0
    #: Lifetimes are spread over ``[max_lifetime * (1 - j), max_lifetime]``.
    lifetime_jitter: float = 0.05
    #: An idle connection neither used nor checked for this long is pinged (4 at a time).
    health_check_interval: float = 30.0
    #: A connection idle longer than this is pinged before it is lent; 0 = always.
    ping_after_idle: float = 0.5
    #: First delay before reconnecting after a failure.
    reconnect_initial: float = 0.1
    #: Cap on the reconnect delay.
    reconnect_max: float = 10.0
    #: Factor applied to the delay after each failed attempt.
    reconnect_multiplier: float = 2.0
    #: Each delay is randomly shortened by up to this fraction.
    reconnect_jitter: float = 0.1
    #: Warn, with the borrower's stack, about a connection held longer. None = off.
    leak_threshold: float | None = None
    #: How long closing the pool waits for borrowed connections.
    close_timeout: float = 5.0
    #: Servers older than this ``server_version_num`` are refused.
    min_server_version: int = 130000
    #: More SQLSTATE codes (5 characters) or classes (2) whose error closes the
    #: connection it came from, beside the built-in ones (class 08, 57P01-03):
    #: for proxies and cloud services with codes of their own.
    evict_sqlstates: Sequence[str] = ()
    #: Awaited with each new connection before it is first lent.
    configure: Callable[[Any], Awaitable[None]] | None = None
    #: Awaited with each returned connection before it is lent again.
    reset: Callable[[Any], Awaitable[None]] | None = None

    def __post_init__(self) -> None:
        for key, minimum in _POOL_INTS.items():
            check_int(key, getattr(self, key), minimum=minimum)
        for key in _POOL_POSITIVE:
            self._set(key, check_number(key, getattr(self, key), minimum=0, exclusive=True))
        for key in _POOL_FRACTIONS:
            self._set(key, check_number(key, getattr(self, key), minimum=0, below=1))
        self._set(
            "ping_after_idle", check_number("ping_after_idle", self.ping_after_idle, minimum=0)
        )
        multiplier = check_number("reconnect_multiplier", self.reconnect_multiplier, minimum=1)
        self._set("reconnect_multiplier", multiplier)
        if self.leak_threshold is not None:
            threshold = check_number(
                "leak_threshold", self.leak_threshold, minimum=0, exclusive=True
            )
            self._set("leak_threshold", threshold)
        self._set("evict_sqlstates", check_sqlstates("evict_sqlstates", self.evict_sqlstates))
        self._check_hooks()
        self._check_relations()

    def _set(self, key: str, value: object) -> None:
        # Normalizes ints to floats; the dataclass is frozen.
        object.__setattr__(self, key, value)

    def _check_hooks(self) -> None:
        for key in POOL_HOOKS:
            hook = getattr(self, key)
            if hook is not None and not callable(hook):
                raise ConfigError(
                    f"must be an async callable or None, got {short_repr(hook)}", key=key
                )

    def _check_relations(self) -> None:
        if self.min_size > self.max_size:
            raise ConfigError(
                f"must not exceed max_size ({self.max_size}), got {self.min_size}", key="min_size"
            )
        if self.reconnect_initial > self.reconnect_max:
            raise ConfigError(
                f"must not exceed reconnect_max ({number_text(self.reconnect_max)}),"
                f" got {number_text(self.reconnect_initial)}",
                key="reconnect_initial",
            )

    def replace(self, **changes: Any) -> Self:
        """Return a copy with *changes* applied. Raises `ConfigError` if invalid."""
        return dataclasses.replace(self, **changes)


# --- DatabaseConfig ----------------------------------------------------------

_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_SESSION_ATTRS = ("any", "read-write", "read-only", "primary", "standby", "prefer-standby")

# Fields that are libpq keywords of the same name, in conninfo order.
_LIBPQ_FIELDS = (
    "host",
    "port",
    "dbname",
    "user",
    "password",
    "passfile",
    "service",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslcrl",
    "application_name",
    "options",
    "target_session_attrs",
    "connect_timeout",
)
_NON_EMPTY_STRS = ("host", "dbname", "user", "name")
_PLAIN_STRS = ("passfile", "service", "sslrootcert", "sslcert", "sslkey", "sslcrl", "options")

_KEYWORD = re.compile(r"[a-z][a-z0-9_]*")
_MAX_PORT = 65535
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1
# libpq rounds any connect_timeout below 2 s up to 2 s.
_LIBPQ_MIN_TIMEOUT = 2


def _normalize_port(value: object) -> int | str | None:
    if value is None:
        return None
    if isinstance(value, str) and "," in value:
        # One port per host; an empty entry means libpq's default for that host.
        if all(_is_port(part) for part in value.split(",") if part):
            return value
        wanted = f"a comma-separated list of integers between 1 and {_MAX_PORT}"
        raise ConfigError(f"must be {wanted}, got {short_repr(value)}", key="port")
    if isinstance(value, str) and _is_port(value):
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= _MAX_PORT:
        return value
    wanted = f"an integer between 1 and {_MAX_PORT}"
    raise ConfigError(f"must be {wanted}, got {short_repr(value)}", key="port")


def _is_port(text: str) -> bool:
    # The length first: int() refuses strings of thousands of digits.
    if len(text) > len(str(_MAX_PORT)) or not (text.isascii() and text.isdigit()):
        return False
    return 1 <= int(text) <= _MAX_PORT


def _check_port_count(host: str | None, port: int | str | None) -> None:
    # libpq takes one port for all hosts, or one per host; it would refuse
    # anything else only when connecting.
    if host is None or not isinstance(port, str):
        return
    hosts, ports = host.count(",") + 1, port.count(",") + 1
    if ports != hosts:
        raise ConfigError(
            f"must be one port for all hosts or one per host ({hosts}),"
            f" got {ports}: {short_repr(port)}",
            key="port",
        )


def _normalize_required(value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ConfigError(
            f"must be a list of privilege strings, got {short_repr(value)}", key="required"
        )
    items = tuple(value)
    for item in items:
        _check_requirement(item)
    return items


def _check_requirement(item: object) -> None:
    # The permission checker's own parser, so that a config accepts exactly
    # what check_permissions() understands.
    if not isinstance(item, str):
        raise ConfigError(f"entries must be strings, got {short_repr(item)}", key="required")
    try:
        parse_requirement(item)
    except ConfigError as exc:
        raise ConfigError(exc.problem, key="required") from None


def _normalize_extra(value: object) -> FrozenMap[str, str]:
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"must be a mapping of libpq keywords to values, got {short_repr(value)}",
            key="extra",
        )
    # Keywords first: sorting keys of mixed types would raise TypeError.
    for keyword in value:
        _check_extra_keyword(keyword)
    return FrozenMap(
        (keyword, _extra_value(keyword, setting)) for keyword, setting in sorted(value.items())
    )


def _extra_value(keyword: str, setting: object) -> str:
    # Values are never shown: the keyword may name a secret (sslpassword).
    if isinstance(setting, bool) or not isinstance(setting, str | int | float):
        raise ConfigError(f"{keyword}: must be a string or a number", key="extra")
    if isinstance(setting, float) and not math.isfinite(setting):
        raise ConfigError(f"{keyword}: must be a finite number", key="extra")
    if isinstance(setting, int) and not _INT_MIN <= setting <= _INT_MAX:
        # libpq reads every numeric keyword as a C int.
        raise ConfigError(
            f"{keyword}: must be an integer between {_INT_MIN} and {_INT_MAX}", key="extra"
        )
    text = str(setting)
    if (problem := libpq_text_problem(text)) is not None:
        raise ConfigError(f"{keyword}: {problem}", key="extra")
    return text


def _check_extra_keyword(keyword: object) -> None:
    if keyword in _LIBPQ_FIELDS:
        raise ConfigError(f"{keyword}: set the {keyword} field instead", key="extra")
    if not isinstance(keyword, str) or not is_libpq_keyword(keyword):
        raise ConfigError(f"{short_repr(keyword)} is not a libpq connection keyword", key="extra")


@functools.lru_cache(maxsize=128)
def is_libpq_keyword(keyword: str) -> bool:
    """Ask libpq's own parser, so the answer matches the libpq in use."""
    if not _KEYWORD.fullmatch(keyword):
        return False
    try:
        conninfo_to_dict(f"{keyword}=x")
    except psycopg.ProgrammingError:
        return False
    return True


@dataclass(frozen=True, kw_only=True, slots=True)
class DatabaseConfig:
    """Where and how to connect to one database.

    The libpq settings are passed to libpq unchanged; those left ``None``
    fall back to libpq's defaults (PG* environment variables, the passfile,
    the service file). `repr` never shows the password.

    Raises `ConfigError` (with ``key`` set to the field) for an invalid value.
    """

    #: A host name, IP address or socket directory; comma-separated for several.
    host: str | None = None
    #: An int, or a comma-separated string with one port per host.
    port: int | str | None = None
    dbname: str | None = None
    user: str | None = None
    #: Better left out: prefer the passfile, a service, ``password_env`` or
    #: ``password_provider``.
    password: str | None = field(default=None, repr=False)
    #: ``(config) -> str``, plain or async: called for every new connection
    #: (never for a lent one), within ``connect_timeout``, for passwords that
    #: change (a vault, a cloud IAM token). A plain function runs in a worker
    #: thread. ``password_command`` in a TOML file sets a `PasswordCommand`.
    password_provider: PasswordProvider | None = None
    passfile: str | None = None
    service: str | None = None
    sslmode: str | None = None
    sslrootcert: str | None = None
    sslcert: str | None = None
    sslkey: str | None = None
    sslcrl: str | None = None
    application_name: str = "pgsd"
    options: str | None = None
    target_session_attrs: str | None = None
    #: Seconds per connection attempt; libpq itself only counts whole seconds >= 2.
    connect_timeout: float = 30.0
    #: Seconds a cancelled query may take to stop before its connection is closed.
    cancel_grace: float = 2.0
    #: A query run this many times on a connection becomes a prepared statement
    #: (psycopg's rule); None never prepares: behind PgBouncer in transaction
    #: mode before 1.21, or with ``max_prepared_statements = 0``.
    prepare_threshold: int | None = 5
    #: Privileges the role must hold: ``database:PRIV``, ``schema:NAME:PRIV``,
    #: ``table:SCHEMA.NAME:PRIV`` or ``role:NAME``; any iterable, stored as a tuple
    #: of the strings as given.
    required: Sequence[str] = ()
    #: Other libpq keywords, passed through (``keepalives_idle``, ``sslnegotiation``...).
    extra: Mapping[str, str] = field(default_factory=lambda: FrozenMap[str, str]())
    #: Overrides the connector's `PoolConfig` for this database.
    pool: PoolConfig | None = None
    #: The database's name in the `ConnectorConfig`.
    name: str | None = None
    #: Streaming standbys for reads (``read_only=True``): each a `DatabaseConfig`
    #: or a DSN string, taking what it does not set from this config
    #: (`replica_configs`); stored as a tuple of configs.
    replicas: Sequence[DatabaseConfig | str] = ()
    #: Seconds a replica may be behind this primary and still serve reads.
    max_replica_lag: float = 10.0
    #: When no replica qualifies: ``"primary"`` serves the read here (logged
    #: once), ``"error"`` raises `NoReplicaAvailable`.
    replica_fallback: str = "primary"
    #: The replicas' pool settings (default: this database's).
    replica_pool: PoolConfig | None = None

    def __post_init__(self) -> None:
        for key in _NON_EMPTY_STRS:
            check_optional_str(key, getattr(self, key), non_empty=True)
        for key in _PLAIN_STRS:
            check_optional_str(key, getattr(self, key))
        check_password(self.password)
        check_provider(self.password_provider)
        if self.password is not None and self.password_provider is not None:
            raise ConfigError(
                "set either password or password_provider, not both", key="password_provider"
            )
        check_str("application_name", self.application_name)
        check_choice("sslmode", self.sslmode, _SSLMODES)
        check_choice("target_session_attrs", self.target_session_attrs, _SESSION_ATTRS)
        for key in _LIBPQ_FIELDS:
            check_libpq_text(key, getattr(self, key))
        self._normalize()

    def _normalize(self) -> None:
        set_ = functools.partial(object.__setattr__, self)  # the dataclass is frozen
        set_("port", _normalize_port(self.port))
        _check_port_count(self.host, self.port)
        set_("connect_timeout", check_positive("connect_timeout", self.connect_timeout))
        set_("cancel_grace", check_positive("cancel_grace", self.cancel_grace))
        if self.prepare_threshold is not None:
            check_int("prepare_threshold", self.prepare_threshold, minimum=0)
        set_("required", _normalize_required(self.required))
        set_("extra", _normalize_extra(self.extra))
        for key in ("pool", "replica_pool"):
            if getattr(self, key) is not None and not isinstance(getattr(self, key), PoolConfig):
                raise ConfigError(
                    f"must be a PoolConfig or None, got {short_repr(getattr(self, key))}", key=key
                )
        set_("replicas", check_replicas(self, self.replicas))
        set_("max_replica_lag", check_positive("max_replica_lag", self.max_replica_lag))
        if self.replica_fallback not in REPLICA_FALLBACKS:
            raise ConfigError(
                f"must be one of {', '.join(REPLICA_FALLBACKS)}; got"
                f" {short_repr(self.replica_fallback)}",
                key="replica_fallback",
            )

    @classmethod
    def from_dsn(cls, dsn: str, **overrides: Any) -> Self:
        """Build a config from a ``postgresql://`` URL or a ``key=value`` string.

        Several hosts (``postgresql://h1:5432,h2:5433/app``) are kept as
        comma-separated ``host`` and ``port``. libpq keywords without a field
        go to ``extra``; *overrides* take precedence over the DSN (an
        ``extra`` override is merged into the DSN's).

        Raises `ConfigError` if the DSN cannot be parsed (the message never
        contains its password) or holds an invalid value.
        """
        params = parse_dsn(dsn)
        fields = {k: v for k, v in params.items() if k in _LIBPQ_FIELDS and v != ""}
        extra = {k: v for k, v in params.items() if k not in _LIBPQ_FIELDS and v != ""}
        if "connect_timeout" in fields:
            fields["connect_timeout"] = _float_or_text(fields["connect_timeout"])
        extra.update(overrides.pop("extra", {}))
        try:
            return cls(**{**fields, "extra": extra, **overrides})
        except ConfigError as exc:
            if exc.key not in fields or exc.key in overrides:
                raise
            problem, key = exc.problem, exc.key
        if may_be_secret(dsn, key):
            problem = problem.replace(short_repr(fields[key]), "***")
        # Raised outside the except clause: the original error, which shows
        # the value, is not kept even as the hidden __context__.
        raise ConfigError(f"{problem} (from the dsn)", key=key) from None

    def conninfo(self) -> str:
        """Return the libpq conninfo string, password included, for the driver only.

        ``connect_timeout`` is rounded up to whole seconds, at least 2, as
        libpq counts it; the connection layer enforces the exact value.
        """
        params: dict[str, str | int | None] = {k: getattr(self, k) for k in _LIBPQ_FIELDS}
        params["connect_timeout"] = max(_LIBPQ_MIN_TIMEOUT, math.ceil(self.connect_timeout))
        params.update(self.extra)
        return make_conninfo("", **params)

    @property
    def display_name(self) -> str:
        """The name to show in messages: ``name``, else ``dbname``, else a description."""
        if self.name is not None:
            return self.name
        if self.dbname is not None:
            return self.dbname
        if self.service is not None:
            return f"service {self.service}"
        return "(libpq default database)"

    @property
    def address(self) -> str:
        """Where libpq will connect, as ``host:port``, for messages."""
        return format_address(self.host, self.port)

    def replica_configs(self) -> tuple[DatabaseConfig, ...]:
        """Each replica's whole config: its own settings, this config's for the rest."""
        return replica_configs(self)

    def replace(self, **changes: Any) -> Self:
        """Return a copy with *changes* applied. Raises `ConfigError` if invalid."""
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:
        # Only the fields that differ from their defaults, and never a secret.
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == field_default(f):
                continue
            if f.name == "password":
                parts.append("password='***'")
            elif f.name == "password_provider":
                parts.append(f"password_provider={describe(value)}")
            elif f.name == "extra":
                parts.append(f"extra={_masked(value)!r}")
            else:
                parts.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


def _masked(extra: Mapping[str, str]) -> dict[str, str]:
    return {k: ("***" if is_secret_key(k) else v) for k, v in extra.items()}


def _float_or_text(text: object) -> object:
    """Convert a DSN number; an invalid one is left for the field check to report."""
    try:
        return float(str(text))
    except ValueError:
        return text


# --- ConnectorConfig ---------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class ConnectorConfig:
    """The databases a `DatabaseConnector` manages and their pool settings.

    Each database is stored with its ``name`` set to its key. ``pool`` is
    the default for every database without its own ``pool``.

    Raises `ConfigError` for an empty name or a value of the wrong type.
    """

    databases: Mapping[str, DatabaseConfig]
    pool: PoolConfig = PoolConfig()

    def __post_init__(self) -> None:
        if not isinstance(self.databases, Mapping):
            raise ConfigError(
                f"must be a mapping of names to DatabaseConfig, got {self.databases!r}",
                key="databases",
            )
        named = {name: _named(name, db) for name, db in self.databases.items()}
        object.__setattr__(self, "databases", FrozenMap(named))  # the dataclass is frozen
        if not isinstance(self.pool, PoolConfig):
            raise ConfigError(f"must be a PoolConfig, got {self.pool!r}", key="pool")

    def pool_config(self, name: str) -> PoolConfig:
        """Return the pool settings for database *name*: its own, else the default.

        Raises `KeyError` if no database has that name.
        """
        try:
            database = self.databases[name]
        except KeyError:
            known = ", ".join(map(repr, self.databases)) or "none"
            raise KeyError(f"no database named {name!r} (configured: {known})") from None
        return database.pool if database.pool is not None else self.pool


def _named(name: object, database: object) -> DatabaseConfig:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"names must be non-empty strings, got {name!r}", key="databases")
    if not isinstance(database, DatabaseConfig):
        raise ConfigError(f"must be a DatabaseConfig, got {database!r}", key=f"databases.{name}")
    return database if database.name == name else database.replace(name=name)
