"""``python -m pgsd``: command-line entry point."""

from __future__ import annotations

import argparse
import sys

from ._demo import run_demo


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen command; return the exit code."""
    parser = argparse.ArgumentParser(prog="pgsd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="connect to a throwaway local PostgreSQL and show what pgsd sees"
    )
    demo.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args(argv)
    return run_demo(args.backend)


if __name__ == "__main__":
    sys.exit(main())
