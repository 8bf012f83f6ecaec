"""Reconnect delays: pure logic, no server."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import pgsd
from pgsd._backoff import Backoff


def test_delays_grow_exponentially_up_to_the_cap() -> None:
    config = pgsd.PoolConfig(
        reconnect_initial=0.1, reconnect_multiplier=2.0, reconnect_max=1.0, reconnect_jitter=0.0
    )
    backoff = Backoff(config)
    delays = [backoff.next_delay() for _ in range(7)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])
    assert backoff.attempts == 7


def test_reset_starts_again_from_the_initial_delay() -> None:
    config = pgsd.PoolConfig(reconnect_initial=0.5, reconnect_max=8.0, reconnect_jitter=0.0)
    backoff = Backoff(config)
    for _ in range(5):
        backoff.next_delay()
    backoff.reset()
    assert backoff.attempts == 0
    assert backoff.next_delay() == pytest.approx(0.5)


def test_jitter_only_shortens_a_delay() -> None:
    config = pgsd.PoolConfig(reconnect_initial=1.0, reconnect_max=1.0, reconnect_jitter=0.25)
    assert Backoff(config, rng=lambda: 0.0).next_delay() == pytest.approx(1.0)
    assert Backoff(config, rng=lambda: 1.0).next_delay() == pytest.approx(0.75)


def test_a_long_outage_does_not_overflow() -> None:
    config = pgsd.PoolConfig(reconnect_multiplier=10.0, reconnect_max=30.0, reconnect_jitter=0.0)
    backoff = Backoff(config)
    delays = [backoff.next_delay() for _ in range(5000)]
    assert delays[-1] == pytest.approx(30.0)


@given(
    initial=st.floats(0.001, 5.0),
    multiplier=st.floats(1.0, 10.0),
    cap=st.floats(5.0, 300.0),
    jitter=st.floats(0.0, 0.99),
    rng=st.floats(0.0, 1.0),
)
def test_every_delay_lies_within_its_bounds(
    initial: float, multiplier: float, cap: float, jitter: float, rng: float
) -> None:
    config = pgsd.PoolConfig(
        reconnect_initial=initial,
        reconnect_multiplier=multiplier,
        reconnect_max=cap,
        reconnect_jitter=jitter,
    )
    backoff = Backoff(config, rng=lambda: rng)
    previous_base = 0.0
    for n in range(40):
        base = min(cap, initial * multiplier**n)
        delay = backoff.next_delay()
        assert base * (1 - jitter) - 1e-9 <= delay <= base + 1e-9
        assert base >= previous_base - 1e-9
        previous_base = base
