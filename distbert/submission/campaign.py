"""``distbert submission run``: from an empty results directory to a checked submission, resumable.

For each scenario: a short calibration run measures throughput (Offline), latency (SingleStream)
or the highest VALID QPS (Server, by ``--find-peak`` probes); the submission run (performance,
accuracy, TEST01) then gets a LoadGen target chosen so the minimum duration and query count are met
with margin. A run that still comes back INVALID is diagnosed from LoadGen's detail log: the message
names the setting, the old and the new value, and the next attempt (in this invocation, up to
``--max-attempts``, or in the next one) uses it. Then ``build`` writes the tree for the rules of
``--version``, checks it, and writes the tarball, ``summary.json`` and the plots.

The output directory is the only state::

    OUT/campaign.json                      the flags each scenario's accepted run was made with
    OUT/runs/<Scenario>-calibration/       calibration run (test mode, performance only)
    OUT/runs/<Scenario>-attempt-<k>/       each submission attempt, kept (INVALID ones too)
    OUT/runs/<Scenario>/                   the accepted run (renamed from its attempt); a redone part's
                                           failed predecessor beside it (TEST01.failed-1, accuracy.failed-1)
    OUT/runs/<Scenario>-<part>-redo-<k>/   each redo of one part (TEST01, accuracy), kept
    OUT/submission/                        tree, mlperf_submission.tar.gz, summary.{csv,txt,json}, *.png

A scenario is complete only when everything it needs passed (:func:`missing_parts`): the performance
run VALID, the accuracy run at the benchmark's target (unless ``--allow-invalid``), TEST01 (and
v4.1's TEST05). What failed is redone alone where ``distbert run`` can run it alone, with the run's
own flags and target: the accuracy run (``--mode accuracy``) or TEST01 (a performance run under the
official ``audit.config``); the failed one is kept beside the new one (``TEST01.failed-1``). A dry
run (test mode) waives only the performance comparisons of TEST01/TEST05, which seconds-long runs
cannot meet. Redos count against ``--max-attempts`` like attempts; out of them, the command stops
and the same command again goes on with the redo.

A rerun with the same flags skips every scenario whose accepted run is complete, redoes what the
others lack, and rebuilds the tree. Each run is a separate ``distbert run`` process: LoadGen reads its configuration
once per process (a second ``FromConfig`` puts an ERROR into every later log). Under a launcher,
rank 0 starts each run as a child coordinator and the launched ranks join it as workers, run after
run (:class:`LaunchedSteps`).

Every wait between steps has a deadline (docs/faults.md): a launched rank waits for rank 0's next
step at most :data:`STEP_WAIT_S` (:data:`LOST_STEP_WAIT_S` after a step whose coordinator vanished),
rank 0 waits for its broadcast to be taken at most :data:`ROOT_BCAST_S`, and each child run watches
this process (``DISTBERT_PARENT_PID``): if it is killed, the child fails its run and tells its
workers that rank 0 is gone, so the launched ranks exit (status 3) instead of waiting.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from distbert.data.loadgen_logs import read_detail, unmet_requirements
from distbert.errors import UserError
from distbert.submission.rules import RuleSet
from distbert.util.fs import atomic_write_text

log = logging.getLogger(__name__)

#: Offline: expected QPS = this x the measured samples/s (LoadGen adds its own 1.1: ~1.2 x min duration)
OFFLINE_MARGIN = 1.1
#: SingleStream: expected latency = this x the measured mean (LoadGen stops once the minimums are met,
#: so a low expected latency only generates spare queries; a high one runs out of them)
SINGLESTREAM_MARGIN = 0.5
#: Server: target = this x the highest VALID QPS the probes found; after an INVALID run, this x its target
SERVER_MARGIN = 0.9

#: an Offline calibration shorter than half of this is run again, sized to last this long (seconds):
#: 1024 samples take a fraction of a second on a fast GPU, where warm-up would dominate the rate
CALIBRATION_MIN_S = 10.0
CALIBRATION_MAX_SAMPLES = 5_000_000

Runner = Callable[[list[str], Path], int]


@dataclasses.dataclass(frozen=True)
class Target:
    """What a submission attempt passes to ``distbert run`` (one of the two), and why."""

    flag: str           # "--target-qps" | "--target-latency-ms"
    value: float
    why: str

    def argv(self) -> list[str]:
        return [self.flag, f"{self.value:.6g}"]


def _load(run_dir: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def performance(record: dict[str, Any]) -> dict[str, Any]:
    return record.get("results", {}).get("performance") or {}


def calibration_target(scenario: str, record: dict[str, Any]) -> Target:
    """The first attempt's target from a calibration run's record."""
    perf = performance(record)
    if scenario == "Offline":
        rate = perf.get("result_samples_per_second")
        if not rate:
            raise UserError("the Offline calibration run has no samples/s: see its run.json")
        return Target("--target-qps", OFFLINE_MARGIN * float(rate),
                      f"{OFFLINE_MARGIN:g} x {float(rate):,.1f} samples/s measured by the calibration run")
    if scenario == "SingleStream":
        mean = perf.get("result_mean_latency_ns")
        if not mean:
            raise UserError("the SingleStream calibration run has no mean latency: see its run.json")
        return Target("--target-latency-ms", SINGLESTREAM_MARGIN * float(mean) / 1e6,
                      f"{SINGLESTREAM_MARGIN:g} x the {float(mean) / 1e6:,.3f} ms mean latency of the calibration run")
    peak = (record.get("results", {}).get("find_peak") or {}).get("best_valid_qps")
    if not peak:
        raise UserError("the Server calibration run found no VALID QPS: see its find-peak/ probes")
    return Target("--target-qps", SERVER_MARGIN * float(peak),
                  f"{SERVER_MARGIN:g} x {float(peak):,.1f} QPS, the highest VALID QPS of the calibration probes")


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """Why a submission attempt is INVALID, in LoadGen's terms, and the target that fixes it."""

    reasons: list[str]
    fix: Target | None

    def message(self, scenario: str, attempt: Path, old: Target | None) -> str:
        text = f"{scenario} run {attempt.name} is INVALID: {'; '.join(self.reasons) or 'LoadGen says so'}"
        if self.fix is None:
            return text + (" (no LoadGen target fixes this: see "
                           f"{attempt}/performance/mlperf_log_summary.txt)")
        was = f" (was {old.value:.6g})" if old is not None else ""
        return text + f": the next attempt uses {self.fix.flag} {self.fix.value:.6g}{was}, {self.fix.why}"


def diagnose(scenario: str, record: dict[str, Any], run_dir: Path, used: Target | None) -> Diagnosis:
    """Read an INVALID attempt's detail log: which LoadGen requirement failed, and the new target."""
    detail = read_detail(run_dir / "performance" / "mlperf_log_detail.txt")
    perf = performance(record)
    rate, mean = perf.get("result_samples_per_second"), perf.get("result_mean_latency_ns")
    unmet = unmet_requirements(detail)
    samples, min_ms = detail.get("generated_samples_per_query"), detail.get("effective_min_duration_ms")
    p99 = perf.get("result_99.00_percentile_latency_ns")
    reasons: list[str] = []
    for key, text in unmet:   # LoadGen's words, with the figure that explains them where there is one
        if key == "result_min_duration_met" and scenario == "Offline" and samples and rate:
            text += f" (ran {samples / rate:.1f} s" + (f" of {min_ms / 1000:g} s)" if min_ms else ")")
        elif key == "result_perf_constraints_met" and p99:
            text += f" (p99 {p99 / 1e6:.1f} ms)"
        reasons.append(text)
    errors = detail.get("_errors") or []
    if errors:
        reasons.append(f"LoadGen errors: {errors[0]}")
    failed = {key for key, _ in unmet}
    short = bool(failed & {"result_min_duration_met", "result_min_queries_met"})
    fix: Target | None = None
    if scenario == "Offline" and short and rate:
        fix = Target("--target-qps", OFFLINE_MARGIN * float(rate),
                     f"{OFFLINE_MARGIN:g} x the {float(rate):,.1f} samples/s this attempt measured")
    elif scenario == "SingleStream" and short and mean:
        value = SINGLESTREAM_MARGIN * float(mean) / 1e6
        if used is not None and used.value <= value:
            value = used.value * SINGLESTREAM_MARGIN  # lower still: LoadGen generates more queries
        fix = Target("--target-latency-ms", value, f"below the {float(mean) / 1e6:,.3f} ms mean latency this "
                     "attempt measured, so LoadGen generates enough queries")
    elif scenario == "Server" and used is not None and failed & {"result_perf_constraints_met",
                                                                  "early_stopping_met"}:
        fix = Target("--target-qps", SERVER_MARGIN * used.value, f"{SERVER_MARGIN:g} x this attempt's target")
    return Diagnosis(reasons, fix)


@dataclasses.dataclass(frozen=True)
class Missing:
    """A part of a scenario's accepted run that did not pass, and how it is redone: ``redo`` is the
    part run again alone (``accuracy``, ``TEST01``) or ``run``, a whole new attempt (TEST05: ``distbert
    run`` cannot run it alone)."""

    part: str
    why: str
    redo: str


def missing_parts(record: dict[str, Any], rule_set: RuleSet, allow_invalid: bool) -> list[Missing]:
    """What a scenario's accepted run still lacks (empty: complete), in the order it is redone: the
    accuracy run first (TEST01 is verified against its log). Test mode (a dry run) waives only the
    TEST01/TEST05 performance comparisons, which seconds-long runs cannot meet."""
    from distbert.data.squad.accuracy import TARGETS
    from distbert.submission.compliance import ACCURACY_DELTA

    results = record.get("results") or {}
    loadgen = (record.get("config") or {}).get("loadgen") or {}
    dry = loadgen.get("execution_mode") == "test"
    benchmark = loadgen.get("benchmark", "bert-99")
    out: list[Missing] = []
    f1 = (results.get("accuracy") or {}).get("f1")
    if not allow_invalid and (f1 is None or f1 < TARGETS[benchmark]):
        have = "no F1" if f1 is None else f"F1 {f1:.5f}"
        out.append(Missing("accuracy", f"its accuracy run has {have}, below the {benchmark} target "
                                       f"{TARGETS[benchmark]}", "accuracy"))
    test01 = results.get("TEST01")
    if test01 is None:
        out.append(Missing("TEST01", "it has no TEST01 result", "TEST01"))
    elif not verdict_passed(test01.get("accuracy_pass")):
        out.append(Missing("TEST01", "TEST01's accuracy check failed (its responses' first bytes differ from the "
                                     "accuracy run's and their F1 is not within "
                                     f"{ACCURACY_DELTA[benchmark] * 100:g} % of it: see TEST01/verify_accuracy.txt)",
                           "TEST01"))
    elif not verdict_passed(test01.get("performance_pass")) and not dry:
        out.append(Missing("TEST01", "TEST01's score is not within 10 % of the performance run's (see "
                                     "TEST01/verify_performance.txt)", "TEST01"))
    if "TEST05" in rule_set.compliance_tests and not dry and not verdict_passed((results.get("TEST05") or {}).get(
            "performance_pass")):
        out.append(Missing("TEST05", "TEST05's score is more than 5 % worse than the performance run's (see "
                                     "TEST05/verify_performance.txt)", "run"))
    out.sort(key=lambda m: m.redo != "run")   # a new attempt first: it redoes every part anyway
    return out


def verdict_passed(verdict: Any) -> bool:
    """A verdict of run.json: true, or "True" (runs made before the verdicts were plain bools wrote
    numpy's through ``str``, and ``"False"`` is a true string)."""
    return verdict is True or verdict == "True"


def _next_number(folder: Path, prefix: str) -> int:
    """One more than any ``<prefix><n>`` in ``folder`` (``<prefix><n>.anything`` too): a number is never
    reused, whatever campaign.json says."""
    seen = [0]
    for path in folder.glob(prefix + "*"):
        digits = path.name[len(prefix):].split(".", 1)[0]
        if digits.isdigit():
            seen.append(int(digits))
    return max(seen) + 1


def run_target(scenario: str, record: dict[str, Any]) -> Target | None:
    """The LoadGen target a run was made with (its record's config), for a redo with its settings."""
    loadgen = (record.get("config") or {}).get("loadgen") or {}
    if scenario == "SingleStream" and loadgen.get("target_latency_ms"):
        return Target("--target-latency-ms", float(loadgen["target_latency_ms"]), "the run's own")
    if scenario != "SingleStream" and loadgen.get("target_qps"):
        return Target("--target-qps", float(loadgen["target_qps"]), "the run's own")
    return None


def child_error(log_path: Path) -> str:
    """``", said: <its one-line error>"`` from a failed run's output, or ""."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    said = [line.split("distbert: error: ", 1)[1] for line in lines if "distbert: error: " in line]
    return f", said: {said[-1]}" if said else ""


def _tee(proc: subprocess.Popen[str], out: Any) -> None:
    """The child's output, shown as it comes and kept in its log."""
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        out.write(line)
        out.flush()


def subprocess_runner(run_argv: list[str], log_path: Path) -> int:
    """One ``distbert run`` as a child process, its output shown and kept in ``log_path``."""
    cmd = [sys.executable, "-m", "distbert", "run", *run_argv]
    log.info("$ distbert run %s", " ".join(run_argv))
    with open(log_path, "w") as out:
        # the child's watchdog: it stops (and stops its workers) if this process is killed
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                bufsize=1, env=dict(os.environ, DISTBERT_PARENT_PID=str(os.getpid())))
        _tee(proc, out)
        return proc.wait()


class Campaign:
    """The steps of one ``distbert submission run`` (rank 0 only); ``runner`` runs one ``distbert run``."""

    def __init__(self, out: Path, scenarios: Sequence[str], run_flags: list[str], rules: RuleSet, *,
                 execution_mode: str, max_attempts: int, first_target_qps: float | None,
                 calibration_samples: int, calibration_queries: int, probe_s: float,
                 runner: Runner = subprocess_runner, allow_invalid: bool = False) -> None:
        self.out = out
        self.runs = out / "runs"
        self.scenarios = list(scenarios)
        self.run_flags = run_flags
        self.rules = rules
        self.execution_mode = execution_mode
        self.max_attempts = max_attempts
        self.first_target_qps = first_target_qps
        self.calibration_samples = calibration_samples
        self.calibration_queries = calibration_queries
        self.probe_s = probe_s
        self.runner = runner
        self.allow_invalid = allow_invalid
        self.state_path = out / "campaign.json"
        self.state: dict[str, Any] = {}

    # --- state ------------------------------------------------------------------------------------

    def _load_state(self) -> None:
        if self.state_path.is_file():
            try:
                self.state = json.loads(self.state_path.read_text())
            except ValueError as exc:
                raise UserError(f"{self.state_path} is not JSON ({exc}): remove it to start over") from exc
        self.state.setdefault("scenarios", {})

    def _save_state(self) -> None:
        atomic_write_text(self.state_path, json.dumps(self.state, indent=2) + "\n")

    def _say(self, text: str) -> None:
        print(f"distbert submission: {text}", flush=True)

    # --- the steps ----------------------------------------------------------------------------------

    def run(self) -> dict[str, Path]:
        """Every scenario's accepted run directory (after calibration and attempts as needed)."""
        self.runs.mkdir(parents=True, exist_ok=True)
        self._load_state()
        self.state.update({"version": self.rules.version, "scenarios_wanted": self.scenarios})
        accepted: dict[str, Path] = {}
        # Offline first: its throughput is the Server calibration's starting point
        order = sorted(self.scenarios, key=lambda s: s != "Offline")
        for i, scenario in enumerate(order, 1):
            self._say(f"[{i}/{len(self.scenarios)}] {scenario}")
            accepted[scenario] = self._scenario(scenario)
        self._save_state()
        return accepted

    def _flags_of(self, scenario: str) -> list[str]:
        return [*self.run_flags, "--scenario", scenario, "--execution-mode", self.execution_mode]

    def _scenario(self, scenario: str) -> Path:
        """The scenario's complete run: accepted (performance VALID) and every part it needs passed."""
        final = self.runs / scenario
        flags = self._flags_of(scenario)
        known = self.state["scenarios"].get(scenario, {})
        if final.is_dir() and (known.get("flags") != flags or _load(final) is None):
            stale = final.with_name(f"{scenario}.replaced-{dt.datetime.now():%Y%m%d-%H%M%S}")
            os.replace(final, stale)
            self._say(f"{scenario}: the run in {final} was made with other flags; kept as {stale.name}, redoing it")
            known = {}
        if known.get("flags") != flags:
            known = {"flags": flags}  # attempts and calibrations made with other flags do not count
        self.state["scenarios"][scenario] = known
        budget = self.max_attempts     # runs this invocation may still make for the scenario
        worked = False
        while True:
            if not final.is_dir():
                budget -= self._accept(scenario, known, flags, budget)
                worked = True
            record = _load(final)
            if record is None:
                raise UserError(f"{final}/run.json is unreadable: remove {final} and rerun the same command")
            todo = missing_parts(record, self.rules, self.allow_invalid)
            if not todo:
                self._say(f"{scenario}: complete in {final}" if worked
                          else f"{scenario}: already complete in {final} (skipped)")
                return final
            gap = todo[0]
            how = "a new attempt" if gap.redo == "run" else f"{gap.redo} alone, with the run's flags and target"
            if budget < 1:
                raise UserError(f"{scenario}: {gap.why}; the run is kept in {final}: rerun the same command to redo "
                                f"{how} (or raise --max-attempts)")
            self._say(f"{scenario}: {gap.why}: redoing {how}")
            worked = True
            if gap.redo == "run":
                kept = final.with_name(f"{scenario}.incomplete-{_next_number(self.runs, f'{scenario}.incomplete-')}")
                os.replace(final, kept)
                self._say(f"{scenario}: the incomplete run is kept as {kept.name}")
                known.pop("next_target", None)
            else:
                self._redo(scenario, final, known, gap.redo, record)
                budget -= 1

    def _accept(self, scenario: str, known: dict[str, Any], flags: list[str], budget: int) -> int:
        """Submission attempts until one is accepted (VALID; any in test mode) and renamed to
        ``runs/<Scenario>``; returns how many ran. Out of ``budget``: a UserError naming the fix."""
        final = self.runs / scenario
        attempts = [a for a in known.get("attempts", []) if (self.runs / a).is_dir()]
        target = self._first_target(scenario, known, attempts)
        for used in range(1, budget + 1):
            k = _next_number(self.runs, f"{scenario}-attempt-")
            attempt = self.runs / f"{scenario}-attempt-{k}"
            argv = [*flags, "--mode", "submission", "--output", str(attempt), *(target.argv() if target else [])]
            if target is not None:
                self._say(f"{scenario} attempt {k}: {target.flag} {target.value:.6g} ({target.why})")
            log_path = self.runs / f"{attempt.name}.log"
            code = self.runner(argv, log_path)
            attempts.append(attempt.name)
            known["attempts"] = attempts
            known.setdefault("targets", {})[attempt.name] = dataclasses.asdict(target) if target else None
            self.state["scenarios"][scenario] = known
            self._save_state()
            record = _load(attempt)
            if code != 0 or record is None:
                raise UserError(f"{scenario} attempt {k} failed (exit {code}{child_error(log_path)}): see {log_path}; "
                                "fix the cause and rerun the same command")
            validity = performance(record).get("result_validity")
            if validity == "VALID" or self.execution_mode == "test":
                if validity != "VALID":
                    self._say(f"{scenario}: attempt {k} is {validity} (test mode: kept for the dry run)")
                os.replace(attempt, final)
                known["accepted"] = attempt.name
                known["attempts"] = [a for a in attempts if a != attempt.name]
                self._save_state()
                self._say(f"{scenario}: {validity} -> {final}")
                return used
            diagnosis = diagnose(scenario, record, attempt, target)
            self._say(diagnosis.message(scenario, attempt, target))
            known["next_target"] = dataclasses.asdict(diagnosis.fix) if diagnosis.fix else None
            self._save_state()
            if diagnosis.fix is None:
                break
            target = diagnosis.fix
        last = self.runs / attempts[-1]
        fix = known.get("next_target")
        how = (f"rerun the same command: the next attempt uses {fix['flag']} {fix['value']:.6g}" if fix
               else "fix the cause LoadGen names in its summary, then rerun the same command")
        raise UserError(f"{scenario} is still INVALID after {len(attempts)} attempt(s) ({last.name}): {how} "
                        "(or raise --max-attempts)")

    def _redo(self, scenario: str, final: Path, known: dict[str, Any], part: str, record: dict[str, Any]) -> None:
        """Run ``part`` (``accuracy`` or ``TEST01``) again alone with the accepted run's flags and
        target, put it in place of the failed one (kept as ``<part>.failed-<n>``), verify TEST01
        again (its verdict depends on the accuracy log too) and update run.json."""
        from distbert.submission.compliance import AUDIT_CONFIG

        redo = self.runs / f"{scenario}-{part}-redo-{_next_number(self.runs, f'{scenario}-{part}-redo-')}"
        target = run_target(scenario, record)
        argv = [*known["flags"], "--output", str(redo), *(target.argv() if target else [])]
        audit = self.runs / f"{redo.name}.audit.config"
        if part == "TEST01":  # TEST01 is a performance run under the official audit.config
            audit.write_text(AUDIT_CONFIG)
            argv += ["--mode", "performance", "--audit-conf", str(audit)]
        else:
            argv += ["--mode", "accuracy"]
        log_path = self.runs / f"{redo.name}.log"
        code = self.runner(argv, log_path)
        known.setdefault("redos", []).append(redo.name)
        self._save_state()
        redone = _load(redo)
        if code != 0 or redone is None:
            raise UserError(f"{scenario}: the {part} redo failed (exit {code}{child_error(log_path)}): see {log_path}; "
                            "fix the cause and rerun the same command")
        source = redo / ("performance" if part == "TEST01" else "accuracy")
        staged = final / f".{part}.new"
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(source, staged)
        if part == "TEST01":
            shutil.copy2(audit, staged / "audit.config")
        kept = final / f"{part}.failed-{_next_number(final, f'{part}.failed-')}"
        if (final / part).exists():
            os.replace(final / part, kept)
        os.replace(staged, final / part)
        results = record.setdefault("results", {})
        results[part] = {**((redone.get("results") or {}).get("performance" if part == "TEST01" else part) or {}),
                         "redo": redo.name, "source_digest": (redone.get("source") or {}).get("digest")}
        if (final / "TEST01").is_dir() and "TEST01" in results:   # no result yet: TEST01's own redo comes next
            results["TEST01"].update(self._verify_test01(final, record))
        atomic_write_text(final / "run.json", json.dumps(record, indent=2, default=str) + "\n")
        self._say(f"{scenario}: {part} redone in {redo.name}; the failed one is kept as {final.name}/{kept.name}")

    def _verify_test01(self, final: Path, record: dict[str, Any]) -> dict[str, Any]:
        """TEST01's verdict for ``final`` as its run wrote it (:func:`compliance.verify_test01`)."""
        from distbert.data.squad.features import load_features
        from distbert.submission.compliance import verify_test01

        for stale in ("baseline_accuracy.txt", "compliance_accuracy.txt"):   # written only when needed
            (final / "TEST01" / stale).unlink(missing_ok=True)
        config = record["config"]
        store = load_features(Path(config["dataset"]), Path(config["vocab"]))
        verdict = verify_test01(final, store, config["loadgen"].get("benchmark", "bert-99"))
        return {"accuracy_pass": verdict.accuracy_pass, "first_element_pass": verdict.first_element_pass,
                "performance_pass": verdict.performance_pass}

    def _first_target(self, scenario: str, known: dict[str, Any], attempts: list[str]) -> Target | None:
        """The fix of the last INVALID attempt, else --target-qps, else a calibration run's figure."""
        nxt = known.get("next_target")
        if attempts and nxt:
            self._say(f"{scenario}: resuming after {attempts[-1]} (INVALID) with its fix")
            return Target(**nxt)
        if self.first_target_qps is not None and scenario in ("Offline", "Server"):
            return Target("--target-qps", self.first_target_qps, "given with --target-qps")
        calib = self.runs / f"{scenario}-calibration"
        record = _load(calib)
        if record is None or not known.get("calibrated"):   # reset with the flags: a calibration of theirs
            if calib.exists():
                shutil.rmtree(calib)
            argv = [*self.run_flags, "--scenario", scenario, "--execution-mode", "test", "--mode", "performance",
                    "--min-duration-ms", "0", "--output", str(calib)]  # sized by its query count alone
            if scenario == "Offline":
                argv += ["--test-query-count", str(self.calibration_samples)]
            elif scenario == "SingleStream":
                argv += ["--test-query-count", str(self.calibration_queries)]
            else:
                argv += ["--find-peak", "--find-peak-probe-s", f"{self.probe_s:g}"]
                offline = _load(self.runs / "Offline-calibration")
                rate = performance(offline or {}).get("result_samples_per_second")
                if rate:
                    argv += ["--target-qps", f"{0.8 * float(rate):.6g}"]
            self._say(f"{scenario}: calibration run -> {calib}")
            record = self._calibrate(scenario, calib, argv)
            perf = performance(record)
            rate, wall = perf.get("result_samples_per_second"), perf.get("wall_s")
            if scenario == "Offline" and rate and wall is not None and wall < CALIBRATION_MIN_S / 2:
                count = min(CALIBRATION_MAX_SAMPLES, int(float(rate) * CALIBRATION_MIN_S))
                self._say(f"{scenario}: the calibration took {wall:.1f} s; again with {count} samples "
                          f"(~{CALIBRATION_MIN_S:g} s)")
                shutil.rmtree(calib)
                argv = [*argv]   # a copy: the runner may keep the first call's list
                # the last --test-query-count is the calibration's (a user's own comes first; argparse
                # takes the last)
                last = len(argv) - 1 - argv[::-1].index("--test-query-count")
                argv[last + 1] = str(count)
                record = self._calibrate(scenario, calib, argv)
            known["calibrated"] = True
            self._save_state()
        else:
            self._say(f"{scenario}: calibration from {calib} (kept from an earlier invocation)")
        return calibration_target(scenario, record)

    def _calibrate(self, scenario: str, calib: Path, argv: list[str]) -> dict[str, Any]:
        log_path = self.runs / f"{calib.name}.log"
        code = self.runner(argv, log_path)
        record = _load(calib)
        if code != 0 or record is None:
            raise UserError(f"the {scenario} calibration run failed (exit {code}{child_error(log_path)}): see "
                            f"{log_path}; fix the cause and rerun the same command")
        return record


# --- under a launcher: rank 0 starts each run as a child coordinator; the launched ranks join it ----

#: launcher variables a child coordinator must not see (it would take itself for a launched rank)
_LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "HYDRA_", "MPI_LOCAL", "MPIR_", "I_MPI_")
_LAUNCHER_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS",
                   "SLURM_LOCALID")


def child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(_LAUNCHER_PREFIXES) and k not in _LAUNCHER_NAMES}
    env.update(extra)
    return env


#: how often a launched rank waiting for the next step looks (it must not busy-poll a core meanwhile)
BCAST_POLL_S = 0.02
#: rank 0 gives up on a broadcast the launched ranks have not taken by then (one of them died between steps)
ROOT_BCAST_S = 120.0


class LaunchedSteps:
    """Rank 0's runner under ``mpiexec``/``srun``: each step is a child ``distbert run`` that listens
    on tcp and waits for the launched ranks as external workers; rank 0 broadcasts where it listens
    once the child has bound its socket (so a child that fails earlier costs the workers nothing)."""

    ANNOUNCE_TIMEOUT_S = 600.0

    def __init__(self, comm: Any, bind_host: str, hosts_worker: bool, local_rank: int,
                 local_size: int) -> None:
        self.comm = comm
        self.bind_host = bind_host
        self.hosts_worker = hosts_worker
        self.local_rank, self.local_size = local_rank, local_size

    def __call__(self, run_argv: list[str], log_path: Path) -> int:
        import secrets

        from distbert.run.rendezvous import BroadcastTimeout, bcast_json

        announce = log_path.with_suffix(".address")
        announce.unlink(missing_ok=True)
        key = secrets.token_hex(32)
        argv = [*run_argv, "--listen", f"tcp://{self.bind_host}:0", "--bind-host", self.bind_host,
                "--expect-workers", str(self.comm.Get_size() - 1), "--workers", "1" if self.hosts_worker else "0"]
        cmd = [sys.executable, "-m", "distbert", "run", *argv]
        log.info("$ distbert run %s", " ".join(argv))
        with open(log_path, "w") as out:
            extra = {"DISTBERT_SESSION_KEY": key, "DISTBERT_ANNOUNCE": str(announce),
                     "DISTBERT_PARENT_PID": str(os.getpid()),   # the child's watchdog
                     # rank 0's own worker (if any): the rank after the launched ones, rank 0's device slot
                     "DISTBERT_LOCAL_SLOT": f"{self.comm.Get_size()},{self.local_rank},{self.local_size}"}
            # errors="replace": one undecodable byte from a native library must not kill the tee (the
            # child would then block on a full pipe)
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                    bufsize=1, env=child_env(extra))
            tee = threading.Thread(target=_tee, args=(proc, out), name="distbert-tee", daemon=True)
            tee.start()
            t0 = time.monotonic()
            while not announce.is_file() and proc.poll() is None:
                if time.monotonic() - t0 > self.ANNOUNCE_TIMEOUT_S:
                    proc.kill()
                    break
                time.sleep(0.05)
            if announce.is_file():
                hello = json.loads(announce.read_text())
                try:
                    bcast_json(self.comm, {"step": hello["address"], "key": key, "rank0_host": hello["rank0_host"],
                                           "rank0_computes": self.hosts_worker}, poll_s=BCAST_POLL_S,
                               timeout_s=ROOT_BCAST_S)
                except BroadcastTimeout as exc:
                    proc.kill()
                    proc.wait()
                    tee.join(timeout=5.0)
                    raise UserError(f"the launched ranks did not take the step's broadcast within {ROOT_BCAST_S:g} s "
                                    "(did a rank die between steps? see their logs); rerun the same command") from exc
            code = proc.wait()
            tee.join(timeout=5.0)
        return code

    def done(self, error: str | None = None) -> None:
        from distbert.run.rendezvous import BroadcastTimeout, bcast_json

        try:
            bcast_json(self.comm, {"done": True, "error": error}, poll_s=BCAST_POLL_S, timeout_s=ROOT_BCAST_S)
        except BroadcastTimeout:
            log.warning("the launched ranks did not take the final broadcast within %g s (a rank is gone?)",
                        ROOT_BCAST_S)


#: a launched rank waits this long for rank 0's next step (its start-up, the last step's finish) ...
STEP_WAIT_S = LaunchedSteps.ANNOUNCE_TIMEOUT_S + 600.0
#: ... or this long after a step whose coordinator vanished (rank 0 says done or error at once, unless gone too)
LOST_STEP_WAIT_S = 60.0


def launched_worker_loop(topology: Any, comm: Any, step_wait_s: float = STEP_WAIT_S,
                         lost_wait_s: float = LOST_STEP_WAIT_S) -> int:
    """A rank >= 1 of ``mpiexec -n N distbert submission run``: join each run rank 0 starts. Exits 3
    when no word comes from rank 0 in time (see the module docstring)."""
    from distbert.engine.worker import EXIT_COORDINATOR_LOST, worker_run
    from distbert.run.launch import worker_slot
    from distbert.run.rendezvous import BroadcastTimeout, bcast_json
    from distbert.wire.base import Endpoint
    from distbert.wire.zmq import ZmqWorkerTransport

    code = 0
    wait_s = step_wait_s
    while True:
        try:
            msg = bcast_json(comm, None, poll_s=BCAST_POLL_S, timeout_s=wait_s)
        except BroadcastTimeout:
            log.error("rank %d: no word from rank 0 within %g s (%s): exits", topology.rank, wait_s,
                      "its last step's coordinator vanished" if wait_s == lost_wait_s
                      else "a rank on the broadcast's path, or rank 0, is gone?")
            return EXIT_COORDINATOR_LOST
        if msg.get("done"):
            if msg.get("error"):
                log.error("rank 0 stopped the submission (%s); rank %d exits", msg["error"], topology.rank)
                return 2
            return code
        local_index, local_count = worker_slot(topology, msg.get("rank0_host"), bool(msg.get("rank0_computes")))
        transport = ZmqWorkerTransport.connect(Endpoint(msg["step"], msg["key"]), topology.rank)
        code = worker_run(transport, topology.rank, local_index, local_count)
        wait_s = lost_wait_s if code == EXIT_COORDINATOR_LOST else step_wait_s
