"""Read replicas in the configuration: how they are given, and what each inherits.

A replica is given as a `DatabaseConfig` or as a DSN string, holding only
what differs from its primary (at least where it is: ``host``, or a
``service``). Every setting it leaves at its default is taken from the
primary: the user, the database, TLS, the credentials, the timeouts. Its
own are where it is (``host``, ``port``), its ``name`` and
``target_session_attrs``: a standby is read-only, so the primary's
``read-write`` must not follow it (pgsd checks each replica's role itself).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

from ._errors import ConfigError
from ._validate import field_default, short_repr

if TYPE_CHECKING:
    from ._config import DatabaseConfig

__all__ = ["REPLICA_FALLBACKS", "check_replicas", "replica_configs"]

#: What a read does when no replica qualifies.
REPLICA_FALLBACKS: Final = ("primary", "error")

#: The fields a replica never takes from its primary.
_OWN: Final = frozenset(
    {
        "host",
        "port",
        "name",
        "target_session_attrs",
        "password",
        "password_provider",
        "pool",
        "replicas",
        "max_replica_lag",
        "replica_fallback",
        "replica_pool",
    }
)


def check_replicas(primary: DatabaseConfig, value: object) -> tuple[DatabaseConfig, ...]:
    """The replicas as configs of their own settings, DSN strings parsed.

    Raises:
        ConfigError: not a list of configs and DSN strings; a replica with
            replicas of its own, or without a host or service; two replicas
            (or a replica and the primary) at one address.
    """
    config_class = type(primary)
    if isinstance(value, str | bytes | config_class) or not isinstance(value, Iterable):
        raise ConfigError(
            f"must be a list of DatabaseConfig or DSN strings, got {short_repr(value)}",
            key="replicas",
        )
    replicas: list[DatabaseConfig] = []
    for index, item in enumerate(value):
        key = f"replicas[{index}]"
        if isinstance(item, str):
            try:
                item = config_class.from_dsn(item)
            except ConfigError as exc:
                raise ConfigError(exc.problem, key=f"{key}.{exc.key}" if exc.key else key) from None
        elif not isinstance(item, config_class):
            raise ConfigError(
                f"must be a DatabaseConfig or a DSN string, got {short_repr(item)}", key=key
            )
        if item.replicas:
            raise ConfigError("a replica cannot have replicas of its own", key=key)
        if item.host is None and item.service is None:
            raise ConfigError("a replica needs a host (or a service) of its own", key=key)
        replicas.append(item)
    seen = {(primary.host, primary.port, primary.service)}
    for index, item in enumerate(replicas):
        where = (item.host, item.port, item.service)
        if where in seen:
            raise ConfigError(
                f"{item.address} is given twice (primary and replicas must differ)",
                key=f"replicas[{index}]",
            )
        seen.add(where)
    return tuple(replicas)


def replica_configs(primary: DatabaseConfig) -> tuple[DatabaseConfig, ...]:
    """Each replica's whole config: its own settings, the primary's for the rest.

    A replica without a ``name`` is named after the primary and its address
    (``"app replica db2"``, ``"app replica db3:5433"``): its pool's name.
    """
    return tuple(_inherit(primary, replica) for replica in primary.replicas)  # type: ignore[arg-type]


def _inherit(primary: DatabaseConfig, replica: DatabaseConfig) -> DatabaseConfig:
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(replica):
        if f.name in _OWN:
            continue
        if getattr(replica, f.name) == field_default(f):
            changes[f.name] = getattr(primary, f.name)
    if replica.password is None and replica.password_provider is None:
        changes["password"] = primary.password
        changes["password_provider"] = primary.password_provider
    if replica.name is None:
        where = replica.host or f"service {replica.service}"
        if replica.port is not None:
            where = f"{where}:{replica.port}"
        changes["name"] = f"{primary.display_name} replica {where}"
    return replica.replace(**changes)
