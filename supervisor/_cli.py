"""Command line: ``python -m supervisor [run|submit|status|cancel|serve|demo] ...``.

Exit codes: 0 clean stop, 1 the supervisor gave up (restart budget spent),
2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m supervisor",
        description="A Trio supervisor for self-hosted agent workers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from .controlplane._server import add_serve_arguments

    serve = sub.add_parser(
        "serve",
        help="run the reference control plane (HTTP) alone",
        description="Serve the embedded control-plane store over HTTP for remote workers.",
    )
    add_serve_arguments(serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        from .controlplane._server import cli_serve

        return cli_serve(args)
    parser.print_help(sys.stderr)
    return 2
