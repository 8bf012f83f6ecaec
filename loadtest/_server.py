"""The pgsd server process of the Locust harness.

Locust runs on gevent, whose monkey-patching leaves no event loop that trio
or a plain asyncio can use (``select.epoll`` is gone, the selector is
gevent's). So every Locust process that runs users starts this script in a
clean interpreter: it runs a `pgsd.DatabaseConnector` on asyncio or trio and
answers the users' requests over a Unix socket (framing in ``_wire``).

    python loadtest/_server.py --socket PATH [--backend trio] [--dsn DSN | --config FILE]

Without ``--dsn`` or ``--config`` it starts a throwaway PostgreSQL
(`pgsd.testing.PostgresServer`) and removes it on exit. Once serving it
writes one JSON line on stdout (``{"ready": true, ...}``, or ``{"ready":
false, "error": ...}`` when it cannot start) and sends any later output to
stderr. It exits on SIGTERM or SIGHUP, and, with ``--watch-stdin``, when its
stdin reaches end of file, which happens when the parent closes the pipe or
dies. SIGINT is ignored: a Ctrl-C in the terminal stops Locust, which then
stops this process in order.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, Final, NoReturn

if "gevent" in sys.modules:  # pragma: no cover - a misuse, stated plainly
    raise SystemExit("the pgsd server process must run without gevent; start it with Popen")

import anyio
import anyio.abc

import pgsd
from _fault import FAULT_MODES, FaultSchedule
from _operations import Operations, prepare_table
from _wire import FrameDecoder, ProtocolError, encode
from pgsd.testing import FaultProxy, PostgresServer

logger = logging.getLogger("pgsd.loadtest")

#: How often the parent's pid is checked, in case the stdin pipe is shared.
_PARENT_CHECK_INTERVAL: Final = 1.0
_DEFAULT_NAME: Final = "loadtest"
_APPLICATION_NAME: Final = "pgsd-loadtest"
#: The pool without a config file: 5 connections, like PoolConfig's default,
#: and a 5 s acquire timeout so that a stalled pool shows within a short run.
_HARNESS_POOL: Final = pgsd.PoolConfig(max_size=5, acquire_timeout=5.0)
#: Exit status when the process cannot start (the ready line says why).
EXIT_START_FAILED: Final = 2
_EXPECTED_ERRORS: Final = (pgsd.PgsdError, OSError, ValueError, RuntimeError)
#: Exit status when serving failed after the start.
EXIT_FAILED: Final = 1


@dataclass(frozen=True)
class Target:
    """The database to load, and the server this process owns (if any)."""

    name: str
    config: pgsd.DatabaseConfig
    pool_config: pgsd.PoolConfig
    description: str
    server: PostgresServer | None = None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (the Locust options without their ``--pgsd-`` prefix)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True, help="the Unix socket to serve on")
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--dsn", help="a postgresql:// URL or key=value string")
    target.add_argument("--config", help="a pgsd TOML file")
    parser.add_argument("--db", help="the database of --config (default: its first)")
    parser.add_argument("--pool-size", type=int, help="max_size (default 5, or the file's)")
    parser.add_argument("--acquire-timeout", type=float, help="seconds (default 5, or the file's)")
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--fault", choices=FAULT_MODES, default="none")
    parser.add_argument("--fault-at", type=float, default=10.0)
    parser.add_argument("--fault-duration", type=float, default=3.0)
    parser.add_argument("--parent-pid", type=int, help="exit when this is no longer the parent")
    parser.add_argument("--watch-stdin", action="store_true", help="exit at end of stdin")
    args = parser.parse_args(argv)
    if args.db and not args.config:
        parser.error("--db applies to --config only")
    return args


# -- the target ----------------------------------------------------------------


def _pool_config(base: pgsd.PoolConfig, args: argparse.Namespace) -> pgsd.PoolConfig:
    """``base`` with the size and acquire timeout the command line sets, if any."""
    changes: dict[str, Any] = {}
    if args.pool_size is not None:
        changes.update(max_size=args.pool_size, min_size=min(base.min_size, args.pool_size))
    if args.acquire_timeout is not None:
        changes.update(acquire_timeout=args.acquire_timeout)
    return base.replace(**changes)


def _own_application_name(config: pgsd.DatabaseConfig) -> pgsd.DatabaseConfig:
    """Mark the harness's connections in ``pg_stat_activity``, unless the user chose a name."""
    if config.application_name != "pgsd":
        return config
    return config.replace(application_name=_APPLICATION_NAME)


def resolve_target(args: argparse.Namespace) -> Target:
    """The database to load; starts the embedded server when none is given.

    Raises:
        ConfigError: a bad DSN, file or database name.
        ServerNotFound: no server given and no PostgreSQL binaries installed.
        RuntimeError: the embedded server did not start.
    """
    if args.dsn:
        config = _own_application_name(pgsd.DatabaseConfig.from_dsn(args.dsn))
        pool = _pool_config(_HARNESS_POOL, args)
        return Target(_DEFAULT_NAME, config, pool, f"{_where(config)} (--pgsd-dsn)")
    if args.config:
        return _target_from_file(args)
    server = PostgresServer()
    try:
        server.start()
        config = pgsd.DatabaseConfig.from_dsn(server.dsn(), application_name=_APPLICATION_NAME)
        description = f"embedded PostgreSQL {server.major} on {server.host}:{server.port}"
        return Target(_DEFAULT_NAME, config, _pool_config(_HARNESS_POOL, args), description, server)
    except BaseException:
        server.cleanup()
        raise


def _target_from_file(args: argparse.Namespace) -> Target:
    connector_config = pgsd.load_config(args.config)
    names = list(connector_config.databases)
    name = args.db or (names[0] if names else None)
    if name is None or name not in connector_config.databases:
        known = ", ".join(names) or "none"
        raise pgsd.ConfigError(f"no database {name!r} in {args.config} (configured: {known})")
    config = _own_application_name(connector_config.databases[name])
    pool = _pool_config(connector_config.pool_config(name), args)
    return Target(name, config, pool, f"{_where(config)} ({args.config}, database {name!r})")


def _where(config: pgsd.DatabaseConfig) -> str:
    host = config.host or "(libpq default host)"
    port = f":{config.port}" if config.port else ""
    return f"{config.user or '(default user)'}@{host}{port}/{config.dbname or '(default db)'}"


def _proxy_target(config: pgsd.DatabaseConfig) -> tuple[str, int]:
    """Where the black-hole proxy forwards to: the config's one TCP host.

    Raises:
        ValueError: several hosts, a Unix socket, or no host at all.
    """
    host, port = config.host, config.port or 5432
    if not host or "," in host or host.startswith("/") or not isinstance(port, int):
        raise ValueError(
            f"--pgsd-fault blackhole needs one TCP host and port, got host={host!r} port={port!r}"
        )
    return host, port


# -- serving ---------------------------------------------------------------------


def _remove_file(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def _serve_connection(operations: Operations, stream: anyio.abc.ByteStream) -> None:
    """Answer one user's requests, one at a time, until it closes the socket."""
    decoder = FrameDecoder()
    async with stream:
        while True:
            try:
                request = decoder.next_message()
                if request is None:
                    decoder.feed(await stream.receive())
                    continue
                reply = await operations.run(request)
                await stream.send(encode(reply))
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return  # the user is gone (stopped, or killed mid-request)
            except ProtocolError as exc:
                logger.warning("closing a connection that sent a bad frame: %s", exc)
                return
            except Exception:  # one bad request must not stop the other users' load
                logger.exception("closing a connection after an unexpected error")
                return


async def _watch_parent(scope: anyio.CancelScope, parent_pid: int | None, stdin: bool) -> None:
    """Cancel ``scope`` when stdin reaches EOF or the parent is no longer our parent."""
    while True:
        if parent_pid is not None and os.getppid() != parent_pid:
            logger.warning("the Locust process %s is gone: stopping", parent_pid)
            break
        if stdin:
            with anyio.move_on_after(_PARENT_CHECK_INTERVAL):
                await anyio.wait_readable(sys.stdin.fileno())
                if not os.read(sys.stdin.fileno(), 4096):
                    break  # the parent closed its end, or died
        else:
            await anyio.sleep(_PARENT_CHECK_INTERVAL)
    scope.cancel()


async def _watch_signals(
    scope: anyio.CancelScope, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    try:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                logger.info("got %s: stopping", signal.Signals(signum).name)
                scope.cancel()
                return
    finally:
        # Closing the pool and removing the server are bounded: let them
        # finish rather than die half-way (asyncio would restore SIG_DFL).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


class Announcer:
    """Writes the one ready line on stdout, then points stdout at stderr.

    The parent reads that line; afterwards its pipe reaches end of file, and
    stray output of this process still shows, on stderr.
    """

    def __init__(self) -> None:
        self.done = False

    def __call__(self, info: dict[str, Any]) -> None:
        if self.done:
            return
        self.done = True
        sys.stdout.write(json.dumps(info) + "\n")
        sys.stdout.flush()
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())


async def _open(
    stack: contextlib.AsyncExitStack, args: argparse.Namespace, target: Target
) -> tuple[pgsd.DatabaseConnector, FaultSchedule]:
    """The connector (behind the fault proxy for ``blackhole``) and the fault schedule."""
    config, proxy = target.config, None
    if args.fault == "blackhole":
        host, port = _proxy_target(config)
        proxy = await stack.enter_async_context(FaultProxy(host, port))
        config = config.replace(**proxy.dsn_params())
    fault = FaultSchedule(
        args.fault,
        at=args.fault_at,
        duration=args.fault_duration,
        server=target.server,
        proxy=proxy,
    )
    connector_config = pgsd.ConnectorConfig(
        databases={target.name: config}, pool=target.pool_config
    )
    connector = await stack.enter_async_context(pgsd.DatabaseConnector(connector_config))
    return connector, fault


async def serve(args: argparse.Namespace, target: Target, announce: Announcer) -> None:
    """Run the connector and answer requests until told to stop.

    Raises:
        PoolTimeout: the database cannot be reached at start.
        ValueError: a fault that this target cannot have.
        psycopg.Error: the harness's table cannot be created.
        OSError: the socket cannot be bound.
    """
    async with contextlib.AsyncExitStack() as stack:
        connector, fault = await _open(stack, args, target)
        version = await prepare_table(connector, target.name, args.rows)
        listener = await anyio.create_unix_listener(args.socket)
        stack.callback(_remove_file, args.socket)
        stack.push_async_callback(listener.aclose)
        info = {
            "pid": os.getpid(),
            "backend": args.backend,
            "target": target.description,
            "server_version": version.text.split(" on ")[0],
            "max_size": target.pool_config.max_size,
            "acquire_timeout": target.pool_config.acquire_timeout,
        }
        async with anyio.create_task_group() as tg:
            operations = Operations(
                connector=connector,
                database=target.name,
                rows=args.rows,
                fault=fault,
                task_group=tg,
                info=info,
            )
            # Once the parent reads the ready line it may send SIGTERM at any
            # moment: the receiver must be in place before.
            await tg.start(_watch_signals, tg.cancel_scope)
            tg.start_soon(_watch_parent, tg.cancel_scope, args.parent_pid, args.watch_stdin)
            tg.start_soon(listener.serve, lambda stream: _serve_connection(operations, stream))
            announce({"ready": True, **info, "gevent": "gevent" in sys.modules})


# -- the process -------------------------------------------------------------------


def _exit_on_signal(signum: int, frame: FrameType | None) -> NoReturn:
    # Outside the event loop (starting, stopping): unwind so that the
    # embedded server is removed.
    raise SystemExit(128 + signum)


def _exit_status(exc: BaseException, announce: Announcer) -> int:
    """The exit status for what stopped the process; re-raises anything else.

    A signal while starting or stopping, an error before the ready line (which
    then says why), or an error while serving.
    """
    leaf = _leaf(exc)
    if isinstance(leaf, SystemExit):
        announce({"ready": False, "error": "stopped by a signal while starting"})
        return leaf.code if isinstance(leaf.code, int) else EXIT_FAILED
    if not isinstance(leaf, Exception):
        raise exc
    error = f"{type(leaf).__name__}: {leaf}"
    # Expected failures (a bad DSN, an unreachable server) need no traceback.
    logger.error("stopped: %s", error, exc_info=None if isinstance(leaf, _EXPECTED_ERRORS) else exc)
    if announce.done:
        return EXIT_FAILED
    announce({"ready": False, "error": error})
    return EXIT_START_FAILED


def _leaf(exc: BaseException) -> BaseException:
    """The first non-group exception inside task-group wrapping."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server process; return its exit status."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format=f"pgsd server [{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    announce = Announcer()
    target: Target | None = None
    try:
        target = resolve_target(args)
        anyio.run(serve, args, target, announce, backend=args.backend)
    except BaseException as exc:  # noqa: ASYNC103, ASYNC104 (outside the event loop)
        return _exit_status(exc, announce)  # noqa: ASYNC104 (outside the event loop)
    finally:
        # A second SIGTERM must not cut the removal of the server short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if target is not None and target.server is not None:
            target.server.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
