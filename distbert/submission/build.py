"""Build an MLPerf submission tree, tarball and summary from ``distbert run --mode submission`` runs.

One run directory per scenario (closed bert: Offline and SingleStream; v4.1 datacenter: Server and
Offline), each holding the performance, accuracy and compliance logs. The tree follows the layout of
the round given as ``version`` (:mod:`distbert.submission.rules`); v6.x, as the official checker
accepts it (``../shared/MLPERF.md``, Appendix)::

    OUT/<division>/<submitter>/systems/<system>.json
    OUT/<division>/<submitter>/src/<benchmark>/README.md
    OUT/<division>/<submitter>/documentation/calibration.md
    OUT/<division>/<submitter>/results/<system>/<benchmark>/<Scenario>/...   (TEST01/ and measurements.json inside)
    OUT/mlperf_submission.tar.gz, OUT/summary.csv, OUT/summary.txt

v5.x and v4.1 keep ``code/<benchmark>/distbert/`` instead of ``src/``, the compliance tests under
``compliance/<system>/<benchmark>/<Scenario>/TEST01`` (v4.1: also ``TEST05``), and the measurements
file as ``measurements/<system>/<benchmark>/<Scenario>/<system>_distbert_<Scenario>.json`` beside
README.md and user.conf (v4.1: and mlperf.conf).

Accuracy logs are truncated as ``truncate_accuracy_log.py`` does (first and last 4 KiB, the sha256 of
the full log appended to ``accuracy.txt`` as ``hash=``). The tree is written under a temporary name
and renamed into place, then checked with :mod:`distbert.submission.check`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from distbert.errors import UserError
from distbert.submission.rules import LOADGEN_ROUND, RuleSet, rules
from distbert.util.sysinfo import source_digest, source_facts, source_files

log = logging.getLogger(__name__)

TRUNCATE_KEEP = 4096          # truncate_accuracy_log.py keeps the first and the last 4 KiB
REQUIRED_SCENARIOS = ("Offline", "SingleStream")   # closed bert-99/bert-99.9, edge suite (v5.0 on)
IMPLEMENTATION = "distbert"   # the implementation id in v5.x/v4.1 paths and measurement file names
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")

# official starting weights, by the file name distbert ran (MLPERF.md: public download locations)
STARTING_WEIGHTS = {"model.onnx": "model.onnx (zenodo 3733910)",
                    "bert_large_v1_1_fake_quant.onnx": "bert_large_v1_1_fake_quant.onnx (zenodo 3750364)",
                    "model.pytorch": "model.pytorch (zenodo 3733896)"}

# system-description fields distbert cannot know; they must come from --system-json
USER_FIELDS = ("host_memory_configuration", "host_storage_type", "cooling")
GPU_USER_FIELDS = ("accelerator_host_interconnect", "accelerator_memory_configuration", "accelerator_interconnect")
NETWORK_USER_FIELDS = ("host_networking", "host_network_card_count", "host_networking_topology")


def is_gpu_device(device: object) -> bool:
    return str(device or "").startswith(("cuda", "rocm"))


def required_system_fields(hosts: Collection[str], devices: Collection[object]) -> dict[str, str]:
    """The system-description fields no run can measure that the tree needs, each with why: always
    USER_FIELDS; the accelerator fields when any worker has a GPU (``devices``: the workers'); the
    multi-node networking fields when the runs span more than one host (``hosts``: rank 0's and
    every worker's). The one rule the pre-flight (:mod:`distbert.submission.flow`, before any run)
    and the build (from the runs' records) both ask, so the first cannot pass what the second refuses."""
    need = {k: "no run can measure these" for k in USER_FIELDS}
    gpus = sorted({str(d) for d in devices if is_gpu_device(d)})
    if gpus:
        need |= {k: f"a worker runs on {gpus[0]}" for k in GPU_USER_FIELDS}
    if len(set(hosts)) > 1:
        named = ", ".join(sorted(set(hosts)))
        need |= {k: f"the runs span {len(set(hosts))} hosts: {named}" for k in NETWORK_USER_FIELDS}
    return need


def missing_system_fields(need: dict[str, str], given: dict[str, Any]) -> str:
    """``""`` when ``given`` has every field of ``need``, else the missing ones grouped by why
    (``"a, b (why); c (why)"``)."""
    groups: dict[str, list[str]] = {}
    for k, why in need.items():
        if given.get(k) in (None, ""):
            groups.setdefault(why, []).append(k)
    return "; ".join(f"{', '.join(keys)} ({why})" for why, keys in groups.items())


@dataclasses.dataclass(frozen=True)
class Run:
    path: Path
    record: dict[str, Any]

    @property
    def scenario(self) -> str:
        return self.record["config"]["loadgen"]["scenario"]

    @property
    def loadgen(self) -> dict[str, Any]:
        return self.record["config"]["loadgen"]

    @property
    def backend(self) -> dict[str, Any]:
        return self.record["config"]["backend"]


def load_run(path: Path, compliance_tests: Sequence[str] = ("TEST01",)) -> Run:
    record_path = path / "run.json"
    if not record_path.is_file():
        hint = " (a failed run)" if path.name.endswith(".failed") else ""
        raise UserError(f"{path}{hint} has no run.json: give a directory written by `distbert run --mode submission`")
    record = json.loads(record_path.read_text())
    mode = record["config"]["loadgen"]["mode"]
    if mode != "submission":
        raise UserError(f"{path} is a --mode {mode} run: a submission needs `distbert run --mode submission` "
                        "(performance, accuracy and TEST01)")
    needed = ["performance/mlperf_log_detail.txt", "accuracy/mlperf_log_accuracy.json", "accuracy/accuracy.txt",
              "TEST01/mlperf_log_accuracy.json", "TEST01/verify_accuracy.txt", "TEST01/verify_performance.txt"]
    if "TEST05" in compliance_tests:
        needed += ["TEST05/mlperf_log_detail.txt", "TEST05/verify_performance.txt"]
    for sub in needed:
        if not (path / sub).is_file():
            raise UserError(f"{path / sub} is missing: rerun `distbert run --mode submission`")
    return Run(path, record)


def run_digests(run: Run) -> set[str | None]:
    """The digest of every distbert source a run's parts ran (a redone part ran in a process of its own)."""
    digests = {(run.record.get("source") or {}).get("digest")}
    for part in (run.record.get("results") or {}).values():
        if isinstance(part, dict) and "source_digest" in part:
            digests.add(part["source_digest"])
    return digests


def _source_mismatch(run: Run, source: dict[str, Any]) -> str | None:
    """Why the tree's code folder (the ``source`` building it) would not hold what ``run`` ran, or None."""
    digests = run_digests(run)
    if None in digests:
        return ("it recorded no distbert source (made by a distbert before that), so the tree's code folder cannot be "
                "shown to hold what ran: run it again")
    if digests - {source["digest"]}:
        ran = run.record.get("source") or {}
        what = (f"commit {ran['commit'][:12]}{' with local changes' if ran.get('dirty') else ''}" if ran.get("commit")
                else f"source {ran.get('digest', '?')[:12]}")
        return (f"it ran other distbert source ({what}) than the one building the tree ({source['digest'][:12]}): "
                "build with the source it ran, so the tree's code folder holds that")
    return None


def why_invalid(run: Run, benchmark: str, source: dict[str, Any] | None = None) -> list[str]:
    """Reasons this run cannot be part of a real submission (empty = none); ``source``: the distbert
    source building the tree (:func:`sysinfo.source_facts`), which must be the one the run ran."""
    reasons = []
    mismatch = _source_mismatch(run, source) if source is not None else None
    if mismatch:
        reasons.append(mismatch)
    perf = run.record.get("results", {}).get("performance") or {}
    if run.loadgen["execution_mode"] == "valid" and perf.get("result_validity") not in (None, "VALID"):
        reasons.append(f"LoadGen called its performance run {perf.get('result_validity')}")
    if run.loadgen["execution_mode"] != "valid":
        reasons.append("it ran with --execution-mode test (short run, not the MLPerf rules)")
    lowered = run.loadgen.get("min_duration_ms")
    if run.loadgen["execution_mode"] == "valid" and lowered is not None and lowered < 600_000:
        reasons.append(f"it lowered --min-duration-ms to {lowered} (the rules need 600000)")
    if run.record["config"].get("max_examples"):
        reasons.append(f"it used --max-examples {run.record['config']['max_examples']} (not the whole dev set)")
    if not run.record.get("accuracy_meaningful"):
        reasons.append("its model is a harness backend or random weights (accuracy meaningless)")
    if run.loadgen.get("benchmark", "bert-99") != benchmark:
        reasons.append(f"it ran for --benchmark {run.loadgen.get('benchmark')}, not {benchmark}")
    return reasons


def truncate_accuracy(src_log: Path, src_txt: Path | None, dst_dir: Path) -> None:
    """Copy an accuracy log truncated, and accuracy.txt with ``hash=<sha256 of the full log>``."""
    data = src_log.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    dst_dir.mkdir(parents=True, exist_ok=True)
    if len(data) > 2 * TRUNCATE_KEEP:
        data = data[:TRUNCATE_KEEP] + b"\n\n...\n\n" + data[-TRUNCATE_KEEP:]
    (dst_dir / "mlperf_log_accuracy.json").write_bytes(data)
    text = src_txt.read_text() if src_txt is not None and src_txt.is_file() else ""
    (dst_dir / "accuracy.txt").write_text(text.rstrip("\n") + f"\nhash={digest}\n")


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)


def _framework(run: Run) -> str:
    runtimes = sorted({str(w.get("info", {}).get("runtime")) for w in run.record.get("workers", [])
                       if w.get("info", {}).get("runtime")})
    return ", ".join(runtimes) or run.backend["name"]


def _software(run: Run) -> str:
    versions = run.record.get("versions", {})
    keys = ("python", "distbert", "mlcommons-loadgen", "numpy", "pyzmq", "mpi4py", "onnxruntime", "torch",
            "openvino", "transformers")
    return ", ".join(f"{k} {versions[k]}" for k in keys if k in versions)


def system_description(runs: Sequence[Run], submitter: str, system: str, division: str,
                       overrides: dict[str, Any], allow_invalid: bool, system_type: str = "edge") -> dict[str, Any]:
    """``systems/<system>.json``: measured facts, then the user's ``overrides``."""
    facts = runs[0].record.get("system") or {}
    workers = [w for run in runs for w in run.record.get("workers", [])]
    hosts = sorted({w.get("host") for w in workers if w.get("host")}) or [facts.get("hostname")]
    # rank 0 is part of the system too: a run whose workers all sit on one other host spans two
    spanned = {str(h) for h in [*hosts, *(run.record.get("system", {}).get("hostname") for run in runs)] if h}
    need = required_system_fields(spanned, [w.get("device") for w in workers])
    gpu_devices = {(w.get("host"), w.get("device")) for w in workers if is_gpu_device(w.get("device"))}
    per_node = max(1, round(len(gpu_devices) / max(1, len(hosts)))) if gpu_devices else 0
    gpus = facts.get("gpus") or []
    sockets = facts.get("sockets") or 1
    desc: dict[str, Any] = {
        "division": division, "submitter": submitter, "status": "available", "system_name": system,
        "system_type": system_type, "system_type_detail": "N/A", "number_of_nodes": len(hosts),
        "host_processor_model_name": facts.get("cpu_model") or "",
        "host_processors_per_node": sockets,
        "host_processor_core_count": max(1, (facts.get("cores") or 1) // sockets),
        "host_processor_frequency": "", "host_processor_caches": "", "host_processor_interconnect": "",
        "host_memory_capacity": f"{facts['memory_gb']} GB" if facts.get("memory_gb") else "",
        "host_memory_configuration": "",
        "host_storage_capacity": f"{facts['disk_gb']} GB" if facts.get("disk_gb") else "",
        "host_storage_type": "",
        **{k: "" if k in need else "N/A" for k in NETWORK_USER_FIELDS},
        "accelerators_per_node": str(per_node),
        "accelerator_model_name": gpus[0]["name"] if per_node and gpus else ("" if per_node else "N/A"),
        "accelerator_memory_capacity": gpus[0]["memory"] if per_node and gpus else ("" if per_node else "N/A"),
        "accelerator_frequency": "", **{k: "" if k in need else "N/A" for k in GPU_USER_FIELDS},
        "accelerator_interconnect_topology": "", "accelerator_on-chip_memories": "",
        "cooling": "", "framework": _framework(runs[0]), "operating_system": facts.get("os") or "",
        "other_software_stack": _software(runs[0]), "hw_notes": "",
        "sw_notes": f"distbert harness: {len(hosts)} node(s), {len(workers) // max(1, len(runs))} worker(s) per run",
    }
    desc.update(overrides)
    desc["division"], desc["submitter"], desc["system_name"] = division, submitter, overrides.get("system_name", system)
    measured = ["host_processor_model_name", "host_memory_capacity", "host_storage_capacity", "operating_system"]
    if per_node:
        measured += ["accelerator_model_name", "accelerator_memory_capacity"]
    need |= {k: "distbert could not measure these on rank 0's host" for k in measured}
    missing = missing_system_fields(need, desc)
    if missing and not allow_invalid:
        raise UserError(f"the system description needs {missing}: give them in a JSON file with --system-json "
                        "(e.g. {\"cooling\": \"air\", ...})")
    for k in need:
        if desc.get(k) in ("", None):
            desc[k] = "N/A (not given)"
    return desc


def measurements(run: Run) -> dict[str, Any]:
    model = Path(run.backend.get("model") or "")
    precision = run.backend.get("precision", "fp32")
    weights = STARTING_WEIGHTS.get(model.name) or STARTING_WEIGHTS.get(
        "model.pytorch" if (model / "model.pytorch").exists() else "", "")
    if not weights:
        weights = (f"{model.name or run.backend['name']} (not an official MLPerf model: "
                   "random weights or a harness backend)" if not run.record.get("accuracy_meaningful")
                   else model.name)
    return {"input_data_types": "int64", "retraining": "No", "starting_weights_filename": weights,
            "weight_data_types": precision,
            "weight_transformations": "none" if precision in ("fp32", "int8") else f"cast to {precision} at load"}


def _scenario_readme(run: Run, benchmark: str) -> str:
    res = run.record.get("results", {})
    perf, acc, t01 = res.get("performance", {}), res.get("accuracy", {}), res.get("TEST01", {})
    lines = [f"# {benchmark} {run.scenario}", "",
             f"Produced by distbert {run.record.get('versions', {}).get('distbert', '?')} on "
             f"{run.record.get('started')}, {len(run.record.get('workers', []))} worker(s), backend "
             f"{run.backend['name']} ({run.backend.get('precision')}, {run.backend.get('device')}).", "",
             "Command:", "", "```", " ".join(run.record.get("command", [])), "```", "",
             f"- performance: {json.dumps({k: v for k, v in perf.items() if k.startswith('result_')})}",
             f"- accuracy: exact_match {acc.get('exact_match')}, f1 {acc.get('f1')}",
             f"- TEST01: accuracy {'PASS' if t01.get('accuracy_pass') else 'FAIL'}, "
             f"performance {'PASS' if t01.get('performance_pass') else 'FAIL'}", ""]
    return "\n".join(lines)


def _src_readme(runs: Sequence[Run], benchmark: str, source: dict[str, Any]) -> str:
    version = runs[0].record.get("versions", {}).get("distbert", "?")
    commit = source.get("commit")
    origin = (f"git commit {commit}" + (" with local changes (the files here are the ones that ran)"
                                        if source.get("dirty") else "") if commit else "an installed package (no git)")
    lines = [f"# {benchmark} with distbert {version}", "",
             "distbert is a distributed harness for MLPerf Inference BERT: rank 0 runs LoadGen and scatters "
             "length-sorted, trimmed batches of sample indices over ZeroMQ or MPI to worker ranks that run "
             "ONNX Runtime, PyTorch or OpenVINO.", "",
             f"`distbert/` here is the harness's source as it ran: {origin}; sha256 over its {source['files']} files "
             f"(names and contents, `distbert.util.sysinfo.source_digest`): `{source['digest']}`. "
             "`source.json` says the same, with the software versions.", "",
             f"Software: {_software(runs[0])}.", "",
             "Install: `pip install .` from a distbert checkout with these files as its `distbert/` (or "
             "`launch/setup.sh` there: it creates .venv).", "", "Commands used:", ""]
    lines += [f"- {run.scenario}: `{' '.join(run.record.get('command', []))}`" for run in runs]
    return "\n".join(lines) + "\n"


def _code_folder(code: Path, runs: Sequence[Run], benchmark: str, source: dict[str, Any]) -> None:
    """The round's code folder: distbert's package files as they ran, README.md and source.json."""
    root = Path(source["path"])
    for rel in source_files(root):
        _copy(root / rel, code / IMPLEMENTATION / rel)
    copied, _count = source_digest(code / IMPLEMENTATION)
    if copied != source["digest"]:
        raise UserError(f"the distbert source in {root} changed while the tree was built: build again")
    (code / "README.md").write_text(_src_readme(runs, benchmark, source))
    facts = {k: source.get(k) for k in ("commit", "dirty", "digest", "files")}
    versions = runs[0].record.get("versions") or {}
    facts |= {"distbert": versions.get("distbert"), "versions": versions,
              "runs": {run.scenario: run.record.get("source") for run in runs}}
    (code / "source.json").write_text(json.dumps(facts, indent=2) + "\n")


def _calibration(runs: Sequence[Run]) -> str:
    precisions = sorted({run.backend.get("precision", "fp32") for run in runs})
    if "int8" in precisions:
        return ("# Calibration\n\nThe int8 model is the MLPerf-provided `bert_large_v1_1_fake_quant.onnx` "
                "(zenodo 3750364), used as published; distbert did no further calibration.\n")
    return (f"# Calibration\n\nNo quantization or calibration: the model ran in {', '.join(precisions)} "
            "from the MLPerf starting weights.\n")


@dataclasses.dataclass(frozen=True)
class BuildResult:
    root: Path
    tarball: Path
    report: Any          # distbert.submission.check.CheckReport
    invalid: dict[str, list[str]]


def check_tree_args(submitter: str, system: str, division: str, benchmark: str, rule_set: RuleSet,
                    system_type: str) -> tuple[str, ...]:
    """The tree's naming and rule arguments (also checked by `submission run` before any run);
    returns the scenarios the round requires."""
    for label, name in (("--submitter", submitter), ("--system", system)):
        if not _NAME.match(name):
            raise UserError(f"{label} {name!r}: use letters, digits and _.+- only (it becomes a directory name)")
    if division == "network":
        raise UserError("--division network: not for distbert's bert results (the network division is "
                        "datacenter-only and bert is edge-only since v5.0; and it forbids batching on the LoadGen "
                        "node, which is what distbert's rank 0 does): use closed (a multi-node system is allowed "
                        "there) or open")
    if division not in ("closed", "open"):
        raise UserError(f"--division {division}: choose closed or open")
    if benchmark not in ("bert-99", "bert-99.9"):
        raise UserError(f"--benchmark {benchmark}: choose bert-99 or bert-99.9")
    return rule_set.scenarios(system_type, benchmark)


def read_system_json(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        overrides = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"--system-json {path}: {exc}") from exc
    if not isinstance(overrides, dict):
        raise UserError(f"--system-json {path}: expected a JSON object of system fields")
    return overrides


def build(run_dirs: Sequence[Path], out: Path, submitter: str, system: str, division: str = "closed",
          benchmark: str = "bert-99", system_json: Path | None = None, allow_invalid: bool = False,
          version: str = LOADGEN_ROUND, system_type: str | None = None) -> BuildResult:
    """Write the tree (``version``'s layout), tarball and summary into ``out`` (which must not exist
    or be empty)."""
    from distbert.submission.check import check_tree

    rule_set = rules(version)
    system_type = system_type or rule_set.default_system_type
    required = check_tree_args(submitter, system, division, benchmark, rule_set, system_type)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not empty: choose a new directory")
    runs = [load_run(Path(p), rule_set.compliance_tests) for p in run_dirs]
    seen: dict[str, Path] = {}
    for run in runs:
        if run.scenario in seen:
            raise UserError(f"{seen[run.scenario]} and {run.path} are both {run.scenario} runs: give one per scenario")
        seen[run.scenario] = run.path
        made_for = run.loadgen.get("mlperf_version", LOADGEN_ROUND)
        if made_for != version:
            raise UserError(f"{run.path} ran with the {made_for} seeds: a {version} submission needs runs made with "
                            f"`distbert run --mlperf-version {version}`")
    if division == "closed" and set(seen) != set(required):
        raise UserError(f"closed {benchmark} ({version}, {system_type}) needs exactly one run per scenario "
                        f"{', '.join(required)} (got {', '.join(sorted(seen)) or 'none'}); any other scenario fails "
                        "the whole benchmark")
    source = source_facts()
    invalid = {str(run.path): why_invalid(run, benchmark, source) for run in runs}
    invalid = {k: v for k, v in invalid.items() if v}
    if invalid and not allow_invalid:
        path, reasons = next(iter(invalid.items()))
        raise UserError(f"{path} cannot be in a submission: {'; '.join(reasons)} "
                        "(--allow-invalid builds a dry-run tree anyway)")
    overrides = read_system_json(system_json)
    desc = system_description(runs, submitter, system, division, overrides, allow_invalid, system_type)

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        top = work / division / submitter
        (top / "systems").mkdir(parents=True)
        (top / "systems" / f"{system}.json").write_text(json.dumps(desc, indent=2) + "\n")
        code = top / rule_set.code_dir / benchmark
        if rule_set.layout != "v6":
            code = code / IMPLEMENTATION
        code.mkdir(parents=True)
        _code_folder(code, runs, benchmark, source)
        (top / "documentation").mkdir()
        (top / "documentation" / "calibration.md").write_text(_calibration(runs))
        for run in runs:
            _scenario(run, top, system, benchmark, rule_set)
        with tarfile.open(work / "mlperf_submission.tar.gz", "w:gz") as tar:
            tar.add(work / division, arcname=division)
        report = check_tree(work, version)
        (work / "summary.txt").write_text("\n".join(report.summary_lines()) + "\n")
        report.write_csv(work / "summary.csv")
        if out.exists():
            out.rmdir()
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return BuildResult(root=out, tarball=out / "mlperf_submission.tar.gz", report=report, invalid=invalid)


def _mlperf_conf(rule_set: RuleSet) -> str:
    """v4.1 wants mlperf.conf beside the measurements file: the bert values LoadGen used (its embedded
    mlperf.conf; MLPERF.md section 4) with the round's seeds distbert set."""
    lines = [f"# bert values of LoadGen's embedded mlperf.conf as used by this run; seeds of {rule_set.version}",
             "*.*.min_duration = 600000", "bert.*.performance_sample_count_override = 10833",
             "bert.Offline.min_query_count = 10833", "*.SingleStream.target_latency_percentile = 90",
             "*.Server.target_latency_percentile = 99", "bert.Server.target_latency = 130"]
    lines += [f"*.*.{k} = {v}" for k, v in rule_set.seeds.as_dict().items()]
    if rule_set.test05_seeds is not None:
        lines += [f"*.*.test05_{k} = {v}" for k, v in rule_set.test05_seeds.as_dict().items()]
    return "\n".join(lines) + "\n"


def _scenario(run: Run, top: Path, system: str, benchmark: str, rule_set: RuleSet) -> None:
    src = run.path
    dst = top / "results" / system / benchmark / run.scenario
    if rule_set.layout == "v6":
        measure, compliance = dst, dst
        measurements_file = dst / "measurements.json"
    else:
        measure = top / "measurements" / system / benchmark / run.scenario
        compliance = top / "compliance" / system / benchmark / run.scenario
        measurements_file = measure / f"{system}_{IMPLEMENTATION}_{run.scenario}.json"
    for name in ("mlperf_log_detail.txt", "mlperf_log_summary.txt"):
        _copy(src / "performance" / name, dst / "performance" / "run_1" / name)
        _copy(src / "accuracy" / name, dst / "accuracy" / name)
        _copy(src / "TEST01" / name, compliance / "TEST01" / "performance" / "run_1" / name)
        if "TEST05" in rule_set.compliance_tests:
            _copy(src / "TEST05" / name, compliance / "TEST05" / "performance" / "run_1" / name)
    truncate_accuracy(src / "accuracy" / "mlperf_log_accuracy.json", src / "accuracy" / "accuracy.txt",
                      dst / "accuracy")
    truncate_accuracy(src / "TEST01" / "mlperf_log_accuracy.json", src / "TEST01" / "accuracy.txt",
                      compliance / "TEST01" / "accuracy")
    for name in ("verify_accuracy.txt", "verify_performance.txt"):
        _copy(src / "TEST01" / name, compliance / "TEST01" / name)
    if "TEST05" in rule_set.compliance_tests:
        _copy(src / "TEST05" / "verify_performance.txt", compliance / "TEST05" / "verify_performance.txt")
    for name in ("baseline_accuracy.txt", "compliance_accuracy.txt"):
        if (src / "TEST01" / name).is_file():
            _copy(src / "TEST01" / name, compliance / "TEST01" / "accuracy" / name)
    _copy(src / "performance" / "user.conf", measure / "user.conf")
    measurements_file.parent.mkdir(parents=True, exist_ok=True)
    measurements_file.write_text(json.dumps(measurements(run), indent=2) + "\n")
    (measure / "README.md").write_text(_scenario_readme(run, benchmark))
    if rule_set.layout == "v4":
        (measure / "mlperf.conf").write_text(_mlperf_conf(rule_set))
