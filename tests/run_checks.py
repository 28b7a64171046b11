"""What every multi-process run test checks when its run should have survived: rank 0 exits 0, its
workers end, no process of the run outlives it, and LoadGen's accuracy log answers every sample
exactly once. Shared by ``test_engine_recovery`` (loopback) and ``test_cluster_netns`` (namespaces)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable
from pathlib import Path

from tests.test_engine_mp import _assert_none_outlived


def finished_run(rank0: subprocess.Popen, workers: Iterable[subprocess.Popen], rank0_log: str | Path, tag: str,
                 out: Path, n: int, timeout: float) -> dict:
    """Wait for the run to end and check it as above; its ``run.json`` record."""
    rc = rank0.wait(timeout)
    assert rc == 0, f"rank 0 exit {rc}:\n{Path(rank0_log).read_text(errors='replace')[-4000:]}"
    for p in workers:
        p.wait(30)
    _assert_none_outlived(tag)
    entries = json.loads((out / "accuracy" / "mlperf_log_accuracy.json").read_text())
    assert sorted(e["qsl_idx"] for e in entries) == list(range(n))   # every sample exactly once
    return json.loads((out / "run.json").read_text())
