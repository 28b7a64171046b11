"""Plots of a finished run (PNG, beside ``run.json``): what people would rather see than read.

``workers.png``: samples and busy time per worker for each mode - shows at a glance whether the
pull-based balancing kept every worker busy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_run(record: dict[str, Any], out: Path) -> Path | None:
    workers = [w for w in record.get("workers", []) if w.get("stats")]
    if not workers:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{w['worker']}\n{w['host']}" for w in workers]
    samples = [w["stats"].get("samples", 0) for w in workers]
    busy = [w["stats"].get("compute_s", 0.0) for w in workers]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(6, 0.6 * len(workers) + 4), 3.6))
    ax1.bar(range(len(workers)), samples, color="tab:blue")
    ax1.set_title("samples per worker (all modes)")
    ax2.bar(range(len(workers)), busy, color="tab:orange")
    ax2.set_title("backend busy time per worker [s]")
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(workers)), labels, fontsize=7)
        ax.set_xlabel("worker / host")
    cfg = record["config"]
    fig.suptitle(f"{cfg['loadgen']['scenario']} {cfg['loadgen']['mode']}, backend {cfg['backend']['name']}")
    fig.tight_layout()
    path = out / "workers.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
