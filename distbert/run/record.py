"""What a finished run leaves behind: accuracy, ``run.json``, plots and the printed summary."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from distbert.backends import HARNESS
from distbert.backends.modelmaker import is_random_model
from distbert.config import RunConfig
from distbert.data.squad.accuracy import score_log, write_accuracy_txt
from distbert.data.squad.cache import FeatureStore
from distbert.engine.coordinator import Coordinator
from distbert.topology import Topology
from distbert.util.sysinfo import host_facts, source_facts

log = logging.getLogger(__name__)


def score(cfg: RunConfig, store: FeatureStore, logdir: Path) -> dict[str, Any]:
    """Score the accuracy log in ``logdir``, write ``accuracy.txt`` beside it; the figures for run.json."""
    result = score_log(logdir / "mlperf_log_accuracy.json", store)
    write_accuracy_txt(result, logdir / "accuracy.txt")
    out: dict[str, Any] = {"exact_match": result.exact_match, "f1": result.f1,
                           "coverage": result.coverage_line(), "verdicts": result.verdicts()}
    if result.n_questions_scored < result.n_questions_total:
        out["f1_scored_questions_only"] = result.f1_scored
    out["accuracy_meaningful"] = _meaningful(cfg)
    return out


def _meaningful(cfg: RunConfig) -> bool:
    """False for harness backends and generated random-weight models (their accuracy means nothing)."""
    spec = cfg.backend
    if spec.name in HARNESS or not spec.model:
        return False
    return not is_random_model(spec.model)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("distbert", "mlcommons-loadgen", "numpy", "pyzmq", "mpi4py", "onnxruntime", "torch",
                "transformers", "openvino", "tokenizers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def build_record(cfg: RunConfig, topology: Topology, coordinator: Coordinator, results: dict[str, Any],
                 started: float) -> dict[str, Any]:
    """run.json's content, ``source`` included: the distbert source that ran (its digest, the git
    commit and dirty flag), which a submission's code folder must hold."""
    workers = []
    for handle in sorted(coordinator.workers.values(), key=lambda h: h.worker):
        workers.append({"worker": handle.worker, "host": handle.host, "device": handle.device,
                        "backend": handle.backend, "lost": handle.lost, "info": handle.info,
                        "stats": handle.stats})
    return {
        "distbert_run": 1,
        "started": dt.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "finished": dt.datetime.now().isoformat(timespec="seconds"),
        "command": sys.argv,
        "config": json.loads(cfg.to_json()),
        "topology": dataclasses.asdict(topology),
        "workers": workers,
        "results": results,
        "accuracy_meaningful": _meaningful(cfg),
        "versions": _versions(),
        "source": source_facts(),
        "system": host_facts(),
    }


def write_json(path: Path, record: dict[str, Any]) -> None:
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")


def write_plots(record: dict[str, Any], out: Path) -> None:
    try:
        from distbert.run.plots import plot_run

        plot_run(record, out)
    except Exception as exc:  # a plot must never fail a run
        log.warning("could not draw plots: %s", exc)


def print_summary(record: dict[str, Any], final: Path) -> None:
    """The readable end of a run on stdout: figures, verdicts, and where the details are."""
    cfg = record["config"]
    lg = cfg["loadgen"]
    n = len(record["workers"])
    print(f"distbert {lg['scenario']} {lg['mode']} run, backend {cfg['backend']['name']}, "
          f"{n} worker{'s' if n != 1 else ''} -> {final}")
    for mode, res in record["results"].items():
        if mode == "skipped":
            print(f"  {', '.join(res['tests'])}: skipped ({res['why']})")
            continue
        if mode == "find_peak":
            print(f"  find-peak: highest VALID Server QPS {res['best_valid_qps']:,.1f} after {len(res['probes'])} "
                  f"probes of {res['probe_s']:g} s (the tests below ran at it; probes in {final}/find-peak/)")
            continue
        parts = []
        for key, label in (("result_samples_per_second", "samples/s"),
                           ("result_completed_samples_per_sec", "completed samples/s"),
                           ("result_scheduled_samples_per_sec", "scheduled samples/s")):
            if res.get(key) is not None:
                parts.append(f"{float(res[key]):,.1f} {label}")
        for key, label in (("result_99.00_percentile_latency_ns", "p99"),
                           ("result_90.00_percentile_latency_ns", "p90"),
                           ("result_mean_latency_ns", "mean")):
            if res.get(key) is not None:
                parts.append(f"{label} {float(res[key]) / 1e6:,.1f} ms")
        if res.get("result_validity"):
            parts.append(f"LoadGen: {res['result_validity']}")
        if "f1" in res:
            parts.append(f"exact_match {res['exact_match']:.3f}, f1 {res['f1']:.3f} (official)")
        parts.append(f"{res.get('loadgen_errors', 0)} LoadGen errors, {res.get('wall_s', 0):.1f} s")
        if res.get("rank0_cores_busy") is not None:
            parts.append(f"rank 0 busy {res['rank0_cores_busy']:.2f} cores")
        print(f"  {mode}: " + "; ".join(parts))
        if "verdicts" in res:
            print(f"  accuracy: {res['coverage']}")
            print("  accuracy: " + "; ".join(res["verdicts"]))
        if mode == "TEST05":
            print(f"  TEST05: performance {'PASS' if res.get('performance_pass') else 'FAIL'} (the TEST05 seeds; "
                  f"see {final}/TEST05/verify_performance.txt)")
        elif "performance_pass" in res:
            how = "same first bytes" if res["first_element_pass"] else "first bytes differ, F1 within the tolerance"
            print(f"  TEST01: accuracy {'PASS (' + how + ')' if res['accuracy_pass'] else 'FAIL'}, "
                  f"performance {'PASS' if res['performance_pass'] else 'FAIL'} (see {final}/TEST01/verify_*.txt)")
            if not res["performance_pass"] and lg["execution_mode"] == "test":
                print("  TEST01: test-mode runs last seconds, so their scores rarely match within 10 %; "
                      "use --execution-mode valid for a submission")
    if "accuracy" in record["results"] and not record["accuracy_meaningful"]:
        print("  note: this accuracy comes from a harness backend or a RANDOM-WEIGHT model: it is meaningless")
    print(f"  details: {final / 'run.json'}, LoadGen logs in {final}/<mode>/")
