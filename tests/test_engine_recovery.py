"""Faults a run survives (issue 20, docs/faults.md): a lost worker's connection, a restart of the
only worker, every worker gone at once, a Hello after the last test, a failure on the direct path.

Processes: rank 0 is ``distbert run --workers 0 --expect-workers K --listen tcp://127.0.0.1:P`` and
each worker a ``distbert worker --connect`` process, over real ZeroMQ (CURVE), with real LoadGen and
the oracle backend paced by ``oracle_latency`` so a run lasts a few seconds; every fault is timed by
a line of rank 0's log (never a fixed sleep), and where the run survives every sample is answered
exactly once with the oracle's exact F1. In-process: the coordinator with a real ZeroMQ transport or
the in-process worker, for the cases that need a window no process timing can hold open.
Runs on the data set in use (official or synthetic): sizes come from it.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from distbert.backends.base import BackendSpec
from distbert.config import BatchConfig, LoadGenConfig, RunConfig
from distbert.engine.dispatcher import BatchPolicy, Dispatcher, NoWorkers, SendBatch
from tests.run_checks import finished_run
from tests.test_engine_mp import _assert_none_outlived, _direct_oracle_f1, _tagged, env, n_features  # noqa: F401
from tests.wire_peers import free_port

PY = sys.executable
PACE = "0.05"   # oracle seconds per batch: 4-sample batches, so N samples take ~N/80 s on one worker


def _n(features: int) -> int:
    """Samples per run: ~5 s on one worker at PACE, fewer where the data set is smaller."""
    return min(400, features)


@dataclass
class Run:
    """Rank 0 and its ``distbert worker --connect`` processes, each logging to its own file."""

    out: Path
    logs: Path
    env: dict[str, str]
    tag: str
    port: int
    n: int
    rank0: subprocess.Popen | None = None
    workers: dict[int, subprocess.Popen] = field(default_factory=dict)

    def log(self, who: str = "rank0") -> str:
        return (self.logs / f"{who}.err").read_text(errors="replace")

    def start_worker(self, rank: int, name: str | None = None) -> subprocess.Popen:
        p = subprocess.Popen([PY, "-m", "distbert", "worker", "--connect", f"tcp://127.0.0.1:{self.port}",
                              "--rank", str(rank)], env=self.env, stdout=subprocess.DEVNULL,
                             stderr=open(self.logs / f"{name or f'worker{rank}'}.err", "w"))
        self.workers[rank] = p
        return p

    def wait_log(self, text: str, timeout: float, who: str = "rank0", poll: float = 0.05) -> float:
        """The monotonic time at which ``text`` was first seen in ``who``'s log."""
        t0 = time.monotonic()
        while text not in self.log(who):
            assert self.rank0 is None or self.rank0.poll() is None or who != "rank0", \
                f"rank 0 exited before {text!r}:\n{self.log()[-3000:]}"
            assert time.monotonic() - t0 < timeout, f"no {text!r} within {timeout} s:\n{self.log(who)[-3000:]}"
            time.sleep(poll)
        return time.monotonic()

    def kill(self, rank: int) -> float:
        """SIGKILL worker ``rank``; the monotonic time of the kill."""
        t = time.monotonic()
        self.workers[rank].send_signal(signal.SIGKILL)
        self.workers[rank].wait(10)
        return t

    def finish(self, squad_dev: Path, vocab: Path, session_cache: Path, timeout: float = 120) -> dict:
        """Rank 0 exits 0; every sample answered exactly once with the oracle's F1; nothing outlives it."""
        assert self.rank0 is not None
        record = finished_run(self.rank0, self.workers.values(), self.logs / "rank0.err", self.tag, self.out,
                              self.n, timeout)
        assert record["results"]["accuracy"]["loadgen_errors"] == 0
        assert record["results"]["accuracy"]["f1"] == pytest.approx(
            _direct_oracle_f1(squad_dev, vocab, session_cache, self.n), abs=1e-9)
        return record


@pytest.fixture
def cluster(env, squad_dev, vocab, n_features, tmp_path):  # noqa: F811 - env is the shared fixture imported above
    from distbert.wire.keys import new_session_key

    runs: list[Run] = []

    def start(workers: tuple[int, ...] = (1,), extra: tuple[str, ...] = ()) -> Run:
        e, tag = _tagged(dict(env, DISTBERT_SESSION_KEY=new_session_key()))
        logs = tmp_path / "logs"
        logs.mkdir()
        run = Run(tmp_path / "run", logs, e, tag, free_port(), _n(n_features))
        runs.append(run)
        run.rank0 = subprocess.Popen(
            [PY, "-m", "distbert", "run", "--dataset", str(squad_dev), "--vocab", str(vocab), "--backend", "oracle",
             "--option", f"oracle_latency={PACE}", "--max-batch", "4", "--mode", "accuracy",
             "--max-examples", str(run.n), "--workers", "0", "--expect-workers", str(len(workers)),
             "--listen", f"tcp://127.0.0.1:{run.port}", "--output", str(run.out), *extra],
            env=e, stdout=subprocess.DEVNULL, stderr=open(logs / "rank0.err", "w"))
        for r in workers:
            run.start_worker(r)
        run.wait_log("first result of the test", 90)   # the test is under way, batches in flight
        return run

    yield start
    for run in runs:
        for p in [run.rank0, *run.workers.values()]:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


pytestmark = [pytest.mark.slow]


@pytest.mark.timeout(180)
def test_the_only_worker_killed_and_restarted_with_its_rank_completes_the_run(cluster, squad_dev, vocab,
                                                                             session_cache):
    """One worker, SIGKILLed mid-run and started again at once with its rank: rank 0 waits for it
    (--rejoin-timeout) instead of failing, and the run completes exactly once."""
    run = cluster((1,))
    run.kill(1)
    run.start_worker(1, "worker1b")
    record = run.finish(squad_dev, vocab, session_cache)
    log = run.log()
    assert "lost worker 1" in log and "worker 1 ready again" in log and "worker 1 is back after" in log, log[-3000:]
    assert "cannot be processed" not in log
    w1 = next(w for w in record["workers"] if w["worker"] == 1)
    assert not w1["lost"] and w1["stats"]["samples"] > 0   # the new process did work (its Bye's stats)


@pytest.mark.timeout(180)
def test_a_killed_worker_is_declared_lost_within_200_ms_without_a_replacement(cluster, squad_dev, vocab,
                                                                             session_cache):
    """Two workers, one SIGKILLed and not replaced: its closed connection makes it lost within
    0.2 s (not at the 10 s heartbeat), its batches go to the other, nothing more is sent to it."""
    run = cluster((1, 2))
    killed = run.kill(2)
    seen = run.wait_log("lost worker 2", 10, poll=0.002)
    took = seen - killed
    record = run.finish(squad_dev, vocab, session_cache)
    log = run.log()
    assert took <= 0.2, f"worker 2 declared lost {took:.3f} s after the kill"
    assert "its connection" in log.split("lost worker 2", 1)[1].splitlines()[0]   # the monitor, not the heartbeat
    after = log.split("lost worker 2", 1)[1]
    assert "for worker 2" not in after, "something was sent into the closed connection"
    assert [w["worker"] for w in record["workers"] if w["lost"]] == [2]
    assert record["results"]["accuracy"]["dispatcher"]["requeued_batches"] >= 1
    assert "all 2 workers ready" in log   # external workers counted (the log said "all 0")
    print(f"\nkilled worker declared lost {took * 1000:.1f} ms after the kill")


@pytest.mark.timeout(180)
def test_every_worker_killed_then_one_restarted_within_the_rejoin_timeout_completes(cluster, squad_dev, vocab,
                                                                                    session_cache):
    run = cluster((1, 2))
    run.kill(1)
    run.kill(2)
    run.wait_log("samples wait for a worker to join or return", 10)
    run.start_worker(2, "worker2b")
    run.finish(squad_dev, vocab, session_cache)
    assert "worker 2 is back after" in run.log()


@pytest.mark.timeout(120)
def test_every_worker_gone_and_none_back_fails_after_the_rejoin_timeout_with_one_line(cluster):
    """No worker comes back: rank 0 says every few seconds that it waits and how many samples are
    pending, then fails the run after --rejoin-timeout with one line naming the flag."""
    run = cluster((1,), extra=("--rejoin-timeout", "6", "--heartbeat-timeout", "2"))
    killed = run.kill(1)
    assert run.rank0 is not None
    rc = run.rank0.wait(60)
    took = time.monotonic() - killed
    log = run.log()
    assert rc == 2, log[-3000:]
    assert 5.5 <= took <= 20, f"failed {took:.1f} s after the kill (--rejoin-timeout 6)"
    assert re.search(r"no worker for \d+ s: \d+ samples pending", log), log[-3000:]   # the periodic line
    last = log.strip().splitlines()[-1]
    assert last.startswith("distbert: error: run failed: every worker is lost and none came back within 6 s "
                           "(--rejoin-timeout);") and "samples cannot be processed" in last, last
    _assert_none_outlived(run.tag)


# --- in-process: the coordinator with a real ZeroMQ transport, or the in-process worker ----------------


@pytest.fixture(scope="module")
def store(squad_dev, vocab, session_cache):
    from distbert.data.squad.features import load_features

    return load_features(squad_dev, vocab, cache_dir=session_cache)


def _cfg(store, scenario: str = "Offline", **kw) -> RunConfig:
    return RunConfig(loadgen=LoadGenConfig(scenario=scenario, mode="performance"), backend=BackendSpec("oracle"),
                     batch=BatchConfig(max_batch=4), features_path=str(store.path), **kw)


@pytest.mark.timeout(60)
def test_a_hello_after_the_last_test_is_told_to_stop_and_not_waited_for(store, tmp_path):
    """A worker that says Hello while rank 0 stops (after its last test) gets a Shutdown, not a Setup,
    and rank 0's stop does not wait for it. Worker 2 is a raw peer (a worker transport answered by
    hand) that holds the stop open until the test lets it say Bye."""
    from distbert.engine.coordinator import Coordinator
    from distbert.engine.worker import worker_run
    from distbert.wire import messages as m
    from distbert.wire.keys import new_session_key
    from distbert.wire.zmq import ZmqCoordinatorTransport, ZmqWorkerTransport

    cfg = _cfg(store)
    transport = ZmqCoordinatorTransport.bind(f"ipc://{tmp_path}/rank0.sock", new_session_key())
    coord = Coordinator(cfg, transport, store.lengths, expected_workers={1, 2})
    w1 = threading.Thread(target=worker_run, args=(ZmqWorkerTransport.connect(transport.endpoint, 1), 1),
                          kwargs={"pin": False}, daemon=True)
    w1.start()
    raw = ZmqWorkerTransport.connect(transport.endpoint, 2)   # says Hello; answered by hand below
    late = None
    stopper = threading.Thread(target=coord.stop, name="stop", daemon=True)
    try:
        starter = threading.Thread(target=coord.start, daemon=True)
        starter.start()
        assert isinstance(raw.recv(10), m.Setup)
        raw.send(m.Ready(rank=2, host="raw", device="cpu", backend="oracle", max_batch=1, info_json="{}"))
        starter.join(30)
        assert not starter.is_alive() and coord.workers[1].ready and coord.workers[2].ready
        t0 = time.monotonic()
        stopper.start()
        got = raw.recv(10)
        while isinstance(got, (m.Batch, m.Heartbeat)):
            got = raw.recv(10)
        assert isinstance(got, m.Shutdown), got   # rank 0 is stopping and waits for worker 2's Bye
        late = ZmqWorkerTransport.connect(transport.endpoint, 7)
        answer = late.recv(10)
        while isinstance(answer, m.Heartbeat):
            answer = late.recv(10)
        assert isinstance(answer, m.Shutdown), f"a late Hello was answered with {answer!r}"
        # a restart of worker 1, whose process said Bye and closed its connection: the Shutdown goes to
        # the new connection (the old one is closed)
        w1.join(10)
        deadline = time.monotonic() + 5
        while not transport._closed_peers and time.monotonic() < deadline:   # rank 0 saw the close
            time.sleep(0.01)
        assert transport._closed_peers, "rank 0 never saw worker 1's connection close"
        late1 = ZmqWorkerTransport.connect(transport.endpoint, 1)
        try:
            answer = late1.recv(10)
            assert isinstance(answer, m.Shutdown), f"a late restart's Hello was answered with {answer!r}"
        finally:
            late1.close()
        raw.send(m.Bye(rank=2, stats_json="{}"))
        stopper.join(15)
        took = time.monotonic() - t0
        assert not stopper.is_alive()
        assert took < 5.0, f"stop took {took:.1f} s: it waited for the late worker"
        assert 7 not in coord.workers   # nothing set up, nothing waited for
        assert coord.failure is None
    finally:
        coord.stop(deadline_s=2.0)
        w1.join(10)
        for t in (raw, late):
            if t is not None:
                t.close()
        transport.close()


@pytest.mark.timeout(120)
def test_the_only_worker_restarted_before_its_loss_is_noticed_never_leaves_the_run_without_workers(
        store, tmp_path):
    """A new connection says Hello for the only worker's rank while the old one still counts (no
    close seen: the in-process transport has none), under --rejoin-timeout 0: at its Ready the old
    one's batches are requeued and the new one takes over with no moment without a worker, so the
    run does not fail with "every worker is lost" (issue 20: it did)."""
    from distbert.engine.worker import worker_run
    from distbert.run.loadgen import run_test
    from tests.inproc_cluster import start_cluster, stop_cluster

    cfg = _cfg(store, rejoin_timeout_s=0.0).replace(
        backend=BackendSpec("oracle", options=(("oracle_latency", "0.01"),)))
    n = min(400, len(store))
    coord, threads, hub = start_cluster(cfg, store, 1)
    restarted: list[threading.Thread] = []

    def restart_mid_test() -> None:
        while coord.dispatcher is None or coord.dispatcher.samples_completed < 8:
            time.sleep(0.005)   # polling the run's state (not waiting for a fault to land)
        t = threading.Thread(target=worker_run, args=(hub.connect(1), 1), kwargs={"pin": False}, daemon=True)
        t.start()
        restarted.append(t)

    helper = threading.Thread(target=restart_mid_test, daemon=True)
    helper.start()
    try:
        result = run_test(cfg.replace(loadgen=LoadGenConfig(scenario="Offline", test_query_count=n)), coord,
                          len(store), "performance", tmp_path / "perf")
        helper.join(10)
        assert coord.failure is None, coord.failure
        assert restarted, "the restart never happened"
        stats = result["dispatcher"]
        assert stats["samples_completed"] == stats["samples_issued"] == n
        assert stats["workers"][1]["alive"]
    finally:
        stop_cluster(coord, threads + restarted, hub)


def test_dispatcher_replace_worker_requeues_without_a_moment_of_no_workers():
    d = Dispatcher("Offline", BatchPolicy(max_batch=4, credits=2), np.full(64, 100), want_logits=False)
    d.add_worker(1, 0.0)
    out = d.on_samples(np.arange(16, dtype=np.uint64), np.arange(16, dtype=np.int64), 0.0)
    sent = [i for i in out if isinstance(i, SendBatch)]
    assert len(sent) == 2 and d.in_flight(1) == 2
    out = d.replace_worker(1, 1.0)
    assert not any(isinstance(i, NoWorkers) for i in out)
    resent = [i for i in out if isinstance(i, SendBatch)]
    assert [i.worker for i in resent] == [1, 1]
    assert {i.batch_id for i in resent}.isdisjoint({i.batch_id for i in sent})   # new ids: late replies drop
    np.testing.assert_array_equal(np.concatenate([i.ids for i in resent]), np.concatenate([i.ids for i in sent]))
    assert d.on_result(1, sent[0].batch_id, 2.0) == []                            # the old connection's reply
    assert d.stats["requeued_batches"] == 2
    # a real loss of the only worker still says so
    assert any(isinstance(i, NoWorkers) for i in d.remove_worker(1, 3.0))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["on_samples", "on_result"])
def test_an_exception_on_the_direct_path_never_reaches_loadgen(store, tmp_path, monkeypatch, where):
    """The in-process worker's direct path (a one-sample query run on LoadGen's issue thread) fails:
    before the dispatcher took the sample, or after. LoadGen's thread sees no exception, the test
    ends with every query completed, and the run fails with one line naming the cause."""
    from distbert.engine import dispatcher as dmod
    from distbert.engine.coordinator import Coordinator
    from distbert.engine.inline import InlineWorker
    from distbert.run.loadgen import run_test

    real = getattr(dmod.Dispatcher, where)
    calls = {"n": 0}

    def explode(self, *args, **kwargs):
        if threading.current_thread().name != "distbert-driver":   # LoadGen's issue thread: the direct path
            calls["n"] += 1
            if calls["n"] == 20:
                raise RuntimeError("injected direct-path bug")
        return real(self, *args, **kwargs)

    cfg = _cfg(store, "SingleStream", in_process_worker=True)
    transport = InlineWorker(rank=1)
    coord = Coordinator(cfg, transport, store.lengths, expected_workers={1})
    try:
        coord.start()
        monkeypatch.setattr(dmod.Dispatcher, where, explode)
        result = run_test(cfg.replace(loadgen=LoadGenConfig(scenario="SingleStream", test_query_count=100)), coord,
                          len(store), "performance", tmp_path / "ss")
    finally:
        coord.stop(deadline_s=5.0)
        transport.close()
    assert calls["n"] >= 20
    assert coord.failure == "rank 0's in-process worker path failed: RuntimeError: injected direct-path bug"
    assert result.get("result_validity") in ("VALID", "INVALID")   # LoadGen ended the test and logged it


# --- between campaign steps: deadlines, and the child run's watchdog --------------------------------


_STEP_WAIT_PROG = r"""
import os, sys, time, types
T_END = time.monotonic() + float(sys.argv[1]) + 5   # every rank leaves at about this time (no MPI_Finalize:
from mpi4py import MPI                               # a broadcast is still pending, it would wait for it)
from distbert.cli.logs import setup_logging
from distbert.submission.campaign import launched_worker_loop
comm = MPI.COMM_WORLD
rank = comm.Get_rank()
setup_logging(rank)
if rank != 0:        # rank 0 never sends the next step (it died, or a rank on the broadcast's path did)
    t0 = time.monotonic()
    code = launched_worker_loop(types.SimpleNamespace(rank=rank), comm, step_wait_s=float(sys.argv[1]))
    print(f"rank {rank} returned {code} after {time.monotonic() - t0:.1f} s", flush=True)
time.sleep(max(0.0, T_END - time.monotonic()))
os._exit(0)
"""


@pytest.mark.timeout(120)
def test_a_launched_rank_waiting_for_the_next_step_gives_up_after_its_deadline(env, tmp_path):  # noqa: F811
    """`mpiexec -n 3`: rank 0 never broadcasts the next step; ranks 1 and 2 leave the wait after their
    deadline with status 3 and a line saying why, instead of waiting forever."""
    from tests.test_engine_mp import MPIEXEC

    if MPIEXEC is None:
        pytest.skip("mpiexec not found next to the Python interpreter (install the 'mpich' wheel)")
    prog = tmp_path / "step_wait.py"
    prog.write_text(_STEP_WAIT_PROG)
    e, tag = _tagged(env)
    proc = subprocess.run([MPIEXEC, "-n", "3", PY, str(prog), "2"], env=e, capture_output=True, text=True, timeout=90)
    _assert_none_outlived(tag)
    # (no exit status check: the ranks leave without MPI_Finalize, which hydra may report as a bad termination)
    for rank in (1, 2):
        line = next((x for x in proc.stdout.splitlines() if x.startswith(f"rank {rank} returned")), None)
        assert line is not None, f"rank {rank} never left its wait:\n{proc.stdout}\n{proc.stderr[-3000:]}"
        code, took = int(line.split()[3]), float(line.split()[5])
        assert code == 3 and 2.0 <= took < 10.0, line
    assert proc.stderr.count("no word from rank 0 within 2 s") == 2, proc.stderr[-3000:]


_ORCHESTRATOR_PROG = r"""
import os, subprocess, sys, time
env = dict(os.environ, DISTBERT_PARENT_PID=str(os.getpid()))
child = subprocess.Popen(sys.argv[2:], env=env, stderr=open(sys.argv[1], "w"), stdout=subprocess.DEVNULL)
print(child.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.timeout(180)
def test_a_killed_orchestrator_stops_its_child_run_and_the_child_s_workers(env, squad_dev, vocab, n_features,  # noqa: F811
                                                                          tmp_path):
    """A stand-in for `distbert submission run` starts a child `distbert run` (DISTBERT_PARENT_PID set,
    as the campaign does), joined by a `distbert worker --connect`; the stand-in is SIGKILLed mid-run.
    The child's watchdog fails the run with one line, and its worker exits 3 (rank 0 is gone), so a
    launched rank would not wait for a next step."""
    from distbert.wire.keys import new_session_key

    e, tag = _tagged(dict(env, DISTBERT_SESSION_KEY=new_session_key()))
    port = free_port()
    child_log = tmp_path / "child.err"
    prog = tmp_path / "orchestrator.py"
    prog.write_text(_ORCHESTRATOR_PROG)
    orchestrator = subprocess.Popen(
        [PY, str(prog), str(child_log), PY, "-m", "distbert", "run", "--dataset", str(squad_dev), "--vocab", str(vocab),
         "--backend", "oracle", "--option", "oracle_latency=0.2", "--max-batch", "4", "--mode", "accuracy",
         "--max-examples", str(_n(n_features)), "--workers", "0", "--expect-workers", "1",
         "--listen", f"tcp://127.0.0.1:{port}", "--output", str(tmp_path / "run")],
        env=e, stdout=subprocess.PIPE, text=True)
    worker = subprocess.Popen([PY, "-m", "distbert", "worker", "--connect", f"tcp://127.0.0.1:{port}", "--rank", "1"],
                              env=e, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "worker.err", "w"))
    try:
        assert orchestrator.stdout is not None
        child = int(orchestrator.stdout.readline())
        run = Run(tmp_path / "run", tmp_path, e, tag, port, _n(n_features))
        (tmp_path / "rank0.err").symlink_to(child_log)
        run.wait_log("first result of the test", 90)
        orchestrator.send_signal(signal.SIGKILL)
        orchestrator.wait(10)
        t0 = time.monotonic()
        assert worker.wait(30) == 3, (tmp_path / "worker.err").read_text()[-2000:]
        took = time.monotonic() - t0
        deadline = time.monotonic() + 30
        while psutil_alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not psutil_alive(child), "the child run outlived its orchestrator"
        log = child_log.read_text()
        assert f"the process that started this run (pid {orchestrator.pid}) is gone" in log, log[-3000:]
        assert log.strip().splitlines()[-1].startswith("distbert: error: run failed: the process that started "
                                                       "this run"), log[-2000:]
        assert took < 10, f"the worker took {took:.1f} s to leave"
        _assert_none_outlived(tag)
    finally:
        for p in (orchestrator, worker):
            if p.poll() is None:
                p.kill()
                p.wait()


def psutil_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --- the transport's part: a closed connection is reported, once, for the right worker ---------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scheme", ["tcp", "ipc"])
def test_zmq_reports_a_closed_connection_for_its_worker_and_sends_nothing_into_it(tmp_path, scheme):
    """Worker 1's connection closes (its process would have died; here its transport closes) while
    worker 2 stays: rank 0's transport returns PeerGone for worker 1 only, after what it sent before;
    a send to it is dropped as "closed"; a restart's new connection that closes before its Ready is
    reported as pending; a new connection for rank 1 works."""
    from distbert.wire import messages as m
    from distbert.wire.base import PeerGone
    from distbert.wire.keys import new_session_key
    from distbert.wire.zmq import ZmqCoordinatorTransport, ZmqWorkerTransport

    address = f"tcp://127.0.0.1:{free_port()}" if scheme == "tcp" else f"ipc://{tmp_path}/r0.sock"
    coord = ZmqCoordinatorTransport.bind(address, new_session_key())
    peers = []

    def recv() -> tuple:
        got = coord.recv(5)
        assert got is not None, "nothing within 5 s"
        return got

    try:
        w1, w2 = (ZmqWorkerTransport.connect(coord.endpoint, r) for r in (1, 2))
        peers += [w1, w2]
        assert {recv()[0] for _ in range(2)} == {1, 2}          # the Hellos
        w1.send(m.Heartbeat(1, 1.0))
        w1.close()
        t0 = time.monotonic()
        assert recv() == (1, m.Heartbeat(1, 1.0))               # what it sent first comes first
        worker, gone = recv()
        assert worker == 1 and isinstance(gone, PeerGone) and not gone.pending, gone
        assert time.monotonic() - t0 < 0.5
        coord.send(1, m.Heartbeat(0, 1.0))
        assert coord.drops.get("closed") == 1 and "unreachable" not in coord.drops
        assert coord.recv(0.3) is None                          # once, and nothing for worker 2
        pending = ZmqWorkerTransport.connect(coord.endpoint, 2)   # a restart of 2 (Hello only) ...
        peers.append(pending)
        assert recv()[0] == 2
        pending.close()                                         # ... whose connection closes before Ready
        worker, gone = recv()
        assert worker == 2 and isinstance(gone, PeerGone) and gone.pending
        coord.send(2, m.Heartbeat(0, 2.0))                      # worker 2's own connection is untouched
        assert w2.recv(5) == m.Heartbeat(0, 2.0)
        again = ZmqWorkerTransport.connect(coord.endpoint, 1)  # rank 1 again, on a new connection
        peers.append(again)
        assert recv()[0] == 1
        coord.send(1, m.Setup("{}"))
        assert again.recv(5) == m.Setup("{}")
    finally:
        for p in peers:
            p.close()
        coord.close()
