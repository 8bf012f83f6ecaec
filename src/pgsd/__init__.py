"""pgsd: PostgreSQL connection pools for asyncio and trio."""

from __future__ import annotations

from importlib import metadata as _metadata

from ._config import ConnectorConfig as ConnectorConfig
from ._config import DatabaseConfig as DatabaseConfig
from ._config import PoolConfig as PoolConfig
from ._config_file import load_config as load_config
from ._connection import Connection as Connection
from ._connection import connect as connect
from ._connector import DatabaseConnector as DatabaseConnector
from ._credentials import PasswordCommand as PasswordCommand
from ._errors import AuthenticationError as AuthenticationError
from ._errors import ConfigError as ConfigError
from ._errors import ConnectError as ConnectError
from ._errors import ConnectTimeout as ConnectTimeout
from ._errors import DatabaseNotFound as DatabaseNotFound
from ._errors import InsufficientPrivileges as InsufficientPrivileges
from ._errors import ListenError as ListenError
from ._errors import NoReplicaAvailable as NoReplicaAvailable
from ._errors import OutcomeUnknown as OutcomeUnknown
from ._errors import PasswordProviderError as PasswordProviderError
from ._errors import PgsdError as PgsdError
from ._errors import PoolClosed as PoolClosed
from ._errors import PoolTimeout as PoolTimeout
from ._errors import ServerUnavailable as ServerUnavailable
from ._errors import TLSError as TLSError
from ._errors import TooManyConnections as TooManyConnections
from ._errors import TooManyWaiters as TooManyWaiters
from ._errors import UnsupportedServerVersion as UnsupportedServerVersion
from ._permissions import PermissionReport as PermissionReport
from ._permissions import RoleAttributes as RoleAttributes
from ._permissions import check_permissions as check_permissions
from ._permissions import require_permissions as require_permissions
from ._pool import ConnectionPool as ConnectionPool
from ._pool import ListenGap as ListenGap
from ._pool import Notification as Notification
from ._reports import ConnectionReport as ConnectionReport
from ._stats import Histogram as Histogram
from ._stats import PoolState as PoolState
from ._stats import PoolStats as PoolStats
from ._version import MIN_SERVER_VERSION as MIN_SERVER_VERSION
from ._version import ServerVersion as ServerVersion
from ._version import get_version as get_version

#: The installed distribution's version: pyproject.toml is the one place it is written.
__version__ = _metadata.version("pgsd")

__all__ = [
    "MIN_SERVER_VERSION",
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
]
