"""One PNG per scenario of a submission: the latency distribution LoadGen measured (with the bound
or the percentile the result is judged by) and each worker's throughput over time."""

from __future__ import annotations

import json
from pathlib import Path

from distbert.data.loadgen_logs import read_detail

_PERCENTILES = (50.0, 90.0, 95.0, 97.0, 99.0, 99.9)


def plot_scenario(run_dir: Path, out: Path, version: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    record = json.loads((run_dir / "run.json").read_text())
    scenario = record["config"]["loadgen"]["scenario"]
    detail = read_detail(run_dir / "performance" / "mlperf_log_detail.txt")
    pts = [(p, detail.get(f"result_{p:.2f}_percentile_latency_ns")) for p in _PERCENTILES]
    pts = [(p, v / 1e6) for p, v in pts if v is not None]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    xs = list(range(len(pts)))  # percentiles evenly spaced: the tail is what matters
    if pts:
        ax1.plot(xs, [v for _, v in pts], "o-", color="tab:blue", label="latency")
        for x, (_, v) in zip(xs, pts):
            ax1.annotate(f"{v:.2f}", (x, v), textcoords="offset points", xytext=(0, 6), fontsize=7, ha="center")
    if scenario == "Server" and detail.get("effective_target_latency_ns"):
        ax1.axhline(detail["effective_target_latency_ns"] / 1e6, color="tab:red", ls="--",
                    label=f"bound (p{detail.get('effective_target_latency_percentile', 99)})")
    if scenario == "SingleStream" and detail.get("early_stopping_latency_ss"):
        ax1.axhline(detail["early_stopping_latency_ss"] / 1e6, color="tab:green", ls="--",
                    label="result: early-stopping p90")
    ax1.set_xticks(xs, [f"p{p:g}" for p, _ in pts], fontsize=8)
    ax1.set_ylabel("latency [ms]")
    what = "one query of every sample: its latency is the run's length" if scenario == "Offline" else "per query"
    ax1.set_title(f"{scenario} latency percentiles ({what})", fontsize=9)
    ax1.legend(fontsize=7)
    timeline = ((record.get("results", {}).get("performance") or {}).get("dispatcher") or {}).get("timeline") or {}
    bin_s = timeline.get("bin_s") or 1.0
    for worker, row in sorted((timeline.get("workers") or {}).items(), key=lambda kv: int(kv[0])):
        ax2.plot([i * bin_s for i in range(len(row))], [k / bin_s for k in row], ".-", lw=1, ms=3,
                 drawstyle="steps-post", label=f"worker {worker}")
    ax2.set_xlabel("seconds since the first result")
    ax2.set_ylabel("samples/s")
    ax2.set_title("throughput per worker (performance run)", fontsize=9)
    if timeline.get("workers"):
        ax2.legend(fontsize=7)
    perf = record.get("results", {}).get("performance") or {}
    fig.suptitle(f"{version} {scenario}: LoadGen {perf.get('result_validity')}, backend "
                 f"{record['config']['backend']['name']}, {len(record.get('workers', []))} worker(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
