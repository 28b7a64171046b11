"""The shape ladder (``backends/shapes``): rounding, padding, the GPU policy, the Offline plan of the
whole data set in use, real models on padded batches, and a real multi-process run with
``--shape-ladder`` whose run.json counts what the workers really ran."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from distbert.backends.base import BackendSpec
from distbert.backends.shapes import (
    DEFAULT_STEP,
    EXACT,
    ShapeLadder,
    ladder_json,
    resolve_ladder,
    row_rungs,
    run_ladder,
)
from distbert.config import BatchConfig, LoadGenConfig, RunConfig
from distbert.engine.dispatcher import BatchPolicy, Complete, Dispatcher, SendBatch
from tests.batches import batch
from tests.conftest import REPO

GPU_BUDGET = 65536      # the torch backend's GPU hint (backends/torch.GPU_HINT)
GPU_MAX_BATCH = 256


def ladder32(max_rows: int = 256, budget: int | None = GPU_BUDGET) -> ShapeLadder:
    return ShapeLadder(32, row_rungs(max_rows), token_budget=budget)


# --------------------------------------------------------------------------- the ladder itself

def test_length_for_rounds_up_to_the_step_and_caps_at_384():
    lad = ladder32()
    assert [lad.length_for(n) for n in (1, 31, 32, 33, 352, 353, 384)] == [32, 32, 32, 64, 352, 384, 384]
    assert ShapeLadder(48, (1,)).length_for(370) == 384          # 384 is a rung even off the step
    with pytest.raises(ValueError, match="longer than"):
        lad.length_for(385)


def test_rows_for_takes_the_next_rung_and_refuses_a_batch_above_the_top():
    lad = ladder32(max_rows=200)
    assert lad.rows == (1, 2, 4, 8, 16, 32, 64, 128, 200)
    assert [lad.rows_for(n) for n in (1, 3, 4, 5, 129, 200)] == [1, 4, 4, 8, 200, 200]
    with pytest.raises(ValueError, match="larger than"):
        lad.rows_for(201)
    assert lad.fit_rows(100) == 64 and lad.fit_rows(0) == 1 and lad.fit_rows(10_000) == 200


def test_max_rows_fits_the_token_budget_and_a_long_row_still_goes():
    lad = ladder32()
    assert lad.max_rows(32) == 256 and lad.max_rows(256) == 256 and lad.max_rows(384) == 128
    assert ShapeLadder(32, (1, 2), token_budget=100).max_rows(384) == 1
    assert ladder32(budget=None).max_rows(384) == 256


def test_shapes_lists_every_shape_a_batch_can_take():
    lad = ladder32()
    shapes = lad.shapes()
    assert len(shapes) == len(set(shapes))
    assert {n for _, n in shapes} == set(range(32, 385, 32))
    assert all(r in lad.rows and r * n <= GPU_BUDGET for r, n in shapes)
    assert (128, 384) in shapes and (256, 384) not in shapes and (256, 256) in shapes
    assert EXACT.shapes() == [] and ShapeLadder(16, ()).shapes() == []


def test_ladders_refuse_nonsense():
    for bad in (dict(step=-1, rows=()), dict(step=8, rows=(2, 1)), dict(step=8, rows=(0, 1)),
                dict(step=8, rows=(1, 1)), dict(step=8, rows=(1,), token_budget=0)):
        with pytest.raises(ValueError):
            ShapeLadder(**bad)


def test_exact_ladder_changes_nothing():
    inputs = batch()
    assert EXACT.exact and EXACT.pad(inputs) is inputs
    assert EXACT.length_for(37) == 37 and EXACT.rows_for(5) == 5
    rows, width = EXACT.shapes_of(np.array([3, 5]), np.array([37, 12]))
    assert rows.tolist() == [3, 5] and width.tolist() == [37, 12]


def test_pad_keeps_the_real_rows_and_adds_safe_dummy_rows():
    inputs = batch(lengths=(40, 25, 33))                # 3 rows, width 40
    padded = ladder32().pad(inputs)
    assert padded.shape == (4, 64)
    for a, b in ((padded.input_ids, inputs.input_ids), (padded.input_mask, inputs.input_mask),
                 (padded.segment_ids, inputs.segment_ids)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a[:3, :40], b)
        assert not a[:3, 40:].any()                     # extra columns: mask 0 (and ids 0)
    # the dummy row: one [CLS] token that attention can attend to (a row of mask 0 would be all -inf)
    assert padded.input_ids[3, 0] == 101 and padded.input_mask[3].tolist() == [1] + [0] * 63
    assert padded.lengths.tolist() == [40, 25, 33, 1]
    assert padded.indices.tolist() == [0, 1, 2, 0]      # a real index: the oracle reads gold spans by it
    assert ladder32().pad(batch(lengths=(64, 10, 3, 3))).shape == (4, 64)


def test_shapes_of_matches_the_scalar_rounding():
    lad = ladder32(max_rows=100)
    rows = np.array([1, 3, 64, 65, 100, 150])
    longest = np.array([1, 40, 384, 200, 64, 7])
    r, w = lad.shapes_of(rows, longest)
    assert r.tolist() == [1, 4, 64, 100, 100, 150]      # above the top rung: counted as it is
    assert w.tolist() == [lad.length_for(n) for n in longest]


# --------------------------------------------------------------------------- the policy

@pytest.mark.parametrize("name,device,step", [
    ("torch", "cuda", DEFAULT_STEP), ("torch", "cuda:1", DEFAULT_STEP), ("onnxruntime", "rocm", DEFAULT_STEP),
    ("torch", "cpu", 0), ("onnxruntime", "cpu", 0), ("openvino", "cpu", 0), ("null", "cpu", 0),
    ("oracle", "cuda", 0)])
def test_gpu_backends_use_a_ladder_and_cpu_backends_trim_exactly(name, device, step):
    lad = resolve_ladder(BackendSpec(name, device=device), None, GPU_MAX_BATCH, GPU_BUDGET)
    assert lad.step == step and (lad.exact == (step == 0))
    if step:
        assert lad.rows == row_rungs(GPU_MAX_BATCH) and lad.token_budget == GPU_BUDGET


def test_shape_ladder_flag_forces_the_step_on_any_backend():
    assert resolve_ladder(BackendSpec("null"), 32, 1024, None) == ShapeLadder(32, row_rungs(1024))
    assert resolve_ladder(BackendSpec("torch", device="cuda"), 0, 256, GPU_BUDGET) is EXACT


def test_rank0_and_workers_resolve_the_same_ladder_from_the_config():
    """Rank 0 resolves from the ready workers' largest max batch and smallest budget, a worker from
    its own hint; with --max-batch/--token-budget they bound both, and the JSON form round-trips."""
    cfg = RunConfig(LoadGenConfig(), BackendSpec("torch", device="cuda"),
                    BatchConfig(max_batch=100, token_budget=20000))
    lad = run_ladder(cfg, GPU_MAX_BATCH, GPU_BUDGET)
    assert lad.rows[-1] == 100 and lad.token_budget == 20000
    assert run_ladder(RunConfig.from_json(cfg.to_json()), GPU_MAX_BATCH, GPU_BUDGET) == lad
    assert json.loads(json.dumps(ladder_json(lad))) == ladder_json(lad)
    small = RunConfig(LoadGenConfig(), BackendSpec("torch", device="cuda"), BatchConfig(max_batch=512))
    assert run_ladder(small, GPU_MAX_BATCH, GPU_BUDGET).rows[-1] == GPU_MAX_BATCH


def test_rank0_does_not_import_torch_to_plan():
    code = ("import sys; from distbert.engine import coordinator, dispatcher; from distbert.backends import shapes; "
            "from distbert.run import rank0; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- the Offline plan

@pytest.fixture(scope="module")
def store(squad_dev, vocab, session_cache):
    from distbert.data.squad.features import load_features

    return load_features(squad_dev, vocab, cache_dir=session_cache)


def _offline_plan(lengths: np.ndarray, ladder: ShapeLadder, max_batch: int, budget: int | None) -> dict:
    d = Dispatcher("Offline", BatchPolicy(max_batch=max_batch, token_budget=budget, credits=100_000, ladder=ladder),
                   lengths, want_logits=False)
    d.add_worker(1, 0.0, max_batch)
    idx = np.arange(len(lengths), dtype=np.int64)
    sent = [i for i in d.on_samples(idx.astype(np.uint64), idx, 0.0) if isinstance(i, SendBatch)]
    for s in sent:
        d.on_result(1, s.batch_id, 1.0)
    assert sorted(np.concatenate([s.indices for s in sent]).tolist()) == idx.tolist()   # each sample once
    return {"sent": sent, **d.shape_stats()}


def test_full_offline_plan_under_the_gpu_policy_has_few_shapes_and_little_padding(store, data_set):
    """The whole data set in use, planned as rank 0 plans it for the torch backend on a GPU: at most
    32 distinct shapes, every one a shape the worker warmed, and (official dev set) at most 12 %
    padding. Synthetic data is smaller and not SQuAD-shaped: the shape bound holds there too."""
    lengths = np.asarray(store.lengths)
    ladder = resolve_ladder(BackendSpec("torch", device="cuda"), None, GPU_MAX_BATCH, GPU_BUDGET)
    plan = _offline_plan(lengths, ladder, GPU_MAX_BATCH, GPU_BUDGET)
    warmed = set(ladder.shapes())
    for s in plan["sent"]:
        rows, width = ladder.rows_for(len(s.indices)), ladder.length_for(int(lengths[s.indices].max()))
        assert (rows, width) in warmed
    assert plan["batch_shapes"] <= 32, plan["shapes"]
    # full batches at one row count per ladder length, and one tail
    assert plan["batch_shapes"] <= len({ladder.length_for(n) for n in lengths}) + 1
    exact = _offline_plan(lengths, EXACT, GPU_MAX_BATCH, GPU_BUDGET)
    if data_set.official:
        assert len(lengths) == 10833
        assert plan["padding_fraction"] <= 0.12, plan
        assert exact["batch_shapes"] == 43          # what issue 19 counted: nearly one shape per batch


@pytest.mark.parametrize("seed", range(4))
def test_server_batches_stay_on_the_ladder_and_complete_once(seed):
    """Random Server traffic (piles and single samples, results in random order) under a ladder with
    a token budget: every batch sent is a warmed shape once padded, every sample completes once, and
    the dispatcher's shape counts add up to what was sent."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 385, 3000)
    ladder = ShapeLadder(32, row_rungs(64), token_budget=8192)
    d = Dispatcher("Server", BatchPolicy(max_batch=64, token_budget=8192, credits=2, max_wait_s=0.001,
                                         ladder=ladder), lengths, want_logits=False)
    warmed = set(ladder.shapes())
    inflight: dict[int, SendBatch] = {}
    done: list[int] = []
    tokens = 0
    now, next_id = 0.0, 0

    def handle(instrs):
        nonlocal tokens
        for ins in instrs:
            if isinstance(ins, SendBatch):
                shape = (ladder.rows_for(len(ins.indices)), ladder.length_for(int(lengths[ins.indices].max())))
                assert shape in warmed, shape
                tokens += shape[0] * shape[1]
                inflight[ins.batch_id] = ins
            elif isinstance(ins, Complete):
                done.extend(ins.ids.tolist())

    for w in (1, 2):
        handle(d.add_worker(w, now, 64))
    while next_id < 2500 or inflight:
        now += 0.0005
        if next_id < 2500:
            n = int(rng.choice([1, 1, 1, 5, 40, 150]))
            ids = np.arange(next_id, min(2500, next_id + n), dtype=np.uint64)
            next_id += len(ids)
            handle(d.on_samples(ids, rng.integers(0, len(lengths), len(ids)).astype(np.int64), now))
        if inflight and rng.random() < 0.6:
            bid = int(rng.choice(list(inflight)))
            handle(d.on_result(inflight.pop(bid).worker, bid, now))
        deadline = d.next_deadline()
        if deadline is not None and deadline <= now:
            handle(d.on_tick(now))
        if next_id >= 2500 and not inflight:
            handle(d.on_flush(now))
    assert sorted(done) == list(range(2500))
    stats = d.shape_stats()
    assert stats["tokens_run"] == tokens and 1 <= stats["batch_shapes"] <= len(warmed)
    assert all(tuple(map(int, k.split("x"))) in warmed for k in stats["shapes"])


# --------------------------------------------------------------------------- real models on padded batches

HAVE_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
HAVE_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None


@pytest.mark.parametrize("name,fmt", [
    pytest.param("onnxruntime", "onnx", marks=pytest.mark.skipif(not HAVE_ORT, reason="onnxruntime missing")),
    pytest.param("torch", "torch", marks=pytest.mark.skipif(not HAVE_TORCH, reason="torch missing"))])
def test_a_real_model_gives_the_same_logits_on_a_padded_batch(name, fmt, tmp_path):
    """Rows and columns the ladder adds change nothing in the real rows' logits (mask 0 columns, [CLS]
    dummy rows), so the worker's slice of a padded batch's outputs is the exact batch's outputs."""
    from distbert.backends import create, modelmaker

    model = modelmaker.make_model("tiny", fmt, 0, tmp_path / fmt)
    backend = create(BackendSpec(name=name, model=str(model), threads=1))
    backend.load()
    inputs = batch(lengths=(40, 25, 33))
    padded = ladder32().pad(inputs)
    assert padded.shape == (4, 64)
    s0, e0 = backend.run(inputs)
    s1, e1 = backend.run(padded)
    assert np.isfinite(s1).all() and np.isfinite(e1).all()     # the dummy row too
    np.testing.assert_allclose(s1[:3, :40], s0, atol=2e-4)
    np.testing.assert_allclose(e1[:3, :40], e0, atol=2e-4)
    backend.close()


# --------------------------------------------------------------------------- the worker and a real run

def test_worker_pads_to_the_ladder_and_slices_outputs_back(store):
    """The worker's gather -> pad -> run -> slice path (no transport: _compute is called directly)."""
    from distbert.engine.worker import Worker
    from distbert.wire import messages as m

    cfg = RunConfig(LoadGenConfig(), BackendSpec("oracle"), BatchConfig(max_batch=64, shape_ladder=32),
                    features_path=str(store.path))
    w = Worker(transport=None, rank=1, local_index=0, local_count=1, pin=False)
    ready = w.configure(cfg)
    assert json.loads(ready.info_json)["shape_ladder"] == ladder_json(ShapeLadder(32, row_rungs(64)))
    assert w.backend.shape_ladder == w.ladder
    lengths = np.asarray(store.lengths)
    idx = np.arange(min(5, len(store)), dtype=np.int64)
    res = w._compute(m.Batch(batch_id=0, want_logits=True, ids=idx.astype(np.uint64), indices=idx))
    assert isinstance(res, m.Result)
    width = int(lengths[idx].max())
    assert res.logits.shape == (len(idx), width, 2)           # the real rows and width, not the ladder's
    stats = w.stats()
    assert stats["shapes"] == {f"{w.ladder.rows_for(len(idx))}x{w.ladder.length_for(width)}": 1}
    run = w.ladder.rows_for(len(idx)) * w.ladder.length_for(width)
    assert stats["tokens_run"] == run and stats["tokens_padded"] == run - int(lengths[idx].sum())


@pytest.fixture(scope="module")
def env(squad_dev, vocab, session_cache) -> dict[str, str]:
    return dict(os.environ, DISTBERT_CACHE=str(session_cache), DISTBERT_NO_PROGRESS="1", PYTHONPATH=str(REPO))


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("scenario,extra", [
    ("Offline", []), ("Server", ["--target-qps", "3000", "--test-query-count", "2000"])])
def test_run_with_shape_ladder_records_the_shapes_the_workers_ran(scenario, extra, env, squad_dev, vocab, store,
                                                                  session_cache, tmp_path):
    """``distbert run --shape-ladder 32`` (oracle backend, two worker processes, real LoadGen and
    ZeroMQ): every shape in run.json is on the ladder, rank 0's per-test counts equal what the workers
    counted themselves, and the accuracy equals direct scoring (outputs sliced back exactly)."""
    from tests.test_engine_mp import _direct_oracle_f1

    out = tmp_path / "run"
    max_examples = None if scenario == "Offline" else min(1500, len(store) * 2 // 3)
    cmd = [sys.executable, "-m", "distbert", "run", "--dataset", str(squad_dev), "--vocab", str(vocab),
           "--output", str(out), "--backend", "oracle", "--scenario", scenario, "--mode", "both",
           "--workers", "2", "--max-batch", "128", "--shape-ladder", "32", *extra]
    if max_examples:
        cmd += ["--max-examples", str(max_examples)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((out / "run.json").read_text())
    ladder = ShapeLadder(32, row_rungs(128))
    warmed = set(ladder.shapes())
    assert record["config"]["batch"]["shape_ladder"] == 32
    per_test: dict[str, int] = {}
    tokens_run = tokens_padded = 0
    for mode in ("performance", "accuracy"):
        res = record["results"][mode]
        assert res["batch_policy"]["ladder"] == dict(ladder_json(ladder), rows=list(ladder.rows))
        assert 1 <= res["batch_shapes"] == len(res["dispatcher"]["shapes"]) <= len(warmed)
        assert 0.0 < res["padding_fraction"] < 1.0
        for key, count in res["dispatcher"]["shapes"].items():
            rows, width = map(int, key.split("x"))
            assert (rows, width) in warmed, key
            per_test[key] = per_test.get(key, 0) + count
        tokens_run += res["dispatcher"]["tokens_run"]
        tokens_padded += res["dispatcher"]["tokens_padded"]
    # what the workers ran, counted by them, is what rank 0 counted per test (a batch run twice -- a
    # requeue, a hedged copy -- counts once at rank 0, where it completed, and twice in the workers)
    ran: dict[str, int] = {}
    for w in record["workers"]:
        assert w["info"]["shape_ladder"] == ladder_json(ladder)
        for key, count in w["stats"]["shapes"].items():
            ran[key] = ran.get(key, 0) + count
    reruns = sum(record["results"][mode]["dispatcher"]["requeued_batches"]
                 + record["results"][mode]["dispatcher"].get("hedges", {}).get("sent", 0)
                 for mode in ("performance", "accuracy"))
    worker_run = sum(w["stats"]["tokens_run"] for w in record["workers"])
    worker_padded = sum(w["stats"]["tokens_padded"] for w in record["workers"])
    if reruns == 0:
        assert ran == per_test
        assert (worker_run, worker_padded) == (tokens_run, tokens_padded)
    else:
        assert all(ran.get(k, 0) >= c for k, c in per_test.items()) and worker_run >= tokens_run
    acc = record["results"]["accuracy"]
    assert acc["f1"] == pytest.approx(_direct_oracle_f1(squad_dev, vocab, session_cache, max_examples), abs=1e-9)
