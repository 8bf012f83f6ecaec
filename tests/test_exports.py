"""The public API: exactly these names, each documented."""

from __future__ import annotations

import inspect

import pgsd

EXPECTED = {
    "AuthenticationError",
    "ConfigError",
    "ConnectError",
    "ConnectTimeout",
    "Connection",
    "ConnectionPool",
    "ConnectionReport",
    "ConnectorConfig",
    "DatabaseConfig",
    "DatabaseConnector",
    "DatabaseNotFound",
    "InsufficientPrivileges",
    "MIN_SERVER_VERSION",
    "PermissionReport",
    "PgsdError",
    "PoolClosed",
    "PoolConfig",
    "PoolState",
    "PoolStats",
    "PoolTimeout",
    "RoleAttributes",
    "ServerUnavailable",
    "ServerVersion",
    "TooManyConnections",
    "TooManyWaiters",
    "UnsupportedServerVersion",
    "check_permissions",
    "connect",
    "get_version",
    "load_config",
    "require_permissions",
}


def test_all_lists_the_public_api() -> None:
    assert set(pgsd.__all__) == EXPECTED


def test_every_public_name_is_importable_and_documented() -> None:
    for name in pgsd.__all__:
        obj = getattr(pgsd, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__, f"pgsd.{name} has no docstring"


def test_errors_share_one_root_and_show_as_pgsd() -> None:
    for name in pgsd.__all__:
        obj = getattr(pgsd, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, pgsd.PgsdError)
            assert obj.__module__ == "pgsd"


def test_connect_errors_are_connect_error_kinds() -> None:
    for kind in (
        pgsd.AuthenticationError,
        pgsd.DatabaseNotFound,
        pgsd.ConnectTimeout,
        pgsd.ServerUnavailable,
        pgsd.TooManyConnections,
    ):
        assert issubclass(kind, pgsd.ConnectError)
