"""SingleStream's floor without distbert: the backend a worker builds, called in a bare loop.

The same backend class, model, device, precision and options as `distbert run`, the same SQuAD
features (gathered and trimmed to their real length exactly as a worker does), one query at a time:
no LoadGen, no rank 0, no transport. Its latency percentiles against a SingleStream run's
(``distbert run --scenario SingleStream ...``, the same backend flags) give what distbert adds on
this hardware (issue 11, item 5). Query samples are drawn uniformly from the dev set with a fixed
seed, as LoadGen draws SingleStream samples from its loaded set.

    python3 bench/ss_bare.py --backend torch --model DIR --device cuda --precision fp16 \
        [--queries 2000] [--option graphs=1] [--json out.json]

Each query is padded to the run's shape ladder as a worker pads it (``--shape-ladder N``, else the
backend's policy: a ladder on a GPU, exact lengths on CPU). A query whose shape this script has not
run before is *cold*, the others *warm*: their latencies are also reported apart (``cold``, ``warm``),
so a first-use cost per shape that ``backend.warmup()`` missed shows as cold far above warm
(issue 19; ``--warmup 0`` keeps the first queries in the count).

Prints one JSON line: p50/p90/p99/mean in ms, queries, cold and warm apart, the backend's own description.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from distbert.backends import create  # noqa: E402 - the repo root is put on sys.path above
from distbert.backends.base import BackendSpec, ModelInputs  # noqa: E402
from distbert.backends.shapes import resolve_ladder  # noqa: E402
from distbert.data.artifacts import resolve_squad  # noqa: E402
from distbert.data.squad.features import load_features  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--option", action="append", default=[], help="KEY=VALUE backend option, as `distbert run`")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=50, help="untimed queries first")
    ap.add_argument("--dataset")
    ap.add_argument("--vocab")
    ap.add_argument("--thread", action="store_true",
                    help="time the queries on a second thread (load and warm-up stay on the main thread, as in "
                         "a worker process's compute thread): PyTorch's OpenMP pool is slower there on CPU")
    ap.add_argument("--shape-ladder", type=int, help="ladder length step, as `distbert run --shape-ladder` "
                                                     "(default: the backend's policy)")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()

    dataset, vocab = resolve_squad(args.dataset, args.vocab, download_missing=False)
    store = load_features(dataset, vocab)
    options = tuple((k, v) for k, v in (o.split("=", 1) for o in args.option))
    spec = BackendSpec(name=args.backend, model=args.model, device=args.device, precision=args.precision,
                       threads=args.threads, options=options)
    backend = create(spec)
    backend.load()
    # one row per query: the one-row rungs of the ladder are SingleStream's whole working set
    ladder = resolve_ladder(spec, args.shape_ladder, 1, backend.batch_hint().token_budget)
    backend.set_shape_ladder(ladder)
    if backend.needs_features:
        backend.attach_features(store)
    backend.warmup()
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(store), args.warmup + args.queries)
    took: list[float] = []
    cold: list[bool] = []
    seen: set[tuple[int, int]] = set()

    def loop() -> None:
        for k, i in enumerate(picks):
            t0 = time.perf_counter()
            idx = np.array([i], np.int64)
            ids, mask, seg, lengths = store.gather(idx)
            inputs = ladder.pad(ModelInputs(idx, ids, mask, seg, lengths))
            start, end = backend.run(inputs)
            np.asarray(start), np.asarray(end)   # on the host, as a worker's result is
            if k >= args.warmup:
                took.append(time.perf_counter() - t0)
                cold.append(inputs.shape not in seen)
            seen.add(inputs.shape)

    if args.thread:
        worker = threading.Thread(target=loop, name="ss-bare")
        worker.start()
        worker.join()
    else:
        loop()
    ms = np.asarray(took) * 1e3
    is_cold = np.asarray(cold, bool)
    out = {"bench": "ss_bare", "date": time.strftime("%Y-%m-%d"), "queries": len(took),
           "p50_ms": round(float(np.percentile(ms, 50)), 4), "p90_ms": round(float(np.percentile(ms, 90)), 4),
           "p99_ms": round(float(np.percentile(ms, 99)), 4), "mean_ms": round(float(ms.mean()), 4),
           "cold": _stats(ms[is_cold]), "warm": _stats(ms[~is_cold]), "distinct_shapes": len(seen),
           "shape_ladder": "exact" if ladder.exact else ladder.step,
           "backend": backend.info(),
           "device": args.device, "precision": args.precision, "options": dict(options),
           "thread": "second" if args.thread else "main"}
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


def _stats(ms: np.ndarray) -> dict[str, float | int | None]:
    """Count, p50, p90 and mean of one group of latencies (None when the group is empty)."""
    if not len(ms):
        return {"queries": 0, "p50_ms": None, "p90_ms": None, "mean_ms": None}
    return {"queries": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 4),
            "p90_ms": round(float(np.percentile(ms, 90)), 4), "mean_ms": round(float(ms.mean()), 4)}


if __name__ == "__main__":
    main()
