"""Benchmark of the SQuAD data path: cold featurization, warm cache load, accuracy scoring.

    .venv/bin/python bench/squad_bench.py [--dataset F] [--vocab F] [--runs 3] [--reference-questions 300]

Prints a Markdown table (best and median of ``--runs``) against the targets: cold <= 5 s,
warm <= 0.5 s, scoring a full 10833-entry float32 log <= 3 s. For comparison it also times the
reference approach (``transformers.BertTokenizer.tokenize`` per whitespace word, every context
re-tokenized for each of its questions, as ``create_squad_data.py`` does) on the first
``--reference-questions`` questions and extrapolates to the whole set.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distbert.data.squad.accuracy import score_log
from distbert.data.squad.features import FeatureStore, build_features, load_features

T = TypeVar("T")


def _timed(fn: Callable[[], T], runs: int) -> tuple[float, float, float, T]:
    """(best wall s, median wall s, median CPU s of this process incl. its threads, last result)."""
    times: list[float] = []
    cpu: list[float] = []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return min(times), statistics.median(times), statistics.median(cpu), out


def _write_log(store: FeatureStore, path: Path) -> None:
    """A full float32 accuracy log: 384 rows per feature, oracle peaks on noise (as a SUT would)."""
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        f.write("[\n")
        for i in range(len(store)):
            x = rng.standard_normal((384, 2)).astype(np.float32)
            if store.oracle_start[i] >= 0:
                x[int(store.oracle_start[i]), 0] += 8
                x[int(store.oracle_end[i]), 1] += 8
            data = x.tobytes().hex().upper()
            f.write(("," if i else "") + f'{{ "seq_id" : {i}, "qsl_idx" : {i}, "data" : "{data}" }}\n')
        f.write("]\n")


def _reference_tokenization(dataset: Path, vocab: Path, n_questions: int) -> tuple[float, int] | None:
    """Seconds to tokenize the first n questions the reference way; None without transformers."""
    try:
        from transformers import BertTokenizer
    except ImportError:
        return None
    tok = BertTokenizer(str(vocab))
    data = json.loads(dataset.read_text(encoding="utf-8"))["data"]
    done = 0
    t0 = time.perf_counter()
    for article in data:
        for para in article["paragraphs"]:
            words = re.findall(r"[^ \t\r\n\u202f]+", para["context"])
            for qa in para["qas"]:
                tok.tokenize(qa["question"])
                for w in words:          # the reference re-tokenizes the context for every question
                    tok.tokenize(w)
                done += 1
                if done == n_questions:
                    return time.perf_counter() - t0, done
    return time.perf_counter() - t0, done


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path)
    ap.add_argument("--vocab", type=Path)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--reference-questions", type=int, default=300)
    args = ap.parse_args()
    from distbert.data.artifacts import resolve_squad

    dataset, vocab = (Path(p) for p in resolve_squad(args.dataset, args.vocab))
    rows = []
    with tempfile.TemporaryDirectory(prefix="squad-bench-") as tmp:
        tmp_path = Path(tmp)
        counter = iter(range(10**6))

        def cold() -> FeatureStore:
            return load_features(dataset, vocab, cache_dir=tmp_path / f"cold{next(counter)}")

        best, med, cpu, store = _timed(cold, args.runs)
        cache = store.path
        assert cache is not None, "load_features returns a store on disk"
        rows.append(("cold: featurize + write cache (fresh cache dir)", best, med, cpu, "<= 5 s"))
        best, med, cpu, _ = _timed(lambda: build_features(dataset, vocab), args.runs)
        rows.append(("  of which featurization in memory", best, med, cpu, ""))
        best, med, cpu, _ = _timed(lambda: load_features(dataset, vocab, cache_dir=cache.parent.parent),
                              args.runs)
        rows.append(("warm: load_features (hash inputs, verify sha256, mmap)", best, med, cpu, "<= 0.5 s"))
        best, med, cpu, _ = _timed(lambda: FeatureStore.open(cache), args.runs)
        rows.append(("  FeatureStore.open (worker side)", best, med, cpu, ""))
        best, med, cpu, _ = _timed(lambda: store.meta and FeatureStore.open(cache).meta, args.runs)
        rows.append(("  + post-processing metadata (lazy)", best, med, cpu, ""))
        log_path = tmp_path / "mlperf_log_accuracy.json"
        _write_log(store, log_path)
        size_mb = log_path.stat().st_size / 1e6
        best, med, cpu, result = _timed(lambda: score_log(log_path, store), args.runs)
        rows.append((f"score a full float32 log ({len(store)} entries, {size_mb:.0f} MB)", best, med, cpu,
                     "<= 3 s"))
        ref = _reference_tokenization(dataset, vocab, args.reference_questions)

    load = os.getloadavg()
    print(f"SQuAD data path, {len(store)} features; {os.cpu_count()} CPUs, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (shared machine); best / median of {args.runs}\n")
    print("| step | best s | median s | median CPU s | target |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, b, m, c, target in rows:
        print(f"| {name} | {b:.3f} | {m:.3f} | {c:.3f} | {target} |")
    if ref is not None:
        seconds, n = ref
        print(f"| reference tokenization (transformers BertTokenizer per word), {n} questions | "
              f"{seconds:.3f} | | | extrapolated to 10570: {seconds * 10570 / n:.0f} s |")
    print(f"\nscored: {result.official_line()}  ({result.coverage_line()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
