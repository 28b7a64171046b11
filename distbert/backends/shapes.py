"""A bounded set of batch shapes: the ladder every batch's (rows, length) is rounded up to.

A GPU pays a first-use cost per input shape (cuDNN/cuBLAS plans, allocator growth, a graph
capture), so a run whose batches take hundreds of distinct ``[rows, length]`` shapes measures
those first uses instead of the model (issue 19). A :class:`ShapeLadder` rounds every batch up to
one of few shapes:

* lengths up to a multiple of :attr:`ShapeLadder.step`, capped at :attr:`ShapeLadder.max_length`;
* rows up to the next rung of :attr:`ShapeLadder.rows`.

The worker pads each batch with :meth:`ShapeLadder.pad` (dummy rows are one ``[CLS]`` token with
mask 1, so attention over them is well defined) and slices the outputs back to the real rows and
length. Rank 0's planner (``engine/dispatcher``) cuts Offline batches at ladder row counts, so
little is padded; :meth:`ShapeLadder.shapes` lists every shape a batch can take, which is what a
GPU backend warms before it says Ready.

Policy (:func:`resolve_ladder`): GPU backends (torch and onnxruntime on ``cuda``/``rocm``) use
a ladder by default, CPU backends keep exact trimming (``step`` 0, ``rows`` ()), and
``--shape-ladder N`` forces a step of N (0 = exact) on any backend. Rank 0 and every worker call
:func:`run_ladder` with the same run config and batching (a worker its own hint, rank 0 the ready
workers'; the same when the workers run one backend spec, as every run does), so they agree on the
ladder; nothing here imports torch.

Defaults, measured on the dev set (``bench/shape_ladder.py``, notes/gpu.md): length step 16 and
power-of-two rows plan the Offline dev set into 20 shapes with 5.5 % padding (step 32: 11 shapes,
9.4 %; exact: 43 shapes, 1.9 %), at 208 shapes to warm (step 32: 104).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from distbert.backends.base import BackendSpec, ModelInputs
from distbert.backends.graphs import batch_ladder

if TYPE_CHECKING:
    from distbert.config import RunConfig

#: the longest MLPerf BERT feature
MAX_LENGTH = 384
#: [CLS]: the one token of a dummy (padding) row
CLS_ID = 101
#: default length step of the GPU policy (measured: notes/gpu.md "Shape ladder (session 11)")
DEFAULT_STEP = 16
#: backends whose policy on a GPU is a ladder (the others keep exact trimming unless forced)
GPU_LADDER_BACKENDS = frozenset({"torch", "onnxruntime"})


def row_rungs(max_rows: int) -> tuple[int, ...]:
    """The default row ladder up to ``max_rows``: powers of two, with ``max_rows`` as the top rung
    (the CUDA-graph batch ladder's rungs, so a graph bucket is a ladder shape)."""
    return batch_ladder(max_rows)


@dataclasses.dataclass(frozen=True)
class ShapeLadder:
    """See the module docstring. ``ShapeLadder(0, ())`` is exact trimming (no padding beyond the
    longest real row of a batch, any row count)."""

    step: int                      # lengths rounded up to a multiple of step, capped at max_length; 0 = exact
    rows: tuple[int, ...]          # row counts a batch may have, ascending; () = any (exact)
    max_length: int = MAX_LENGTH
    token_budget: int | None = None   # max rows x length of a batch (a single row longer than it goes alone)

    def __post_init__(self) -> None:
        if self.step < 0:
            raise ValueError(f"ShapeLadder.step must be >= 0, got {self.step}")
        if self.max_length < 1:
            raise ValueError(f"ShapeLadder.max_length must be >= 1, got {self.max_length}")
        rows = tuple(int(r) for r in self.rows)
        if any(r < 1 for r in rows) or list(rows) != sorted(set(rows)):
            raise ValueError(f"ShapeLadder.rows must be distinct positive row counts, ascending; got {self.rows}")
        object.__setattr__(self, "rows", rows)
        if self.token_budget is not None and self.token_budget < 1:
            raise ValueError(f"ShapeLadder.token_budget must be >= 1 or None, got {self.token_budget}")

    @property
    def exact(self) -> bool:
        """True when nothing is rounded: lengths trimmed exactly, any row count."""
        return self.step == 0 and not self.rows

    @property
    def lengths(self) -> tuple[int, ...]:
        """Every ladder length (empty when lengths are exact)."""
        if not self.step:
            return ()
        out = list(range(self.step, self.max_length, self.step))
        return (*out, self.max_length)

    def length_for(self, n: int) -> int:
        """The ladder length for a batch whose longest real row is ``n`` tokens."""
        if not self.step:
            return int(n)
        if n > self.max_length:
            raise ValueError(f"a row of {n} tokens is longer than the shape ladder's longest ({self.max_length})")
        return min(self.max_length, -(-max(1, int(n)) // self.step) * self.step)

    def rows_for(self, n: int) -> int:
        """The smallest ladder row count >= ``n`` (``n`` itself when rows are exact)."""
        if not self.rows:
            return int(n)
        if n > self.rows[-1]:
            raise ValueError(f"a batch of {n} rows is larger than the shape ladder's largest ({self.rows[-1]})")
        return self.rows[int(np.searchsorted(self.rows, n))]

    def max_rows(self, length: int) -> int:
        """The most rows a batch whose ladder length is ``length`` may have: the largest rung whose
        rows x length fits the token budget (at least the smallest rung: a long row goes alone)."""
        if not self.rows:
            raise ValueError("max_rows: this ladder has no row rungs")
        if self.token_budget is None:
            return self.rows[-1]
        fit = [r for r in self.rows if r * length <= self.token_budget]
        return fit[-1] if fit else self.rows[0]

    def fit_rows(self, limit: int) -> int:
        """The largest rung <= ``limit`` (the smallest rung if none is; ``limit`` when rows are exact)."""
        if not self.rows:
            return int(limit)
        k = int(np.searchsorted(self.rows, limit, side="right"))
        return self.rows[max(0, k - 1)]

    def shapes_of(self, rows: np.ndarray, longest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vectorized ``(rows_for, length_for)`` of batches with ``rows`` rows whose longest real row
        is ``longest`` (int64 arrays). A batch above the largest rung counts at its own row count."""
        rows = np.asarray(rows, np.int64)
        width = np.asarray(longest, np.int64)
        if self.step:
            width = np.minimum(self.max_length, -(-np.maximum(width, 1) // self.step) * self.step)
        if self.rows:
            rungs = np.asarray(self.rows, np.int64)
            at = np.minimum(np.searchsorted(rungs, rows), len(rungs) - 1)
            rows = np.maximum(rungs[at], rows)
        return rows, width

    def shapes(self) -> list[tuple[int, int]]:
        """Every ``(rows, length)`` a batch can take under this ladder and its token budget, sorted:
        what a GPU backend must warm. Empty when either side is exact (nothing fixed to warm)."""
        if not self.step or not self.rows:
            return []
        return [(r, length) for length in self.lengths for r in self.rows if r <= self.max_rows(length)]

    def pad(self, inputs: ModelInputs) -> ModelInputs:
        """``inputs`` padded to its ladder shape: extra columns mask 0, extra (dummy) rows one [CLS]
        token with mask 1 and length 1. The caller slices outputs back to the real rows and length."""
        if self.exact:
            return inputs
        b, width = inputs.shape
        real = int(inputs.lengths.max()) if b else width
        rows, length = self.rows_for(b), self.length_for(real)
        if (rows, length) == (b, width):
            return inputs
        cols = min(width, length)
        dtype = inputs.input_ids.dtype

        def grown(a: np.ndarray) -> np.ndarray:
            out = np.zeros((rows, length), dtype=a.dtype)
            out[:b, :cols] = a[:, :cols]
            return out

        ids, mask, seg = grown(inputs.input_ids), grown(inputs.input_mask), grown(inputs.segment_ids)
        ids[b:, 0] = np.asarray(CLS_ID, dtype=dtype)
        mask[b:, 0] = 1
        indices = np.empty(rows, np.int64)
        indices[:b] = inputs.indices
        indices[b:] = inputs.indices[0] if b else 0      # a real index: harness backends read by index
        lengths = np.ones(rows, np.int32)
        lengths[:b] = inputs.lengths
        return ModelInputs(indices, ids, mask, seg, lengths)


EXACT = ShapeLadder(0, ())

#: what a GPU backend warms under exact trimming (no bounded set of shapes): the common ones
COMMON_SHAPES: tuple[tuple[int, int], ...] = ((8, 128), (32, 256), (8, 384))


def largest_first(shapes: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """``shapes`` without repeats, largest (rows x length, then rows) first: the order a warm-up runs
    them in, since an allocator's biggest block (ORT's arena, torch's caching allocator and graph
    pool) is sized by the first."""
    return sorted(set(shapes), key=lambda s: (-s[0] * s[1], -s[0]))


#: a shape summary lists the count per shape when at most this many distinct shapes ran
SHAPES_LISTED = 64


def shape_summary(counts: dict[tuple[int, int], int], tokens_run: int, tokens_real: int) -> dict[str, object]:
    """What run.json says of the shapes run: ``batch_shapes`` (distinct (rows, length) pairs),
    ``padding_fraction`` (padded tokens / tokens run), ``tokens_run``, ``tokens_padded``, and
    ``shapes`` ("RxL": batches) when at most :data:`SHAPES_LISTED` shapes ran."""
    padded = tokens_run - tokens_real
    out: dict[str, object] = {"batch_shapes": len(counts),
                              "padding_fraction": round(padded / tokens_run, 6) if tokens_run else 0.0,
                              "tokens_run": tokens_run, "tokens_padded": padded}
    if len(counts) <= SHAPES_LISTED:
        out["shapes"] = {f"{r}x{n}": c for (r, n), c in sorted(counts.items())}
    return out


def ladder_json(ladder: ShapeLadder) -> dict[str, object]:
    """``ladder`` as plain JSON values (what a worker's Ready and run.json carry)."""
    return {"step": ladder.step, "rows": list(ladder.rows), "max_length": ladder.max_length,
            "token_budget": ladder.token_budget}


def default_step(spec: BackendSpec) -> int:
    """The backend's policy without a ``--shape-ladder``: a ladder on a GPU, exact trimming elsewhere."""
    on_gpu = spec.device.lower().startswith(("cuda", "rocm"))
    return DEFAULT_STEP if on_gpu and spec.name in GPU_LADDER_BACKENDS else 0


def resolve_ladder(spec: BackendSpec, forced_step: int | None, max_rows: int,
                   token_budget: int | None) -> ShapeLadder:
    """The run's ladder: ``forced_step`` (``--shape-ladder``; None = the backend's policy), rows up
    to ``max_rows`` (the largest batch a worker takes), ``token_budget`` as the batching's."""
    step = default_step(spec) if forced_step is None else int(forced_step)
    if step == 0:
        return EXACT
    return ShapeLadder(step=step, rows=row_rungs(max_rows), max_length=MAX_LENGTH, token_budget=token_budget)


def run_ladder(cfg: RunConfig, max_batch: int, token_budget: int | None) -> ShapeLadder:
    """The ladder of run ``cfg`` for workers announcing ``max_batch`` rows and ``token_budget``
    (their batch hint; rank 0: the largest max batch and smallest budget of the ready workers):
    ``--max-batch`` and ``--token-budget`` bound them as they bound the batching."""
    b = cfg.batch
    rows = min(max_batch, b.max_batch) if b.max_batch else max_batch
    budget = b.token_budget if b.token_budget is not None else token_budget
    return resolve_ladder(cfg.backend, b.shape_ladder, rows, budget)
