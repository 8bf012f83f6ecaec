# pgsd tasks. Start from a fresh clone with:  . ./activate && just test

set shell := ["bash", "-euo", "pipefail", "-c"]

python := justfile_directory() / ".venv/bin/python"

# list the recipes
default:
    @just --list

# install pgsd with its dev tools and a PostgreSQL server, when missing
setup:
    @bash scripts/setup.sh

# run the whole test suite against a throwaway server (PGSD_TEST_PG=N picks the major), with branch coverage
test *args: setup
    {{python}} -m pytest --cov --cov-report=term {{args}}

# run the version-sensitive tests (-m matrix) on every major, installing missing ones from npm
test-matrix *majors="13 14 15 16 17 18": setup
    #!/usr/bin/env bash
    set -uo pipefail
    export PGSD_INSTALL_PG=1
    # Every major first, so that no download runs inside a test's timeout.
    {{python}} -m pgsd.testing install {{majors}} || exit 1
    log=$(mktemp)
    trap 'rm -f "$log"' EXIT
    summary=() passed=0 failed=0 status=0
    for major in {{majors}}; do
        echo "== PostgreSQL $major: pytest -m matrix"
        PGSD_TEST_PG=$major {{python}} -m pytest -m matrix | tee "$log"
        code=${PIPESTATUS[0]}
        result=$(grep -E ' in [0-9.]+s' "$log" | tail -n 1 | tr -d '=' | sed -E 's/^ +| +$//g')
        count() { grep -oE "[0-9]+ $1" <<<"$result" | grep -oE '^[0-9]+' || echo 0; }
        passed=$((passed + $(count passed)))
        failed=$((failed + $(count failed) + $(count error)))
        if [ "$code" -eq 0 ]; then verdict=ok; else verdict="FAILED (exit $code)"; status=1; fi
        summary+=("PostgreSQL $major: $verdict, ${result:-no result}")
    done
    echo "== test-matrix"
    printf '%s\n' "${summary[@]}"
    echo "test-matrix: $passed passed, $failed failed"
    exit $status

# ruff (lint, format), flake8-async's anyio and trio rules, mypy --strict on src and on the API's typing test
lint: setup
    {{python}} -m ruff check src tests benchmarks loadtest examples
    {{python}} -m ruff format --check src tests benchmarks loadtest examples
    git ls-files -z --cached --others --exclude-standard '*.py' | xargs -0 {{python}} -m flake8_async --anyio \
        --startable-in-context-manager=_run_pool,_watch_signals,_until_signal,request,run_maintenance,run_started_tasks,run_replicas,_keep_open,_read
    {{python}} -m mypy
    {{python}} -m mypy --strict tests/typing

# format the code
fmt: setup
    {{python}} -m ruff format src tests benchmarks loadtest examples
    {{python}} -m ruff check --fix src tests benchmarks loadtest examples

# pgsd check: verify databases (with no config: a throwaway local demo server)
[no-cd]
check *args: setup
    {{justfile_directory()}}/.venv/bin/pgsd check {{args}}

# build the documentation site into site/ (mkdocs.yml: strict, every warning fails the build)
docs: setup
    NO_MKDOCS_2_WARNING=1 {{python}} -m mkdocs build --strict --site-dir site

# serve the documentation site on http://127.0.0.1:8000, rebuilt on every change
docs-serve: setup
    NO_MKDOCS_2_WARNING=1 {{python}} -m mkdocs serve --dev-addr 127.0.0.1:8000

# run the benchmarks against a throwaway server and save the run in .benchmarks/ (PGSD_BENCH_SHORT=1: short form)
bench *args: setup
    {{python}} -m pytest benchmarks --benchmark-autosave {{args}}

# run the benchmarks and compare them with the last saved run
bench-compare *args: setup
    {{python}} -m pytest benchmarks --benchmark-compare {{args}}

# CI: the short form, failing when pgsd falls behind its peers in this run (thresholds in benchmarks/README.md)
bench-ci *args: setup
    {{python}} -m pytest benchmarks --bench-short --bench-gate {{args}}

# stability soak: 1,000,000 acquire/release cycles on each backend, printing cycles/s and RSS (PGSD_SOAK_CYCLES, PGSD_SOAK_SECONDS override)
soak *args: setup
    PGSD_SOAK_CYCLES="${PGSD_SOAK_CYCLES:-1000000}" PGSD_SOAK_SECONDS="${PGSD_SOAK_SECONDS:-1200}" {{python}} -m pytest tests/test_soak.py -m soak -s {{args}}

# Locust smoke, headless, 50 users for 20 s per backend: asyncio with a server restart, trio with a 3 s black hole; each run checked (loadtest/README.md)
loadtest *args: setup
    {{python}} loadtest/_smoke.py standalone {{args}}

# Locust distributed on 127.0.0.1: a master and two workers (asyncio and trio), bounded in time, checked like loadtest
loadtest-distributed *args: setup
    {{python}} loadtest/_smoke.py distributed {{args}}
