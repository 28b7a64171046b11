"""Warm-up where it runs, and the device on every thread (issue 19, items 2 and 5).

A GPU keeps per-thread state (the current device, cuBLAS/cuDNN handles, attention plans), so a shape
warmed on one thread is cold on another, and a thread left on the default device drives GPU 0. Two
properties, checked through a real worker (``worker_run`` on its own thread, in-process transport,
the real feature store, real threads; pipelined and not) and through the in-process worker (a real
coordinator and real LoadGen; batches on the driver thread and on the thread that calls StartTest):

(a) every (thread, shape) a batch runs on was warmed before the Ready, on that very thread: an
    instrumented eager stand-in backend (no model: it records the thread and shape of every call
    and returns logits computed from its inputs) warms every shape of the run's ladder;
(b) a worker bound to ``cuda:1`` has ``cuda:1`` as the current device on each thread that touches
    the backend. There is no GPU here, so ``torch.cuda.set_device``/``current_device`` are replaced
    by a STAND-IN: a per-thread recorder of the current device (CUDA's is per thread, default 0).
    The backend is the real :class:`~distbert.backends.torch.TorchBackend` with its real
    ``bind_thread`` and warm-up plan; only its model calls (``load``, ``prepare``, ``run_prepared``,
    ``run``) are replaced by recording fakes, since CUDA cannot run here.
"""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from typing import Any

import numpy as np
import pytest

import distbert.engine.worker as worker_module
from distbert.backends.base import Backend, BackendSpec, BatchHint, ModelInputs, dummy_batch
from distbert.config import BatchConfig, LoadGenConfig, RunConfig
from distbert.engine.worker import worker_run
from distbert.wire import messages as m
from distbert.wire.inproc import InprocHub
from tests.batches import StandInBackend
from tests.test_worker_pipeline import _expect

IO_THREAD = "test-worker-io"
MAX_BATCH = 8
#: lengths to multiples of 128, rows 1..8: 12 shapes, small enough to warm in milliseconds
BATCHING = BatchConfig(max_batch=MAX_BATCH, shape_ladder=128)


@pytest.fixture(scope="module")
def store(squad_dev, vocab, session_cache):
    from distbert.data.squad.features import load_features

    return load_features(squad_dev, vocab, cache_dir=session_cache)


def _logits(inputs: ModelInputs) -> tuple[np.ndarray, np.ndarray]:
    start = inputs.input_ids.astype(np.float32)
    return start, inputs.input_mask.astype(np.float32)


class Calls:
    """(stage, thread id, thread name, shape, the current CUDA device or None) of every backend call."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int, str, tuple[int, int], Any]] = []
        self.ready_at = 0   # len(log) when the Ready arrived: what came before was warm-up

    def add(self, stage: str, shape: tuple[int, int], device: Any = None) -> None:
        thread = threading.current_thread()
        self.log.append((stage, thread.ident or 0, thread.name, shape, device))

    def warm(self) -> list[tuple[str, int, str, tuple[int, int], Any]]:
        return self.log[:self.ready_at]

    def served(self) -> list[tuple[str, int, str, tuple[int, int], Any]]:
        return self.log[self.ready_at:]


class RecordingBackend(StandInBackend):
    """The instrumented eager stand-in of (a): warms every ladder shape, records every call."""

    name = "recording"

    def __init__(self, spec: BackendSpec, calls: Calls, overlaps: bool) -> None:
        super().__init__(spec, overlaps)
        self.calls = calls

    def batch_hint(self) -> BatchHint:
        return BatchHint(max_batch=MAX_BATCH)

    def warmup_batches(self) -> list[ModelInputs]:
        return [dummy_batch(rows, length) for rows, length in self.shape_ladder.shapes()]

    def prepare(self, inputs: ModelInputs) -> object:
        self.calls.add("prepare", inputs.shape)
        return ("staged", inputs)

    def run_prepared(self, prepared: object) -> tuple[np.ndarray, np.ndarray]:
        assert isinstance(prepared, tuple) and prepared[0] == "staged"
        self.calls.add("run_prepared", prepared[1].shape)
        return _logits(prepared[1])

    def run(self, inputs: ModelInputs) -> tuple[np.ndarray, np.ndarray]:
        self.calls.add("run", inputs.shape)
        return _logits(inputs)


def _batch(k: int, indices: np.ndarray) -> m.Batch:
    return m.Batch(batch_id=k, want_logits=True, ids=np.arange(len(indices), dtype=np.uint64) + 1000 * (k + 1),
                   indices=np.asarray(indices, np.int64))


def _serve(store: Any, backend: Backend, calls: Calls, monkeypatch: pytest.MonkeyPatch, device: str = "cpu"
           ) -> tuple[dict[str, Any], dict[str, Any]]:
    """A real worker serving one-sample batches one at a time (the I/O thread's own path), then a
    burst of multi-row batches (the compute thread's): its Ready info and its Bye stats."""
    monkeypatch.setattr(worker_module, "create", lambda spec: backend)
    hub = InprocHub(key="k")
    cfg = RunConfig(loadgen=LoadGenConfig(scenario="Offline", mode="accuracy"), backend=BackendSpec("null", device=device),
                    batch=BATCHING, features_path=str(store.path))
    thread = threading.Thread(target=worker_run, args=(hub.connect(1), 1), kwargs={"pin": False},
                              name=IO_THREAD, daemon=True)
    thread.start()
    coord, deadline = hub.coordinator, time.monotonic() + 60
    try:
        _expect(coord, m.Hello, deadline)
        coord.send(1, m.Setup(config_json=cfg.to_json()))
        ready = _expect(coord, m.Ready, deadline)
        calls.ready_at = len(calls.log)
        order = np.argsort(store.lengths)                     # short to long: every ladder length comes up
        singles = [_batch(k, order[[k * len(order) // 12]]) for k in range(12)]
        for batch in singles:                                  # idle worker, one sample: runs inline
            coord.send(1, batch)
            assert isinstance(_expect(coord, m.Result, deadline), m.Result)
        rng = np.random.default_rng(0)
        bursts = [_batch(100 + k, rng.choice(len(order), size=int(rng.integers(2, MAX_BATCH + 1)), replace=False))
                  for k in range(16)]
        for batch in bursts:
            coord.send(1, batch)
        for _ in bursts:
            result = _expect(coord, m.Result, deadline)
            assert result.logits.shape[0] == len(result.ids)
        coord.send(1, m.Shutdown(reason="test done"))
        bye = _expect(coord, m.Bye, deadline)
        thread.join(timeout=10)
        assert not thread.is_alive(), "the worker did not stop after Shutdown"
    finally:
        hub.close()
    return json.loads(ready.info_json), json.loads(bye.stats_json)


def _check_served_where_warmed(calls: Calls) -> set[str]:
    """(a): each served (thread, shape) was warmed on that thread; returns the serving threads' names."""
    warmed = {(ident, shape) for _, ident, _, shape, _ in calls.warm()}
    served = calls.served()
    assert served, "nothing served"
    cold = [(stage, name, shape) for stage, ident, name, shape, _ in served if (ident, shape) not in warmed]
    assert cold == [], f"served on a thread where its shape was not warmed: {cold[:5]}"
    return {name for _, _, name, _, _ in served}


# ------------------------------------------------------------------------------- (a) process worker

@pytest.mark.timeout(120)
@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "one-compute-thread"])
def test_every_shape_a_worker_serves_was_warmed_on_the_thread_that_serves_it(store, monkeypatch, pipelined):
    calls = Calls()
    backend = RecordingBackend(BackendSpec("recording"), calls, overlaps=pipelined)
    info, stats = _serve(store, backend, calls, monkeypatch)
    shapes = backend.shape_ladder.shapes()
    assert len(shapes) == 12 and backend.shape_ladder.rows == (1, 2, 4, 8)
    threads = _check_served_where_warmed(calls)
    stages = {"prepare": "distbert-prepare", "run_prepared": "distbert-compute"} if pipelined else \
        {"run": "distbert-compute"}
    assert threads == {IO_THREAD, *stages.values()}            # every serving thread really served
    for stage, name in stages.items():                         # and warmed every shape, before the Ready
        assert {shape for s, _, n, shape, _ in calls.warm() if (s, n) == (stage, name)} == set(shapes)
    one_row = {shape for shape in shapes if shape[0] == 1}
    assert {shape for _, _, n, shape, _ in calls.warm() if n == IO_THREAD} == one_row   # what it can meet
    # the record: the warm-up in the Ready's info (run.json) and the stats, no batch cold
    assert info["warmup"]["batches"] == info["warmup"]["shapes"] == 12
    assert set(info["warmup"]["threads"]) == {IO_THREAD, *stages.values()} and info["warmup"]["s"] >= 0
    assert stats["cold_batches"] == 0 and stats["inline_batches"] == 12 and stats["pipelined"] is pipelined


@pytest.mark.timeout(120)
def test_a_batch_on_a_thread_where_its_shape_was_not_warmed_is_counted_cold(store, monkeypatch):
    """The run.json check can fail: a backend whose warm-up skips the longest length leaves every
    batch that pads to it cold, on whichever thread runs it."""
    calls = Calls()

    class Partial(RecordingBackend):
        def warmup_batches(self) -> list[ModelInputs]:
            return [b for b in super().warmup_batches() if b.shape[1] != 384]

    _, stats = _serve(store, Partial(BackendSpec("recording"), calls, overlaps=True), calls, monkeypatch)
    long = [shape for *_, shape, _ in calls.served() if shape[1] == 384]
    assert long and stats["cold_batches"] >= 1


@pytest.mark.timeout(60)
def test_a_warm_up_failure_on_a_serving_thread_fails_the_setup_before_the_ready(store, monkeypatch):
    calls = Calls()

    class Broken(RecordingBackend):
        def run_prepared(self, prepared: object) -> tuple[np.ndarray, np.ndarray]:
            raise RuntimeError("injected warm-up failure on the compute thread")

    monkeypatch.setattr(worker_module, "create", lambda spec: Broken(spec, calls, overlaps=True))
    cfg = RunConfig(loadgen=LoadGenConfig(scenario="Offline"), backend=BackendSpec("null"), batch=BATCHING,
                    features_path=str(store.path))
    failure, codes = _failed_setup(cfg, "Ready despite a failed warm-up")
    assert failure.text == "injected warm-up failure on the compute thread" and failure.batch_id == -1
    assert codes == [1]


def _failed_setup(cfg: RunConfig, ready_means: str) -> tuple[m.Failure, list[int]]:
    """Start a worker on an in-process hub, send it ``cfg`` and wait for the Failure of its setup (a
    Ready instead fails the test with ``ready_means``); that Failure and the worker's exit codes,
    once it has exited (bounded)."""
    hub = InprocHub(key="k")
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(worker_run(hub.connect(1), 1, pin=False)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    try:
        _expect(hub.coordinator, m.Hello, deadline)
        hub.coordinator.send(1, m.Setup(config_json=cfg.to_json()))
        while time.monotonic() < deadline:
            got = hub.coordinator.recv(timeout=0.5)
            if got is not None:
                assert not isinstance(got[1], m.Ready), ready_means
                if isinstance(got[1], m.Failure):
                    break
        else:
            pytest.fail("no Failure from the worker")
        thread.join(timeout=10)
        return got[1], codes
    finally:
        hub.close()


# ------------------------------------------------------------------------------- (a) in-process worker

def _in_process(store: Any, backend: Backend, calls: Calls, monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
                device: str = "cpu") -> dict[str, Any]:
    """rank 0's in-process worker under real LoadGen: SingleStream (the direct path, on this thread,
    the one that calls StartTest) then Offline (batches on the driver thread), each test with its own
    coordinator. Checks (a) per test: every (thread, shape) served was warmed on that thread by the
    time ``Coordinator.start`` returned. Returns the last test's worker stats."""
    from distbert.engine.coordinator import Coordinator
    from distbert.engine.inline import InlineWorker
    from distbert.run.loadgen import run_test

    monkeypatch.setattr(worker_module, "create", lambda spec: backend)
    stats: dict[str, Any] = {}
    settings: list[Any] = []
    for scenario, count in (("SingleStream", 64), ("Offline", 400)):
        cfg = RunConfig(loadgen=LoadGenConfig(scenario=scenario, mode="performance", test_query_count=count),
                        backend=BackendSpec("null", device=device), batch=BATCHING, features_path=str(store.path),
                        in_process_worker=True)
        coord = Coordinator(cfg, InlineWorker(rank=1), store.lengths, expected_workers={1})
        first = len(calls.log)
        try:
            coord.start()
            ready = len(calls.log)
            run_test(cfg, coord, len(store), "performance", tmp_path / scenario, settings_box=settings)
            assert coord.failure is None
        finally:
            coord.stop()
        warmed = {(ident, shape) for _, ident, _, shape, _ in calls.log[first:ready]}
        served = calls.log[ready:]
        cold = [(name, shape) for _, ident, name, shape, _ in served if (ident, shape) not in warmed]
        assert served and cold == [], f"{scenario}: served where not warmed: {cold[:5]}"
        stats = coord.workers[1].stats or {}
        assert stats["cold_batches"] == 0
        calls.log.append(("end", 0, scenario, (0, 0), None))
    return stats


@pytest.mark.timeout(180)
def test_in_process_every_shape_is_warmed_on_the_driver_and_on_the_thread_that_calls_start_test(
        store, monkeypatch, tmp_path):
    calls = Calls()
    backend = RecordingBackend(BackendSpec("recording"), calls, overlaps=False)
    stats = _in_process(store, backend, calls, monkeypatch, tmp_path)
    this, shapes = threading.current_thread().name, set(backend.shape_ladder.shapes())
    by_thread: dict[str, set[tuple[int, int]]] = {}
    for stage, _, name, shape, _ in calls.log:
        if stage != "end":
            by_thread.setdefault(name, set()).add(shape)
    assert set(by_thread) == {"distbert-driver", this}            # both threads ran batches
    assert by_thread["distbert-driver"] == shapes                 # every shape, on the driver
    assert by_thread[this] == {s for s in shapes if s[0] == 1}    # one-sample shapes on StartTest's thread
    assert stats["warmup"]["batches"] == len(shapes) and "caller_s" in stats["warmup"]
    assert set(stats["warmup"]["threads"]) == {"distbert-driver", this}


# ------------------------------------------------------------------------------- (b) cuda:1 on every thread

needs_torch = pytest.mark.skipif(not all(importlib.util.find_spec(x) for x in ("torch", "transformers")),
                                 reason="torch and transformers are not installed")


@pytest.fixture
def cuda_standin(monkeypatch):
    """STAND-IN for torch.cuda's current device (no GPU here): per thread, default 0, as CUDA's is.
    Records every set_device as (thread name, index)."""
    import torch

    state = threading.local()
    sets: list[tuple[str, int]] = []

    def set_device(device: Any) -> None:
        index = device.index if isinstance(device, torch.device) else int(device)
        state.device = index
        sets.append((threading.current_thread().name, index))

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: getattr(state, "device", 0))
    return sets


def _standin_torch(calls: Calls, overlaps: bool) -> Any:
    """The real TorchBackend (bind_thread, warm-up plan, info) on a pretend cuda:1: model calls
    record the current device instead of computing (see the module docstring)."""
    import torch

    from distbert.backends.torch import TorchBackend

    class OnCuda1(TorchBackend):
        def load(self) -> None:
            self._device = torch.device("cuda", 1)
            self._sdpa = "auto"
            self.bind_thread()

        @property
        def overlap_prepare(self) -> bool:
            return overlaps

        def _record(self, stage: str, inputs: ModelInputs) -> None:
            calls.add(stage, inputs.shape, torch.cuda.current_device())

        def prepare(self, inputs: ModelInputs) -> object:
            self._record("prepare", inputs)
            return ("staged", inputs)

        def run_prepared(self, prepared: object) -> tuple[np.ndarray, np.ndarray]:
            assert isinstance(prepared, tuple)
            self._record("run_prepared", prepared[1])
            return _logits(prepared[1])

        def run(self, inputs: ModelInputs) -> tuple[np.ndarray, np.ndarray]:
            self._record("run", inputs)
            return _logits(inputs)

    return OnCuda1(BackendSpec("torch", device="cuda:1"))


@needs_torch
@pytest.mark.timeout(120)
@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "one-compute-thread"])
def test_a_worker_bound_to_cuda_1_sets_it_on_each_of_its_threads(store, monkeypatch, cuda_standin, pipelined):
    calls = Calls()
    backend = _standin_torch(calls, pipelined)
    info, stats = _serve(store, backend, calls, monkeypatch, device="cuda:1")
    threads = {IO_THREAD, "distbert-compute"} | ({"distbert-prepare"} if pipelined else set())
    assert {name for _, _, name, _, _ in calls.log} == threads
    wrong = [(stage, name, device) for stage, _, name, _, device in calls.log if device != 1]
    assert wrong == [], f"backend calls on a thread whose current device is not cuda:1: {wrong[:5]}"
    assert {name for name, index in cuda_standin if index == 1} == threads and {i for _, i in cuda_standin} == {1}
    # the real TorchBackend's warm-up plan ran: every ladder shape, padded and not (eager)
    assert info["warmup"]["batches"] == 2 * len(backend.shape_ladder.shapes()) and stats["cold_batches"] == 0
    _check_served_where_warmed(calls)


@needs_torch
@pytest.mark.timeout(180)
def test_the_in_process_worker_on_cuda_1_sets_it_on_the_driver_and_on_the_start_test_thread(
        store, monkeypatch, tmp_path, cuda_standin):
    calls = Calls()
    _in_process(store, _standin_torch(calls, overlaps=False), calls, monkeypatch, tmp_path, device="cuda:1")
    threads = {"distbert-driver", threading.current_thread().name}
    log = [entry for entry in calls.log if entry[0] != "end"]
    assert {name for _, _, name, _, _ in log} == threads
    assert {device for *_, device in log} == {1}
    assert {name for name, index in cuda_standin if index == 1} >= threads


def test_a_worker_without_rank_0s_feature_cache_at_that_path_fails_its_setup_naming_the_path(tmp_path):
    """A worker on another host opens rank 0's cache path as it is: when the file is not there (no
    shared filesystem), the setup fails with one line naming the path and the fix, before any Ready."""
    missing = tmp_path / "not-shared" / "features"
    cfg = RunConfig(loadgen=LoadGenConfig(scenario="Offline"), backend=BackendSpec("null"), batch=BATCHING,
                    features_path=str(missing))
    failure, codes = _failed_setup(cfg, "Ready without a feature cache")
    text = failure.text
    assert str(missing) in text and "DISTBERT_CACHE" in text and "\n" not in text
    assert codes and codes[0] != 0
