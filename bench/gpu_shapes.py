"""The backend alone over the real Offline batch shapes: first use against warm, per shape (issue 19).

A GPU pays a first-use cost per input shape (cuDNN attention plans, cuBLAS heuristics, allocator
growth). This runs the backend a worker builds over the Offline plan of the dev set, cut by the real
planner (:class:`distbert.engine.dispatcher.Dispatcher` with the run's :class:`ShapeLadder`) and
padded as a worker pads (:meth:`ShapeLadder.pad`), with no LoadGen, rank 0 or transport:

* pass ``first``: every batch in plan order on a freshly loaded backend without ``warmup()`` (each
  shape's first use is inside the pass), or pass ``after_warmup`` when ``--warmup`` runs
  ``backend.warmup()`` first (its time reported): equal to ``warm`` when warmup covers every shape;
* pass ``warm``: the same batches again;
* pass ``thread``: the same batches on a new thread (cuBLAS/cuDNN caches are per thread; a worker
  serves on a thread that is not the one that loaded the model). ``--thread-pass``, first variant only.

Each ``--variant`` is run one after another in this process: an SDPA kernel (``default``: the
backend's own choice), or a name with backend options (``old-mask:attn_mask=transformers``): the
SDPA A/B. A variant that differs from the loaded one only in its kernel reuses the backend
(``TorchBackend.set_sdpa``, see :class:`Runner`); others load afresh. A variant that fails (a kernel
that refuses a padded mask, an option the backend does not know) is recorded with its error and the
next one runs. ``--deadline-s`` bounds the whole run: no pass starts, and no
batch of a pass runs, after it; the JSON (rewritten after every pass) then says ``complete: false``.

    python3 bench/gpu_shapes.py --model DIR --device cuda --precision fp16 --plan exact --thread-pass \\
        --json out.json
    python3 bench/gpu_shapes.py --model DIR --device cuda --precision fp16 --plan ladder \\
        --variant auto --variant cudnn --variant efficient --variant flash --variant math \\
        --variant old-mask:attn_mask=transformers --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from distbert.backends import create  # noqa: E402 - the repo root is put on sys.path above
from distbert.backends.base import Backend, BackendSpec, ModelInputs  # noqa: E402
from distbert.backends.shapes import EXACT, ShapeLadder, resolve_ladder  # noqa: E402
from distbert.data.artifacts import resolve_squad  # noqa: E402
from distbert.data.squad.cache import FeatureStore  # noqa: E402
from distbert.data.squad.features import load_features  # noqa: E402
from distbert.engine.dispatcher import BatchPolicy, Dispatcher, SendBatch  # noqa: E402


def offline_plan(lengths: np.ndarray, samples: np.ndarray, max_batch: int, token_budget: int | None,
                 ladder: ShapeLadder) -> list[np.ndarray]:
    """The QSL indices of every Offline batch, in send order: the dispatcher's own cut of one
    ``on_samples`` call holding ``samples`` (LoadGen issues the whole Offline query at once), with
    one worker that returns each batch at once."""
    policy = BatchPolicy(max_batch=max_batch, token_budget=token_budget, credits=1, ladder=ladder)
    d = Dispatcher("Offline", policy, lengths, want_logits=False)
    todo = d.add_worker(1, 0.0, max_batch) + d.on_samples(np.arange(len(samples), dtype=np.uint64), samples, 0.0)
    batches: list[np.ndarray] = []
    while todo:
        instr = todo.pop(0)
        if isinstance(instr, SendBatch):
            batches.append(np.asarray(instr.indices))
            todo += d.on_result(instr.worker, instr.batch_id, 0.0)
    return batches


@dataclasses.dataclass(frozen=True)
class Batch:
    """A planned batch as the backend gets it (padded to its ladder shape) and its real row count."""

    inputs: ModelInputs
    rows: int            # real rows (samples); the rest are ladder padding

    @property
    def shape(self) -> tuple[int, int]:
        return self.inputs.shape


def build_batches(store: FeatureStore, plan: list[np.ndarray], ladder: ShapeLadder) -> list[Batch]:
    """Each batch gathered and trimmed (``FeatureStore.gather``) then padded to its ladder shape, as a
    worker does, all before any timing."""
    out = []
    for indices in plan:
        ids, mask, seg, lengths = store.gather(indices)
        out.append(Batch(ladder.pad(ModelInputs(np.asarray(indices, np.int64), ids, mask, seg, lengths)),
                         len(indices)))
    return out


def plan_stats(batches: list[Batch], ladder: ShapeLadder, max_batch: int, token_budget: int | None) -> dict[str, Any]:
    """What run.json reports per test (``batch_shapes``, ``padding_fraction``: padded tokens over
    tokens run), for this plan."""
    run = sum(b.inputs.input_ids.size for b in batches)
    real = sum(int(b.inputs.lengths[: b.rows].sum()) for b in batches)
    return {"ladder": ("exact" if ladder.exact else
                       {"step": ladder.step, "rows": list(ladder.rows), "token_budget": ladder.token_budget}),
            "max_batch": max_batch, "token_budget": token_budget,
            "samples": sum(b.rows for b in batches), "batches": len(batches),
            "batch_shapes": len({b.shape for b in batches}),
            "padding_fraction": round(1 - real / run, 4) if run else 0.0}


class Deadline:
    def __init__(self, seconds: float | None) -> None:
        self.at = None if seconds is None else time.monotonic() + seconds

    def passed(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at


def timed_pass(backend: Backend, batches: list[Batch], deadline: Deadline,
               on_thread: bool = False) -> dict[str, Any]:
    """Wall ms of ``backend.run`` per batch (it returns host arrays: the device work is done), in
    order; stops early at the deadline."""
    walls: list[float] = []

    def loop() -> None:
        for b in batches:
            if deadline.passed():
                return
            t0 = time.perf_counter()
            start, end = backend.run(b.inputs)
            np.asarray(start), np.asarray(end)
            walls.append((time.perf_counter() - t0) * 1e3)

    if on_thread:
        t = threading.Thread(target=loop, name="gpu-shapes-pass")
        t.start()
        t.join()
    else:
        loop()
    done = batches[: len(walls)]
    samples = sum(b.rows for b in done)
    total_s = sum(walls) / 1e3
    return {"batches": len(walls), "complete": len(walls) == len(batches), "samples": samples,
            "s": round(total_s, 4), "samples_per_s": round(samples / total_s, 1) if total_s else None,
            "ms": [round(w, 3) for w in walls]}


def per_shape(batches: list[Batch], passes: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per distinct shape, in order of first appearance: how many batches, the first batch's ms in
    each pass, and the median ms in the warm pass."""
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    for i, b in enumerate(batches):
        entry = rows.setdefault(b.shape, {"rows": b.shape[0], "length": b.shape[1], "count": 0, "_at": []})
        entry["count"] += 1
        entry["_at"].append(i)
    out = []
    for entry in rows.values():
        at = entry.pop("_at")
        for name, p in passes.items():
            ms = p["ms"]
            seen = [ms[i] for i in at if i < len(ms)]
            if seen:
                entry[f"{name}_first_ms"] = seen[0]
                if name == "warm":
                    entry["warm_median_ms"] = round(statistics.median(seen), 3)
        out.append(entry)
    return out


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """``NAME`` (an ``sdpa`` kernel, or ``default``: the backend's own choice) or ``NAME:k=v,k=v``
    (backend options, e.g. ``old-mask:attn_mask=transformers``) -> (name, options)."""
    name, _, rest = text.partition(":")
    if rest:
        pairs = [p.partition("=") for p in rest.split(",")]
        if any(not k or not sep for k, sep, _ in pairs):
            raise SystemExit(f"--variant {text}: write NAME or NAME:KEY=VALUE[,KEY=VALUE]")
        return name, {k.strip(): v.strip() for k, _, v in pairs}
    return name, ({} if name == "default" else {"sdpa": name})


class Runner:
    """Loads a backend per variant, or keeps the loaded one when only its ``sdpa`` kernel changes
    (``TorchBackend.set_sdpa``: no reload; the GEMMs' first use is then paid by the first variant
    only, so a reused variant's ``first`` pass shows the attention kernel's first use alone)."""

    def __init__(self, base: BackendSpec) -> None:
        self.base = base
        self.backend: Backend | None = None
        self.options: dict[str, str] = {}

    def get(self, options: dict[str, str], out: dict[str, Any]) -> Backend:
        merged = {**dict(self.base.options), **options}
        b = self.backend
        same_but_sdpa = ({k: v for k, v in merged.items() if k != "sdpa"}
                         == {k: v for k, v in self.options.items() if k != "sdpa"})
        if b is not None and same_but_sdpa and hasattr(b, "set_sdpa"):
            b.set_sdpa(merged.get("sdpa", "auto"))
            out["reused_backend"] = True
            self.options = merged
            return b
        self.close()
        spec = dataclasses.replace(self.base, options=tuple(merged.items()))
        b = create(spec)
        self.options = merged
        t0 = time.perf_counter()
        try:
            b.load()
        except BaseException:
            b.close()
            raise
        out["load_s"] = round(time.perf_counter() - t0, 2)
        self.backend = b
        return b

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None
            gc.collect()


def run_variant(out: dict[str, Any], runner: Runner, store: FeatureStore, args: argparse.Namespace,
                deadline: Deadline, thread_pass: bool, write: Callable[[], None]) -> None:
    """One variant into ``out`` (``name``, ``options`` set), written after every pass."""
    try:
        backend = runner.get(out["options"], out)
        spec = backend.spec
        hint = backend.batch_hint()
        max_batch = args.max_batch or hint.max_batch
        budget = args.token_budget if args.token_budget is not None else hint.token_budget
        ladder = EXACT if args.plan == "exact" else resolve_ladder(spec, args.shape_ladder, max_batch, budget)
        backend.set_shape_ladder(ladder)
        samples = np.arange(min(args.samples or len(store), len(store)), dtype=np.int64)
        batches = build_batches(store, offline_plan(store.lengths, samples, max_batch, budget, ladder), ladder)
        out["plan"] = plan_stats(batches, ladder, max_batch, budget)
        passes: dict[str, dict[str, Any]] = {}
        out["passes"] = passes
        if args.warmup:
            t0 = time.perf_counter()
            backend.warmup()
            out["warmup_s"] = round(time.perf_counter() - t0, 2)
        write()
        for pass_name, on_thread in ((("after_warmup" if args.warmup else "first"), False), ("warm", False),
                                     *((("thread", True),) if thread_pass else ())):
            if deadline.passed():
                break
            passes[pass_name] = timed_pass(backend, batches, deadline, on_thread)
            out["shapes"] = per_shape(batches, passes)
            write()
        cold = passes.get("first") or passes.get("after_warmup")
        warm = passes.get("warm")
        if cold and warm and cold["complete"] and warm["complete"]:
            out["first_use_extra_s"] = round(cold["s"] - warm["s"], 3)
        out["backend"] = backend.info()
    except Exception as exc:   # one variant's failure (a refused kernel) must not lose the others
        text = str(exc).strip()
        out["error"] = f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"
        runner.close()         # a failed forward may leave the backend half-way: the next variant reloads


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="backend option for every variant, as `distbert run`")
    ap.add_argument("--plan", choices=("exact", "ladder"), default="ladder",
                    help="exact: lengths trimmed exactly, any row count (the pre-ladder planner); ladder: the "
                         "run's shape ladder (--shape-ladder N, else the backend's policy)")
    ap.add_argument("--shape-ladder", type=int, help="ladder length step, as `distbert run --shape-ladder`")
    ap.add_argument("--max-batch", type=int, help="default: the backend's batch hint")
    ap.add_argument("--token-budget", type=int, help="default: the backend's batch hint")
    ap.add_argument("--samples", type=int, help="plan only the first N features (default: the whole dev set)")
    ap.add_argument("--warmup", action="store_true", help="call backend.warmup() before the first pass")
    ap.add_argument("--thread-pass", action="store_true", help="a third pass on a new thread (first variant)")
    ap.add_argument("--variant", action="append", metavar="NAME[:K=V,...]",
                    help="default | auto | flash | efficient | cudnn | math (an sdpa kernel), or NAME:K=V,... "
                         "(backend options); repeatable, run in order; default: one variant, default")
    ap.add_argument("--deadline-s", type=float, help="stop starting passes and batches after this many seconds")
    ap.add_argument("--dataset")
    ap.add_argument("--vocab")
    ap.add_argument("--json", type=Path, required=True, help="written after every pass")
    args = ap.parse_args()
    if any("=" not in o for o in args.option):
        ap.error("--option takes KEY=VALUE")
    deadline = Deadline(args.deadline_s)
    options = tuple((k.strip(), v.strip()) for k, _, v in (o.partition("=") for o in args.option))
    runner = Runner(BackendSpec(name=args.backend, model=args.model, device=args.device, precision=args.precision,
                                options=options))
    dataset, vocab = resolve_squad(args.dataset, args.vocab, download_missing=False)
    store = load_features(dataset, vocab)
    doc: dict[str, Any] = {"bench": "gpu_shapes", "date": time.strftime("%Y-%m-%d"), "device": args.device,
                           "precision": args.precision, "model": args.model, "plan": args.plan,
                           "warmup": args.warmup, "variants": [], "complete": False}

    def write() -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(args.json)

    variants = [parse_variant(v) for v in args.variant or ["default"]]
    for i, (name, opts) in enumerate(variants):
        if deadline.passed():
            break
        v: dict[str, Any] = {"name": name, "options": opts}
        doc["variants"].append(v)
        run_variant(v, runner, store, args, deadline, args.thread_pass and i == 0, write)
        write()
        passes = v.get("passes", {})
        print(json.dumps({"variant": name, "error": v.get("error"), "warmup_s": v.get("warmup_s"),
                          **{p: passes[p]["samples_per_s"] for p in passes},
                          "first_use_extra_s": v.get("first_use_extra_s"),
                          "batch_shapes": v.get("plan", {}).get("batch_shapes")}), flush=True)
    runner.close()
    doc["complete"] = len(doc["variants"]) == len(variants) and all(
        v.get("passes") and all(p["complete"] for p in v["passes"].values()) for v in doc["variants"]
        if "error" not in v)
    write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
