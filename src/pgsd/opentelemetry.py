"""OpenTelemetry metrics for pools and connectors, named by the semantic conventions.

::

    from pgsd.opentelemetry import instrument

    instrumentation = instrument(connector)            # or one pool
    ...
    instrumentation.uninstrument()

The metrics are the conventions' connection-pool metrics, each with the
attribute ``db.client.connection.pool.name`` (the database's name):

* ``db.client.connection.count`` with ``db.client.connection.state`` =
  ``idle`` or ``used``; ``db.client.connection.idle.max`` and ``.max``
  (``max_size``), ``.idle.min`` (``min_size``), ``.pending_requests``
  (tasks waiting) and ``.timeouts``: read from ``stats()`` when the
  meter collects, so they cost the pool nothing in between;
* ``db.client.connection.create_time``, ``.wait_time`` and ``.use_time``:
  histograms (seconds), recorded as each connection is opened, lent and
  given back. Only an instrumented pool pays for them: instrumenting
  wraps that pool's lending and taking back; an uninstrumented pool runs
  exactly its own code.

A connector's pools are all instrumented, those it opens later too. This
module needs ``opentelemetry-api``: ``pip install "pgsd[otel]"``; pass a
``meter_provider`` (the SDK's) or the global one is used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Final

try:
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation, get_meter
except ImportError as exc:
    raise ImportError(
        'pgsd.opentelemetry needs opentelemetry-api: pip install "pgsd[otel]"'
    ) from exc

from . import __version__
from ._connector import DatabaseConnector
from ._pool import ConnectionPool
from ._stats import BUCKETS, PoolStats

if TYPE_CHECKING:
    from ._pool.entry import Entry

__all__ = ["Instrumentation", "instrument"]

POOL_NAME: Final = "db.client.connection.pool.name"
STATE: Final = "db.client.connection.state"


class _PoolObserver:
    """Records one pool's histograms (`PoolCounters.observer` while instrumented)."""

    __slots__ = ("_attributes", "_connect", "_use", "_wait")

    def __init__(self, name: str, histograms: dict[str, Any]) -> None:
        self._attributes = {POOL_NAME: name}
        self._wait = histograms["wait_time"]
        self._use = histograms["use_time"]
        self._connect = histograms["create_time"]

    def waited(self, seconds: float) -> None:
        self._wait.record(seconds, self._attributes)

    def used(self, seconds: float) -> None:
        self._use.record(seconds, self._attributes)

    def connected(self, seconds: float) -> None:
        self._connect.record(seconds, self._attributes)


class Instrumentation:
    """The metrics of one pool or connector; `uninstrument` stops them."""

    def __init__(self, source: ConnectionPool | DatabaseConnector, meter: Any) -> None:
        self._source = source
        self._active = True
        self._pools: list[ConnectionPool] = []
        self._histograms = {
            key: _histogram(meter, f"db.client.connection.{key}", description)
            for key, description in (
                ("create_time", "The time it took to create a new connection."),
                ("wait_time", "The time it took to obtain an open connection from the pool."),
                ("use_time", "The time between borrowing a connection and returning it."),
            )
        }
        max_size, min_size, waiting = (attrgetter(f) for f in ("max_size", "min_size", "waiting"))
        gauges: tuple[tuple[str, str, str, Callable[[PoolStats], int]], ...] = (
            ("idle.max", "{connection}", "The most idle open connections allowed.", max_size),
            ("idle.min", "{connection}", "The fewest idle open connections kept.", min_size),
            ("max", "{connection}", "The most open connections allowed.", max_size),
            ("pending_requests", "{request}", "Requests waiting for a connection.", waiting),
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.count",
            callbacks=[self._counts],
            unit="{connection}",
            description="The connections in each state.",
        )
        for suffix, unit, description, read in gauges:
            meter.create_observable_up_down_counter(
                f"db.client.connection.{suffix}",
                callbacks=[self._reader(read)],
                unit=unit,
                description=description,
            )
        meter.create_observable_counter(
            "db.client.connection.timeouts",
            callbacks=[self._reader(attrgetter("timeouts"))],
            unit="{timeout}",
            description="Requests for a connection that timed out.",
        )
        if isinstance(source, DatabaseConnector):
            source._pool_hooks.append(self._attach)
            for pool in list(source._pools.values()):
                self._attach(pool)
        else:
            self._attach(source)

    def uninstrument(self) -> None:
        """Stop recording and reporting; the pools run their own code again."""
        self._active = False
        if isinstance(self._source, DatabaseConnector) and self._attach in self._source._pool_hooks:
            self._source._pool_hooks.remove(self._attach)
        for pool in self._pools:
            pool._counters.observer = None
            vars(pool).pop("_lend_now", None)
            vars(pool).pop("_return_now", None)
        self._pools.clear()

    def _attach(self, pool: ConnectionPool) -> None:
        observer = _PoolObserver(pool.name, self._histograms)
        pool._counters.observer = observer
        lend, take_back = pool._lend_now, pool._return_now

        def lend_now() -> Entry | None:
            entry = lend()
            if entry is not None:
                observer.waited(0.0)  # served at once
            return entry

        def return_now(entry: Entry) -> bool:
            lent_at = entry.lent_at
            if take_back(entry):
                observer.used(pool._now() - lent_at)
                return True
            return False

        # Instance attributes shadow the methods for this pool alone.
        vars(pool)["_lend_now"] = lend_now
        vars(pool)["_return_now"] = return_now
        self._pools.append(pool)
        if pool._replicas is not None:  # each read replica's pool, under its own name
            for replica in pool._replicas.replicas:
                self._attach(replica.pool)

    def _snapshots(self) -> Iterator[PoolStats]:
        if not self._active:
            return
        source = self._source
        primaries = (
            [source.stats()] if isinstance(source, ConnectionPool) else source.stats().values()
        )
        for stats in primaries:
            yield stats
            yield from stats.replicas

    def _counts(self, options: CallbackOptions) -> Iterable[Observation]:
        for stats in self._snapshots():
            yield Observation(stats.idle, {POOL_NAME: stats.name, STATE: "idle"})
            yield Observation(stats.in_use, {POOL_NAME: stats.name, STATE: "used"})

    def _reader(
        self, read: Callable[[PoolStats], int]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            return [
                Observation(read(stats), {POOL_NAME: stats.name}) for stats in self._snapshots()
            ]

        return callback


def instrument(
    source: ConnectionPool | DatabaseConnector, *, meter_provider: MeterProvider | None = None
) -> Instrumentation:
    """Report *source*'s pools through OpenTelemetry (the global meter provider by default).

    Raises:
        TypeError: *source* is neither a `ConnectionPool` nor a `DatabaseConnector`.
    """
    if not isinstance(source, ConnectionPool | DatabaseConnector):
        raise TypeError(
            f"expected a ConnectionPool or a DatabaseConnector, got {type(source).__name__}"
        )
    meter = get_meter("pgsd", __version__, meter_provider=meter_provider)
    return Instrumentation(source, meter)


def _histogram(meter: Any, name: str, description: str) -> Any:
    """A histogram in seconds, with pgsd's buckets as the advised boundaries where supported."""
    try:
        return meter.create_histogram(
            name, unit="s", description=description, explicit_bucket_boundaries_advisory=BUCKETS
        )
    except TypeError:  # an API before 1.23
        return meter.create_histogram(name, unit="s", description=description)
