"""``distbert``: the command line.

Subcommands, one module each under :mod:`distbert.cli`: ``run`` (a benchmark run in any launch
mode), ``worker`` (join a running coordinator), ``key`` (a session key for it), ``squad features``
and ``accuracy`` (the SQuAD data path), ``download`` (official data and models), ``model make``
(random-weight models) and ``submission build|check``. A command line that starts with a flag is a
``run`` (``mpirun -n 8 distbert --scenario Offline``). User errors print one line and exit with
status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from distbert.cli import download, key, model, squad, submission
from distbert.cli import run as run_cmd
from distbert.cli import worker as worker_cmd
from distbert.cli.logs import setup_logging
from distbert.errors import UserError

SUBCOMMANDS = (run_cmd, worker_cmd, key, squad, download, model, submission)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distbert", description="Distributed MLPerf Inference BERT harness",
                                     epilog="A command line that starts with a flag runs `distbert run`.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.register(sub)
    return parser


def _with_default_command(argv: list[str]) -> list[str]:
    """``distbert --scenario Offline ...`` is ``distbert run --scenario Offline ...``."""
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        return ["run", *argv]
    return argv


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_with_default_command(sys.argv[1:] if argv is None else list(argv)))
    if not logging.getLogger().handlers:
        setup_logging("-")
    try:
        return int(args.handler(args) or 0)
    except UserError as exc:
        print(f"distbert: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distbert: interrupted", file=sys.stderr)
        return 130
