"""``distbert submission run``: the flags, the campaign in any launch mode, the tree, the summary.

The campaign (:mod:`distbert.submission.campaign`) makes one accepted run per scenario; this module
turns the command line into the flags of each ``distbert run``, chooses how the runs are started
(child processes; under a launcher, child coordinators the launched ranks join), builds the tree
(:mod:`distbert.submission.build`) into ``OUT/submission/`` and writes ``summary.json`` and one
plot per scenario beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distbert.errors import UserError
from distbert.submission.rules import RuleSet, rules

if TYPE_CHECKING:
    from distbert.backends.base import BackendSpec
    from distbert.config import RunConfig

log = logging.getLogger(__name__)

#: run flags the campaign sets itself on each run (the user's value is the first attempt's, or none)
_CAMPAIGN_SETS = ("--execution-mode", "--target-qps")


def run_flags(args: argparse.Namespace, actions: list[argparse.Action]) -> list[str]:
    """The ``distbert run`` flags the user gave (those that differ from their defaults), in order."""
    out: list[str] = []
    for action in actions:
        flag = action.option_strings[0]
        value = getattr(args, action.dest, None)
        if flag in _CAMPAIGN_SETS or value is None or value == action.default:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            out.append(flag)
        elif isinstance(action, argparse.BooleanOptionalAction):
            out.append(flag if value else action.option_strings[1])
        elif isinstance(action, argparse._AppendAction):
            for item in value:
                out += [flag, str(item)]
        else:
            out += [flag, str(value)]
    return out


def dry_run_reasons(args: argparse.Namespace, backend: BackendSpec) -> list[str]:
    """What would make the campaign's tree a dry run (the build refuses it without --allow-invalid),
    known before any run starts. ``backend``: the spec the runs' flags parse to."""
    from distbert.backends import HARNESS
    from distbert.backends.modelmaker import is_random_model, random_model_dir
    from distbert.run.rank0 import resolve_model

    reasons = []
    if args.execution_mode == "test":
        reasons.append("--execution-mode test makes short runs")
    if args.max_examples:
        reasons.append(f"--max-examples {args.max_examples} is not the whole dev set")
    if args.min_duration_ms is not None and args.min_duration_ms < 600_000:
        reasons.append(f"--min-duration-ms {args.min_duration_ms} is below the rules' 600000")
    if backend.name in HARNESS:
        reasons.append(f"--backend {backend.name} runs no model")
    else:
        model = resolve_model(backend, generate=False).model or ""
        if Path(model).resolve().is_relative_to(random_model_dir("x", "x").parent.resolve()):
            reasons.append(f"no official model is cached, so the runs would use a random-weight model ({model}); "
                           "fetch it with `distbert download model` or give --model")
        elif is_random_model(model):
            reasons.append(f"--model {model} is a random-weight model (`distbert model make`): its accuracy "
                           "means nothing")
    return reasons


def run_hosts(args: argparse.Namespace, hosts: Sequence[str]) -> list[str]:
    """The hosts the runs will span, known before any: ``hosts`` (rank 0's and the launched ranks');
    external workers (``--expect-workers``) on a non-loopback ``--listen`` address may join from
    anywhere, so they count as another host."""
    spanned = list(dict.fromkeys(hosts))
    listen = str(args.listen or "")
    if args.expect_workers and not listen.startswith(("ipc://", "tcp://127.", "tcp://localhost", "tcp://[::1]")):
        spanned.append(f"external workers at --listen {listen or '(any)'}")
    return spanned


def _check_system_fields(args: argparse.Namespace, given: dict[str, Any], hosts: Sequence[str]) -> None:
    """The system-description fields no run can measure must be in --system-json before hours of runs:
    the build asks the same function (``required_system_fields``) of the runs' records. Every worker
    runs on ``--device``."""
    from distbert.submission.build import missing_system_fields, required_system_fields

    missing = missing_system_fields(required_system_fields(run_hosts(args, hosts), [args.device]), given)
    if missing:
        where = f"--system-json {args.system_json}" if args.system_json else "a --system-json file"
        raise UserError(f"{where} must give {missing}: the system description needs them, e.g. "
                        "{\"cooling\": \"air\", ...}")


def _check_run_flags(flags: list[str], scenario: str, execution_mode: str) -> RunConfig:
    """Parse the flags as ``distbert run`` would for a submission run (bad flags fail here, before
    any run starts)."""
    from distbert.cli.main import build_parser
    from distbert.cli.run import config_from_args

    parser = build_parser()
    try:
        ns = parser.parse_args(["run", *flags, "--scenario", scenario, "--mode", "submission",
                                "--execution-mode", execution_mode])
    except SystemExit as exc:  # argparse has printed why
        raise UserError(f"a `distbert run` flag above is not valid: {' '.join(flags)}") from exc
    return config_from_args(ns)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the pre-flight settled: the runs' flags and the tree's shape."""

    scenarios: list[str]
    flags: list[str]
    rule_set: RuleSet
    system_type: str


def preflight(args: argparse.Namespace, distributed: bool, hosts: Sequence[str]) -> Plan:
    """Every check that needs no run, before the first one (rank 0 only under a launcher: the files
    it reads, like --system-json or the model cache, may exist on rank 0's node alone). ``hosts``:
    every launched rank's host (rank 0's alone without a launcher)."""
    from distbert.submission.build import check_tree_args, read_system_json

    rule_set = rules(args.version)
    system_type = args.system_type or rule_set.default_system_type
    benchmark = args.benchmark
    required = check_tree_args(args.submitter, args.system, args.division, benchmark, rule_set, system_type)
    system_fields = read_system_json(args.system_json)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()] if args.scenarios else list(required)
    for s in scenarios:
        if s not in ("Offline", "SingleStream", "Server"):
            raise UserError(f"--scenarios: unknown scenario {s!r} (Offline, SingleStream, Server)")
    if not scenarios:
        raise UserError(f"--scenarios {args.scenarios!r}: name at least one of Offline, SingleStream, Server")
    if args.division == "closed" and sorted(scenarios) != sorted(required):
        raise UserError(f"--scenarios {','.join(scenarios)}: closed {benchmark} under {args.version} ({system_type}) "
                        f"needs exactly {','.join(required)}")
    if args.execution_mode not in ("valid", "test"):
        raise UserError(f"--execution-mode {args.execution_mode}: valid (default) or test")
    if args.execution_mode == "test" and not args.allow_invalid:
        raise UserError("--execution-mode test makes short runs that are never a result: add --allow-invalid for "
                        "a dry-run tree, or drop --execution-mode test for the real (600 s per run) submission")
    if args.max_attempts < 1:
        raise UserError("--max-attempts must be at least 1")
    if args.target_qps == "auto":
        raise UserError("--target-qps auto: submission run calibrates the target itself; give a number (the first "
                        "attempt's target) or leave it out")
    if args.target_qps is not None and {"Offline", "Server"} <= set(scenarios):
        raise UserError("--target-qps would be both Offline's and Server's first target: leave it out (calibration "
                        "sets each), or run the two scenarios in separate invocations")
    flags = [*run_flags(args, args.run_actions), "--mlperf-version", args.version]
    if distributed:
        if args.transport != "zmq":
            raise UserError("submission run under a launcher starts each run as its own coordinator that the "
                            "launched ranks join over ZeroMQ: drop --transport mpi")
        if args.in_process_worker:
            raise UserError("--in-process-worker is for a run without a launcher")
    configs = [_check_run_flags(flags, s, args.execution_mode) for s in dict.fromkeys(scenarios)]
    dry = dry_run_reasons(args, configs[0].backend)
    if dry and not args.allow_invalid:
        raise UserError(f"this campaign cannot make a submission: {'; '.join(dry)}; fix that, or add "
                        "--allow-invalid for a dry-run tree")
    if not args.allow_invalid:
        _check_system_fields(args, system_fields, hosts)
    return Plan(scenarios, flags, rule_set, system_type)


def submission_run(args: argparse.Namespace) -> int:
    from distbert import topology as topo_mod
    from distbert.submission.campaign import Campaign, LaunchedSteps, launched_worker_loop, subprocess_runner

    topology = topo_mod.detect()

    def campaign(plan: Plan, runner: Any) -> dict[str, Path]:
        args.out.mkdir(parents=True, exist_ok=True)
        return Campaign(args.out, plan.scenarios, plan.flags, plan.rule_set, execution_mode=args.execution_mode,
                        max_attempts=args.max_attempts,
                        first_target_qps=args.target_qps if isinstance(args.target_qps, float) else None,
                        calibration_samples=args.calibration_samples, calibration_queries=args.calibration_queries,
                        probe_s=args.find_peak_probe_s, runner=runner, allow_invalid=args.allow_invalid).run()

    if not topology.distributed:
        plan = preflight(args, distributed=False, hosts=[topology.host])
        return finish(args, args.out, campaign(plan, subprocess_runner), plan.system_type)

    import mpi4py

    mpi4py.rc.finalize = False
    from mpi4py import MPI

    from distbert.run.launch import finalize_mpi

    code = 1
    try:
        comm = MPI.COMM_WORLD
        hosts = comm.allgather(topology.host)   # for the pre-flight: does the campaign span hosts?
        if topology.rank != 0:   # the launched ranks only serve: rank 0 checks, decides and says when to stop
            code = launched_worker_loop(topology, comm)
            return code
        from distbert.util.net import host_address

        steps = LaunchedSteps(comm, args.bind_host or host_address(), args.coordinator_hosts_worker,
                              topology.local_rank, topology.local_size)
        try:
            plan = preflight(args, distributed=True, hosts=hosts)
            accepted = campaign(plan, steps)
        except BaseException as exc:
            steps.done(error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise
        steps.done()
        code = finish(args, args.out, accepted, plan.system_type)
        return code
    except UserError as exc:
        print(f"distbert: error: {exc}", file=sys.stderr)
        code = 2
        return code
    finally:
        finalize_mpi(MPI, code)


def finish(args: argparse.Namespace, out: Path, accepted: dict[str, Path], system_type: str) -> int:
    """Build the tree into OUT/submission (replacing an older one whole), then summary.json and plots."""
    from distbert.submission.build import build

    final = out / "submission"
    staging = out / ".submission-new"
    if staging.exists():
        shutil.rmtree(staging)
    result = build(list(accepted.values()), staging, args.submitter, args.system, args.division, args.benchmark,
                   args.system_json, args.allow_invalid, args.version, system_type)
    summary = summarize(args, accepted, result, system_type)
    (staging / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for scenario, run_dir in accepted.items():
        try:
            from distbert.submission.plots import plot_scenario

            plot_scenario(run_dir, staging / f"{scenario}.png", args.version)
        except Exception as exc:  # a plot must never fail the submission
            log.warning("could not draw the %s plot: %s", scenario, exc)
    if final.exists():
        old = out / ".submission-old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
    print_summary(summary, final)
    return 0 if result.report.ok or args.allow_invalid else 1


def summarize(args: argparse.Namespace, accepted: dict[str, Path], result: Any, system_type: str) -> dict[str, Any]:
    from distbert.data.loadgen_logs import read_detail, unmet_requirements
    from distbert.data.squad.accuracy import TARGETS
    from distbert.submission.check import RESULT_METRICS

    rows = {(r.benchmark, r.scenario): r for r in result.report.results}
    scenarios: dict[str, Any] = {}
    for scenario, run_dir in accepted.items():
        record = json.loads((run_dir / "run.json").read_text())
        res = record.get("results", {})
        perf = res.get("performance") or {}
        detail = read_detail(run_dir / "performance" / "mlperf_log_detail.txt")
        reasons = [text for _, text in unmet_requirements(detail)]
        key, unit, divisor = RESULT_METRICS[scenario]
        figure = detail.get(key)
        f1 = (res.get("accuracy") or {}).get("f1")
        row = rows.get((args.benchmark, scenario))
        scenarios[scenario] = {
            "run": str(run_dir), "validity": perf.get("result_validity"), "loadgen_reasons": reasons,
            "loadgen_errors": perf.get("loadgen_errors", 0),
            "result": None if figure is None else float(figure) / divisor, "unit": unit,
            "f1": f1, "accuracy": None if f1 is None else ("PASS" if f1 >= TARGETS[args.benchmark] else "FAIL"),
            "accuracy_meaningful": record.get("accuracy_meaningful"),
            "compliance": {t: {k: v for k, v in (res.get(t) or {}).items() if k.endswith("_pass")}
                           for t in ("TEST01", "TEST05") if t in res},
            "target": {k: record["config"]["loadgen"].get(k) for k in ("target_qps", "target_latency_ms")},
            "checker_valid": row.valid if row is not None else None,
            "plot": f"{scenario}.png",
        }
    return {
        "distbert_submission": 1, "version": args.version, "division": args.division, "submitter": args.submitter,
        "system": args.system, "system_type": system_type, "benchmark": args.benchmark,
        "execution_mode": args.execution_mode, "dry_run": {k: v for k, v in result.invalid.items()},
        "scenarios": scenarios,
        "check": {"ok": result.report.ok, "problems": [str(p) for p in result.report.problems]},
        "tarball": "mlperf_submission.tar.gz",
    }


def _compliance_text(test: str, verdicts: dict[str, Any], execution_mode: str | None) -> str:
    """``TEST01 PASS``; a dry run's failed performance comparison is waived (seconds-long runs)."""
    from distbert.submission.campaign import verdict_passed

    accuracy = verdict_passed(verdicts.get("accuracy_pass", True))
    perf = verdict_passed(verdicts.get("performance_pass"))
    if accuracy and perf:
        return f"{test} PASS"
    if accuracy and execution_mode == "test":
        return f"{test} PASS (its performance comparison is waived in a test-mode dry run)"
    return f"{test} FAIL ({'accuracy' if not accuracy else 'performance'})"


def print_summary(summary: dict[str, Any], final: Path) -> None:
    print(f"distbert submission {summary['version']} {summary['division']} {summary['benchmark']} "
          f"({summary['system_type']}) -> {final}")
    for scenario, s in summary["scenarios"].items():
        figure = "n/a" if s["result"] is None else f"{s['result']:,.3f} {s['unit']}"
        why = f" ({'; '.join(s['loadgen_reasons'])})" if s["loadgen_reasons"] else ""
        acc = "n/a" if s["f1"] is None else f"F1 {s['f1']:.3f} {s['accuracy']}"
        if s["f1"] is not None and not s["accuracy_meaningful"]:
            acc += " (meaningless: harness backend or random weights)"
        comp = ", ".join(_compliance_text(t, v, summary.get("execution_mode")) for t, v in s["compliance"].items())
        print(f"  {scenario}: {figure}; LoadGen {s['validity']}{why}; accuracy {acc}; {comp}")
    for run, reasons in summary["dry_run"].items():
        print(f"  dry run: {Path(run).name}: {'; '.join(reasons)}")
    problems = summary["check"]["problems"]
    verdict = "OK" if summary["check"]["ok"] else f"{len(problems)} problem(s), first: {problems[0]}"
    print(f"  check ({summary['version']} rules): {verdict}")
    print(f"  tree: {final}, tarball: {final / summary['tarball']}, summary: {final / 'summary.json'}")
