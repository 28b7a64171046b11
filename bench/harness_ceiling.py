"""How much does distribution cost? Python LoadGen's ceiling vs distbert with the null backend.

(a) the fastest in-process SUT on LoadGen's Python API: ConstructFastSUT completing every sample at
    once, one QuerySamplesComplete of fresh QuerySampleResponses per issue callback (the comparator
    issue 11 names; what a single-process Python harness gets);
(a') the same SUT through LoadGen's C API, as distbert uses it (distbert/engine/lgnative.py):
    completions from one recycled NumPy response array, Offline's query received as arrays;
(b) distbert, null backend, N local workers over ZeroMQ (the real CLI in a subprocess).

For each: Offline samples/s (full 10833-sample query, repeated --offline-samples), and the highest
VALID Server QPS found by a short search (each probe: --server-duration-ms of traffic; VALID =
LoadGen's verdict incl. the 130 ms p99 bound and early stopping).

    .venv/bin/python bench/harness_ceiling.py [--workers 4] [--server-duration-ms 3000] [--only Offline]

Prints a Markdown table and writes bench/results/harness_ceiling.json (with --only X:
harness_ceiling-x.json).
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


def ceiling_run(scenario: str, qps: float, duration_ms: int, offline_samples: int, native: bool = False) -> dict:
    """In-process FastSUT; runs in a child process so every probe starts clean."""
    import mlperf_loadgen as lg

    Response = lg.QuerySampleResponse

    def issue(ids, indices):
        lg.QuerySamplesComplete([Response(i, 0, 0) for i in ids])

    if native:
        import numpy as np

        from distbert.engine.lgnative import NativeSUT, native_entry

        entry, why = native_entry()
        if entry is None:
            raise SystemExit(f"LoadGen's C API is not usable here: {why}")
        buffer = np.zeros(QSL * 2, entry.complete.dtype)
        address, id_column, call = buffer.ctypes.data, buffer["id"], entry.complete.call

        def issue(ids, indices):
            n = len(ids)
            if n == 1:
                id_column[0] = ids[0]
                call(address, 1)
                return
            for k in range(0, n, len(buffer)):
                part = ids[k:k + len(buffer)]
                id_column[:len(part)] = part
                call(address, len(part))

        if scenario == "Offline":   # the one big query arrives as arrays
            sut_native = NativeSUT(entry, "ceiling", issue, lambda: None)
            qsl = lg.ConstructQSL(QSL, QSL, lambda s: None, lambda s: None)
            out = tempfile.mkdtemp(prefix="ceiling-")
            log = lg.LogSettings()
            log.log_output.outdir = out
            log.enable_trace = False
            settings = _settings(lg, scenario, qps, duration_ms, offline_samples)
            lg.StartTestWithLogSettings(sut_native.handle, qsl, settings, log)
            lg.DestroyQSL(qsl)
            sut_native.destroy()
            return read_detail(Path(out) / "mlperf_log_detail.txt")

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


def _child_ceiling(scenario: str, qps: float, duration_ms: int, offline_samples: int, native: bool = False) -> dict:
    code = (f"import json,sys; sys.path.insert(0,{str(REPO)!r}); from bench.harness_ceiling import ceiling_run; "
            f"d=ceiling_run({scenario!r},{qps},{duration_ms},{offline_samples},{native}); "
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
    ap.add_argument("--only", choices=["Offline", "Server"], help="measure one scenario")
    ap.add_argument("--distbert-args", default="", help="extra `distbert run` arguments, e.g. '--max-wait-ms 1'")
    args = ap.parse_args()
    extra = args.distbert_args.split()
    rows: list[tuple[str, float, float, float]] = []
    if args.only != "Server":
        # Offline: this shared VM's speed drifts by tens of percent over minutes, so the three run
        # interleaved, --reps times each, and the medians are compared.
        off: dict[str, list[float]] = {"ceiling": [], "ceiling_native": [], "distbert": []}
        for rep in range(args.reps):
            off["ceiling"].append(_child_ceiling("Offline", 0, 0, args.offline_samples)["result_samples_per_second"])
            off["ceiling_native"].append(_child_ceiling("Offline", 0, 0, args.offline_samples, True)
                                         ["result_samples_per_second"])
            off["distbert"].append(distbert_run("Offline", 0, 0, args.offline_samples, args.workers, extra)
                                   ["result_samples_per_second"])
            print(f"    offline rep {rep + 1}: (a) {off['ceiling'][-1]:,.0f}  (a') {off['ceiling_native'][-1]:,.0f}  "
                  f"(b) {off['distbert'][-1]:,.0f} samples/s", flush=True)
        med = {k: statistics.median(v) for k, v in off.items()}
        rows.append((f"Offline samples/s (median of {args.reps})", med["ceiling"], med["ceiling_native"],
                     med["distbert"]))
    if args.only != "Offline":
        found = []
        ms = args.server_duration_ms
        for label, run in (("(a) Python API", lambda q: _child_ceiling("Server", q, ms, 0)),
                           ("(a') C entry point", lambda q: _child_ceiling("Server", q, ms, 0, True)),
                           (f"(b) distbert, {args.workers} workers",
                            lambda q: distbert_run("Server", q, args.server_duration_ms, 0, args.workers, extra))):
            print(f"{label}: Server search", flush=True)
            found.append(search_server(run, args.server_lo, args.server_hi, args.steps)[0])
        rows.append(("Server highest VALID QPS", found[0], found[1], found[2]))
    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}\n")
    print("| metric | (a) in-process, LoadGen's Python API | (a') in-process, LoadGen's C entry point | "
          f"(b) distbert null, {args.workers} workers, ZeroMQ | (b)/(a) | (b)/(a') |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, a, a2, b in rows:
        print(f"| {name} | {a:,.0f} | {a2:,.0f} | {b:,.0f} | {b / a:.2f} | {b / a2:.2f} |")
    res = REPO / "bench" / "results"
    res.mkdir(exist_ok=True)
    name = f"harness_ceiling-{args.only.lower()}.json" if args.only else "harness_ceiling.json"
    (res / name).write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "workers": args.workers,
         "offline_reps": off if args.only != "Server" else None,
         "rows": [{"metric": n, "ceiling": a, "ceiling_native": a2, "distbert": b} for n, a, a2, b in rows]},
        indent=2) + "\n")


if __name__ == "__main__":
    main()
