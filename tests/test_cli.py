"""``pgsd check``: exit codes, the JSON document, config errors, the embedded demo."""

from __future__ import annotations

import datetime
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgsd.testing import PostgresServer, free_port
from support import (
    CLI_TIMEOUT,
    REPORT_KEYS,
    VERSION_KEYS,
    check_document_errors,
    clean_env,
    run_pgsd,
)

BACKENDS = ["asyncio", "trio"]
TIMEOUT = CLI_TIMEOUT


@pytest.fixture
def two_databases(pg_server: PostgresServer, tmp_path: Path) -> Path:
    """A config file: one reachable database, one on a port nobody listens on."""
    path = tmp_path / "pgsd.toml"
    path.write_text(
        f"""
[pool]
max_size = 3
acquire_timeout = 5

[databases.good]
host = "{pg_server.host}"
port = {pg_server.port}
dbname = "postgres"
user = "{pg_server.superuser}"
required = ["database:CONNECT"]

[databases.gone]
host = "127.0.0.1"
port = {free_port()}
dbname = "postgres"
user = "nobody"
connect_timeout = 2
"""
    )
    return path


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_databases_ok_exits_0(pg_server: PostgresServer, tmp_path: Path, backend: str) -> None:
    result = run_pgsd("check", "--backend", backend, pg_server.dsn(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_unreachable_database_beside_a_good_one_exits_1(two_databases: Path, backend: str) -> None:
    result = run_pgsd(
        "check",
        "--backend",
        backend,
        "--config",
        str(two_databases),
        "--json",
        cwd=two_databases.parent,
    )
    assert result.returncode == 1, result.stderr
    document = json.loads(result.stdout)
    assert check_document_errors(document) == []
    by_name = {db["name"]: db for db in document["databases"]}
    assert by_name["good"]["ok"] is True
    assert by_name["gone"]["ok"] is False
    assert "gone" in by_name["gone"]["error"] or "127.0.0.1" in by_name["gone"]["error"]
    assert document["ok"] is False
    assert "Traceback" not in result.stderr


def test_default_config_file_in_the_current_directory_is_used(two_databases: Path) -> None:
    result = run_pgsd("check", "--db", "good", "--json", cwd=two_databases.parent)
    assert result.returncode == 0, result.stderr
    names = [db["name"] for db in json.loads(result.stdout)["databases"]]
    assert names == ["good"]


def test_pgsd_config_environment_variable_names_the_file(
    two_databases: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = clean_env(PGSD_CONFIG=str(two_databases))
    result = run_pgsd("check", "--db", "good", "--json", cwd=elsewhere, env=env)
    assert result.returncode == 0, result.stderr


def test_missing_required_privilege_exits_1(pg_server: PostgresServer, tmp_path: Path) -> None:
    result = run_pgsd(
        "check",
        "--json",
        "--require",
        "table:public.no_such_table:SELECT",
        pg_server.dsn(),
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr
    database = json.loads(result.stdout)["databases"][0]
    assert database["missing"] == ["table:public.no_such_table:SELECT"]
    assert "missing privileges" in database["error"]


def test_json_document_has_a_stable_schema(pg_server: PostgresServer, tmp_path: Path) -> None:
    result = run_pgsd("check", "--json", pg_server.dsn(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert check_document_errors(document) == []
    assert set(document) == {"pgsd", "backend", "ok", "demo", "databases"}
    database = document["databases"][0]
    assert set(database) == REPORT_KEYS | {"missing", "burst", "pool"}
    assert set(database["version"]) == VERSION_KEYS
    assert set(database["permissions"]) >= {"user", "is_superuser", "missing", "ok", "roles"}
    assert set(database["burst"]) == {"queries", "failed", "p50_ms", "max_ms", "error"}
    assert set(database["pool"]) == {
        "state",
        "size",
        "max_size",
        "acquires",
        "timeouts",
        "errors",
        "wait_time_max_ms",
    }
    assert database["burst"]["failed"] == 0
    assert database["version"]["num"] == int(pg_server.execute("SHOW server_version_num")[0][0])
    # The schema refuses what it does not list, so that a new field cannot go undocumented.
    database["new_field"] = 1
    database["pool"]["state"] = "sleepy"
    del database["burst"]["p50_ms"]
    errors = "\n".join(check_document_errors(document))
    assert "'new_field' was unexpected" in errors
    assert "sleepy" in errors
    assert "'p50_ms' is a required property" in errors


@pytest.mark.parametrize(
    ("content", "key"),
    [
        ("[databases.a]\nport = 'abc'\n", "databases.a.port"),
        ("[pool]\nmax_size = 0\n[databases.a]\nhost = 'x'\n", "pool.max_size"),
        ("[databases.a\n", None),
    ],
)
def test_bad_config_file_exits_2_naming_file_and_key(
    tmp_path: Path, content: str, key: str | None
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(content)
    result = run_pgsd("check", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert str(path) in result.stderr or "bad.toml" in result.stderr
    if key is not None:
        assert key in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_database_name_exits_2(two_databases: Path) -> None:
    result = run_pgsd("check", "--db", "nope", cwd=two_databases.parent)
    assert result.returncode == 2
    assert "nope" in result.stderr
    assert "good" in result.stderr


def test_usage_error_exits_2(tmp_path: Path) -> None:
    result = run_pgsd("check", "--backend", "curio", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_unparsable_dsn_exits_2_without_its_password(tmp_path: Path) -> None:
    result = run_pgsd("check", "host=x port=5432 password=s3cr3t-Pa55 'unterminated", cwd=tmp_path)
    assert result.returncode == 2
    assert "s3cr3t-Pa55" not in result.stderr + result.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedded_demo_end_to_end(tmp_path: Path, backend: str) -> None:
    result = run_pgsd("check", "--backend", backend, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert check_document_errors(document) == []
    assert document["demo"] is True
    by_name = {db["name"]: db for db in document["databases"]}
    assert by_name["demo_admin"]["ok"] is True
    assert by_name["demo_reader"]["ok"] is False
    assert by_name["demo_reader"]["missing"] == ["table:app.secrets:SELECT"]
    assert "table:app.public_notes:SELECT" not in by_name["demo_reader"]["missing"]


def test_embedded_demo_table_output(tmp_path: Path) -> None:
    result = run_pgsd("check", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "demo_admin" in result.stdout
    assert "demo_reader" in result.stdout
    assert "throwaway PostgreSQL" in result.stderr


@pytest.fixture
def server_tmpdir() -> Iterator[Path]:
    """A TMPDIR the server's OS user can reach (pytest's tmp_path is private)."""
    path = Path(tempfile.mkdtemp(prefix="pgsd-cli-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_embedded_demo_is_removed_on_ctrl_c(tmp_path: Path, server_tmpdir: Path) -> None:
    tmpdir = server_tmpdir
    env = clean_env(TMPDIR=str(tmpdir))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgsd", "check"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        # The first line says the server is up: interrupt the check then.
        line = proc.stderr.readline()
        assert "throwaway PostgreSQL" in line
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, 130), err
    assert "Traceback" not in err
    assert list(tmpdir.iterdir()) == []  # the server's directory is gone


def test_the_cli_leaves_pgsd_testing_unloaded_until_the_demo_runs() -> None:
    # pgsd.testing brings subprocesses and the binary installer: only the
    # embedded demo needs it, so importing the CLI (as `pgsd check` with a
    # config does) must not load it.
    probe = (
        "import sys, pgsd._cli, pgsd._check; "
        "print(sorted(m for m in sys.modules if m.startswith('pgsd.testing')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        env=clean_env(),
        check=True,
    )
    assert result.stdout.strip() == "[]"


def test_the_version_is_written_once_in_pyproject(tmp_path: Path) -> None:
    import importlib.metadata
    import tomllib

    import pgsd

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    written = tomllib.loads(pyproject.read_text())["project"]["version"]
    assert pgsd.__version__ == importlib.metadata.version("pgsd") == written
    sources = Path(pgsd.__file__).parent.rglob("*.py")
    copies = [path.name for path in sources if f'"{written}"' in path.read_text()]
    assert copies == []
    assert run_pgsd("--version", cwd=tmp_path).stdout.strip() == f"pgsd {written}"


# -- pgsd check --watch ------------------------------------------------------------

#: Refreshes read before stopping the watch.
WATCH_LINES = 3


def _watching(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pgsd", "check", *args],
        cwd=cwd,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    try:
        proc.send_signal(signal.SIGINT)
        return proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_watch_json_prints_one_document_per_refresh_until_ctrl_c(
    pg_server: PostgresServer, tmp_path: Path, backend: str
) -> None:
    proc = _watching(["--watch", "0.1", "--json", "--backend", backend, pg_server.dsn()], tmp_path)
    try:
        assert proc.stdout is not None
        # Each line comes within the watch interval.
        documents = [json.loads(proc.stdout.readline()) for _ in range(WATCH_LINES)]
    finally:
        _, err = _stop(proc)
    assert proc.returncode == 0, err  # Ctrl-C ends a watch, not an error
    assert "Traceback" not in err
    for document in documents:
        assert check_document_errors(document, "pgsd-check-watch") == []
        datetime.datetime.fromisoformat(document["time"])
        [pool] = document["pools"].values()
        assert pool["state"] == "up"
        assert pool["size"] >= 1
        assert set(pool) >= {"max_size", "in_use", "idle", "waiting", "wait_p99_ms"}
        assert pool["wait_p99_ms"] is None or pool["wait_p99_ms"] >= 0


def test_watch_shows_the_checks_then_the_live_table(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    proc = _watching(["--watch", "0.1", pg_server.dsn()], tmp_path)
    try:
        assert proc.stdout is not None
        seen = ""
        for _ in range(200):  # bounded: a line at a time until the live table shows
            seen += proc.stdout.readline()
            if "wait p99" in seen:
                break
    finally:
        out, err = _stop(proc)
    assert proc.returncode == 0, err
    assert "pgsd check (asyncio)" in seen  # the checks' table first
    assert "wait p99" in seen + out


def test_watch_refuses_a_bad_interval(tmp_path: Path) -> None:
    result = run_pgsd("check", "--watch", "0", "postgresql://127.0.0.1:1/x", cwd=tmp_path)
    assert result.returncode == 2
    assert "--watch takes a positive number" in result.stderr


def test_the_changelog_keeps_the_keep_a_changelog_layout() -> None:
    changelog = Path(__file__).resolve().parent.parent / "CHANGELOG.md"
    lines = changelog.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "# Changelog"
    releases = [line for line in lines if line.startswith("## ")]
    assert releases[0] == "## [Unreleased]"
    for heading in releases[1:]:  # "## [1.2.0] - 2027-01-31", newest first
        assert re.fullmatch(r"## \[\d+\.\d+\.\d+\] - \d{4}-\d{2}-\d{2}", heading), heading
    kinds = {line for line in lines if line.startswith("### ")}
    allowed = {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}
    assert kinds <= {f"### {kind}" for kind in allowed}, kinds
    assert kinds  # something is written under the releases
