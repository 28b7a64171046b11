"""Failures on a real (namespaced) network: hosts are Linux network namespaces on a bridge.

Rank 0 (`distbert run --listen tcp://<host 0>:P --expect-workers 2`, oracle backend paced with
``oracle_latency`` so a run lasts ~30 s) on host 0, `distbert worker --connect` on hosts 1 and 2.
A link cut mid-run and restored, a worker SIGKILLed and restarted with its rank, rank 0 SIGKILLed.
Where the run survives, every sample is answered exactly once with the oracle's F1; where it cannot,
every process is gone within 5 s. Recovery times are printed (``-s``) for the README.
Root only (namespaces); skipped elsewhere with the reason.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import netns
from tests.conftest import launchers_unavailable
from tests.run_checks import finished_run
from tests.test_engine_mp import _assert_none_outlived, _direct_oracle_f1, _tagged, env, n_features  # noqa: F401

PY = sys.executable
PORT = 5555
# A run: the first N samples of the data set in use (all of a smaller set, such as the synthetic one's
# 665), --max-batch 4, each batch paced so that a run lasts ~20 s with two workers, ~40 s with one,
# whatever the set's size: the cuts and kills below need that long.
N = 800
RUN_S = 20.0


def run_size(features: int) -> tuple[int, float]:
    """(samples, oracle seconds per batch) for a data set of ``features``: ~RUN_S s with two workers."""
    n = min(N, features)
    return n, round(RUN_S * 2 * 4 / n, 4)

pytestmark = [pytest.mark.slow]


@dataclass
class NetRun:
    lan: netns.Lan
    out: Path
    logs: Path
    env: dict[str, str]
    tag: str
    n: int          # samples in the run
    rank0: subprocess.Popen | None = None
    workers: dict[int, subprocess.Popen] = field(default_factory=dict)

    def log(self, who: str = "rank0") -> str:
        return (self.logs / f"{who}.err").read_text(errors="replace")

    def start_worker(self, rank: int, name: str | None = None) -> subprocess.Popen:
        name = name or f"worker{rank}"
        cmd = self.lan.cmd(rank, [PY, "-m", "distbert", "worker", "--connect",
                                  f"tcp://{self.lan.address(0)}:{PORT}", "--rank", str(rank)])
        p = subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=open(self.logs / f"{name}.err", "w"))
        self.workers[rank] = p
        return p

    def wait_log(self, text: str, timeout: float, who: str = "rank0", count: int = 1) -> float:
        """Seconds until ``text`` appears ``count`` times in ``who``'s log."""
        t0 = time.monotonic()
        while self.log(who).count(text) < count:
            assert self.rank0 is None or self.rank0.poll() is None or who != "rank0", \
                f"rank 0 exited before {text!r}:\n{self.log()[-3000:]}"
            assert time.monotonic() - t0 < timeout, f"no {text!r} within {timeout} s:\n{self.log(who)[-3000:]}"
            time.sleep(0.05)
        return time.monotonic() - t0

    def finish(self, squad_dev: Path, vocab: Path, session_cache: Path, timeout: float = 180) -> dict:
        assert self.rank0 is not None
        record = finished_run(self.rank0, self.workers.values(), self.logs / "rank0.err", self.tag, self.out,
                              self.n, timeout)
        f1 = record["results"]["accuracy"]["f1"]
        assert abs(f1 - _direct_oracle_f1(squad_dev, vocab, session_cache, self.n)) < 1e-9
        return record


@pytest.fixture
def netrun(env, squad_dev, vocab, n_features, tmp_path):  # noqa: F811 - env, n_features: the shared fixtures
    from distbert.wire.keys import new_session_key

    launchers_unavailable(netns.available())
    lan = netns.Lan(3)
    e, tag = _tagged(dict(env, DISTBERT_SESSION_KEY=new_session_key()))
    logs = tmp_path / "logs"
    logs.mkdir()
    n, batch_s = run_size(n_features)
    run = NetRun(lan, tmp_path / "run", logs, e, tag, n)

    def start(workers: tuple[int, ...] = (1, 2)) -> NetRun:
        run.rank0 = subprocess.Popen(
            lan.cmd(0, [PY, "-m", "distbert", "run", "--dataset", str(squad_dev), "--vocab", str(vocab),
                        "--backend", "oracle", "--option", f"oracle_latency={batch_s}", "--max-batch", "4",
                        "--mode", "accuracy", "--max-examples", str(n), "--workers", "0",
                        "--expect-workers", str(len(workers)), "--listen", f"tcp://{lan.address(0)}:{PORT}",
                        "--output", str(run.out)]),
            env=e, stdout=subprocess.DEVNULL, stderr=open(logs / "rank0.err", "w"))
        for r in workers:
            run.start_worker(r)
        for r in workers:
            run.wait_log(f"worker {r} ready", 90)
        return run

    yield start
    for p in [run.rank0, *run.workers.values()]:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()
    lan.close()


@pytest.mark.timeout(300)
def test_link_cuts_short_and_long(netrun, squad_dev, vocab, session_cache):
    """A 3 s cut (inside the 10 s heartbeat window) loses nothing and nobody is declared lost; a 15 s
    cut loses worker 1 (its batches requeued to worker 2), and when the link is back worker 1 is
    taken back and gets work again. The run completes exactly once throughout."""
    run = netrun()
    time.sleep(1.0)
    run.lan.cut(1)
    time.sleep(3.0)
    run.lan.restore(1)
    time.sleep(2.0)
    assert "lost worker 1" not in run.log()
    run.lan.cut(1)
    lost_after = run.wait_log("lost worker 1", 30)
    time.sleep(max(0.0, 15.0 - lost_after))
    run.lan.restore(1)
    back_after = run.wait_log("is heard from again", 60)
    record = run.finish(squad_dev, vocab, session_cache)
    w1 = next(w for w in record["workers"] if w["worker"] == 1)
    assert not w1["lost"]
    print(f"\nlink cut: worker 1 declared lost {lost_after:.1f} s after the cut; "
          f"taken back {back_after:.1f} s after the link returned")


@pytest.mark.timeout(300)
def test_worker_killed_and_restarted_with_its_rank(netrun, squad_dev, vocab, session_cache):
    """SIGKILL worker 1 mid-run and start a new one with rank 1 at once (before rank 0 has noticed
    the loss): the newcomer is a pending restart; at its Ready the old connection's batches are
    requeued and the newcomer gets work."""
    run = netrun()
    time.sleep(2.0)
    run.workers[1].send_signal(signal.SIGKILL)
    run.workers[1].wait(10)
    t0 = time.monotonic()
    run.start_worker(1, name="worker1b")
    run.wait_log("worker 1 ready again", 60)
    readmitted = time.monotonic() - t0
    record = run.finish(squad_dev, vocab, session_cache)
    w1 = next(w for w in record["workers"] if w["worker"] == 1)
    assert not w1["lost"] and w1["stats"]["samples"] > 0   # the restarted worker did work
    print(f"\nworker restart: the new rank 1 was working {readmitted:.1f} s after it was started")


@pytest.mark.timeout(200)
def test_rank0_killed_every_worker_exits_3_within_5_s(netrun):
    run = netrun()
    time.sleep(2.0)
    assert run.rank0 is not None
    run.rank0.send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    codes = {r: p.wait(15) for r, p in run.workers.items()}
    took = time.monotonic() - t0
    assert codes == {1: 3, 2: 3}, codes
    assert took < 5.0, f"workers took {took:.1f} s to leave"
    assert "rank 0 at" in run.log("worker1") and "is gone" in run.log("worker1")
    _assert_none_outlived(run.tag, within_s=5)
    print(f"\nrank 0 killed: every worker gone {took:.1f} s later (exit 3)")
