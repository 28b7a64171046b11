"""``python -m distbert.cli.docs``: write ``docs/cli.md``, the command-line reference, from the parsers.

The reference is generated, never written by hand, so it cannot drift from ``distbert ... --help``:
every subcommand (nested ones too: ``submission run``, ``model make`` ...) gets its help line, its
description and one table per argument group (flag, default, meaning), all taken from the argparse
objects that :func:`distbert.cli.main.build_parser` builds. ``--check`` compares instead of writing
and exits 1 with one line when the file is stale; ``tests/test_cli_docs.py`` runs that check and also
reads every flag out of the real ``--help`` texts.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from distbert.cli.main import build_parser

DEFAULT_OUT = Path("docs") / "cli.md"

HEADER = """\
# Command-line reference

Generated from distbert's argparse parsers by `python -m distbert.cli.docs` (run it after changing a
flag; `tests/test_cli_docs.py` fails when this page is stale or misses a flag). The same text, per
command, is `distbert <command> --help`. A command line that starts with a flag is a `distbert run`
(`mpiexec -n 8 distbert --scenario Offline ...`). Every user error is one line, `distbert: error: ...`,
with exit status 2. Back to the [README](../README.md); the run directory a run writes is in
[run-directory.md](run-directory.md), the submission commands are explained in
[submission.md](submission.md).
"""


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("distbert",),
             summary: str = "") -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, str]]:
    """``(command path, parser, one-line help)`` for ``parser`` and every subcommand below it, depth first."""
    yield path, parser, summary
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name), helps.get(name, ""))


def _cell(text: str) -> str:
    """One table cell: one line, pipes escaped."""
    return re.sub(r"\s+", " ", text).strip().replace("|", "\\|")


def _flag(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}` (positional)"
    flags = ", ".join(f"`{s}`" for s in action.option_strings)
    if isinstance(action.metavar, str):
        flags += f" `{action.metavar}`"
    return flags


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    default = action.default
    if default is False and action.nargs == 0:
        return "off"   # a switch
    if default is None or default is argparse.SUPPRESS:
        return "-"
    if isinstance(default, list | tuple):
        return ", ".join(f"`{d}`" for d in default) if default else "-"
    return f"`{default}`"


def _meaning(action: argparse.Action, formatter: argparse.HelpFormatter) -> str:
    text = formatter._expand_help(action) if action.help else ""
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        text += f" (one of: {', '.join(str(c) for c in action.choices)})"
    return text


def _groups(parser: argparse.ArgumentParser) -> Iterator[tuple[str, list[argparse.Action]]]:
    for group in parser._action_groups:
        actions = [a for a in group._group_actions
                   if not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)
                   and a.help is not argparse.SUPPRESS]
        if actions:
            yield group.title or "", actions


def _section(path: tuple[str, ...], parser: argparse.ArgumentParser, summary: str) -> list[str]:
    name = " ".join(path)
    out = [f"## `{name}`", ""]
    for text in (summary, parser.description or "", parser.epilog or ""):
        if text and text not in out:
            out += [re.sub(r"\s+", " ", text).strip(), ""]
    subs = [(n, sp) for a in parser._actions if isinstance(a, argparse._SubParsersAction)
            for n, sp in a.choices.items()]
    if subs:
        out += ["Subcommands: " + ", ".join(f"[`{n}`](#{_anchor((*path, n))})" for n, _ in subs) + ".", ""]
    formatter = parser._get_formatter()
    groups = list(_groups(parser))
    for title, actions in groups:
        if title not in ("options", "optional arguments", "positional arguments") or len(groups) > 1:
            out += [f"**{title}**", ""]
        out += ["| flag | default | meaning |", "|---|---|---|"]
        out += [f"| {_flag(a)} | {_cell(_default(a))} | {_cell(_meaning(a, formatter))} |" for a in actions]
        out.append("")
    return out


def _anchor(path: tuple[str, ...]) -> str:
    """GitHub's anchor for the heading ``## `distbert a b` ``."""
    return "-".join(path)


def render() -> str:
    """The whole of docs/cli.md."""
    lines = [HEADER]
    for path, parser, summary in commands(build_parser()):
        lines += _section(path, parser, summary)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m distbert.cli.docs", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the file to write (default docs/cli.md)")
    ap.add_argument("--check", action="store_true", help="exit 1 if the file differs from the parsers; write nothing")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.is_file() else None
        if current != text:
            print(f"distbert: error: {args.out} is stale: run python -m distbert.cli.docs", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
