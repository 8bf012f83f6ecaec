"""The psycopg internals pgsd relies on, named so that a test checks each is still there.

psycopg's versions are pinned in pyproject.toml; when a new minor is
allowed, ``tests/test_connection.py`` fails on any internal that moved.
"""

from __future__ import annotations

from typing import Final

__all__ = ["PSYCOPG_CONNECTION_ATTRIBUTES", "PSYCOPG_INTERNALS"]

#: The psycopg internals pgsd uses (``._connection``, ``._driver``,
#: ``._attempts`` and the pool's ``pipeline``), checked by the test suite.
PSYCOPG_INTERNALS: Final = (
    "psycopg.AsyncConnection.wait",
    "psycopg.AsyncConnection._should_cancel",
    "psycopg.AsyncConnection._get_connection_params",
    "psycopg.AsyncTransaction.__aexit__",
    "psycopg.AsyncTransaction._pop_savepoint",
    "psycopg.transaction.OutOfOrderTransactionNesting",
    "psycopg.pq.PGconn.connect_start",
    "psycopg.pq.PGconn.connect_poll",
    "psycopg.pq.PGconn.cancel_conn",
    "psycopg.pq.PGconn.used_gssapi",
    "psycopg.pq.PGconn.pipeline_status",
    "psycopg.errors._WaitTimeout",
    "psycopg.generators.fetch_many",
    "psycopg._encodings.conninfo_encoding",
    "psycopg._conninfo_utils.split_attempts",
    "psycopg._conninfo_utils.get_param",
    "psycopg._conninfo_utils.get_param_def",
    "psycopg._conninfo_utils.gssapi_requested",
    "psycopg._conninfo_utils.is_ip_address",
    "psycopg._capabilities.capabilities.has_cancel_safe",
    "psycopg._capabilities.capabilities.has_used_gssapi",
    "psycopg.waiting.Wait",
    "psycopg.waiting.Ready",
    # Replaced by pgsd._backend.install_psycopg_shims for the queued COPY writer.
    "psycopg._copy_async.aspawn",
    "psycopg._copy_async.agather",
    "psycopg._copy_async.AQueue",
    # The pool's pipelined one-shot statements (pgsd._pool.pipeline).
    "psycopg._queries.PostgresQuery",
    # Handed to libpq's PQsendPipelineSync, which psycopg does not wrap.
    "psycopg.pq.PGconn.pgconn_ptr",
)
#: Attributes psycopg sets on each connection that `Connection` reads or replaces.
PSYCOPG_CONNECTION_ATTRIBUTES: Final = ("lock", "_autocommit", "_adapters", "_closed", "_pipeline")
