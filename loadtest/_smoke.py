"""Run the Locust harness headless, bounded in time, and check each run.

    python loadtest/_smoke.py standalone [--backend asyncio --backend trio] [--no-fault]
    python loadtest/_smoke.py distributed [--workers asyncio,trio]

``just loadtest`` runs the first (one Locust process per backend, each with
a deliberate fault: a server restart on asyncio, a black hole on trio);
``just loadtest-distributed`` the second (a master and one worker per entry
of ``--workers``, on 127.0.0.1). Every Locust process is stopped (SIGTERM,
then SIGKILL) if it outlives its run time by ``--grace`` seconds. After each
run, `_check_csv` checks the statistics, and every pgsd server process the
logs name must be gone. Logs and CSV files stay in ``--out`` (a temporary
directory, removed when every run passed). Exits 0 when every run passed.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import _check_csv

HERE: Final = Path(__file__).resolve().parent
LOCUST: Final = Path(sys.executable).with_name("locust")
#: The deliberate fault of each backend's smoke run (at +8 s into a 20 s run).
SMOKE_FAULTS: Final = {
    "asyncio": ("--pgsd-fault=restart", "--pgsd-fault-at=8", "--pgsd-fault-duration=1"),
    "trio": ("--pgsd-fault=blackhole", "--pgsd-fault-at=8", "--pgsd-fault-duration=3"),
}
_SERVER_PID: Final = re.compile(r"pgsd server process (\d+):")
_GONE_POLLS: Final = 50
_GONE_POLL_INTERVAL: Final = 0.1


def locust_command(
    *,
    users: int,
    spawn_rate: float,
    run_time: int,
    csv: Path | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """A headless ``locust -f loadtest/`` command line.

    Failures do not change Locust's exit status (``--exit-code-on-error
    0``): the CSV check judges them, so a non-zero status means Locust
    itself failed.
    """
    command = [
        str(LOCUST),
        f"--locustfile={HERE}",
        "--headless",
        f"--users={users}",
        f"--spawn-rate={spawn_rate}",
        f"--run-time={run_time}s",
        "--only-summary",
        "--exit-code-on-error=0",
    ]
    if csv is not None:
        command.append(f"--csv={csv}")
    return command + list(extra)


def start(command: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``command`` with its output (stdout and stderr) in ``log``."""
    with log.open("wb") as file:
        return subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=file, stderr=subprocess.STDOUT
        )


def finish(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """Wait for ``proc``; past ``timeout`` stop it with SIGTERM, then SIGKILL."""
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            print(f"locust {proc.pid} overran its time: sending {sig.name}", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timeout = 30.0
    return proc.wait()


def server_pids_in(output: str) -> list[int]:
    """The pgsd server processes a Locust output reports having started."""
    return [int(pid) for pid in _SERVER_PID.findall(output)]


def server_pids(log: Path) -> list[int]:
    """The pgsd server processes a Locust log file reports having started."""
    return server_pids_in(log.read_text(errors="replace"))


def is_running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (exited, waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def leftover_servers(logs: Sequence[Path]) -> list[int]:
    """The pgsd server processes named in ``logs`` that still run (polled, bounded)."""
    pids = [pid for log in logs for pid in server_pids(log)]
    for _ in range(_GONE_POLLS):
        pids = [pid for pid in pids if is_running(pid)]
        if not pids:
            break
        time.sleep(_GONE_POLL_INTERVAL)
    return pids


def _verdict(name: str, codes: dict[str, int], logs: Sequence[Path], check: list[str]) -> bool:
    """Report one run: exit statuses, leftover server processes, the CSV check."""
    ok = True
    for label, code in codes.items():
        if code != 0:
            print(f"{name}: {label} exited with status {code}")
            ok = False
    if not any(server_pids(log) for log in logs):
        print(f"{name}: no pgsd server process was started")
        ok = False
    leftover = leftover_servers(logs)
    if leftover:
        print(f"{name}: pgsd server processes left running: {leftover}")
        ok = False
    return _check_csv.main(check) == 0 and ok


def run_standalone(args: argparse.Namespace, out: Path, backend: str) -> bool:
    """One Locust process on ``backend``; True when it passed."""
    name = f"standalone-{backend}"
    fault = () if args.no_fault else SMOKE_FAULTS[backend]
    command = locust_command(
        users=args.users,
        spawn_rate=args.spawn_rate,
        run_time=args.run_time,
        csv=out / name,
        extra=[f"--pgsd-backend={backend}", *fault, *args.locust_args],
    )
    print(f"== {name}: {' '.join(command[1:])}", flush=True)
    log = out / f"{name}.log"
    code = finish(start(command, log), args.run_time + args.grace)
    print(log.read_text(errors="replace"), flush=True)
    check = [str(out / name), f"--p95-ms={args.p95_ms}"] + (
        [] if args.no_fault else ["--expect-fault"]
    )
    return _verdict(name, {"locust": code}, [log], check)


def run_distributed(args: argparse.Namespace, out: Path) -> bool:
    """A master and one worker per backend of ``--workers``; True when it passed."""
    from pgsd.testing import free_port

    backends = [b for b in args.workers.split(",") if b]
    port = free_port()
    master_command = locust_command(
        users=args.users,
        spawn_rate=args.spawn_rate,
        run_time=args.run_time,
        csv=out / "distributed",
        extra=[
            "--master",
            "--master-bind-host=127.0.0.1",
            f"--master-bind-port={port}",
            f"--expect-workers={len(backends)}",
            # Each worker starts its server process (and server) first.
            "--expect-workers-max-wait=120",
            *args.locust_args,
        ],
    )
    print(f"== distributed: {' '.join(master_command[1:])}", flush=True)
    logs = {"master": out / "master.log"}
    procs = {"master": start(master_command, logs["master"])}
    for index, backend in enumerate(backends, 1):
        label = f"worker{index}-{backend}"
        command = [
            str(LOCUST),
            f"--locustfile={HERE}",
            "--worker",
            "--master-host=127.0.0.1",
            f"--master-port={port}",
            f"--pgsd-backend={backend}",
            *args.locust_args,
        ]
        print(f"   {label}: {' '.join(command[1:])}", flush=True)
        logs[label] = out / f"{label}.log"
        procs[label] = start(command, logs[label])
    # The master waits for its workers (up to 120 s), runs, then tells them to quit.
    codes = {"master": finish(procs["master"], 120 + args.run_time + args.grace)}
    for label, proc in procs.items():
        if label != "master":
            codes[label] = finish(proc, args.grace)
    print(logs["master"].read_text(errors="replace"), flush=True)
    check = [str(out / "distributed"), f"--p95-ms={args.p95_ms}", f"--processes={len(backends)}"]
    ok = _verdict("distributed", codes, list(logs.values()), check)
    if not ok:
        for label, log in logs.items():
            if label != "master":
                print(f"-- {label}\n{log.read_text(errors='replace')}")
    return ok


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; Locust options follow a ``--``."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Locust options may follow a --."
    )
    parser.add_argument("mode", choices=("standalone", "distributed"))
    parser.add_argument("--backend", action="append", choices=("asyncio", "trio"))
    parser.add_argument("--workers", default="asyncio,trio", help="one worker per backend listed")
    parser.add_argument("--no-fault", action="store_true", help="standalone runs without a fault")
    parser.add_argument("-u", "--users", type=int, default=50)
    parser.add_argument("-r", "--spawn-rate", type=float, default=25)
    parser.add_argument("-t", "--run-time", type=int, default=20, help="seconds")
    parser.add_argument("--grace", type=float, default=60, help="seconds past the run time")
    parser.add_argument("--p95-ms", type=float, default=_check_csv.DEFAULT_P95_MS)
    parser.add_argument("--out", type=Path, help="keep logs and CSV files here")
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after "--" goes to Locust untouched.
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.locust_args = argv[split + 1 :]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the smoke; return its exit status."""
    args = parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="pgsd-loadtest-"))
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if args.mode == "standalone":
        results = [run_standalone(args, out, b) for b in args.backend or ["asyncio", "trio"]]
    else:
        results = [run_distributed(args, out)]
    passed = all(results)
    verdict = "passed" if passed else "FAILED"
    print(f"loadtest {args.mode}: {verdict} in {time.monotonic() - started:.0f} s")
    if passed and args.out is None:
        shutil.rmtree(out, ignore_errors=True)
    else:
        print(f"logs and CSV files: {out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
