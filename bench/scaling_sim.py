"""Scaling study without hardware: the `sim` backend sleeping per batch by a latency model of one
NVIDIA H200, at 1..64 workers, through the real distbert path (rank 0 + N worker processes over
ZeroMQ, real LoadGen). THIS IS A SIMULATION: workers sleep instead of computing.

Latency model (default): t(batch) = 5 ms + 0.61 us x tokens, tokens = rows x trimmed length. With
length-sorted Offline batches of 1280 (mean real length 178.5) that is ~8,900 samples/s per
worker, close to NVIDIA's published ~9,200 samples/s per H200 (TensorRT, batch 1280).

Offline: throughput at N workers vs N x (1 worker); each worker gets --batches-per-worker batches.
Server: the highest VALID QPS (LoadGen verdict, 130 ms p99) by a short bisection at each N.

    .venv/bin/python bench/scaling_sim.py [--workers 1,2,4,8,16,32,64] [--server-workers 1,2,4,8,16]

Writes bench/results/scaling_sim.json and bench/results/scaling_sim.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from distbert.data.loadgen_logs import read_detail  # noqa: E402 - the repo root is put on sys.path above

MODEL = "0.005 + 6.1e-7*tokens"


def run(n: int, scenario: str, args: argparse.Namespace, qps: float = 0.0) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "distbert", "run", "--backend", "sim", "--sim-latency", args.model,
               "--workers", str(n), "--scenario", scenario, "--output", str(out), "--credits", str(args.credits),
               "--ready-timeout", "600"]
        if scenario == "Offline":
            samples = max(10833, n * args.batches_per_worker * args.offline_batch)
            cmd += ["--max-batch", str(args.offline_batch), "--option", f"sim_max_batch={args.offline_batch}",
                    "--test-query-count", str(samples)]
        else:
            count = int(qps * args.server_duration_ms / 1000 * 1.15) + 200  # > min duration needs
            cmd += ["--max-batch", str(args.server_batch), "--option", f"sim_max_batch={args.server_batch}",
                    "--max-wait-ms", str(args.max_wait_ms), "--target-qps", str(qps),
                    "--test-query-count", str(count), "--min-duration-ms", str(args.server_duration_ms)]
        env = dict(os.environ, DISTBERT_NO_PROGRESS="1", DISTBERT_LOG_LEVEL="WARNING")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"distbert failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
        return read_detail(out / "performance" / "mlperf_log_detail.txt")


def server_search(n: int, args: argparse.Namespace, lo: float, hi: float) -> float:
    best = 0.0
    for _ in range(args.steps):
        mid = (lo + hi) / 2
        d = run(n, "Server", args, mid)
        ok = d.get("result_validity") == "VALID"
        print(f"      N={n:>3} {mid:>10,.0f} qps -> {d.get('result_validity')} "
              f"p99={d.get('result_99.00_percentile_latency_ns', 0) / 1e6:.1f} ms", flush=True)
        if ok:
            best, lo = mid, mid
        else:
            hi = mid
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2,4,8,16,32,64")
    ap.add_argument("--server-workers", default="1,2,4,8,16")
    ap.add_argument("--model", default=MODEL, help="sim latency model (seconds)")
    ap.add_argument("--offline-batch", type=int, default=1280)
    ap.add_argument("--batches-per-worker", type=int, default=6)
    ap.add_argument("--server-batch", type=int, default=128)
    ap.add_argument("--max-wait-ms", type=float, default=20.0)
    ap.add_argument("--server-duration-ms", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--credits", type=int, default=2)
    ap.add_argument("--offline-base", type=float, help="1-worker Offline samples/s from an earlier run (skip N=1)")
    ap.add_argument("--server-base", type=float, help="1-worker Server QPS from an earlier run (skip N=1)")
    ap.add_argument("--json", default="scaling_sim", help="result file stem under bench/results/")
    args = ap.parse_args()
    res: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                 "model": args.model, "offline": [], "server": []}
    print(f"Offline (sim model {args.model}, batch {args.offline_batch})", flush=True)
    base = args.offline_base
    for n in [int(x) for x in args.workers.split(",") if x]:
        d = run(n, "Offline", args)
        thr = float(d["result_samples_per_second"])
        base = base or thr
        res["offline"].append({"workers": n, "samples_per_s": thr, "efficiency": thr / (n * base)})
        print(f"  N={n:>3}: {thr:>10,.0f} samples/s  efficiency {thr / (n * base):6.1%}", flush=True)
    print(f"Server (sim model, max batch {args.server_batch}, max wait {args.max_wait_ms} ms)", flush=True)
    single = args.server_base
    for n in [int(x) for x in args.server_workers.split(",") if x]:
        if single is None:
            qps = server_search(n, args, 500.0, 12000.0)
            single = qps
        else:
            qps = server_search(n, args, 0.5 * n * single, 1.1 * n * single)
        res["server"].append({"workers": n, "qps": qps, "efficiency": qps / (n * single) if single else 0})
        print(f"  N={n:>3}: {qps:>10,.0f} QPS VALID  efficiency {qps / (n * single):6.1%}", flush=True)
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / f"{args.json}.json").write_text(json.dumps(res, indent=2) + "\n")
    _plot(res, out / f"{args.json}.png")
    print("\n| workers | Offline samples/s | Offline efficiency | Server VALID QPS | Server efficiency |")
    print("|---:|---:|---:|---:|---:|")
    srv = {r["workers"]: r for r in res["server"]}
    for r in res["offline"]:
        s = srv.get(r["workers"])
        print(f"| {r['workers']} | {r['samples_per_s']:,.0f} | {r['efficiency']:.1%} | "
              + (f"{s['qps']:,.0f} | {s['efficiency']:.1%} |" if s else "- | - |"))


def _plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for key, metric, label, a in (("offline", "samples_per_s", "Offline samples/s", ax[0]),
                                  ("server", "qps", "Server VALID QPS", ax[1])):
        rows = res[key]
        if not rows:
            continue
        n = [r["workers"] for r in rows]
        v = [r[metric] for r in rows]
        ideal = [rows[0][metric] * k / rows[0]["workers"] for k in n]
        a.plot(n, v, "o-", label="distbert (sim)")
        a.plot(n, ideal, "--", color="grey", label="ideal N x 1 worker")
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xlabel("workers (simulated H200s)")
        a.set_title(label)
        a.legend()
    fig.suptitle(f"Scaling simulation, sim latency {res['model']} s ({res['machine']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
