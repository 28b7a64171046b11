"""CUDA graphs per (batch, length) bucket in the torch backend (``--option graphs=1``).

CUDA cannot run on this CPU-only test machine, so most tests inject an *eager stand-in* for the
capture function (:func:`eager_standin`): it keeps the contract of a captured graph (static input and
output tensors allocated once per bucket, ``replay`` reads the inputs as they are at replay time)
but runs the model eagerly. The planner, the padding, the cache and the runner are the same code the
CUDA path uses; only ``capture_cuda`` itself needs a GPU (``test_cuda_graphs_match_eager_on_gpu``).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from distbert.backends import create, modelmaker
from distbert.backends.base import BackendSpec, ModelInputs
from distbert.backends.graphs import (
    DEFAULT_CAPACITY,
    LENGTH_STEP,
    MAX_LENGTH,
    SMALL_BATCH,
    Bucket,
    Chunk,
    GraphCache,
    batch_ladder,
    bucket_length,
    pad_into,
    plan,
    unpad,
)
from distbert.errors import UserError
from tests.batches import batch

HAVE_TORCH = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch and transformers are not installed")
LADDER = batch_ladder(256)


# ------------------------------------------------------------------------------- bucket planner

@pytest.mark.parametrize("length,expected", [(1, 32), (31, 32), (32, 32), (33, 64), (64, 64), (65, 96),
                                             (353, 384), (383, 384), (384, 384)])
def test_lengths_round_up_to_a_multiple_of_32_capped_at_384(length, expected):
    assert bucket_length(length) == expected


@pytest.mark.parametrize("length", [0, -1, MAX_LENGTH + 1])
def test_lengths_outside_1_to_384_are_refused(length):
    with pytest.raises(ValueError, match="sequence length"):
        bucket_length(length)


def test_batch_ladder_is_powers_of_two_capped_at_the_max_batch():
    assert LADDER == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert batch_ladder(100) == (1, 2, 4, 8, 16, 32, 64, 100)
    assert batch_ladder(1) == (1,)
    with pytest.raises(ValueError):
        batch_ladder(0)


def test_batch_of_one_and_batch_of_max_run_as_one_unpadded_chunk():
    assert plan(1, 1, LADDER) == [Chunk(0, 1, Bucket(1, 32))]
    assert plan(1, 384, LADDER) == [Chunk(0, 1, Bucket(1, 384))]
    assert plan(256, 200, LADDER) == [Chunk(0, 256, Bucket(256, 224))]


def test_small_batches_pad_up_and_large_ones_split_rather_than_waste():
    assert plan(5, 40, LADDER) == [Chunk(0, 5, Bucket(8, 64))]                      # small: pad 3 rows
    assert plan(200, 40, LADDER) == [Chunk(0, 200, Bucket(256, 64))]                # 56 pad rows <= 256/4
    assert [c.bucket.batch for c in plan(170, 40, LADDER)] == [128, 32, 8, 2]       # 86 pad rows would be too many
    assert [c.bucket.batch for c in plan(600, 40, LADDER)] == [256, 256, 64, 32]    # above the top rung


@pytest.mark.parametrize("max_batch", [1, 4, 100, 256])
def test_every_plan_covers_each_row_once_with_bounded_padding(max_batch):
    ladder = batch_ladder(max_batch)
    for rows in range(1, 3 * max_batch + 2):
        chunks = plan(rows, 97, ladder)
        assert chunks[0].start == 0 and chunks[-1].stop == rows
        assert all(a.stop == b.start for a, b in zip(chunks, chunks[1:]))
        for c in chunks:
            assert c.bucket.batch in ladder and c.bucket.length == 128 and 1 <= c.rows <= c.bucket.batch
            pad = c.bucket.batch - c.rows
            assert pad == 0 or c.bucket.batch <= SMALL_BATCH or 4 * pad <= c.bucket.batch, (rows, c)
        assert all(c.rows == c.bucket.batch for c in chunks[:-1])    # only the last chunk is padded


def test_empty_batch_is_refused():
    with pytest.raises(ValueError, match="0 rows"):
        plan(0, 10, LADDER)


def _inputs(rows: int, length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, (rows, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[:, length // 2:] = rng.integers(0, 2, (rows, length - length // 2))
    seg = rng.integers(0, 2, (rows, length)).astype(np.int32)
    return ids, mask, seg


def test_padding_round_trip_clears_a_dirty_staging_buffer():
    ids, mask, seg = _inputs(13, 37)
    chunks = plan(13, 37, batch_ladder(8))
    assert [(c.rows, c.bucket) for c in chunks] == [(8, Bucket(8, 64)), (5, Bucket(8, 64))]
    staging = np.full((3, 8, 64), 7, np.int64)            # garbage from an earlier, longer batch
    for chunk in chunks:
        pad_into(staging, chunk, ids, mask, seg)
        for plane, src in enumerate((ids, mask, seg)):
            np.testing.assert_array_equal(unpad(staging[plane], chunk.rows, 37), src[chunk.start:chunk.stop])
        assert not staging[:, :, 37:].any()               # pad columns: ids, mask and segments 0
        assert not staging[:, chunk.rows:, :].any()       # pad rows likewise


def test_pad_into_refuses_a_buffer_of_the_wrong_shape():
    ids, mask, seg = _inputs(2, 40)
    with pytest.raises(ValueError, match="does not fit"):
        pad_into(np.zeros((3, 2, 32), np.int64), Chunk(0, 2, Bucket(2, 32)), ids, mask, seg)


# ------------------------------------------------------------------------------- graph cache

def test_cache_counts_hits_misses_and_evicts_the_least_recently_used():
    captured: list[Bucket] = []
    released: list[str] = []

    def capture(bucket: Bucket) -> str:
        captured.append(bucket)
        return f"graph{bucket.batch}x{bucket.length}"

    cache: GraphCache[str] = GraphCache(capture, capacity=2, release=released.append)
    a, b, c = Bucket(1, 32), Bucket(2, 32), Bucket(1, 64)
    assert cache.get(a) == "graph1x32" and cache.get(b) == "graph2x32"
    assert cache.get(a) == "graph1x32"                    # hit: a is now the most recently used
    cache.get(c)                                          # over capacity: b goes, not a
    assert released == ["graph2x32"] and cache.buckets() == [a, c] and b not in cache
    cache.get(b)                                          # recaptured
    assert captured == [a, b, c, b] and released == ["graph2x32", "graph1x32"]
    assert cache.stats() == {"graphs": 2, "capacity": 2, "hits": 1, "misses": 4, "evictions": 2}
    cache.clear()
    assert len(cache) == 0 and released == ["graph2x32", "graph1x32", "graph1x64", "graph2x32"]
    with pytest.raises(ValueError):
        GraphCache(capture, capacity=0)


def test_default_capacity_holds_the_whole_default_ladder():
    assert DEFAULT_CAPACITY >= len(LADDER) * (MAX_LENGTH // LENGTH_STEP)


# ------------------------------------------------------------------------- runner, eager stand-in

if HAVE_TORCH:
    import torch

    from distbert.backends.torch import Forward, GraphedModel, StaticGraph, load_model, qa_forward

    def eager_standin(forward: Forward, device: torch.device):
        """NOT a CUDA graph (CUDA cannot run here): the same static-tensor contract, run eagerly."""

        def capture(bucket: Bucket) -> StaticGraph:
            inputs = torch.zeros((3, bucket.batch, bucket.length), dtype=torch.int64, device=device)
            outputs = torch.zeros((2, bucket.batch, bucket.length), dtype=torch.float32, device=device)

            def replay() -> None:
                outputs.copy_(forward(inputs[0], inputs[1], inputs[2]))

            return StaticGraph(bucket, inputs, outputs, replay)

        return capture


@pytest.fixture(scope="module")
def tiny_torch(tmp_path_factory):
    return modelmaker.make_model("tiny", "torch", 0, tmp_path_factory.mktemp("tiny") / "torch")


def _backend(model, **kw):
    backend = create(BackendSpec(name="torch", model=str(model), **kw))
    backend.load()
    return backend


def _batch(lengths, seed=3) -> ModelInputs:
    return batch(tuple(lengths), seed=seed)   # tests/test_backends.py: a worker-style random batch


@needs_torch
def test_runner_round_trips_inputs_through_an_identity_model():
    """A model that returns its ids and mask as logits: any padding or slicing slip shows exactly."""

    def identity(ids, mask, segments):
        return torch.stack((ids.float(), mask.float() + segments.float()))

    runner = GraphedModel(eager_standin(identity, torch.device("cpu")), torch.device("cpu"), max_batch=4)
    for rows, length in ((1, 1), (3, 33), (11, 70), (4, 384)):
        ids, mask, seg = _inputs(rows, length, seed=rows)
        out = runner.run(ids, mask, seg)
        assert out.shape == (2, rows, length) and out.dtype == np.float32
        np.testing.assert_array_equal(out[0], ids)
        np.testing.assert_array_equal(out[1], mask + seg)


@needs_torch
def test_padded_buckets_give_the_unpadded_logits_of_a_real_bert(tiny_torch):
    """Real tiny BERT on CPU: pad columns (mask 0) and pad rows change no real row's logits."""
    eager = _backend(tiny_torch)
    forward = qa_forward(load_model(str(tiny_torch), torch.float32)[0])
    runner = GraphedModel(eager_standin(forward, torch.device("cpu")), torch.device("cpu"), max_batch=8)
    padded_rows = padded_cols = 0
    for lengths in ((40,), (40, 25, 33, 12, 7), (384, 200), tuple(range(10, 120, 10))):
        inputs = _batch(lengths)
        start, end = eager.run(inputs)
        with torch.inference_mode():
            out = runner.run(inputs.input_ids, inputs.input_mask, inputs.segment_ids)
        for c in plan(*inputs.shape, runner.ladder):
            padded_rows += c.bucket.batch > c.rows
            padded_cols += c.bucket.length > inputs.shape[1]
        np.testing.assert_allclose(out[0], start, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out[1], end, rtol=1e-4, atol=1e-5)
    assert padded_rows >= 2 and padded_cols >= 3           # the cases above really were padded both ways


@needs_torch
def test_replays_read_the_static_inputs_of_each_batch_not_the_first(tiny_torch):
    eager = _backend(tiny_torch)
    forward = qa_forward(load_model(str(tiny_torch), torch.float32)[0])
    runner = GraphedModel(eager_standin(forward, torch.device("cpu")), torch.device("cpu"), max_batch=8)
    first, second = _batch((30, 20), seed=1), _batch((28, 31), seed=2)   # both [2, 32] buckets
    with torch.inference_mode():
        runner.run(first.input_ids, first.input_mask, first.segment_ids)
        graph = runner.cache.get(Bucket(2, 32))
        out = runner.run(second.input_ids, second.input_mask, second.segment_ids)
    assert runner.cache.get(Bucket(2, 32)) is graph                     # the same static graph, replayed
    np.testing.assert_allclose(out[0], eager.run(second)[0], rtol=1e-4, atol=1e-5)


@needs_torch
def test_runner_cache_counts_and_evictions(tiny_torch):
    def zeros(ids, mask, segments):
        return torch.zeros((2, *ids.shape))

    runner = GraphedModel(eager_standin(zeros, torch.device("cpu")), torch.device("cpu"), max_batch=256, capacity=2)
    for rows, length in ((1, 20), (1, 30), (2, 40), (1, 70), (1, 5)):
        runner.run(*_inputs(rows, length))
    # (1,32) miss, (1,32) hit, (2,64) miss, (1,96) miss -> evicts (1,32), (1,32) miss -> evicts (2,64)
    info = runner.info()
    assert {k: info[k] for k in ("graphs", "hits", "misses", "evictions")} == \
        {"graphs": 2, "hits": 1, "misses": 4, "evictions": 2}
    assert runner.cache.buckets() == [Bucket(1, 96), Bucket(1, 32)]
    assert info["batch_ladder"] == list(LADDER) and info["length_step"] == 32


# ------------------------------------------------------------------------------- backend options

@needs_torch
def test_graphs_on_cpu_is_a_one_line_user_error(tiny_torch):
    with pytest.raises(UserError, match=r"graphs=1 needs a GPU.*runs on cpu.*--device cuda, or drop graphs=1"):
        _backend(tiny_torch, options=(("graphs", "1"),))


@needs_torch
@pytest.mark.parametrize("options,match", [((("graphs", "yes"),), "graphs=yes"),
                                           ((("graphs", "1"), ("graphs_cache", "0")), "graphs_cache=0"),
                                           ((("graphs_cache", "many"),), "graphs_cache=many")])
def test_bad_graph_options_are_user_errors(tiny_torch, options, match):
    with pytest.raises(UserError, match=match):
        _backend(tiny_torch, options=options)


@needs_torch
def test_graphs_are_off_by_default(tiny_torch):
    backend = _backend(tiny_torch)
    assert backend.info()["cuda_graphs"] is None
    assert _backend(tiny_torch, options=(("graphs", "0"),)).info()["cuda_graphs"] is None


@needs_torch
def test_cuda_graphs_match_eager_on_gpu(tiny_torch):
    """The real capture_cuda path; runs only where a CUDA GPU is visible."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here: the eager stand-in tests above cover the CPU side")
    eager = _backend(tiny_torch, device="cuda")
    graphed = _backend(tiny_torch, device="cuda", options=(("graphs", "1"), ("graphs_cache", "4")))
    graphed.warmup()
    for lengths in ((40,), (40, 25, 33, 12, 7), (384, 200), tuple(range(10, 300, 2))):
        inputs = _batch(lengths)
        want = eager.run(inputs)
        for _ in range(2):                                # capture (or hit), then hit
            for a, b in zip(want, graphed.run(inputs)):
                np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3)
    info = graphed.info()["cuda_graphs"]
    assert info["graphs"] == 4 and info["evictions"] > 0 and info["hits"] > 0
    graphed.close()
    graphed.close()


@needs_torch
def test_with_a_shape_ladder_every_bucket_is_a_ladder_shape_captured_at_warmup_not_mid_run(caplog):
    """issue 19: the ladder's shapes are the buckets (one unpadded chunk per batch), the cache grows
    to hold them all, and once each shape ran once (the warm-up) no batch padded to the ladder
    captures again. A capacity the user set below the shape count stays, with a warning."""
    from distbert.backends.base import dummy_batch
    from distbert.backends.shapes import ShapeLadder

    def zeros(ids, mask, segments):
        return torch.zeros((2, *ids.shape))

    ladder = ShapeLadder(step=96, rows=(1, 2, 4, 8, 16), token_budget=2048)
    shapes = ladder.shapes()
    assert (16, 96) in shapes and (16, 384) not in shapes                 # the token budget bounds rows
    runner = GraphedModel(eager_standin(zeros, torch.device("cpu")), torch.device("cpu"), max_batch=16, capacity=4)
    runner.use_shapes(shapes)
    assert runner.cache.capacity == len(shapes) > 4
    assert runner.plan(16, 96) == [Chunk(0, 16, Bucket(16, 96))]        # not split, not padded
    assert runner.plan(3, 50) == plan(3, 50, runner.ladder)              # off the ladder: the old buckets
    for rows, length in shapes:                                          # the warm-up
        warm = dummy_batch(rows, length)
        runner.run(warm.input_ids, warm.input_mask, warm.segment_ids)
    assert runner.cache.misses == len(shapes) and runner.info()["buckets"] == "shape ladder"
    rng = np.random.default_rng(1)
    for _ in range(40):                                                  # served batches, padded by the worker
        inputs = ladder.pad(_batch(rng.integers(1, 300, int(rng.integers(1, 5)))))
        runner.run(inputs.input_ids, inputs.input_mask, inputs.segment_ids)
    assert runner.cache.misses == len(shapes) and runner.cache.hits >= 40 and runner.cache.evictions == 0
    small = GraphedModel(eager_standin(zeros, torch.device("cpu")), torch.device("cpu"), max_batch=16, capacity=4)
    with caplog.at_level("WARNING"):
        small.use_shapes(shapes, grow=False)
    assert small.cache.capacity == 4 and "graphs_cache=4 holds fewer graphs than the" in caplog.text
