"""Shape ladders over the real dev set: distinct batch shapes and padding, per ladder (no model run).

For each ladder (length step x row rungs) it plans the full dev set through the real dispatcher
(``engine/dispatcher``, one worker, every batch sent at once) and reports, from the dispatcher's own
shape counts: Offline distinct shapes and padding; SingleStream padding (every feature alone); Server
padding for random batches of a few sizes; and how many shapes a GPU backend must warm.

    DISTBERT_DATA_DIR=/work/shared/data python bench/shape_ladder.py [--max-batch 256] [--token-budget 65536]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distbert.backends.shapes import EXACT, ShapeLadder, row_rungs
from distbert.engine.dispatcher import BatchPolicy, Dispatcher, SendBatch


def rungs_between(max_rows: int, parts: int) -> tuple[int, ...]:
    """Powers of two and ``parts - 1`` evenly spaced rungs between each two (parts 2: 1, 2, 3, 4, 6,
    8, 12, 16, ...; parts 4: ..., 8, 10, 12, 14, 16, 20, ...), ``max_rows`` on top."""
    out: set[int] = set()
    p = 1
    while p < max_rows:
        out.update(p + (p * k) // parts for k in range(parts))
        p *= 2
    return (*sorted(r for r in out if r < max_rows), max_rows)


def plan(scenario: str, lengths: np.ndarray, ladder: ShapeLadder, max_batch: int, budget: int | None,
         batches: list[np.ndarray] | None = None) -> dict:
    """Run ``lengths`` through the dispatcher; its shape stats. Server: the given ``batches`` of QSL
    indices, each issued as one pile and flushed."""
    policy = BatchPolicy(max_batch=max_batch, token_budget=budget, credits=1_000_000, ladder=ladder)
    d = Dispatcher(scenario, policy, lengths, want_logits=False)
    d.add_worker(1, 0.0, max_batch)
    sent: list[SendBatch] = []
    if scenario == "Offline":
        idx = np.arange(len(lengths), dtype=np.int64)
        sent += [i for i in d.on_samples(idx.astype(np.uint64), idx, 0.0) if isinstance(i, SendBatch)]
    else:
        for k, b in enumerate(batches or []):
            d2 = d.on_samples(np.arange(len(b), dtype=np.uint64) + 10_000_000 * k, b, float(k))
            sent += [i for i in d2 + d.on_flush(float(k)) if isinstance(i, SendBatch)]
            for s in sent:
                d.on_result(s.worker, s.batch_id, float(k))
            sent = []
    for s in sent:
        d.on_result(s.worker, s.batch_id, 1.0)
    st = d.shape_stats()
    return {"batches": d.stats["batches_completed"], "batch_shapes": st["batch_shapes"],
            "padding_fraction": st["padding_fraction"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--token-budget", type=int, default=65536)
    ap.add_argument("--json", type=Path, help="also write the table here")
    args = ap.parse_args()
    from distbert.data.artifacts import resolve_squad
    from distbert.data.squad.features import load_features

    store = load_features(*resolve_squad(None, None))
    lengths = np.asarray(store.lengths, np.int64)
    rng = np.random.default_rng(0)
    ss = [np.array([i]) for i in range(len(lengths))]
    # Server batches: 2000 of random sizes 1..b (how full a batch is depends on the load)
    server = {b: [rng.integers(0, len(lengths), rng.integers(1, b + 1)) for _ in range(2000)] for b in (8, 64, 256)}
    mb, budget = args.max_batch, args.token_budget
    print(f"{len(lengths)} features, mean length {lengths.mean():.1f}, max batch {mb}, token budget {budget}")
    rows_schemes = {"pow2": row_rungs(mb), "pow2/2": rungs_between(mb, 2), "pow2/4": rungs_between(mb, 4)}
    ladders: list[tuple[str, ShapeLadder]] = [("exact", EXACT)]
    for step in (8, 16, 24, 32, 48, 64):
        for name, rows in rows_schemes.items():
            ladders.append((f"step {step}, rows {name}", ShapeLadder(step, rows, token_budget=budget)))
    table = []
    head = (f"{'ladder':24} {'warm':>5} {'Off shapes':>10} {'Off pad':>8} {'Off batches':>11} {'SS pad':>7} "
            + " ".join(f"{'Srv1-' + str(b) + ' pad':>12}" for b in server))
    print(head)
    for name, ladder in ladders:
        off = plan("Offline", lengths, ladder, mb, budget)
        single = plan("SingleStream", lengths, ladder, mb, budget, ss)
        srv = {b: plan("Server", lengths, ladder, mb, budget, bs) for b, bs in server.items()}
        row = {"ladder": name, "warm_shapes": len(ladder.shapes()), "offline": off,
               "singlestream_padding": single["padding_fraction"],
               "server_padding": {b: r["padding_fraction"] for b, r in srv.items()}}
        table.append(row)
        print(f"{name:24} {row['warm_shapes']:>5} {off['batch_shapes']:>10} {off['padding_fraction']:>8.1%} "
              f"{off['batches']:>11} {single['padding_fraction']:>7.1%} "
              + " ".join(f"{r['padding_fraction']:>12.1%}" for r in srv.values()))
    if args.json:
        args.json.write_text(json.dumps(table, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
