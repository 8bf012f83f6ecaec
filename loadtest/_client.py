"""The Locust side of the pgsd server process: start it, talk to it, stop it.

Nothing here imports gevent: in a Locust process gevent has patched
``socket``, ``select``, ``subprocess`` and ``threading``, so these blocking
calls yield to other greenlets; elsewhere (tests, scripts) they simply block.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Final

from _wire import Channel

__all__ = ["SERVER_SCRIPT", "ServerOptions", "ServerProcess", "ServerStartError"]

#: The script the server process runs.
SERVER_SCRIPT: Final = Path(__file__).with_name("_server.py")
#: How long the server may take to start: initdb and a first start on a busy machine.
START_TIMEOUT: Final = 120.0
#: How long it may take to stop: closing the pool (close_timeout) and the server.
STOP_TIMEOUT: Final = 30.0


class ServerStartError(RuntimeError):
    """The pgsd server process did not start; the message says why."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerOptions:
    """The server process's settings: the Locust ``--pgsd-*`` options."""

    backend: str = "asyncio"
    dsn: str | None = None
    config: str | None = None
    db: str | None = None
    #: None: 5, or with ``config`` the file's.
    pool_size: int | None = None
    #: None: 5 s, or with ``config`` the file's.
    acquire_timeout: float | None = None
    fault: str = "none"
    fault_at: float = 10.0
    fault_duration: float = 3.0

    def argv(self) -> list[str]:
        """The server script's command line options."""
        args = [
            f"--backend={self.backend}",
            f"--fault={self.fault}",
            f"--fault-at={self.fault_at}",
            f"--fault-duration={self.fault_duration}",
        ]
        for name in ("dsn", "config", "db", "pool_size", "acquire_timeout"):
            value = getattr(self, name)
            if value is not None:
                args.append(f"--{name.replace('_', '-')}={value}")
        return args


class ServerProcess:
    """One pgsd server process, its socket in a private temporary directory.

    The process's stdin is a pipe that this object never writes to: when
    this process closes it, or dies, the server process sees end of file
    and exits, so that no server process outlives its Locust process.
    """

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        #: What the server process said when ready (pid, backend, target...).
        self.info: dict[str, Any] = {}
        self._dir: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._ready = threading.Event()
        self._control: Channel | None = None
        # One request at a time on the control channel, from any greenlet.
        self._control_lock = threading.Lock()

    @property
    def socket_path(self) -> str:
        """The server's Unix socket.

        Raises:
            RuntimeError: the process was not started.
        """
        if self._dir is None:
            raise RuntimeError("the pgsd server process was not started")
        return os.path.join(self._dir, "pgsd.sock")

    @property
    def pid(self) -> int | None:
        """The server process's pid, or None."""
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        """Start the process and wait until it serves; return its ready information.

        Raises:
            ServerStartError: it exited, said it could not start, or said
                nothing within ``timeout`` seconds (it is stopped then).
        """
        self._dir = tempfile.mkdtemp(prefix="pgsd-locust-")
        command = [
            sys.executable,
            str(SERVER_SCRIPT),
            f"--socket={self.socket_path}",
            f"--parent-pid={os.getpid()}",
            "--watch-stdin",
            *self.options.argv(),
        ]
        # stderr is inherited: the server's warnings show in Locust's output.
        self._proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            info: dict[str, Any] = json.loads(self._read_ready_line(timeout))
            if not info.get("ready"):
                raise ServerStartError(f"the pgsd server process could not start: {info['error']}")
        except BaseException:
            self.stop()
            raise
        self.info = info
        self._ready.set()
        return info

    def _read_ready_line(self, timeout: float) -> str:
        assert self._proc is not None
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        data = b""
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerStartError(f"the pgsd server process said nothing in {timeout:.0f} s")
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                code = self._proc.wait(timeout=STOP_TIMEOUT)
                raise ServerStartError(
                    f"the pgsd server process exited ({code}) before serving; see its stderr"
                )
            data += chunk
        return data.split(b"\n", 1)[0].decode()

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the process serves (users may start before it does)."""
        return self._ready.wait(timeout)

    def channel(self, timeout: float) -> Channel:
        """A new connection to the server process, for one user.

        Raises:
            OSError: the socket cannot be reached.
        """
        return Channel(self.socket_path, timeout)

    def control(self, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """A control request (``stats``, ``fault``) on a shared connection.

        Raises:
            ChannelClosed, OSError, TimeoutError: as `Channel.request`.
        """
        with self._control_lock:
            if self._control is None:
                self._control = self.channel(timeout)
            try:
                return self._control.request(message)
            except BaseException:
                self._control = None  # the request closed it; the next one reconnects
                raise

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """Stop the process and remove its directory; return its exit status.

        Closing the process's stdin asks it to stop; SIGTERM follows after
        ``timeout`` seconds, SIGKILL after as long again.
        """
        self._ready.clear()
        with self._control_lock:
            if self._control is not None:
                self._control.close()
                self._control = None
        proc, self._proc = self._proc, None
        code = None
        if proc is not None:
            code = _stop_process(proc, timeout)
        directory, self._dir = self._dir, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
        return code


def _stop_process(proc: subprocess.Popen[bytes], timeout: float) -> int:
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()
