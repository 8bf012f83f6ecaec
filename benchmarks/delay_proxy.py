"""Runs `pgsd.testing.FaultProxy` in ``delay`` mode, in a process of its own.

The connect-storm scenario puts this proxy between each pool and the
server. In its own process the proxy's work is charged to no client under
test and does not compete for that client's interpreter lock: like a slow
network, it is outside the program being measured.

Usage: ``python delay_proxy.py TARGET_HOST TARGET_PORT CONNECT_DELAY``. Prints
the port it listens on (127.0.0.1), then forwards until its standard input
is closed.
"""

from __future__ import annotations

import argparse
import sys

import anyio
import anyio.to_thread

from pgsd.testing import FaultProxy


async def serve(target_host: str, target_port: int, connect_delay: float) -> None:
    """Forward to the target, each new connection after ``connect_delay`` s, until stdin ends."""
    async with FaultProxy(target_host, target_port) as proxy:
        proxy.set_mode("delay", connect_delay=connect_delay)
        print(proxy.port, flush=True)
        # The parent closes our stdin to stop us.
        await anyio.to_thread.run_sync(sys.stdin.read)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("target_host")
    parser.add_argument("target_port", type=int)
    parser.add_argument("connect_delay", type=float)
    args = parser.parse_args()
    anyio.run(serve, args.target_host, args.target_port, args.connect_delay)


if __name__ == "__main__":
    main()
