"""Connect storm: open a pool of 20 through a network that delays each connection 50 ms.

The delay comes from `pgsd.testing.FaultProxy` in ``delay`` mode, run in a
process of its own (``delay_proxy.py``). A pool that opens its connections
one after another pays the delay 20 times; one that opens them all at once
pays it about once.
"""

from __future__ import annotations

import select
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from clients import Client
from harness import Portals, Recorder, Sizes, pg_url
from pgsd.testing import PostgresServer

STORM_SIZE = 20
CONNECT_DELAY = 0.05
#: How long the proxy's process may take to start and to stop.
_PROXY_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def proxy_url(pg_server: PostgresServer) -> Iterator[str]:
    """The server's URL through a proxy (its own process) that delays each connection."""
    command = [
        sys.executable,
        str(Path(__file__).with_name("delay_proxy.py")),
        pg_server.host,
        str(pg_server.port),
        str(CONNECT_DELAY),
    ]
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        try:
            ready, _, _ = select.select([proc.stdout], [], [], _PROXY_TIMEOUT)
            line = proc.stdout.readline() if ready else ""
            if not line.strip().isdigit():
                raise RuntimeError(f"the delaying proxy did not start (it said {line!r})")
            yield pg_url(pg_server, int(line))
        finally:
            proc.stdin.close()  # the proxy's signal to stop
            try:
                proc.wait(timeout=_PROXY_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_connect_storm(
    client: Client, portals: Portals, proxy_url: str, timed_recorder: Recorder, sizes: Sizes
) -> None:
    """Time from opening a pool of 20 (min_size = max_size) to all 20 connected."""
    portal = portals.get(client.backend)
    times: list[float] = []
    with ExitStack() as open_pools:

        def open_pool() -> None:
            start = time.perf_counter()
            pool_cm = client.pool.open(proxy_url, STORM_SIZE)
            pool = open_pools.enter_context(portal.wrap_async_context_manager(pool_cm))
            times.append(time.perf_counter() - start)
            assert portal.call(pool.size) == STORM_SIZE

        # Each round's pool is closed after it is timed.
        timed_recorder.time(
            "connect storm", open_pool, rounds=sizes.storm_rounds, teardown=open_pools.close
        )
    median = statistics.median(times[-sizes.storm_rounds :])  # without the warm-up round
    timed_recorder.record(
        "connect storm: pool of 20 full", "ms_to_full_pool", median * 1e3, "ms", "lower"
    )
