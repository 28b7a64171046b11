"""Real multi-process runs of the whole engine: real LoadGen, real ZeroMQ/MPI, real processes.

Three launch modes: the single-node fallback (``distbert run --workers 2``), ``mpiexec -n 3``
with the ZeroMQ transport, and ``mpiexec -n 3`` with the MPI transport; every scenario, performance
and accuracy. Harness backends only (null: the plumbing; oracle: every response reached the right
sample, so F1 must equal direct scoring of the same logits). After each run the process table must
hold no process of the run: each run's environment carries a unique ``DISTBERT_TEST_TAG``, which its
workers (local, mpiexec ranks, orphans reparented elsewhere) inherit, so the check sees only the
processes the test itself started, never another distbert job on the machine.

Runs on the data set in use (official or synthetic, tests/conftest.py): sample counts come from it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests.conftest import REPO

PY = sys.executable
MPIEXEC = shutil.which("mpiexec", path=str(Path(PY).parent)) or shutil.which("mpiexec")

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def env(squad_dev, vocab, session_cache) -> dict[str, str]:
    e = dict(os.environ)
    e["DISTBERT_CACHE"] = str(session_cache)
    e["DISTBERT_NO_PROGRESS"] = "1"
    e["PYTHONPATH"] = str(REPO)
    # build the feature cache once for every run in this module
    subprocess.run([PY, "-m", "distbert", "squad", "features", "--dataset", str(squad_dev), "--vocab", str(vocab),
                    "--out", str(session_cache / "features.npz")], env=e, check=True, timeout=300)
    return e


@pytest.fixture(scope="module")
def n_features(squad_dev, vocab, session_cache, env) -> int:
    """QSL size of the data set in use (10833 for the official dev set)."""
    from distbert.data.squad.features import load_features

    return len(load_features(squad_dev, vocab, cache_dir=session_cache))


TAG = "DISTBERT_TEST_TAG"


def _tagged(env: dict[str, str]) -> tuple[dict[str, str], str]:
    """``env`` plus a unique DISTBERT_TEST_TAG, and the tag: every process of the run inherits it."""
    tag = uuid.uuid4().hex
    return dict(env, **{TAG: tag}), tag


def _alive_with_tag(tag: str) -> list[psutil.Process]:
    """Live processes (not zombies) whose environment carries ``tag``: only what this test started."""
    out = []
    for p in psutil.process_iter():
        if p.pid == os.getpid():
            continue
        try:
            if p.environ().get(TAG) == tag and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass   # gone, or another user's process: not ours
    return out


def _assert_none_outlived(tag: str, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while _alive_with_tag(tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = _alive_with_tag(tag)
    assert not alive, f"processes outlived the run: {[(p.pid, p.cmdline()) for p in alive]}"


def _run(args: list[str], env: dict[str, str], squad_dev: Path, vocab: Path, out: Path, launcher: list[str] | None = None,
         timeout: int = 240) -> tuple[subprocess.CompletedProcess[str], dict]:
    cmd = (launcher or []) + [PY, "-m", "distbert", "run", "--dataset", str(squad_dev), "--vocab", str(vocab),
                              "--output", str(out), *args]
    env, tag = _tagged(env)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    _assert_none_outlived(tag)   # no process outlives a run
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr[-4000:]}"
    record = json.loads((out / "run.json").read_text())
    return proc, record


def _direct_oracle_f1(squad_dev: Path, vocab: Path, session_cache: Path, max_examples: int | None) -> float:
    from distbert.backends.harness import oracle_logits
    from distbert.data.squad.accuracy import score_logits
    from distbert.data.squad.features import load_features

    store = load_features(squad_dev, vocab, cache_dir=session_cache)
    n = max_examples or len(store)
    logits = {}
    for i in range(n):
        length = int(store.lengths[i])
        s, e = oracle_logits(np.array([i]), length, store.oracle_start, store.oracle_end)
        logits[i] = np.stack([s[0], e[0]], axis=-1)
    return score_logits(store, logits).f1


LAUNCHES = {
    "local": lambda: (None, ["--workers", "2"]),
    "mpi-zmq": lambda: ([MPIEXEC, "-n", "3"], ["--transport", "zmq"]),
    "mpi-mpi": lambda: ([MPIEXEC, "-n", "3"], ["--transport", "mpi"]),
    "in-process": lambda: (None, ["--in-process-worker"]),
}

SCENARIO_ARGS = {
    # the oracle's batch hint (1024) would give a small data set one batch, so one worker: cap it
    "Offline": ["--max-batch", "128"],
    "Server": ["--target-qps", "4000", "--test-query-count", "3000"],
    "SingleStream": ["--test-query-count", "300", "--spin-us", "100"],   # the receive spin path too
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("launch", list(LAUNCHES))
@pytest.mark.parametrize("scenario", list(SCENARIO_ARGS))
def test_performance_and_accuracy(launch, scenario, env, squad_dev, vocab, session_cache, n_features, tmp_path):
    launcher, extra = LAUNCHES[launch]()
    if launcher is not None and MPIEXEC is None:
        pytest.skip("mpiexec not found next to the Python interpreter (install the 'mpich' wheel)")
    # Offline: the whole QSL; the others a prefix (1500 of the official 10833)
    max_examples = None if scenario == "Offline" else min(1500, n_features * 2 // 3)
    args = ["--backend", "oracle", "--scenario", scenario, "--mode", "both", *extra, *SCENARIO_ARGS[scenario]]
    if max_examples:
        args += ["--max-examples", str(max_examples)]
    proc, record = _run(args, env, squad_dev, vocab, tmp_path / "run", launcher)
    perf = record["results"]["performance"]
    acc = record["results"]["accuracy"]
    assert perf["loadgen_errors"] == 0 and acc["loadgen_errors"] == 0
    # LoadGen's C API (engine/lgnative.py): completions always, the issue side for Offline's big query
    for result in (perf, acc):
        assert result["completion"] == "native"
        assert result["issue"] == ("native" if scenario == "Offline" else "python")
    assert len(record["workers"]) == (1 if launch == "in-process" else 2)
    assert all(w["stats"] and w["stats"]["samples"] > 0 for w in record["workers"]), record["workers"]
    if scenario == "SingleStream" and launch != "in-process":
        # one-sample batches with an idle compute thread run on the worker's I/O thread
        assert all(w["stats"]["inline_batches"] == w["stats"]["batches"] for w in record["workers"])
    if scenario == "Offline" and launch != "in-process":
        assert all(w["stats"]["inline_batches"] == 0 for w in record["workers"])   # batches of 128
    # every response reached the right sample: the distributed F1 equals direct scoring
    assert acc["f1"] == pytest.approx(_direct_oracle_f1(squad_dev, vocab, session_cache, max_examples), abs=1e-9)
    if max_examples is None:
        assert acc["f1"] > 98.0
    log = json.loads((tmp_path / "run" / "accuracy" / "mlperf_log_accuracy.json").read_text())
    assert len({e["qsl_idx"] for e in log}) == (max_examples or n_features)
    for name in ("mlperf_log_summary.txt", "mlperf_log_detail.txt"):
        assert (tmp_path / "run" / "performance" / name).is_file()
    assert (tmp_path / "run" / "accuracy" / "accuracy.txt").read_text().startswith('{"exact_match"')


@pytest.mark.timeout(300)
def test_worker_killed_mid_run_work_is_requeued(env, squad_dev, vocab, n_features, tmp_path):
    """Kill one of three local workers mid-run (sim backend keeps the run long enough): the run must
    still complete every sample exactly once (LoadGen would log an error otherwise) and report the loss."""
    out = tmp_path / "run"
    n = min(3000, n_features)
    batch = max(2, round(16 * n / 3000))   # ~60 batches of 0.1 s per worker: about 6 s, whatever n
    cmd = [PY, "-m", "distbert", "run", "--dataset", str(squad_dev), "--vocab", str(vocab), "--output", str(out),
           "--backend", "sim", "--sim-latency", "0.1", "--workers", "3", "--max-batch", str(batch),
           "--scenario", "Offline", "--mode", "accuracy", "--max-examples", str(n), "--heartbeat-timeout", "3"]
    env, tag = _tagged(env)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = None
    deadline = time.monotonic() + 120
    while victim is None and time.monotonic() < deadline:
        for child in psutil.Process(proc.pid).children(recursive=True):
            if "--rank" in child.cmdline() and child.cmdline()[child.cmdline().index("--rank") + 1] == "2":
                victim = child
        time.sleep(0.2)
    assert victim is not None, "worker 2 never started"
    # wait until the run is underway (the accuracy log directory exists once LoadGen starts)
    while not list(out.parent.glob(".run.partial-*/accuracy/mlperf_log_detail.txt")) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    victim.send_signal(signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-4000:]
    assert "lost worker 2" in stderr
    record = json.loads((out / "run.json").read_text())
    assert record["results"]["accuracy"]["loadgen_errors"] == 0
    log = json.loads((out / "accuracy" / "mlperf_log_accuracy.json").read_text())
    idx = [e["qsl_idx"] for e in log]
    assert sorted(idx) == list(range(n)), "a sample was lost or completed twice"
    lost = [w for w in record["workers"] if w["lost"]]
    assert [w["worker"] for w in lost] == [2]
    assert record["results"]["accuracy"]["dispatcher"]["requeued_batches"] >= 1
    _assert_none_outlived(tag)


@pytest.mark.timeout(180)
def test_every_local_worker_killed_fails_at_once_since_none_can_come_back(env, squad_dev, vocab, n_features,
                                                                          tmp_path):
    """Plain `distbert run`: its local workers are the only workers there can be (no --listen, no
    launcher). When all of them are SIGKILLed mid-run, waiting --rejoin-timeout (60 s) for a rejoin
    would only delay the failure: rank 0 fails within seconds, with one line, and every process ends."""
    out = tmp_path / "run"
    n = min(3000, n_features)
    batch = max(2, round(16 * n / 3000))
    cmd = [PY, "-m", "distbert", "run", "--dataset", str(squad_dev), "--vocab", str(vocab), "--output", str(out),
           "--backend", "sim", "--sim-latency", "0.1", "--workers", "2", "--max-batch", str(batch),
           "--scenario", "Offline", "--mode", "accuracy", "--max-examples", str(n)]
    env, tag = _tagged(env)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.parent.glob(".run.partial-*/accuracy/mlperf_log_detail.txt")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    time.sleep(0.5)
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "--rank" in c.cmdline()]
    assert len(workers) == 2, [c.cmdline() for c in workers]
    killed_at = time.monotonic()
    for child in workers:
        child.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    took = time.monotonic() - killed_at
    assert proc.returncode != 0
    assert "none can come back: the local worker processes exited" in stderr.strip().splitlines()[-1]
    assert took < 15, f"rank 0 took {took:.1f} s to fail (the --rejoin-timeout wait?)"
    assert not out.exists()
    _assert_none_outlived(tag)


@pytest.mark.timeout(120)
def test_multistream_is_refused_with_one_line(env, squad_dev, vocab, tmp_path):
    proc = subprocess.run([PY, "-m", "distbert", "run", "--scenario", "MultiStream", "--backend", "null",
                           "--output", str(tmp_path / "x")], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "MultiStream is not defined for BERT" in proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [["--workers", "2"], ["--in-process-worker"]], ids=["processes", "in-process"])
def test_failing_backend_fails_the_run_with_the_first_cause(env, squad_dev, vocab, tmp_path, workers):
    """A worker whose model cannot load reports why; rank 0 exits non-zero, names the rank, leaves
    only a run directory marked .failed, and no worker survives."""
    out = tmp_path / "run"
    env, tag = _tagged(env)
    proc = subprocess.run([PY, "-m", "distbert", "run", "--dataset", str(squad_dev), "--vocab", str(vocab),
                           "--backend", "onnxruntime", "--model", str(tmp_path / "missing.onnx"), *workers,
                           "--output", str(out)], env=env, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("distbert: error: run failed: worker") and "missing.onnx" in last
    assert not out.exists() and (tmp_path / "run.failed" / "error.txt").is_file()
    _assert_none_outlived(tag)


@pytest.mark.timeout(180)
def test_external_worker_joins_with_connect(env, squad_dev, vocab, n_features, tmp_path):
    """A coordinator listening on TCP with no local workers is joined by `distbert worker --connect`,
    the session key coming from the environment (never the command line)."""
    from tests.wire_peers import free_port

    port = free_port()
    e = dict(env, DISTBERT_SESSION_KEY="c0ffee" * 6)  # 144 bits
    n = min(500, n_features)
    coord = subprocess.Popen([PY, "-m", "distbert", "run", "--dataset", str(squad_dev), "--vocab", str(vocab),
                              "--backend", "oracle", "--mode", "accuracy", "--max-examples", str(n),
                              "--workers", "0", "--expect-workers", "1", "--listen", f"tcp://127.0.0.1:{port}",
                              "--output", str(tmp_path / "run")],
                             env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    worker = subprocess.Popen([PY, "-m", "distbert", "worker", "--connect", f"tcp://127.0.0.1:{port}",
                               "--rank", "7"], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = coord.communicate(timeout=150)
    wout, werr = worker.communicate(timeout=30)
    assert coord.returncode == 0, err[-3000:]
    assert worker.returncode == 0, werr[-3000:]
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [w["worker"] for w in record["workers"]] == [7]
    assert record["workers"][0]["stats"]["samples"] >= n


@pytest.mark.timeout(180)
def test_workers_exit_when_rank0_is_killed(env, squad_dev, vocab, tmp_path):
    """SIGKILL rank 0 mid-run (it cannot clean up): its local workers notice and exit on their own."""
    env, tag = _tagged(env)
    proc = subprocess.Popen([PY, "-m", "distbert", "run", "--dataset", str(squad_dev), "--vocab", str(vocab),
                             "--backend", "sim", "--sim-latency", "0.2", "--max-batch", "8", "--workers", "2",
                             "--output", str(tmp_path / "run")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: list[psutil.Process] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        children = [c for c in psutil.Process(proc.pid).children(recursive=True) if "worker" in " ".join(c.cmdline())]
        if len(children) == 2 and list(tmp_path.glob(".run.partial-*/performance/mlperf_log_detail.txt")):
            break
        time.sleep(0.2)
    assert len(children) == 2
    proc.kill()
    proc.wait(timeout=10)
    gone, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, f"workers outlived a killed rank 0: {[p.pid for p in alive]}"
    _assert_none_outlived(tag, within_s=5)


@pytest.mark.timeout(240)
def test_coordinator_hosts_worker_under_mpiexec_and_user_conf(env, squad_dev, vocab, tmp_path):
    """mpiexec -n 2 with --coordinator-hosts-worker: rank 1 plus rank 0's own local worker both get
    work. A --user-conf reaches LoadGen (one FromConfig), and the file used is kept in the run dir."""
    if MPIEXEC is None:
        pytest.skip("mpiexec not found next to the Python interpreter (install the 'mpich' wheel)")
    conf = tmp_path / "user.conf"
    conf.write_text("bert.Server.target_qps = 3210\n")
    _, record = _run(["--backend", "null", "--scenario", "Server", "--coordinator-hosts-worker",
                      "--user-conf", str(conf), "--test-query-count", "2000"],
                     env, squad_dev, vocab, tmp_path / "run", [MPIEXEC, "-n", "2"])
    assert sorted(w["worker"] for w in record["workers"]) == [1, 2]
    assert all(w["stats"]["samples"] > 0 for w in record["workers"])
    used = (tmp_path / "run" / "performance" / "user.conf").read_text()
    assert "bert.Server.target_qps = 3210" in used
    detail = (tmp_path / "run" / "performance" / "mlperf_log_detail.txt").read_text()
    assert '"key": "requested_server_target_qps", "value": 3210' in detail
    assert "Multiple conf files" not in detail


@pytest.mark.timeout(240)
def test_hostfile_helper_runs_rank0_plus_the_listed_workers(env, squad_dev, vocab, n_features, tmp_path):
    """launch/mpirun-hosts.sh: a hostfile line `localhost:2` gives rank 0 plus 2 workers (hydra's fork
    launcher stands in for ssh, which needs other hosts); a bad line, or a venv without distbert,
    stops with one error. The venv is the one running the tests (DISTBERT_VENV), wherever it lies."""
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("# the cluster\nlocalhost:2\n\n")
    e, tag = _tagged(dict(env, DISTBERT_MPIEXEC_ARGS="-launcher fork", DISTBERT_VENV=sys.prefix))
    n = min(300, n_features)
    proc = subprocess.run(["bash", str(REPO / "launch" / "mpirun-hosts.sh"), str(hosts), "--dataset", str(squad_dev),
                           "--vocab", str(vocab), "--backend", "oracle", "--mode", "accuracy", "--max-examples", str(n),
                           "--max-batch", "16", "--output", str(tmp_path / "run")],
                          env=e, capture_output=True, text=True, timeout=200)
    _assert_none_outlived(tag)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["topology"]["world_size"] == 3 and sorted(w["worker"] for w in record["workers"]) == [1, 2]
    hosts.write_text("localhost:two\n")
    bad = subprocess.run(["bash", str(REPO / "launch" / "mpirun-hosts.sh"), str(hosts)], env=e, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "bad worker count" in bad.stderr
    no_venv = subprocess.run(["bash", str(REPO / "launch" / "mpirun-hosts.sh"), str(hosts)],
                             env=dict(e, DISTBERT_VENV=str(tmp_path)), capture_output=True, text=True, timeout=60)
    assert no_venv.returncode == 2 and no_venv.stderr.startswith(f"distbert: error: no {tmp_path}/bin/distbert")


@pytest.mark.timeout(120)
def test_worker_inline_can_be_turned_off(env, squad_dev, vocab, tmp_path):
    """DISTBERT_WORKER_INLINE=0 (for measuring): every batch goes through the compute thread."""
    e = dict(env, DISTBERT_WORKER_INLINE="0")
    _, record = _run(["--backend", "oracle", "--scenario", "SingleStream", "--test-query-count", "200",
                      "--max-examples", "200", "--workers", "1"], e, squad_dev, vocab, tmp_path / "run")
    stats = record["workers"][0]["stats"]
    assert stats["batches"] >= 200 and stats["inline_batches"] == 0


def test_in_process_worker_refuses_other_workers(env, tmp_path):
    for extra in (["--workers", "2"], ["--expect-workers", "1"], ["--transport", "mpi"]):
        proc = subprocess.run([PY, "-m", "distbert", "run", "--in-process-worker", "--backend", "null", *extra],
                              env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and proc.stderr.strip().startswith("distbert: error: --in-process-worker"), extra


@pytest.mark.timeout(180)
def test_singlestream_in_process_default_is_for_gpus_and_cpus_keep_a_worker_process(env, squad_dev, vocab, tmp_path):
    """--in-process-worker unset, on this CPU: every scenario keeps a worker process (the GPU side of
    the rule is covered by the unit test below; bench/gpu/cmd3_extras.sh runs it in process on a GPU)."""
    cases = [(["--scenario", "SingleStream"], False),
             (["--scenario", "SingleStream", "--in-process-worker"], True),
             (["--scenario", "Offline"], False)]
    for k, (extra, in_rank0) in enumerate(cases):
        out = tmp_path / f"run{k}"
        e, tag = _tagged(env)
        proc = subprocess.Popen([PY, "-m", "distbert", "run", "--dataset", str(squad_dev), "--vocab", str(vocab),
                                 "--backend", "null", "--test-query-count", "200", "--max-examples", "200",
                                 "--output", str(out), *extra], env=e, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        _, stderr = proc.communicate(timeout=120)
        _assert_none_outlived(tag)
        assert proc.returncode == 0, stderr[-3000:]
        record = json.loads((out / "run.json").read_text())
        assert record["config"]["in_process_worker"] is in_rank0, extra
        assert (record["workers"][0]["info"]["pid"] == proc.pid) is in_rank0, extra


def test_in_process_default_follows_the_device_and_the_flags(monkeypatch):
    from distbert.backends.base import BackendSpec
    from distbert.config import BatchConfig, LoadGenConfig, RunConfig
    from distbert.run.rank0 import with_in_process_default

    def cfg(scenario="SingleStream", device="cpu", **kw):
        return RunConfig(loadgen=LoadGenConfig(scenario=scenario), backend=BackendSpec(name="null", device=device),
                         batch=BatchConfig(), **kw)

    assert with_in_process_default(cfg(), launched=False).in_process_worker is False    # CPU: a worker process
    for device in ("cuda", "cuda:3", "rocm"):
        assert with_in_process_default(cfg(device=device), launched=False).in_process_worker is True, device
    assert with_in_process_default(cfg(device="cuda"), launched=True).in_process_worker is False
    for kw in ({"workers": 1}, {"expect_workers": 1}, {"listen": "tcp://127.0.0.1:0"}, {"transport": "mpi"},
               {"coordinator_hosts_worker": True}, {"in_process_worker": False}):
        assert with_in_process_default(cfg(device="cuda", **kw), launched=False).in_process_worker is False, kw
    for scenario in ("Offline", "Server", "MultiStream"):
        assert with_in_process_default(cfg(scenario, device="cuda"), launched=False).in_process_worker is False
    monkeypatch.setenv("DISTBERT_LOCAL_SLOT", "1,2,4")   # a slot was chosen: only a worker process takes it
    assert with_in_process_default(cfg(device="cuda"), launched=False).in_process_worker is False
