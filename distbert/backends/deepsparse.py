"""DeepSparse backend (``--backend deepsparse``, optional extra; CPU only).

DeepSparse pins ``numpy<2``, so it cannot share a virtual environment with the rest of distbert's
default stack. Install it in its own venv (see ``notes/backends.md``)::

    python3.11 -m venv ~/venvs/distbert-ds && . ~/venvs/distbert-ds/bin/activate
    pip install 'numpy<2' deepsparse && pip install -e /path/to/distbert

``deepsparse`` is imported only in :meth:`DeepSparseBackend.load`, so this module imports anywhere.
DeepSparse engines are compiled for static shapes: one engine per sequence-length bucket
(option ``ds_buckets``, default ``128,256,384``) at a fixed batch size (``ds_batch``, default 16);
batches are padded up to the bucket length and batch size, and outputs sliced back. Engines are
compiled lazily (the first batch of a bucket pays the compile time; ``warmup`` compiles them all).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from distbert.backends import batching, onnx_io
from distbert.backends.base import Backend, BackendSpec, BatchHint, ModelInputs
from distbert.errors import UserError

log = logging.getLogger(__name__)

MAX_SEQ = 384   # the longest SQuAD feature: the largest bucket is always at least this

INSTALL_HINT = ("install deepsparse in its own venv (it pins numpy<2): "
                "python -m venv ds && ds/bin/pip install 'numpy<2' deepsparse -e . (see notes/backends.md)")


def _import_deepsparse() -> Any:
    try:
        import deepsparse
    except ImportError as exc:   # ImportError too: a numpy-2 venv breaks its compiled module
        raise UserError(f"--backend deepsparse needs the 'deepsparse' extra, which is not importable "
                        f"here ({exc}): {INSTALL_HINT}") from exc
    return deepsparse


def _graph_io(path: Path) -> tuple[list[onnx_io.TensorDesc], list[onnx_io.TensorDesc]]:
    import onnx
    from onnx import helper

    graph = onnx.load(str(path), load_external_data=False).graph
    init = {t.name for t in graph.initializer}

    def desc(vi: Any) -> onnx_io.TensorDesc:
        t = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
        return onnx_io.TensorDesc(vi.name, str(helper.tensor_dtype_to_np_dtype(t.elem_type)), dims)

    return [desc(v) for v in graph.input if v.name not in init], [desc(v) for v in graph.output]


class DeepSparseBackend(Backend):
    """Static-shape DeepSparse engines per length bucket; ``run`` from one thread."""

    name = "deepsparse"

    def __init__(self, spec: BackendSpec) -> None:
        super().__init__(spec)
        self._ds: Any = None
        self._path: Path | None = None
        self._io: onnx_io.IoMap | None = None
        self._input_order: list[str] = []
        self._output_order: list[str] = []
        self._engines: dict[int, Any] = {}
        self._buckets: list[int] = []
        self._batch = 16
        self._cores = 0
        self._tmp: Path | None = None

    def load(self) -> None:
        self._ds = _import_deepsparse()
        if self.spec.device.partition(":")[0].lower() != "cpu":
            raise UserError(f"--device {self.spec.device}: deepsparse runs on cpu only")
        if self.spec.precision not in ("fp32", "int8"):
            raise UserError(f"--precision {self.spec.precision}: deepsparse runs the model file's "
                            "precision (fp32, or int8 with the int8 model)")
        self._path = onnx_io.resolve_model_file(self.spec.model, self.name)
        inputs, outputs = _graph_io(self._path)
        self._io = onnx_io.resolve_io(inputs, outputs, str(self._path))
        self._input_order = [d.name for d in inputs]
        self._output_order = [d.name for d in outputs]
        try:
            self._buckets = sorted({int(b) for b in (self.spec.option("ds_buckets") or "128,256,384").split(",")})
            self._batch = int(self.spec.option("ds_batch") or 16)
        except ValueError as exc:
            raise UserError("options ds_buckets (e.g. 128,256,384) and ds_batch (e.g. 16) must be integers") from exc
        if self._io.fixed_len:
            self._buckets = [self._io.fixed_len]
        elif self._buckets[-1] < MAX_SEQ:   # a SQuAD feature can be 384 tokens long: never fail mid-run
            self._buckets.append(MAX_SEQ)
        if self._io.fixed_batch:
            self._batch = self._io.fixed_batch
        self._cores = self.spec.threads or batching.usable_cores()
        log.info("deepsparse %s: %s, buckets %s, batch %d, %d cores", getattr(self._ds, "__version__", "?"),
                 self._path.name, self._buckets, self._batch, self._cores)

    def _engine(self, length: int) -> tuple[Any, int]:
        bucket = next((b for b in self._buckets if b >= length), None)
        if bucket is None:
            raise UserError(f"sequence length {length} exceeds the largest ds_buckets entry {self._buckets[-1]}")
        if bucket not in self._engines:
            log.info("deepsparse: compiling the engine for [%d, %d]", self._batch, bucket)
            self._engines[bucket] = self._ds.Engine(
                model=str(self._private_copy()), batch_size=self._batch, num_cores=self._cores,
                input_shapes=[[self._batch, bucket]] * len(self._input_order))
        return self._engines[bucket], bucket

    def run(self, inputs: ModelInputs) -> tuple[np.ndarray, np.ndarray]:
        if self._io is None:
            raise RuntimeError("DeepSparseBackend.run() before load()")
        io = self._io
        engine, bucket = self._engine(inputs.shape[1])
        # the engine's shapes are static: pad to the bucket length and the engine batch
        padded = dataclasses.replace(io, fixed_len=bucket, fixed_batch=self._batch)

        def run_fn(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
            # deepsparse takes and returns lists in graph order
            outs = dict(zip(self._output_order, engine.run([feed[n] for n in self._input_order])))
            return [outs[n] for n in io.output_names]

        return onnx_io.run_graph(padded, inputs, run_fn)

    def warmup(self) -> None:
        # compile and touch every bucket's engine (the base warmup's 128 tokens may exceed the smallest)
        for bucket in self._buckets:
            ids = np.zeros((1, bucket), np.int64)
            ids[0, 0] = 101
            self.run(ModelInputs(np.zeros(1, np.int64), ids, np.ones_like(ids), np.zeros_like(ids),
                                 np.full(1, bucket, np.int32)))

    def batch_hint(self) -> BatchHint:
        return BatchHint(max_batch=self._batch, token_budget=None)

    def info(self) -> dict[str, Any]:
        out = super().info()
        out.update({"runtime": f"deepsparse {getattr(self._ds, '__version__', '?')}" if self._ds else None,
                    "buckets": self._buckets, "engine_batch": self._batch, "cores": self._cores})
        return out

    def _private_copy(self) -> Path:
        """The model file the engines compile from: a private copy, deleted on close.

        deepsparse 1.8.0's ``Engine(input_shapes=...)`` writes the overridden shapes *into the model
        file it is given* (measured: the file's inputs become ``[batch, bucket]``), which would
        corrupt the user's model (and the sha256 recorded for an official download).
        """
        assert self._path is not None
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="distbert-deepsparse-"))
            for src in [self._path, *self._path.parent.glob(self._path.name + ".data")]:
                shutil.copyfile(src, self._tmp / src.name)
        return self._tmp / self._path.name

    def close(self) -> None:
        self._engines.clear()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

