"""Model inputs for the backend tests, shaped as a worker builds them, and the base of the worker
tests' stand-in backends (no optional imports here: tests/test_torch_graphs.py uses them where onnx
is absent, e.g. the GPU machine)."""

from __future__ import annotations

import numpy as np

from distbert.backends.base import Backend, BackendSpec, ModelInputs


def batch(lengths=(40, 25, 33, 12), seed: int = 7, pad_to: int | None = None) -> ModelInputs:
    """A worker-style batch: int32, trimmed to the longest real length (or padded to ``pad_to``)."""
    rng = np.random.default_rng(seed)
    width = pad_to or max(lengths)
    ids = np.zeros((len(lengths), width), np.int32)
    mask = np.zeros_like(ids)
    seg = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1000, 30000, n)
        ids[i, 0], ids[i, n - 1] = 101, 102
        mask[i, :n] = 1
        seg[i, n // 3:n] = 1
    return ModelInputs(np.arange(len(lengths), dtype=np.int64), ids, mask, seg, np.asarray(lengths, np.int32))


class StandInBackend(Backend):
    """The base of the worker tests' stand-in backends: loads nothing; ``overlaps`` says whether the
    worker pipelines it (a prepare thread ahead of the compute thread) or not."""

    def __init__(self, spec: BackendSpec, overlaps: bool = True) -> None:
        super().__init__(spec)
        self.overlaps = overlaps

    @property
    def overlap_prepare(self) -> bool:
        return self.overlaps

    def load(self) -> None:
        pass
