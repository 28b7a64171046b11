"""``distbert submission run|build|check``: from nothing to a checked submission, the tree from
submission runs, and its checks."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submission", help="build or check an MLPerf submission tree",
                       description="Build an MLPerf submission tree, tarball and summary from "
                                   "`distbert run --mode submission` runs, or check a tree.")
    actions = p.add_subparsers(dest="action", required=True)

    r = actions.add_parser("run", help="calibrate, run every scenario VALID, build and check: one command, resumable",
                           description="From an empty directory to a checked submission tree and tarball: per "
                                       "scenario a calibration run, then submission runs (performance, accuracy, "
                                       "compliance) with LoadGen targets that meet the minimum duration, then the "
                                       "tree for --version's rules, its check, summary.json and plots. Rerun the "
                                       "same command to resume. Takes every `distbert run` flag too.")
    s = r.add_argument_group("submission")
    s.add_argument("--scenarios", help="comma-separated (default: the scenarios --version requires of "
                                       "--system-type, e.g. Offline,SingleStream)")
    s.add_argument("--out", type=Path, required=True, help="the campaign directory (runs/, submission/; the state)")
    _tree_arguments(s)
    s.add_argument("--max-attempts", type=int, default=2,
                   help="submission runs per scenario in this invocation before it stops on an INVALID one "
                        "(default 2)")
    s.add_argument("--calibration-samples", type=int, default=1024,
                   help="Offline calibration: samples to time (default 1024; a calibration under 5 s is repeated "
                        "sized to about 10 s)")
    s.add_argument("--calibration-queries", type=int, default=256,
                   help="SingleStream calibration: queries to time (default 256)")
    from distbert.cli.run import CAMPAIGN_OWNED, add_run_arguments

    run_actions = add_run_arguments(r, skip=CAMPAIGN_OWNED | {"--mlperf-version"})
    for action in run_actions:  # this command's own defaults and meanings
        if action.dest == "execution_mode":
            action.help = "valid (default): the full MLPerf rules; test: short runs for a dry run (--allow-invalid)"
        elif action.dest == "target_qps":
            action.help = ("the first attempt's Offline or Server target instead of a calibration run (not both "
                           "scenarios at once)")
    r.set_defaults(handler=_cmd_run, run_actions=run_actions, execution_mode="valid")

    b = actions.add_parser("build", help="tree + mlperf_submission.tar.gz + summary from run directories")
    b.add_argument("runs", nargs="+", type=Path,
                   help="run directories, one per scenario (closed: Offline, SingleStream)")
    b.add_argument("--out", type=Path, required=True, help="output directory (must not exist or be empty)")
    b.add_argument("--benchmark", default="bert-99", help="bert-99 (default) | bert-99.9")
    _tree_arguments(b)
    b.set_defaults(handler=_cmd_build)

    c = actions.add_parser("check", help="check a submission tree against the MLPerf rules distbert knows")
    c.add_argument("root", type=Path, help="the directory holding closed/ or open/")
    c.add_argument("--csv", type=Path, help="also write one row per result here")
    c.add_argument("--version", default="v6.1", help="the round whose rules apply: v6.1 (default), v6.0, v5.1, "
                                                     "v5.0, v4.1")
    c.set_defaults(handler=_cmd_check)


def _tree_arguments(g: Any) -> None:
    g.add_argument("--submitter", required=True, help="organization name (a directory name)")
    g.add_argument("--system", required=True, help="system name, e.g. 2xH200-distbert (a directory name)")
    g.add_argument("--version", default="v6.1",
                   help="the MLPerf Inference round whose rules, seeds and tree layout apply: v6.1 (default), "
                        "v6.0, v5.1, v5.0 (compliance/ and measurements/ trees), v4.1 (+ TEST05, datacenter)")
    g.add_argument("--division", default="closed", help="closed (default) | open")
    g.add_argument("--system-type", help="edge | datacenter | datacenter,edge (default: edge; v4.1: datacenter)")
    g.add_argument("--system-json", type=Path,
                   help="JSON object of system-description fields distbert cannot measure (cooling, storage type, ...)")
    g.add_argument("--allow-invalid", action="store_true",
                   help="build a dry-run tree from test-mode, partial or random-model runs (the check will fail)")


def _cmd_run(args: argparse.Namespace) -> int:
    from distbert.submission.flow import submission_run

    return submission_run(args)


def _cmd_build(args: argparse.Namespace) -> int:
    from distbert.submission.build import build

    result = build(args.runs, args.out, args.submitter, args.system, args.division, args.benchmark,
                   args.system_json, args.allow_invalid, args.version, args.system_type)
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
    report = check_tree(args.root, args.version)
    _print_report(report)
    if args.csv:
        report.write_csv(args.csv)
    return 0 if report.ok else 1


def _print_report(report) -> None:
    for problem in report.problems:
        print(f"ERROR {problem.path}: {problem.message}")
    for note in report.notes:
        print(f"NOTE {note}")
    print("\n".join(report.summary_lines()))
