"""``distbert submission build|check``: the MLPerf submission tree from submission runs, and its checks."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submission", help="build or check an MLPerf submission tree",
                       description="Build an MLPerf submission tree, tarball and summary from "
                                   "`distbert run --mode submission` runs, or check a tree.")
    actions = p.add_subparsers(dest="action", required=True)

    b = actions.add_parser("build", help="tree + mlperf_submission.tar.gz + summary from run directories")
    b.add_argument("runs", nargs="+", type=Path,
                   help="run directories, one per scenario (closed: Offline, SingleStream)")
    b.add_argument("--out", type=Path, required=True, help="output directory (must not exist or be empty)")
    b.add_argument("--submitter", required=True, help="organization name (a directory name)")
    b.add_argument("--system", required=True, help="system name, e.g. 2xH200-distbert (a directory name)")
    b.add_argument("--division", default="closed", help="closed (default) | open")
    b.add_argument("--benchmark", default="bert-99", help="bert-99 (default) | bert-99.9")
    b.add_argument("--system-json", type=Path,
                   help="JSON object of system-description fields distbert cannot measure (cooling, storage type, ...)")
    b.add_argument("--allow-invalid", action="store_true",
                   help="build a dry-run tree from test-mode, partial or random-model runs (the check will fail)")
    b.set_defaults(handler=_cmd_build)

    c = actions.add_parser("check", help="check a submission tree against the MLPerf rules distbert knows")
    c.add_argument("root", type=Path, help="the directory holding closed/ or open/")
    c.add_argument("--csv", type=Path, help="also write one row per result here")
    c.set_defaults(handler=_cmd_check)


def _cmd_build(args: argparse.Namespace) -> int:
    from distbert.submission.build import build

    result = build(args.runs, args.out, args.submitter, args.system, args.division, args.benchmark,
                   args.system_json, args.allow_invalid)
    for path, reasons in result.invalid.items():
        print(f"dry run: {path}: {'; '.join(reasons)}")
    _print_report(result.report)
    print(f"tree: {result.root}\ntarball: {result.tarball}\nsummary: {result.root / 'summary.csv'}")
    return 0 if result.report.ok else 1


def _cmd_check(args: argparse.Namespace) -> int:
    from distbert.errors import UserError
    from distbert.submission.check import check_tree

    if not args.root.is_dir():
        raise UserError(f"{args.root} is not a directory: give the folder that holds closed/ or open/")
    report = check_tree(args.root)
    _print_report(report)
    if args.csv:
        report.write_csv(args.csv)
    return 0 if report.ok else 1


def _print_report(report) -> None:
    for problem in report.problems:
        print(f"ERROR {problem.path}: {problem.message}")
    print("\n".join(report.summary_lines()))
