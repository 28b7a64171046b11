"""Where a SingleStream query's time goes: distbert's added latency, hop by hop.

(a) the fastest in-process Python SUT (LoadGen's ConstructFastSUT completing each query at once):
    LoadGen's own latency floor on this machine;
(b) the real `distbert run --backend null --workers 1 --scenario SingleStream` (rank 0 plus one
    worker process over ZeroMQ ipc), with DISTBERT_TRACE on: every process records each hop's
    time (CLOCK_MONOTONIC, one clock for the host), joined here by response id and batch id.

    .venv/bin/python bench/latency_timeline.py [--queries 20000] [--label after]

Prints LoadGen's p50/p90 for (a) and (b), distbert's added latency ((b) - (a)), and the hops as
percentiles in microseconds; writes bench/results/latency_timeline[-LABEL].json.
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

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from distbert.data.loadgen_logs import read_detail  # noqa: E402 - the repo root is put on sys.path above
from distbert.util.trace import STAGES  # noqa: E402

QSL = 10833
HOPS = [  # (label, from stage, to stage)
    ("LoadGen issue -> driver takes it", "issue", "drain"),
    ("driver: dispatch + send", "drain", "send"),
    ("wire to the worker", "send", "w_recv"),
    ("worker: hand-off to compute", "w_recv", "w_start"),
    ("backend (null)", "w_start", "w_end"),
    ("worker: hand-off back + send", "w_end", "w_send"),
    ("wire back to rank 0", "w_send", "recv"),
    ("rank 0: result -> QuerySamplesComplete done", "recv", "complete"),
    ("total, issue -> complete", "issue", "complete"),
]


def ceiling(queries: int) -> dict:
    """LoadGen SingleStream with a SUT that completes each query inside the issue callback."""
    import mlperf_loadgen as lg

    Response = lg.QuerySampleResponse

    def issue(ids, indices):
        lg.QuerySamplesComplete([Response(i, 0, 0) for i in ids])

    sut = lg.ConstructFastSUT(issue, lambda: None)
    qsl = lg.ConstructQSL(QSL, QSL, lambda s: None, lambda s: None)
    s = lg.TestSettings()
    s.scenario = lg.TestScenario.SingleStream
    s.mode = lg.TestMode.PerformanceOnly
    s.min_query_count = s.max_query_count = queries
    s.min_duration_ms = 0
    s.single_stream_expected_latency_ns = 100_000
    out = tempfile.mkdtemp(prefix="ss-ceiling-")
    log = lg.LogSettings()
    log.log_output.outdir = out
    lg.StartTestWithLogSettings(sut, qsl, s, log)
    lg.DestroyQSL(qsl)
    lg.DestroyFastSUT(sut)
    return read_detail(Path(out) / "mlperf_log_detail.txt")


def distbert(queries: int, extra: list[str]) -> tuple[dict, dict[str, np.ndarray]]:
    with tempfile.TemporaryDirectory() as tmp:
        out, traces = Path(tmp) / "run", Path(tmp) / "trace"
        traces.mkdir()
        workers = [] if "--in-process-worker" in extra else ["--workers", "1"]
        cmd = [sys.executable, "-m", "distbert", "run", "--backend", "null", *workers,
               "--scenario", "SingleStream", "--test-query-count", str(queries), "--output", str(out), *extra]
        env = dict(os.environ, DISTBERT_NO_PROGRESS="1", DISTBERT_LOG_LEVEL="WARNING", DISTBERT_TRACE=str(traces))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"distbert failed: {proc.stderr[-2000:]}")
        time.sleep(0.5)  # the worker writes its trace at exit
        rows = np.concatenate([np.load(f) for f in traces.glob("trace-*.npy")])
        return read_detail(out / "performance" / "mlperf_log_detail.txt"), _join(rows)


def _join(rows: np.ndarray) -> dict[str, np.ndarray]:
    """Per query (one sample, one batch): the time of each stage, ns; NaN where missing."""
    by_stage = {name: rows[rows[:, 0] == i] for i, name in enumerate(STAGES)}
    send = by_stage["send"]
    batch_of_id = dict(zip(send[:, 2].tolist(), send[:, 1].tolist()))
    batches = send[:, 1]
    out: dict[str, np.ndarray] = {}
    for name, part in by_stage.items():
        if name in ("issue", "drain"):
            t = dict((batch_of_id.get(k), v) for k, v in zip(part[:, 1].tolist(), part[:, 3].tolist()))
        else:
            t = dict(zip(part[:, 1].tolist(), part[:, 3].tolist()))
        out[name] = np.array([t.get(b, np.nan) for b in batches.tolist()], dtype=np.float64)
    return out


def _pct(x: np.ndarray, q: float) -> float:
    x = x[~np.isnan(x)]
    return float(np.percentile(x, q)) / 1e3 if len(x) else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=20_000)
    ap.add_argument("--label", default="", help="suffix of the results file (e.g. before / after)")
    ap.add_argument("--distbert-args", default="", help="extra `distbert run` arguments, e.g. --in-process-worker")
    args = ap.parse_args()
    code = (f"import json,sys; sys.path.insert(0,{str(REPO)!r}); from bench.latency_timeline import ceiling; "
            f"d=ceiling({args.queries}); print(json.dumps({{k: v for k, v in d.items() if k.startswith('result_')}}))")
    ceil = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                     timeout=600).stdout.strip().splitlines()[-1])
    detail, t = distbert(args.queries, args.distbert_args.split())
    p = {k: {"ceiling_us": ceil.get(f"result_{k}_percentile_latency_ns", float("nan")) / 1e3,
             "distbert_us": detail.get(f"result_{k}_percentile_latency_ns", float("nan")) / 1e3}
         for k in ("50.00", "90.00", "99.00")}
    print(f"SingleStream, null backend, 1 worker process over ipc, {args.queries} queries "
          f"({platform.node()}, {time.strftime('%Y-%m-%d')})")
    print("| LoadGen latency | in-process ceiling (a) | distbert (b) | added (b)-(a) |")
    print("|---|---:|---:|---:|")
    for k, v in p.items():
        print(f"| p{k[:2]} | {v['ceiling_us']:.1f} µs | {v['distbert_us']:.1f} µs | "
              f"{v['distbert_us'] - v['ceiling_us']:.1f} µs |")
    print("\n| hop (distbert's own marks) | p50 µs | p90 µs |")
    print("|---|---:|---:|")
    hops = {}
    for label, a, b in HOPS:
        d = t[b] - t[a]
        hops[label] = {"p50_us": _pct(d, 50), "p90_us": _pct(d, 90)}
        print(f"| {label} | {hops[label]['p50_us']:.1f} | {hops[label]['p90_us']:.1f} |")
    res = REPO / "bench" / "results"
    res.mkdir(exist_ok=True)
    name = f"latency_timeline{'-' + args.label if args.label else ''}.json"
    (res / name).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "host": platform.node(),
                                        "queries": args.queries, "loadgen": p, "hops": hops,
                                        "command": " ".join(sys.argv)}, indent=2) + "\n")
    print(f"\nwrote bench/results/{name}")


if __name__ == "__main__":
    main()
