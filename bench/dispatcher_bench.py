"""Micro-benchmark of the pure dispatcher (no I/O): cost per sample of every event it handles.

Run: ``.venv/bin/python bench/dispatcher_bench.py [--quick]``. Numbers go to notes/dispatcher.md.

Only the time spent inside Dispatcher methods is counted (each call is wrapped in perf_counter),
so the simulated workers and event heap cost nothing here.
"""

from __future__ import annotations

import argparse
import heapq
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout, no install needed
from distbert.engine.dispatcher import BatchPolicy, Dispatcher, SendBatch


def _timed(fn, *args):
    t = time.perf_counter()
    r = fn(*args)
    return r, time.perf_counter() - t


def server(n: int, qps: float, workers: int, per_batch_s: float, per_sample_s: float, policy: BatchPolicy,
           seed: int = 0) -> dict:
    """Poisson arrivals at ``qps``; each worker serves a batch in per_batch_s + rows * per_sample_s."""
    rng = np.random.default_rng(seed)
    arrivals_np = np.cumsum(rng.exponential(1.0 / qps, n))
    arrivals = arrivals_np.tolist()                 # Python floats, as time.monotonic() gives
    d = Dispatcher("Server", policy, np.full(n, 200), want_logits=False)
    spent = 0.0
    for w in range(1, workers + 1):
        d.add_worker(w, 0.0)
    heap: list[tuple[float, int, int, int]] = []   # (done time, seq, worker, batch id)
    busy_until = {w: 0.0 for w in range(1, workers + 1)}
    seq = 0
    sizes: list[int] = []
    one_id = np.empty(1, np.uint64)
    one_ix = np.empty(1, np.int64)
    lat = np.zeros(n)

    def handle(instrs, now):
        nonlocal seq
        for ins in instrs:
            if isinstance(ins, SendBatch):
                start = max(now, busy_until[ins.worker])
                done = start + per_batch_s + per_sample_s * len(ins.ids)
                busy_until[ins.worker] = done
                heapq.heappush(heap, (done, seq, ins.worker, ins.batch_id))
                seq += 1
                sizes.append(len(ins.ids))
            else:
                lat[ins.ids.astype(np.int64)] = now - arrivals_np[ins.ids.astype(np.int64)]

    i = 0
    while i < n or heap:
        t_arr = arrivals[i] if i < n else math.inf
        t_res = heap[0][0] if heap else math.inf
        dl = d.next_deadline()
        t_tick = dl if dl is not None else math.inf
        now = min(t_arr, t_res, t_tick)
        if now == t_res:
            _, _, w, bid = heapq.heappop(heap)
            r, dt = _timed(d.on_result, w, bid, now)
        elif now == t_tick:
            r, dt = _timed(d.on_tick, now)
        else:
            one_id[0] = i
            one_ix[0] = i
            r, dt = _timed(d.on_samples, one_id, one_ix, now)
            i += 1
        spent += dt
        handle(r, now)
    assert d.idle() and d.stats["samples_completed"] == n
    return {"us_per_sample": 1e6 * spent / n, "mean_batch": float(np.mean(sizes)),
            "p99_latency_ms": 1e3 * float(np.percentile(lat, 99))}


def server_accumulate_only(n: int, policy: BatchPolicy) -> float:
    """on_samples cost while every worker is busy and the open batch fills (no sends, no results).

    The loop's own cost (writing the sample into the 1-element arrays) is measured without the call
    and subtracted."""
    d = Dispatcher("Server", BatchPolicy(max_batch=n + 1, max_wait_s=1e9, credits=policy.credits),
                   np.full(n, 200), want_logits=False)
    d.add_worker(1, 0.0)
    one_id = np.zeros(1, np.uint64)
    one_ix = np.zeros(1, np.int64)
    d.on_samples(one_id, one_ix, 0.0)                 # the idle worker takes the first at once
    on_samples = d.on_samples
    t = time.perf_counter()
    for k in range(n):
        one_id[0] = k
        one_ix[0] = k
        on_samples(one_id, one_ix, 0.0)
    t_call = time.perf_counter() - t
    t = time.perf_counter()
    for k in range(n):
        one_id[0] = k
        one_ix[0] = k
    t_loop = time.perf_counter() - t
    assert d.pending_samples() == n
    return 1e6 * (t_call - t_loop) / n


def offline(n: int, policy: BatchPolicy, workers: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(30, 385, n)
    d = Dispatcher("Offline", policy, lengths, want_logits=True)
    for w in range(1, workers + 1):
        d.add_worker(w, 0.0)
    ids = np.arange(n, dtype=np.uint64)
    idx = rng.permutation(n).astype(np.int64)
    t = time.perf_counter()
    out = d.on_samples(ids, idx, 0.0)
    t_issue = time.perf_counter() - t
    # Drain: complete in FIFO order, timing only the dispatcher.
    fifo = [(i.worker, i.batch_id) for i in out if isinstance(i, SendBatch)]
    spent = 0.0
    k = 0
    while k < len(fifo):
        w, b = fifo[k]
        k += 1
        t = time.perf_counter()
        r = d.on_result(w, b, 0.0)
        spent += time.perf_counter() - t
        fifo.extend((i.worker, i.batch_id) for i in r if isinstance(i, SendBatch))
    assert d.idle() and d.stats["samples_completed"] == n
    return {"issue_ms": 1e3 * t_issue, "drain_ms": 1e3 * spent, "batches": len(fifo),
            "ns_per_sample_total": 1e9 * (t_issue + spent) / n}


def _empty_call_ns() -> float:
    def f() -> None:
        return None
    n = 1_000_000
    t = time.perf_counter()
    for _ in range(n):
        f()
    t_call = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(n):
        pass
    return 1e9 * (t_call - (time.perf_counter() - t)) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--hedge", action="store_true", help="hedged re-sends on (their bookkeeping's cost; no fault)")
    a = ap.parse_args()
    n_srv = 20_000 if a.quick else 200_000
    pol = BatchPolicy(max_batch=32, max_wait_s=0.002, credits=2, hedge=a.hedge)
    print(f"machine yardstick: empty Python call {_empty_call_ns():.0f} ns (a current x86 server core: ~25-30 ns)")
    print(f"server accumulate-only on_samples: {server_accumulate_only(n_srv, pol):.3f} us/sample")
    # 4 workers, each ~5 ms + 0.5 ms/sample (a GPU-ish model): capacity ~ 4*32/(21 ms) ~ 6000 qps
    for qps in (200, 2000, 5000):
        r = server(n_srv // 4, qps, 4, 0.005, 0.0005, pol)
        print(f"server sim qps={qps}: {r['us_per_sample']:.2f} us/sample (all events), "
              f"mean batch {r['mean_batch']:.1f}, simulated p99 {r['p99_latency_ms']:.1f} ms")
    for n in (10833, 1_000_000):
        for p in (BatchPolicy(max_batch=64, hedge=a.hedge),
                  BatchPolicy(max_batch=64, token_budget=8192, hedge=a.hedge)):
            r = offline(n, p)
            print(f"offline n={n} budget={p.token_budget}: on_samples {r['issue_ms']:.2f} ms, "
                  f"drain {r['drain_ms']:.2f} ms over {r['batches']} batches, "
                  f"{r['ns_per_sample_total']:.0f} ns/sample total")


if __name__ == "__main__":
    main()
