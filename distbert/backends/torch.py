"""PyTorch backend (``--backend torch``): transformers' ``BertForQuestionAnswering`` on CPU or CUDA.

Accepted ``--model``:

* an MLPerf-style checkpoint: a directory with ``model.pytorch`` (a state_dict in transformers
  naming) and ``bert_config.json``, or the ``model.pytorch`` file itself with the config beside it;
* a Hugging Face BERT QA directory (``config.json`` + weights), loaded offline.

Precision: fp32, bf16, fp16 (CUDA only). Attention runs through SDPA. Outputs are float32 numpy.
``spec.option("compile") == "1"`` wraps the model in ``torch.compile`` (dynamic shapes).

On CUDA, a batch goes in two stages (:meth:`TorchBackend.prepare`, :meth:`TorchBackend.run_prepared`):
its rows are written into one of two pinned host buffers and copied to the device on a copy stream,
then the compute stream waits for that copy's event and runs the model. The worker runs the two
stages on two threads, so the next batch's copy overlaps this batch's compute; ``run`` runs them
back to back.

``spec.option("graphs") == "1"`` (CUDA only) runs every batch through CUDA graphs captured per
(batch, length) bucket (:mod:`distbert.backends.graphs` chooses the buckets): one launch per batch
instead of hundreds of kernel launches. Buckets are captured on first use, batch 1 at every length
during warmup; ``graphs_cache=N`` caps how many stay captured (least recently used evicted).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from distbert.backends.base import Backend, BackendSpec, BatchHint, ModelInputs
from distbert.backends.batching import cpu_batch_hint, usable_cores
from distbert.backends.graphs import (
    DEFAULT_CAPACITY,
    LENGTH_STEP,
    MAX_LENGTH,
    Bucket,
    Chunk,
    GraphCache,
    batch_ladder,
    pad_into,
    plan,
    unpad,
)
from distbert.backends.staging import StagingRing
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


# --- CUDA staging: pinned buffers and a copy stream ------------------------------------------

#: pinned host buffers: the next batch is written into one while the copy from the other runs
STAGING_SLOTS = 2


def _pinned(elements: int) -> torch.Tensor:
    return torch.empty(elements, dtype=torch.int64).pin_memory()


@dataclasses.dataclass
class Staged:
    """A batch :meth:`TorchBackend.prepare` sent to the device: ``run_prepared`` waits for ``copied``."""

    tensor: torch.Tensor            # int64 on the device: [3, B, L] (eager), or the graph chunks packed
    copied: torch.cuda.Event        # recorded on the copy stream right after the copy
    rows: int
    length: int
    chunks: list[Chunk] | None      # the graph buckets (graphs=1), None for eager


# --- CUDA graphs (option graphs=1) ------------------------------------------------------------

#: (input ids, mask, segments), each int64 ``[b, l]`` on the device -> logits ``[2, b, l]`` float32
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

CAPTURE_WARMUP_PASSES = 3   # eager passes on a side stream before capture (cuBLAS/SDPA pick their kernels)


def qa_forward(model: torch.nn.Module) -> Forward:
    """The model as one function returning start and end logits stacked, float32."""

    def forward(ids: torch.Tensor, mask: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=segments)
        return torch.stack((out.start_logits, out.end_logits)).float()

    return forward


@dataclasses.dataclass
class StaticGraph:
    """One bucket's captured forward pass: write ``inputs``, call ``replay``, read ``outputs``."""

    bucket: Bucket
    inputs: torch.Tensor              # int64 [3, b, l]: ids, mask, segments (the graph reads these addresses)
    outputs: torch.Tensor             # float32 [2, b, l]: start, end logits (the graph writes these)
    replay: Callable[[], None]
    release: Callable[[], None] = lambda: None


def capture_cuda(forward: Forward, bucket: Bucket, device: torch.device, pool: Any,
                 stream: torch.cuda.Stream) -> StaticGraph:
    """Capture ``forward`` at ``bucket``'s shape as a CUDA graph, as PyTorch's CUDA-graph notes do it:
    static inputs, eager warmup passes on a side stream, then capture. Call under inference_mode,
    with ``device`` the current device (``torch.cuda.set_device``).

    ``pool`` (``torch.cuda.graph_pool_handle()``) and the capture ``stream`` are shared by every
    bucket, so that their activations reuse one memory pool (PyTorch asks for the same stream with a
    shared pool). Sharing is safe here because graphs replay one at a time on one stream and each
    replay's outputs are copied to the host before the next replay.
    """
    inputs = torch.zeros((3, bucket.batch, bucket.length), dtype=torch.int64, device=device)
    # one pad column in the mask: a library that skips an all-ones mask must still capture the masked path
    inputs[1, :, :-1] = 1
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(CAPTURE_WARMUP_PASSES):
                forward(inputs[0], inputs[1], inputs[2])
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            outputs = forward(inputs[0], inputs[1], inputs[2])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise RuntimeError(
            f"graphs=1: capturing the [{bucket.batch}, {bucket.length}] bucket as a CUDA graph failed ({first}); "
            f"the model may read a tensor on the host during capture (transformers "
            f"{_import_transformers().__version__}; 4.x checks the attention mask that way): "
            "use transformers>=5 or drop --option graphs=1") from exc
    return StaticGraph(bucket, inputs, outputs, graph.replay, graph.reset)


class GraphedModel:
    """Runs batches through per-bucket static graphs: plan the chunks, pad each into its bucket's
    static inputs, replay, slice the outputs back. ``capture`` builds a bucket's graph (CUDA:
    :func:`capture_cuda`; tests inject an eager stand-in, since CUDA cannot run on CPU)."""

    def __init__(self, capture: Callable[[Bucket], StaticGraph], device: torch.device, max_batch: int,
                 capacity: int = DEFAULT_CAPACITY) -> None:
        self.ladder = batch_ladder(max_batch)
        self.cache: GraphCache[StaticGraph] = GraphCache(self._timed(capture), capacity,
                                                         release=lambda g: g.release())
        self.capture_s = 0.0
        self._device = device

    def _timed(self, capture: Callable[[Bucket], StaticGraph]) -> Callable[[Bucket], StaticGraph]:
        def timed(bucket: Bucket) -> StaticGraph:
            t0 = time.perf_counter()
            graph = capture(bucket)
            took = time.perf_counter() - t0
            self.capture_s += took
            log.info("captured the [%d, %d] graph in %.0f ms (%d cached)", bucket.batch, bucket.length,
                     took * 1e3, len(self.cache) + 1)
            return graph

        return timed

    def plan(self, rows: int, length: int) -> list[Chunk]:
        return plan(rows, length, self.ladder)

    @staticmethod
    def packed_size(chunks: list[Chunk]) -> int:
        """Elements of a :meth:`pack` buffer: every chunk's ``[3, b, l]`` bucket, back to back."""
        return sum(3 * c.bucket.batch * c.bucket.length for c in chunks)

    @staticmethod
    def pack(out: np.ndarray, chunks: list[Chunk], input_ids: np.ndarray, input_mask: np.ndarray,
             segment_ids: np.ndarray) -> None:
        """Pad each chunk into its region of ``out`` (flat int64, :meth:`packed_size` long)."""
        offset = 0
        for chunk in chunks:
            b, n = chunk.bucket, 3 * chunk.bucket.batch * chunk.bucket.length
            pad_into(out[offset:offset + n].reshape(3, b.batch, b.length), chunk, input_ids, input_mask, segment_ids)
            offset += n

    def replay(self, packed: torch.Tensor, chunks: list[Chunk], rows: int, length: int) -> np.ndarray:
        """Logits ``[2, rows, length]`` float32: each chunk's region of ``packed`` (on the device, laid
        out by :meth:`pack`) into its bucket's static inputs, replay, outputs back to the host. Call
        under inference_mode, on the stream the graphs replay on. Reusing a graph's static tensors
        for the next chunk is safe: each replay's outputs are copied back (synchronously) first."""
        out = np.empty((2, rows, length), np.float32)
        offset = 0
        for chunk in chunks:
            graph = self.cache.get(chunk.bucket)
            n = 3 * chunk.bucket.batch * chunk.bucket.length
            graph.inputs.copy_(packed[offset:offset + n].view(3, chunk.bucket.batch, chunk.bucket.length))
            graph.replay()
            out[:, chunk.start:chunk.stop] = unpad(graph.outputs.cpu().numpy(), chunk.rows, length)
            offset += n
        return out

    def run(self, input_ids: np.ndarray, input_mask: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
        """Logits ``[2, B, L]`` float32 for a ``[B, L]`` batch, staged through plain host memory (the
        CPU stand-in tests; on CUDA the backend stages through pinned buffers and a copy stream)."""
        rows, length = input_ids.shape
        chunks = self.plan(rows, length)
        host = np.empty(self.packed_size(chunks), np.int64)
        self.pack(host, chunks, input_ids, input_mask, segment_ids)
        return self.replay(torch.from_numpy(host).to(self._device), chunks, rows, length)

    def info(self) -> dict[str, Any]:
        return {"batch_ladder": list(self.ladder), "length_step": LENGTH_STEP, "max_length": MAX_LENGTH,
                "capture_s": round(self.capture_s, 3), **self.cache.stats()}

    def close(self) -> None:
        self.cache.clear()


def _graph_options(spec: BackendSpec, device: torch.device) -> int | None:
    """The graph cache capacity when ``graphs=1``, None when graphs are off; UserError on misuse."""
    graphs = spec.option("graphs", "0")
    if graphs not in ("0", "1"):
        raise UserError(f"--option graphs={graphs}: write graphs=1 (CUDA graphs per bucket) or graphs=0")
    text = spec.option("graphs_cache", str(DEFAULT_CAPACITY)) or ""
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"--option graphs_cache={text}: write a whole number of graphs, at least 1")
    if graphs == "0":
        return None
    if device.type != "cuda":
        raise UserError(f"--option graphs=1 needs a GPU, but this worker runs on {device}: "
                        "use --device cuda, or drop graphs=1")
    if spec.option("compile") == "1":
        raise UserError("--option graphs=1 and compile=1 are not supported together: pick one")
    return int(text)


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
        self._graphed: GraphedModel | None = None
        self._copy: torch.cuda.Stream | None = None     # CUDA: the host-to-device copy stream
        self._ring: StagingRing[torch.Tensor, torch.cuda.Event] | None = None
        # held by prepare() around its CUDA calls and by a graph capture: a capture forbids other
        # threads' CUDA calls (a pinned allocation, an event wait) while it runs
        self._cuda_lock = threading.Lock()

    def load(self) -> None:
        precision = self.spec.precision
        if precision not in DTYPES:
            raise UserError(f"--precision {precision}: the torch backend runs fp32, bf16 or fp16 "
                            "(for int8 use --backend onnxruntime with the int8 model)")
        device = resolve_device(self.spec.device)
        if precision == "fp16" and device.type == "cpu":
            raise UserError("--precision fp16 is not supported on CPU by the torch backend: "
                            "use --precision bf16 (or fp32)")
        graph_capacity = _graph_options(self.spec, device)   # before the (slow) model load
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
            self._copy = torch.cuda.Stream(device)
            self._ring = StagingRing(STAGING_SLOTS, _pinned, torch.Tensor.numel, torch.cuda.Event.synchronize,
                                     min_size=3 * GPU_HINT.max_batch * MAX_LENGTH)
        if self.spec.option("compile") == "1":
            # typed as returning a callable; for a Module it is an OptimizedModule, itself a Module
            model = cast(torch.nn.Module, torch.compile(model, dynamic=True))
        self._model, self._device = model, device
        if graph_capacity is not None:
            # a capture records on the current device's streams: with cuda:1 left at the default
            # cuda:0, the model's kernels would run on a device the capture stream does not belong to
            torch.cuda.set_device(device)
            pool, stream, forward = torch.cuda.graph_pool_handle(), torch.cuda.Stream(device), qa_forward(model)

            def capture(bucket: Bucket) -> StaticGraph:
                with self._cuda_lock:
                    return capture_cuda(forward, bucket, device, pool, stream)

            self._graphed = GraphedModel(capture, device, GPU_HINT.max_batch, graph_capacity)
        log.info("torch %s: %s model %s on %s (%s), %s, %d threads", torch.__version__, self._source,
                 self.spec.model, device, self._device_name, precision, torch.get_num_threads())

    @property
    def overlap_prepare(self) -> bool:
        return self._copy is not None

    def prepare(self, inputs: ModelInputs) -> object:
        """CUDA: the batch into a pinned buffer, copied to the device on the copy stream; the copy's
        event recorded (a :class:`Staged`). CPU: ``inputs`` unchanged."""
        if self._copy is None or self._ring is None:
            return inputs
        rows, length = inputs.shape
        arrays = (inputs.input_ids, inputs.input_mask, inputs.segment_ids)
        chunks = self._graphed.plan(rows, length) if self._graphed is not None else None
        need = 3 * rows * length if chunks is None else GraphedModel.packed_size(chunks)
        with self._cuda_lock, torch.inference_mode():
            slot, pinned = self._ring.acquire(need)   # waits for this buffer's last copy, not the device
            host = pinned[:need]
            if chunks is None:
                for plane, a in zip(host.numpy().reshape(3, rows, length), arrays, strict=True):
                    plane[...] = a
            else:
                GraphedModel.pack(host.numpy(), chunks, *arrays)
            with torch.cuda.stream(self._copy):
                on_device = host.to(self._device, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(self._copy)
            self._ring.fence(slot, copied)
        return Staged(on_device, copied, rows, length, chunks)

    def run_prepared(self, prepared: object) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(prepared, Staged):   # CPU: prepare() passed the inputs through
            return super().run_prepared(prepared)
        if self._model is None:
            raise RuntimeError("TorchBackend.run_prepared() before load()")
        with torch.inference_mode():
            compute = torch.cuda.current_stream(self._device)
            compute.wait_event(prepared.copied)   # this batch's copy, on the device: the host does not wait
            # allocated on the copy stream, read on this one: without this the allocator could hand
            # its memory to a later copy while this stream still reads it
            prepared.tensor.record_stream(compute)
            if prepared.chunks is not None:
                if self._graphed is None:
                    raise RuntimeError("a batch staged for CUDA graphs reached a backend without graphs")
                logits = self._graphed.replay(prepared.tensor, prepared.chunks, prepared.rows, prepared.length)
                return logits[0], logits[1]
            planes = prepared.tensor.view(3, prepared.rows, prepared.length)
            out = self._model(input_ids=planes[0], attention_mask=planes[1], token_type_ids=planes[2])
            # one stacked copy back instead of two
            logits = torch.stack((out.start_logits, out.end_logits)).float().cpu().numpy()
        return logits[0], logits[1]

    def run(self, inputs: ModelInputs) -> tuple[np.ndarray, np.ndarray]:
        if self._model is None:
            raise RuntimeError("TorchBackend.run() before load()")
        if self._copy is not None:   # CUDA: the worker's two stages, back to back
            return self.run_prepared(self.prepare(inputs))
        with torch.inference_mode():
            ids, mask, segments = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
                                   for a in (inputs.input_ids, inputs.input_mask, inputs.segment_ids))
            out = self._model(input_ids=ids, attention_mask=mask, token_type_ids=segments)
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
        if self._graphed is not None:
            # SingleStream's whole working set: batch 1 at every length rung, captured before the clock starts
            for length in range(LENGTH_STEP, MAX_LENGTH + 1, LENGTH_STEP):
                ids = np.full((1, length), 1000, np.int64)
                self.run(ModelInputs(np.arange(1), ids, np.ones_like(ids), np.zeros_like(ids),
                                     np.full(1, length, np.int32)))
            log.info("CUDA graphs: %d captured in %.1f s during warmup", len(self._graphed.cache),
                     self._graphed.capture_s)

    def batch_hint(self) -> BatchHint:
        if self._device.type == "cuda":
            return GPU_HINT
        return cpu_batch_hint(torch.get_num_threads())

    def info(self) -> dict[str, Any]:
        out = super().info()
        out.update({"runtime": f"torch {torch.__version__}", "device_name": self._device_name,
                    "model_format": self._source, "attention": "sdpa",
                    "compiled": self.spec.option("compile") == "1", "threads": torch.get_num_threads(),
                    "copy_stream": self._copy is not None,
                    "cuda_graphs": self._graphed.info() if self._graphed is not None else None})
        return out

    def close(self) -> None:
        if self._graphed is not None:
            self._graphed.close()
            self._graphed = None
        if self._ring is not None:
            self._ring.drain()   # no copy still reading a pinned buffer when it is freed
            self._ring = None
        self._copy = None
        if self._model is not None:
            self._model = None
            if self._device.type == "cuda":
                torch.cuda.empty_cache()
