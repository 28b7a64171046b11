"""PyTorch backend (``--backend torch``): transformers' ``BertForQuestionAnswering`` on CPU or CUDA.

Accepted ``--model``:

* an MLPerf-style checkpoint: a directory with ``model.pytorch`` (a state_dict in transformers
  naming) and ``bert_config.json``, or the ``model.pytorch`` file itself with the config beside it;
* a Hugging Face BERT QA directory (``config.json`` + weights), loaded offline.

Precision: fp32, bf16, fp16 (CUDA only). Outputs are float32 numpy.
``spec.option("compile") == "1"`` wraps the model in ``torch.compile`` (dynamic shapes).

Attention runs through PyTorch's ``scaled_dot_product_attention`` (SDPA), and two options say how:

* ``sdpa=auto|flash|efficient|cudnn|math``: the SDPA kernel, applied around every forward with
  ``torch.nn.attention.sdpa_kernel`` (:func:`sdpa_scope`). ``auto`` (the default, until a device
  measurement decides: :meth:`TorchBackend.time_shapes` is the hook) lets torch choose per call; on
  Hopper recent torch may choose cuDNN, which builds a plan per new shape. CPU runs flash and math.
* ``attn_mask=keys|transformers``: the mask form (:func:`attention_arg`). ``keys`` (default): no
  mask when no row of the batch is padded (read from the host's copy of the mask: no device sync),
  else one additive key-padding mask ``[B, 1, 1, L]`` in the model's dtype, broadcast by SDPA over
  heads and queries, which the fused (efficient, cuDNN) kernels take. ``transformers`` hands the 2D
  mask to transformers, which builds its own (5.x: a boolean ``[B, 1, L, L]`` view after a
  device-to-host read of the mask every forward; 4.x: a dense float ``[B, 1, L, L]``): kept for A/B.

On CUDA, a batch goes in two stages (:meth:`TorchBackend.prepare`, :meth:`TorchBackend.run_prepared`):
its rows are written into one of two pinned host buffers and copied to the device on a copy stream,
then the compute stream waits for that copy's event and runs the model. The worker runs the two
stages on two threads, so the next batch's copy overlaps this batch's compute; ``run`` runs them
back to back.

``spec.option("graphs") == "1"`` (CUDA only) runs every batch through CUDA graphs captured per
(batch, length) bucket (:mod:`distbert.backends.graphs` chooses the buckets): one launch per batch
instead of hundreds of kernel launches. With a shape ladder (``backends/shapes``) the buckets are
the ladder's shapes, all captured during warmup; without one, buckets are captured on first use
(batch 1 at every length during warmup); ``graphs_cache=N`` caps how many stay captured (least
recently used evicted).

Threads (issue 19): CUDA's current device, cuBLAS/cuDNN handles and attention plans are per thread.
:meth:`TorchBackend.bind_thread` sets the backend's device as the calling thread's current one (every
entry point calls it, and the worker calls it first on each of its threads), and
:meth:`TorchBackend.warmup_batches` are the batches the worker runs on *every* thread that will
serve: every ladder shape, masked and unmasked (eager), before it says Ready.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from distbert.backends.base import Backend, BackendSpec, BatchHint, ModelInputs, dummy_batch
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
from distbert.backends.shapes import COMMON_SHAPES, ShapeLadder, largest_first
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


# --- attention: the SDPA kernel (option sdpa) and the mask form (option attn_mask) -------------

#: ``--option sdpa=``: the scaled_dot_product_attention kernel a forward may use (None: torch's choice)
SDPA_KERNELS: dict[str, SDPBackend | None] = {
    "auto": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
#: ``auto`` until a device measurement decides (issue 19: the first device command times every kernel
#: per ladder shape, first use and warm, through TorchBackend.time_shapes); the winner then goes here
DEFAULT_SDPA = "auto"
#: kernels torch 2.13 has only on CUDA: on CPU, SDPA runs flash (it takes a mask there) or math
CUDA_ONLY_SDPA = frozenset({"efficient", "cudnn"})
#: ``--option attn_mask=``: how a padded batch's mask reaches SDPA (module docstring)
ATTN_MASKS = ("keys", "transformers")


def _sdpa_option(value: str | None, device: torch.device) -> str:
    """A valid ``sdpa`` value for ``device``, or a one-line UserError naming the valid ones."""
    value = DEFAULT_SDPA if value is None else value
    if value not in SDPA_KERNELS:
        raise UserError(f"--option sdpa={value}: write one of {', '.join(SDPA_KERNELS)} "
                        f"(the attention kernel; {DEFAULT_SDPA} lets torch choose)")
    if device.type == "cpu" and value in CUDA_ONLY_SDPA:
        raise UserError(f"--option sdpa={value}: torch has no {value} attention kernel on the CPU: "
                        "there use flash, math or auto")
    return value


class _SdpaFlags:
    """torch's ``sdpa_kernel`` sets process-wide flags and restores them on exit, so two threads in
    a forward at once would undo each other's choice (a worker's I/O and compute threads; rank 0's
    driver and LoadGen's thread). Here the first thread in sets them, the last one out restores
    them, and two different kernels at the same time in one process are refused."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kernel = ""
        self._users = 0
        self._scope: contextlib.AbstractContextManager[Any] | None = None

    def enter(self, kernel: str, backend: SDPBackend) -> None:
        with self._lock:
            if self._users and kernel != self._kernel:
                raise RuntimeError(f"sdpa={kernel} and sdpa={self._kernel} in one process at the same time: "
                                   "torch's kernel choice is process-wide; run them one after the other")
            if not self._users:
                scope = sdpa_kernel(backend)
                scope.__enter__()
                self._scope, self._kernel = scope, kernel
            self._users += 1

    def exit(self) -> None:
        with self._lock:
            self._users -= 1
            if not self._users and self._scope is not None:
                scope, self._scope = self._scope, None
                scope.__exit__(None, None, None)


_SDPA_FLAGS = _SdpaFlags()


@contextlib.contextmanager
def sdpa_scope(kernel: str) -> Iterator[None]:
    """Only the ``kernel`` SDPA kernel inside (``auto``: torch's flags as they are)."""
    backend = SDPA_KERNELS[kernel]
    if backend is None:
        yield
        return
    _SDPA_FLAGS.enter(kernel, backend)
    try:
        yield
    finally:
        _SDPA_FLAGS.exit()


def _transformers_major() -> int:
    return int(_import_transformers().__version__.split(".")[0])


def attention_arg(mask: torch.Tensor, dtype: torch.dtype, form: str, hf_major: int) -> torch.Tensor:
    """The model's ``attention_mask`` argument for a batch with padding (``mask``: int ``[B, L]``, 1 =
    a real token). ``keys``: the additive key-padding mask ``[B, 1, 1, L]`` (0 for a real key, the
    dtype's minimum for a pad key: a finite value, so no row can turn into NaN). transformers 5
    passes a 4D mask to SDPA unchanged; 4.x turns a 3D ``[B, 1, L]`` mask into the same ``[B, 1, 1,
    L]`` one (``get_extended_attention_mask``). ``transformers``: the 2D mask, for transformers'
    own mask."""
    if form == "transformers":
        return mask
    if hf_major >= 5:
        return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
    return mask[:, None, :]


def _no_kernel(exc: RuntimeError) -> bool:
    text = str(exc)
    return "No available kernel" in text or "No viable backend for scaled_dot_product_attention" in text


def qa_logits(model: torch.nn.Module, ids: torch.Tensor, attention: torch.Tensor | None, segments: torch.Tensor,
              kernel: str) -> torch.Tensor:
    """Start and end logits stacked, float32 ``[2, B, L]``; SDPA limited to ``kernel``. A kernel that
    cannot run this batch is a UserError naming the option (the warm-up meets it before Ready)."""
    with sdpa_scope(kernel):
        try:
            out = model(input_ids=ids, attention_mask=attention, token_type_ids=segments)
        except RuntimeError as exc:
            if kernel == "auto" or not _no_kernel(exc):
                raise
            rows, length = ids.shape
            why = " (flash takes no mask on CUDA)" if kernel == "flash" and attention is not None else ""
            raise UserError(f"--option sdpa={kernel}: torch has no {kernel} attention kernel for a "
                            f"{'padded' if attention is not None else 'unpadded'} [{rows}, {length}] batch "
                            f"on {ids.device}{why}: pick another sdpa value, or auto") from exc
    return torch.stack((out.start_logits, out.end_logits)).float()


def _unpadded(inputs: ModelInputs) -> bool:
    """No pad token in the batch (read on the host: no device sync): SDPA then needs no mask at all."""
    return bool(np.all(inputs.input_mask))


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
    unpadded: bool = False          # eager: no pad token, so no mask (see _unpadded)


# --- CUDA graphs (option graphs=1) ------------------------------------------------------------

#: (input ids, mask, segments), each int64 ``[b, l]`` on the device -> logits ``[2, b, l]`` float32
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

CAPTURE_WARMUP_PASSES = 3   # eager passes on a side stream before capture (cuBLAS/SDPA pick their kernels)


def qa_forward(model: torch.nn.Module, kernel: str = DEFAULT_SDPA, form: str = "keys") -> Forward:
    """The model as one function returning start and end logits stacked, float32, always through
    the masked attention path (:func:`attention_arg`): a captured graph serves any padding."""
    dtype = next(model.parameters()).dtype
    major = _transformers_major()

    def forward(ids: torch.Tensor, mask: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        return qa_logits(model, ids, attention_arg(mask, dtype, form, major), segments, kernel)

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
        self._shapes: frozenset[tuple[int, int]] = frozenset()   # a shape ladder's shapes: one bucket each

    def use_shapes(self, shapes: Sequence[tuple[int, int]], grow: bool = True) -> None:
        """Buckets = the shape ladder's shapes (``backends/shapes``): a batch on one of them is one
        bucket of its own shape, unpadded. ``grow``: raise the cache's capacity to hold them all (a
        capacity the user set stays, with a warning: evicted shapes are recaptured mid-run)."""
        self._shapes = frozenset(shapes)
        if len(self._shapes) > self.cache.capacity:
            if grow:
                self.cache.capacity = len(self._shapes)
            else:
                log.warning("graphs_cache=%d holds fewer graphs than the %d ladder shapes: evicted ones "
                            "are captured again mid-run", self.cache.capacity, len(self._shapes))

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
        if (rows, length) in self._shapes:
            return [Chunk(0, rows, Bucket(rows, length))]
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
        return {"buckets": "shape ladder" if self._shapes else "powers of two",
                "batch_ladder": list(self.ladder), "length_step": LENGTH_STEP, "max_length": MAX_LENGTH,
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
    """``BertForQuestionAnswering`` under ``torch.inference_mode``. ``prepare`` on one thread and
    ``run_prepared`` on another at most (the worker's pipeline); ``run`` from any thread that has
    none of them in flight."""

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
        self._sdpa = DEFAULT_SDPA
        self._mask_form = "keys"
        self._hf_major = 5

    def load(self) -> None:
        precision = self.spec.precision
        if precision not in DTYPES:
            raise UserError(f"--precision {precision}: the torch backend runs fp32, bf16 or fp16 "
                            "(for int8 use --backend onnxruntime with the int8 model)")
        device = resolve_device(self.spec.device)
        if precision == "fp16" and device.type == "cpu":
            raise UserError("--precision fp16 is not supported on CPU by the torch backend: "
                            "use --precision bf16 (or fp32)")
        # options first: a typo must not wait for the (slow) model load
        graph_capacity = _graph_options(self.spec, device)
        self._sdpa = _sdpa_option(self.spec.option("sdpa"), device)
        self._mask_form = self.spec.option("attn_mask", "keys") or ""
        if self._mask_form not in ATTN_MASKS:
            raise UserError(f"--option attn_mask={self._mask_form}: write keys (a key-padding mask, or none "
                            "when a batch has no padding) or transformers (transformers' own mask)")
        self._hf_major = _transformers_major()
        if self.spec.threads or device.type == "cpu":
            # per process: a worker owns its core set (torch's default counts the whole machine)
            torch.set_num_threads(self.spec.threads or usable_cores())
        self._dtype = DTYPES[precision]
        self._device = device
        self.bind_thread()   # the loading thread too: .to(cuda:N) and the streams below use the current device
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
        self._model = model
        if graph_capacity is not None:
            pool, stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream(device)
            forward = qa_forward(model, self._sdpa, self._mask_form)

            def capture(bucket: Bucket) -> StaticGraph:
                with self._cuda_lock:
                    # a capture records on the current device's streams: with cuda:1 left at cuda:0,
                    # the model's kernels would run on a device the capture stream does not belong to
                    self.bind_thread()
                    return capture_cuda(forward, bucket, device, pool, stream)

            self._graphed = GraphedModel(capture, device, GPU_HINT.max_batch, graph_capacity)
        log.info("torch %s: %s model %s on %s (%s), %s, %d threads, sdpa=%s, attn_mask=%s", torch.__version__,
                 self._source, self.spec.model, device, self._device_name, precision, torch.get_num_threads(),
                 self._sdpa, self._mask_form)

    def bind_thread(self) -> None:
        """CUDA: this backend's GPU as the calling thread's current device. The current device is per
        thread, and what takes no explicit device uses it (events, cuBLAS/cuDNN handles, a graph
        capture's pool): a worker on ``cuda:1`` whose compute thread were left on ``cuda:0`` would
        put them on the wrong GPU. Cheap when already set; every entry point below calls it."""
        if self._device.type == "cuda" and torch.cuda.current_device() != self._device.index:
            torch.cuda.set_device(self._device)

    def set_shape_ladder(self, ladder: ShapeLadder) -> None:
        super().set_shape_ladder(ladder)
        if self._graphed is not None and ladder.shapes():
            self._graphed.use_shapes(ladder.shapes(), grow=self.spec.option("graphs_cache") is None)

    @property
    def overlap_prepare(self) -> bool:
        return self._copy is not None

    def prepare(self, inputs: ModelInputs) -> object:
        """CUDA: the batch into a pinned buffer, copied to the device on the copy stream; the copy's
        event recorded (a :class:`Staged`). CPU: ``inputs`` unchanged."""
        if self._copy is None or self._ring is None:
            return inputs
        self.bind_thread()
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
        return Staged(on_device, copied, rows, length, chunks, chunks is None and _unpadded(inputs))

    def _logits(self, ids: torch.Tensor, mask: torch.Tensor, segments: torch.Tensor, unpadded: bool) -> torch.Tensor:
        """The eager forward: no mask at all for an unpadded batch (``keys`` form), else the mask form."""
        assert self._model is not None
        attention = None if unpadded and self._mask_form == "keys" else \
            attention_arg(mask, self._dtype, self._mask_form, self._hf_major)
        return qa_logits(self._model, ids, attention, segments, self._sdpa)

    def run_prepared(self, prepared: object) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(prepared, Staged):   # CPU: prepare() passed the inputs through
            return super().run_prepared(prepared)
        if self._model is None:
            raise RuntimeError("TorchBackend.run_prepared() before load()")
        self.bind_thread()
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
            # one stacked copy back instead of two
            logits = self._logits(planes[0], planes[1], planes[2], prepared.unpadded).cpu().numpy()
        return logits[0], logits[1]

    def run(self, inputs: ModelInputs) -> tuple[np.ndarray, np.ndarray]:
        if self._model is None:
            raise RuntimeError("TorchBackend.run() before load()")
        if self._copy is not None:   # CUDA: the worker's two stages, back to back
            return self.run_prepared(self.prepare(inputs))
        with torch.inference_mode():
            ids, mask, segments = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
                                   for a in (inputs.input_ids, inputs.input_mask, inputs.segment_ids))
            logits = self._logits(ids, mask, segments, _unpadded(inputs)).cpu().numpy()
        return logits[0], logits[1]

    # --- warm-up and timing ----------------------------------------------------------------------

    def _warm_shapes(self) -> list[tuple[int, int]]:
        """The shapes a warm-up runs, largest first (the allocator's biggest block, and the graph
        pool, are sized by the first; PyTorch captures graphs that share a pool in that order)."""
        shapes = self.shape_ladder.shapes()
        if not shapes:
            # exact trimming: no bounded set to warm; the common shapes, and SingleStream's whole
            # working set with graphs (batch 1 at every length rung)
            shapes = list(COMMON_SHAPES)
            if self._graphed is not None:
                shapes += [(1, length) for length in range(LENGTH_STEP, MAX_LENGTH + 1, LENGTH_STEP)]
        return largest_first(shapes)

    def _warm_plan(self) -> list[tuple[int, int, bool]]:
        """(rows, length, padded) of each warm-up batch. CUDA (or compile=1): every shape a batch can
        take, once per attention path: a graph always runs the masked one; eager runs both, since an
        unpadded batch has no mask and SDPA may pick another kernel for it. CPU: none."""
        if self._device.type != "cuda" and self.spec.option("compile") != "1":
            return []
        both = self._graphed is None and self._mask_form == "keys"
        plan = []
        for rows, length in self._warm_shapes():
            plan.append((rows, length, length > 1))   # a 1-token batch cannot be padded
            if both and length > 1:
                plan.append((rows, length, False))
        return plan

    def warmup_batches(self) -> list[ModelInputs]:
        """See :meth:`_warm_plan` (CPU: none: :meth:`warmup`'s one batch is enough there)."""
        return [dummy_batch(rows, length, padded) for rows, length, padded in self._warm_plan()]

    def warmup(self) -> None:
        """Every :meth:`warmup_batches` batch on this thread (the base's one batch on CPU). The worker
        runs them on each of its serving threads instead (``engine/worker``)."""
        batches = self.warmup_batches()
        if not batches:
            super().warmup()
            return
        t0 = time.perf_counter()
        for inputs in batches:
            self.run(inputs)
        log.info("warm-up: %d batches (%d shapes) in %.1f s%s", len(batches), len({b.shape for b in batches}),
                 time.perf_counter() - t0, self._graph_note())

    def _graph_note(self) -> str:
        if self._graphed is None:
            return ""
        return f"; {len(self._graphed.cache)} CUDA graphs captured in {self._graphed.capture_s:.1f} s"

    def set_sdpa(self, kernel: str) -> None:
        """Switch the SDPA kernel without reloading (A/B timings, :meth:`time_shapes`). Eager only:
        a captured graph keeps the kernels it was captured with."""
        kernel = _sdpa_option(kernel, self._device)
        if self._graphed is not None and kernel != self._sdpa:
            raise UserError("set_sdpa: CUDA graphs keep the kernels they were captured with; "
                            "load a backend with --option sdpa=... instead")
        self._sdpa = kernel

    def time_shapes(self, shapes: Sequence[tuple[int, int]], padded: bool = True) -> list[dict[str, Any]]:
        """One timed ``run`` per ``(rows, length)`` on this thread, the device idle before each: call
        it twice for first use against warm, per ``sdpa`` kernel (:meth:`set_sdpa`); the device
        script's hook (issue 19). Each row: rows, length, padded, sdpa, ms."""
        out = []
        for rows, length in shapes:
            inputs = dummy_batch(rows, length, padded)
            if self._device.type == "cuda":
                torch.cuda.synchronize(self._device)
            t0 = time.perf_counter()
            self.run(inputs)   # returns host arrays: the device work is done
            out.append({"rows": rows, "length": length, "padded": padded and length > 1, "sdpa": self._sdpa,
                        "ms": round((time.perf_counter() - t0) * 1e3, 3)})
        return out

    def batch_hint(self) -> BatchHint:
        if self._device.type == "cuda":
            return GPU_HINT
        return cpu_batch_hint(torch.get_num_threads())

    def info(self) -> dict[str, Any]:
        out = super().info()
        out.update({"runtime": f"torch {torch.__version__}", "device_name": self._device_name,
                    "model_format": self._source, "attention": "sdpa", "sdpa": self._sdpa,
                    "attn_mask": self._mask_form, "compiled": self.spec.option("compile") == "1",
                    "threads": torch.get_num_threads(), "copy_stream": self._copy is not None,
                    "warmup_batches": len(self._warm_plan()),
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
