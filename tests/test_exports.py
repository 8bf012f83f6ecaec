"""The public API: exactly these names, each documented."""

from __future__ import annotations
import __future__

import inspect
import subprocess
import sys
import types

import pytest

import pgsd
import pgsd.prometheus
import pgsd.testing

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
    "Histogram",
    "InsufficientPrivileges",
    "ListenError",
    "ListenGap",
    "NoReplicaAvailable",
    "Notification",
    "MIN_SERVER_VERSION",
    "OutcomeUnknown",
    "PasswordCommand",
    "PasswordProviderError",
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
    "TLSError",
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
        pgsd.TLSError,
        pgsd.TooManyConnections,
    ):
        assert issubclass(kind, pgsd.ConnectError)


TESTING_EXPECTED = {
    "ClientCertificate",
    "FaultProxy",
    "PgBouncer",
    "PostgresBinaries",
    "PostgresServer",
    "ServerNotFound",
    "StandbyServer",
    "TLSFiles",
    "default_cache_dir",
    "find_binaries",
    "free_port",
    "install_binaries",
    "newest_package_version",
    "npm_platform",
    "promote",
    "start_standby",
}


def public_attributes(module: types.ModuleType) -> set[str]:
    """What ``dir()`` shows that is not private, a submodule or a ``__future__`` feature."""
    return {
        name
        for name in dir(module)
        if not name.startswith("_")
        and not isinstance(getattr(module, name), types.ModuleType | __future__._Feature)
    }


@pytest.mark.parametrize(
    ("module", "expected"),
    [(pgsd, EXPECTED), (pgsd.testing, TESTING_EXPECTED)],
    ids=["pgsd", "pgsd.testing"],
)
def test_no_public_name_outside_all(module: types.ModuleType, expected: set[str]) -> None:
    assert set(module.__all__) == expected
    assert public_attributes(module) == expected


def test_the_prometheus_module_exports_its_own_names() -> None:
    assert set(pgsd.prometheus.__all__) == {"PoolCollector", "StatsSource", "register"}
    for name in pgsd.prometheus.__all__:
        obj = getattr(pgsd.prometheus, name)
        assert obj.__module__ == "pgsd.prometheus"
        assert obj.__doc__, f"pgsd.prometheus.{name} has no docstring"


def test_the_testing_helpers_are_documented() -> None:
    for name in pgsd.testing.__all__:
        obj = getattr(pgsd.testing, name)
        assert obj.__doc__, f"pgsd.testing.{name} has no docstring"


def test_importing_pgsd_loads_neither_trio_nor_the_test_helpers() -> None:
    code = (
        "import sys, pgsd; "
        "print(sorted(m for m in ('trio', 'pgsd.testing', 'cryptography', 'prometheus_client')"
        " if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"
