"""Harness backends: they measure and prove the harness, not a model.

* ``null``   - zeros, instantly: the ceiling of the harness itself.
* ``oracle`` - logits that point at each feature's gold answer span (from the feature cache), so an
  accuracy run proves every response reached the right sample: its F1 must equal the F1 of the same
  logits scored directly. Option ``oracle_latency`` (the ``sim`` latency model) makes it sleep per
  batch too: long rule-abiding runs (600 s, TEST01) of the whole pipeline without a model. Option
  ``oracle_wrong_after=N`` makes it a worker that goes bad: from its (N+1)-th sample in the process
  on, answers point at [CLS] (no answer) and the first logit's first byte changes, as a flaky device
  would; the tests use it to fail one TEST01 run for real (N = the samples of the runs before it).
* ``sim``    - sleeps per batch by a latency model ``a + b*tokens + c*rows`` (seconds), to study
  scaling without hardware. ``tokens`` = rows x trimmed length of the batch.
"""

from __future__ import annotations

import re
import time
from typing import Any

import numpy as np

from distbert.backends.base import Backend, BackendSpec, BatchHint, ModelInputs
from distbert.errors import UserError


class NullBackend(Backend):
    name = "null"
    needs_tokens = False

    def load(self) -> None:
        pass

    def warmup(self) -> None:
        pass

    def run(self, inputs: ModelInputs) -> tuple[np.ndarray, np.ndarray]:
        # measuring the harness: np.zeros is calloc (large ones are untouched fresh pages), and about
        # 4 us cheaper than a zero-stride broadcast_to view for one sample
        zeros = np.zeros(inputs.input_ids.shape, np.float32)
        return zeros, zeros

    def batch_hint(self) -> BatchHint:
        return BatchHint(max_batch=1024, token_budget=None)


class OracleBackend(Backend):
    name = "oracle"
    needs_features = True
    needs_tokens = False

    HIGH = 10.0
    LOW = -10.0

    def __init__(self, spec: BackendSpec) -> None:
        super().__init__(spec)
        self._start: np.ndarray | None = None
        self._end: np.ndarray | None = None
        text = spec.option("oracle_latency")
        self._latency = parse_latency_model(text) if text else (0.0, 0.0, 0.0)
        wrong = spec.option("oracle_wrong_after")
        try:
            self._wrong_after = int(wrong) if wrong else None
        except ValueError:
            raise UserError(f"--option oracle_wrong_after={wrong}: give a number of samples") from None
        self._seen = 0

    def load(self) -> None:
        pass

    def attach_features(self, features: Any) -> None:
        self._start = np.asarray(features.oracle_start)
        self._end = np.asarray(features.oracle_end)

    def warmup(self) -> None:
        pass

    def run(self, inputs: ModelInputs) -> tuple[np.ndarray, np.ndarray]:
        if self._start is None or self._end is None:
            raise RuntimeError("oracle backend used before attach_features()")
        if any(self._latency):
            rows, length = inputs.input_ids.shape
            a, b, c = self._latency
            time.sleep(a + b * rows * length + c * rows)
        start, end = oracle_logits(inputs.indices, inputs.input_ids.shape[1], self._start, self._end)
        first, self._seen = self._seen, self._seen + len(inputs.indices)
        if self._wrong_after is not None and self._seen > self._wrong_after:
            bad = slice(max(0, self._wrong_after - first), None)
            start[bad] = self.LOW
            start[bad, 0] = np.nextafter(np.float32(self.HIGH), np.float32(np.inf))  # another first byte
        return start, end

    def batch_hint(self) -> BatchHint:
        return BatchHint(max_batch=1024, token_budget=None)


def oracle_logits(indices: np.ndarray, length: int, gold_start: np.ndarray,
                  gold_end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``[B, length]`` peaking at the gold start/end token of each feature.

    A feature without the answer in its window (gold position -1) peaks at position 0 ([CLS]),
    which post-processing rejects, exactly as a real model that "sees no answer here" would.
    """
    rows = np.arange(len(indices))
    start = np.full((len(indices), length), OracleBackend.LOW, dtype=np.float32)
    end = start.copy()
    s = np.clip(gold_start[indices], 0, length - 1)
    e = np.clip(gold_end[indices], 0, length - 1)
    start[rows, s] = OracleBackend.HIGH
    end[rows, e] = OracleBackend.HIGH
    return start, end


_TERM = re.compile(r"^\s*([0-9.eE+-]+)\s*(?:\*\s*(tokens|rows))?\s*$")


def parse_latency_model(text: str) -> tuple[float, float, float]:
    """``"0.002 + 6e-7*tokens + 1e-5*rows"`` -> ``(a, b, c)``; terms in any order, each optional."""
    a = b = c = 0.0
    # split on '+' that is not part of an exponent (1e+3)
    for term in re.split(r"(?<![eE])\+", text):
        match = _TERM.match(term)
        if not match:
            raise UserError(f"--sim-latency {text!r}: cannot read term {term.strip()!r}; "
                            "write e.g. '0.002 + 6e-7*tokens + 1e-5*rows' (seconds)")
        value, unit = float(match.group(1)), match.group(2)
        if unit == "tokens":
            b += value
        elif unit == "rows":
            c += value
        else:
            a += value
    if min(a, b, c) < 0:
        raise UserError(f"--sim-latency {text!r}: terms must not be negative")
    return a, b, c


class SimBackend(Backend):
    name = "sim"
    needs_tokens = False

    def __init__(self, spec: BackendSpec) -> None:
        super().__init__(spec)
        self.a, self.b, self.c = parse_latency_model(spec.option("sim_latency", "0.001 + 1e-6*tokens") or "")
        self.max_batch = int(spec.option("sim_max_batch", "256") or 256)

    def load(self) -> None:
        pass

    def warmup(self) -> None:
        pass

    def run(self, inputs: ModelInputs) -> tuple[np.ndarray, np.ndarray]:
        rows, length = inputs.input_ids.shape
        # sleep, never spin: scaling studies run dozens of sim workers on a few cores
        time.sleep(self.a + self.b * rows * length + self.c * rows)
        zeros = np.broadcast_to(np.float32(0), (rows, length))
        return zeros, zeros

    def batch_hint(self) -> BatchHint:
        return BatchHint(max_batch=self.max_batch, token_budget=None)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "latency_model_s": {"a": self.a, "b_per_token": self.b, "c_per_row": self.c}}
