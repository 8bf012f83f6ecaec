"""Value checks for the configuration classes: each raises `ConfigError` naming the field.

``key`` is the field's name, so that the error says which setting is wrong;
the value shown in the message is shortened by `short_repr`, and a password
is never shown.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar

from ._dsn import libpq_text_problem
from ._errors import ConfigError

__all__ = [
    "FrozenMap",
    "check_choice",
    "check_int",
    "check_libpq_text",
    "check_number",
    "check_optional_str",
    "check_password",
    "check_positive",
    "check_sqlstates",
    "check_str",
    "field_default",
    "number_text",
    "short_repr",
]


class _ShortRepr(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:
        try:
            return super().repr_int(x, level)
        except ValueError:
            # repr() refuses integers of more than sys.get_int_max_str_digits() digits.
            return "<an integer too long to show>"


_SHORT_REPR = _ShortRepr()
_SHORT_REPR.maxstring = 80
_SHORT_REPR.maxother = 80


_K = TypeVar("_K")
_V = TypeVar("_V")


class FrozenMap(Mapping[_K, _V]):
    """A read-only, hashable mapping that keeps insertion order."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[_K, _V] | Iterable[tuple[_K, _V]] = ()) -> None:
        self._data: dict[_K, _V] = dict(data)

    def __getitem__(self, key: _K) -> _V:
        return self._data[key]

    def __iter__(self) -> Iterator[_K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self._data == dict(other.items())
        return NotImplemented

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __repr__(self) -> str:
        return repr(self._data)


def short_repr(value: object) -> str:
    """A value for a message: ``repr``, shortened, nested structures cut off. Never raises."""
    return _SHORT_REPR.repr(value)


def number_text(value: float) -> str:
    return f"{value:g}"


def check_int(key: str, value: object, *, minimum: int, maximum: int | None = None) -> None:
    # bool is an int subclass; "max_size = true" is a mistake, not 1.
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value >= minimum
        and (maximum is None or value <= maximum)
    ):
        return
    if maximum is None:
        wanted = f"an integer >= {minimum}"
    else:
        wanted = f"an integer between {minimum} and {maximum}"
    raise ConfigError(f"must be {wanted}, got {short_repr(value)}", key=key)


def check_number(
    key: str,
    value: object,
    *,
    minimum: float,
    exclusive: bool = False,
    below: float | None = None,
) -> float:
    """Check a finite number in range and return it as a float."""
    wanted = f"a number {'>' if exclusive else '>='} {number_text(minimum)}"
    if below is not None:
        wanted += f" and < {number_text(below)}"
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int beyond the float range
            number = math.inf
        in_range = number > minimum if exclusive else number >= minimum
        if math.isfinite(number) and in_range and (below is None or number < below):
            return number
    raise ConfigError(f"must be {wanted}, got {short_repr(value)}", key=key)


def check_optional_str(key: str, value: object, *, non_empty: bool = False) -> None:
    if value is None or (isinstance(value, str) and (value or not non_empty)):
        return
    wanted = "a non-empty string" if non_empty else "a string"
    raise ConfigError(f"must be {wanted}, got {short_repr(value)}", key=key)


def check_str(key: str, value: object) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"must be a string, got {short_repr(value)}", key=key)


def check_password(value: object) -> None:
    if value is not None and not isinstance(value, str):
        # Never echo the value: it may be a secret of the wrong type.
        raise ConfigError(f"must be a string, got {type(value).__name__}", key="password")


def field_default(f: dataclasses.Field[Any]) -> object:
    """A dataclass field's default value (a fresh one from its default factory)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def check_choice(key: str, value: object, choices: tuple[str, ...]) -> None:
    if value is None or value in choices:
        return
    raise ConfigError(f"must be one of {', '.join(choices)}; got {short_repr(value)}", key=key)


def check_libpq_text(key: str, value: object) -> None:
    if isinstance(value, str) and (problem := libpq_text_problem(value)) is not None:
        raise ConfigError(problem, key=key)


def check_positive(key: str, value: object) -> float:
    return check_number(key, value, minimum=0, exclusive=True)


_SQLSTATE = re.compile(r"[0-9A-Z]{2}(?:[0-9A-Z]{3})?")


def check_sqlstates(key: str, value: object) -> tuple[str, ...]:
    """A tuple of SQLSTATE codes or classes, upper-cased; `ConfigError` otherwise."""
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ConfigError(
            f"must be a list of SQLSTATE codes or classes, got {short_repr(value)}",
            key=key,
        )
    codes = []
    for code in value:
        text = code.upper() if isinstance(code, str) else code
        if not isinstance(text, str) or not _SQLSTATE.fullmatch(text):
            raise ConfigError(
                "each must be a SQLSTATE code (5 letters or digits, like '57P01') or a class"
                f" (2, like '08'), got {short_repr(code)}",
                key=key,
            )
        codes.append(text)
    return tuple(codes)
