"""Peak memory of each client running ``SELECT 1`` from 100 tasks, in a fresh process.

A process's peak RSS is a high-water mark: measured in one process, the
library that needs most would hide the others. So each client runs in a
child process of its own (``peak_rss.py``) that imports only its library,
opens a pool of 5 and runs ``rss_rounds`` rounds of the 100-task workload.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from clients import Client
from harness import POOL_SIZE, Recorder, Sizes

TASKS = 100
#: Enough for the interpreter to start and the queries to run on a loaded machine.
_CHILD_TIMEOUT = 300


def test_peak_rss(client: Client, server_url: str, recorder: Recorder, sizes: Sizes) -> None:
    """Peak RSS (MB) of a process running the 100-task ``SELECT 1`` workload."""
    command = [
        sys.executable,
        str(Path(__file__).with_name("peak_rss.py")),
        client.name,
        server_url,
        f"--size={POOL_SIZE}",
        f"--tasks={TASKS}",
        f"--ops={sizes.select_ops}",
        f"--rounds={sizes.rss_rounds}",
    ]
    proc = subprocess.run(
        command, capture_output=True, text=True, timeout=_CHILD_TIMEOUT, check=False
    )
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout.splitlines()[-1])
    assert figures["client"] == client.name
    recorder.record(
        f"peak RSS, SELECT 1, {TASKS} tasks", "peak_rss_mb", figures["peak_mb"], "MB", "lower"
    )
