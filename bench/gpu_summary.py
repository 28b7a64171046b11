#!/usr/bin/env python3
"""Summarize the ``distbert run`` directories under one folder (used by ``bench/gpu_check.sh``).

For every run directory holding ``performance/mlperf_log_detail.txt`` it prints a Markdown row:
scenario, samples/s (Offline: ``result_samples_per_second``; Server: completed samples/s), p99
and mean latency, LoadGen's validity verdict and error count, parsing LoadGen's ``:::MLLOG`` lines
with :func:`distbert.data.loadgen_logs.read_detail`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from distbert.data.loadgen_logs import read_detail as _read_detail


def read_detail(path: Path) -> dict:
    out = _read_detail(path)
    out["errors"] = len(out.pop("_errors", []))
    return out


def _ms(ns) -> str:
    return f"{float(ns) / 1e6:.1f}" if ns is not None else "-"


def main(root: str) -> int:
    rows = []
    for detail_path in sorted(Path(root).glob("*/performance/mlperf_log_detail.txt")):
        d = read_detail(detail_path)
        scenario = d.get("effective_scenario") or d.get("requested_scenario") or "?"
        rate = (d.get("result_samples_per_second") if scenario == "Offline"
                else d.get("result_completed_samples_per_sec"))
        if scenario == "SingleStream":
            rate = d.get("result_qps_with_loadgen_overhead") or d.get("result_samples_per_second")
        busy = None
        try:  # rank 0's CPU use during the test, in cores (run.json; absent in older runs)
            record = json.loads((detail_path.parent.parent / "run.json").read_text())
            busy = record["results"]["performance"].get("rank0_cores_busy")
        except (OSError, ValueError, KeyError):
            pass
        rows.append((detail_path.parent.parent.name, scenario, rate, d.get("result_90.00_percentile_latency_ns"),
                     d.get("result_99.00_percentile_latency_ns"), d.get("result_mean_latency_ns"),
                     d.get("result_validity"), d["errors"], busy))
    if not rows:
        print(f"no run directories with performance/mlperf_log_detail.txt under {root}", file=sys.stderr)
        return 1
    print("| run | scenario | samples/s | p90 latency ms | p99 latency ms | mean latency ms | LoadGen verdict "
          "| errors | rank 0 cores busy |")
    print("|---|---|---:|---:|---:|---:|---|---:|---:|")
    for name, scenario, rate, p90, p99, mean, validity, errors, busy in rows:
        rate_s = f"{float(rate):.1f}" if rate is not None else "-"
        busy_s = f"{busy:.2f}" if busy is not None else "-"
        print(f"| {name} | {scenario} | {rate_s} | {_ms(p90)} | {_ms(p99)} | {_ms(mean)} | {validity or '-'} "
              f"| {errors} | {busy_s} |")
    _bare_vs_distbert(Path(root), {r[0]: r for r in rows})
    return 0


def _bare_vs_distbert(root: Path, rows: dict) -> None:
    """bench/ss_bare.py's floor (ss-bare-<precision>.json) beside the SingleStream runs of the same
    precision: what distbert adds to a query on this hardware."""
    for bare_path in sorted(root.glob("ss-bare-*.json")):
        bare = json.loads(bare_path.read_text())
        precision = bare_path.stem.removeprefix("ss-bare-")
        if precision.startswith("thread-"):
            print(f"\nSingleStream, {precision.removeprefix('thread-')}: bare loop on a second thread p50 "
                  f"{bare['p50_ms']:.3f} / p90 {bare['p90_ms']:.3f} ms (main thread: above)")
            continue
        print(f"\nSingleStream, {precision}: bare loop (bench/ss_bare.py) p50 {bare['p50_ms']:.3f} / "
              f"p90 {bare['p90_ms']:.3f} ms, {bare['queries']} queries")
        for run in (f"singlestream-inprocess-{precision}", f"singlestream-{precision}"):
            row = rows.get(run)
            if row is None or row[3] is None:
                continue
            p90 = float(row[3]) / 1e6
            print(f"  {run}: p90 {p90:.3f} ms, distbert adds {p90 - bare['p90_ms']:+.3f} ms "
                  f"({(p90 / bare['p90_ms'] - 1) * 100:+.1f} %)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: gpu_summary.py RESULTS_DIR")
    sys.exit(main(sys.argv[1]))
