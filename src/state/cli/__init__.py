"""The ``state`` command line: an argparse tree with thin handlers.

Each leaf command names its handler as ``"module:function"``; the module is imported only when
that command runs, so ``state --help`` stays fast and a broken optional dependency of one command
does not break the others. Handlers take the parsed ``argparse.Namespace`` and return an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from state import __version__
from state.cli import emb as emb_cli
from state.cli import tx as tx_cli
from state.utils.errors import StateError
from state.utils.logging import setup_logging

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="state",
        description="State: perturbation transition (tx) and cell embedding (emb) models.",
    )
    parser.add_argument("--version", action="version", version=f"state {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (repeatable)")
    parser.add_argument("--log-quiet", dest="log_quiet", action="store_true", help="only warnings and errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{emb,tx}")
    emb_cli.add_parser(commands)
    tx_cli.add_parser(commands)
    return parser


def _call_handler(spec: str, args: argparse.Namespace) -> int:
    module_name, func_name = spec.split(":")
    module = importlib.import_module(module_name)
    return int(getattr(module, func_name)(args) or 0)


def run(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(-1 if args.log_quiet else args.verbose)
    try:
        return _call_handler(args.handler, args)
    except StateError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # `state tx train --help | head`: the reader went away; not an error worth a traceback.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        # Disk full, permission denied, a file vanishing mid-run: the user can act on these, so one
        # line naming the file; `state -v ...` shows the traceback.
        if args.verbose > 0:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc} (rerun with -v for details)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
