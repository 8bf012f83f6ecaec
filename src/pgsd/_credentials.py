"""Passwords that change: a provider called for every new connection, or a command.

`DatabaseConfig.password_provider` is a plain or coroutine function
``(config) -> str``. `fetch_password` calls it for each new connection,
within ``connect_timeout``: a coroutine function on the event loop, a plain
one in a worker thread (so that a slow one blocks nothing). `PasswordCommand`
is the provider that ``password_command`` in a TOML file becomes: it runs a
program (an argument list, no shell) and reads the password from the first
line of its output.

Nothing here ever puts the password in a message: errors name the provider
(for a command, only its program), never what it returned.
"""

from __future__ import annotations

import inspect
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.abc
import anyio.to_thread

from ._errors import ConfigError, PasswordProviderError, redact

if TYPE_CHECKING:
    from ._config import DatabaseConfig

__all__ = [
    "PasswordCommand",
    "PasswordProvider",
    "check_provider",
    "describe",
    "fetch_password",
    "provider_name",
]

#: What `DatabaseConfig.password_provider` holds.
PasswordProvider = Callable[["DatabaseConfig"], "str | Awaitable[str]"]

#: Output kept from a password command: enough for any token, bounded memory.
_MAX_STDOUT: Final = 64 * 1024
_MAX_STDERR: Final = 8 * 1024
#: Characters of the command's error output quoted in a message.
_STDERR_SHOWN: Final = 200


def check_provider(value: object) -> None:
    """Raise `ConfigError` unless *value* is None or callable."""
    if value is not None and not callable(value):
        raise ConfigError(
            f"must be a function (config) -> str, got {type(value).__name__}",
            key="password_provider",
        )


def provider_name(provider: object) -> str:
    """How messages name *provider*: a command by its program, a function by its name."""
    if isinstance(provider, PasswordCommand):
        return f"password command {provider.program!r}"
    return f"password_provider {_qualname(provider)}"


def _qualname(provider: object) -> str:
    name = getattr(provider, "__qualname__", None)
    return name if isinstance(name, str) else type(provider).__qualname__


async def fetch_password(config: DatabaseConfig) -> str:
    """The password from *config*'s provider, within ``connect_timeout``.

    Raises:
        PasswordProviderError: the provider failed, timed out, or returned
            something other than a non-empty string.
    """
    provider = config.password_provider
    assert provider is not None
    name = provider_name(provider)
    limit = config.connect_timeout
    failure: BaseException | None = None
    result: object = None
    with anyio.move_on_after(limit) as scope:
        try:
            if _is_async(provider):
                result = await provider(config)  # type: ignore[misc]
            else:
                result = await anyio.to_thread.run_sync(provider, config, abandon_on_cancel=True)
                if inspect.isawaitable(result):
                    result = await result
        except PasswordProviderError:
            raise
        except Exception as error:
            failure = error
    if scope.cancelled_caught:
        raise _error(config, f"{name} gave no password within {limit:g} s")
    if failure is not None:
        # Summarised, secrets taken out, and not chained: the provider's own
        # error may quote what it read.
        detail = redact(f"{type(failure).__name__}: {failure}")
        raise _error(config, f"{name} failed: {detail}") from None
    if not isinstance(result, str):
        raise _error(config, f"{name} returned {type(result).__name__}, not a str")
    if not result:
        raise _error(config, f"{name} returned an empty password")
    return result


def _is_async(provider: object) -> bool:
    if inspect.iscoroutinefunction(provider):
        return True
    # An object whose __call__ is a coroutine function (`PasswordCommand`).
    return inspect.iscoroutinefunction(type(provider).__dict__.get("__call__"))


def _error(config: DatabaseConfig, detail: str) -> PasswordProviderError:
    return PasswordProviderError(
        detail, database=config.display_name, host=config.host, port=config.port
    )


class PasswordCommand:
    """A password provider that runs a program: ``password_command`` in a TOML file.

    The program is run with the given arguments (no shell), with no input,
    without blocking the event loop; the first line of its output is the
    password. A non-zero exit, no output, or no answer within the bound
    (``timeout``, else the database's ``connect_timeout``) is an error that
    quotes the start of its error output, with the password taken out.

    Raises:
        ConfigError: *argv* is not a non-empty list of non-empty strings, or
            *timeout* is not a positive number.
    """

    __slots__ = ("argv", "timeout")

    def __init__(self, argv: Sequence[str], *, timeout: float | None = None) -> None:
        if isinstance(argv, str) or not isinstance(argv, Sequence) or not argv:
            raise ConfigError(
                "must be a non-empty list of strings: the program and its arguments (no shell)",
                key="password_command",
            )
        for arg in argv:
            if not isinstance(arg, str) or not arg or "\0" in arg:
                raise ConfigError(
                    "each argument must be a non-empty string without NUL characters",
                    key="password_command",
                )
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0
        ):
            raise ConfigError("must be a positive number of seconds", key="password_command")
        self.argv: tuple[str, ...] = tuple(argv)
        self.timeout = timeout

    @property
    def program(self) -> str:
        """The program run (its arguments are never shown: they may hold a token)."""
        return self.argv[0]

    def __repr__(self) -> str:
        return f"PasswordCommand({self.program!r}, {len(self.argv) - 1} arguments)"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PasswordCommand):
            return NotImplemented
        return (self.argv, self.timeout) == (other.argv, other.timeout)

    def __hash__(self) -> int:
        return hash((self.argv, self.timeout))

    async def __call__(self, config: DatabaseConfig) -> str:
        name = provider_name(self)
        limit = self.timeout or config.connect_timeout
        with anyio.move_on_after(limit):
            try:
                status, out, err = await _run(self.argv)
            except OSError as error:
                raise _error(config, f"{name} could not start: {error.strerror}") from None
            password = out.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "replace")
            if status != 0:
                shown = _summary(err, password)
                raise _error(config, f"{name} exited with status {status}{shown}")
            if not password:
                raise _error(config, f"{name} printed no password")
            return password
        raise _error(config, f"{name} gave no password within {limit:g} s (it was stopped)")


async def _run(argv: Sequence[str]) -> tuple[int, bytes, bytes]:
    """Run *argv*; its exit status and the start of its output and error output.

    Cancelled, the process is killed (anyio's `Process` does that on exit).
    """
    kept = [bytearray(), bytearray()]

    async def drain(stream: anyio.abc.ByteReceiveStream, into: bytearray, limit: int) -> None:
        async for chunk in stream:
            if len(into) < limit:
                into += chunk[: limit - len(into)]

    async with await anyio.open_process(
        list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain, process.stdout, kept[0], _MAX_STDOUT)
            tg.start_soon(drain, process.stderr, kept[1], _MAX_STDERR)
            status = await process.wait()
    return status, bytes(kept[0]), bytes(kept[1])


def _summary(err: bytes, password: str) -> str:
    """The first line of the error output, shortened, without the password."""
    text = err.decode("utf-8", "replace").strip()
    if not text:
        return " and no error output"
    line = text.splitlines()[0]
    if password:
        line = line.replace(password, "***")
    line = redact(line)
    if len(line) > _STDERR_SHOWN:
        line = line[:_STDERR_SHOWN] + "..."
    return f": {line}"


def describe(value: Any) -> str:
    """A provider as `DatabaseConfig`'s repr shows it (never a secret)."""
    return repr(value) if isinstance(value, PasswordCommand) else f"<{_qualname(value)}>"
