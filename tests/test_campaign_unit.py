"""The campaign's decisions without running anything: calibration targets, the diagnosis of an
INVALID attempt and its fix, attempt numbering from the disk, calibration reuse, and the printed
summary's verdicts. Records and detail logs are written by the test in LoadGen's format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distbert.errors import UserError
from distbert.submission import campaign as camp
from distbert.submission.rules import rules


def _detail(run_dir: Path, **values) -> None:
    perf = run_dir / "performance"
    perf.mkdir(parents=True, exist_ok=True)
    lines = [f':::MLLOG {json.dumps({"key": k, "value": v, "metadata": {}})}' for k, v in values.items()]
    (perf / "mlperf_log_detail.txt").write_text("\n".join(lines) + "\n")


def _record(run_dir: Path, scenario: str, perf: dict, tests: dict | None = None, **extra) -> dict:
    record = {"distbert_run": 1, "config": {"loadgen": {"scenario": scenario}},
              "results": {"performance": perf, **(tests or {})}, **extra}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps(record))
    return record


def test_calibration_targets_have_the_documented_margins():
    off = camp.calibration_target("Offline", {"results": {"performance": {"result_samples_per_second": 1000.0}}})
    assert (off.flag, off.value) == ("--target-qps", pytest.approx(1100.0))
    ss = camp.calibration_target("SingleStream", {"results": {"performance": {"result_mean_latency_ns": 4e6}}})
    assert (ss.flag, ss.value) == ("--target-latency-ms", pytest.approx(2.0))
    srv = camp.calibration_target("Server", {"results": {"find_peak": {"best_valid_qps": 500.0}}})
    assert (srv.flag, srv.value) == ("--target-qps", pytest.approx(450.0))
    with pytest.raises(UserError, match="found no VALID QPS"):
        camp.calibration_target("Server", {"results": {}})


def test_offline_too_short_names_the_duration_and_raises_the_target(tmp_path):
    run = tmp_path / "Offline-attempt-1"
    _detail(run, result_min_duration_met=False, result_min_queries_met=True, effective_min_duration_ms=600000,
            generated_samples_per_query=10833)
    rec = _record(run, "Offline", {"result_samples_per_second": 5000.0, "result_validity": "INVALID"})
    d = camp.diagnose("Offline", rec, run, camp.Target("--target-qps", 1.0, "given"))
    assert d.reasons == ["min duration not met (ran 2.2 s of 600 s)"]
    assert d.fix is not None and d.fix.flag == "--target-qps" and d.fix.value == pytest.approx(5500.0)
    text = d.message("Offline", run, camp.Target("--target-qps", 1.0, "given"))
    assert "the next attempt uses --target-qps 5500 (was 1)" in text


def test_singlestream_out_of_queries_lowers_the_expected_latency_but_early_stopping_alone_has_no_fix(tmp_path):
    run = tmp_path / "SingleStream-attempt-1"
    _detail(run, result_min_duration_met=False, result_min_queries_met=False, early_stopping_met=True)
    rec = _record(run, "SingleStream", {"result_mean_latency_ns": 2e6, "result_validity": "INVALID"})
    d = camp.diagnose("SingleStream", rec, run, camp.Target("--target-latency-ms", 5.0, "x"))
    assert d.fix is not None and d.fix.value == pytest.approx(1.0)
    # an expected latency already below the measured mean: lower still
    d = camp.diagnose("SingleStream", rec, run, camp.Target("--target-latency-ms", 0.5, "x"))
    assert d.fix is not None and d.fix.value == pytest.approx(0.25)
    _detail(run, result_min_duration_met=True, result_min_queries_met=True, early_stopping_met=False)
    d = camp.diagnose("SingleStream", rec, run, camp.Target("--target-latency-ms", 1.0, "x"))
    assert d.reasons == ["early stopping not met"] and d.fix is None
    assert "no LoadGen target fixes this" in d.message("SingleStream", run, None)


@pytest.mark.parametrize("values", [{"result_perf_constraints_met": False}, {"early_stopping_met": False}])
def test_server_over_the_bound_steps_the_qps_down(tmp_path, values):
    run = tmp_path / "Server-attempt-1"
    _detail(run, **values)
    rec = _record(run, "Server", {"result_99.00_percentile_latency_ns": 2e8, "result_validity": "INVALID"})
    d = camp.diagnose("Server", rec, run, camp.Target("--target-qps", 1000.0, "x"))
    assert d.fix is not None and d.fix.value == pytest.approx(900.0)


class _Recorder:
    """A runner that records the command lines it got and writes what a run would leave."""

    def __init__(self, perf: dict) -> None:
        self.calls: list[list[str]] = []
        self.perf = perf

    def __call__(self, argv: list[str], log_path: Path) -> int:
        self.calls.append(argv)
        out = Path(argv[argv.index("--output") + 1])
        scenario = argv[argv.index("--scenario") + 1]
        _detail(out)
        passed = {"TEST01": {"accuracy_pass": True, "performance_pass": True}}
        _record(out, scenario, dict(self.perf), passed if "submission" in argv else None,
                find_peak={"best_valid_qps": 100.0})
        log_path.write_text("ok\n")
        return 0


def _campaign(out: Path, runner, flags=("--backend", "null"), mode="test") -> camp.Campaign:
    return camp.Campaign(out, ["Offline"], list(flags), rules("v6.1"), execution_mode=mode, max_attempts=2,
                         first_target_qps=None, calibration_samples=64, calibration_queries=64, probe_s=1.0,
                         runner=runner, allow_invalid=mode == "test")


def test_attempt_numbers_come_from_the_disk_and_calibration_follows_the_flags(tmp_path):
    out = tmp_path / "c"
    runner = _Recorder({"result_samples_per_second": 100.0, "result_validity": "VALID",
                        "wall_s": 30.0})
    (out / "runs" / "Offline-attempt-1").mkdir(parents=True)          # left by an older invocation
    (out / "runs" / "Offline-attempt-2.failed").mkdir(parents=True)   # a failed run, renamed aside
    _campaign(out, runner).run()
    outputs = [c[c.index("--output") + 1] for c in runner.calls]
    assert outputs[0].endswith("Offline-calibration") and outputs[1].endswith("Offline-attempt-3")
    # other flags: the accepted run is replaced and the calibration is redone, not reused
    runner.calls.clear()
    _campaign(out, runner, flags=("--backend", "null", "--workers", "2")).run()
    outputs = [c[c.index("--output") + 1] for c in runner.calls]
    assert outputs[0].endswith("Offline-calibration") and outputs[1].endswith("Offline-attempt-4")
    # the same flags again: nothing runs
    runner.calls.clear()
    _campaign(out, runner, flags=("--backend", "null", "--workers", "2")).run()
    assert runner.calls == []


def _verdicts(mode: str = "valid", f1: float | None = 91.0, benchmark: str = "bert-99", **tests) -> dict:
    results: dict[str, dict | None] = {"performance": {"result_validity": "VALID"}, "accuracy": {"f1": f1},
               "TEST01": {"accuracy_pass": True, "first_element_pass": True, "performance_pass": True},
               "TEST05": {"performance_pass": True}}
    for name, verdict in tests.items():
        results[name] = None if verdict is None else {**(results[name] or {}), **verdict}
    return {"config": {"loadgen": {"execution_mode": mode, "benchmark": benchmark}},
            "results": {k: v for k, v in results.items() if v is not None}}


def _gaps(record: dict, version: str = "v6.1", allow_invalid: bool = False) -> list[tuple[str, str]]:
    return [(m.part, m.redo) for m in camp.missing_parts(record, rules(version), allow_invalid)]


def test_a_scenario_is_complete_only_when_every_part_it_needs_passed():
    assert _gaps(_verdicts()) == []
    # accuracy at the benchmark's target, unless --allow-invalid
    assert _gaps(_verdicts(f1=89.9)) == [("accuracy", "accuracy")]
    assert _gaps(_verdicts(f1=90.0, benchmark="bert-99.9")) == [("accuracy", "accuracy")]
    assert _gaps(_verdicts(f1=None), allow_invalid=True) == []
    # TEST01: its accuracy check always; its performance comparison except in a dry run (test mode)
    failed_acc = {"accuracy_pass": False, "first_element_pass": False}
    assert _gaps(_verdicts(TEST01=failed_acc)) == [("TEST01", "TEST01")]
    assert _gaps(_verdicts("test", TEST01=failed_acc), allow_invalid=True) == [("TEST01", "TEST01")]
    assert _gaps(_verdicts(TEST01={"performance_pass": False})) == [("TEST01", "TEST01")]
    assert _gaps(_verdicts("test", TEST01={"performance_pass": False}), allow_invalid=True) == []
    assert _gaps(_verdicts(TEST01=None)) == [("TEST01", "TEST01")]
    # the accuracy run is redone before TEST01 (verified against its log)
    assert _gaps(_verdicts(f1=1.0, TEST01=failed_acc)) == [("accuracy", "accuracy"), ("TEST01", "TEST01")]
    # v4.1's TEST05 needs a whole new attempt, which comes first; waived in a dry run
    assert _gaps(_verdicts(TEST05={"performance_pass": False}), "v4.1") == [("TEST05", "run")]
    assert _gaps(_verdicts(TEST05={"performance_pass": False})) == []
    assert _gaps(_verdicts("test", TEST05=None), "v4.1", allow_invalid=True) == []
    assert _gaps(_verdicts(TEST01=failed_acc, TEST05=None), "v4.1") == [("TEST05", "run"), ("TEST01", "TEST01")]


def test_a_short_calibration_is_repeated_long_enough(tmp_path):
    """1024 samples on a fast GPU take a fraction of a second: warm-up would dominate the rate."""
    out = tmp_path / "c"
    runner = _Recorder({"result_samples_per_second": 5000.0, "result_validity": "VALID", "wall_s": 0.2})
    _campaign(out, runner).run()
    calib = [c for c in runner.calls if c[c.index("--output") + 1].endswith("calibration")]
    assert len(calib) == 2
    counts = [int(c[c.index("--test-query-count") + 1]) for c in calib]
    assert counts[0] == 64 and counts[1] == int(5000.0 * camp.CALIBRATION_MIN_S)


def test_the_repeated_calibration_is_longer_even_when_the_user_gave_a_query_count(tmp_path):
    """A user's --test-query-count goes to every run, before the calibration's own; the repeat must
    change the one argparse uses (the last), not the user's."""
    out = tmp_path / "c"
    runner = _Recorder({"result_samples_per_second": 5000.0, "result_validity": "VALID", "wall_s": 0.2})
    _campaign(out, runner, flags=("--backend", "null", "--test-query-count", "2000")).run()
    calib = [c for c in runner.calls if c[c.index("--output") + 1].endswith("calibration")]
    last = [int(c[len(c) - 1 - c[::-1].index("--test-query-count") + 1]) for c in calib]
    assert last == [64, int(5000.0 * camp.CALIBRATION_MIN_S)]


def test_printed_summary_counts_the_f1_fallback_as_a_pass(capsys, tmp_path):
    from distbert.submission.flow import print_summary

    row = {"result": 1.0, "unit": "samples/s", "loadgen_reasons": [], "validity": "VALID", "f1": 90.5,
           "accuracy": "PASS", "accuracy_meaningful": True,
           "compliance": {"TEST01": {"accuracy_pass": True, "first_element_pass": False, "performance_pass": True}}}
    summary = {"version": "v6.1", "division": "closed", "benchmark": "bert-99", "system_type": "edge",
               "scenarios": {"Offline": row}, "dry_run": {}, "check": {"ok": True, "problems": []},
               "tarball": "t.tar.gz"}
    print_summary(summary, tmp_path)
    assert "TEST01 PASS" in capsys.readouterr().out


def test_run_flags_carry_every_kind_of_flag_to_the_runs():
    from distbert.cli.main import build_parser
    from distbert.submission.flow import run_flags

    parser = build_parser()
    base = ["submission", "run", "--out", "x", "--submitter", "S", "--system", "Y"]
    args = parser.parse_args([*base, "--no-in-process-worker", "--workers", "2", "--option", "a=1", "--option", "b=2",
                              "--spin-us", "5"])
    flags = run_flags(args, args.run_actions)
    assert "--no-in-process-worker" in flags and "--in-process-worker" not in flags
    assert flags[flags.index("--workers") + 1] == "2" and flags.count("--option") == 2
    args = parser.parse_args([*base, "--in-process-worker"])
    assert run_flags(args, args.run_actions) == ["--in-process-worker"]
    args = parser.parse_args(base)   # left unset: each run decides (SingleStream on a GPU: in rank 0)
    assert run_flags(args, args.run_actions) == []


def test_an_accuracy_redo_beside_a_test01_folder_without_a_result_keeps_test01_for_its_own_redo(tmp_path):
    """A run whose TEST01 folder exists but whose run.json has no TEST01 result: the accuracy redo
    must not crash re-verifying a TEST01 it has no verdict for; TEST01's own redo is left to come next.
    The runner is a stand-in that writes the redo's run.json and accuracy folder (no run here)."""
    out = tmp_path / "c"
    final = out / "runs" / "Offline"
    (final / "TEST01").mkdir(parents=True)
    record = _verdicts(f1=10.0, TEST01=None)

    def runner(argv: list[str], log_path: Path) -> int:
        redo = Path(argv[argv.index("--output") + 1])
        (redo / "accuracy").mkdir(parents=True)
        (redo / "run.json").write_text(json.dumps({"results": {"accuracy": {"f1": 91.0}}, "source": {"digest": "d"}}))
        return 0

    c = _campaign(out, runner)
    c._redo("Offline", final, {"flags": ["--backend", "null"]}, "accuracy", record)
    written = json.loads((final / "run.json").read_text())
    assert written["results"]["accuracy"]["f1"] == 91.0 and "TEST01" not in written["results"]
    assert _gaps(written) == [("TEST01", "TEST01")]
