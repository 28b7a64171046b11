"""Deterministic random-weight BERT question-answering models with the exact MLPerf I/O.

A random model lets every backend, benchmark and GPU check run without downloading the 1.3 GB
official weights. Its answers are meaningless: each generated model directory holds a
``distbert-model.json`` saying ``{"random_weights": true, ...}`` so anything reporting accuracy can
say so.

Contracts:

* The weights depend only on ``(shape, seed)``: :func:`random_weights` draws them in a fixed order
  from ``numpy.random.default_rng(seed)``, BERT-style (normal, std 0.02; LayerNorm 1/0; biases 0).
  Every format is written from the same arrays, so ONNX Runtime, OpenVINO and PyTorch outputs can
  be compared for one seed.
* ``onnx`` (fp32): inputs ``input_ids``, ``input_mask``, ``segment_ids`` (int64 ``[batch, seq]``, both
  dims dynamic); outputs ``output_start_logits``, ``output_end_logits`` (float32 ``[batch, seq]``).
  Built with onnx's helper API from numpy; torch is never imported.
* ``onnx-int8``: the fp32 graph with inputs ``input_ids``, ``attention_mask``, ``token_type_ids``
  (the MLPerf int8 names) and dynamically quantized MatMuls (needs ``onnxruntime`` to quantize).
* ``torch``: a directory with ``model.pytorch`` (a ``BertForQuestionAnswering`` state_dict, MLPerf
  checkpoint naming) and ``bert_config.json``.

Writes are atomic: files are built in a temporary sibling directory, then renamed into place, with
``distbert-model.json`` last (its presence means the directory is complete).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from distbert import envs
from distbert.errors import UserError

log = logging.getLogger(__name__)

FORMATS = ("onnx", "onnx-int8", "torch")
MARKER = "distbert-model.json"
ONNX_FILE = "model.onnx"
TORCH_FILE = "model.pytorch"
TORCH_CONFIG = "bert_config.json"
OPSET = 17          # LayerNormalization is a standard op from opset 17
LN_EPS = 1e-12      # BERT's LayerNorm epsilon
MASK_VALUE = -10000.0  # BERT's additive attention mask for padded keys

FP32_INPUTS = ("input_ids", "input_mask", "segment_ids")
INT8_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUTS = ("output_start_logits", "output_end_logits")


@dataclasses.dataclass(frozen=True)
class BertShape:
    """The size of a BERT encoder (names follow ``bert_config.json``)."""

    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    type_vocab_size: int = 2

    def bert_config(self) -> dict[str, Any]:
        """The MLPerf ``bert_config.json`` for this shape (readable by ``BertConfig.from_json_file``)."""
        return {
            "attention_probs_dropout_prob": 0.1,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1,
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "type_vocab_size": self.type_vocab_size,
            "vocab_size": self.vocab_size,
        }


SHAPES: dict[str, BertShape] = {
    "large": BertShape(24, 1024, 16, 4096),   # MLPerf BERT-Large (language/bert/bert_config.json)
    "base": BertShape(12, 768, 12, 3072),
    "tiny": BertShape(2, 64, 2, 128),         # full vocab so real token ids stay valid
}


def get_shape(name: str) -> BertShape:
    if name not in SHAPES:
        raise UserError(f"unknown model shape {name!r}: use --shape {'|'.join(SHAPES)}")
    return SHAPES[name]


# --------------------------------------------------------------------------------------- weights

def weight_specs(shape: BertShape) -> list[tuple[str, tuple[int, ...], str]]:
    """``(name, torch shape, init)`` for every parameter, in the fixed draw order.

    Names and shapes are those of ``transformers.BertForQuestionAnswering.state_dict()`` (linear
    weights are ``[out, in]``). ``init`` is ``normal``, ``ones`` or ``zeros``.
    """
    h, i = shape.hidden_size, shape.intermediate_size
    specs: list[tuple[str, tuple[int, ...], str]] = [
        ("bert.embeddings.word_embeddings.weight", (shape.vocab_size, h), "normal"),
        ("bert.embeddings.position_embeddings.weight", (shape.max_position_embeddings, h), "normal"),
        ("bert.embeddings.token_type_embeddings.weight", (shape.type_vocab_size, h), "normal"),
        ("bert.embeddings.LayerNorm.weight", (h,), "ones"),
        ("bert.embeddings.LayerNorm.bias", (h,), "zeros"),
    ]
    for n in range(shape.num_hidden_layers):
        p = f"bert.encoder.layer.{n}."
        for proj in ("query", "key", "value"):
            specs += [(f"{p}attention.self.{proj}.weight", (h, h), "normal"),
                      (f"{p}attention.self.{proj}.bias", (h,), "zeros")]
        specs += [
            (f"{p}attention.output.dense.weight", (h, h), "normal"),
            (f"{p}attention.output.dense.bias", (h,), "zeros"),
            (f"{p}attention.output.LayerNorm.weight", (h,), "ones"),
            (f"{p}attention.output.LayerNorm.bias", (h,), "zeros"),
            (f"{p}intermediate.dense.weight", (i, h), "normal"),
            (f"{p}intermediate.dense.bias", (i,), "zeros"),
            (f"{p}output.dense.weight", (h, i), "normal"),
            (f"{p}output.dense.bias", (h,), "zeros"),
            (f"{p}output.LayerNorm.weight", (h,), "ones"),
            (f"{p}output.LayerNorm.bias", (h,), "zeros"),
        ]
    specs += [("qa_outputs.weight", (2, h), "normal"), ("qa_outputs.bias", (2,), "zeros")]
    return specs


def random_weights(shape: BertShape, seed: int) -> dict[str, np.ndarray]:
    """Every parameter as float32 numpy, deterministic for ``(shape, seed)`` (state_dict naming)."""
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}
    for name, dims, init in weight_specs(shape):
        if init == "normal":
            arr = rng.standard_normal(dims, dtype=np.float32)
            arr *= np.float32(0.02)
        elif init == "ones":
            arr = np.ones(dims, np.float32)
        else:
            arr = np.zeros(dims, np.float32)
        weights[name] = arr
    return weights


# ------------------------------------------------------------------------------------ onnx graph

class _Graph:
    """A tiny builder over ``onnx.helper``: unique node names, initializers from numpy."""

    def __init__(self) -> None:
        from onnx import helper, numpy_helper
        self._helper = helper
        self._np = numpy_helper
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._count = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(self._np.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs: Any) -> str:
        self._count += 1
        out = out or f"{op_type.lower()}_{self._count}"
        self.nodes.append(self._helper.make_node(op_type, inputs, [out], name=f"{op_type}_{self._count}",
                                                 **attrs))
        return out

    def linear(self, x: str, weights: dict[str, np.ndarray], prefix: str) -> str:
        # torch stores Linear weights [out, in]; ONNX MatMul wants [in, out]
        w = self.const(prefix + ".weight_t", weights.pop(prefix + ".weight").T)
        b = self.const(prefix + ".bias", weights.pop(prefix + ".bias"))
        return self.op("Add", [self.op("MatMul", [x, w]), b])

    def layer_norm(self, x: str, weights: dict[str, np.ndarray], prefix: str) -> str:
        g = self.const(prefix + ".weight", weights.pop(prefix + ".weight"))
        b = self.const(prefix + ".bias", weights.pop(prefix + ".bias"))
        return self.op("LayerNormalization", [x, g, b], axis=-1, epsilon=LN_EPS)


def build_onnx(weights: dict[str, np.ndarray], shape: BertShape,
               input_names: tuple[str, str, str] = FP32_INPUTS) -> Any:
    """The BERT QA graph as an ``onnx.ModelProto`` (consumes ``weights``: arrays are popped).

    ``input_names`` is ``(ids, mask, segments)``. Attention is written out with standard ops
    (MatMul, Reshape/Transpose for heads, Softmax; GELU via Erf) so every runtime reads it.
    """
    import onnx
    from onnx import TensorProto, helper

    g = _Graph()
    ids, mask, seg = input_names
    h, nh = shape.hidden_size, shape.num_attention_heads
    dh = h // nh

    # embeddings: word + position(0..L-1) + token type, then LayerNorm
    word = g.op("Gather", [g.const("bert.embeddings.word_embeddings.weight",
                                   weights.pop("bert.embeddings.word_embeddings.weight")), ids], axis=0)
    # positions 0..L-1: the first L rows of the table. (A Shape->Gather->Range index makes ORT's
    # EmbedLayerNorm fusion emit a Slice with scalar starts that fails at run time, ORT 1.32.)
    seq_len = g.op("Shape", [ids], start=1, end=2)                     # 1-D [L]
    pos = g.op("Slice", [g.const("bert.embeddings.position_embeddings.weight",
                                 weights.pop("bert.embeddings.position_embeddings.weight")),
                         g.const("const_zero_1d", np.array([0], np.int64)), seq_len,
                         g.const("const_zero_1d_axes", np.array([0], np.int64))])
    typ = g.op("Gather", [g.const("bert.embeddings.token_type_embeddings.weight",
                                  weights.pop("bert.embeddings.token_type_embeddings.weight")), seg], axis=0)
    x = g.layer_norm(g.op("Add", [g.op("Add", [word, pos]), typ]), weights, "bert.embeddings.LayerNorm")

    # extended attention mask [B, 1, 1, L]: 0 for real keys, -10000 for padding. Written as the
    # MLPerf model's PyTorch export has it (Unsqueeze, Unsqueeze, Cast, Sub, Mul; scores Div by
    # sqrt(d)), which is the pattern ONNX Runtime's attention fusion recognizes.
    maskf = g.op("Unsqueeze", [mask, g.const("axes_1", np.array([1], np.int64))])
    maskf = g.op("Unsqueeze", [maskf, g.const("axes_2", np.array([2], np.int64))])
    maskf = g.op("Cast", [maskf], to=TensorProto.FLOAT)
    inv = g.op("Sub", [g.const("const_one_f", np.array(1.0, np.float32)), maskf])
    ext_mask = g.op("Mul", [inv, g.const("mask_value", np.array(MASK_VALUE, np.float32))])

    heads_shape = g.const("heads_shape", np.array([0, 0, nh, dh], np.int64))   # 0 = copy B, L
    merged_shape = g.const("merged_shape", np.array([0, 0, h], np.int64))
    sqrt_dh = g.const("sqrt_head_size", np.array(math.sqrt(dh), np.float32))
    sqrt2 = g.const("sqrt2", np.array(math.sqrt(2.0), np.float32))
    half = g.const("half", np.array(0.5, np.float32))

    for n in range(shape.num_hidden_layers):
        p = f"bert.encoder.layer.{n}."
        q = g.op("Transpose", [g.op("Reshape", [g.linear(x, weights, p + "attention.self.query"), heads_shape])],
                 perm=[0, 2, 1, 3])                                     # [B, nh, L, dh]
        k = g.op("Transpose", [g.op("Reshape", [g.linear(x, weights, p + "attention.self.key"), heads_shape])],
                 perm=[0, 2, 3, 1])                                     # [B, nh, dh, L]
        v = g.op("Transpose", [g.op("Reshape", [g.linear(x, weights, p + "attention.self.value"), heads_shape])],
                 perm=[0, 2, 1, 3])
        scores = g.op("Add", [g.op("Div", [g.op("MatMul", [q, k]), sqrt_dh]), ext_mask])
        probs = g.op("Softmax", [scores], axis=-1)
        ctx = g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, merged_shape])
        attn = g.linear(ctx, weights, p + "attention.output.dense")
        x = g.layer_norm(g.op("Add", [attn, x]), weights, p + "attention.output.LayerNorm")

        inter = g.linear(x, weights, p + "intermediate.dense")
        # exact GELU: 0.5 * x * (1 + erf(x / sqrt(2)))
        gelu = g.op("Mul", [g.op("Mul", [inter, half]),
                            g.op("Add", [g.op("Erf", [g.op("Div", [inter, sqrt2])]), "const_one_f"])])
        out = g.linear(gelu, weights, p + "output.dense")
        x = g.layer_norm(g.op("Add", [out, x]), weights, p + "output.LayerNorm")

    logits = g.linear(x, weights, "qa_outputs")                          # [B, L, 2]
    g.nodes.append(helper.make_node("Split", [logits, g.const("split_1_1", np.array([1, 1], np.int64))],
                                    ["start_3d", "end_3d"], name="Split_qa", axis=2))
    g.op("Squeeze", ["start_3d", "axes_2"], out=OUTPUTS[0])
    g.op("Squeeze", ["end_3d", "axes_2"], out=OUTPUTS[1])
    if weights:
        raise AssertionError(f"unused weights: {sorted(weights)[:3]}")

    dims = ["batch", "seq"]
    graph = helper.make_graph(
        g.nodes, "bert_qa",
        [helper.make_tensor_value_info(name, TensorProto.INT64, dims) for name in input_names],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, dims) for name in OUTPUTS],
        initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="distbert.backends.modelmaker")
    # keep the IR version readable by older runtimes (onnx 1.23 defaults to a newer one)
    model.ir_version = 8
    if _weight_bytes(model) < 2**28:   # the checker copies the model: only worth it for small ones
        onnx.checker.check_model(model)
    return model


def _weight_bytes(model: Any) -> int:
    # ModelProto.ByteSize() serializes the whole model (seconds for BERT-Large): count raw data instead
    return sum(len(t.raw_data) for t in model.graph.initializer)


def _save_onnx(model: Any, path: Path) -> None:
    import onnx
    # Protobuf cannot serialize more than 2 GiB: spill the weights beside the graph only then
    # (fp32 BERT-Large is ~1.34 GB, so the MLPerf-style single file is the common case).
    if _weight_bytes(model) >= 2**31 - 2**24:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data")
    else:
        onnx.save_model(model, str(path))


def _quantize_int8(fp32_path: Path, out_path: Path) -> None:
    """Dynamic int8 quantization of every MatMul with a constant weight (runs on ORT CPU)."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ModuleNotFoundError as exc:
        raise UserError("--format onnx-int8 quantizes with onnxruntime, which is missing: "
                        "pip install 'distbert[cpu]'") from exc
    # the quantizer logs hundreds of lines through the root logger: keep them out of our logs
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(fp32_path), str(out_path), op_types_to_quantize=["MatMul"],
                         weight_type=QuantType.QInt8, per_channel=False,
                         use_external_data_format=fp32_path.with_name(fp32_path.name + ".data").exists())
    finally:
        root.setLevel(level)


# --------------------------------------------------------------------------------------- writers

def _write_torch(weights: dict[str, np.ndarray], shape: BertShape, out: Path) -> None:
    try:
        import torch
    except ModuleNotFoundError as exc:
        raise UserError("--format torch needs PyTorch: pip install 'distbert[torch]' "
                        "(or use --format onnx)") from exc
    state = {name: torch.from_numpy(arr) for name, arr in weights.items()}
    torch.save(state, out / TORCH_FILE)
    (out / TORCH_CONFIG).write_text(json.dumps(shape.bert_config(), indent=2) + "\n")


def _marker(shape_name: str, fmt: str, seed: int) -> dict[str, Any]:
    return {"random_weights": True, "shape": shape_name, "format": fmt, "seed": seed,
            "note": "random weights: accuracy results from this model are meaningless"}


def read_marker(path: str | Path) -> dict[str, Any] | None:
    """The ``distbert-model.json`` beside a model file or inside a model directory, if any."""
    p = Path(path)
    for candidate in (p / MARKER, p.parent / MARKER):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except (OSError, ValueError):
                return None
    return None


def is_random_model(path: str | Path) -> bool:
    """True when ``path`` was generated by this module (its accuracy means nothing)."""
    marker = read_marker(path)
    return bool(marker and marker.get("random_weights"))


def _model_entry(out_dir: Path, fmt: str) -> Path:
    """The path to pass as ``--model``: the ONNX file, or the directory of a torch checkpoint."""
    return out_dir if fmt == "torch" else out_dir / ONNX_FILE


def make_model(shape: str, fmt: str, seed: int, out_dir: str | Path) -> Path:
    """Write a random-weight model to ``out_dir`` and return the path to pass as ``--model``.

    ``shape`` is ``large|base|tiny``, ``fmt`` one of :data:`FORMATS`. Existing files of the same
    names in ``out_dir`` are replaced atomically; other files there are left alone.
    """
    bert = get_shape(shape)
    if fmt not in FORMATS:
        raise UserError(f"unknown model format {fmt!r}: use --format {'|'.join(FORMATS)}")
    out = Path(out_dir).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a directory for the model")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)     # mkdtemp makes it 0700; a shared cache must stay readable by others
    try:
        log.info("generating random-weight BERT %s (%s, seed %d) in %s", shape, fmt, seed, out)
        weights = random_weights(bert, seed)
        if fmt == "torch":
            _write_torch(weights, bert, tmp)
        elif fmt == "onnx":
            _save_onnx(build_onnx(weights, bert, FP32_INPUTS), tmp / ONNX_FILE)
        else:
            fp32 = tmp / "fp32" / ONNX_FILE
            fp32.parent.mkdir()
            _save_onnx(build_onnx(weights, bert, INT8_INPUTS), fp32)
            _quantize_int8(fp32, tmp / ONNX_FILE)
            shutil.rmtree(fp32.parent)
        del weights
        (tmp / MARKER).write_text(json.dumps(_marker(shape, fmt, seed), indent=2) + "\n")
        _move_into(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _model_entry(out, fmt)


def _move_into(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out`` (or its files into an existing ``out``), the marker last."""
    if not out.exists():
        try:
            os.rename(tmp, out)
            return
        except OSError:
            out.mkdir(parents=True, exist_ok=True)   # lost a race with another writer: merge below
    (out / MARKER).unlink(missing_ok=True)           # incomplete until the new marker lands
    files = sorted(p for p in tmp.iterdir() if p.name != MARKER)
    for p in files + [tmp / MARKER]:
        os.replace(p, out / p.name)


def random_model_dir(shape: str, fmt: str, seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """Where :func:`ensure_random_model` keeps a generated model."""
    root = Path(cache_dir).expanduser() if cache_dir else envs.cache_dir()
    return root / "models" / "random" / f"{shape}-{fmt}-{seed}"


def random_model_path(shape: str, fmt: str, seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """The ``--model`` path :func:`ensure_random_model` returns, without generating anything."""
    return _model_entry(random_model_dir(shape, fmt, seed, cache_dir), fmt)


def ensure_random_model(shape: str, fmt: str, seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """The cached random model for ``(shape, fmt, seed)``, generated on first use.

    Cached under ``<cache>/models/random/<shape>-<fmt>-<seed>/`` (``cache`` defaults to
    ``DISTBERT_CACHE``). Returns the path to pass as ``--model``.
    """
    out = random_model_dir(shape, fmt, seed, cache_dir)
    marker = read_marker(out)
    expected = _marker(shape, fmt, seed)
    if marker and all(marker.get(k) == expected[k] for k in ("shape", "format", "seed")) \
            and _model_entry(out, fmt).exists():
        return _model_entry(out, fmt)
    return make_model(shape, fmt, seed, out)
