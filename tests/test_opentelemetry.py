"""OpenTelemetry metrics (`pgsd.opentelemetry`) read with the SDK's in-memory reader, real server.

The semantic conventions' connection-pool metrics, each with the pool's
name: counts by state, limits, pending requests and timeouts read from
``stats()``; wait, use and create times as histograms. An uninstrumented
pool runs its own code: instrumenting shadows its lending methods, and
uninstrumenting removes the shadows.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import pgsd
from pgsd.opentelemetry import POOL_NAME, STATE, instrument
from pgsd.testing import PostgresServer
from support import db_config, until

pytestmark = pytest.mark.anyio

BOUND = 30


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def provider(reader: InMemoryMetricReader) -> Any:
    provider = MeterProvider(metric_readers=[reader])
    yield provider
    provider.shutdown()


def collected(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    """Every metric's data points, by name."""
    data = reader.get_metrics_data()
    points: dict[str, list[Any]] = {}
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points.setdefault(metric.name, []).extend(metric.data.data_points)
    return points


def point(points: dict[str, list[Any]], name: str, **attributes: str) -> Any:
    [found] = [
        p for p in points[name] if all(p.attributes.get(k) == v for k, v in attributes.items())
    ]
    return found


async def test_a_connectors_pools_report_the_conventions_metrics(
    pg_server: PostgresServer, reader: InMemoryMetricReader, provider: Any
) -> None:
    config = pgsd.ConnectorConfig(
        databases={"app": db_config(pg_server)},
        pool=pgsd.PoolConfig(min_size=1, max_size=2, acquire_timeout=0.3),
    )
    async with pgsd.DatabaseConnector(config) as connector:
        instrumentation = instrument(connector, meter_provider=provider)
        opened_before = connector.stats()["app"].connections_opened  # not recorded
        with anyio.fail_after(BOUND):
            for _ in range(3):
                async with connector.get_connection("app"):
                    pass
            async with connector.get_connection("app"), connector.get_connection("app"):
                with pytest.raises(pgsd.PoolTimeout):
                    async with connector.get_connection("app"):
                        pass
                points = collected(reader)
        app = {POOL_NAME: "app"}
        assert point(points, "db.client.connection.count", **app, **{STATE: "used"}).value == 2
        assert point(points, "db.client.connection.count", **app, **{STATE: "idle"}).value == 0
        assert point(points, "db.client.connection.max", **app).value == 2
        assert point(points, "db.client.connection.idle.max", **app).value == 2
        assert point(points, "db.client.connection.idle.min", **app).value == 1
        assert point(points, "db.client.connection.pending_requests", **app).value == 0
        assert point(points, "db.client.connection.timeouts", **app).value == 1
        waits = point(points, "db.client.connection.wait_time", **app)
        assert waits.count == 5  # every connection lent, at once or after a wait
        assert point(points, "db.client.connection.use_time", **app).count == 3
        creates = point(points, "db.client.connection.create_time", **app)
        assert creates.count == connector.stats()["app"].connections_opened - opened_before >= 1
        assert creates.sum > 0
        # A database added later is instrumented too.
        connector.add_database("audit", db_config(pg_server))
        assert await connector.fetchval("audit", "SELECT 1") == 1
        async with connector.get_connection("audit"):
            pass
        points = collected(reader)
        assert point(points, "db.client.connection.use_time", **{POOL_NAME: "audit"}).count == 1
        instrumentation.uninstrument()
        pool = connector.pool("app")
        assert "_lend_now" not in vars(pool)
        assert "_return_now" not in vars(pool)
        assert pool._counters.observer is None


async def test_one_pool_and_its_waits(
    pg_server: PostgresServer, reader: InMemoryMetricReader, provider: Any
) -> None:
    async with pgsd.ConnectionPool(
        db_config(pg_server), pgsd.PoolConfig(min_size=1, max_size=1)
    ) as pool:
        instrument(pool, meter_provider=provider)
        release = anyio.Event()

        async def holder() -> None:
            async with pool.connection():
                await release.wait()

        with anyio.fail_after(BOUND):
            async with anyio.create_task_group() as tg:
                tg.start_soon(holder)
                await until(lambda: pool.stats().in_use == 1)

                async def waiter() -> None:
                    async with pool.connection():
                        pass

                tg.start_soon(waiter)
                await until(lambda: pool.stats().waiting == 1)
                points = collected(reader)
                name = {POOL_NAME: pool.name}
                assert point(points, "db.client.connection.pending_requests", **name).value == 1
                release.set()
        points = collected(reader)
        waits = point(points, "db.client.connection.wait_time", **{POOL_NAME: pool.name})
        assert waits.count == 2
        assert waits.max > 0  # the waiter's wait


def test_instrument_refuses_other_objects() -> None:
    with pytest.raises(TypeError):
        instrument(object())  # type: ignore[arg-type]


async def test_a_pools_read_replicas_are_reported_under_their_own_names(
    pg_server: PostgresServer, reader: InMemoryMetricReader, provider: Any
) -> None:
    # The same server under another name stands in for a replica: the
    # metrics are what is tested (tests/test_replicas.py has real standbys).
    config = db_config(pg_server, replicas=[f"host=localhost port={pg_server.port}"])
    pool = pgsd.ConnectionPool(config, pgsd.PoolConfig(min_size=1, max_size=2))
    instrument(pool, meter_provider=provider)
    async with pool:
        with anyio.fail_after(BOUND):
            await until(lambda: pool.stats().replicas[0].size == 1)
        [replica] = pool.stats().replicas
        points = collected(reader)
    assert replica.name == f"{config.display_name} replica localhost:{pg_server.port}"
    assert point(points, "db.client.connection.max", **{POOL_NAME: replica.name}).value == 2
    assert point(points, "db.client.connection.max", **{POOL_NAME: pool.name}).value == 2
    creates = point(points, "db.client.connection.create_time", **{POOL_NAME: replica.name})
    assert creates.count >= 1
