"""How much does distribution cost? Python LoadGen's ceiling vs distbert with the null backend.

(a) the fastest in-process Python SUT: LoadGen's ConstructFastSUT completing every sample at once,
    one batched QuerySamplesComplete per issue callback;
(b) distbert, null backend, N local workers over ZeroMQ (the real CLI in a subprocess).

For each: Offline samples/s (full 10833-sample query, repeated --offline-samples), and the highest
VALID Server QPS found by a short search (each probe: --server-duration-ms of traffic; VALID =
LoadGen's verdict incl. the 130 ms p99 bound and early stopping).

    .venv/bin/python bench/harness_ceiling.py [--workers 4] [--server-duration-ms 3000]

Prints a Markdown table and writes bench/results/harness_ceiling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from distbert.data.loadgen_logs import read_detail  # noqa: E402 - the repo root is put on sys.path above

QSL = 10833


def _settings(lg, scenario: str, qps: float, duration_ms: int, offline_samples: int):
    s = lg.TestSettings()
    s.scenario = getattr(lg.TestScenario, scenario)
    s.mode = lg.TestMode.PerformanceOnly
    if scenario == "Offline":
        s.offline_expected_qps = 1.0
        s.min_query_count = offline_samples
        s.min_duration_ms = 0
    else:
        s.server_target_qps = qps
        s.server_target_latency_ns = 130_000_000
        s.min_duration_ms = duration_ms
        s.min_query_count = 100
    return s


def ceiling_run(scenario: str, qps: float, duration_ms: int, offline_samples: int) -> dict:
    """In-process FastSUT; runs in a child process so every probe starts clean."""
    import mlperf_loadgen as lg

    Response = lg.QuerySampleResponse

    def issue(ids, indices):
        lg.QuerySamplesComplete([Response(i, 0, 0) for i in ids])

    sut = lg.ConstructFastSUT(issue, lambda: None)
    qsl = lg.ConstructQSL(QSL, QSL, lambda s: None, lambda s: None)
    out = tempfile.mkdtemp(prefix="ceiling-")
    log = lg.LogSettings()
    log.log_output.outdir = out
    log.enable_trace = False
    lg.StartTestWithLogSettings(sut, qsl, _settings(lg, scenario, qps, duration_ms, offline_samples), log)
    lg.DestroyQSL(qsl)
    lg.DestroyFastSUT(sut)
    return read_detail(Path(out) / "mlperf_log_detail.txt")


def _child_ceiling(scenario: str, qps: float, duration_ms: int, offline_samples: int) -> dict:
    code = (f"import json,sys; sys.path.insert(0,{str(REPO)!r}); from bench.harness_ceiling import ceiling_run; "
            f"d=ceiling_run({scenario!r},{qps},{duration_ms},{offline_samples}); "
            "print(json.dumps({k:v for k,v in d.items() if k.startswith('result_') or k=='early_stopping_met'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def distbert_run(scenario: str, qps: float, duration_ms: int, offline_samples: int, workers: int,
                 extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "distbert", "run", "--backend", "null", "--workers", str(workers),
               "--scenario", scenario, "--output", str(out), *extra]
        if scenario == "Offline":
            cmd += ["--test-query-count", str(offline_samples)]
        else:
            # > what min duration needs: LoadGen stops at max_query_count
            n = int(qps * duration_ms / 1000 * 1.15) + 100
            cmd += ["--target-qps", str(qps), "--test-query-count", str(max(n, 100)),
                    "--min-duration-ms", str(duration_ms)]
        env = dict(os.environ, DISTBERT_NO_PROGRESS="1", DISTBERT_LOG_LEVEL="WARNING")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"distbert failed: {proc.stderr[-2000:]}")
        return read_detail(out / "performance" / "mlperf_log_detail.txt")


def search_server(run, lo: float, hi: float, steps: int) -> tuple[float, dict]:
    """Highest VALID qps in [lo, hi] by bisection on LoadGen's verdict (assumes monotonic)."""
    best, best_detail = 0.0, {}
    detail = run(lo)
    if detail.get("result_validity") != "VALID":
        return 0.0, detail
    best, best_detail = lo, detail
    for _ in range(steps):
        mid = (lo + hi) / 2
        detail = run(mid)
        ok = detail.get("result_validity") == "VALID"
        print(f"    server {mid:>10,.0f} qps -> {detail.get('result_validity')} "
              f"p99={detail.get('result_99.00_percentile_latency_ns', 0) / 1e6:.1f} ms", flush=True)
        if ok:
            best, best_detail, lo = mid, detail, mid
        else:
            hi = mid
    return best, best_detail


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--offline-samples", type=int, default=50 * QSL)
    ap.add_argument("--server-duration-ms", type=int, default=3000)
    ap.add_argument("--server-lo", type=float, default=20_000)
    ap.add_argument("--server-hi", type=float, default=800_000)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--distbert-args", default="", help="extra `distbert run` arguments, e.g. '--max-wait-ms 1'")
    args = ap.parse_args()
    extra = args.distbert_args.split()
    rows = []
    # Offline: this shared VM's speed drifts by tens of percent over minutes, so the two sides run
    # interleaved, --reps times each, and the medians are compared.
    off_a_all, off_b_all = [], []
    for rep in range(args.reps):
        off_a_all.append(_child_ceiling("Offline", 0, 0, args.offline_samples)["result_samples_per_second"])
        off_b_all.append(distbert_run("Offline", 0, 0, args.offline_samples, args.workers, extra)
                         ["result_samples_per_second"])
        print(f"    offline rep {rep + 1}: (a) {off_a_all[-1]:,.0f}  (b) {off_b_all[-1]:,.0f} samples/s", flush=True)
    off_a, off_b = statistics.median(off_a_all), statistics.median(off_b_all)
    print("(a) ceiling: in-process FastSUT, Server search", flush=True)
    srv_a, _ = search_server(lambda q: _child_ceiling("Server", q, args.server_duration_ms, 0),
                             args.server_lo, args.server_hi, args.steps)
    print(f"(b) distbert, null backend, {args.workers} workers over ZeroMQ, Server search", flush=True)
    srv_b, _ = search_server(lambda q: distbert_run("Server", q, args.server_duration_ms, 0, args.workers, extra),
                             args.server_lo, args.server_hi, args.steps)
    rows.append((f"Offline samples/s (median of {args.reps})", off_a, off_b))
    rows.append(("Server highest VALID QPS", srv_a, srv_b))
    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}\n")
    print("| metric | (a) Python LoadGen ceiling | (b) distbert null, "
          f"{args.workers} workers, ZeroMQ | (b)/(a) |")
    print("|---|---:|---:|---:|")
    for name, a, b in rows:
        print(f"| {name} | {a:,.0f} | {b:,.0f} | {b / a:.2f} |")
    res = REPO / "bench" / "results"
    res.mkdir(exist_ok=True)
    (res / "harness_ceiling.json").write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "workers": args.workers,
         "offline_reps": {"ceiling": off_a_all, "distbert": off_b_all},
         "rows": [{"metric": n, "ceiling": a, "distbert": b} for n, a, b in rows]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
