"""Torch-profiler capture of the worker's backend: where a batch's time goes inside distbert.

Builds the same ``TorchBackend`` a worker builds (load, warmup), then runs a few worker-style batches
(int32 arrays, every row ``--seq`` tokens long) at each ``--batch`` size under ``torch.profiler``,
and writes per batch size a key-averages table (``profile-<tag>-b<N>.txt``: by self device time and
by self CPU time on a GPU, by self CPU time on CPU) and one JSON line per batch size with the wall
time per ``run()`` (``profile-<tag>.jsonl``). No LoadGen, no coordinator: what is left between this
and ``bench/gpu_bare.py`` is the backend's own per-batch work.

    python3 bench/gpu_profile.py --model DIR --out DIR [--device cuda] [--precision fp16] \\
        [--batch 1 --batch 64] [--seq 192] [--iters 5] [--option graphs=1] [--tag graphs] \\
        [--prewarm 0] [--mask padded]

``--prewarm 0`` profiles each shape's first use too (cuDNN/cuBLAS plans, a graph capture: issue 19);
``--mask padded`` gives rows real lengths between half and all of ``--seq`` (mask zeros at the end, as
real batches have), where the default all-ones mask lets a library skip the mask altogether.

``--model``: a torch-format model (``distbert model make --shape large --format torch``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from distbert.backends.base import BackendSpec, ModelInputs
from distbert.backends.torch import TorchBackend


def batch(rows: int, seq: int, seed: int, padded: bool = False) -> ModelInputs:
    """A worker-style batch: int32, ``[CLS] ... [SEP]`` rows of ``seq`` real tokens, two segments;
    ``padded``: row lengths drawn from ``seq // 2 .. seq`` (the first row ``seq``), zeros after them."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, (rows, seq)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 101, 102
    segments = np.zeros_like(ids)
    segments[:, seq // 3:] = 1
    lengths = np.full(rows, seq, np.int32)
    if padded:
        lengths = rng.integers(seq // 2, seq + 1, rows).astype(np.int32)
        lengths[0] = seq
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
    return ModelInputs(np.arange(rows, dtype=np.int64), ids * mask, mask, segments * mask, lengths)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--batch", type=int, action="append", help="batch size (repeatable; default 1 and 64)")
    ap.add_argument("--seq", type=int, default=192)
    ap.add_argument("--iters", type=int, default=5, help="profiled batches per batch size")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="backend option")
    ap.add_argument("--tag", default="eager", help="names the output files")
    ap.add_argument("--prewarm", type=int, default=3,
                    help="unprofiled runs of each shape first (default 3; 0: its first use is in the profile)")
    ap.add_argument("--mask", choices=("ones", "padded"), default="ones", help="see above (default ones)")
    args = ap.parse_args()
    if any("=" not in o for o in args.option):
        ap.error("--option takes KEY=VALUE")
    options = tuple((k.strip(), v.strip()) for k, _, v in (o.partition("=") for o in args.option))
    backend = TorchBackend(BackendSpec(name="torch", model=args.model, device=args.device,
                                       precision=args.precision, options=options))
    backend.load()
    backend.warmup()
    gpu = args.device.startswith(("cuda", "rocm"))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    args.out.mkdir(parents=True, exist_ok=True)
    summary = args.out / f"profile-{args.tag}.jsonl"
    with summary.open("w") as fh:
        for rows in args.batch or [1, 64]:
            inputs = batch(rows, args.seq, seed=rows, padded=args.mask == "padded")
            for _ in range(args.prewarm):           # first use of this shape (a graph capture, cuBLAS plans)
                backend.run(inputs)
            walls = []
            with profile(activities=activities) as prof:
                for i in range(args.iters):
                    t0 = time.perf_counter()
                    with record_function(f"run batch {rows} #{i}"):
                        backend.run(inputs)         # returns numpy: the device work is done on return
                    walls.append((time.perf_counter() - t0) * 1e3)
            table = args.out / f"profile-{args.tag}-b{rows}.txt"
            sorts = ["self_device_time_total", "self_cpu_time_total"] if gpu else ["self_cpu_time_total"]
            with table.open("w") as tf:
                for key in sorts:
                    tf.write(f"# {args.tag}, batch {rows}, seq {args.seq}, mask {args.mask}, {args.precision} on "
                             f"{args.device}, {args.iters} batches after {args.prewarm} unprofiled, sorted by {key}\n")
                    tf.write(prof.key_averages().table(sort_by=key, row_limit=40) + "\n\n")
            line = {"tag": args.tag, "batch": rows, "seq": args.seq, "mask": args.mask, "prewarm": args.prewarm,
                    "run_ms_first": round(walls[0], 3), "precision": args.precision,
                    "device": args.device, "iters": args.iters,
                    "run_ms_median": round(statistics.median(walls), 3), "run_ms_max": round(max(walls), 3),
                    "table": table.name, "backend": backend.info()}
            fh.write(json.dumps(line) + "\n")
            print(json.dumps({k: line[k] for k in ("tag", "batch", "seq", "run_ms_first", "run_ms_median", "run_ms_max",
                                                   "table")}),
                  flush=True)
    backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
