"""Prometheus metrics: one metric per PoolStats number, labelled by database."""

from __future__ import annotations

import dataclasses
import importlib
import sys
import typing
from collections.abc import Mapping
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import pgsd.prometheus
from pgsd import Histogram, PoolState, PoolStats
from pgsd._stats import BUCKETS
from pgsd.prometheus import PoolCollector, register

SampleKey = tuple[str, frozenset[tuple[str, str]]]

NUMERIC_FIELDS = [
    f.name
    for f in dataclasses.fields(PoolStats)
    if typing.get_type_hints(PoolStats)[f.name] in (int, float)
]

GAUGES = {
    "size": "pgsd_pool_size",
    "idle": "pgsd_pool_idle",
    "in_use": "pgsd_pool_in_use",
    "opening": "pgsd_pool_opening",
    "waiting": "pgsd_pool_waiting",
    "min_size": "pgsd_pool_min_size",
    "max_size": "pgsd_pool_max_size",
    "wait_time_max": "pgsd_pool_wait_seconds_max",
    "statements_in_flight": "pgsd_pool_statements_in_flight",
    "pipeline_depth_max": "pgsd_pool_pipeline_depth_max",
}

COUNTERS = {
    "acquires": "pgsd_pool_acquires_total",
    "wait_time_total": "pgsd_pool_wait_seconds_total",
    "timeouts": "pgsd_pool_timeouts_total",
    "errors": "pgsd_pool_errors_total",
    "connections_opened": "pgsd_pool_connections_opened_total",
    "connections_closed": "pgsd_pool_connections_closed_total",
    "connections_lost": "pgsd_pool_connections_lost_total",
    "reconnect_attempts": "pgsd_pool_reconnect_attempts_total",
    "leaks": "pgsd_pool_leaks_total",
    "statements": "pgsd_pool_statements_total",
}


HISTOGRAMS = {
    "wait_time": "pgsd_pool_acquire_wait_seconds",
    "use_time": "pgsd_pool_use_seconds",
    "connect_time": "pgsd_pool_connect_seconds",
}


def histogram(seed: int) -> Histogram:
    """A distinctive histogram: *seed* in the first bucket, 1 in the third, 2 above the last."""
    counts = [0] * (len(BUCKETS) + 1)
    counts[0], counts[2], counts[-1] = seed, 1, 2
    return Histogram(BUCKETS, tuple(counts), seed + 100.25)


def make_stats(name: str = "app", state: PoolState = "up", **numbers: float) -> PoolStats:
    """A snapshot whose every number differs from the others, so mix-ups show."""
    values: dict[str, Any] = {}
    for i, field in enumerate(NUMERIC_FIELDS, start=1):
        values[field] = i + 0.5 if typing.get_type_hints(PoolStats)[field] is float else i
    for i, field in enumerate(HISTOGRAMS, start=1):
        values[field] = histogram(i)
    values.update(numbers)
    return PoolStats(name=name, state=state, **values)


class FakeSource:
    """A source whose ``stats()`` returns whatever the test sets."""

    def __init__(self, snapshot: PoolStats | Mapping[str, PoolStats]) -> None:
        self.snapshot = snapshot
        self.calls = 0

    def stats(self) -> PoolStats | Mapping[str, PoolStats]:
        self.calls += 1
        return self.snapshot


def exposition(source: FakeSource, *, namespace: str = "pgsd") -> str:
    registry = CollectorRegistry()
    register(source, registry, namespace=namespace)
    return generate_latest(registry).decode()


def samples(text: str) -> dict[SampleKey, float]:
    """Every sample of an exposition, keyed by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def key(name: str, **labels: str) -> SampleKey:
    return (name, frozenset(labels.items()))


def test_every_pool_stats_field_is_exported_exactly_once() -> None:
    exported = [export.field for export in pgsd.prometheus._EXPORTS]
    assert len(exported) == len(set(exported))
    assert set(exported).isdisjoint(pgsd.prometheus._LABEL_FIELDS)
    all_fields = {f.name for f in dataclasses.fields(PoolStats)}
    assert set(exported) | pgsd.prometheus._LABEL_FIELDS == all_fields
    assert set(exported) == set(NUMERIC_FIELDS)


def test_histograms_have_cumulative_buckets_a_sum_and_a_count() -> None:
    text = exposition(FakeSource(make_stats("app")))
    found = samples(text)
    for i, (field, name) in enumerate(HISTOGRAMS.items(), start=1):
        assert found[key(f"{name}_bucket", database="app", le="0.0005")] == i
        assert found[key(f"{name}_bucket", database="app", le="0.001")] == i
        assert found[key(f"{name}_bucket", database="app", le="0.0025")] == i + 1
        assert found[key(f"{name}_bucket", database="app", le="30.0")] == i + 1
        assert found[key(f"{name}_bucket", database="app", le="+Inf")] == i + 3
        assert found[key(f"{name}_count", database="app")] == i + 3
        assert found[key(f"{name}_sum", database="app")] == i + 100.25, field


def test_the_tests_name_a_metric_for_every_numeric_field() -> None:
    assert set(GAUGES) | set(COUNTERS) == set(NUMERIC_FIELDS)


def test_gauges_report_each_field_with_its_value_and_database_label() -> None:
    stats = make_stats(name="orders")
    found = samples(exposition(FakeSource(stats)))
    for field, metric in GAUGES.items():
        assert found[key(metric, database="orders")] == getattr(stats, field), field


def test_counters_report_each_field_with_its_value_and_database_label() -> None:
    stats = make_stats(name="orders")
    found = samples(exposition(FakeSource(stats)))
    for field, metric in COUNTERS.items():
        assert found[key(metric, database="orders")] == getattr(stats, field), field


def test_counters_are_typed_counter_and_end_in_total() -> None:
    text = exposition(FakeSource(make_stats()))
    for metric in COUNTERS.values():
        assert f"# TYPE {metric} counter\n" in text
    counters = {line.split()[2] for line in text.splitlines() if line.endswith(" counter")}
    assert counters == set(COUNTERS.values())


def test_gauges_are_typed_gauge() -> None:
    text = exposition(FakeSource(make_stats()))
    gauges = {line.split()[2] for line in text.splitlines() if line.endswith(" gauge")}
    replica_gauges = {"pgsd_pool_replica_lag_seconds", "pgsd_pool_replica_fresh"}
    assert gauges == set(GAUGES.values()) | {"pgsd_pool_up", "pgsd_pool_state"} | replica_gauges


def test_a_primarys_replicas_are_reported_as_pools_with_their_lag_and_standing() -> None:
    replicas = (
        dataclasses.replace(
            make_stats(name="app replica db2", size=2),
            role="replica",
            lag_seconds=0.25,
            replica_state="fresh",
        ),
        dataclasses.replace(
            make_stats(name="app replica db3", size=1),
            role="replica",
            lag_seconds=12.5,
            replica_state="lagging",
        ),
        dataclasses.replace(
            make_stats(name="app replica db4"), role="replica", replica_state="unknown"
        ),
    )
    stats = dataclasses.replace(make_stats(name="app", size=4), replicas=replicas)
    found = samples(exposition(FakeSource({"app": stats})))
    assert found[key("pgsd_pool_size", database="app")] == 4
    assert found[key("pgsd_pool_size", database="app replica db2")] == 2
    assert found[key("pgsd_pool_size", database="app replica db3")] == 1
    assert found[key("pgsd_pool_replica_lag_seconds", database="app replica db2")] == 0.25
    assert found[key("pgsd_pool_replica_lag_seconds", database="app replica db3")] == 12.5
    assert key("pgsd_pool_replica_lag_seconds", database="app replica db4") not in found
    assert key("pgsd_pool_replica_lag_seconds", database="app") not in found
    assert found[key("pgsd_pool_replica_fresh", database="app replica db2")] == 1
    assert found[key("pgsd_pool_replica_fresh", database="app replica db3")] == 0
    assert found[key("pgsd_pool_replica_fresh", database="app replica db4")] == 0
    assert key("pgsd_pool_replica_fresh", database="app") not in found


def test_exposition_text_shows_the_value_and_label() -> None:
    text = exposition(FakeSource(make_stats(name="orders", size=7, wait_time_total=1.25)))
    assert 'pgsd_pool_size{database="orders"} 7.0\n' in text
    assert 'pgsd_pool_wait_seconds_total{database="orders"} 1.25\n' in text


@pytest.mark.parametrize(("state", "up"), [("opening", 0), ("up", 1), ("down", 0), ("closed", 0)])
def test_up_is_one_only_when_the_state_is_up(state: PoolState, up: int) -> None:
    found = samples(exposition(FakeSource(make_stats(state=state))))
    assert found[key("pgsd_pool_up", database="app")] == up


@pytest.mark.parametrize("state", typing.get_args(PoolState))
def test_state_gauge_is_one_for_the_current_state_and_zero_for_the_others(
    state: PoolState,
) -> None:
    found = samples(exposition(FakeSource(make_stats(state=state))))
    for other in typing.get_args(PoolState):
        expected = 1 if other == state else 0
        assert found[key("pgsd_pool_state", database="app", state=other)] == expected


def test_a_source_returning_a_mapping_reports_every_database() -> None:
    source = FakeSource(
        {
            "orders": make_stats(name="orders", size=3, state="up"),
            "billing": make_stats(name="billing", size=5, state="down"),
        }
    )
    found = samples(exposition(source))
    assert found[key("pgsd_pool_size", database="orders")] == 3
    assert found[key("pgsd_pool_size", database="billing")] == 5
    assert found[key("pgsd_pool_up", database="orders")] == 1
    assert found[key("pgsd_pool_up", database="billing")] == 0


def test_a_source_returning_an_empty_mapping_exposes_no_samples() -> None:
    assert samples(exposition(FakeSource({}))) == {}


def test_odd_database_names_are_escaped_in_labels() -> None:
    odd = 'we"ird\\name\nwith é'
    text = exposition(FakeSource(make_stats(name=odd, size=2)))
    assert 'pgsd_pool_size{database="we\\"ird\\\\name\\nwith é"} 2.0\n' in text
    assert samples(text)[key("pgsd_pool_size", database=odd)] == 2


def test_stats_are_read_at_each_scrape() -> None:
    source = FakeSource(make_stats(size=1))
    registry = CollectorRegistry()
    register(source, registry)
    assert 'pgsd_pool_size{database="app"} 1.0' in generate_latest(registry).decode()
    source.snapshot = make_stats(size=4)
    assert 'pgsd_pool_size{database="app"} 4.0' in generate_latest(registry).decode()


def test_registering_does_not_read_stats() -> None:
    source = FakeSource(make_stats())
    register(source, CollectorRegistry())
    assert source.calls == 0


def test_register_returns_the_registered_collector() -> None:
    registry = CollectorRegistry()
    collector = register(FakeSource(make_stats()), registry)
    assert isinstance(collector, PoolCollector)
    registry.unregister(collector)
    assert generate_latest(registry) == b""


def test_registering_two_collectors_with_one_namespace_raises() -> None:
    registry = CollectorRegistry()
    register(FakeSource(make_stats()), registry)
    with pytest.raises(ValueError, match="pgsd_pool_size"):
        register(FakeSource(make_stats()), registry)


def test_namespace_prefixes_every_metric() -> None:
    found = samples(exposition(FakeSource(make_stats(size=2)), namespace="myapp_db"))
    assert found[key("myapp_db_pool_size", database="app")] == 2
    assert all(name.startswith("myapp_db_pool_") for name, _ in found)


def test_empty_namespace_leaves_the_pool_prefix() -> None:
    found = samples(exposition(FakeSource(make_stats(size=2)), namespace=""))
    assert found[key("pool_size", database="app")] == 2


def test_invalid_namespace_raises() -> None:
    with pytest.raises(ValueError, match="namespace"):
        PoolCollector(FakeSource(make_stats()), namespace="my-app")


def test_import_without_prometheus_client_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in list(sys.modules):
        if name == "prometheus_client" or name.startswith("prometheus_client."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "pgsd.prometheus")
    with pytest.raises(ImportError, match=r'pip install "pgsd\[prometheus\]"'):
        importlib.import_module("pgsd.prometheus")


def test_public_names_are_documented() -> None:
    for name in pgsd.prometheus.__all__:
        assert getattr(pgsd.prometheus, name).__doc__, name
    assert pgsd.prometheus.__doc__
    assert PoolCollector.collect.__doc__
    assert PoolCollector.describe.__doc__
