"""ONNX Runtime backend (``--backend onnxruntime``): CPU, CUDA, TensorRT, ROCm and OpenVINO EPs.

The execution provider comes from ``spec.device`` (``cpu`` -> CPU, ``cuda[:N]`` -> CUDA,
``rocm[:N]`` -> ROCm) unless ``spec.option("ort_provider")`` names one (CPU, CUDA, TensorRT, ROCm,
OpenVINO). A provider this onnxruntime build lacks is a :class:`UserError`, and so is a session
whose first provider is not the requested one: ORT silently falls back to CPU when a GPU provider
fails to initialise, and a CPU run reported as a GPU run is worse than no run.

Inputs and outputs are matched by name (see :mod:`distbert.backends.onnx_io`); inputs are cast to
the graph's integer type; a graph with a static sequence length gets padded inputs and sliced
outputs.

Warm-up (issue 19): on a GPU, ORT pays a first-use cost per input shape (kernel and algorithm
choices, arena growth), so with a shape ladder (the default on a GPU provider, ``--shape-ladder N``
on any) :meth:`OnnxRuntimeBackend.warmup_batches` is every ladder shape once, which the worker runs
on each serving thread before the Ready, as it does the torch backend's. With exact trimming there is
no bounded set of shapes: the old fixed warm-up stays.

The device per thread: nothing to do here (read in ORT's source, not run on a GPU). Every
``InferenceSession::Run`` calls ``OnRunStart`` on each EP of the session, and the CUDA EP's calls
``cudaSetDevice(device_id)`` ("in case it runs in a worker thread"; the ROCm EP ``hipSetDevice``).
The TensorRT EP's own ``OnRunStart`` does nothing, but a TensorRT session here also holds the CUDA EP
when the build has it (:meth:`OnnxRuntimeBackend._open`). The CUDA EP's cuBLAS/cuDNN handles live in
a per-thread context it returns to a pool after each run, and the I/O binding names the output's
device. So :meth:`Backend.bind_thread` stays the base's no-op.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from distbert import envs
from distbert.backends import batching, onnx_io, seqlen
from distbert.backends.base import Backend, BackendSpec, BatchHint, ModelInputs, dummy_batch
from distbert.backends.shapes import COMMON_SHAPES, largest_first
from distbert.errors import UserError

log = logging.getLogger(__name__)

# --ort_provider short names -> onnxruntime provider names
PROVIDERS: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}
_GPU_PROVIDERS = {"CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider"}

GPU_HINT = BatchHint(max_batch=256, token_budget=49152)


def device_index(device: str) -> int:
    """``cuda:1`` -> 1; ``cuda``/``cpu`` -> 0."""
    _, _, idx = device.partition(":")
    if not idx:
        return 0
    if not idx.isdigit():
        raise UserError(f"--device {device}: the device index must be a number, e.g. cuda:0")
    return int(idx)


def requested_provider(spec: BackendSpec) -> str:
    """The ORT provider name for this spec (option ``ort_provider`` beats ``device``)."""
    forced = spec.option("ort_provider")
    if forced:
        key = forced.lower().removesuffix("executionprovider")
        if key not in PROVIDERS:
            raise UserError(f"option ort_provider={forced}: choose one of CPU, CUDA, TensorRT, ROCm, OpenVINO")
        return PROVIDERS[key]
    kind = spec.device.partition(":")[0].lower()
    if kind not in ("cpu", "cuda", "rocm"):
        raise UserError(f"--device {spec.device}: onnxruntime takes cpu, cuda[:N] or rocm[:N]")
    return PROVIDERS[kind]


def _trt_profiles(path: Path, max_batch: int) -> tuple[str, str, str]:
    """TensorRT ``min, opt, max`` profile shapes for the graph's inputs (static dims kept as they are).

    Reads the graph with onnx (weights not loaded when stored externally) because provider options
    are needed before the session exists.
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    init = {t.name for t in graph.initializer}
    profiles: list[list[str]] = [[], [], []]
    for vi in graph.input:
        if vi.name in init:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in vi.type.tensor_type.shape.dim]
        batch, seq = (dims + [0, 0])[:2]
        for k, (b, s) in enumerate(((1, 1), (max(1, max_batch // 4), 256), (max_batch, 384))):
            profiles[k].append(f"{vi.name}:{batch or b}x{seq or s}")
    return ",".join(profiles[0]), ",".join(profiles[1]), ",".join(profiles[2])


def _ort_dtype(type_str: str) -> str:
    # "tensor(int64)" -> "int64"; ORT says "float" for float32, "double" for float64
    inner = type_str.removeprefix("tensor(").removesuffix(")")
    return {"float": "float32", "double": "float64", "float16": "float16"}.get(inner, inner)


def _descs(args: Sequence[Any]) -> list[onnx_io.TensorDesc]:
    return [onnx_io.TensorDesc(a.name, _ort_dtype(a.type), tuple(a.shape)) for a in args]


class OnnxRuntimeBackend(Backend):
    """One ``InferenceSession``; ``run`` is called from one thread."""

    name = "onnxruntime"

    def __init__(self, spec: BackendSpec) -> None:
        super().__init__(spec)
        self._session: ort.InferenceSession | None = None
        self._io: onnx_io.IoMap | None = None
        self._provider = ""
        self._path: Path | None = None
        self._threads = 0
        self._binding = False
        self._fused_ops: dict[str, int] = {}
        self._seq_mode = "dynamic"

    # ---------------------------------------------------------------------------------- load
    def load(self) -> None:
        path = onnx_io.resolve_model_file(self.spec.model, self.name)
        provider = requested_provider(self.spec)
        available = ort.get_available_providers()
        if provider not in available:
            raise UserError(f"onnxruntime {ort.__version__} has no {provider} (available: "
                            f"{', '.join(available)}): install the matching onnxruntime package "
                            "(e.g. onnxruntime-gpu for CUDA) or choose another --device/ort_provider")
        self._check_precision(provider)

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._threads = self.spec.threads or batching.usable_cores()
        opts.intra_op_num_threads = self._threads
        # one batch at a time from one thread: parallelism lives inside the ops
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3          # shape-merge warnings are noise for BERT graphs

        self._session, self._io = self._open(path, provider, available, opts)
        self._provider, self._path = provider, path
        self._binding = provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        if self._io.fixed_len:
            self._make_trimmable(path, provider, available, opts)
        log.info("onnxruntime %s: %s on %s, %d intra-op threads, inputs %s, %s", ort.__version__, path.name,
                 provider, self._threads, (self._io.ids, self._io.mask, self._io.segments), self._seq_mode)

    def _open(self, path: Path, provider: str, available: list[str],
              opts: ort.SessionOptions) -> tuple[ort.InferenceSession, onnx_io.IoMap]:
        providers: list[Any] = [(provider, self._provider_options(provider, path))]
        if provider == "TensorrtExecutionProvider" and "CUDAExecutionProvider" in available:
            providers.append(("CUDAExecutionProvider", {"device_id": device_index(self.spec.device)}))
        if provider != "CPUExecutionProvider":
            providers.append("CPUExecutionProvider")   # per-node fallback for ops the EP lacks
        source: str | bytes = str(path)
        if self.spec.option("ort_fuse") == "1":
            source = self._fused(path)
        try:
            session = ort.InferenceSession(source, sess_options=opts, providers=providers)
        except Exception as exc:  # ORT raises its own pybind exception types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"--model {path}: onnxruntime cannot load it ({first[:300]})") from exc
        active = session.get_providers()
        if not active or active[0] != provider:
            raise UserError(f"onnxruntime created the session on {active[:1]} instead of {provider} "
                            "(the provider failed to initialise: check the driver/CUDA libraries) "
                            "for --model " + str(path))
        return session, onnx_io.resolve_io(_descs(session.get_inputs()), _descs(session.get_outputs()), str(path))

    def _make_trimmable(self, path: Path, provider: str, available: list[str], opts: ort.SessionOptions) -> None:
        """Swap a static-length graph for its symbolic-length copy when a probe shows it is exact."""
        assert self._io is not None and self._io.fixed_len
        static = self._io.fixed_len
        why = "option seq_trim=0" if self.spec.option("seq_trim") == "0" else None
        if why is None:
            try:
                dyn = seqlen.dynamic_copy(path, [self._io.ids, self._io.mask, self._io.segments]
                                          + self._io.output_names)
                session, io = self._open(dyn, provider, available, opts)
            except (UserError, OSError, ValueError) as exc:
                why = f"the rewritten graph does not load ({str(exc)[:200]})"
            else:
                why = None if io.fixed_len is None else "the rewritten graph still has a static length"
                if why is None:
                    quiet = ort.RunOptions()
                    quiet.log_severity_level = 4      # a failing probe is expected; it is reported below
                    why = seqlen.probe(lambda x: onnx_io.run_graph(
                        io, x, lambda f: session.run(io.output_names, f, quiet)), static)
                if why is None:
                    self._session, self._io = session, io
                    self._seq_mode = seqlen.rewritten_mode(static)
                    return
        self._seq_mode = seqlen.padded_mode(path, static, why)

    def _fused(self, path: Path) -> str | bytes:
        """The graph after ORT's offline BERT fusions (Attention, SkipLayerNorm, BiasGelu), or ``path``.

        ORT's in-session optimizer does not fuse attention for these graphs; the transformers
        optimizer does (mask -> per-row lengths, so it assumes right padding, as SQuAD features are).
        """
        try:
            from onnxruntime.transformers.optimizer import optimize_model
        except ImportError:
            log.warning("ort_fuse=1: onnxruntime.transformers is unavailable; running the graph unfused")
            return str(path)
        quiet = logging.getLogger("onnxruntime.transformers")
        level = quiet.level
        quiet.setLevel(logging.ERROR)          # "model producer not matched" etc. is noise here
        try:
            fused = optimize_model(str(path), model_type="bert", num_heads=0, hidden_size=0, opt_level=0)
        except Exception as exc:   # an unknown graph shape: run it as it is
            log.warning("ort_fuse=1: fusion failed for %s (%s); running the graph unfused", path, exc)
            return str(path)
        finally:
            quiet.setLevel(level)
        self._fused_ops = {k: v for k, v in fused.get_fused_operator_statistics().items() if v}
        if sum(len(t.raw_data) for t in fused.model.graph.initializer) > 2**31 - 2**24:
            log.warning("ort_fuse=1: the fused graph exceeds 2 GB in memory; running the graph unfused")
            return str(path)
        log.info("ort_fuse=1: fused %s", self._fused_ops)
        return fused.model.SerializeToString()

    def _check_precision(self, provider: str) -> None:
        # ORT runs the precision stored in the model file; only TensorRT can lower fp32 to fp16.
        precision = self.spec.precision
        if precision == "fp16" and provider != "TensorrtExecutionProvider":
            raise UserError("--precision fp16 with onnxruntime needs ort_provider=TensorRT "
                            "(other providers run the model file's own precision: use fp32, "
                            "or int8 with the int8 model)")
        if precision not in ("fp32", "int8", "fp16"):
            raise UserError(f"--precision {precision} is not supported by onnxruntime: use fp32, int8 "
                            "(the int8 model file) or --backend torch for bf16")

    def _provider_options(self, provider: str, path: Path) -> dict[str, Any]:
        idx = device_index(self.spec.device)
        if provider in ("CUDAExecutionProvider", "ROCMExecutionProvider"):
            return {"device_id": idx}
        if provider == "TensorrtExecutionProvider":
            # One optimization profile covering every batch the coordinator can send; without it
            # TensorRT builds a new engine for each new [batch, seq] shape (minutes each).
            lo, opt, hi = _trt_profiles(path, GPU_HINT.max_batch)
            return {"device_id": idx, "trt_fp16_enable": self.spec.precision == "fp16",
                    "trt_int8_enable": False, "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": str(envs.cache_dir() / "tensorrt"),
                    "trt_profile_min_shapes": lo, "trt_profile_opt_shapes": opt, "trt_profile_max_shapes": hi}
        if provider == "OpenVINOExecutionProvider":
            return {"device_type": "CPU"}
        return {}

    # ----------------------------------------------------------------------------------- run
    def run(self, inputs: ModelInputs) -> tuple[np.ndarray, np.ndarray]:
        if self._session is None or self._io is None:
            raise RuntimeError("OnnxRuntimeBackend.run() before load()")
        run_fn = self._run_bound if self._binding else self._run_plain
        return onnx_io.run_graph(self._io, inputs, run_fn)

    def _run_plain(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        assert self._session is not None and self._io is not None
        return self._session.run(self._io.output_names, feed)

    def _run_bound(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        # I/O binding: outputs stay on the GPU until one copy back, and ORT skips its own staging.
        assert self._session is not None and self._io is not None
        binding = self._session.io_binding()
        for name, arr in feed.items():
            binding.bind_cpu_input(name, arr)
        for name in self._io.output_names:
            binding.bind_output(name, "cuda", device_index(self.spec.device))
        self._session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def warmup_batches(self) -> list[ModelInputs]:
        """With a shape ladder: one batch per ladder shape, largest first (ORT's arena grows to the
        first, so the rest fit in it), on any provider; the worker runs them on every serving thread
        (module docstring). Exact trimming: none, and the worker calls :meth:`warmup` once."""
        return [dummy_batch(rows, length) for rows, length in largest_first(self.shape_ladder.shapes())]

    def warmup(self) -> None:
        """Every :meth:`warmup_batches` batch on this thread; exact trimming: one batch, and on a GPU
        provider the common shapes too (GPU kernels are picked per shape)."""
        batches = self.warmup_batches()
        if batches:
            for inputs in batches:
                self.run(inputs)
            return
        super().warmup()
        if self._provider in _GPU_PROVIDERS:
            for rows, length in COMMON_SHAPES:
                self.run(dummy_batch(rows, length, padded=False))

    # ---------------------------------------------------------------------------------- meta
    def batch_hint(self) -> BatchHint:
        if self._provider in _GPU_PROVIDERS:
            return GPU_HINT
        return batching.cpu_batch_hint(self._threads or batching.usable_cores())

    def info(self) -> dict[str, Any]:
        out = super().info()
        out.update({"runtime": f"onnxruntime {ort.__version__}", "provider": self._provider,
                    "providers": self._session.get_providers() if self._session else [],
                    "model_file": str(self._path) if self._path else None,
                    "intra_op_threads": self._threads,
                    "inputs": [self._io.ids, self._io.mask, self._io.segments] if self._io else None,
                    "static_seq_len": self._io.fixed_len if self._io else None,
                    "seq_len_mode": self._seq_mode,
                    "fused_ops": self._fused_ops,
                    "warmup_batches": len(self.shape_ladder.shapes())})
        return out

    def close(self) -> None:
        self._session = None
