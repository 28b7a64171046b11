"""The random-weight model maker: determinism, exact MLPerf I/O, formats agree, atomic cached writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from distbert.backends import modelmaker
from distbert.errors import UserError

onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny seed-0 models, made on first use per format (int8 needs onnxruntime, torch needs torch)."""
    root = tmp_path_factory.mktemp("random-models")
    made: dict[str, Path] = {}

    def get(fmt: str) -> Path:
        if fmt == "onnx-int8":
            pytest.importorskip("onnxruntime")
        if fmt == "torch":
            pytest.importorskip("torch")
        if fmt not in made:
            made[fmt] = modelmaker.make_model("tiny", fmt, 0, root / fmt)
        return made[fmt]

    return get


def _batch(batch: int = 3, length: int = 48, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, (batch, length), dtype=np.int64)
    ids[:, 0] = 101
    mask = np.ones_like(ids)
    mask[1, length - 10:] = 0                       # one padded row
    ids[mask == 0] = 0
    seg = np.zeros_like(ids)
    seg[:, length // 3:] = 1
    seg[mask == 0] = 0
    return {"input_ids": ids, "input_mask": mask, "segment_ids": seg}


# ------------------------------------------------------------------------------------ weights

def test_weights_are_deterministic_per_seed():
    shape = modelmaker.SHAPES["tiny"]
    a, b, c = (modelmaker.random_weights(shape, s) for s in (0, 0, 1))
    assert list(a) == list(b)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["qa_outputs.weight"], c["qa_outputs.weight"])
    w = a["bert.encoder.layer.0.attention.self.query.weight"]
    assert w.dtype == np.float32 and abs(float(w.std()) - 0.02) < 0.003
    assert np.all(a["bert.embeddings.LayerNorm.weight"] == 1) and np.all(a["qa_outputs.bias"] == 0)


@pytest.mark.parametrize("shape", ["large", "base", "tiny"])
def test_weight_names_and_shapes_match_transformers(shape):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(**modelmaker.SHAPES[shape].bert_config())
    with torch.device("meta"):              # BERT-Large without allocating its weights
        net = transformers.BertForQuestionAnswering(cfg)
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    ours = {name: dims for name, dims, _ in modelmaker.weight_specs(modelmaker.SHAPES[shape])}
    assert ours == expected


def test_large_shape_is_the_mlperf_config():
    cfg = modelmaker.SHAPES["large"].bert_config()
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["intermediate_size"],
            cfg["vocab_size"], cfg["max_position_embeddings"], cfg["type_vocab_size"]) == (24, 1024, 16, 4096, 30522, 512, 2)
    base, tiny = modelmaker.SHAPES["base"], modelmaker.SHAPES["tiny"]
    assert (base.num_hidden_layers, base.hidden_size, base.num_attention_heads, base.intermediate_size) == (12, 768, 12, 3072)
    assert (tiny.num_hidden_layers, tiny.hidden_size, tiny.num_attention_heads, tiny.intermediate_size,
            tiny.vocab_size) == (2, 64, 2, 128, 30522)


# --------------------------------------------------------------------------------------- onnx

def _io(path: Path) -> tuple[list, list]:
    g = onnx.load(str(path)).graph
    def desc(v):
        t = v.type.tensor_type
        return v.name, t.elem_type, [d.dim_param or d.dim_value for d in t.shape.dim]
    return [desc(v) for v in g.input], [desc(v) for v in g.output]


def test_onnx_fp32_has_mlperf_io_with_dynamic_batch_and_seq(models):
    inputs, outputs = _io(models("onnx"))
    assert [n for n, _, _ in inputs] == ["input_ids", "input_mask", "segment_ids"]
    assert [n for n, _, _ in outputs] == ["output_start_logits", "output_end_logits"]
    assert all(t == onnx.TensorProto.INT64 for _, t, _ in inputs)
    assert all(t == onnx.TensorProto.FLOAT for _, t, _ in outputs)
    for _, _, dims in inputs + outputs:
        assert len(dims) == 2 and all(isinstance(d, str) and d for d in dims)   # symbolic = dynamic
    ops = {n.op_type for n in onnx.load(str(models("onnx"))).graph.node}
    assert {"LayerNormalization", "Erf", "Softmax", "MatMul", "Gather"} <= ops
    onnx.checker.check_model(str(models("onnx")))


def test_onnx_int8_has_mlperf_int8_names_and_quantized_matmuls(models):
    inputs, outputs = _io(models("onnx-int8"))
    assert [n for n, _, _ in inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [n for n, _, _ in outputs] == ["output_start_logits", "output_end_logits"]
    ops = {n.op_type for n in onnx.load(str(models("onnx-int8"))).graph.node}
    assert "MatMulInteger" in ops or "QLinearMatMul" in ops or "DynamicQuantizeMatMul" in ops


def test_onnx_graph_matches_transformers_with_the_same_weights(models):
    ort = pytest.importorskip("onnxruntime")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    feed = _batch()
    start, end = ort.InferenceSession(str(models("onnx")), providers=["CPUExecutionProvider"]).run(None, feed)
    cfg = transformers.BertConfig(**modelmaker.SHAPES["tiny"].bert_config())
    net = transformers.BertForQuestionAnswering(cfg).eval()
    weights = modelmaker.random_weights(modelmaker.SHAPES["tiny"], 0)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    with torch.inference_mode():
        out = net(input_ids=torch.from_numpy(feed["input_ids"]), attention_mask=torch.from_numpy(feed["input_mask"]),
                  token_type_ids=torch.from_numpy(feed["segment_ids"]))
    real = feed["input_mask"].astype(bool)
    assert np.abs(out.start_logits.numpy() - start)[real].max() <= 1e-4
    assert np.abs(out.end_logits.numpy() - end)[real].max() <= 1e-4


def test_int8_is_close_to_fp32(models):
    ort = pytest.importorskip("onnxruntime")
    feed = _batch()
    fp32 = ort.InferenceSession(str(models("onnx")), providers=["CPUExecutionProvider"]).run(None, feed)
    int8 = ort.InferenceSession(str(models("onnx-int8")), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": feed["input_ids"], "attention_mask": feed["input_mask"],
               "token_type_ids": feed["segment_ids"]})
    for a, b in zip(fp32, int8):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95


# -------------------------------------------------------------------------------------- torch

def test_torch_format_is_an_mlperf_checkpoint_with_the_same_weights(models):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    d = models("torch")
    assert d.is_dir() and (d / "model.pytorch").is_file()
    cfg = transformers.BertConfig.from_json_file(str(d / "bert_config.json"))
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (64, 2, 30522)
    state = torch.load(d / "model.pytorch", weights_only=True)
    weights = modelmaker.random_weights(modelmaker.SHAPES["tiny"], 0)
    assert set(state) == set(weights)
    assert all(np.array_equal(state[k].numpy(), weights[k]) for k in weights)
    result = transformers.BertForQuestionAnswering(cfg).load_state_dict(state, strict=False)
    assert not result.missing_keys and not result.unexpected_keys


# ------------------------------------------------------------------------------ files, cache

@pytest.mark.parametrize("fmt", modelmaker.FORMATS)
def test_marker_labels_the_model_random(models, fmt):
    path = models(fmt)
    marker = modelmaker.read_marker(path)
    assert marker is not None and marker["random_weights"] is True
    assert (marker["shape"], marker["format"], marker["seed"]) == ("tiny", fmt, 0)
    assert modelmaker.is_random_model(path)


def test_make_model_replaces_files_atomically_and_leaves_no_temp(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "model.onnx").write_text("stale")
    path = modelmaker.make_model("tiny", "onnx", 3, out)
    assert path == out / "model.onnx" and path.stat().st_size > 1_000_000
    assert (out / "keep.txt").read_text() == "mine"
    assert json.loads((out / "distbert-model.json").read_text())["seed"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]        # temp dir removed
    fresh = modelmaker.make_model("tiny", "onnx", 3, tmp_path / "fresh")
    assert fresh.parent.stat().st_mode & 0o755 == 0o755                # readable in a shared cache


def test_ensure_random_model_caches(tmp_path):
    path = modelmaker.ensure_random_model("tiny", "onnx", seed=5, cache_dir=tmp_path)
    assert path == tmp_path / "models" / "random" / "tiny-onnx-5" / "model.onnx"
    mtime = path.stat().st_mtime_ns
    assert modelmaker.ensure_random_model("tiny", "onnx", seed=5, cache_dir=tmp_path) == path
    assert path.stat().st_mtime_ns == mtime                          # not regenerated
    (path.parent / "distbert-model.json").unlink()                    # incomplete -> regenerate
    assert modelmaker.ensure_random_model("tiny", "onnx", seed=5, cache_dir=tmp_path) == path
    assert (path.parent / "distbert-model.json").is_file()


def test_bad_shape_or_format_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--shape"):
        modelmaker.make_model("huge", "onnx", 0, tmp_path / "x")
    with pytest.raises(UserError, match="--format"):
        modelmaker.make_model("tiny", "tflite", 0, tmp_path / "x")


def test_cli_model_make_prints_the_model_path(tmp_path, capsys):
    from distbert.cli.main import main

    assert main(["model", "make", "--shape", "tiny", "--format", "onnx", "--seed", "2",
                 "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert Path(printed) == tmp_path / "cli" / "model.onnx" and Path(printed).is_file()
