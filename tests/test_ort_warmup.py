"""The onnxruntime backend warms every shape of the run's ladder, where it serves (issue 19, item 2).

On a GPU provider ORT gets the shape ladder by default, and pays a first-use cost per input shape,
so its warm-up must be the ladder's shapes, run on each serving thread before the Ready, as the torch
backend's are. The policy does not depend on the provider, so it is checked here on the CPU provider
with a forced ladder (``shape_ladder=128``, rows 1-8: 12 shapes, milliseconds on the tiny model):

* the real :class:`~distbert.backends.onnxruntime.OnnxRuntimeBackend` on a tiny random-weight ONNX
  model, instrumented only to record the thread and shape of each call (every call still runs the
  model), served by a real worker (``tests/test_worker_warmup``'s harness: in-process transport, real
  threads, the real feature store) and by rank 0's in-process worker under real LoadGen;
* ``distbert run --backend onnxruntime --shape-ladder 64`` (rank 0 + a worker process, real LoadGen
  and ZeroMQ, the backend's own CPU batching): the warm-up in the worker's log and run.json, every
  ladder shape once, no batch cold;
* with exact trimming the old warm-up stays: one batch on a CPU provider, the four fixed shapes on a
  GPU one (the GPU provider is a STAND-IN there: no GPU here, so only the provider name is set and
  ``run`` records instead of computing).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from distbert.backends.base import BackendSpec, BatchHint, ModelInputs
from distbert.backends.shapes import EXACT, ShapeLadder, ladder_json
from tests.conftest import REPO
from tests.test_worker_warmup import IO_THREAD, Calls, _check_served_where_warmed, _in_process, _serve

pytestmark = pytest.mark.skipif(not all(importlib.util.find_spec(x) for x in ("onnxruntime", "onnx")),
                                reason="onnxruntime and onnx are not installed")

#: the ladder of tests/test_worker_warmup (shape_ladder=128, max batch 8, no token budget)
LADDER = ShapeLadder(128, (1, 2, 4, 8))
OLD_GPU_WARMUP = [(1, 128), (8, 128), (32, 256), (8, 384)]


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    from distbert.backends import modelmaker

    return modelmaker.make_model("tiny", "onnx", 0, tmp_path_factory.mktemp("ort-warmup"))


@pytest.fixture(scope="module")
def store(squad_dev, vocab, session_cache):
    from distbert.data.squad.features import load_features

    return load_features(squad_dev, vocab, cache_dir=session_cache)


def _recording_ort(model: Path, calls: Calls):
    """The real ORT backend on the CPU provider; ``run`` records (thread, shape), then runs the model.
    Its batch hint drops the CPU token budget, so the worker's ladder is :data:`LADDER` (the harness
    sends up to 8 rows at any length)."""
    from distbert.backends.onnxruntime import OnnxRuntimeBackend

    class Recording(OnnxRuntimeBackend):
        def run(self, inputs: ModelInputs) -> tuple[np.ndarray, np.ndarray]:
            calls.add("run", inputs.shape)
            return super().run(inputs)

        def batch_hint(self) -> BatchHint:
            return BatchHint(max_batch=LADDER.rows[-1])

    return Recording(BackendSpec("onnxruntime", model=str(model), threads=1))


def _warmed_on(calls: Calls, thread: str) -> list[tuple[int, int]]:
    return [shape for _, _, name, shape, _ in calls.warm() if name == thread]


def test_warmup_batches_are_every_ladder_shape_once_largest_first(tiny_onnx):
    calls = Calls()
    backend = _recording_ort(tiny_onnx, calls)
    backend.load()
    backend.set_shape_ladder(LADDER)
    shapes = [b.shape for b in backend.warmup_batches()]
    assert sorted(shapes) == sorted(LADDER.shapes()) and len(shapes) == 12
    assert shapes[0] == (8, 384) and shapes == sorted(shapes, key=lambda s: -s[0] * s[1])
    assert backend.info()["warmup_batches"] == 12
    backend.warmup()                                  # called directly: the same batches, on this thread
    assert [shape for *_, shape, _ in calls.log] == shapes
    backend.close()


def test_an_exact_ladder_keeps_the_old_warm_up(tiny_onnx, monkeypatch):
    """CPU provider: the base's one batch. GPU provider (STAND-IN: the provider name only; ``run``
    records and returns zeros): that batch and the three fixed shapes, as before the ladder."""
    calls = Calls()
    backend = _recording_ort(tiny_onnx, calls)
    backend.load()
    backend.set_shape_ladder(EXACT)
    assert backend.warmup_batches() == [] and backend.info()["warmup_batches"] == 0
    backend.warmup()
    assert [shape for *_, shape, _ in calls.log] == [(1, 128)]

    def record(inputs: ModelInputs) -> tuple[np.ndarray, np.ndarray]:
        calls.add("run", inputs.shape)
        return np.zeros(inputs.shape, np.float32), np.zeros(inputs.shape, np.float32)

    calls.log.clear()
    monkeypatch.setattr(backend, "_provider", "CUDAExecutionProvider")
    monkeypatch.setattr(backend, "run", record)
    backend.warmup()
    assert [shape for *_, shape, _ in calls.log] == OLD_GPU_WARMUP
    backend.close()


@pytest.mark.timeout(120)
def test_a_worker_warms_every_ladder_shape_on_the_threads_that_serve_it(tiny_onnx, store, monkeypatch):
    calls = Calls()
    backend = _recording_ort(tiny_onnx, calls)
    info, stats = _serve(store, backend, calls, monkeypatch)
    shapes = LADDER.shapes()
    assert backend.shape_ladder == LADDER
    # the compute thread ran every ladder shape exactly once before the Ready; the I/O thread (which
    # runs one-sample batches itself) the one-row shapes; nothing else warmed
    assert sorted(_warmed_on(calls, "distbert-compute")) == sorted(shapes)
    assert sorted(_warmed_on(calls, IO_THREAD)) == sorted(s for s in shapes if s[0] == 1)
    assert {name for _, _, name, _, _ in calls.warm()} == {"distbert-compute", IO_THREAD}
    assert _check_served_where_warmed(calls) == {"distbert-compute", IO_THREAD}
    # the record: run.json's workers[].info.warmup and the stats; no batch cold
    assert info["warmup"]["batches"] == info["warmup"]["shapes"] == len(shapes)
    assert set(info["warmup"]["threads"]) == {"distbert-compute", IO_THREAD} and info["warmup"]["s"] > 0
    assert info["warmup_batches"] == len(shapes) and info["provider"] == "CPUExecutionProvider"
    assert stats["cold_batches"] == 0 and stats["warmup"]["batches"] == len(shapes)


@pytest.mark.timeout(120)
def test_a_worker_with_exact_trimming_warms_once_as_before(tiny_onnx, store, monkeypatch):
    """No ladder: one warm-up batch on the I/O thread, none on the compute thread, and no batch is
    counted cold (there was no per-shape warm-up to be cold against)."""
    import tests.test_worker_warmup as harness
    from distbert.config import BatchConfig

    monkeypatch.setattr(harness, "BATCHING", BatchConfig(max_batch=LADDER.rows[-1], shape_ladder=0))
    calls = Calls()
    backend = _recording_ort(tiny_onnx, calls)
    info, stats = _serve(store, backend, calls, monkeypatch)
    assert backend.shape_ladder == EXACT
    assert [(name, shape) for _, _, name, shape, _ in calls.warm()] == [(IO_THREAD, (1, 128))]
    assert info["warmup"]["batches"] == 0 and set(info["warmup"]["threads"]) == {IO_THREAD}
    assert stats["cold_batches"] == 0 and calls.served()


@pytest.mark.timeout(180)
def test_in_process_the_driver_and_the_start_test_thread_are_warmed(tiny_onnx, store, monkeypatch, tmp_path):
    """Rank 0's in-process worker under real LoadGen (SingleStream, then Offline): every batch ran on
    a thread where its shape was warmed (checked per test by the harness), cold_batches 0."""
    calls = Calls()
    backend = _recording_ort(tiny_onnx, calls)
    stats = _in_process(store, backend, calls, monkeypatch, tmp_path)
    this = threading.current_thread().name
    warmed: dict[str, set[tuple[int, int]]] = {}
    for stage, _, name, shape, _ in calls.log:
        if stage != "end":
            warmed.setdefault(name, set()).add(shape)
    assert set(warmed) == {"distbert-driver", this}
    assert warmed["distbert-driver"] == set(LADDER.shapes())
    assert warmed[this] == {s for s in LADDER.shapes() if s[0] == 1}
    assert stats["cold_batches"] == 0 and stats["warmup"]["batches"] == len(LADDER.shapes())


@pytest.mark.timeout(180)
def test_a_run_records_the_ladder_warm_up_and_no_cold_batch(tiny_onnx, squad_dev, vocab, session_cache, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, DISTBERT_CACHE=str(session_cache), DISTBERT_NO_PROGRESS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "distbert", "run", "--dataset", str(squad_dev), "--vocab", str(vocab),
           "--output", str(out), "--backend", "onnxruntime", "--model", str(tiny_onnx), "--threads", "1",
           "--scenario", "Offline", "--mode", "performance", "--workers", "1", "--max-batch", "8",
           "--shape-ladder", "64", "--max-examples", "300"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-4000:]
    [worker] = json.loads((out / "run.json").read_text())["workers"]
    info, stats = worker["info"], worker["stats"]
    ladder = ShapeLadder(64, (1, 2, 4, 8), token_budget=info["shape_ladder"]["token_budget"])
    assert info["shape_ladder"] == ladder_json(ladder) and ladder.token_budget is not None   # the CPU hint's
    n = len(ladder.shapes())
    assert info["warmup"]["batches"] == info["warmup"]["shapes"] == info["warmup_batches"] == n
    assert "distbert-compute" in info["warmup"]["threads"] and info["warmup"]["s"] > 0
    assert stats["cold_batches"] == 0 and stats["warmup"]["batches"] == n
    assert 1 <= len(stats["shapes"]) <= n
    assert all(tuple(map(int, k.split("x"))) in ladder.shapes() for k in stats["shapes"])
    assert f"warm-up: {n} batches ({n} shapes) in " in proc.stderr
