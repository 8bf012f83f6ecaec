"""Run one scenario on stock psycopg (asyncio) and on pgsd (the test's backend); compare.

psycopg's ``AsyncConnection`` on asyncio is the specification of
``pgsd.Connection``. A parity test writes its scenario once, against the
connection class it is given, and calls :func:`assert_same`:

* the scenario runs first on ``psycopg.AsyncConnection`` under
  ``asyncio.run`` in a worker thread (so that the reference runs on asyncio
  whatever backend the test itself runs on);
* then on ``pgsd.Connection`` in the test's own event loop, asyncio or trio;
* both outcomes, a value or an exception reduced to :class:`Raised`, must be
  equal, and the outcome is returned so that the test can also assert what
  it must be (a test that both could fail in the same way still fails).

Scenarios use psycopg's API and anyio only, never asyncio or trio directly.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import anyio
import anyio.to_thread
import psycopg

import pgsd

#: What a scenario receives: the connection class under test.
ConnectionClass: TypeAlias = type[psycopg.AsyncConnection[Any]]
Scenario: TypeAlias = Callable[..., Awaitable[Any]]

#: Whole scenarios finish well within this on a loaded machine; a hang fails.
SCENARIO_TIMEOUT = 60.0

# Parts of messages that differ between two runs of the same thing.
_ADDRESS = re.compile(r" at 0x[0-9a-f]+")
_TRANSACTION_CLASS = re.compile(r"<(?:psycopg\.AsyncTransaction|pgsd\._connection\._Transaction) ")


@dataclass(frozen=True)
class Raised:
    """An exception, reduced to what psycopg promises: its class, SQLSTATE and message."""

    type: type[BaseException]
    sqlstate: str | None
    message: str

    @classmethod
    def of(cls, exc: BaseException) -> Raised:
        message = _ADDRESS.sub("", str(exc))
        # pgsd's transaction blocks are a subclass of psycopg's; their repr
        # names the class (listed in the README's differences).
        message = _TRANSACTION_CLASS.sub("<AsyncTransaction ", message)
        return cls(type(exc), getattr(exc, "sqlstate", None), message)


async def outcome(scenario: Scenario, cls: ConnectionClass, *args: Any, **kwargs: Any) -> Any:
    """The scenario's value, or :class:`Raised` for the exception it raised."""
    try:
        with anyio.fail_after(SCENARIO_TIMEOUT):
            return await scenario(cls, *args, **kwargs)
    except Exception as exc:
        return Raised.of(exc)


def _reference(scenario: Scenario, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return asyncio.run(outcome(scenario, psycopg.AsyncConnection, *args, **kwargs))


async def on_both(scenario: Scenario, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """(psycopg's outcome on asyncio, pgsd's outcome on the running backend)."""
    reference = await anyio.to_thread.run_sync(_reference, scenario, args, kwargs)
    ours = await outcome(scenario, pgsd.Connection, *args, **kwargs)
    return reference, ours


async def assert_same(scenario: Scenario, *args: Any, **kwargs: Any) -> Any:
    """Fail unless pgsd's outcome equals psycopg's; return the outcome.

    ``args`` and ``kwargs`` go to the scenario, after the connection class.
    """
    reference, ours = await on_both(scenario, *args, **kwargs)
    assert ours == reference, f"pgsd: {ours!r}\npsycopg: {reference!r}"
    return ours


# --- helpers for scenarios -------------------------------------------------------------


async def value_or_raised(awaitable: Awaitable[Any], catch: type[Exception] = psycopg.Error) -> Any:
    """The value of ``awaitable``; or, if it raises ``catch``, that error as :class:`Raised`.

    A scenario records the error as a step and goes on, to show what the
    error left the connection in.
    """
    try:
        return await awaitable
    except catch as exc:
        return Raised.of(exc)


async def attempt(
    awaitable: Awaitable[Any], done: Any = "executed", catch: type[Exception] = psycopg.Error
) -> Any:
    """``done`` once ``awaitable`` has completed; or, as :func:`value_or_raised`, its error."""
    result = await value_or_raised(awaitable, catch)
    return result if isinstance(result, Raised) else done


def tx_status(conn: psycopg.AsyncConnection[Any]) -> str:
    """The connection's transaction status, by name: IDLE, INTRANS, INERROR..."""
    return conn.info.transaction_status.name


#: The error of ``SELECT 1/0``, which scenarios of both halves make fail.
DIVISION_BY_ZERO = Raised(psycopg.errors.DivisionByZero, "22012", "division by zero")
