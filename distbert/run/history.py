"""``--target-qps auto`` / ``--target-latency-ms auto``: LoadGen targets from earlier runs.

The results directory (the folder that holds ``--output``, else ``results/``) is the memory: each
run left a ``run.json``. The newest *comparable* run (same backend, model, device, precision and
worker set-up) gives the target:

* Offline: its measured samples/s (from an Offline run);
* Server: the target of its newest VALID Server run; after an INVALID one, 0.9 x that target; with
  no Server run yet, 0.8 x the Offline samples/s;
* SingleStream: its measured p90 latency (from a SingleStream run), as the expected latency.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from distbert.errors import UserError
from distbert.run.loadgen import TEST_SERVER_QPS  # a test-mode Server run without --target-qps

log = logging.getLogger(__name__)

#: the parts of a run's config that make two runs comparable
_SAME = ("workers", "expect_workers", "in_process_worker", "coordinator_hosts_worker", "transport")
_SAME_BACKEND = ("name", "model", "device", "precision")


def _key(config: dict[str, Any], world_size: int) -> tuple:
    backend = config.get("backend", {})
    return (tuple(config.get(k) or None for k in _SAME), tuple(backend.get(k) for k in _SAME_BACKEND), world_size)


def _runs(results: Path) -> list[tuple[float, Path, dict[str, Any]]]:
    out = []
    for path in results.glob("*/run.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a run being written, or not ours
        if isinstance(record, dict) and record.get("distbert_run") == 1:
            out.append((path.stat().st_mtime, path.parent, record))
    return sorted(out, key=lambda r: r[0], reverse=True)


def comparable(results: Path, config: dict[str, Any], world_size: int, scenario: str) -> list[tuple[Path, dict]]:
    """Runs of ``scenario`` under ``results`` made like ``config`` would be, newest first, with a
    performance result."""
    want = _key(config, world_size)
    found = []
    for _, run_dir, record in _runs(results):
        cfg = record.get("config", {})
        perf = record.get("results", {}).get("performance")
        if (cfg.get("loadgen", {}).get("scenario") == scenario and perf
                and _key(cfg, record.get("topology", {}).get("world_size", 1)) == want):
            found.append((run_dir, record))
    return found


def _no_history(flag: str, results: Path, need: str) -> UserError:
    return UserError(f"{flag} auto: no earlier comparable run under {results}/ (same backend, model, device, "
                     f"precision, workers, in-process worker or not) with {need}: run once with a number (e.g. a "
                     "short test-mode run), then auto takes it from there")


def auto_target_qps(results: Path, config: dict[str, Any], world_size: int) -> tuple[float, str]:
    """(target qps, where it came from) for the run ``config`` describes."""
    scenario = config["loadgen"]["scenario"]
    if scenario == "Server":
        for run_dir, record in comparable(results, config, world_size, "Server"):
            lg = record["config"]["loadgen"]
            target = lg.get("target_qps") or (TEST_SERVER_QPS if lg.get("execution_mode") == "test" else None)
            if not target:
                continue
            if record["results"]["performance"].get("result_validity") == "VALID":
                return float(target), f"the VALID Server run {run_dir.name} at {target:g} QPS"
            return 0.9 * float(target), f"0.9 x {target:g} QPS of the INVALID Server run {run_dir.name}"
    if scenario in ("Server", "Offline"):
        for run_dir, record in comparable(results, config, world_size, "Offline"):
            rate = record["results"]["performance"].get("result_samples_per_second")
            if rate:
                share = 0.8 if scenario == "Server" else 1.0
                why = f"{share:g} x {float(rate):,.1f} samples/s of the Offline run {run_dir.name}"
                return share * float(rate), why
        raise _no_history("--target-qps", results, "an Offline or Server performance result")
    raise UserError(f"--target-qps is for Offline and Server, not {scenario}")


def auto_latency_ms(results: Path, config: dict[str, Any], world_size: int) -> tuple[float, str]:
    """(SingleStream expected latency in ms, where it came from)."""
    scenario = config["loadgen"]["scenario"]
    if scenario != "SingleStream":
        raise UserError("--target-latency-ms auto is for SingleStream (the expected latency)")
    for run_dir, record in comparable(results, config, world_size, "SingleStream"):
        p90 = record["results"]["performance"].get("result_90.00_percentile_latency_ns")
        if p90:
            return float(p90) / 1e6, f"the p90 latency of the SingleStream run {run_dir.name}"
    raise _no_history("--target-latency-ms", results, "a SingleStream performance result")
