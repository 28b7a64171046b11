"""OpenVINO backend (``--backend openvino``): the ONNX models (fp32 and int8) on the OpenVINO CPU plugin.

``openvino.Core().read_model`` reads the ONNX file directly (dynamic batch and sequence when the
graph has them); inputs/outputs are matched like the ONNX Runtime backend does
(:mod:`distbert.backends.onnx_io`). Options:

* ``ov_hint``: ``LATENCY`` (default) or ``THROUGHPUT``. A worker runs one batch at a time from one
  thread, so LATENCY (one stream using every thread) is the right default; THROUGHPUT splits the
  cores into streams that a single synchronous request cannot fill.
* ``spec.threads`` -> ``INFERENCE_NUM_THREADS``; ``spec.precision`` -> ``INFERENCE_PRECISION_HINT``
  (fp32 is pinned explicitly: on AMX/AVX512-BF16 CPUs OpenVINO would otherwise run bf16 silently).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from distbert.backends import batching, onnx_io, seqlen
from distbert.backends.base import Backend, BackendSpec, BatchHint, ModelInputs
from distbert.errors import UserError

log = logging.getLogger(__name__)

_PRECISIONS = {"fp32": ("f32", "FP32"), "bf16": ("bf16", "BF16"), "fp16": ("f16", "FP16"),
               "int8": ("f32", "FP32")}   # int8: the model file carries the quantization


def _descs(ports: Sequence[Any]) -> list[onnx_io.TensorDesc]:
    out = []
    for port in ports:
        pshape = port.get_partial_shape()
        dims: tuple[int | None, ...] = ()
        if pshape.rank.is_static:
            dims = tuple(d.get_length() if d.is_static else None for d in pshape)
        out.append(onnx_io.TensorDesc(port.get_any_name(), str(port.get_element_type().to_dtype()), dims))
    return out


class OpenVinoBackend(Backend):
    """One compiled model and one infer request; ``run`` from one thread."""

    name = "openvino"

    def __init__(self, spec: BackendSpec) -> None:
        super().__init__(spec)
        self._compiled: Any = None
        self._request: Any = None
        self._io: onnx_io.IoMap | None = None
        self._outputs: list[Any] = []
        self._path: Path | None = None
        self._config: dict[str, Any] = {}
        self._threads = 0
        self._seq_mode = "dynamic"

    def load(self) -> None:
        path = onnx_io.resolve_model_file(self.spec.model, self.name)
        if self.spec.device.partition(":")[0].lower() != "cpu":
            raise UserError(f"--device {self.spec.device}: the openvino backend runs on cpu "
                            "(for GPUs use --backend onnxruntime or torch)")
        if self.spec.precision not in _PRECISIONS:
            raise UserError(f"--precision {self.spec.precision}: openvino takes fp32, bf16, fp16 or int8")
        core = ov.Core()
        ov_precision, capability = _PRECISIONS[self.spec.precision]
        caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if capability not in caps:
            raise UserError(f"--precision {self.spec.precision}: this CPU has no {capability} support "
                            f"in OpenVINO (capabilities: {', '.join(caps)}): use fp32")
        hint = (self.spec.option("ov_hint") or "LATENCY").upper()
        if hint not in ("LATENCY", "THROUGHPUT"):
            raise UserError(f"option ov_hint={hint}: use LATENCY or THROUGHPUT")
        threads = self._threads = self.spec.threads or batching.usable_cores()
        self._config = {"PERFORMANCE_HINT": hint, "INFERENCE_NUM_THREADS": threads,
                        "INFERENCE_PRECISION_HINT": ov_precision}
        self._path = path
        self._compile(core, path)
        assert self._io is not None
        if self._io.fixed_len:
            self._make_trimmable(core, path)
        log.info("openvino %s: %s on CPU, %s, %d threads, %s, %s", ov.get_version(), path.name, hint,
                 threads, ov_precision, self._seq_mode)

    def _compile(self, core: Any, path: Path) -> None:
        try:
            model = core.read_model(str(path))
        except Exception as exc:  # OpenVINO raises RuntimeError with multi-line text
            why = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise UserError(f"--model {path}: openvino cannot read it ({why})") from exc
        self._io = onnx_io.resolve_io(_descs(model.inputs), _descs(model.outputs), str(path))
        self._compiled = core.compile_model(model, "CPU", self._config)
        self._request = self._compiled.create_infer_request()
        self._outputs = [self._compiled.output(name) for name in self._io.output_names]

    def _make_trimmable(self, core: Any, path: Path) -> None:
        """Use the symbolic-length copy of a static-length graph when a probe shows it is exact."""
        assert self._io is not None and self._io.fixed_len
        static, io = self._io.fixed_len, self._io
        why = "option seq_trim=0" if self.spec.option("seq_trim") == "0" else None
        if why is None:
            try:
                self._compile(core, seqlen.dynamic_copy(path, [io.ids, io.mask, io.segments] + io.output_names))
            except Exception as exc:  # a graph OpenVINO cannot reshape fails in read or compile
                why = f"the rewritten graph does not load ({str(exc).strip()[:200]})"
            else:
                why = ("the rewritten graph still has a static length" if self._io.fixed_len
                       else seqlen.probe(self.run, static))
            if why is None:
                self._seq_mode = seqlen.rewritten_mode(static)
                return
            self._compile(core, path)
        self._seq_mode = seqlen.padded_mode(path, static, why)

    def _infer(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self._request.infer(feed)
        # the result views the request's own buffers, which the next infer overwrites: copy
        return [np.array(result[port], copy=True) for port in self._outputs]

    def run(self, inputs: ModelInputs) -> tuple[np.ndarray, np.ndarray]:
        if self._request is None or self._io is None:
            raise RuntimeError("OpenVinoBackend.run() before load()")
        return onnx_io.run_graph(self._io, inputs, self._infer)

    def batch_hint(self) -> BatchHint:
        return batching.cpu_batch_hint(self._threads or batching.usable_cores())

    def info(self) -> dict[str, Any]:
        out = super().info()
        out.update({"runtime": f"openvino {ov.get_version()}", "model_file": str(self._path) if self._path else None,
                    "config": {k: str(v) for k, v in self._config.items()},
                    "static_seq_len": self._io.fixed_len if self._io else None,
                    "seq_len_mode": self._seq_mode})
        return out

    def close(self) -> None:
        self._request = None
        self._compiled = None
