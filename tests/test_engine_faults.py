"""A worker that breaks the protocol never reaches LoadGen, and a dying driver never hangs a test.

In-process cluster (real LoadGen, real coordinator and workers, the oracle backend) with the
coordinator's transport wrapped so that messages from worker 2 are altered on the way in: what a
buggy or hostile key holder could send. Every sample must still be answered exactly once with the
right logits (the oracle's F1), by the genuine worker.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from distbert.backends.base import BackendSpec
from distbert.config import BatchConfig, LoadGenConfig, RunConfig
from distbert.data.squad.accuracy import score_log
from distbert.engine.coordinator import RunFailed
from distbert.run.loadgen import run_test
from distbert.wire import messages as m
from tests.inproc_cluster import make_cluster, start_cluster, stop_cluster


@pytest.fixture(scope="module")
def store(squad_dev, vocab, session_cache):
    from distbert.data.squad.features import load_features

    return load_features(squad_dev, vocab, cache_dir=session_cache)


class _Tamper:
    """The coordinator's transport, with ``alter(msg) -> msg`` applied to worker 2's messages."""

    def __init__(self, inner, alter) -> None:
        self._inner = inner
        self._alter = alter
        self.altered = 0

    def recv(self, timeout=None):
        got = self._inner.recv(timeout=timeout)
        if got is not None and got[0] == 2:
            new = self._alter(got[1])
            if new is not got[1]:
                self.altered += 1
                return got[0], new
        return got

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _short_result(msg):
    if isinstance(msg, m.Result) and len(msg.ids) > 1:
        return m.Result(batch_id=msg.batch_id, ids=msg.ids[:-1], logits=msg.logits[:-1], compute_s=msg.compute_s)
    return msg


def _other_ids(msg):
    if isinstance(msg, m.Result):
        return m.Result(batch_id=msg.batch_id, ids=msg.ids + np.uint64(1), logits=msg.logits, compute_s=msg.compute_s)
    return msg


def _wrong_logits_shape(msg):
    if isinstance(msg, m.Result) and msg.logits.size:
        return m.Result(batch_id=msg.batch_id, ids=msg.ids, logits=np.zeros((len(msg.ids), 999, 2), np.float32),
                        compute_s=msg.compute_s)
    return msg


def _bad_bye(msg):
    return m.Bye(rank=msg.rank, stats_json="{not json") if isinstance(msg, m.Bye) else msg


def _run(store, tmp_path, alter, mode="accuracy"):
    cfg = RunConfig(loadgen=LoadGenConfig(scenario="Offline", mode=mode), backend=BackendSpec("oracle"),
                    batch=BatchConfig(max_batch=32, credits=2))
    coord, threads, hub = start_cluster(cfg, store, 2, wrap=lambda inner: _Tamper(inner, alter))
    try:
        result = run_test(cfg, coord, len(store), mode, tmp_path)
        stats = coord.dispatcher.stats
    finally:
        stop_cluster(coord, threads, hub)
    return coord, coord.transport, result, stats


@pytest.mark.timeout(120)
@pytest.mark.parametrize("alter", [_short_result, _other_ids, _wrong_logits_shape])
def test_a_bad_result_requeues_the_batch_and_drops_the_worker(store, tmp_path, alter):
    coord, tamper, result, stats = _run(store, tmp_path, alter)
    assert tamper.altered >= 1
    assert coord.workers[2].faulty and coord.workers[2].lost
    assert not coord.workers[1].faulty
    assert coord.failure is None
    assert stats["requeued_batches"] >= 1
    assert stats["samples_completed"] == len(store)
    log = json.loads((tmp_path / "mlperf_log_accuracy.json").read_text())
    assert sorted(e["qsl_idx"] for e in log) == list(range(len(store)))   # each sample once
    assert score_log(tmp_path / "mlperf_log_accuracy.json", store).f1 > 98.0  # and with its own logits


@pytest.mark.timeout(120)
def test_a_bye_with_broken_stats_is_a_protocol_error_not_a_crash(store, tmp_path):
    coord, tamper, result, stats = _run(store, tmp_path, _bad_bye, mode="performance")
    assert tamper.altered == 1
    assert coord.failure is None and stats["samples_completed"] == len(store)
    assert coord.workers[2].faulty and coord.workers[1].stats is not None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("max_batch", [0, -5, 1 << 20])
def test_a_ready_with_a_bad_max_batch_fails_start_up_at_once(store, max_batch):
    def bad_ready(msg):
        if isinstance(msg, m.Ready):
            return m.Ready(rank=msg.rank, host=msg.host, device=msg.device, backend=msg.backend,
                           max_batch=max_batch, info_json=msg.info_json)
        return msg

    cfg = RunConfig(loadgen=LoadGenConfig(scenario="Offline"), backend=BackendSpec("oracle"), batch=BatchConfig(),
                    ready_timeout_s=50)
    coord, threads, hub = make_cluster(cfg, store, 2, wrap=lambda inner: _Tamper(inner, bad_ready))
    t0 = time.monotonic()
    try:
        with pytest.raises(RunFailed, match="max_batch"):
            coord.start()
    finally:
        stop_cluster(coord, threads, hub)
    assert time.monotonic() - t0 < 30   # the ready timeout is 50 s: it did not wait for it


@pytest.mark.timeout(120)
def test_a_driver_that_dies_mid_test_still_ends_the_test(store, tmp_path, monkeypatch):
    """Any exception in the driver: every outstanding and later query is completed without data, the
    test returns, and the failure is recorded (the run then fails). The whole data set: the driver
    thread completing ~10,800 aborted samples and then exiting mid-test crashed LoadGen (SIGSEGV)."""
    from distbert.engine import dispatcher as dmod

    real = dmod.Dispatcher.on_result
    calls = {"n": 0}

    def explode(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected driver bug")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(dmod.Dispatcher, "on_result", explode)
    coord, _, result, stats = _run(store, tmp_path, lambda msg: msg, mode="performance")
    assert "injected driver bug" in (coord.failure or "")
    assert result.get("result_validity") in ("VALID", "INVALID")   # LoadGen ended the test and logged it
