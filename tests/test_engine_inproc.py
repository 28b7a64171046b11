"""The engine in one process (STYLE §11, level 2): rank 0's coordinator and N worker threads over the
in-process transport, with real LoadGen. The oracle backend proves exactly-once, by-id completion:
the F1 of the distributed accuracy run must equal direct scoring of the same logits. Runs on the data
set in use (official or synthetic, tests/conftest.py): counts come from the store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from distbert.backends.base import BackendSpec
from distbert.backends.harness import oracle_logits
from distbert.config import BatchConfig, LoadGenConfig, RunConfig
from distbert.run.loadgen import run_test
from tests.inproc_cluster import start_cluster, stop_cluster


@pytest.fixture(scope="module")
def store(squad_dev, vocab, session_cache):
    from distbert.data.squad.features import load_features

    return load_features(squad_dev, vocab, cache_dir=session_cache)


def _errors_besides_repeated_from_config(logdir: Path) -> list[str]:
    """LoadGen errors of a test, except the one these in-process tests cause on purpose.

    LoadGen counts ``FromConfig`` calls per process, and this module runs many tests (with other
    scenarios) in the pytest process: every test after the first logs ``error_invalid_config``.
    ``distbert run`` calls it once per process (tests/test_submission.py checks its logs are clean).
    """
    from distbert.data.loadgen_logs import read_detail

    errors = read_detail(logdir / "mlperf_log_detail.txt")["_errors"]
    return [e for e in errors if not e.startswith("error_invalid_config: Multiple conf files")]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scenario,extra", [("Offline", {}), ("Server", {"target_qps": 20000.0})])
def test_oracle_accuracy_full_dev_set_equals_direct_scoring(store, tmp_path, scenario, extra):
    from distbert.data.squad.accuracy import score_log, score_logits

    cfg = RunConfig(loadgen=LoadGenConfig(scenario=scenario, mode="accuracy", **extra),
                    backend=BackendSpec("oracle"), batch=BatchConfig(max_batch=128, credits=2))
    coord, threads, hub = start_cluster(cfg, store, 3)
    try:
        run_test(cfg, coord, len(store), "accuracy", tmp_path)
        stats = coord.dispatcher.stats
    finally:
        stop_cluster(coord, threads, hub)
    assert _errors_besides_repeated_from_config(tmp_path) == []
    log = json.loads((tmp_path / "mlperf_log_accuracy.json").read_text())
    assert sorted(e["qsl_idx"] for e in log) == list(range(len(store)))
    distributed = score_log(tmp_path / "mlperf_log_accuracy.json", store)
    direct = {}
    for i in range(len(store)):
        s, e = oracle_logits(np.array([i]), int(store.lengths[i]), store.oracle_start, store.oracle_end)
        direct[i] = np.stack([s[0], e[0]], axis=-1)
    expected = score_logits(store, direct)
    assert distributed.f1 == expected.f1 and distributed.exact_match == expected.exact_match
    assert distributed.f1 > 98.0
    # every worker got work (pull-based balancing) and nothing was dropped as a duplicate
    assert all(w["samples_completed"] > 0 for w in stats["workers"].values())
    assert stats["duplicates_dropped"] == 0 and stats["samples_completed"] == len(store)


@pytest.mark.timeout(120)
def test_performance_mode_completes_every_sample_once(store, tmp_path):
    """Performance mode with a token budget: every issued sample completes exactly once and the
    configured budget reaches the dispatcher. (Hedging off: the workers' own counts must add up to
    the samples, and a hedged copy is a sample computed twice.)"""
    want = min(2000, len(store) // 2)   # test mode issues test_query_count samples (fewer than the QSL)
    cfg = RunConfig(loadgen=LoadGenConfig(scenario="Offline", mode="performance", test_query_count=want),
                    backend=BackendSpec("null"), batch=BatchConfig(max_batch=64, token_budget=8192, hedge="off"))
    coord, threads, hub = start_cluster(cfg, store, 2)
    try:
        result = run_test(cfg, coord, len(store), "performance", tmp_path)
        stats = coord.dispatcher.stats
    finally:
        stop_cluster(coord, threads, hub)
    assert result["result_validity"] == "VALID"  # test mode: min duration 0, `want` samples
    assert _errors_besides_repeated_from_config(tmp_path) == []
    assert result["batch_policy"]["token_budget"] == 8192
    assert stats["samples_issued"] == stats["samples_completed"] == want
    assert stats["duplicates_dropped"] == 0
    assert sum(h.stats["samples"] for h in coord.workers.values()) == want


class _DropFirstBatch:
    """The coordinator's transport, except that the first Batch message is lost on the way, as
    ZeroMQ loses a message sent while a worker reconnects. (A fault injected in the transport;
    LoadGen, the coordinator, the workers and the oracle backend are real.)"""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.dropped: list[int] = []

    def send(self, worker, msg) -> None:
        from distbert.wire import messages as msgs

        if isinstance(msg, msgs.Batch) and not self.dropped:
            self.dropped.append(msg.batch_id)
            return
        self._inner.send(worker, msg)

    def __getattr__(self, name):
        return getattr(self._inner, name)


@pytest.mark.timeout(120)
def test_a_batch_lost_in_transit_is_requeued_after_the_timeout(store, tmp_path):
    from distbert.data.squad.accuracy import score_log

    # hedging off: it would answer the lost batch first, at the tail (tests/test_hedge.py has that path)
    cfg = RunConfig(loadgen=LoadGenConfig(scenario="Offline", mode="accuracy"), backend=BackendSpec("oracle"),
                    batch=BatchConfig(max_batch=256, credits=2, batch_timeout_s=1.0, hedge="off"))
    coord, threads, hub = start_cluster(cfg, store, 2, wrap=_DropFirstBatch)
    lossy = coord.transport
    try:
        run_test(cfg, coord, len(store), "accuracy", tmp_path)
        stats = coord.dispatcher.stats
    finally:
        stop_cluster(coord, threads, hub)
    assert len(lossy.dropped) == 1
    assert stats["timed_out_batches"] == 1 and stats["requeued_batches"] == 1
    assert stats["samples_completed"] == len(store) and stats["duplicates_dropped"] == 0
    log = json.loads((tmp_path / "mlperf_log_accuracy.json").read_text())
    assert sorted(e["qsl_idx"] for e in log) == list(range(len(store)))
    assert score_log(tmp_path / "mlperf_log_accuracy.json", store).f1 > 98.0


def test_the_last_coordinator_to_stop_restores_the_switch_interval():
    import sys

    from distbert.engine import coordinator as co

    assert co.switch_interval_users() == 0
    own = sys.getswitchinterval()
    co._switch_interval(+1)
    co._switch_interval(+1)       # two coordinators overlap (tests do)
    assert sys.getswitchinterval() == co.SWITCH
    co._switch_interval(-1)
    assert sys.getswitchinterval() == co.SWITCH   # the other still runs
    co._switch_interval(-1)
    assert sys.getswitchinterval() == own != co.SWITCH


@pytest.mark.timeout(300)
def test_a_driver_crash_mid_offline_completes_every_sample_once_and_fails_the_run(store, tmp_path, monkeypatch):
    """The driver thread raises after a few results (a bug): LoadGen still gets every sample exactly
    once (those done with their data, the rest empty, through the same native completion path), the
    test returns instead of hanging, and the coordinator reports the crash."""
    from distbert.engine.dispatcher import Dispatcher

    real = Dispatcher.on_result
    calls = {"n": 0}

    def on_result(self, worker, batch_id, now):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("injected driver bug")
        return real(self, worker, batch_id, now)

    monkeypatch.setattr(Dispatcher, "on_result", on_result)
    cfg = RunConfig(loadgen=LoadGenConfig(scenario="Offline", mode="accuracy"), backend=BackendSpec("oracle"),
                    batch=BatchConfig(max_batch=32, credits=2))
    coord, threads, hub = start_cluster(cfg, store, 2)
    try:
        result = run_test(cfg, coord, len(store), "accuracy", tmp_path)
        failure = coord.failure
    finally:
        stop_cluster(coord, threads, hub)
    assert failure is not None and "rank 0 driver crashed: RuntimeError: injected driver bug" in failure
    assert result["completion"] == "native" and result["issue"] == "native"
    assert _errors_besides_repeated_from_config(tmp_path) == []   # no sample completed twice or never
    log = json.loads((tmp_path / "mlperf_log_accuracy.json").read_text())
    assert sorted(e["qsl_idx"] for e in log) == list(range(len(store)))
    with_data = sum(1 for e in log if e["data"])
    assert 5 <= with_data < len(store)   # the five batches done before the crash kept their logits
