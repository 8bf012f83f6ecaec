"""Reading a DSN (a ``postgresql://`` URL or a ``key=value`` string) without showing its password.

libpq parses the DSN; this module turns its failures into `ConfigError`s
whose text keeps out anything that may be a password, quoted or misplaced.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ._errors import ConfigError, is_secret_key

__all__ = ["libpq_text_problem", "may_be_secret", "parse_dsn"]


def libpq_text_problem(text: str) -> str | None:
    """Why libpq cannot take *text* as a value, or None.

    libpq reads C strings: it would silently cut a value at a NUL. psycopg
    encodes conninfo as UTF-8, which has no form for an unpaired surrogate.
    """
    if "\0" in text:
        return "must not contain a NUL character"
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        return f"must be valid Unicode text: an unpaired surrogate at position {exc.start}"
    return None


def parse_dsn(dsn: object) -> dict[str, Any]:
    """libpq's keywords and values in *dsn*.

    Raises:
        ConfigError: *dsn* is not a string, holds a NUL or text that is not
            Unicode, or libpq cannot parse it; the message never quotes a
            part of it that may be a password.
    """
    if not isinstance(dsn, str):
        raise ConfigError(f"must be a string, got {type(dsn).__name__}", key="dsn")
    if (problem := libpq_text_problem(dsn)) is not None:
        raise ConfigError(problem, key="dsn")
    try:
        return dict(conninfo_to_dict(dsn))
    except psycopg.Error as exc:
        detail = _parse_error_detail(str(exc).strip(), dsn)
    except UnicodeDecodeError:
        # libpq decodes a URL's %-escapes to bytes; psycopg reads them as UTF-8.
        detail = "a %-escape in the URL does not spell UTF-8 text"
    # Raised outside the except clause, so that the psycopg error, whose text
    # may quote the DSN, password and all, is not even the hidden __context__.
    raise ConfigError(f"cannot parse the DSN: {detail}", key="dsn") from None


# A fragment of the DSN that libpq quotes in its message: "...".
_QUOTED_FRAGMENT = re.compile(r'"[^"]*"')
_URL_SIGNS = re.compile("[:@]")


def _parse_error_detail(message: str, dsn: str) -> str:
    """libpq's message, less the parts of the DSN it quotes that may hold a password.

    libpq quotes a token, a keyword or the whole URL: with a password out of
    place (a space, a bad %-escape, a mistyped ``://``) that may be the
    password or a piece of it, which no pattern can recognise. So no quoted
    fragment is shown when the DSN may hold a secret, and otherwise none with
    a ``:`` or an ``@`` (a URL's ``user:password@``). One-character fragments
    (``missing "=" after``) are kept.
    """
    everywhere = _may_hold_secret(dsn)
    if '"' in unquote(dsn) and (everywhere or _URL_SIGNS.search(dsn)):
        # Quotes of the DSN's own would blur where libpq's fragments end.
        kind = message.partition('"')[0].rstrip(' :"')
        return f"{kind} (the rest is left out: it may quote a password)"

    def shown(match: re.Match[str]) -> str:
        fragment = match[0]
        if len(fragment) <= 3 or not (everywhere or _URL_SIGNS.search(fragment)):
            return fragment
        return '"***"'

    return _QUOTED_FRAGMENT.sub(shown, message)


def _may_hold_secret(dsn: str) -> bool:
    """Whether *dsn* may spell a secret: a secret keyword, or a URL with a colon (``u:pw@``)."""
    _, url, rest = dsn.partition("://")
    return _has_secret_keyword(dsn) or (bool(url) and ":" in rest)


def may_be_secret(dsn: str, key: str) -> bool:
    """Whether libpq may have read a misplaced password in *dsn* as the value of *key*."""
    if _has_secret_keyword(dsn):
        return True
    _, url, rest = dsn.partition("://")
    if not url:
        return False
    userinfo, at, _ = rest.rpartition("@")
    # "user:pass/word@host" is read as host, port and dbname; "user:password"
    # with "@host" forgotten as "host:port".
    return ":" in userinfo if at else key == "port"


def _has_secret_keyword(dsn: str) -> bool:
    # %-decoded: a URL's query may spell "pass%77ord".
    return any(is_secret_key(word) for word in re.findall(r"\w+", unquote(dsn)))
