"""Real Slurm: a one-node cluster of our own (slurmctld, slurmd, munge from Debian; tests/slurm_cluster.py).

`sbatch slurm/bert.sh` as a user types it, with the oracle backend: the job completes with every
sample answered once and the oracle's F1, and writes nothing into the checkout; a user error ends the
job within seconds; plain `srun` without PMI stops every task at once with the `--mpi=pmi2` fix; with
`DISTBERT_KILL_ON_BAD_EXIT=0` a SIGKILLed worker's work is requeued and the job still completes.
Skipped (with the reason) where the daemons are not installed or we are not root; `.ci/run` installs them.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests import slurm_cluster
from tests.conftest import REPO, launchers_unavailable
from tests.test_engine_mp import _direct_oracle_f1, _tagged, env, n_features  # noqa: F401

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    launchers_unavailable(slurm_cluster.available())
    c = slurm_cluster.SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=8).start()
    yield c
    c.run(["scancel", "--full", "--user", "root"], timeout=30)
    c.stop()


def _untracked() -> set[str]:
    """Files in the checkout that git does not track (ignored ones included): what a job could add."""
    out = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=REPO,
                         capture_output=True, text=True, timeout=60).stdout
    return {line for line in out.splitlines() if line[:2] in ("??", "!!")}


def _sbatch(cluster, job_env, args: list[str], sbatch_opts: list[str], timeout: float = 240):
    """Submit slurm/bert.sh and wait for it; (returncode, job id, the script's log)."""
    proc = cluster.run(["sbatch", "--parsable", "--wait", *sbatch_opts, str(REPO / "slurm" / "bert.sh"), *args],
                       env=dict(cluster.env, **job_env), timeout=timeout, cwd=str(REPO))
    found = re.match(r"\d+", proc.stdout.strip())
    job = found.group(0) if found else "?"
    log_path = Path(job_env["DISTBERT_RESULTS"]) / f"slurm-{job}.log"
    return proc.returncode, job, (log_path.read_text() if log_path.exists() else proc.stderr)


def _env(base: dict[str, str], tmp_path: Path, **more: str) -> dict[str, str]:
    """The job's environment: this checkout, the venv running the tests (wherever it lies), a results dir."""
    e, _ = _tagged(dict(base, DISTBERT_HOME=str(REPO), DISTBERT_VENV=sys.prefix,
                        DISTBERT_RESULTS=str(tmp_path / "results"), **more))
    return e


@pytest.mark.timeout(300)
def test_sbatch_one_cpu_node_three_tasks_oracle(cluster, env, squad_dev, vocab, session_cache, tmp_path):  # noqa: F811
    before = _untracked()
    e = _env(env, tmp_path)
    n = 300
    t0 = time.monotonic()
    rc, job, log = _sbatch(cluster, e, ["--dataset", str(squad_dev), "--vocab", str(vocab), "--backend", "oracle",
                                        "--mode", "accuracy", "--max-examples", str(n), "--max-batch", "16"],
                           ["-N", "1", "-n", "3", "-c", "1"])
    took = time.monotonic() - t0
    assert rc == 0, f"job {job} failed:\n{log[-4000:]}\n{cluster.logs()[-3000:]}"
    out = tmp_path / "results" / f"slurm-{job}"
    record = json.loads((out / "run.json").read_text())
    assert record["topology"]["world_size"] == 3   # srun --mpi=pmi2 starts MPI: PMI_RANK names the rank
    assert sorted(w["worker"] for w in record["workers"]) == [1, 2]
    assert all(w["device"].startswith("cpu") for w in record["workers"])
    entries = json.loads((out / "accuracy" / "mlperf_log_accuracy.json").read_text())
    assert sorted(e["qsl_idx"] for e in entries) == list(range(n))
    assert abs(record["results"]["accuracy"]["f1"] - _direct_oracle_f1(squad_dev, vocab, session_cache, n)) < 1e-9
    added = _untracked() - before
    assert not added, f"the job wrote into the checkout: {sorted(added)[:5]}"
    print(f"\nsbatch -N 1 -n 3 (oracle, {n} samples): job done in {took:.1f} s")


@pytest.mark.timeout(120)
def test_sbatch_user_error_ends_the_job_in_seconds(cluster, env, tmp_path):  # noqa: F811
    e = _env(env, tmp_path)
    t0 = time.monotonic()
    rc, job, log = _sbatch(cluster, e, ["--dataset", "/nonexistent.json", "--backend", "oracle"],
                           ["-N", "1", "-n", "3", "-c", "1"], timeout=100)
    took = time.monotonic() - t0
    assert rc != 0
    assert "distbert: error:" in log and "/nonexistent.json" in log, log[-3000:]
    assert took < 30, f"the job held its allocation {took:.0f} s"
    print(f"\nsbatch with a user error: job ended in {took:.1f} s")


@pytest.mark.timeout(120)
def test_srun_without_pmi_stops_with_the_fix(cluster, env, tmp_path):  # noqa: F811
    """The cluster's MpiDefault is none: `srun -n 3 distbert run` starts three lone MPI processes.
    Each says how to fix it and exits 2 at once (nobody waits for a rendezvous that cannot happen)."""
    e = _env(env, tmp_path)
    e["PATH"] = f"{REPO / '.venv' / 'bin'}:{e['PATH']}"
    t0 = time.monotonic()
    proc = cluster.run(["srun", "-N", "1", "-n", "3", "-c", "1", "distbert", "run", "--backend", "null"],
                       env=dict(cluster.env, **e), timeout=100)
    assert proc.returncode != 0 and time.monotonic() - t0 < 30
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("distbert: error:")]
    assert len(lines) == 3 and all("srun --mpi=pmi2" in ln for ln in lines), proc.stderr[-3000:]


@pytest.mark.timeout(300)
def test_kill_on_bad_exit_0_survives_a_dead_worker(cluster, env, squad_dev, vocab, session_cache, tmp_path):  # noqa: F811
    """With DISTBERT_KILL_ON_BAD_EXIT=0 srun leaves the step running when one worker dies: its
    batches are requeued on the other and the job completes with every sample once."""
    e = _env(env, tmp_path, DISTBERT_KILL_ON_BAD_EXIT="0")
    tag = e["DISTBERT_TEST_TAG"]
    n = 400
    args = ["--dataset", str(squad_dev), "--vocab", str(vocab), "--backend", "oracle", "--option",
            "oracle_latency=0.1", "--mode", "accuracy", "--max-examples", str(n), "--max-batch", "4"]
    proc = subprocess.Popen(["sbatch", "--parsable", "--wait", "-N", "1", "-n", "3", "-c", "1",
                             str(REPO / "slurm" / "bert.sh"), *args], env=dict(cluster.env, **e), cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _kill_a_worker_and_check(proc, tag, tmp_path / "results", n, squad_dev, vocab, session_cache)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _kill_a_worker_and_check(proc, tag, results, n, squad_dev, vocab, session_cache) -> None:
    victim = None
    deadline = time.monotonic() + 120
    while victim is None and time.monotonic() < deadline:
        for p in psutil.process_iter():
            try:
                pe = p.environ()
                if pe.get("DISTBERT_TEST_TAG") == tag and pe.get("SLURM_PROCID") == "2" and "run" in p.cmdline():
                    victim = p
            except psutil.Error:
                continue
        time.sleep(0.3)
    assert victim is not None, "rank 2 never started"
    while not list(results.glob("slurm-*/accuracy")) and not list(results.glob(".slurm-*.partial-*/accuracy")):
        assert time.monotonic() < deadline, "the run never started its test"
        time.sleep(0.2)
    time.sleep(2.0)
    victim.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=240)
    job = out.strip().split(";")[0]
    log = (results / f"slurm-{job}.log").read_text()
    # srun reports the killed task (the job's state is FAILED); what counts is the run itself
    record = json.loads((results / f"slurm-{job}" / "run.json").read_text())
    entries = json.loads((results / f"slurm-{job}" / "accuracy" / "mlperf_log_accuracy.json").read_text())
    assert sorted(x["qsl_idx"] for x in entries) == list(range(n))
    assert abs(record["results"]["accuracy"]["f1"] - _direct_oracle_f1(squad_dev, vocab, session_cache, n)) < 1e-9
    assert "lost worker 2" in log


@pytest.mark.timeout(400)
def test_submission_run_under_srun_joins_every_step(cluster, env, squad_dev, vocab, tmp_path):  # noqa: F811
    """`srun --mpi=pmi2 distbert submission run` in a job: rank 0 starts each run (the calibration and
    the submission run; one scenario, to keep it short) as a child coordinator, ranks 1 and 2 join
    both."""
    import sys

    e = _env(env, tmp_path)
    out = tmp_path / "campaign"
    cmd = (f"srun --mpi=pmi2 {sys.executable} -m distbert submission run --out {out} --submitter Acme "
           f"--system box1 --execution-mode test --allow-invalid --backend oracle --dataset {squad_dev} "
           f"--vocab {vocab} --max-examples 300 --max-batch 16 --division open --scenarios Offline")
    proc = cluster.run(["sbatch", "--parsable", "--wait", "-N", "1", "-n", "3", "-c", "1", "-o",
                        str(tmp_path / "job.log"), "--wrap", cmd], env=dict(cluster.env, **e), timeout=360,
                       cwd=str(tmp_path))
    log = (tmp_path / "job.log").read_text() if (tmp_path / "job.log").exists() else proc.stderr
    assert proc.returncode == 0, f"{log[-4000:]}\n{cluster.logs()[-2000:]}"
    for name in ("Offline", "Offline-calibration"):
        record = json.loads((out / "runs" / name / "run.json").read_text())
        assert sorted(w["worker"] for w in record["workers"]) == [1, 2], (name, record["workers"])
    assert (out / "submission" / "mlperf_submission.tar.gz").is_file()
    assert "check (v6.1 rules)" in log
