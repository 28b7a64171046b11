#!/usr/bin/env python3
"""Backend throughput on this machine: the MLPerf reference's way vs distbert's.

The same random-weight model (BERT-base shape by default, ``--shape large`` for the real size) and
the same SQuAD dev features (``--samples`` of them, evenly spaced over the dev set so the length
mix is the real one) go through:

* ``ref``: what ``language/bert/onnxruntime_SUT.py`` does: ORT with default session options,
  batch 1, every sample padded to 384. (The reference starts one thread per sample; here the
  samples run back to back, which is never slower on a small CPU.) Every sample costs the same at a
  fixed 384 tokens, so ``--ref-samples`` (a subset) measures the same rate in less time.
* ``ort``: distbert's ``OnnxRuntimeBackend``: samples sorted by length, cut into batches by the
  backend's ``batch_hint()`` (or ``--calibrate``), each batch trimmed to its longest real length;
* ``ort-fuse``: the same with ``ort_fuse=1`` (ORT's offline BERT fusions: Attention, SkipLayerNorm);
* ``torch-fp32``, ``torch-bf16``, ``openvino``: the same batches on other backends;
  ``deepsparse`` too, from its own venv (``PYTHONPATH=. .venv-deepsparse/bin/python bench/backend_bench.py
  --configs ref,ort,deepsparse``): static engines per length bucket (128/256/384) at batch 16;
* ``ref-threads``: the reference's own concurrency: a thread per sample, ``os.cpu_count()`` at once
  (reported beside ``ref``; the ratios stay against the back-to-back ``ref``: on 2 cores both ran at the same rate);
* ``ref-int8`` / ``ort-int8``: the reference way and distbert's way on the int8 model;
* ``ort-static`` / ``ort-static-padded``: the model with its sequence dim declared static 384, as the
  official fp32 ``model.onnx`` has it: rewritten to a symbolic length at load (the default) vs
  ``seq_trim=0`` (padded to 384, what any runtime does with that file as published).

Prints one line per config and a Markdown table. ``--sweep`` instead times ORT at several token
budgets (used to choose the CPU default hint). Example::

    .venv/bin/python bench/backend_bench.py --shape base --samples 512 --ref-samples 64
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distbert.backends import create, modelmaker
from distbert.backends.base import BackendSpec, BatchHint, ModelInputs

log = logging.getLogger("backend_bench")
SEQ = 384
ALL = ("ref", "ref-threads", "ort", "ort-fuse", "torch-fp32", "torch-bf16", "openvino", "ref-int8", "ort-int8",
       "ort-static", "ort-static-padded", "deepsparse")


def load_samples(dataset: Path, vocab: Path, count: int) -> tuple[np.ndarray, ...]:
    """``count`` features evenly spaced over the dev set: ids, mask, segments int32 [N, 384], lengths."""
    from distbert.data.squad.features import load_features

    store = load_features(dataset, vocab)
    pick = np.linspace(0, len(store) - 1, count).round().astype(np.int64)
    return (np.asarray(store.input_ids[pick]), np.asarray(store.input_mask[pick]),
            np.asarray(store.segment_ids[pick]), np.asarray(store.lengths[pick]))


def cut_batches(lengths: np.ndarray, hint: BatchHint) -> list[np.ndarray]:
    """Longest first; a batch closes at ``max_batch`` rows or when rows x its longest length would pass the budget."""
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    cur: list[int] = []
    longest = 0
    for i in order:
        n = int(lengths[i])
        if cur and (len(cur) >= hint.max_batch
                    or (hint.token_budget and (len(cur) + 1) * max(longest, n) > hint.token_budget)):
            batches.append(np.array(cur))
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        batches.append(np.array(cur))
    return batches


def trimmed(data: tuple[np.ndarray, ...], rows: np.ndarray) -> ModelInputs:
    ids, mask, seg, lengths = data
    width = int(lengths[rows].max())
    return ModelInputs(rows.astype(np.int64), ids[rows, :width], mask[rows, :width], seg[rows, :width], lengths[rows])


def bench_ref(model: Path, data: tuple[np.ndarray, ...], rows: np.ndarray, concurrency: int = 1) -> float:
    """MLPerf reference style: default ORT session, [1, 384] int64 per sample. Returns samples/s.

    ``concurrency`` 1 runs the samples back to back; more runs them from that many threads at once,
    as ``onnxruntime_SUT.py`` does (a thread per sample, at most ``MLC_MAX_NUM_THREADS`` =
    ``os.cpu_count()`` running, each a full-width ORT session run).
    """
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), ort.SessionOptions(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    ids, mask, seg, _ = data

    def feed(i: int) -> dict[str, np.ndarray]:
        return dict(zip(names, (ids[i:i + 1].astype(np.int64), mask[i:i + 1].astype(np.int64),
                                seg[i:i + 1].astype(np.int64))))

    sess.run(None, feed(int(rows[0])))                   # warm-up, untimed
    t0 = time.perf_counter()
    if concurrency <= 1:
        for i in rows:
            sess.run(None, feed(int(i)))
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(pool.map(lambda i: sess.run(None, feed(int(i))), rows))
    return len(rows) / (time.perf_counter() - t0)


def static_copy(onnx_path: Path) -> Path:
    """``onnx_path`` with inputs and outputs declared ``[batch, 384]`` (the official model's dims)."""
    import onnx

    out = onnx_path.parent.with_name(onnx_path.parent.name + "-static384") / onnx_path.name
    if not out.is_file():
        model = onnx.load(str(onnx_path))
        for vi in list(model.graph.input) + list(model.graph.output):
            vi.type.tensor_type.shape.dim[1].ClearField("dim_param")
            vi.type.tensor_type.shape.dim[1].dim_value = SEQ
        out.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(out) + ".tmp")
        os.replace(str(out) + ".tmp", out)
    return out


def bench_backend(spec: BackendSpec, data: tuple[np.ndarray, ...], rows: np.ndarray,
                  hint: BatchHint | None, calibrate: bool) -> tuple[float, BatchHint, int]:
    backend = create(spec)
    backend.load()
    backend.warmup()
    lengths = data[3]
    if calibrate:
        from distbert.backends.batching import calibrate as calib
        hint = calib(backend, lengths[rows])
    hint = hint or backend.batch_hint()
    batches = [rows[b] for b in cut_batches(lengths[rows], hint)]
    backend.run(trimmed(data, batches[len(batches) // 2]))   # warm-up at a typical shape, untimed
    t0 = time.perf_counter()
    for b in batches:
        backend.run(trimmed(data, b))
    rate = len(rows) / (time.perf_counter() - t0)
    backend.close()
    return rate, hint, len(batches)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="base", choices=tuple(modelmaker.SHAPES))
    p.add_argument("--samples", type=int, default=512, help="dev-set features to run (default 512)")
    p.add_argument("--ref-samples", type=int, default=64,
                   help="subset for the reference config (fixed 384 tokens: same rate, less time; 0 = all)")
    p.add_argument("--slow-samples", type=int, default=128,
                   help="subset for torch-bf16 (emulated on CPUs without bf16 units; 0 = all)")
    p.add_argument("--configs", default=",".join(ALL), help=f"comma list of {', '.join(ALL)} (default all)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: this process's cores)")
    p.add_argument("--calibrate", action="store_true", help="batch by calibrate() instead of batch_hint()")
    p.add_argument("--max-batch", type=int, help="override the hint's max batch")
    p.add_argument("--token-budget", type=int, help="override the hint's token budget")
    p.add_argument("--sweep", help="comma list of token budgets: time ORT at each (max batch 256)")
    p.add_argument("--dataset", type=Path, help="SQuAD dev-v1.1.json (default: DISTBERT_DATA_DIR, else the cache)")
    p.add_argument("--vocab", type=Path, help="BERT vocab.txt (default: DISTBERT_DATA_DIR, else the cache)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname).1s %(name)s: %(message)s")

    threads = args.threads or len(os.sched_getaffinity(0))
    from distbert.data.artifacts import resolve_squad

    dataset, vocab = resolve_squad(args.dataset, args.vocab)
    data = load_samples(dataset, vocab, args.samples)
    rows = np.arange(args.samples)
    lengths = data[3]
    print(f"# {args.samples} dev features: mean length {lengths.mean():.1f}, median {np.median(lengths):.0f}, "
          f"max {lengths.max()}; BERT-{args.shape} random weights; {threads} threads; "
          f"{os.uname().nodename} ({os.cpu_count()} CPUs visible)", flush=True)
    onnx_path = modelmaker.ensure_random_model(args.shape, "onnx", seed=0)

    def subset(n: int) -> np.ndarray:
        return rows if not n or n >= len(rows) else np.linspace(0, len(rows) - 1, n).round().astype(np.int64)

    override = None
    if args.max_batch or args.token_budget:
        override = BatchHint(max_batch=args.max_batch or 64, token_budget=args.token_budget)

    if args.sweep:
        spec = BackendSpec("onnxruntime", str(onnx_path), threads=threads)
        for budget in (int(b) for b in args.sweep.split(",")):
            rate, hint, n = bench_backend(spec, data, rows, BatchHint(256, budget), False)
            print(f"sweep token_budget={budget}: {rate:.2f} samples/s ({n} batches)", flush=True)
        return 0

    results: list[dict] = []
    refs: dict[str, float] = {}       # "ref"/"ref-int8" -> samples/s: each config is compared with its precision's
    for name in [c.strip() for c in args.configs.split(",") if c.strip()]:
        t0 = time.perf_counter()
        if name in ("ref", "ref-int8", "ref-threads"):
            sel = subset(args.ref_samples)
            path = onnx_path if name != "ref-int8" else modelmaker.ensure_random_model(args.shape, "onnx-int8")
            if name == "ref-threads":
                n = os.cpu_count() or 1
                rate = bench_ref(path, data, sel, concurrency=n)
                how = f"as onnxruntime_SUT.py: a thread per sample, {n} at once, batch 1, padded to 384"
            else:
                rate, how = bench_ref(path, data, sel), "ORT default options, batch 1, padded to 384"
                refs[name] = rate
        else:
            specs: dict[str, BackendSpec | Callable[[], BackendSpec]] = {
                "ort": BackendSpec("onnxruntime", str(onnx_path), threads=threads),
                "ort-fuse": BackendSpec("onnxruntime", str(onnx_path), threads=threads, options=(("ort_fuse", "1"),)),
                "ort-int8": BackendSpec("onnxruntime", str(modelmaker.ensure_random_model(args.shape, "onnx-int8")),
                                        precision="int8", threads=threads),
                "torch-fp32": BackendSpec("torch", str(modelmaker.ensure_random_model(args.shape, "torch")),
                                          threads=threads),
                "torch-bf16": BackendSpec("torch", str(modelmaker.ensure_random_model(args.shape, "torch")),
                                          precision="bf16", threads=threads),
                "openvino": BackendSpec("openvino", str(onnx_path), threads=threads),
                "deepsparse": BackendSpec("deepsparse", str(onnx_path), threads=threads),
                "ort-static": lambda: BackendSpec("onnxruntime", str(static_copy(onnx_path)), threads=threads),
                "ort-static-padded": lambda: BackendSpec("onnxruntime", str(static_copy(onnx_path)), threads=threads,
                                                         options=(("seq_trim", "0"),)),
            }
            choice = specs[name]
            spec = choice() if callable(choice) else choice
            sel = subset(args.slow_samples) if name == "torch-bf16" else rows
            rate, hint, nb = bench_backend(spec, data, sel, override, args.calibrate)
            how = f"sorted+trimmed, {nb} batches (max_batch {hint.max_batch}, token_budget {hint.token_budget})"
        ref_rate = refs.get("ref-int8" if name.endswith("int8") else "ref")
        entry = {"config": name, "samples": len(sel), "samples_per_s": rate, "how": how,
                 "vs_ref": rate / ref_rate if ref_rate else None, "wall_s": time.perf_counter() - t0}
        results.append(entry)
        print(f"{name}: {rate:.2f} samples/s over {len(sel)} samples ({how})"
              + (f", {entry['vs_ref']:.2f}x ref" if entry["vs_ref"] else ""), flush=True)

    print("\n| config | samples | samples/s | vs ref (same precision) | batching |\n|---|---:|---:|---:|---|")
    for e in results:
        vs = f"{e['vs_ref']:.2f}x" if e["vs_ref"] else "-"
        print(f"| {e['config']} | {e['samples']} | {e['samples_per_s']:.2f} | {vs} | {e['how']} |")
    if args.json:
        args.json.write_text(json.dumps({"shape": args.shape, "threads": threads, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
