"""A TCP proxy that puts network faults between a client and a server, for tests.

:class:`FaultProxy` listens on a free port of the loopback interface and
forwards each connection to a target (a PostgreSQL server, say). At any
moment a test can switch it to refuse new connections, reset every
connection, black-hole traffic or delay it, and back. It runs on anyio in a
task group of its own, so it works under asyncio and trio alike.

It works on raw non-blocking sockets rather than anyio streams because a
fault must take effect at the instant :meth:`FaultProxy.set_mode` returns:
stopping to listen and resetting a connection are plain socket calls, made
there and then, not tasks scheduled for later.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
from types import TracebackType
from typing import Any, Final, Literal, get_args

import anyio
import anyio.abc

__all__ = ["FaultProxy", "ProxyMode"]

logger = logging.getLogger("pgsd.testing")

#: What :meth:`FaultProxy.set_mode` accepts.
ProxyMode = Literal["pass", "refuse", "reset", "blackhole", "delay"]

_MODES: Final = frozenset(get_args(ProxyMode))
_CHUNK: Final = 65536
_BACKLOG: Final = 128
# SO_LINGER on, timeout 0: close() sends RST instead of FIN.
_LINGER_RESET: Final = struct.pack("ii", 1, 0)


def _close_socket(sock: socket.socket, *, reset: bool = False) -> None:
    """Close a socket now, waking any task that waits on it.

    With ``reset`` the peer gets an RST (SO_LINGER 0) instead of a FIN.
    """
    if sock.fileno() == -1:
        return
    if reset:
        # A socket already dead has nothing left to do but close.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    # Waiters must be told before the descriptor goes, or the event loop
    # would keep watching a number the next socket may reuse.
    anyio.notify_closing(sock)
    sock.close()


def _new_socket(family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    return sock


def _no_delay(sock: socket.socket) -> None:
    """Forward small writes at once: the proxy must not add Nagle's delays."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Link:
    """One client connection and, once opened, its upstream connection."""

    __slots__ = ("client", "closed", "scope", "upstream")

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.upstream: socket.socket | None = None
        self.closed = False
        self.scope = anyio.CancelScope()

    def close(self, *, reset: bool = False) -> None:
        """Close both sockets (with RST when ``reset``) and stop the link's tasks."""
        if self.closed:
            return
        self.closed = True
        _close_socket(self.client, reset=reset)
        if self.upstream is not None:
            _close_socket(self.upstream, reset=reset)
        self.scope.cancel()

    async def readable(self, sock: socket.socket) -> None:
        """Wait until ``sock`` is readable; raise ClosedResourceError once closed."""
        if self.closed:
            raise anyio.ClosedResourceError
        await anyio.wait_readable(sock)

    async def writable(self, sock: socket.socket) -> None:
        """Wait until ``sock`` is writable; raise ClosedResourceError once closed."""
        if self.closed:
            raise anyio.ClosedResourceError
        await anyio.wait_writable(sock)


class FaultProxy:
    """A TCP proxy (on 127.0.0.1 by default) whose traffic a test can break on demand.

    Use it as an async context manager; point clients at :attr:`host` and
    :attr:`port` (or build their settings from :meth:`dsn_params`)::

        async with FaultProxy(server.host, server.port) as proxy:
            config = pgsd.DatabaseConfig.from_dsn(server.dsn(), **proxy.dsn_params())
            async with pgsd.ConnectionPool(config) as pool:
                proxy.set_mode("blackhole")
                ...

    Modes (see :meth:`set_mode`), each taking effect when ``set_mode``
    returns:

    * ``pass``: forward both ways.
    * ``refuse``: stop listening, so that new connections are refused
      (ECONNREFUSED); established connections go on as before. Leaving this
      mode listens again on the same port.
    * ``reset``: reset (RST) every connection, on both sides, and reset each
      new connection as soon as it is accepted.
    * ``blackhole``: accept new connections and keep every socket open, but
      forward nothing either way (nor open upstream connections); what was
      sent waits, as on a network that drops packets, and flows once another
      mode is chosen.
    * ``delay``: forward, waiting ``connect_delay`` seconds before opening
      each upstream connection and ``latency`` seconds before forwarding
      each chunk of data.

    A PostgreSQL client's cancel requests are connections too: they go
    through the proxy and meet the same faults. Leaving the ``async with``
    closes every socket the proxy holds.

    Args:
        target_host: where to forward connections.
        target_port: the target's port.
        host: the address to listen on (a free port is chosen).
    """

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        #: The port the proxy listens on (0 until it is started).
        self.port = 0
        #: ``anyio.current_time()`` of each client connection accepted, in order.
        self.accept_times: list[float] = []
        self._mode: ProxyMode = "pass"
        self._connect_delay = 0.0
        self._latency = 0.0
        self._links: set[_Link] = set()
        self._listener: socket.socket | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._changed: anyio.Event | None = None
        self._target: tuple[int, Any] | None = None

    def __repr__(self) -> str:
        return (
            f"<FaultProxy {self.host}:{self.port} -> {self.target_host}:{self.target_port}"
            f" {self._mode} connections={self.connections}>"
        )

    async def __aenter__(self) -> FaultProxy:
        """Resolve the target and start listening.

        Raises:
            OSError: the target cannot be resolved, or no port can be bound.
            RuntimeError: the proxy is already running.
        """
        if self._task_group is not None:
            raise RuntimeError("the proxy is already running")
        infos = await anyio.getaddrinfo(self.target_host, self.target_port, type=socket.SOCK_STREAM)
        family, _, _, _, sockaddr = infos[0]
        self._target = (int(family), sockaddr)
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._task_group = tg
        try:
            self._listen()
        except BaseException:
            self._task_group = None
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)  # noqa: ASYNC102 (its tasks are cancelled)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop listening, close every connection and stop the proxy's tasks."""
        tg, self._task_group = self._task_group, None
        if tg is None:
            return
        self._stop_listening()
        for link in list(self._links):
            link.close()
        self._links.clear()
        tg.cancel_scope.cancel()
        await tg.__aexit__(None, None, None)  # noqa: ASYNC102 (its tasks are cancelled)

    # -- public API ----------------------------------------------------------

    @property
    def mode(self) -> ProxyMode:
        """The current mode."""
        return self._mode

    @property
    def connections(self) -> int:
        """The client connections open through the proxy right now.

        A connection the client closes while black-holed is noticed only
        once forwarding resumes (the proxy reads nothing until then).
        """
        return sum(1 for link in self._links if not link.closed)

    def dsn_params(self) -> dict[str, Any]:
        """``host`` and ``port`` of the proxy, to override a DSN's.

        For example ``DatabaseConfig.from_dsn(server.dsn(), **proxy.dsn_params())``.

        Raises:
            RuntimeError: the proxy is not running.
        """
        if self._task_group is None:
            raise RuntimeError("the proxy is not running")
        return {"host": self.host, "port": self.port}

    def set_mode(
        self, mode: ProxyMode, *, connect_delay: float = 0.0, latency: float = 0.0
    ) -> None:
        """Switch to ``mode``; the change is made before this returns.

        Args:
            mode: ``pass``, ``refuse``, ``reset``, ``blackhole`` or ``delay``
                (see the class's description).
            connect_delay: with ``delay``, seconds to wait before opening
                each new upstream connection.
            latency: with ``delay``, seconds to wait before forwarding each
                chunk of data, in either direction.

        Raises:
            ValueError: an unknown mode, a negative delay, or a delay given
                with another mode than ``delay``.
            RuntimeError: the proxy is not running.
            OSError: leaving ``refuse``, the port could not be bound again
                (another socket took it meanwhile).
        """
        self._check_mode(mode, connect_delay, latency)
        if self._task_group is None:
            raise RuntimeError("the proxy is not running")
        previous, self._mode = self._mode, mode
        self._connect_delay = connect_delay
        self._latency = latency
        if mode == "refuse":
            self._stop_listening()
        elif previous == "refuse":
            self._listen()
        if mode == "reset":
            for link in list(self._links):
                link.close(reset=True)
        logger.debug("proxy %s:%s: %s -> %s", self.host, self.port, previous, mode)
        # Wake the tasks that hold traffic back while black-holed.
        event, self._changed = self._changed, None
        if event is not None:
            event.set()

    @staticmethod
    def _check_mode(mode: str, connect_delay: float, latency: float) -> None:
        if mode not in _MODES:
            raise ValueError(f"unknown proxy mode {mode!r}; expected one of {sorted(_MODES)}")
        if connect_delay < 0 or latency < 0:
            raise ValueError("connect_delay and latency must not be negative")
        if mode != "delay" and (connect_delay or latency):
            raise ValueError("connect_delay and latency apply to the 'delay' mode only")

    # -- listening -------------------------------------------------------------

    def _listen(self) -> None:
        """Listen on ``self.port`` (a free port the first time) and start accepting."""
        assert self._task_group is not None
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = _new_socket(family)
        try:
            # Leaving "refuse" binds the same port again, while connections
            # accepted on it may linger in TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(_BACKLOG)
        except BaseException:
            sock.close()
            raise
        self.port = int(sock.getsockname()[1])
        self._listener = sock
        self._task_group.start_soon(self._accept_loop, sock)

    def _stop_listening(self) -> None:
        """Close the listening socket: the kernel refuses new connections from now on."""
        sock, self._listener = self._listener, None
        if sock is not None:
            _close_socket(sock)

    async def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                await anyio.wait_readable(listener)
                client, _ = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except anyio.ClosedResourceError:
                return  # the listener was closed: refusing, or shutting down
            except OSError:
                if listener.fileno() == -1:
                    return  # closed between the wake-up and the accept
                raise  # out of descriptors, say: the test must hear of it
            self.accept_times.append(anyio.current_time())
            client.setblocking(False)
            if self._mode == "reset":
                _close_socket(client, reset=True)
                continue
            _no_delay(client)
            link = _Link(client)
            self._links.add(link)
            assert self._task_group is not None
            self._task_group.start_soon(self._serve, link)

    # -- forwarding ------------------------------------------------------------

    async def _serve(self, link: _Link) -> None:
        try:
            with link.scope:
                if not await self._open_upstream(link):
                    return
                assert link.upstream is not None
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._pump, link, link.client, link.upstream)
                    await self._pump(link, link.upstream, link.client)
        finally:
            link.close()
            self._links.discard(link)

    async def _open_upstream(self, link: _Link) -> bool:
        """Connect to the target (after ``connect_delay``); reset the client on failure."""
        await self._wait_forwarding()
        if self._mode == "delay" and self._connect_delay:
            await anyio.sleep(self._connect_delay)
            await self._wait_forwarding()
        if link.closed:
            return False
        assert self._target is not None
        family, sockaddr = self._target
        sock = link.upstream = _new_socket(family)
        try:
            _no_delay(sock)
            err = sock.connect_ex(sockaddr)
            if err in (errno.EINPROGRESS, errno.EAGAIN):
                await link.writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
        except (OSError, anyio.ClosedResourceError) as ex:
            # As the target would have: the client sees its connection reset.
            logger.debug("proxy %s:%s: upstream connect failed: %s", self.host, self.port, ex)
            link.close(reset=True)
            return False
        return True

    async def _pump(self, link: _Link, source: socket.socket, dest: socket.socket) -> None:
        """Forward one direction until EOF; an error resets the whole link."""
        try:
            while True:
                await self._wait_forwarding()
                await link.readable(source)
                try:
                    data = source.recv(_CHUNK)
                except (BlockingIOError, InterruptedError):
                    continue
                if not data:
                    dest.shutdown(socket.SHUT_WR)  # pass the half-close on
                    return
                await self._wait_forwarding()
                if self._mode == "delay" and self._latency:
                    await anyio.sleep(self._latency)
                await self._send_all(link, dest, data)
        except (OSError, anyio.ClosedResourceError):
            link.close(reset=True)

    @staticmethod
    async def _send_all(link: _Link, sock: socket.socket, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = sock.send(view)
            except (BlockingIOError, InterruptedError):
                await link.writable(sock)
                continue
            view = view[sent:]

    async def _wait_forwarding(self) -> None:
        """Return once the mode lets traffic through (at once unless black-holed)."""
        while self._mode == "blackhole":
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()
