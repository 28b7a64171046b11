"""Real backends on tiny random-weight models: they run, agree with each other, and fail clearly."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest

from distbert.backends import create, modelmaker
from distbert.backends.base import BackendSpec, BatchHint, ModelInputs
from distbert.errors import UserError
from tests.batches import batch

onnx = pytest.importorskip("onnx")
HAVE = {name: importlib.util.find_spec(name) is not None
        for name in ("onnxruntime", "torch", "transformers", "openvino", "deepsparse")}
needs = {name: pytest.mark.skipif(not ok, reason=f"{name} is not installed") for name, ok in HAVE.items()}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Tiny models for seed 0, generated once per session."""
    root = tmp_path_factory.mktemp("tiny-models")
    out = {"onnx": modelmaker.make_model("tiny", "onnx", 0, root / "onnx")}
    if HAVE["onnxruntime"]:
        out["onnx-int8"] = modelmaker.make_model("tiny", "onnx-int8", 0, root / "int8")
    if HAVE["torch"]:
        out["torch"] = modelmaker.make_model("tiny", "torch", 0, root / "torch")
    return out


def real(inputs: ModelInputs) -> np.ndarray:
    return inputs.input_mask.astype(bool)


def loaded(name: str, model: Path | str, **kw) -> object:
    backend = create(BackendSpec(name=name, model=str(model), **kw))
    backend.load()
    return backend


def _variant(src: Path, dst: Path, edit) -> Path:
    model = onnx.load(str(src))
    edit(model.graph)
    onnx.save(model, str(dst))
    return dst


# --------------------------------------------------------------------------- every backend runs

REAL_BACKENDS = [
    pytest.param("onnxruntime", "onnx", {}, marks=needs["onnxruntime"]),
    pytest.param("torch", "torch", {}, marks=[needs["torch"], needs["transformers"]]),
    pytest.param("openvino", "onnx", {}, marks=needs["openvino"]),
    pytest.param("deepsparse", "onnx", {"options": (("ds_buckets", "64"), ("ds_batch", "4"))},
                 marks=needs["deepsparse"]),
]


@pytest.mark.parametrize("name,fmt,kw", REAL_BACKENDS)
def test_backend_runs_and_returns_float32_logits(tiny, name, fmt, kw):
    backend = loaded(name, tiny[fmt], **kw)
    backend.warmup()
    inputs = batch()
    start, end = backend.run(inputs)
    assert start.shape == end.shape == inputs.shape
    assert start.dtype == end.dtype == np.float32
    assert np.isfinite(start).all() and np.isfinite(end).all()
    hint = backend.batch_hint()
    assert isinstance(hint, BatchHint) and hint.max_batch >= 1
    info = backend.info()
    assert info["backend"] == name
    backend.close()
    backend.close()                       # safe twice


def test_deepsparse_absent_is_a_user_error_naming_the_extra(tiny):
    if HAVE["deepsparse"]:
        pytest.skip("deepsparse is installed here")
    backend = create(BackendSpec(name="deepsparse", model=str(tiny["onnx"])))
    with pytest.raises(UserError, match="deepsparse.*numpy<2"):
        backend.load()


# ------------------------------------------------------------------------------ agreement

@needs["onnxruntime"]
@needs["torch"]
@needs["transformers"]
def test_onnxruntime_and_torch_agree_for_the_same_seed(tiny):
    inputs = batch()
    ort_out = loaded("onnxruntime", tiny["onnx"]).run(inputs)
    torch_out = loaded("torch", tiny["torch"]).run(inputs)
    for a, b in zip(ort_out, torch_out):
        assert np.abs(a - b)[real(inputs)].max() <= 1e-4


@needs["onnxruntime"]
@needs["openvino"]
def test_openvino_agrees_with_onnxruntime(tiny):
    inputs = batch()
    for a, b in zip(loaded("onnxruntime", tiny["onnx"]).run(inputs), loaded("openvino", tiny["onnx"]).run(inputs)):
        assert np.abs(a - b)[real(inputs)].max() <= 1e-4


@needs["onnxruntime"]
@needs["deepsparse"]
def test_deepsparse_agrees_with_onnxruntime(tiny):
    """DeepSparse runs padded to its bucket and engine batch; the real positions must match ORT."""
    inputs = batch()
    before = hashlib.sha256(tiny["onnx"].read_bytes()).hexdigest()
    ds = loaded("deepsparse", tiny["onnx"], options=(("ds_buckets", "64"), ("ds_batch", "4")))
    assert ds.info()["buckets"] == [64, 384]          # 384 is always added: no feature can overflow
    ds.warmup()                                       # compiles an engine per bucket
    for a, b in zip(loaded("onnxruntime", tiny["onnx"]).run(inputs), ds.run(inputs)):
        assert b.shape == inputs.shape and b.dtype == np.float32
        assert np.abs(a - b)[real(inputs)].max() <= 1e-4
    ds.close()
    # deepsparse rewrites the file it compiles; the backend gives it a private copy
    assert hashlib.sha256(tiny["onnx"].read_bytes()).hexdigest() == before


@pytest.mark.parametrize("name,fmt", [pytest.param("onnxruntime", "onnx", marks=needs["onnxruntime"]),
                                      pytest.param("torch", "torch", marks=[needs["torch"], needs["transformers"]]),
                                      pytest.param("openvino", "onnx", marks=needs["openvino"])])
def test_trimmed_and_padded_to_384_agree_on_real_positions(tiny, name, fmt):
    backend = loaded(name, tiny[fmt])
    trimmed, padded = batch(), batch(pad_to=384)
    t_start, t_end = backend.run(trimmed)
    p_start, p_end = backend.run(padded)
    assert p_start.shape == (4, 384)
    width = trimmed.shape[1]
    mask = real(trimmed)
    assert np.abs(t_start - p_start[:, :width])[mask].max() <= 1e-4
    assert np.abs(t_end - p_end[:, :width])[mask].max() <= 1e-4


@needs["onnxruntime"]
@pytest.mark.parametrize("name", ["onnxruntime", pytest.param("openvino", marks=needs["openvino"])])
def test_int8_model_runs_and_tracks_fp32(tiny, name):
    inputs = batch()
    fp32 = loaded(name, tiny["onnx"]).run(inputs)
    int8 = loaded(name, tiny["onnx-int8"], precision="int8").run(inputs)
    assert int8[0].shape == inputs.shape
    for a, b in zip(fp32, int8):
        m = real(inputs)
        assert np.corrcoef(a[m], b[m])[0, 1] > 0.95


# ------------------------------------------------------------------- graph I/O variations (ORT, OV)

def _fix_seq(graph, length: int = 384) -> None:
    for vi in list(graph.input) + list(graph.output):
        vi.type.tensor_type.shape.dim[1].ClearField("dim_param")
        vi.type.tensor_type.shape.dim[1].dim_value = length


def _hf_names(graph) -> None:
    renames = {"input_mask": "attention_mask", "segment_ids": "token_type_ids",
               "output_start_logits": "start_logits", "output_end_logits": "end_logits"}
    for vi in list(graph.input) + list(graph.output):
        vi.name = renames.get(vi.name, vi.name)
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]


def _single_logits(graph) -> None:
    # expose the [B, L, 2] qa_outputs tensor (the Split's input) as the only output "logits"
    split = next(n for n in graph.node if n.op_type == "Split")
    kept = [n for n in graph.node if n.op_type != "Squeeze" and n is not split]
    del graph.node[:]
    graph.node.extend(kept)
    for n in graph.node:
        n.output[:] = ["logits" if o == split.input[0] else o for o in n.output]
    del graph.output[:]
    graph.output.append(onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", "seq", 2]))


def _retype_inputs(graph, elem_type: int) -> None:
    """Give the graph inputs of ``elem_type``, cast to int64 inside (as some exporters do)."""
    names = [vi.name for vi in graph.input]
    for node in graph.node:
        node.input[:] = [n + "_cast" if n in names else n for n in node.input]
    for vi in graph.input:
        vi.type.tensor_type.elem_type = elem_type
        graph.node.insert(0, onnx.helper.make_node("Cast", [vi.name], [vi.name + "_cast"], to=onnx.TensorProto.INT64))


def _int32_inputs(graph) -> None:
    _retype_inputs(graph, onnx.TensorProto.INT32)


VARIANTS = {"static-384": _fix_seq, "hf-names": _hf_names, "single-logits": _single_logits, "int32": _int32_inputs}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("name", [pytest.param("onnxruntime", marks=needs["onnxruntime"]),
                                  pytest.param("openvino", marks=needs["openvino"])])
def test_graph_variants_give_the_same_logits(tiny, tmp_path, own_cache, variant, name):
    path = _variant(tiny["onnx"], tmp_path / f"{variant}.onnx", VARIANTS[variant])
    inputs = batch()
    ref = loaded(name, tiny["onnx"]).run(inputs)
    backend = loaded(name, path)
    got = backend.run(inputs)
    for a, b in zip(ref, got):
        assert b.shape == inputs.shape and b.dtype == np.float32
        assert np.abs(a - b)[real(inputs)].max() <= 1e-4
    if variant == "static-384":
        # the declared 384 is rewritten away (the graph computes its shapes from the input)
        assert backend.info()["static_seq_len"] is None
        assert backend.info()["seq_len_mode"].startswith("static length 384 rewritten as dynamic")


@pytest.fixture
def own_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DISTBERT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _hardcode_384(graph) -> None:
    """Static 384 in the declared dims *and* in the position-embedding slice (as some exports bake it)."""
    _fix_seq(graph)
    shape_node = next(n for n in graph.node if n.op_type == "Shape")
    graph.node.remove(shape_node)
    graph.initializer.append(onnx.numpy_helper.from_array(np.array([384], np.int64), shape_node.output[0]))


def _hardcode_wrong_values(graph) -> None:
    """Static 384 declared, and padding that is *not* masked out: other lengths give other numbers."""
    _fix_seq(graph)
    init = next(t for t in graph.initializer if t.name == "mask_value")
    init.CopyFrom(onnx.numpy_helper.from_array(np.array(0.0, np.float32), "mask_value"))


@pytest.mark.parametrize("name", [pytest.param("onnxruntime", marks=needs["onnxruntime"]),
                                  pytest.param("openvino", marks=needs["openvino"])])
def test_static_384_graph_is_rewritten_once_and_runs_trimmed(tiny, tmp_path, own_cache, name):
    path = _variant(tiny["onnx"], tmp_path / "static.onnx", _fix_seq)
    backend = loaded(name, path)
    copies = list((own_cache / "models" / "dynamic-seq").glob("*/static.onnx"))
    assert len(copies) == 1
    stamp = copies[0].stat().st_mtime_ns
    inputs = batch()
    ref = loaded(name, tiny["onnx"]).run(inputs)
    for a, b in zip(ref, backend.run(inputs)):
        assert b.shape == inputs.shape
        assert np.abs(a - b)[real(inputs)].max() <= 1e-4
    again = loaded(name, path)                              # a second worker reuses the copy
    assert again.info()["static_seq_len"] is None
    assert copies[0].stat().st_mtime_ns == stamp
    assert list((own_cache / "models" / "dynamic-seq").glob("*/.*tmp")) == []


@pytest.mark.parametrize("edit,why", [(_hardcode_384, "fails"), (_hardcode_wrong_values, "differ")])
@pytest.mark.parametrize("name", [pytest.param("onnxruntime", marks=needs["onnxruntime"]),
                                  pytest.param("openvino", marks=needs["openvino"])])
def test_length_dependent_static_graph_keeps_padding_and_says_why(tiny, tmp_path, own_cache, caplog,
                                                                  name, edit, why):
    path = _variant(tiny["onnx"], tmp_path / "baked.onnx", edit)
    with caplog.at_level(logging.WARNING):
        backend = loaded(name, path)
    info = backend.info()
    assert info["static_seq_len"] == 384
    assert info["seq_len_mode"].startswith("padded to its static length 384") and why in info["seq_len_mode"]
    assert any("static sequence length 384" in r.getMessage() for r in caplog.records)
    inputs = batch()
    start, end = backend.run(inputs)              # padded to 384 inside, sliced back
    assert start.shape == inputs.shape
    if edit is _hardcode_384:                     # the unmasked variant is a different model
        for a, b in zip(loaded(name, tiny["onnx"]).run(inputs), (start, end)):
            assert np.abs(a - b)[real(inputs)].max() <= 1e-4


@pytest.mark.parametrize("name", [pytest.param("onnxruntime", marks=needs["onnxruntime"]),
                                  pytest.param("openvino", marks=needs["openvino"])])
def test_seq_trim_0_keeps_the_static_graph(tiny, tmp_path, own_cache, name):
    path = _variant(tiny["onnx"], tmp_path / "static.onnx", _fix_seq)
    backend = loaded(name, path, options=(("seq_trim", "0"),))
    assert backend.info()["static_seq_len"] == 384
    assert "seq_trim=0" in backend.info()["seq_len_mode"]
    assert not (own_cache / "models" / "dynamic-seq").exists()


def _bogus_names(graph) -> None:
    graph.input[1].name = "tokens_mask"
    for node in graph.node:
        node.input[:] = ["tokens_mask" if n == "input_mask" else n for n in node.input]


def _bogus_dtype(graph) -> None:
    _retype_inputs(graph, onnx.TensorProto.FLOAT)


@pytest.mark.parametrize("edit,match", [(_bogus_names, r"expected inputs.*tokens_mask:int64\[\?,\?\]"),
                                        (_bogus_dtype, r"int32 or all int64.*input_ids:float32")])
@pytest.mark.parametrize("name", [pytest.param("onnxruntime", marks=needs["onnxruntime"]),
                                  pytest.param("openvino", marks=needs["openvino"])])
def test_unexpected_graph_inputs_are_a_user_error_listing_them(tiny, tmp_path, edit, match, name):
    path = tmp_path / "bogus.onnx"
    model = onnx.load(str(tiny["onnx"]))
    edit(model.graph)
    onnx.save(model, str(path))
    with pytest.raises(UserError, match=match):
        loaded(name, path)


# --------------------------------------------------------------------- ORT providers and options

@needs["onnxruntime"]
def test_missing_provider_is_a_user_error_not_a_cpu_fallback(tiny):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(UserError, match=r"no CUDAExecutionProvider \(available: .*CPUExecutionProvider"):
        loaded("onnxruntime", tiny["onnx"], device="cuda")
    with pytest.raises(UserError, match="TensorrtExecutionProvider"):
        loaded("onnxruntime", tiny["onnx"], options=(("ort_provider", "TensorRT"),))
    with pytest.raises(UserError, match="ort_provider=Vulkan"):
        loaded("onnxruntime", tiny["onnx"], options=(("ort_provider", "Vulkan"),))


@needs["onnxruntime"]
def test_onnxruntime_reports_provider_and_threads(tiny):
    backend = loaded("onnxruntime", tiny["onnx"], threads=1, options=(("ort_provider", "CPU"),))
    info = backend.info()
    assert info["provider"] == "CPUExecutionProvider" and info["intra_op_threads"] == 1
    assert backend.batch_hint().token_budget


@needs["onnxruntime"]
def test_onnxruntime_fused_graph_gives_the_same_logits(tiny):
    inputs = batch()
    plain = loaded("onnxruntime", tiny["onnx"]).run(inputs)
    backend = loaded("onnxruntime", tiny["onnx"], options=(("ort_fuse", "1"),))
    assert backend.info()["fused_ops"].get("Attention") == 2          # one per layer
    for a, b in zip(plain, backend.run(inputs)):
        assert np.abs(a - b)[real(inputs)].max() <= 1e-4


@needs["onnxruntime"]
def test_onnxruntime_precision_checks(tiny):
    with pytest.raises(UserError, match="TensorRT"):
        loaded("onnxruntime", tiny["onnx"], precision="fp16")
    with pytest.raises(UserError, match="bf16"):
        loaded("onnxruntime", tiny["onnx"], precision="bf16")


@pytest.mark.parametrize("name", [pytest.param("onnxruntime", marks=needs["onnxruntime"]),
                                  pytest.param("openvino", marks=needs["openvino"])])
def test_missing_model_is_a_user_error(tmp_path, name):
    with pytest.raises(UserError, match="--model"):
        loaded(name, tmp_path / "nope.onnx")
    with pytest.raises(UserError, match="needs --model"):
        create(BackendSpec(name=name)).load()
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(UserError, match="junk.onnx"):
        loaded(name, tmp_path / "junk.onnx")


# ------------------------------------------------------------------------------------- torch

@needs["torch"]
@needs["transformers"]
def test_torch_bf16_runs_on_cpu(tiny):
    inputs = batch()
    fp32 = loaded("torch", tiny["torch"]).run(inputs)
    bf16 = loaded("torch", tiny["torch"], precision="bf16").run(inputs)
    assert bf16[0].dtype == np.float32
    m = real(inputs)
    assert np.corrcoef(fp32[0][m], bf16[0][m])[0, 1] > 0.99


@needs["torch"]
@needs["transformers"]
def test_torch_fp16_on_cpu_suggests_bf16(tiny):
    with pytest.raises(UserError, match="fp16.*bf16"):
        loaded("torch", tiny["torch"], precision="fp16")


@needs["torch"]
@needs["transformers"]
def test_torch_cuda_without_gpu_is_a_user_error(tiny):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(UserError, match="--device cuda"):
        loaded("torch", tiny["torch"], device="cuda")


@needs["torch"]
@needs["transformers"]
def test_torch_checkpoint_file_and_key_reporting(tiny, tmp_path, caplog):
    import shutil

    import torch

    src = tiny["torch"]
    inputs = batch()
    ref = loaded("torch", src).run(inputs)
    # the model.pytorch file itself (config beside it), extra keys reported but harmless
    state = torch.load(src / "model.pytorch", weights_only=True)
    state["bert.pooler.dense.weight"] = torch.zeros(64, 64)
    (tmp_path / "extra").mkdir()
    torch.save(state, tmp_path / "extra" / "model.pytorch")
    shutil.copy(src / "bert_config.json", tmp_path / "extra")
    with caplog.at_level(logging.WARNING):
        got = loaded("torch", tmp_path / "extra" / "model.pytorch").run(inputs)
    assert "unexpected keys" in caplog.text and "bert.pooler.dense.weight" in caplog.text
    assert np.abs(got[0] - ref[0]).max() == 0
    # a checkpoint without the QA head is refused
    (tmp_path / "nohead").mkdir()
    torch.save({k: v for k, v in state.items() if not k.startswith("qa_outputs")}, tmp_path / "nohead" / "model.pytorch")
    shutil.copy(src / "bert_config.json", tmp_path / "nohead")
    with pytest.raises(UserError, match="lacks 2 weights.*qa_outputs"):
        loaded("torch", tmp_path / "nohead")
    # a checkpoint without its config
    (tmp_path / "noconfig").mkdir()
    shutil.copy(src / "model.pytorch", tmp_path / "noconfig")
    with pytest.raises(UserError, match="bert_config.json is missing"):
        loaded("torch", tmp_path / "noconfig")


@needs["torch"]
@needs["transformers"]
def test_torch_loads_a_hugging_face_directory(tiny, tmp_path):
    import torch
    import transformers

    cfg = transformers.BertConfig.from_json_file(str(tiny["torch"] / "bert_config.json"))
    net = transformers.BertForQuestionAnswering(cfg)
    net.load_state_dict(torch.load(tiny["torch"] / "model.pytorch", weights_only=True))
    net.save_pretrained(tmp_path / "hf")
    inputs = batch()
    backend = loaded("torch", tmp_path / "hf")
    assert backend.info()["model_format"] == "huggingface"
    for a, b in zip(loaded("torch", tiny["torch"]).run(inputs), backend.run(inputs)):
        assert np.abs(a - b)[real(inputs)].max() <= 1e-5


# ------------------------------------------------------------------------------ batch policy

def test_cpu_batch_hint_scales_with_threads():
    from distbert.backends.batching import cpu_batch_hint

    assert cpu_batch_hint(2) == BatchHint(max_batch=8, token_budget=1024)
    assert cpu_batch_hint(8) == BatchHint(max_batch=32, token_budget=4096)
    assert cpu_batch_hint(128) == BatchHint(max_batch=64, token_budget=16384)


@needs["onnxruntime"]
def test_calibrate_picks_a_token_budget_from_the_knee(tiny):
    from distbert.backends.batching import calibrate

    backend = loaded("onnxruntime", tiny["onnx"])
    hint = calibrate(backend, [60, 80, 100, 120, 140], max_batch=16, time_budget_s=3.0, min_time_s=0.05)
    assert 1 <= hint.max_batch <= 16
    assert hint.token_budget is not None and hint.token_budget % 100 == 0   # knee batch x median length
    assert calibrate(backend, []) == backend.batch_hint()
