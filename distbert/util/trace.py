"""Per-hop timestamps of a query's path, for ``bench/latency_timeline.py``. Off unless
``DISTBERT_TRACE`` names a folder: then every process of the run keeps ``(stage, key, aux, ns)``
rows in memory and writes them to ``<folder>/trace-<pid>.npy`` at exit.

Callers guard each mark with ``if trace.ON:`` (a global read: tens of nanoseconds when off).
Times are ``time.perf_counter_ns()``: CLOCK_MONOTONIC on Linux, one clock for every process of a
host, so rank 0's and a local worker's marks subtract directly.
"""

from __future__ import annotations

import atexit
import os
import time
from pathlib import Path

from distbert import envs

#: the stages, in the order a query passes them; ``key`` is the LoadGen response id for the first
#: two and the batch id for the rest (``send`` carries the batch's first response id in ``aux``, rank
#: 0's ``recv`` the sending worker, ``complete`` the batch's sample count)
STAGES = ("issue", "drain", "send", "w_recv", "w_start", "w_end", "w_send", "recv", "complete")
_CODE = {name: i for i, name in enumerate(STAGES)}

_folder = envs.trace_dir()
ON = _folder is not None
_rows: list[tuple[int, int, int, int]] = []


def mark(stage: str, key: int, aux: int = 0) -> None:
    _rows.append((_CODE[stage], key, aux, time.perf_counter_ns()))


def _dump() -> None:
    if not _rows or _folder is None:
        return
    import numpy as np

    np.save(Path(_folder) / f"trace-{os.getpid()}.npy", np.array(_rows, dtype=np.int64))


if ON:
    atexit.register(_dump)
