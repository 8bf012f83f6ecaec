"""What the throwaway services share: a temporary directory, an OS user, a child process.

PostgreSQL and PgBouncer refuse to run as root, so when the test run is
root they run as an unprivileged user (``postgres`` when it exists, else
``nobody``), in a temporary directory that user owns. Each runs in the
foreground as our own child, so that stopping it is a signal and a wait,
and a ``kill -9`` leaves no zombie behind.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import psycopg

from ._binaries import ServerNotFound

__all__ = ["ServiceProcess", "free_port", "server_user"]

#: libpq variables that must not reach the services or their tools.
_LIBPQ_ENV = ("PGHOST", "PGPORT", "PGDATA", "PGUSER", "PGDATABASE", "PGPASSWORD")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def server_user() -> pwd.struct_passwd | None:
    """The OS user to run services as: None means the current user.

    Raises:
        ServerNotFound: the run is root and no unprivileged user exists.
    """
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise ServerNotFound("running as root and neither 'postgres' nor 'nobody' exists")


class ServiceProcess:
    """A service in a temporary directory, run as our child, on 127.0.0.1.

    Subclasses define :meth:`start`, :meth:`_probe` (raises
    ``psycopg.OperationalError`` until the service accepts connections) and
    :attr:`_logfile`; :meth:`stop` sends ``_stop_signal``.
    """

    host = "127.0.0.1"
    _name = "service"
    _start_timeout = 60.0
    _stop_timeout = 60.0
    _stop_signal = signal.SIGINT

    def __init__(self) -> None:
        self.port = 0
        self._base: Path | None = None
        self._user = server_user()
        self._proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the process is running."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the service and wait until it accepts connections."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the service (its stop signal, killed after a bound); keep its files."""
        self._stop_with(self._stop_signal)

    def kill(self) -> None:
        """``kill -9`` the process, as a crash would; its files stay."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=30)

    def cleanup(self) -> None:
        """Stop the service and remove its directory."""
        try:
            self._shutdown()
        finally:
            if self._base is not None:
                shutil.rmtree(self._base, ignore_errors=True)
                self._base = None

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def log(self) -> str:
        """The service's log so far."""
        try:
            return self._logfile.read_text(errors="replace")
        except (OSError, RuntimeError):
            return ""

    # -- for subclasses --------------------------------------------------

    @property
    def _logfile(self) -> Path:
        raise NotImplementedError

    def _probe(self) -> None:
        raise NotImplementedError

    def _shutdown(self) -> None:
        """How :meth:`cleanup` stops the service."""
        self.stop()

    def _make_base(self, prefix: str) -> Path:
        """The service's temporary directory, owned by its OS user."""
        base = Path(tempfile.mkdtemp(prefix=prefix))
        self._chown(base)
        self._base = base
        return base

    def _chown(self, path: Path) -> None:
        if self._user is not None:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def _popen_kwargs(self) -> dict[str, Any]:
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        for var in _LIBPQ_ENV:
            env.pop(var, None)
        kwargs: dict[str, Any] = {"cwd": self._base, "env": env}
        if self._user is not None:
            kwargs.update(user=self._user.pw_uid, group=self._user.pw_gid, extra_groups=[])
        return kwargs

    def _spawn(self, cmd: list[str], output: IO[bytes] | int = subprocess.DEVNULL) -> None:
        """Start the process in the foreground and wait until :meth:`_probe` passes.

        Raises:
            RuntimeError: it exited, or did not answer within the start
                timeout; its log is in the message.
        """
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT if output != subprocess.DEVNULL else subprocess.DEVNULL,
            start_new_session=True,
            **self._popen_kwargs(),
        )
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                raise RuntimeError(f"{self._name} exited at start:\n{self.log()[-4000:]}")
            try:
                self._probe()
            except psycopg.OperationalError:
                time.sleep(0.05)
            else:
                return
        self.kill()
        raise RuntimeError(
            f"{self._name} did not start in {self._start_timeout:g} s:\n{self.log()[-4000:]}"
        )

    def _stop_with(self, sig: signal.Signals) -> None:
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=self._stop_timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._proc = None
