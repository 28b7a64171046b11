"""Batch policy: default CPU batching and start-up calibration (for ``--batch auto``).

:func:`cpu_batch_hint` is the default every CPU backend returns from ``batch_hint()``.
:func:`calibrate` times a loaded backend on synthetic batches of a typical length (the median of
a sample of real lengths) at growing batch sizes and picks the *knee*: the smallest batch whose
throughput is within ``tolerance`` of the best seen. Larger batches past the knee only add latency
(Server) and padding (Offline tails). The result is a :class:`BatchHint`:

* ``token_budget`` = knee batch x typical length (the coordinator cuts length-sorted batches by
  tokens, so short samples get more rows and long ones fewer);
* ``max_batch`` = the row count that budget allows at the short end of the sample (10th
  percentile length), so short batches are not capped below the budget.

It is bounded in time (``time_budget_s``, default 20 s): it stops growing the batch once
throughput falls or a step would overrun the budget, and returns the backend's own hint if even
batch 1 does not fit.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

import numpy as np

from distbert.backends.base import Backend, BatchHint, ModelInputs

log = logging.getLogger(__name__)


def usable_cores() -> int:
    """Cores this process may run on (its affinity set, e.g. one socket), not the whole machine."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:        # macOS, Windows
        return os.cpu_count() or 1


def cpu_batch_hint(threads: int) -> BatchHint:
    """Default CPU batching: about 512 tokens per thread, between 1024 and 16384 tokens.

    On CPUs the cost per token is nearly flat in the batch size, and grows again once a batch's
    activations fall out of cache (measured for BERT-base on 2 cores: 1.3-1.5 ms/token up to
    ~1400 tokens, 1.7-2.0 ms/token at 2700; notes/backends.md). Batching only has to give every
    thread enough rows; :func:`calibrate` measures the real knee.
    """
    return BatchHint(max_batch=min(64, max(8, 4 * threads)),
                     token_budget=min(16384, max(1024, 512 * threads)))


def synthetic_batch(batch: int, length: int) -> ModelInputs:
    """A full batch of one length: [CLS] tokens... [SEP], mask all ones, second half segment 1."""
    ids = np.full((batch, length), 2000, np.int64)
    ids[:, 0], ids[:, -1] = 101, 102
    segments = np.zeros_like(ids)
    segments[:, length // 2:] = 1
    return ModelInputs(np.arange(batch, dtype=np.int64), ids, np.ones_like(ids), segments,
                       np.full(batch, length, np.int32))


def _throughput(backend: Backend, batch: int, length: int, min_time_s: float) -> float:
    """Samples/s at ``[batch, length]``: one untimed run, then repeat until ``min_time_s`` passes."""
    inputs = synthetic_batch(batch, length)
    backend.run(inputs)
    runs, start = 0, time.perf_counter()
    while True:
        backend.run(inputs)
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time_s or runs >= 20:
            return runs * batch / elapsed


def calibrate(backend: Backend, lengths_sample: Sequence[int] | np.ndarray, *, max_batch: int = 512,
              tolerance: float = 0.05, time_budget_s: float = 20.0, min_time_s: float = 0.3) -> BatchHint:
    """Measure ``backend`` (already loaded) and return the batching to use. See module docstring."""
    lengths = np.asarray(lengths_sample, dtype=np.int64)
    default = backend.batch_hint()
    if lengths.size == 0:
        return default
    typical = int(np.clip(np.median(lengths), 1, 384))
    short = int(np.clip(np.percentile(lengths, 10), 1, typical))
    deadline = time.perf_counter() + time_budget_s
    rates: dict[int, float] = {}
    batch, step_s = 1, 0.0
    while batch <= max_batch:
        # a step costs about (runs x per-batch time); stop before one would overrun the budget
        if rates and time.perf_counter() + 2.2 * step_s > deadline:
            break
        t0 = time.perf_counter()
        rates[batch] = _throughput(backend, batch, typical, min_time_s)
        step_s = time.perf_counter() - t0
        log.info("calibrate: batch %d x %d tokens -> %.1f samples/s", batch, typical, rates[batch])
        best = max(rates.values())
        if rates[batch] < best * (1 - tolerance) and batch > 2:
            break                          # past the peak: bigger only gets slower
        batch *= 2
    if not rates:
        return default
    best = max(rates.values())
    knee = min(b for b, r in rates.items() if r >= best * (1 - tolerance))
    budget = knee * typical
    hint = BatchHint(max_batch=max(knee, min(max_batch, budget // short)), token_budget=budget)
    log.info("calibrate: knee at batch %d (%.1f samples/s at %d tokens) -> %s", knee, rates[knee], typical, hint)
    return hint
