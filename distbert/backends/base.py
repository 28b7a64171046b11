"""The backend contract every worker-side inference engine implements.

A backend is created from a :class:`BackendSpec` (plain data, part of the run config), then
``load()`` (read the model, bind the device) and ``warmup()`` are called once before the worker says
ready. ``run()`` is then called once per batch, from one thread.

Two stages, for a device that computes while the host feeds it: ``prepare(inputs)`` does the host
work and starts the copy to the device, ``run_prepared(prepared)`` computes. A backend whose
:attr:`Backend.overlap_prepare` is True gets ``prepare`` of the next batch on the worker's prepare
thread while ``run_prepared`` of this one runs on its compute thread (at most one call of each at a
time; every prepared batch is run once, in the order prepared, unless shutdown drops it). The
defaults (``prepare`` returns the inputs, ``run_prepared`` calls ``run``) keep one-stage backends as
they are, and ``run()`` stays valid on every backend: ``run_prepared(prepare(x))`` must equal it.

Inputs are int arrays ``[B, L]`` already trimmed by the worker to the longest real length of the
batch (L <= 384; a backend that needs a fixed length pads internally and slices the outputs back),
then padded up to the run's shape ladder (:meth:`Backend.set_shape_ladder`, ``backends/shapes``):
with a non-exact ladder ``[B, L]`` is always one of ``shape_ladder.shapes()``.
The output is ``(start_logits, end_logits)``, each float32 ``[B, L]``.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from distbert.backends.shapes import ShapeLadder


@dataclasses.dataclass(frozen=True)
class BackendSpec:
    """What a worker needs to build its backend. Plain data: travels in the run config."""

    name: str                      # registry name: "null", "oracle", "sim", "onnxruntime", "torch", ...
    model: str | None = None       # model file or directory (backend-specific), None for harness backends
    device: str = "cpu"            # "cpu", "cuda", "cuda:1", "rocm"
    precision: str = "fp32"        # "fp32", "fp16", "bf16", "int8"
    threads: int | None = None     # intra-op threads; None = the cores of this worker's core set
    options: tuple[tuple[str, str], ...] = ()   # backend-specific key/values, e.g. ("sim_latency", "0.002+1e-6*tokens")

    def option(self, key: str, default: str | None = None) -> str | None:
        return dict(self.options).get(key, default)


@dataclasses.dataclass(frozen=True)
class ModelInputs:
    """One batch as the backend sees it. ``indices`` are QSL indices (only harness backends use them)."""

    indices: np.ndarray       # int64 [B]
    input_ids: np.ndarray     # int32 or int64 [B, L]
    input_mask: np.ndarray    # same dtype/shape
    segment_ids: np.ndarray   # same dtype/shape
    lengths: np.ndarray       # int32 [B], real (unpadded) length of each row

    @property
    def shape(self) -> tuple[int, int]:
        return self.input_ids.shape


def dummy_batch(rows: int, length: int, padded: bool = True) -> ModelInputs:
    """A ``[rows, length]`` batch of made-up tokens for warm-ups and timings. ``padded``: the last
    row is one token short (mask 0 there), so a model takes its masked attention path; unpadded
    (every mask 1) is the other path, which may pick another attention kernel."""
    ids = np.full((rows, length), 1000, np.int64) + np.arange(length, dtype=np.int64) % 7
    ids[:, 0] = 101
    mask = np.ones_like(ids)
    seg = np.zeros_like(ids)
    seg[:, length // 2:] = 1
    lengths = np.full(rows, length, np.int32)
    if padded and length > 1:
        mask[-1, -1] = ids[-1, -1] = seg[-1, -1] = 0
        lengths[-1] = length - 1
    return ModelInputs(np.zeros(rows, np.int64), ids, mask, seg, lengths)


@dataclasses.dataclass(frozen=True)
class BatchHint:
    """The backend's preferred batching, used by the coordinator unless the user overrides it."""

    max_batch: int = 64
    token_budget: int | None = None   # max sum of (batch rows x trimmed length); None = by batch size


class Backend(abc.ABC):
    """Base class of every backend (harness fakes included: they subclass this too)."""

    #: registry name
    name: str = "base"
    #: True when the backend needs the feature store (the oracle reads gold spans by QSL index)
    needs_features: bool = False
    #: False for harness backends that only look at the batch shape: the worker then skips the
    #: gather (zero-copy placeholder arrays of the right shape), which matters at 100k+ samples/s
    needs_tokens: bool = True

    def __init__(self, spec: BackendSpec) -> None:
        from distbert.backends.shapes import EXACT  # here: shapes imports this module

        self.spec = spec
        #: the batch shapes this backend will be given (``backends/shapes``); exact until the worker says
        self.shape_ladder: ShapeLadder = EXACT

    def set_shape_ladder(self, ladder: ShapeLadder) -> None:
        """The run's shape ladder, set by the worker after ``load()`` and before ``warmup()``: every
        batch ``run`` gets is then padded to one of ``ladder.shapes()`` (unless the ladder is exact).
        A GPU backend warms those shapes; the default only keeps the ladder."""
        self.shape_ladder = ladder

    @abc.abstractmethod
    def load(self) -> None:
        """Load the model onto the device. Raise :class:`distbert.errors.UserError` on bad input."""

    def attach_features(self, features: Any) -> None:  # noqa: B027 - optional hook: default does nothing
        """Give the backend the worker's feature store (only called when ``needs_features``)."""

    def warmup(self) -> None:
        """Run a few representative batches so the first timed batch is not slow. Default: one batch."""
        ids = np.zeros((1, 128), dtype=np.int32)
        ids[0, 0] = 101
        self.run(ModelInputs(np.zeros(1, np.int64), ids, np.ones_like(ids), np.zeros_like(ids),
                             np.full(1, 128, np.int32)))

    def warmup_batches(self) -> list[ModelInputs]:
        """Batches to run once *on every thread that will serve* before the worker says Ready, in
        place of :meth:`warmup` (a GPU keeps per-thread state: cuBLAS/cuDNN handles, attention
        plans, the current device). The worker runs them through its own threads, split over
        ``prepare``/``run_prepared`` as batches are (``engine/worker``). Default: none, and the
        worker calls :meth:`warmup` once instead."""
        return []

    def bind_thread(self) -> None:  # noqa: B027 - optional hook: default does nothing
        """Make the calling thread ready to drive this backend's device (CUDA: its current device,
        which is per thread). The worker calls it first thing on every thread that runs the backend."""

    @abc.abstractmethod
    def run(self, inputs: ModelInputs) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(start_logits, end_logits)``, float32 ``[B, L]`` each."""

    @property
    def overlap_prepare(self) -> bool:
        """True when ``prepare`` of the next batch overlapping ``run_prepared`` of this one pays (a GPU:
        host staging and the device copy next to device compute). Only then does the worker run a
        prepare thread: False (the default) keeps one compute thread, with no extra hand-off."""
        return False

    def prepare(self, inputs: ModelInputs) -> object:
        """Stage one: host-side work, and the start of the copy to the device. Default: ``inputs``."""
        return inputs

    def run_prepared(self, prepared: object) -> tuple[np.ndarray, np.ndarray]:
        """Stage two: what ``run`` returns, for what ``prepare`` returned. Default: ``run(prepared)``."""
        if not isinstance(prepared, ModelInputs):
            raise TypeError(f"{type(self).__name__}.run_prepared: expected what prepare() returned "
                            f"(ModelInputs), got {type(prepared).__name__}")
        return self.run(prepared)

    def batch_hint(self) -> BatchHint:
        return BatchHint()

    def info(self) -> dict[str, Any]:
        """What the backend really uses (provider, device, precision, model), for ``run.json``."""
        return {"backend": self.name, "device": self.spec.device, "precision": self.spec.precision,
                "model": self.spec.model}

    def close(self) -> None:  # noqa: B027 - optional hook: default does nothing
        """Release device memory. Safe to call twice."""
