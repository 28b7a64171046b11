"""One stalled worker, with and without hedged re-sends: what the tail costs and what hedging buys.

Runs ``distbert run`` with K local workers (``--workers K``, ZeroMQ over ipc, the ``sim`` backend:
each batch sleeps by a latency model, so K workers fit on a small machine), and once LoadGen's test
has run ``--stall-at`` seconds it SIGSTOPs one worker process for ``--stall`` seconds, then SIGCONTs
it: a stopped process, as a hung driver or a paused VM looks to rank 0 (alive, silent, holding its
batches; the heartbeat would need 10 s). Once per ``--hedge`` mode (``on,off`` by default), the same
seed and schedule. Prints, per mode: LoadGen's verdict, the slowest query, p99, samples/s, the run's
wall time and ``run.json``'s hedge counters; ``--json FILE`` writes them.

    .venv/bin/python bench/hedge_stall.py --scenario Server --qps 100 --seconds 20 --stall-at 5 --stall 3
    .venv/bin/python bench/hedge_stall.py --scenario Offline --samples 3000 --stall-at 2 --stall 3

Figures and the defaults decided from them: docs/faults.md, "Hedged re-sends". The data set is
``DISTBERT_DATA_DIR``'s (or the cache's); nothing outside the processes it starts is touched.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from distbert.data.loadgen_logs import read_detail  # noqa: E402

START_LINE = "test starting"        # run/loadgen.py: "LoadGen <scenario> <mode> test starting (logs in ...)"


def _worker(proc: subprocess.Popen[str], rank: int) -> psutil.Process | None:
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if "--rank" in cmd and cmd[cmd.index("--rank") + 1] == str(rank):
            return child
    return None


def run_once(args: argparse.Namespace, hedge: str, out: Path) -> dict[str, Any]:
    """One ``distbert run`` with worker ``--victim`` stopped for ``--stall`` s; its figures."""
    cmd = [sys.executable, "-m", "distbert", "run", "--backend", "sim", "--sim-latency", args.latency,
           "--workers", str(args.workers), "--scenario", args.scenario, "--mode", "performance",
           "--hedge", hedge, "--output", str(out), "--max-batch", str(args.max_batch)]
    if args.scenario == "Server":
        cmd += ["--target-qps", str(args.qps), "--min-duration-ms", str(int(args.seconds * 1000)),
                "--test-query-count", str(int(args.qps * args.seconds))]
    else:
        cmd += ["--test-query-count", str(args.samples), "--min-duration-ms", "0"]
    if args.max_examples:
        cmd += ["--max-examples", str(args.max_examples)]
    cmd += args.run_args.split()
    env = dict(os.environ, DISTBERT_NO_PROGRESS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    started = threading.Event()
    lines: list[str] = []

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if START_LINE in line and "performance" in line:
                started.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    stalled = {"at_s": None, "for_s": 0.0}
    try:
        if not started.wait(timeout=args.timeout):
            raise SystemExit(f"hedge_stall: the run never started its test:\n{''.join(lines[-30:])}")
        t0 = time.monotonic()
        victim = _worker(proc, args.victim)
        if victim is None:
            raise SystemExit(f"hedge_stall: worker {args.victim} not found among the run's processes")
        time.sleep(args.stall_at)
        if proc.poll() is None and args.stall > 0:       # --stall 0: the no-fault baseline
            victim.send_signal(signal.SIGSTOP)
            stalled["at_s"] = round(time.monotonic() - t0, 3)
            try:
                time.sleep(args.stall)
            finally:
                victim.send_signal(signal.SIGCONT)
            stalled["for_s"] = args.stall
        proc.wait(timeout=args.timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
    if args.keep:
        (out.parent / f"{out.name}.log").write_text("".join(lines))
    if proc.returncode != 0:
        raise SystemExit(f"hedge_stall: the run failed (exit {proc.returncode}):\n{''.join(lines[-30:])}")
    record = json.loads((out / "run.json").read_text())
    perf = record["results"]["performance"]
    detail = read_detail(out / "performance" / "mlperf_log_detail.txt")
    ns = 1e-9
    return {"hedge": hedge, "stall_at_s": stalled["at_s"], "stall_s": stalled["for_s"],
            "validity": perf.get("result_validity"),
            "max_latency_s": round(detail["result_max_latency_ns"] * ns, 4),
            "p99_latency_s": round(detail["result_99.00_percentile_latency_ns"] * ns, 4),
            "mean_latency_s": round(detail["result_mean_latency_ns"] * ns, 4),
            "p90_latency_s": round(detail["result_90.00_percentile_latency_ns"] * ns, 4),
            "samples_per_s": round(perf["dispatcher"]["samples_completed"] / perf["wall_s"], 1),   # over the test
            "wall_s": perf.get("wall_s"), "loadgen_errors": perf.get("loadgen_errors"),
            "issued": perf["dispatcher"]["samples_issued"], "samples": perf["dispatcher"]["samples_completed"],
            "hedges": perf["dispatcher"]["hedges"],
            "hedge_log_lines": sum("hedged as batch" in line for line in lines)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", default="Server", choices=("Server", "Offline", "SingleStream"))
    p.add_argument("--hedge", default="on,off", help="modes to run, comma-separated (auto, on, off)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--victim", type=int, default=2, help="rank of the worker to stop")
    p.add_argument("--qps", type=float, default=100.0, help="Server: target QPS")
    p.add_argument("--seconds", type=float, default=20.0, help="Server: test length")
    p.add_argument("--samples", type=int, default=3000, help="Offline: samples")
    p.add_argument("--latency", default="0.01 + 2e-5*tokens", help="sim backend latency model (s)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-examples", type=int, help="QSL size (default: the whole data set)")
    p.add_argument("--stall-at", type=float, default=5.0, help="seconds into the test")
    p.add_argument("--stall", type=float, default=3.0, help="seconds the worker stays stopped")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--run-args", default="", help="more `distbert run` flags, e.g. '--hedge-floor-ms 20'")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--keep", type=Path, help="keep the run directories (and rank 0's log) under this folder")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="hedge-stall-") as tmp:
        for k, mode in enumerate(args.hedge.split(",")):
            rows.append(run_once(args, mode.strip(), (args.keep or Path(tmp)) / f"run{k}-hedge-{mode.strip()}"))
            r = rows[-1]
            print(f"hedge {r['hedge']:>4}: {r['validity']}, slowest {r['max_latency_s'] * 1000:.0f} ms, "
                  f"p99 {r['p99_latency_s'] * 1000:.1f} ms, p90 {r['p90_latency_s'] * 1000:.1f} ms, "
                  f"mean {r['mean_latency_s'] * 1000:.1f} ms, "
                  f"{r['samples_per_s']:.1f} samples/s, wall {r['wall_s']:.2f} s, stall {r['stall_s']} s at "
                  f"{r['stall_at_s']} s, hedges {r['hedges']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
