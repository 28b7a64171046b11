"""Completing LoadGen queries: one ``QuerySamplesComplete`` call per finished batch."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from itertools import repeat
from typing import Any

import numpy as np


def _drain(items: Iterator[Any]) -> None:
    """Consume an iterator for its side effects (in C), storing nothing."""
    deque(items, maxlen=0)


class Completer:
    """Turns a finished batch into one ``QuerySamplesComplete`` call.

    Data-less responses are recycled: LoadGen copies the list into a std::vector inside
    QuerySamplesComplete, so after it returns the objects are free again. Setting ``.id`` costs
    about a third of constructing a response (0.47 vs 1.39 us here), and at 300k+ samples/s
    building responses is rank 0's largest cost.
    """

    def __init__(self) -> None:
        import mlperf_loadgen as lg

        self._response = lg.QuerySampleResponse
        self._complete = lg.QuerySamplesComplete
        self._pool: list[Any] = []

    def complete(self, ids: np.ndarray, logits: np.ndarray | None) -> None:
        Response = self._response
        if logits is None or logits.size == 0:
            n = len(ids)
            pool = self._pool
            if len(pool) < n:
                pool.extend(Response(0, 0, 0) for _ in range(n - len(pool)))
            responses = pool[:n]
            # map(setattr) runs the loop in C: ~190 ns a sample against ~250 for a Python for-loop here
            _drain(map(setattr, responses, repeat("id"), ids.tolist()))
        else:
            logits = np.ascontiguousarray(logits, dtype=np.float32)
            base = logits.ctypes.data
            stride = logits.strides[0]
            responses = [Response(i, base + k * stride, stride) for k, i in enumerate(ids.tolist())]
        # `logits` stays referenced until this call returns: LoadGen copies what it logs.
        self._complete(responses)
