#!/usr/bin/env python3
"""The JSON side of the device commands (``bench/gpu/cmd*.sh``, issue 19): prepare, collect, summarize.

    gpu_report.py prep --shape large --json WORK/dataset.json
        builds (or opens) the feature cache every later step reads, and writes the dev set's length
        statistics and the model's FLOPs per sample (the MFU basis below);
    gpu_report.py collect --cmd NAME --work WORK --out OUT/NAME.json [--limit-s S]
        one command's JSON: its steps (status, seconds), every bench JSON (``*.bench.json``) and a
        summary of every ``distbert run`` directory under WORK; run after every step, so a command
        cut short still leaves what it measured;
    gpu_report.py choose --cmd1-glob '/tmp/distbert-gpu/work-cmd1_shapes-*' --json WORK/choices.json
        cmd2's sdpa kernel and ladder from cmd1's results on the same warm machine (see :func:`choose`);
    gpu_report.py summary A.json [B.json ...] --out bench/results/gpu_check.json
        the issue's headline record from one or more commands' JSON (the device returns each
        command's files separately; run it here over the fetched files).

MFU. A padding-free forward pass over a sample of ``L`` real tokens costs

    F(L) = 2 * N * L + 4 * layers * hidden * L**2

floating-point operations: ``2 N`` per token (one multiply-add per parameter; ``N`` counts every
parameter of ``BertForQuestionAnswering``, embeddings included, 334.1 M for BERT-Large) plus the two
attention products (``Q K^T`` and ``softmax * V``, each ``2 * L**2 * hidden`` per layer). The mean of
F over the dev set's real lengths is 122.9 GFLOP for BERT-Large (mean length 178.5). Then

    mfu = samples_per_s * mean F / PEAK_FLOPS,   PEAK_FLOPS = 989e12

(H100 SXM and H200 dense fp16/bf16 tensor-core peak, datasheet; about 790e12 was measured on
random data on the lent machines, so ``mfu`` 0.8 is about the practical ceiling). Padding is
not counted as work: a run that pads pays for it in a lower MFU.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

#: H100 SXM / H200 dense fp16 and bf16 tensor-core peak (datasheet), FLOP/s
PEAK_FLOPS = 989e12
#: the last MFU basis of notes/gpu.md, measured bf16 matrix products on the lent machines
MEASURED_FLOPS = 790e12

#: the keys issue 19 names for bench/results/gpu_check.json (tests check them)
HEADLINE_KEYS = ("gpu", "precision", "date", "command", "offline_samples_per_s", "server_valid_qps",
                 "singlestream_p90_ms", "mfu", "bare_best_samples_per_s", "batch_shapes", "padding_fraction",
                 "sdpa", "rank0_cpu_share")


# ------------------------------------------------------------------------------------------ prep

def flops_per_sample(shape: Any, lengths: np.ndarray) -> float:
    """Mean F(L) over ``lengths`` (module docstring), ``shape`` a ``modelmaker.BertShape``."""
    from distbert.backends.modelmaker import weight_specs

    n_params = sum(int(np.prod(dims)) for _, dims, _ in weight_specs(shape))
    length = lengths.astype(np.float64)
    f = 2.0 * n_params * length + 4.0 * shape.num_hidden_layers * shape.hidden_size * length ** 2
    return float(f.mean())


def prep(args: argparse.Namespace) -> int:
    from distbert.backends.modelmaker import get_shape
    from distbert.data.artifacts import resolve_squad
    from distbert.data.squad.features import load_features

    dataset, vocab = resolve_squad(args.dataset, args.vocab, download_missing=False)
    store = load_features(dataset, vocab)
    lengths = np.asarray(store.lengths)
    shape = get_shape(args.shape)
    out = {"dataset": str(dataset), "features": len(store), "mean_length": round(float(lengths.mean()), 3),
           "model_shape": args.shape, "flops_per_sample": flops_per_sample(shape, lengths),
           "flops_formula": "mean over the dev set of 2*N*L + 4*layers*hidden*L^2 (N: all parameters)"}
    _write(args.json, out)
    print(json.dumps(out))
    return 0


# --------------------------------------------------------------------------------------- collect

def _find(doc: Any, key: str) -> Any:
    """The first value under ``key`` anywhere in ``doc`` (depth first), None if absent."""
    if isinstance(doc, dict):
        if key in doc:
            return doc[key]
        items: Any = doc.values()
    elif isinstance(doc, list):
        items = doc
    else:
        return None
    for v in items:
        found = _find(v, key)
        if found is not None:
            return found
    return None


def _first_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "?"
    return lines[0][:300] if lines else "?"


def run_summary(run_dir: Path) -> dict[str, Any]:
    """The figures of one ``distbert run`` directory (or its ``.failed`` twin)."""
    from distbert.data.loadgen_logs import read_detail

    if (run_dir / "error.txt").is_file():
        return {"failed": _first_line(run_dir / "error.txt")}
    try:
        record = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError) as exc:
        return {"failed": f"no readable run.json ({type(exc).__name__})"}
    results = record.get("results", {})
    perf = results.get("performance", {})
    scenario = record.get("config", {}).get("loadgen", {}).get("scenario")
    out: dict[str, Any] = {"scenario": scenario}
    detail_path = run_dir / "performance" / "mlperf_log_detail.txt"
    detail = read_detail(detail_path) if detail_path.is_file() else {}
    out["validity"] = detail.get("result_validity") or perf.get("result_validity")
    if scenario == "Offline":
        out["samples_per_s"] = detail.get("result_samples_per_second") or perf.get("result_samples_per_second")
    elif scenario == "Server":
        out["target_qps"] = record.get("config", {}).get("loadgen", {}).get("target_qps")
        out["scheduled_samples_per_s"] = detail.get("result_scheduled_samples_per_sec")
        out["completed_samples_per_s"] = detail.get("result_completed_samples_per_sec")
    else:
        out["qps"] = detail.get("result_qps_with_loadgen_overhead") or detail.get("result_samples_per_second")
    for pct in ("90.00", "99.00"):
        ns = detail.get(f"result_{pct}_percentile_latency_ns") or perf.get(f"result_{pct}_percentile_latency_ns")
        out[f"p{pct[:2]}_ms"] = round(float(ns) / 1e6, 3) if ns is not None else None
    mean = detail.get("result_mean_latency_ns") or perf.get("result_mean_latency_ns")
    out["mean_ms"] = round(float(mean) / 1e6, 3) if mean is not None else None
    busy = perf.get("rank0_cores_busy")
    cpus = record.get("system", {}).get("logical_cpus")
    out["rank0_cores_busy"] = busy
    out["rank0_cpu_share"] = round(busy / cpus, 4) if busy is not None and cpus else None
    for key in ("batch_shapes", "padding_fraction"):
        out[key] = perf.get(key)
    ladder = (perf.get("batch_policy") or {}).get("ladder")
    out["shape_ladder"] = ladder.get("step") if isinstance(ladder, dict) else ladder
    workers = record.get("workers", [])
    warm = [(w.get("info") or {}).get("warmup") or {} for w in workers]
    out["warmup_s"] = max((x["s"] for x in warm if x.get("s") is not None), default=None)
    out["warmup_shapes"] = max((x["shapes"] for x in warm if x.get("shapes") is not None), default=None)
    cold = [(w.get("stats") or {}).get("cold_batches") for w in workers]
    out["cold_batches"] = sum(c for c in cold if c is not None) if any(c is not None for c in cold) else None
    out["sdpa"] = _find(workers, "sdpa")
    out["attn_mask"] = _find(workers, "attn_mask")
    peak = results.get("find_peak")
    if peak:
        out["find_peak"] = {k: peak.get(k) for k in ("best_valid_qps", "lowest_invalid_qps", "probe_s")}
        out["find_peak"]["probes"] = len(peak.get("probes", []))
    backend = record.get("config", {}).get("backend", {})
    out["options"] = {k: v for k, v in backend.get("options", []) if k not in ("sim_latency", "random_shape")}
    out["workers"] = len(record.get("workers", []))
    out["in_process_worker"] = record.get("config", {}).get("in_process_worker")
    out["wall_s"] = perf.get("wall_s")
    return out


def _run_dirs(work: Path) -> dict[str, Path]:
    """Every run directory under ``work`` (one level), by name without ``.failed``."""
    out = {}
    for d in sorted(work.iterdir()):
        if d.is_dir() and ((d / "run.json").is_file() or (d / "error.txt").is_file()):
            out[d.name.removesuffix(".failed")] = d
    return out


def collect(args: argparse.Namespace) -> int:
    work = Path(args.work)
    doc: dict[str, Any] = {"command": args.cmd, "dry_run": args.dry_run, "date": _today(),
                           "limit_s": args.limit_s, "steps": [], "env": None, "dataset": None,
                           "benches": {}, "runs": {}}
    for key in ("env", "dataset", "choices"):
        if (work / f"{key}.json").is_file():
            doc[key] = _read(work / f"{key}.json")
    steps = work / "steps.jsonl"
    if steps.is_file():
        doc["steps"] = [json.loads(line) for line in steps.read_text().splitlines() if line.strip()]
    for path in sorted(work.glob("*.bench.json")):
        doc["benches"][path.name.removesuffix(".bench.json")] = _read(path)
    for name, d in _run_dirs(work).items():
        doc["runs"][name] = run_summary(d)
    doc["elapsed_s"] = max((s.get("end_s", 0) for s in doc["steps"]), default=0)
    doc["complete"] = bool(doc["steps"]) and all(s.get("status") == "ok" for s in doc["steps"])
    _write(Path(args.out), doc)
    return 0


# ---------------------------------------------------------------------------------------- choose

#: a kernel replaces the backend's default only when its warm pass beats the default's by this much
CHOOSE_MARGIN = 1.03


def choose(args: argparse.Namespace) -> int:
    """cmd2's options from cmd1's results on the same (warm) machine, so that no one has to decide
    between the two calls: the SDPA kernel whose warm pass over the ladder plan was fastest (only
    ``sdpa`` variants: graphs=1 needs a mask form it can capture), and a coarser ladder
    (``--shape-ladder COARSE_STEP``) when cmd1's Offline warm-up took more than ``--warmup-budget-s``,
    or its run was cut at the step's limit (cmd2's four full-ladder runs each pay it). Prints the
    ``distbert run`` arguments one per line and writes the reasons to ``--json``; prints nothing
    without cmd1's results."""
    work = sorted(Path(p) for p in glob.glob(args.cmd1_glob))
    picks: list[str] = []
    why: dict[str, Any] = {"cmd1_work": str(work[-1]) if work else None, "sdpa": None, "shape_ladder": None}
    if work:
        bench = work[-1] / f"shapes-ladder-{args.precision}.bench.json"
        if bench.is_file() and not args.keep_sdpa:
            rates = {v["name"]: v["passes"]["warm"]["samples_per_s"] for v in _read(bench).get("variants", [])
                     if "error" not in v and set(v.get("options", {})) <= {"sdpa"}
                     and (v.get("passes", {}).get("warm") or {}).get("complete")}
            base = rates.get("auto") or rates.get("default")
            if rates and base:
                best = max(rates, key=lambda k: rates[k])
                why["sdpa"] = {"warm_samples_per_s": rates, "chosen": best if rates[best] > CHOOSE_MARGIN * base
                               else None}
                if why["sdpa"]["chosen"] not in (None, "auto", "default"):
                    picks += ["--option", f"sdpa={best}"]
        run = work[-1] / f"offline-ladder-{args.precision}"
        steps = work[-1] / "steps.jsonl"
        timed_out = steps.is_file() and any(
            json.loads(line).get("step") == run.name and json.loads(line).get("status") == "timeout"
            for line in steps.read_text().splitlines() if line.strip())
        if ((run / "run.json").is_file() or timed_out) and not args.keep_ladder:
            # a run cut at its step's limit spent it warming up, most likely: as good as over budget
            warmup = run_summary(run).get("warmup_s") if (run / "run.json").is_file() else None
            coarse = timed_out or (warmup is not None and warmup > args.warmup_budget_s)
            why["shape_ladder"] = {"cmd1_warmup_s": warmup, "cmd1_run_timed_out": timed_out,
                                   "budget_s": args.warmup_budget_s, "chosen": args.coarse_step if coarse else None}
            if coarse:
                picks += ["--shape-ladder", str(args.coarse_step)]
    _write(args.json, why)
    for arg in picks:
        print(arg)
    return 0


# --------------------------------------------------------------------------------------- summary

def _best(runs: dict[str, dict], scenario: str, value: str, prefer: str = "max") -> tuple[str | None, dict | None]:
    """The run of ``scenario`` with the best ``value`` (among runs that did not fail)."""
    found = [(n, r) for n, r in runs.items() if r.get("scenario") == scenario and r.get(value) is not None]
    if not found:
        return None, None
    pick = max if prefer == "max" else min
    return pick(found, key=lambda nr: nr[1][value])


def summary(args: argparse.Namespace) -> int:
    missing = [p for p in args.inputs if not Path(p).is_file()]
    if missing:
        print(f"gpu_report.py summary: {', '.join(missing)}: no such file (a command's $OUT/<cmd>.json)",
              file=sys.stderr)
        return 2
    docs = [_read(Path(p)) for p in args.inputs]
    runs: dict[str, dict] = {}
    benches: dict[str, Any] = {}
    env: dict[str, Any] = {}
    dataset: dict[str, Any] = {}
    for doc in docs:
        runs.update({f"{doc['command']}/{k}": v for k, v in doc.get("runs", {}).items()})
        benches.update({f"{doc['command']}/{k}": v for k, v in doc.get("benches", {}).items()})
        env = env or (doc.get("env") or {})
        dataset = dataset or (doc.get("dataset") or {})
    precision = args.precision
    mine = {n: r for n, r in runs.items() if _precision_of(n) == precision}

    off_name, off = _best(mine, "Offline", "samples_per_s")
    ss_name, ss = _best(mine, "SingleStream", "p90_ms", prefer="min")
    server = [(n, r) for n, r in mine.items() if _valid_qps(r)]
    srv_name, srv = max(server, key=lambda nr: _valid_qps(nr[1]) or 0, default=(None, None))
    bare = [(n.split("/", 1)[0], b["best_samples_per_s"]) for n, b in benches.items()
            if n.split("/", 1)[1] == f"bare-{precision}" and b.get("best_samples_per_s")]
    bare_cmd, bare_best = max(bare, key=lambda cb: cb[1], default=(None, None))
    # the ratio: distbert's Offline against the bare loop measured in the same command
    _, same = _best({n: r for n, r in mine.items() if n.split("/", 1)[0] == bare_cmd}, "Offline", "samples_per_s")
    flops = dataset.get("flops_per_sample")
    rate = off["samples_per_s"] if off else None
    shares = {n: r["rank0_cpu_share"] for n, r in mine.items() if r.get("rank0_cpu_share") is not None}
    out: dict[str, Any] = {
        "gpu": env.get("gpu"),
        "precision": precision,
        "date": min((d.get("date") for d in docs if d.get("date")), default=_today()),
        "command": " ; ".join(f"bash bench/gpu/{d['command']}.sh" for d in docs),
        "dry_run": any(d.get("dry_run") for d in docs),
        "offline_samples_per_s": rate,
        "offline_run": off_name,
        "server_valid_qps": _valid_qps(srv) if srv else None,
        "server_run": srv_name,
        "singlestream_p90_ms": ss["p90_ms"] if ss else None,
        "singlestream_run": ss_name,
        "mfu": round(rate * flops / PEAK_FLOPS, 4) if rate and flops else None,
        "mfu_basis": (f"samples/s x {flops / 1e9:.1f} GFLOP (mean over the dev set's real lengths of "
                      f"2*N*L + 4*layers*hidden*L^2) / {PEAK_FLOPS / 1e12:.0f} TFLOP/s dense 16-bit peak"
                      if flops else None),
        "mfu_vs_measured_790": round(rate * flops / MEASURED_FLOPS, 4) if rate and flops else None,
        "bare_best_samples_per_s": bare_best,
        "offline_vs_bare": round(same["samples_per_s"] / bare_best, 3) if same and bare_best else None,
        "batch_shapes": off.get("batch_shapes") if off else None,
        "padding_fraction": off.get("padding_fraction") if off else None,
        "sdpa": next((r["sdpa"] for r in (off, ss, srv) if r and r.get("sdpa")), None),
        "rank0_cpu_share": shares.get(off_name) if off_name else None,
        "ss_bare": _ss_bare(benches, precision),
        "rank0_cpu_share_per_run": shares,
        "cmd2_choices": next((d["choices"] for d in docs if d.get("choices")), None),
        "software": env.get("software"),
        "targets": {"offline_samples_per_s": 4600, "offline_vs_bare": 0.9, "server_valid_qps": 3600,
                    "singlestream_p90_ms": 2.0},
        "runs": runs,
        "benches": {n: _bench_brief(b) for n, b in benches.items()},
        "steps": {d["command"]: d.get("steps", []) for d in docs},
    }
    _write(Path(args.out), out)
    print(_table(docs, runs, benches))
    print(json.dumps({k: out[k] for k in HEADLINE_KEYS + ("offline_vs_bare", "dry_run")}, indent=1))
    return 0


def _table(docs: list[dict[str, Any]], runs: dict[str, dict], benches: dict[str, Any]) -> str:
    """A short text table for the end of a device command's output (the reply shows only its tail):
    each step, each run, each backend-alone variant."""
    lines = ["step                              status   s"]
    for d in docs:
        lines += [f"{d['command']}/{s['step']:<24} {s['status']:<8} {s.get('wall_s', 0):>3}"
                  for s in d.get("steps", [])]
    lines.append("run                               result                  p90 ms  warm-up s  cold  shapes  pad")
    for name, r in runs.items():
        if "failed" in r:
            lines.append(f"{name:<33} FAILED: {r['failed'][:80]}")
            continue
        rate = (r.get("samples_per_s") or _valid_qps(r) or r.get("completed_samples_per_s") or r.get("qps"))
        what = f"{rate or 0:,.1f} {'VALID QPS' if r.get('find_peak') else '/s'} {r.get('validity') or ''}"
        lines.append(f"{name:<33} {what:<23} {r.get('p90_ms') or '-':>6}  {r.get('warmup_s') or '-':>9}  "
                     f"{r.get('cold_batches') if r.get('cold_batches') is not None else '-':>4}  "
                     f"{r.get('batch_shapes') or '-':>6}  {r.get('padding_fraction') or '-'}")
    lines.append("backend alone: variant             first /s   warm /s  thread /s  first-use extra s  shapes")
    for name, b in benches.items():
        for v in b.get("variants", []):
            p = v.get("passes", {})
            rate = {k: (p.get(k) or {}).get("samples_per_s") for k in ("first", "after_warmup", "warm", "thread")}
            label = f"{name.rsplit('/', 1)[-1]}:{v['name']}"
            if "error" in v:
                lines.append(f"{label:<34} ERROR {v['error'][:70]}")
                continue
            lines.append(f"{label:<34} {rate['first'] or rate['after_warmup'] or '-':>8}  {rate['warm'] or '-':>8}  "
                         f"{rate['thread'] or '-':>9}  {v.get('first_use_extra_s', '-'):>17}  "
                         f"{v.get('plan', {}).get('batch_shapes', '-'):>6}")
        if b.get("bench") == "ss_bare":
            lines.append(f"{name.rsplit('/', 1)[-1]:<34} p90 {b.get('p90_ms')} ms (cold {b['cold'].get('p90_ms')}, "
                         f"warm {b['warm'].get('p90_ms')}; {b.get('queries')} queries)")
    return "\n".join(lines)


def _valid_qps(run: dict[str, Any]) -> float | None:
    """A Server run's highest VALID QPS: its --find-peak result, else its own target when VALID."""
    if run.get("scenario") != "Server":
        return None
    if run.get("find_peak"):
        return run["find_peak"].get("best_valid_qps")
    return run.get("target_qps") if run.get("validity") == "VALID" else None


def _ss_bare(benches: dict[str, Any], precision: str) -> dict[str, Any] | None:
    """bench/ss_bare.py's SingleStream floor (p90 over all queries, cold and warm shapes apart):
    distbert's SingleStream p90 minus this is what the harness adds (issue 11)."""
    out = {}
    for name, b in benches.items():
        tail = name.rsplit("/", 1)[-1]
        if tail in (f"ss-bare-{precision}", f"ss-bare-thread-{precision}"):
            out["thread" if "thread" in tail else "main"] = {
                "p90_ms": b.get("p90_ms"), "cold_p90_ms": (b.get("cold") or {}).get("p90_ms"),
                "warm_p90_ms": (b.get("warm") or {}).get("p90_ms"), "queries": b.get("queries")}
    return out or None


def _precision_of(run_name: str) -> str | None:
    """Run names end in their precision (``cmd2_check/offline-eager-fp16``)."""
    tail = run_name.rsplit("-", 1)[-1]
    return tail if tail in ("fp32", "fp16", "bf16") else None


def _bench_brief(bench: dict[str, Any]) -> dict[str, Any]:
    """A bench JSON without its per-batch millisecond lists (they stay in the command's own JSON)."""
    if bench.get("bench") != "gpu_shapes":
        return {k: v for k, v in bench.items() if k != "backend"}
    variants = []
    for v in bench.get("variants", []):
        passes = {p: {k: x for k, x in d.items() if k != "ms"} for p, d in v.get("passes", {}).items()}
        variants.append({**{k: x for k, x in v.items() if k not in ("passes", "shapes", "backend")},
                         "passes": passes})
    return {**{k: x for k, x in bench.items() if k != "variants"}, "variants": variants}


# ----------------------------------------------------------------------------------------- shared

def _today() -> str:
    return datetime.date.today().isoformat()


def _read(path: Path) -> Any:
    return json.loads(path.read_text())


def _write(path: Path, doc: Any) -> None:
    """Atomically: a reader (or a kill) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("prep", help="feature cache + dev-set length statistics + FLOPs per sample")
    p.add_argument("--shape", default="large")
    p.add_argument("--dataset")
    p.add_argument("--vocab")
    p.add_argument("--json", type=Path, required=True)
    p.set_defaults(handler=prep)
    c = sub.add_parser("collect", help="one command's JSON from its work folder")
    c.add_argument("--cmd", required=True)
    c.add_argument("--work", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--limit-s", type=int)
    c.add_argument("--dry-run", action="store_true")
    c.set_defaults(handler=collect)
    ch = sub.add_parser("choose", help="cmd2's sdpa kernel and ladder from cmd1's results")
    ch.add_argument("--cmd1-glob", required=True, help="cmd1's work folders (the newest is read)")
    ch.add_argument("--precision", default="fp16")
    ch.add_argument("--warmup-budget-s", type=float, default=60.0)
    ch.add_argument("--coarse-step", type=int, default=32)
    ch.add_argument("--keep-sdpa", action="store_true", help="never pass an sdpa option")
    ch.add_argument("--keep-ladder", action="store_true", help="never pass a coarser ladder")
    ch.add_argument("--json", type=Path, required=True)
    ch.set_defaults(handler=choose)
    s = sub.add_parser("summary", help="the gpu_check.json record from commands' JSON")
    s.add_argument("inputs", nargs="+")
    s.add_argument("--precision", default="fp16")
    s.add_argument("--out", required=True)
    s.set_defaults(handler=summary)
    args = ap.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
