"""BERT-Large in a bare PyTorch loop, no distbert: what the GPU gives without the harness.

Random weights (transformers' BertForQuestionAnswering, BERT-Large shape), one sequence length:
batch-1 latency eager and as a captured CUDA graph (one launch for the whole forward pass), and
throughput at larger batches. The gap between eager and graph at batch 1 is the kernel-launch cost
that dominates distbert's GPU SingleStream figures (README, GPU section).

    python3 bench/gpu_bare.py [--device cuda] [--dtype fp16] [--seq 192] [--shape large|tiny] \
        [--batch 16 --batch 64 --batch 256] [--json out.json]

Prints one JSON line per measurement; ``--json`` also writes them all with the best batch
throughput (``best_samples_per_s``: issue 19 compares distbert's Offline against it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def model(shape: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import BertConfig, BertForQuestionAnswering

    cfg = (BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
           if shape == "large" else BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=512))
    cfg.attn_implementation = "sdpa"
    return BertForQuestionAnswering(cfg).to(device=device, dtype=dtype).eval()  # type: ignore[call-arg]  # transformers stubs


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return sorted(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--seq", type=int, default=192)
    ap.add_argument("--shape", default="large")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--batch", type=int, action="append", help="throughput batch sizes (default 16, 64, 256)")
    ap.add_argument("--json", type=Path, help="also write every measurement and the best throughput here")
    args = ap.parse_args()
    lines: list[dict] = []

    def emit(line: dict) -> None:
        lines.append(line)
        print(json.dumps(line), flush=True)

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    m = model(args.shape, args.device, dtype)

    def inputs(b: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(1000, 20000, (b, args.seq), device=args.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}

    with torch.inference_mode():
        x1 = inputs(1)
        for _ in range(10):
            m(**x1)
        sync(args.device)
        eager = timed(lambda: m(**x1), args.device, args.iters)
        emit({"what": "batch 1, eager", "seq": args.seq, "dtype": args.dtype,
              "p50_ms": round(eager[len(eager) // 2], 3), "p90_ms": round(eager[int(len(eager) * 0.9)], 3)})
        if args.device.startswith("cuda"):
            static = inputs(1)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    m(**static)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                m(**static)
            graphed = timed(graph.replay, args.device, args.iters)
            emit({"what": "batch 1, CUDA graph", "seq": args.seq, "dtype": args.dtype,
                  "p50_ms": round(graphed[len(graphed) // 2], 3),
                  "p90_ms": round(graphed[int(len(graphed) * 0.9)], 3)})
        for b in args.batch or (16, 64, 256):
            xb = inputs(b)
            m(**xb)
            sync(args.device)
            t = timed(lambda: m(**xb), args.device, max(5, args.iters // 20))  # noqa: B023 - timed right here
            med = t[len(t) // 2]
            emit({"what": f"batch {b}, eager", "batch": b, "seq": args.seq, "dtype": args.dtype, "ms": round(med, 2),
                  "samples_per_s": round(b / med * 1e3, 1)})
    if args.json:
        best = max((x for x in lines if "samples_per_s" in x), key=lambda x: x["samples_per_s"], default=None)
        args.json.write_text(json.dumps({
            "bench": "gpu_bare", "date": time.strftime("%Y-%m-%d"), "device": args.device, "dtype": args.dtype,
            "shape": args.shape, "seq": args.seq, "measurements": lines,
            "best_samples_per_s": best["samples_per_s"] if best else None,
            "best_batch": best["batch"] if best else None}, indent=1) + "\n")


if __name__ == "__main__":
    main()
