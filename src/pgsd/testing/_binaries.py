"""Finding PostgreSQL server binaries on this machine."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PostgresBinaries", "ServerNotFound", "find_binaries"]

_INSTALL_HINT = (
    "install a PostgreSQL server (13 or later): on Debian or Ubuntu "
    "'apt-get install postgresql', or set PGSD_PG_BINDIR to a directory "
    "holding initdb, pg_ctl and postgres"
)


class ServerNotFound(RuntimeError):
    """No PostgreSQL server binaries were found on this machine."""


@dataclass(frozen=True, slots=True)
class PostgresBinaries:
    """A directory of PostgreSQL server programs and the major version they are."""

    bindir: Path
    major: int

    def program(self, name: str) -> str:
        """The path of one program (``initdb``, ``pg_ctl``, ``postgres``, ...)."""
        return str(self.bindir / name)


def _major_of(bindir: Path) -> int | None:
    try:
        out = subprocess.run(
            [str(bindir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\) (\d+)", out)
    return int(match.group(1)) if match else None


def _candidate_bindirs() -> Iterator[Path]:
    env = os.environ.get("PGSD_PG_BINDIR")
    if env:
        yield Path(env)
    # Debian and Ubuntu keep each major in its own directory.
    yield from sorted(
        (Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    for pattern in ("/usr/pgsql-*/bin", "/usr/local/pgsql/bin", "/opt/homebrew/bin"):
        yield from (Path(p) for p in sorted(glob.glob(pattern), reverse=True))
    initdb = shutil.which("initdb")
    if initdb:
        yield Path(initdb).resolve().parent


def find_binaries(version: int | None = None) -> PostgresBinaries:
    """Find server binaries: the newest on the machine, or the given major version.

    ``PGSD_PG_BINDIR`` takes precedence when set.

    Raises:
        ServerNotFound: nothing suitable is installed; the message says how
            to install a server.
    """
    seen: set[Path] = set()
    found: list[PostgresBinaries] = []
    for bindir in _candidate_bindirs():
        if bindir in seen or not (bindir / "initdb").exists():
            continue
        seen.add(bindir)
        major = _major_of(bindir)
        if major is None:
            continue
        if version is None or major == version:
            found.append(PostgresBinaries(bindir, major))
    if not found:
        wanted = f"PostgreSQL {version}" if version else "a PostgreSQL server"
        raise ServerNotFound(f"{wanted} was not found on this machine: {_INSTALL_HINT}")
    return max(found, key=lambda b: b.major)
