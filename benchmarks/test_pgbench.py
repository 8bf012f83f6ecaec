"""pgbench on the same server: the C client's ceiling for ``SELECT 1``.

``pgbench -M prepared -c 5 -j 1`` runs a one-line script, ``SELECT 1;``, for
a fixed time: five connections, as the pools have, driven by one thread, as
each pool is by one event loop. Each pool's ``SELECT 1`` figures are then
given as a share of pgbench's.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from harness import POOL_SIZE, Recorder, Sizes
from pgsd.testing import PostgresServer
from report import PGBENCH, Result

#: pgbench's summary line (PostgreSQL 14 and later; 13 adds "excluding
#: connections establishing" instead).
_TPS = re.compile(r"^tps = ([0-9.]+) \((?:without initial connection time|excluding)", re.M)
#: Beyond its run time, how long pgbench may take to connect and report.
_MARGIN = 60


def test_pgbench(
    pg_server: PostgresServer,
    results: list[Result],
    sizes: Sizes,
    tmp_path: Path,
) -> None:
    """``SELECT 1`` per second from pgbench with as many connections as the pools."""
    script = tmp_path / "select1.sql"
    script.write_text("SELECT 1;\n")
    command = [
        pg_server.binaries.program("pgbench"),
        "--no-vacuum",  # no pgbench tables here: the script needs none
        "--protocol=prepared",
        f"--client={POOL_SIZE}",
        "--jobs=1",
        f"--time={sizes.pgbench_seconds}",
        f"--file={script}",
        f"--host={pg_server.host}",
        f"--port={pg_server.port}",
        f"--username={pg_server.superuser}",
        "postgres",
    ]
    proc = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=sizes.pgbench_seconds + _MARGIN,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    match = _TPS.search(proc.stdout)
    assert match is not None, proc.stdout
    recorder = Recorder(PGBENCH, results)
    recorder.record(
        f"pgbench -M prepared -c {POOL_SIZE} -j 1, SELECT 1",
        "ops_per_s",
        float(match.group(1)),
        "ops/s",
        "higher",
    )
