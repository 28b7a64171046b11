"""The worker's two-stage pipeline (issue 13): with a backend that gains from it (the torch backend on
CUDA), a prepare thread gathers batch k+1 and starts its device copy while the compute thread runs
batch k; the host buffers those copies read are reused only once their copy has completed.

No GPU here: a real Worker (real transport, real feature store, real threads) drives a fake backend
on a FAKE DEVICE CLOCK: its ``prepare`` sleeps as a gather + host-to-device copy would take time, its
``run_prepared`` sleeps as device compute would, and both record their (start, end) on
``time.monotonic()``. Sleeping releases the GIL, so two stages on two threads overlap in wall time
as a copy engine and the SMs do. The assertions are structural (who overlapped whom), not timings.
The staging-buffer rule is tested as the plain class the torch backend uses, with fake fences.
"""

from __future__ import annotations

import importlib.util
import json
import queue
import threading
import time
from typing import Any

import numpy as np
import pytest

import distbert.engine.worker as worker_module
from distbert.backends.base import Backend, BackendSpec, ModelInputs
from distbert.backends.harness import NullBackend
from distbert.backends.staging import StagingRing
from distbert.config import BatchConfig, LoadGenConfig, RunConfig
from distbert.engine.worker import worker_run
from distbert.wire import messages as m
from distbert.wire.inproc import InprocHub
from tests.batches import StandInBackend

PREPARE_S = 0.03   # fake gather + copy
RUN_S = 0.06       # fake device compute
ROWS = 4           # samples per batch: more than one, so no batch takes the inline one-sample path
IO_THREAD = "test-worker-io"


@pytest.fixture(scope="module")
def store(squad_dev, vocab, session_cache):
    from distbert.data.squad.features import load_features

    return load_features(squad_dev, vocab, cache_dir=session_cache)


def _logits(inputs: ModelInputs) -> tuple[np.ndarray, np.ndarray]:
    """What the fake computes: a function of every input array, so a wrong or mixed-up row shows."""
    start = inputs.input_ids.astype(np.float32) + 0.5 * inputs.segment_ids
    end = inputs.input_mask * inputs.lengths[:, None].astype(np.float32)
    return start, end


class FakeDeviceBackend(StandInBackend):
    """Fake device clock (see the module docstring). Batches are named by their first QSL index;
    ``fail_prepare`` / ``fail_run`` name the batches whose stage raises."""

    name = "fake-device"

    def __init__(self, spec: BackendSpec, overlaps: bool = True, fail_prepare: int = -1, fail_run: int = -1) -> None:
        super().__init__(spec, overlaps)
        self.fail_prepare, self.fail_run = fail_prepare, fail_run
        self.log: list[tuple[str, int, str, float, float]] = []   # (stage, batch, thread, start, end)

    def warmup(self) -> None:
        pass   # nothing recorded before the test's batches

    def _record(self, stage: str, key: int, t0: float) -> None:
        self.log.append((stage, key, threading.current_thread().name, t0, time.monotonic()))

    def prepare(self, inputs: ModelInputs) -> object:
        t0, key = time.monotonic(), int(inputs.indices[0])
        if key == self.fail_prepare:
            raise RuntimeError(f"injected prepare failure in batch {key}")
        time.sleep(PREPARE_S)
        self._record("prepare", key, t0)
        return ("staged", inputs)

    def run_prepared(self, prepared: object) -> tuple[np.ndarray, np.ndarray]:
        assert isinstance(prepared, tuple) and prepared[0] == "staged", prepared  # what prepare returned
        inputs = prepared[1]
        t0, key = time.monotonic(), int(inputs.indices[0])
        if key == self.fail_run:
            raise RuntimeError(f"injected run failure in batch {key}")
        time.sleep(RUN_S)
        self._record("run", key, t0)
        return _logits(inputs)

    def run(self, inputs: ModelInputs) -> tuple[np.ndarray, np.ndarray]:
        return self.run_prepared(self.prepare(inputs))

    def stages(self, stage: str) -> dict[int, tuple[str, float, float]]:
        out = {key: (thread, t0, t1) for s, key, thread, t0, t1 in self.log if s == stage}
        assert len(out) == sum(1 for s, *_ in self.log if s == stage), f"a batch ran {stage} twice"
        return out


def _batches(n: int, rows: int = ROWS) -> list[m.Batch]:
    return [m.Batch(batch_id=k, want_logits=True, ids=np.arange(k * rows, (k + 1) * rows, dtype=np.uint64) + 1000,
                    indices=np.arange(k * rows, (k + 1) * rows, dtype=np.int64)) for k in range(n)]


def _expect(coord: Any, kind: type, deadline: float) -> Any:
    while time.monotonic() < deadline:
        got = coord.recv(timeout=0.5)
        if got is None:
            continue
        msg = got[1]
        if isinstance(msg, kind):
            return msg
        if isinstance(msg, m.Failure):
            pytest.fail(f"worker failed while the test waited for {kind.__name__}: {msg.exc_type}: {msg.text}")
    pytest.fail(f"no {kind.__name__} from the worker in time")


def _serve(store: Any, backend: Backend, batches: list[m.Batch], monkeypatch: pytest.MonkeyPatch,
           one_at_a_time: bool = False) -> tuple[dict[int, list[m.Result | m.Failure]], dict[str, Any]]:
    """A real worker (worker_run on its own thread, in-process transport) serving ``batches`` with
    ``backend``: every reply by batch id, and the worker's stats from its Bye."""
    monkeypatch.setattr(worker_module, "create", lambda spec: backend)
    hub = InprocHub(key="k")
    cfg = RunConfig(loadgen=LoadGenConfig(scenario="Offline", mode="accuracy"), backend=BackendSpec("null"),
                    batch=BatchConfig(), features_path=str(store.path))
    thread = threading.Thread(target=worker_run, args=(hub.connect(1), 1), kwargs={"pin": False},
                              name=IO_THREAD, daemon=True)
    thread.start()
    coord = hub.coordinator
    deadline = time.monotonic() + 60
    try:
        _expect(coord, m.Hello, deadline)
        coord.send(1, m.Setup(config_json=cfg.to_json()))
        _expect(coord, m.Ready, deadline)
        replies: dict[int, list[m.Result | m.Failure]] = {}
        sent = received = 0
        while received < len(batches):
            # all at once (the worker has work queued), or each after the last reply (an idle worker)
            while sent < len(batches) and (not one_at_a_time or received == sent):
                coord.send(1, batches[sent])
                sent += 1
            if time.monotonic() > deadline:
                pytest.fail(f"only {received} of {len(batches)} replies in time")
            got = coord.recv(timeout=0.5)
            if got is not None and isinstance(got[1], m.Result | m.Failure):
                replies.setdefault(got[1].batch_id, []).append(got[1])
                received += 1
        coord.send(1, m.Shutdown(reason="test done"))
        bye = _expect(coord, m.Bye, deadline)
        thread.join(timeout=10)
        assert not thread.is_alive(), "the worker did not stop after Shutdown"
    finally:
        hub.close()
    return replies, json.loads(bye.stats_json)


def _check_result(store: Any, batch: m.Batch, reply: m.Result | m.Failure) -> None:
    assert isinstance(reply, m.Result), f"batch {batch.batch_id}: {reply}"
    np.testing.assert_array_equal(reply.ids, batch.ids)
    ids, mask, seg, lengths = store.gather(batch.indices)
    start, end = _logits(ModelInputs(batch.indices, ids, mask, seg, lengths))
    np.testing.assert_array_equal(reply.logits, np.stack([start, end], axis=-1))


def _overlapped(backend: FakeDeviceBackend, n: int) -> list[bool]:
    """For each k: did batch k+1's prepare start before batch k's run ended?"""
    prepare, run = backend.stages("prepare"), backend.stages("run")
    return [prepare[(k + 1) * ROWS][1] < run[k * ROWS][2] for k in range(n - 1)]


# ------------------------------------------------------------------------------- the pipeline

@pytest.mark.timeout(120)
def test_next_batch_is_prepared_while_this_one_runs(store, monkeypatch):
    n = 8
    backend = FakeDeviceBackend(BackendSpec("null"))
    batches = _batches(n)
    replies, stats = _serve(store, backend, batches, monkeypatch)
    assert sorted(replies) == list(range(n)) and all(len(r) == 1 for r in replies.values()), "exactly once"
    for batch in batches:
        _check_result(store, batch, replies[batch.batch_id][0])
    assert stats["pipelined"] is True and stats["batches"] == n and stats["inline_batches"] == 0
    # the gather and prepare off the compute thread; the compute thread only runs
    assert {t for t, _, _ in backend.stages("prepare").values()} == {"distbert-prepare"}
    assert {t for t, _, _ in backend.stages("run").values()} == {"distbert-compute"}
    overlapped = _overlapped(backend, n)
    assert sum(overlapped) >= len(overlapped) - 1, overlapped   # "most k": one late start allowed for a loaded box


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["env-off", "backend-says-no"])
def test_without_the_pipeline_stages_run_back_to_back_on_the_compute_thread(store, monkeypatch, how):
    """DISTBERT_WORKER_PIPELINE=0 (A/B measurement), or a backend that does not gain from overlap
    (every CPU backend): no prepare thread, so no extra hand-off and no overlap."""
    n = 5
    if how == "env-off":
        monkeypatch.setenv("DISTBERT_WORKER_PIPELINE", "0")
    backend = FakeDeviceBackend(BackendSpec("null"), overlaps=how == "env-off")
    batches = _batches(n)
    replies, stats = _serve(store, backend, batches, monkeypatch)
    for batch in batches:
        assert len(replies[batch.batch_id]) == 1
        _check_result(store, batch, replies[batch.batch_id][0])
    assert stats["pipelined"] is False
    threads = {t for s in ("prepare", "run") for t, _, _ in backend.stages(s).values()}
    assert threads == {"distbert-compute"}
    assert not any(_overlapped(backend, n))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pipeline", ["1", "0"])
def test_a_failure_in_either_stage_is_that_batchs_failure_and_the_worker_keeps_serving(store, monkeypatch, pipeline):
    monkeypatch.setenv("DISTBERT_WORKER_PIPELINE", pipeline)
    n = 6
    backend = FakeDeviceBackend(BackendSpec("null"), fail_prepare=2 * ROWS, fail_run=4 * ROWS)
    batches = _batches(n)
    replies, stats = _serve(store, backend, batches, monkeypatch)
    assert sorted(replies) == list(range(n)) and all(len(r) == 1 for r in replies.values())
    for k, (reply,) in sorted(replies.items()):
        if k in (2, 4):
            assert isinstance(reply, m.Failure) and reply.rank == 1 and reply.exc_type == "RuntimeError"
            assert reply.text == f"injected {'prepare' if k == 2 else 'run'} failure in batch {k * ROWS}"
            assert "Traceback" in reply.traceback
        else:
            _check_result(store, batches[k], reply)
    assert stats["pipelined"] is (pipeline == "1") and stats["batches"] == n - 2
    assert 5 * ROWS in backend.stages("run")   # served after both failures


@pytest.mark.timeout(120)
def test_a_one_sample_batch_on_an_idle_worker_still_runs_inline(store, monkeypatch):
    """The SingleStream path keeps its zero-hand-off shortcut with a pipelined backend: a one-sample
    batch while nothing is in flight runs both stages on the I/O thread."""
    backend = FakeDeviceBackend(BackendSpec("null"))
    batches = _batches(3, rows=1)
    replies, stats = _serve(store, backend, batches, monkeypatch, one_at_a_time=True)
    for batch in batches:
        _check_result(store, batch, replies[batch.batch_id][0])
    assert stats["pipelined"] is True and stats["inline_batches"] == 3
    assert {t for s in ("prepare", "run") for t, _, _ in backend.stages(s).values()} == {IO_THREAD}


# ------------------------------------------------------------------------------- backend contract

def test_one_stage_backends_get_a_passthrough_prepare():
    backend = NullBackend(BackendSpec("null"))
    ids = np.ones((2, 5), np.int32)
    inputs = ModelInputs(np.arange(2), ids, ids, ids, np.full(2, 5, np.int32))
    assert backend.overlap_prepare is False
    assert backend.prepare(inputs) is inputs
    start, end = backend.run_prepared(backend.prepare(inputs))
    assert start.shape == end.shape == (2, 5)
    with pytest.raises(TypeError, match=r"NullBackend.run_prepared: expected what prepare\(\) returned"):
        backend.run_prepared("not prepared")


needs_torch = pytest.mark.skipif(not all(importlib.util.find_spec(x) for x in ("torch", "transformers")),
                                 reason="torch and transformers are not installed")


@pytest.fixture(scope="module")
def tiny_torch(tmp_path_factory):
    from distbert.backends import modelmaker

    return modelmaker.make_model("tiny", "torch", 0, tmp_path_factory.mktemp("tiny") / "torch")


def _torch(model: Any, **kw: Any) -> Backend:
    from distbert.backends import create

    backend = create(BackendSpec(name="torch", model=str(model), **kw))
    backend.load()
    return backend


def _rows(lengths: tuple[int, ...], seed: int) -> ModelInputs:
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), max(lengths)), np.int32)
    mask, seg = np.zeros_like(ids), np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1000, 30000, n)
        mask[i, :n] = 1
        seg[i, n // 2:n] = 1
    return ModelInputs(np.arange(len(lengths), dtype=np.int64), ids, mask, seg, np.asarray(lengths, np.int32))


@needs_torch
def test_torch_on_cpu_keeps_one_stage(tiny_torch):
    backend = _torch(tiny_torch)
    inputs = _rows((9, 4), seed=0)
    assert backend.overlap_prepare is False and backend.info()["copy_stream"] is False
    assert backend.prepare(inputs) is inputs
    for a, b in zip(backend.run_prepared(backend.prepare(inputs)), backend.run(inputs), strict=True):
        np.testing.assert_array_equal(a, b)


@needs_torch
@pytest.mark.parametrize("graphs", ["0", "1"])
def test_cuda_batches_prepared_ahead_on_another_thread_match_the_cpu(tiny_torch, graphs):
    """GPU only (skips here): the worker's schedule, prepare of the next batches on another thread
    while this one runs, more batches than pinned buffers, eager and CUDA graphs; then the same
    batches sequentially through run(). Every logit must match the CPU backend's."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here: the fake-device tests above cover the pipeline on CPU")
    cpu, gpu = _torch(tiny_torch), _torch(tiny_torch, device="cuda", options=(("graphs", graphs),))
    gpu.warmup()
    assert gpu.overlap_prepare is True and gpu.info()["copy_stream"] is True
    batches = [_rows(lengths, seed) for seed, lengths in enumerate(
        ((40,), (40, 25, 33, 12, 7), (384, 200), tuple(range(10, 300, 2)), (5, 5, 5), (1,), (130,) * 64))]
    staged: queue.Queue[object] = queue.Queue(maxsize=1)
    producer = threading.Thread(target=lambda: [staged.put(gpu.prepare(b)) for b in batches], daemon=True)
    producer.start()
    pipelined = [gpu.run_prepared(staged.get(timeout=120)) for _ in batches]
    producer.join(timeout=10)
    for batch, got in zip(batches, pipelined, strict=True):
        want = cpu.run(batch)
        for a, b in zip(want, got, strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3)
        for a, b in zip(got, gpu.run(batch), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    gpu.close()
    gpu.close()


# ------------------------------------------------------------------------------- staging buffers

def test_staging_ring_reuses_a_buffer_only_after_its_own_copy_and_takes_them_in_turn():
    events: list[tuple[str, Any]] = []

    def alloc(n: int) -> list[int]:
        events.append(("alloc", n))
        return [0] * n

    ring: StagingRing[list[int], str] = StagingRing(2, alloc, len, lambda f: events.append(("wait", f)), min_size=8)
    s0, b0 = ring.acquire(4)
    ring.fence(s0, "copy-a")
    s1, b1 = ring.acquire(4)
    ring.fence(s1, "copy-b")
    assert (s0, s1) == (0, 1) and b0 is not b1 and len(b0) == len(b1) == 8      # min_size
    assert events == [("alloc", 8), ("alloc", 8)]                                 # fresh slots: no wait
    s, b = ring.acquire(8)
    assert (s, b) == (0, b0) and b is b0 and events[-1] == ("wait", "copy-a")      # its own copy only
    # slot 0 acquired but never fenced (its copy was not issued): free again without a wait
    s, b = ring.acquire(8)
    assert s == 1 and events[-1] == ("wait", "copy-b")
    ring.fence(1, "copy-c")
    events.clear()
    s, b = ring.acquire(8)
    assert s == 0 and events == []
    # a bigger batch: the old buffer is replaced only after the copy that read it completed
    s, b = ring.acquire(100)
    assert s == 1 and len(b) == 100 and events == [("wait", "copy-c"), ("alloc", 100)]
    assert ring.allocations == 3
    ring.fence(1, "copy-d")
    with pytest.raises(RuntimeError, match="fenced twice"):
        ring.fence(1, "copy-e")
    events.clear()
    ring.drain()
    assert events == [("wait", "copy-d")]
    ring.drain()
    assert events == [("wait", "copy-d")]
    with pytest.raises(ValueError, match="at least 1"):
        StagingRing(0, alloc, len, print)


@pytest.mark.timeout(60)
def test_staging_ring_never_overwrites_a_buffer_a_slow_copy_still_reads():
    """A fake copy engine on its own thread reads each buffer a while after the copy is issued, then
    sets the fence (a threading.Event, standing in for a CUDA event). A producer writes batches as
    fast as it can. Every copy must read the batch it was issued for."""
    jobs: queue.Queue[tuple[list[int], int, threading.Event] | None] = queue.Queue()
    seen: list[tuple[int, list[int]]] = []

    def copy_engine() -> None:
        while (job := jobs.get()) is not None:
            buf, batch, fence = job
            time.sleep(0.005)                  # the copy is still in flight ...
            seen.append((batch, buf[:3]))      # ... and reads the buffer only now
            fence.set()

    engine = threading.Thread(target=copy_engine, daemon=True)
    engine.start()
    ring: StagingRing[list[int], threading.Event] = StagingRing(2, lambda n: [0] * n, len,
                                                                lambda f: f.wait(timeout=10))
    for batch in range(12):
        slot, buf = ring.acquire(3)
        buf[:3] = [batch] * 3
        fence = threading.Event()
        jobs.put((buf, batch, fence))
        ring.fence(slot, fence)
    ring.drain()
    jobs.put(None)
    engine.join(timeout=10)
    assert seen == [(batch, [batch] * 3) for batch in range(12)]
