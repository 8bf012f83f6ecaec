#!/usr/bin/env bash
# Install what the tests need, skipping what is already there:
# pgsd itself with its dev extra in .venv, and a PostgreSQL server.
set -euo pipefail
cd "$(dirname "$0")/.."

python=.venv/bin/python
if [ ! -x "$python" ]; then
    python3 -m venv .venv  # normally made by ./activate already
fi

# Reinstall only when pyproject.toml changed since the last install.
stamp=.venv/.pgsd-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing pgsd and its dev tools into .venv"
    "$python" -m pip install --quiet --disable-pip-version-check -e ".[dev]"
    echo "$want" > "$stamp"
fi

# A PostgreSQL server: the tests start their own from these binaries.
if ! "$python" -c 'from pgsd.testing import find_binaries; find_binaries()' 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing PostgreSQL server binaries with apt-get"
        # Only the binaries: no cluster of its own, no service started.
        mkdir -p /etc/postgresql-common
        echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq postgresql >/dev/null
    else
        echo "setup: no PostgreSQL server found: install one (apt-get install postgresql)" >&2
        echo "       or set PGSD_PG_BINDIR to a directory holding initdb and postgres" >&2
        exit 1
    fi
fi

# PgBouncer: the tests start their own in front of their server, so the
# package's service is kept from starting (policy-rc.d) and stays stopped.
if ! "$python" -c 'from pgsd.testing import PgBouncer; PgBouncer.installed_version()' 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing PgBouncer with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        policy=/usr/sbin/policy-rc.d
        own_policy=
        if [ ! -e "$policy" ]; then
            printf '#!/bin/sh\nexit 101\n' > "$policy"
            chmod 755 "$policy"
            own_policy=1
        fi
        status=0
        { apt-get update -qq && apt-get install -y -qq pgbouncer >/dev/null; } || status=$?
        if [ -n "$own_policy" ]; then
            rm -f "$policy"
        else
            invoke-rc.d pgbouncer stop >/dev/null 2>&1 || true
        fi
        [ "$status" = 0 ] || exit "$status"
    else
        echo "setup: no PgBouncer found: install it (apt-get install pgbouncer)" >&2
        exit 1
    fi
fi
