"""``distbert submission run``: from an empty directory to a tree, for each round's layout, resumable.

Real runs: the real CLI in subprocesses (real LoadGen, ZeroMQ, local worker processes), the oracle
backend (deterministic logits, so TEST01's byte check passes) and, for the INVALID-then-VALID case,
the sim backend (a predictable throughput). Test-mode campaigns build dry-run trees: the checks
must pass every rule of the layout and fail only for what a short, small-QSL, harness-backend run
is (the ``DRY_RUN_RULES``). One campaign runs under the real ``mpiexec`` (three ranks).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from distbert.submission.check import check_tree
from tests.conftest import REPO

PY = sys.executable
MPIEXEC = shutil.which("mpiexec", path=str(Path(PY).parent))
pytestmark = [pytest.mark.slow]

#: the rules a test-mode, 300-feature, oracle-backend run breaks (and nothing else may fail)
DRY_RUN_RULES = {"min-duration", "performance-sample-count", "accuracy-count", "accuracy-target",
                 "test01-verify", "test05-verify", "offline-samples-per-query", "early-stopping", "validity"}


@pytest.fixture(scope="module")
def env(session_cache) -> dict[str, str]:
    return dict(os.environ, DISTBERT_CACHE=str(session_cache), DISTBERT_NO_PROGRESS="1", PYTHONPATH=str(REPO))


@pytest.fixture(scope="module")
def data_flags(squad_dev, vocab) -> list[str]:
    return ["--dataset", str(squad_dev), "--vocab", str(vocab), "--max-examples", "300"]


def _submission(env, out: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [PY, "-m", "distbert", "submission", "run", "--out", str(out), "--submitter", "Acme",
           "--system", "box1", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _run_ids(out: Path) -> dict[str, float]:
    """Each run directory's run.json mtime: unchanged means not redone."""
    return {p.parent.name: p.stat().st_mtime for p in (out / "runs").glob("*/run.json")}


# --- one campaign per round's layout ----------------------------------------------------------------

LAYOUTS = {
    "v6.1": (["--scenarios", "Offline,SingleStream"], ("Offline", "SingleStream")),
    "v5.1": ([], ("Offline", "SingleStream")),
    "v4.1": (["--find-peak-probe-s", "0.5"], ("Offline", "Server")),   # datacenter: Server + Offline, TEST05
}


#: the round's code folder: README.md, source.json and distbert's own source as it ran
CODE_FILES = ("README.md", "source.json", "distbert/__init__.py", "distbert/run/rank0.py", "distbert/submission/build.py")


def _expected_files(version: str, scenario: str) -> set[str]:
    sub = "closed/Acme"
    res = f"{sub}/results/box1/bert-99/{scenario}"
    files = {f"{sub}/systems/box1.json", f"{sub}/documentation/calibration.md",
             *(f"{res}/{d}/{f}" for d in ("performance/run_1", "accuracy")
               for f in ("mlperf_log_detail.txt", "mlperf_log_summary.txt")),
             f"{res}/accuracy/accuracy.txt", f"{res}/accuracy/mlperf_log_accuracy.json"}
    if version.startswith("v6"):
        comp, meas = res, res
        files |= {f"{sub}/src/bert-99/{f}" for f in CODE_FILES} | {f"{res}/measurements.json"}
    else:
        comp = f"{sub}/compliance/box1/bert-99/{scenario}"
        meas = f"{sub}/measurements/box1/bert-99/{scenario}"
        files |= {f"{sub}/code/bert-99/distbert/{f}" for f in CODE_FILES} | {f"{meas}/box1_distbert_{scenario}.json"}
    files |= {f"{meas}/README.md", f"{meas}/user.conf",
              f"{comp}/TEST01/verify_accuracy.txt", f"{comp}/TEST01/verify_performance.txt",
              f"{comp}/TEST01/accuracy/accuracy.txt", f"{comp}/TEST01/accuracy/mlperf_log_accuracy.json",
              *(f"{comp}/TEST01/performance/run_1/{f}" for f in ("mlperf_log_detail.txt", "mlperf_log_summary.txt"))}
    if version == "v4.1":
        files |= {f"{meas}/mlperf.conf", f"{comp}/TEST05/verify_performance.txt",
                  *(f"{comp}/TEST05/performance/run_1/{f}" for f in ("mlperf_log_detail.txt", "mlperf_log_summary.txt"))}
    return files


@pytest.mark.parametrize("version", list(LAYOUTS))
def test_campaign_builds_the_rounds_tree_and_resumes(env, data_flags, tmp_path, version):
    extra, scenarios = LAYOUTS[version]
    out = tmp_path / "campaign"
    args = ["--version", version, "--execution-mode", "test", "--allow-invalid", "--backend", "oracle",
            "--workers", "2", *data_flags, *extra]
    proc = _submission(env, out, *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tree = out / "submission"
    files = _files(tree)
    for scenario in scenarios:
        missing = _expected_files(version, scenario) - files
        assert not missing, sorted(missing)
        assert f"{scenario}.png" in files and (tree / f"{scenario}.png").stat().st_size > 5000
    assert {"mlperf_submission.tar.gz", "summary.csv", "summary.txt", "summary.json"} <= files
    # every accuracy log truncated and hashed
    for acc in tree.rglob("accuracy.txt"):
        if acc.parent.name == "accuracy":
            assert any(line.startswith("hash=") for line in acc.read_text().splitlines()), acc
    for log in tree.rglob("mlperf_log_accuracy.json"):
        assert log.stat().st_size <= 10 * 1024, log
    # the round's seeds in every performance log; v4.1's TEST05 with its own
    from distbert.data.loadgen_logs import read_detail
    from distbert.submission.rules import rules

    r = rules(version)
    for detail_path in tree.rglob("performance/run_1/mlperf_log_detail.txt"):
        seeds = r.test05_seeds if "TEST05" in detail_path.parts else r.seeds
        detail = read_detail(detail_path)
        assert detail["effective_qsl_rng_seed"] == seeds.qsl_rng_seed, detail_path
        assert detail["effective_schedule_rng_seed"] == seeds.schedule_rng_seed, detail_path
    # the layout passes the round's checker everywhere except where a dry run must fail
    report = check_tree(tree, version)
    assert {p.rule for p in report.problems} <= DRY_RUN_RULES, [str(p) for p in report.problems
                                                                 if p.rule not in DRY_RUN_RULES]
    # the unpacked tarball, as the official checker must see it: the same verdict (v4.1's folder rules
    # included), and no note; the output folder itself gets the note to check the unpacked tarball
    unpacked = tmp_path / "unpacked"
    with tarfile.open(tree / "mlperf_submission.tar.gz") as tar:
        tar.extractall(unpacked, filter="data")
    shipped = check_tree(unpacked, version)
    assert sorted(map(str, shipped.problems)) == sorted(map(str, report.problems)) and shipped.notes == []
    assert len(report.notes) == 1 and "tar xzf mlperf_submission.tar.gz" in report.notes[0]
    summary = json.loads((tree / "summary.json").read_text())
    assert summary["version"] == version and set(summary["scenarios"]) == set(scenarios)
    for scenario in scenarios:
        row = summary["scenarios"][scenario]
        assert row["validity"] in ("VALID", "INVALID") and row["result"] is not None and row["f1"] is not None
        assert row["compliance"]["TEST01"]["accuracy_pass"] is True
        if version == "v4.1":
            assert "TEST05" in row["compliance"]
    rows = (tree / "summary.csv").read_text().splitlines()
    assert len(rows) == 1 + len(scenarios)
    assert "check (" + version + " rules)" in proc.stdout

    # the same command again: nothing is rerun, the tree is rebuilt
    before = _run_ids(out)
    proc = _submission(env, out, *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for scenario in scenarios:
        assert f"{scenario}: already complete" in proc.stdout
    assert _run_ids(out) == before
    assert _files(out / "submission") >= _expected_files(version, scenarios[0])


def test_changed_flags_redo_the_scenario_and_keep_the_old_run(env, data_flags, tmp_path):
    out = tmp_path / "campaign"
    base = ["--execution-mode", "test", "--allow-invalid", "--backend", "oracle", *data_flags,
            "--division", "open", "--scenarios", "SingleStream"]
    assert _submission(env, out, *base, "--workers", "1").returncode == 0
    proc = _submission(env, out, *base, "--workers", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "made with other flags" in proc.stdout
    assert list((out / "runs").glob("SingleStream.replaced-*"))
    record = json.loads((out / "runs" / "SingleStream" / "run.json").read_text())
    assert record["config"]["workers"] == 2


# --- a failed TEST01 is redone alone by the same command ---------------------------------------------

def test_a_failed_test01_is_redone_alone_by_the_same_command(env, data_flags, tmp_path):
    """TEST01 fails for real: `--option oracle_wrong_after=364` makes the oracle worker answer wrongly
    (no answer, another first byte) from its 365th sample in the process on. With one worker,
    SingleStream and --test-query-count 64, the attempt's performance run (64 queries) and accuracy
    run (each of the 300 features once) are its first 364 samples, so exactly its TEST01 run goes
    wrong: the first-byte check and the F1 fallback both fail. --max-attempts 1 stops the command
    there. The same command again redoes TEST01 alone, a new process whose worker counts from 0 (its
    64 samples are right), keeps the failed TEST01 beside the new one and builds the tree."""
    out = tmp_path / "campaign"
    args = ["--execution-mode", "test", "--allow-invalid", "--backend", "oracle", *data_flags, "--division", "open",
            "--scenarios", "SingleStream", "--workers", "1", "--test-query-count", "64", "--option",
            "oracle_wrong_after=364", "--max-attempts", "1"]
    proc = _submission(env, out, *args)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    err = [line for line in proc.stderr.splitlines() if line.startswith("distbert: error:")]
    assert len(err) == 1 and "SingleStream: TEST01's accuracy check failed" in err[0], proc.stderr[-3000:]
    assert "rerun the same command to redo TEST01 alone" in err[0]
    assert not (out / "submission").exists()
    final = out / "runs" / "SingleStream"
    record = json.loads((final / "run.json").read_text())
    assert record["results"]["TEST01"]["accuracy_pass"] is False
    assert record["results"]["TEST01"]["first_element_pass"] is False
    kept = {p: (final / p).read_bytes() for p in ("performance/mlperf_log_detail.txt", "accuracy/mlperf_log_accuracy.json")}

    proc = _submission(env, out, *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SingleStream: TEST01's accuracy check failed" in proc.stdout
    assert "redoing TEST01 alone, with the run's flags and target" in proc.stdout
    assert "the failed one is kept as SingleStream/TEST01.failed-1" in proc.stdout
    runs = {p.name for p in (out / "runs").iterdir() if p.is_dir()}
    assert runs == {"SingleStream", "SingleStream-calibration", "SingleStream-TEST01-redo-1"}, runs  # no new attempt
    assert {p: (final / p).read_bytes() for p in kept} == kept          # performance and accuracy untouched
    assert "TEST FAIL" in (final / "TEST01.failed-1" / "verify_accuracy.txt").read_text()
    assert "TEST PASS" in (final / "TEST01" / "verify_accuracy.txt").read_text().splitlines()
    record = json.loads((final / "run.json").read_text())
    assert record["results"]["TEST01"]["accuracy_pass"] is True
    assert record["results"]["TEST01"]["redo"] == "SingleStream-TEST01-redo-1"
    redo = json.loads((out / "runs" / "SingleStream-TEST01-redo-1" / "run.json").read_text())["config"]["loadgen"]
    assert redo["mode"] == "performance" and redo["audit_conf"] and redo["test_query_count"] == 64
    assert redo["target_latency_ms"] == pytest.approx(record["config"]["loadgen"]["target_latency_ms"])
    tree = out / "submission"
    test01 = tree / "open" / "Acme" / "results" / "box1" / "bert-99" / "SingleStream" / "TEST01"
    assert "TEST PASS" in (test01 / "verify_accuracy.txt").read_text().splitlines()
    summary = json.loads((tree / "summary.json").read_text())
    assert summary["scenarios"]["SingleStream"]["compliance"]["TEST01"]["accuracy_pass"] is True
    report = check_tree(tree, "v6.1")
    assert {p.rule for p in report.problems} <= DRY_RUN_RULES, [str(p) for p in report.problems]

    proc = _submission(env, out, *args)   # complete now: nothing runs again
    assert proc.returncode == 0 and "SingleStream: already complete" in proc.stdout, proc.stdout[-3000:]
    assert {p.name for p in (out / "runs").iterdir() if p.is_dir()} == runs


# --- INVALID, the fix named, then VALID -------------------------------------------------------------

def test_a_short_valid_run_is_invalid_names_the_fix_and_the_rerun_is_valid(env, data_flags, tmp_path):
    """Offline, valid rules but a 2 s minimum duration: with --target-qps 1 LoadGen issues its minimum
    10,833 samples, which the sim backend finishes in about a second: INVALID (min duration). The
    message names --target-qps and its new value; the same command again uses it and is VALID."""
    out = tmp_path / "campaign"
    args = ["--execution-mode", "valid", "--min-duration-ms", "2000", "--allow-invalid", "--backend", "sim",
            "--sim-latency", "0.001 + 1e-6*tokens", "--workers", "2", *data_flags, "--division", "open",
            "--scenarios", "Offline", "--max-attempts", "1"]
    proc = _submission(env, out, *args, "--target-qps", "1")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert "Offline run Offline-attempt-1 is INVALID: min duration not met" in said
    assert "the next attempt uses --target-qps" in said
    err = [line for line in proc.stderr.splitlines() if line.startswith("distbert: error:")]
    assert len(err) == 1 and "rerun the same command" in err[0] and "--target-qps" in err[0], proc.stderr[-2000:]
    state = json.loads((out / "campaign.json").read_text())
    fix = state["scenarios"]["Offline"]["next_target"]
    assert fix["flag"] == "--target-qps" and fix["value"] > 100
    assert not (out / "submission").exists()

    proc = _submission(env, out, *args, "--target-qps", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"Offline attempt 2: --target-qps {fix['value']:.6g}" in proc.stdout
    record = json.loads((out / "runs" / "Offline" / "run.json").read_text())
    assert record["results"]["performance"]["result_validity"] == "VALID"
    assert record["config"]["loadgen"]["target_qps"] == pytest.approx(fix["value"], rel=1e-5)
    assert (out / "runs" / "Offline-attempt-1").is_dir()   # the INVALID attempt is kept
    summary = json.loads((out / "submission" / "summary.json").read_text())
    assert summary["scenarios"]["Offline"]["validity"] == "VALID"


# --- bad input: one line, exit 2, nothing started -----------------------------------------------------

@pytest.mark.parametrize("args, needle", [
    (["--execution-mode", "test"], "add --allow-invalid"),
    (["--scenarios", "Offline"], "needs exactly Offline,SingleStream"),
    (["--scenarios", ",", "--division", "open"], "name at least one of"),
    (["--version", "v3.0"], "--version v3.0: distbert knows"),
    (["--version", "v4.1", "--system-type", "edge", "--benchmark", "bert-99.9"], "has no bert-99.9 result"),
    (["--backend", "nope"], "nope"),
    (["--precision", "int3", "--backend", "torch"], "int3"),
    (["--division", "network"], "--division network: not for distbert"),
    (["--system", "my box"], "--system 'my box': use letters"),
    (["--system-json", "/nonexistent/system.json"], "--system-json /nonexistent/system.json"),
    (["--max-examples", "100", "--backend", "oracle"], "--max-examples 100 is not the whole dev set"),
    (["--backend", "null"], "--backend null runs no model"),
    (["--target-qps", "auto", "--allow-invalid"], "--target-qps auto: submission run calibrates"),
    (["--version", "v4.1", "--target-qps", "500", "--allow-invalid"], "both Offline's and Server's"),
    (["--audit-conf", "x.config", "--allow-invalid", "--backend", "oracle"], "drop --audit-conf"),
    (["--backend", "onnxruntime", "--model", str(REPO / "pyproject.toml")], "must give host_memory_configuration, host_storage_type, cooling"),
])
def test_bad_input_is_one_line_and_starts_nothing(env, tmp_path, args, needle):
    out = tmp_path / "campaign"
    t0 = time.monotonic()
    proc = _submission(env, out, *args, timeout=60)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("distbert: error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    assert time.monotonic() - t0 < 30
    assert not (out / "runs").exists()


@pytest.mark.timeout(120)
def test_a_generated_model_outside_the_cache_is_refused_before_any_run(env, tmp_path):
    """A `distbert model make` model given with --model (not the cached random one): the pre-flight
    reads its marker, so the campaign does not find out hours later at the build."""
    model_dir = tmp_path / "m"
    made = subprocess.run([PY, "-m", "distbert", "model", "make", "--shape", "tiny", "--format", "onnx",
                           "--out", str(model_dir)], env=env, capture_output=True, text=True, timeout=100)
    assert made.returncode == 0, made.stderr[-2000:]
    out = tmp_path / "campaign"
    proc = _submission(env, out, "--backend", "onnxruntime", "--model", str(model_dir / "model.onnx"), timeout=60)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("distbert: error:")]
    assert len(lines) == 1 and "is a random-weight model" in lines[0], proc.stderr[-2000:]
    assert not (out / "runs").exists()


# --- under a launcher -------------------------------------------------------------------------------

@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found next to the Python interpreter (the mpich wheel)")
def test_campaign_under_mpiexec_runs_every_step_on_the_launched_ranks(env, data_flags, tmp_path):
    out = tmp_path / "campaign"
    cmd = [MPIEXEC, "-n", "3", PY, "-m", "distbert", "submission", "run", "--out", str(out), "--submitter", "Acme",
           "--system", "box1", "--execution-mode", "test", "--allow-invalid", "--backend", "oracle", *data_flags,
           "--bind-host", "127.0.0.1", "--max-batch", "16"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for scenario in ("Offline", "SingleStream"):
        record = json.loads((out / "runs" / scenario / "run.json").read_text())
        assert sorted(w["worker"] for w in record["workers"]) == [1, 2], record["workers"]
        # each rank joined, served and said goodbye (its stats arrived); Offline's batches went to both
        assert all(w["stats"].get("rank") == w["worker"] for w in record["workers"])
        if scenario == "Offline":
            assert all(w["stats"]["samples"] > 0 for w in record["workers"]), record["workers"]
    assert (out / "submission" / "mlperf_submission.tar.gz").is_file()


@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found next to the Python interpreter (the mpich wheel)")
def test_a_failing_step_under_mpiexec_ends_every_rank_at_once(env, tmp_path):
    """The first run fails before it listens (no such data set): rank 0 says why in one line, the
    launched ranks are told to stop (they never got an address), every rank exits within seconds."""
    out = tmp_path / "campaign"
    cmd = [MPIEXEC, "-n", "3", PY, "-m", "distbert", "submission", "run", "--out", str(out), "--submitter", "Acme",
           "--system", "box1", "--execution-mode", "test", "--allow-invalid", "--backend", "oracle",
           "--dataset", "/nonexistent/dev-v1.1.json", "--bind-host", "127.0.0.1"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("distbert: error:")]
    assert len(errors) == 1 and "calibration run failed" in errors[0] and "/nonexistent/dev-v1.1.json" in errors[0], \
        proc.stderr[-3000:]
    assert "rank 0 stopped the submission" in proc.stderr
    assert took < 60, took


@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found next to the Python interpreter (the mpich wheel)")
def test_rank0_that_also_computes_under_mpiexec_takes_the_next_rank(env, data_flags, tmp_path):
    """--coordinator-hosts-worker: each run's rank-0 worker is rank 2 (after launched rank 1), never a
    second rank 1."""
    out = tmp_path / "campaign"
    cmd = [MPIEXEC, "-n", "2", PY, "-m", "distbert", "submission", "run", "--out", str(out), "--submitter", "Acme",
           "--system", "box1", "--execution-mode", "test", "--allow-invalid", "--backend", "oracle", *data_flags,
           "--bind-host", "127.0.0.1", "--max-batch", "16", "--coordinator-hosts-worker", "--division", "open",
           "--scenarios", "Offline"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("Offline", "Offline-calibration"):
        record = json.loads((out / "runs" / name / "run.json").read_text())
        assert sorted(w["worker"] for w in record["workers"]) == [1, 2], (name, record["workers"])


@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found next to the Python interpreter (the mpich wheel)")
def test_a_preflight_error_only_rank0_sees_stops_every_rank(env, tmp_path):
    """Rank 0 alone checks the files a campaign needs (on a cluster they may exist on its node only):
    here its working directory lacks the --system-json the launched ranks' directory has. One error
    line from rank 0, the launched ranks told to stop, every rank gone within seconds."""
    with_file, without = tmp_path / "with", tmp_path / "without"
    with_file.mkdir()
    without.mkdir()
    (with_file / "sys.json").write_text('{"cooling": "air"}')
    run = [PY, "-m", "distbert", "submission", "run", "--out", str(tmp_path / "campaign"), "--submitter", "Acme",
           "--system", "box1", "--system-json", "sys.json", "--execution-mode", "test", "--allow-invalid",
           "--backend", "oracle", "--bind-host", "127.0.0.1"]
    cmd = [MPIEXEC, "-n", "1", "-wdir", str(without), *run, ":", "-n", "2", "-wdir", str(with_file), *run]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("distbert: error:")]
    assert len(errors) == 1 and "--system-json sys.json" in errors[0], proc.stderr[-3000:]
    assert proc.stderr.count("rank 0 stopped the submission") == 2, proc.stderr[-3000:]
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "campaign").exists()


def _can_fake_a_second_host() -> str | None:
    if MPIEXEC is None:
        return "mpiexec not found next to the Python interpreter (the mpich wheel)"
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return "a second host name needs `unshare --uts` as root"
    return None


@pytest.mark.skipif(_can_fake_a_second_host() is not None, reason=str(_can_fake_a_second_host()))
def test_a_multi_host_campaign_missing_the_networking_fields_stops_before_its_first_run(env, tmp_path):
    """Two hosts: the launched ranks run in their own UTS namespace (`unshare --uts`) named `node2`, so
    they report another host name than rank 0 (MPI itself still runs on this machine). The system
    JSON has every field a one-host system needs: the pre-flight names the three networking fields
    and the two hosts, every rank stops, no run starts. With the fields given, the pre-flight passes
    and the first run starts (and fails, its --model being no model)."""
    fields = {"cooling": "air", "host_memory_configuration": "1x24GB", "host_storage_type": "SSD"}
    (tmp_path / "sys.json").write_text(json.dumps(fields))
    out = tmp_path / "campaign"
    run = [PY, "-m", "distbert", "submission", "run", "--out", str(out), "--submitter", "Acme", "--system", "box1",
           "--system-json", str(tmp_path / "sys.json"), "--backend", "onnxruntime", "--model",
           str(REPO / "pyproject.toml"), "--bind-host", "127.0.0.1"]
    cmd = [MPIEXEC, "-n", "1", *run, ":", "-n", "2", "unshare", "--uts", "sh", "-c", 'hostname node2 && exec "$@"',
           "sh", *run]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("distbert: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "must give host_networking, host_network_card_count, host_networking_topology" in errors[0], errors
    assert "the runs span 2 hosts" in errors[0] and "node2" in errors[0], errors
    assert proc.stderr.count("rank 0 stopped the submission") == 2, proc.stderr[-3000:]
    assert not (out / "runs").exists()

    fields |= {"host_networking": "100GbE", "host_network_card_count": "1", "host_networking_topology": "switch"}
    (tmp_path / "sys.json").write_text(json.dumps(fields))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("distbert: error:")]
    assert len(errors) == 1 and "calibration run failed" in errors[0], proc.stderr[-3000:]
    assert (out / "runs" / "Offline-calibration.log").is_file()
