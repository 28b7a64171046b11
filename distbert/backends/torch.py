"""PyTorch backend (``--backend torch``): transformers' ``BertForQuestionAnswering`` on CPU or CUDA.

Accepted ``--model``:

* an MLPerf-style checkpoint: a directory with ``model.pytorch`` (a state_dict in transformers
  naming) and ``bert_config.json``, or the ``model.pytorch`` file itself with the config beside it;
* a Hugging Face BERT QA directory (``config.json`` + weights), loaded offline.

Precision: fp32, bf16, fp16 (CUDA only). Attention runs through SDPA. Outputs are float32 numpy.
``spec.option("compile") == "1"`` wraps the model in ``torch.compile`` (dynamic shapes).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from distbert.backends.base import Backend, BackendSpec, BatchHint, ModelInputs
from distbert.backends.batching import cpu_batch_hint, usable_cores
from distbert.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "model.pytorch"
CHECKPOINT_CONFIG = "bert_config.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

GPU_HINT = BatchHint(max_batch=256, token_budget=65536)

# keys a checkpoint may lack without harm: buffers, not learned weights
_HARMLESS_MISSING = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")


def _import_transformers() -> Any:
    try:
        import transformers
    except ModuleNotFoundError as exc:
        raise UserError("--backend torch needs transformers: pip install 'distbert[torch]'") from exc
    return transformers


def resolve_device(device: str) -> torch.device:
    """``cpu``, ``cuda[:N]`` (or ``rocm[:N]`` on a ROCm build of torch, which calls it cuda)."""
    kind, _, idx = device.lower().partition(":")
    if kind == "cpu":
        return torch.device("cpu")
    if kind in ("cuda", "rocm"):
        if kind == "rocm" and not torch.version.hip:
            raise UserError(f"--device {device}: this torch {torch.__version__} is not a ROCm build")
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: torch {torch.__version__} sees no GPU "
                            "(CPU-only build or no driver): use --device cpu or install a CUDA build of torch")
        index = int(idx) if idx.isdigit() else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
        return torch.device("cuda", index)
    raise UserError(f"--device {device}: the torch backend takes cpu or cuda[:N]")


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"--model {path}: not a loadable PyTorch state_dict ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"--model {path}: expected a state_dict, found {type(state).__name__}")
    # checkpoints saved from DataParallel wrappers prefix every key with "module."
    return {k.removeprefix("module."): v for k, v in state.items()}


def check_keys(missing: list[str], unexpected: list[str], path: Path) -> None:
    """Log what ``load_state_dict(strict=False)`` skipped; fail if real weights are missing."""
    missing = [k for k in missing if k not in _HARMLESS_MISSING]
    if unexpected:
        log.warning("%s: %d unexpected keys ignored (e.g. %s)", path, len(unexpected), ", ".join(unexpected[:3]))
    if missing:
        vital = [k for k in missing if k.startswith(("qa_outputs.", "bert.embeddings.", "bert.encoder."))]
        if vital:
            raise UserError(f"--model {path}: the checkpoint lacks {len(vital)} weights the model needs "
                            f"(e.g. {', '.join(vital[:3])}): is it a BERT question-answering checkpoint?")
        log.warning("%s: %d missing keys left at their initial values (e.g. %s)", path, len(missing),
                    ", ".join(missing[:3]))


def load_model(model: str | None, dtype: torch.dtype) -> tuple[torch.nn.Module, str]:
    """The QA model on CPU in ``dtype``, in eval mode, and a word saying which format it came from."""
    transformers = _import_transformers()
    if not model:
        raise UserError("--backend torch needs --model PATH: an MLPerf checkpoint directory "
                        "(model.pytorch + bert_config.json) or a Hugging Face BERT QA directory")
    path = Path(model).expanduser()
    if path.is_file():
        ckpt, config = path, path.parent / CHECKPOINT_CONFIG
    else:
        ckpt, config = path / CHECKPOINT_FILE, path / CHECKPOINT_CONFIG
    if ckpt.is_file():
        if not config.is_file():
            raise UserError(f"--model {path}: {CHECKPOINT_CONFIG} is missing beside {ckpt.name} "
                            "(copy language/bert/bert_config.json from mlcommons/inference there)")
        cfg = transformers.BertConfig.from_json_file(str(config))
        cfg._attn_implementation = "sdpa"
        net = transformers.BertForQuestionAnswering(cfg)
        result = net.load_state_dict(_load_state_dict(ckpt), strict=False)
        check_keys(list(result.missing_keys), list(result.unexpected_keys), ckpt)
        return net.to(dtype).eval(), "mlperf-checkpoint"
    if path.is_dir() and (path / "config.json").is_file():
        try:
            # no dtype argument: transformers 4.x calls it torch_dtype, 5.x dtype; .to() works in both
            net = transformers.BertForQuestionAnswering.from_pretrained(
                str(path), local_files_only=True, attn_implementation="sdpa")
        except (OSError, ValueError) as exc:
            raise UserError(f"--model {path}: not a loadable Hugging Face BERT QA directory "
                            f"({str(exc).splitlines()[0][:200]})") from exc
        return net.to(dtype).eval(), "huggingface"
    raise UserError(f"--model {path}: expected {CHECKPOINT_FILE} + {CHECKPOINT_CONFIG} "
                    "(MLPerf checkpoint) or config.json + weights (Hugging Face directory)")


class TorchBackend(Backend):
    """``BertForQuestionAnswering`` under ``torch.inference_mode``; ``run`` from one thread."""

    name = "torch"

    def __init__(self, spec: BackendSpec) -> None:
        super().__init__(spec)
        self._model: torch.nn.Module | None = None
        self._device = torch.device("cpu")
        self._dtype = torch.float32
        self._source = ""
        self._device_name = "cpu"
        self._pinned: torch.Tensor | None = None

    def load(self) -> None:
        precision = self.spec.precision
        if precision not in DTYPES:
            raise UserError(f"--precision {precision}: the torch backend runs fp32, bf16 or fp16 "
                            "(for int8 use --backend onnxruntime with the int8 model)")
        device = resolve_device(self.spec.device)
        if precision == "fp16" and device.type == "cpu":
            raise UserError("--precision fp16 is not supported on CPU by the torch backend: "
                            "use --precision bf16 (or fp32)")
        if self.spec.threads or device.type == "cpu":
            # per process: a worker owns its core set (torch's default counts the whole machine)
            torch.set_num_threads(self.spec.threads or usable_cores())
        self._dtype = DTYPES[precision]
        model, self._source = load_model(self.spec.model, self._dtype)
        model = model.to(device)
        if device.type == "cuda":
            # a model left on the CPU would still "work", just 100x slower: refuse it
            off = [n for n, p in model.named_parameters() if p.device.type != "cuda"]
            if off:
                raise RuntimeError(f"parameters not on the GPU after .to({device}): {off[:3]}")
            self._device_name = torch.cuda.get_device_name(device)
        if self.spec.option("compile") == "1":
            # typed as returning a callable; for a Module it is an OptimizedModule, itself a Module
            model = cast(torch.nn.Module, torch.compile(model, dynamic=True))
        self._model, self._device = model, device
        log.info("torch %s: %s model %s on %s (%s), %s, %d threads", torch.__version__, self._source,
                 self.spec.model, device, self._device_name, precision, torch.get_num_threads())

    def _to_device(self, inputs: ModelInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        arrays = (inputs.input_ids, inputs.input_mask, inputs.segment_ids)
        if self._device.type != "cuda":
            # three arrays in, three tensors out (mypy sees tuple[Tensor, ...])
            return tuple(torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)) for a in arrays)  # type: ignore[return-value]
        # One reusable pinned staging buffer and one asynchronous host-to-device copy per batch.
        # Reusing it is safe: run() waits for the outputs (.cpu()), so the previous copy has finished.
        batch, length = inputs.shape
        need = 3 * batch * length
        if self._pinned is None or self._pinned.numel() < need:
            self._pinned = torch.empty(max(need, 3 * 64 * 384), dtype=torch.int64).pin_memory()
        staged = self._pinned[:need].view(3, batch, length)
        for i, a in enumerate(arrays):
            staged[i].copy_(torch.from_numpy(a))
        on_gpu = staged.to(self._device, non_blocking=True)
        return on_gpu[0], on_gpu[1], on_gpu[2]

    def run(self, inputs: ModelInputs) -> tuple[np.ndarray, np.ndarray]:
        if self._model is None:
            raise RuntimeError("TorchBackend.run() before load()")
        with torch.inference_mode():
            ids, mask, segments = self._to_device(inputs)
            out = self._model(input_ids=ids, attention_mask=mask, token_type_ids=segments)
            # one stacked copy back instead of two
            logits = torch.stack((out.start_logits, out.end_logits)).float().cpu().numpy()
        return logits[0], logits[1]

    def warmup(self) -> None:
        super().warmup()
        if self._device.type == "cuda" or self.spec.option("compile") == "1":
            # cuBLAS heuristics / compiled graphs are per shape: touch the common ones
            for batch, length in ((8, 128), (32, 256), (8, 384)):
                ids = np.full((batch, length), 1000, np.int64)
                self.run(ModelInputs(np.arange(batch), ids, np.ones_like(ids), np.zeros_like(ids),
                                     np.full(batch, length, np.int32)))

    def batch_hint(self) -> BatchHint:
        if self._device.type == "cuda":
            return GPU_HINT
        return cpu_batch_hint(torch.get_num_threads())

    def info(self) -> dict[str, Any]:
        out = super().info()
        out.update({"runtime": f"torch {torch.__version__}", "device_name": self._device_name,
                    "model_format": self._source, "attention": "sdpa",
                    "compiled": self.spec.option("compile") == "1", "threads": torch.get_num_threads()})
        return out

    def close(self) -> None:
        if self._model is not None:
            self._model = None
            self._pinned = None
            if self._device.type == "cuda":
                torch.cuda.empty_cache()
