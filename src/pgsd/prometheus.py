"""Prometheus metrics for pools and connectors.

:class:`PoolCollector` reads :class:`~pgsd.PoolStats` snapshots at scrape
time and reports each number as one metric labelled with the database's
name::

    from pgsd.prometheus import register

    register(pool)  # or a connector: every pool it holds

Gauges keep the field's name (``pgsd_pool_size``, ``pgsd_pool_waiting``...),
counters gain ``_total`` (``pgsd_pool_acquires_total``...). The time spent
waiting is ``pgsd_pool_wait_seconds_total``, the longest wait
``pgsd_pool_wait_seconds_max``. The state is ``pgsd_pool_up`` (1 when up)
and ``pgsd_pool_state{state="..."}``, 1 for the current state and 0 for the
others, so that a state change never leaves a stale series behind. The
distributions are histograms with fixed buckets (`pgsd.PoolStats`):
``pgsd_pool_acquire_wait_seconds``, ``pgsd_pool_use_seconds`` and
``pgsd_pool_connect_seconds`` (each with ``_bucket``, ``_sum``, ``_count``).

This module needs ``prometheus_client``: ``pip install "pgsd[prometheus]"``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Final, Literal, Protocol, get_args

try:
    from prometheus_client.metrics_core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import REGISTRY, CollectorRegistry
    from prometheus_client.utils import floatToGoString
except ImportError as exc:
    raise ImportError(
        'pgsd.prometheus needs prometheus_client: pip install "pgsd[prometheus]"'
    ) from exc

from ._stats import Histogram, PoolState, PoolStats

__all__ = ["PoolCollector", "StatsSource", "register"]


class StatsSource(Protocol):
    """Anything with a ``stats()`` method: a pool, or a connector of pools."""

    def stats(self) -> PoolStats | Mapping[str, PoolStats]:
        """One pool's snapshot, or one snapshot per database."""
        ...


@dataclass(frozen=True, slots=True)
class _Export:
    """How one numeric :class:`PoolStats` field is exported."""

    field: str
    kind: Literal["gauge", "counter"]
    # The name after ``<namespace>_pool_``; counters gain ``_total`` on exposition.
    suffix: str
    documentation: str


#: Every numeric PoolStats field, in exposition order. A test checks that
#: this table and the dataclass name the same fields.
_EXPORTS: Final = (
    _Export("size", "gauge", "size", "Open connections."),
    _Export("idle", "gauge", "idle", "Open connections waiting to be lent."),
    _Export("in_use", "gauge", "in_use", "Connections lent out or being checked or cleaned."),
    _Export("opening", "gauge", "opening", "Connection attempts under way."),
    _Export("waiting", "gauge", "waiting", "Tasks waiting for a connection."),
    _Export("min_size", "gauge", "min_size", "The configured minimum number of connections."),
    _Export("max_size", "gauge", "max_size", "The configured maximum number of connections."),
    _Export("acquires", "counter", "acquires", "Connections lent."),
    _Export("wait_time_total", "counter", "wait_seconds", "Seconds spent waiting by all acquires."),
    _Export("wait_time_max", "gauge", "wait_seconds_max", "The longest single wait, in seconds."),
    _Export("timeouts", "counter", "timeouts", "Acquires that ended with PoolTimeout."),
    _Export("errors", "counter", "errors", "Failed connection attempts."),
    _Export("connections_opened", "counter", "connections_opened", "Connections opened."),
    _Export("connections_closed", "counter", "connections_closed", "Connections closed."),
    _Export(
        "connections_lost", "counter", "connections_lost", "Connections found broken and replaced."
    ),
    _Export(
        "reconnect_attempts",
        "counter",
        "reconnect_attempts",
        "Connection attempts made while the database was down.",
    ),
    _Export("leaks", "counter", "leaks", "Connections held longer than leak_threshold."),
    _Export("statements", "counter", "statements", "One-shot statements answered."),
    _Export(
        "statements_in_flight",
        "gauge",
        "statements_in_flight",
        "One-shot statements sent and not yet answered.",
    ),
    _Export(
        "pipeline_depth_max",
        "gauge",
        "pipeline_depth_max",
        "The most one-shot statements in flight on one connection at once.",
    ),
)

#: The PoolStats histograms, each a Prometheus histogram: field, name
#: suffix, documentation.
_HISTOGRAMS: Final = (
    ("wait_time", "acquire_wait_seconds", "How long acquires waited for a connection."),
    ("use_time", "use_seconds", "How long lent connections were held."),
    ("connect_time", "connect_seconds", "How long opening a new connection took."),
)
#: PoolStats fields that are not one number each: ``name`` becomes the
#: ``database`` label, ``state`` the ``up`` and ``state`` gauges; the
#: histograms are in `_HISTOGRAMS`. A primary's ``replicas`` are reported
#: as pools of their own (their names say whose replicas they are), with
#: ``lag_seconds`` and ``replica_state`` as the ``replica_lag_seconds`` and
#: ``replica_fresh`` gauges; ``role`` is what tells them apart.
_LABEL_FIELDS: Final = frozenset(
    {"name", "state", "role", "replicas", "lag_seconds", "replica_state"}
    | {field for field, _, _ in _HISTOGRAMS}
)

_STATES: Final[tuple[PoolState, ...]] = get_args(PoolState)

_NAMESPACE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


class PoolCollector:
    """A Prometheus collector reporting the statistics of one or more pools.

    Statistics are read from ``source.stats()`` on every scrape, so the
    metrics always describe the pools as they are when scraped.

    Args:
        source: anything whose ``stats()`` returns one :class:`~pgsd.PoolStats`
            (a :class:`~pgsd.ConnectionPool`) or a mapping of them (a
            connector).
        namespace: the prefix of every metric name (``<namespace>_pool_...``);
            empty for none.

    Raises:
        ValueError: ``namespace`` is not a valid metric name prefix.
    """

    def __init__(self, source: StatsSource, *, namespace: str = "pgsd") -> None:
        if namespace and not _NAMESPACE.fullmatch(namespace):
            raise ValueError(f"invalid metric namespace: {namespace!r}")
        self.source = source
        self.namespace = namespace

    def describe(self) -> list[Metric]:
        """The metric families without samples, for registration.

        Lets a registry check names without calling ``source.stats()``.
        """
        return list(self._families().values())

    def collect(self) -> Iterator[Metric]:
        """The metric families with one sample per database."""
        snapshot = self.source.stats()
        primaries = [snapshot] if isinstance(snapshot, PoolStats) else list(snapshot.values())
        pools = [pool for primary in primaries for pool in (primary, *primary.replicas)]
        families = self._families()
        up, state = families.pop("up"), families.pop("state")
        lag, fresh = families.pop("replica_lag_seconds"), families.pop("replica_fresh")
        for export in _EXPORTS:
            family = families[export.field]
            for stats in pools:
                family.add_metric([stats.name], getattr(stats, export.field))
            yield family
        for stats in pools:
            up.add_metric([stats.name], 1 if stats.state == "up" else 0)
            for name in _STATES:
                state.add_metric([stats.name, name], 1 if stats.state == name else 0)
        yield up
        yield state
        for stats in pools:
            if stats.role != "replica":
                continue
            fresh.add_metric([stats.name], 1 if stats.replica_state == "fresh" else 0)
            if stats.lag_seconds is not None:
                lag.add_metric([stats.name], stats.lag_seconds)
        yield lag
        yield fresh
        for field, suffix, documentation in _HISTOGRAMS:
            histogram = HistogramMetricFamily(
                self._name(suffix), documentation, labels=["database"]
            )
            for stats in pools:
                _add_histogram(histogram, stats.name, getattr(stats, field))
            yield histogram

    def _families(self) -> dict[str, GaugeMetricFamily | CounterMetricFamily]:
        """Empty families keyed by PoolStats field, then ``up`` and ``state``."""
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for export in _EXPORTS:
            name = self._name(export.suffix)
            if export.kind == "gauge":
                families[export.field] = GaugeMetricFamily(
                    name, export.documentation, labels=["database"]
                )
            else:
                families[export.field] = CounterMetricFamily(
                    name, export.documentation, labels=["database"]
                )
        families["up"] = GaugeMetricFamily(
            self._name("up"), "1 when the database is up, else 0.", labels=["database"]
        )
        families["state"] = GaugeMetricFamily(
            self._name("state"),
            "1 for the pool's current state (opening, up, down, paused or closed), else 0.",
            labels=["database", "state"],
        )
        families["replica_lag_seconds"] = GaugeMetricFamily(
            self._name("replica_lag_seconds"),
            "A read replica's lag behind its primary at its last check, in seconds.",
            labels=["database"],
        )
        families["replica_fresh"] = GaugeMetricFamily(
            self._name("replica_fresh"),
            "1 when a read replica serves reads (up, in recovery, within max_replica_lag).",
            labels=["database"],
        )
        return families

    def _name(self, suffix: str) -> str:
        return "_".join(part for part in (self.namespace, "pool", suffix) if part)


def _add_histogram(family: HistogramMetricFamily, database: str, histogram: Histogram) -> None:
    """One pool's histogram as Prometheus buckets: cumulative counts, ``+Inf`` last."""
    buckets: list[tuple[str, float]] = []
    seen = 0
    for bound, count in zip(histogram.bounds, histogram.counts, strict=False):
        seen += count
        buckets.append((floatToGoString(bound), seen))  # type: ignore[no-untyped-call]
    buckets.append(("+Inf", histogram.count))
    family.add_metric([database], buckets, histogram.sum)


def register(
    source: StatsSource,
    registry: CollectorRegistry = REGISTRY,
    *,
    namespace: str = "pgsd",
) -> PoolCollector:
    """Register a :class:`PoolCollector` for ``source`` and return it.

    Unregister it with ``registry.unregister(collector)`` when the pools
    are closed.

    Raises:
        ValueError: ``namespace`` is invalid, or the registry already has
            metrics of these names (from another collector with the same
            namespace: report several pools through one connector, or give
            each collector its own namespace).
    """
    collector = PoolCollector(source, namespace=namespace)
    registry.register(collector)
    return collector
