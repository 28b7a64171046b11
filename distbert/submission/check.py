"""A local MLPerf Inference submission checker for bert (v6.x tree layout).

The official checker (``mlcommons/inference:tools/submission/submission_checker``, ``--version
v6.1``) is not on PyPI, so this module enforces the rules that ``/work/shared/MLPERF.md`` lists
(sections 3 and 5 and its Appendix) for ``bert-99`` and ``bert-99.9``, with the few points that
file leaves open settled by reading the official checker's source (listed in the notes)::

    <root>/<division>/<Submitter>/systems/<system>.json
    <root>/<division>/<Submitter>/src/
    <root>/<division>/<Submitter>/documentation/calibration.md          (closed)
    <root>/<division>/<Submitter>/results/<system>/<benchmark>/<Scenario>/...

Contract: :func:`check_tree` never stops at the first problem. Every violation becomes one
:class:`Problem` (a path relative to the root and a one-line message saying what is wrong and the
fix); a tree is OK when there are none. :class:`ResultRow` holds one line per scenario directory,
marked invalid when a problem lies in that directory or on its benchmark directory (the closed
scenario-set rule, which invalidates every scenario of the benchmark). A run of the official
checker stays the final word; this one exists so that a submission can be checked where that one
cannot be installed. Notes and the detail-log keys relied on: ``notes/submission_check.md``.

Rounds whose checker has folder rules (``RuleSet.folder_rules``, v4.1) also get those: a broken
symbolic link, a file over 50 MB, a name starting with '.' or holding a space, a ``__pycache__`` or
an empty folder anywhere under a submitter folder (the official checker rejects the whole submitter
folder), a file beside the submitter folders (the whole division) or beside the division folders
(the whole tree; *.md and *.pdf excepted). A build's output folder, which holds the tarball and
summaries beside ``closed/``, gets a note instead: the official checker must see the unpacked tarball.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from distbert.data.loadgen_logs import read_detail
from distbert.data.squad import DEV_FEATURES
from distbert.data.squad.accuracy import TARGETS
from distbert.errors import UserError
from distbert.submission.compliance import ACCURACY_DELTA, f1_gap
from distbert.submission.rules import Seeds, rules

# --- constants; each names its source in /work/shared/MLPERF.md --------------------------------

# section 5 tree: closed, open and network division folders
DIVISIONS = ("closed", "open", "network")
# section 6: the network division inherits the closed rules
CLOSED_RULES_DIVISIONS = ("closed", "network")
# sections 0 and 4: the benchmarks this checker knows (any other name under results/<system>/ fails)
BENCHMARKS = ("bert-99", "bert-99.9")
# section 4 table: LoadGen's four scenarios; the only names a scenario directory may have
KNOWN_SCENARIOS = ("Offline", "SingleStream", "Server", "MultiStream")
# sections 0 and 3 (`constants.py` accuracy-target): F1 >= 99% / 99.9% of the fp32 90.874
ACCURACY_TARGETS = TARGETS
# sections 0 and 3: QSL size, and the sample count an accuracy run must cover
DATASET_SIZE = DEV_FEATURES
# sections 0 and 5: effective_performance_sample_count lower bound
PERFORMANCE_SAMPLE_COUNT = DEV_FEATURES
# sections 0 and 5 (checker OFFLINE_MIN_SPQ_SINCE_V4["bert-99"]): closed Offline samples per query
OFFLINE_MIN_SAMPLES_PER_QUERY = DEV_FEATURES
# sections 0 and 5 (checker TEST_DURATION_MS): effective_min_duration_ms lower bound
MIN_DURATION_MS = 600_000
# section 5: the checker fails any mlperf_log_accuracy.json larger than 10 KiB (untruncated)
ACCURACY_LOG_MAX_BYTES = 10 * 1024
# section 3 (`ACC_PATTERN["F1"]`), matched at the start of each line of accuracy.txt
ACC_PATTERN = re.compile(r"^{[\"']exact_match[\"']:\s*[\d\.]+,\s*[\"']f1[\"']:\s*([\d\.]+)}")
# sections 3 and 5: truncate_accuracy_log.py appends "hash=<sha256>" to accuracy.txt
HASH_PATTERN = re.compile(r"^hash=[0-9a-fA-F]+\s*$")
# section 5: TEST01's verify_*.txt must contain this
TEST_PASS = "TEST PASS"
# section 5: when verify_accuracy fails, baseline vs compliance F1 must agree within 1% / 0.1%
TEST01_ACCURACY_DELTA = ACCURACY_DELTA
# section 5 (SYSTEM_DESC_REQUIRED_FIELDS)
SYSTEM_DESC_REQUIRED_FIELDS = (
    "division", "submitter", "status", "system_name", "number_of_nodes", "host_processor_model_name",
    "host_processors_per_node", "host_processor_core_count", "host_memory_capacity",
    "host_storage_capacity", "host_storage_type", "accelerators_per_node", "accelerator_model_name",
    "accelerator_memory_capacity", "framework", "operating_system", "system_type",
    "other_software_stack", "host_processor_frequency", "host_processor_caches",
    "host_memory_configuration", "host_processor_interconnect", "host_networking",
    "host_networking_topology", "accelerator_frequency", "accelerator_host_interconnect",
    "accelerator_interconnect", "accelerator_interconnect_topology",
    "accelerator_memory_configuration", "accelerator_on-chip_memories", "cooling", "hw_notes",
    "sw_notes", "host_network_card_count", "system_type_detail",
)
# section 5 (SYSTEM_DESC_MEANINGFUL_RESPONSE_REQUIRED_FIELDS): "", None and integer 0 rejected
SYSTEM_DESC_MEANINGFUL_FIELDS = (
    "division", "submitter", "system_type", "status", "system_name", "number_of_nodes",
    "host_processor_model_name", "host_processors_per_node", "host_processor_core_count",
    "host_memory_capacity", "host_memory_configuration", "host_storage_capacity",
    "host_storage_type", "host_networking", "host_network_card_count", "host_networking_topology",
    "accelerators_per_node", "accelerator_model_name", "accelerator_memory_capacity",
    "accelerator_host_interconnect", "accelerator_memory_configuration", "accelerator_interconnect",
    "cooling", "framework", "operating_system", "other_software_stack",
)
# section 5: system json "status" and "system_type" values
SYSTEM_STATUSES = ("available", "preview", "rdi")
SYSTEM_TYPES = ("datacenter", "edge", "datacenter,edge")
# section 5: extra system json fields when is_network is true (network division)
NETWORK_FIELDS = (
    "network_type", "network_media", "network_rate", "nic_loadgen", "number_nic_loadgen",
    "net_software_stack_loadgen", "network_protocol", "number_connections", "nic_sut",
    "number_nic_sut", "net_software_stack_sut", "network_topology",
)
# section 6: a network-division SUT name must contain this
NETWORK_SUT_MARK = "Network SUT"
# section 5: measurements.json keys that must hold a non-empty value
MEASUREMENTS_REQUIRED_FIELDS = (
    "input_data_types", "retraining", "starting_weights_filename", "weight_data_types",
    "weight_transformations",
)
# section 4: an edge result may be inferred from another scenario's log: (logged, folder) pairs
INFERABLE = frozenset({("SingleStream", "Offline"), ("MultiStream", "Offline"), ("SingleStream", "MultiStream")})
# section 4: scenarios whose result rests on LoadGen's early-stopping estimate (early_stopping_met)
EARLY_STOPPING_SCENARIOS = ("SingleStream", "MultiStream", "Server")
# section 4: the headline figure per scenario (detail-log key, unit label, divisor)
RESULT_METRICS = {
    "Offline": ("result_samples_per_second", "samples/s", 1.0),
    "SingleStream": ("early_stopping_latency_ss", "latency (ms)", 1e6),
    "Server": ("result_completed_samples_per_sec", "samples/s", 1.0),
    # the key says _ms but LoadGen logs nanoseconds, as for SingleStream
    "MultiStream": ("early_stopping_latency_ms", "latency (ms)", 1e6),
}

# v4.1 checker (``tools/submission/submission_checker.py``; not in MLPERF.md), with ``folder_rules``: a
# file over FILE_SIZE_LIMIT_MB MiB rejects the submitter folder; of the files beside the division
# folders only these suffixes are allowed (any other rejects the whole tree)
FILE_SIZE_LIMIT_BYTES = 50 * 1024 * 1024
ROOT_FILE_SUFFIXES = (".md", ".pdf")
# what `distbert submission build` writes beside closed/: its presence marks a build's output folder
TARBALL = "mlperf_submission.tar.gz"

DETAIL = "mlperf_log_detail.txt"
SUMMARY = "mlperf_log_summary.txt"
ACCURACY_LOG = "mlperf_log_accuracy.json"
_TRUNCATE_FIX = "run `distbert submission build` (or truncate_accuracy_log.py) to truncate it and hash it"


@dataclass(frozen=True)
class Problem:
    """One rule violation. ``rule`` is a short stable tag (for tests and filtering)."""

    path: str        # relative to root
    message: str     # one line, says what is wrong and the fix
    rule: str = ""

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass(frozen=True)
class ResultRow:
    """One per ``results/<system>/<benchmark>/<Scenario>`` with a known scenario name."""

    division: str
    submitter: str
    system: str
    benchmark: str
    scenario: str
    metric: str
    value: float | None
    f1: float | None
    valid: bool      # no problem under this scenario dir and on its benchmark dir


@dataclass
class CheckReport:
    problems: list[Problem]
    results: list[ResultRow]
    #: advice that is no rule violation (one line each; the CLI prints them as NOTE)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary_lines(self) -> list[str]:
        """The results table, the counts, then the official checker's last line."""
        header = ("division", "submitter", "system", "benchmark", "scenario", "metric", "value", "F1", "valid")
        rows = [(r.division, r.submitter, r.system, r.benchmark, r.scenario, r.metric, _fmt(r.value),
                 _fmt(r.f1), "yes" if r.valid else "NO") for r in self.results]
        widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in (header, *rows)]
        lines.insert(1, "  ".join("-" * w for w in widths))
        good = sum(r.valid for r in self.results)
        lines.append(f"Results={good} NoResults={len(self.results) - good} Problems={len(self.problems)}")
        lines.append("SUMMARY: submission looks OK" if self.ok else "SUMMARY: submission has errors")
        return lines

    def write_csv(self, path: Path) -> None:
        """One row per :class:`ResultRow`; value and F1 at full precision, empty when unknown."""
        with Path(path).open("w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["division", "submitter", "system", "benchmark", "scenario", "metric", "value",
                          "f1", "valid"])
            for r in self.results:
                out.writerow([r.division, r.submitter, r.system, r.benchmark, r.scenario, r.metric,
                              "" if r.value is None else repr(r.value), "" if r.f1 is None else repr(r.f1),
                              "true" if r.valid else "false"])


def check_tree(root: Path, version: str = "v6.1") -> CheckReport:
    """Check the submission tree under ``root`` (the folder holding closed/, open/, network/)."""
    rules(version)  # an unknown round is a user error
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such directory (pass the folder that holds closed/, open/ or network/)")
    return _Checker(root, version).run()


def _fmt(value: float | None) -> str:
    """Five significant figures (MLPERF.md section 3), without exponent for ordinary numbers."""
    if value is None:
        return "-"
    rounded = float(f"{value:.5g}")
    return str(int(rounded)) if rounded.is_integer() else repr(rounded)


def _is_empty(value: Any) -> bool:
    """A value that is no meaningful response: missing, blank string, integer 0 (string "0" is fine)."""
    if value is None:
        return True
    if isinstance(value, bool):   # a bool is an int in Python; False is still an answer
        return False
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, (int, float)):
        return value == 0
    if isinstance(value, (list, dict)):
        return not value
    return False


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _flag(value: Any, want: bool) -> bool:
    """``value`` is the string "true"/"false" (any case) for ``want``."""
    return isinstance(value, str) and value.strip().lower() == str(want).lower()


def _passed(path: Path, whole_line: bool) -> bool:
    """verify_accuracy needs a line that is exactly "TEST PASS"; verify_performance a line holding it."""
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    return TEST_PASS in lines if whole_line else any(TEST_PASS in line for line in lines)


def _f1_of(path: Path) -> tuple[list[float], bool]:
    """(F1 of every line matching ACC_PATTERN, whether a hash= line is present)."""
    f1s: list[float] = []
    has_hash = False
    for line in path.read_text(errors="replace").splitlines():
        match = ACC_PATTERN.match(line)
        if match:
            try:
                f1s.append(float(match.group(1)))
            except ValueError:
                pass
        if HASH_PATTERN.match(line):
            has_hash = True
    return f1s, has_hash


class _Checker:
    """Walks the tree once, appending problems and result rows."""

    def __init__(self, root: Path, version: str) -> None:
        self.root = root
        self.rules = rules(version)
        self.problems: list[Problem] = []
        self.notes: list[str] = []
        self.rows: list[tuple[ResultRow, str, str]] = []  # (row, benchmark path, scenario path)

    # -- bookkeeping

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def add(self, path: Path, rule: str, message: str) -> None:
        self.problems.append(Problem(self.rel(path), " ".join(message.split()), rule))

    def need_file(self, path: Path, what: str = "", nonempty: bool = False) -> bool:
        """True when ``path`` is a file (and, with ``nonempty``, holds more than whitespace)."""
        hint = f" ({what})" if what else ""
        if not path.is_file():
            self.add(path, "missing-file", f"missing {path.name}{hint}: add it")
            return False
        if nonempty and not path.read_text(errors="replace").strip():
            self.add(path, "empty-file", f"{path.name} is empty{hint}: fill it in")
            return False
        return True

    def run(self) -> CheckReport:
        divisions = _subdirs(self.root)
        if not any(d.name in DIVISIONS for d in divisions):
            self.problems.append(Problem(".", "no closed/, open/ or network/ folder under the root: pass the "
                                              "folder that holds them", "division"))
        else:
            self.check_root_files()
        for div in divisions:
            if div.name not in DIVISIONS:
                self.add(div, "division", f"unknown division folder {div.name!r}: use closed, open or network")
                continue
            if self.rules.folder_rules:
                self.check_division_files(div)
            for sub in _subdirs(div):
                if self.rules.folder_rules:
                    self.check_folder(sub)
                self.check_submitter(sub, div.name)
        results = []
        for row, bench, scen in self.rows:
            bad = any(p.path == bench or p.path == scen or p.path.startswith(scen + "/") for p in self.problems)
            results.append(replace(row, valid=not bad))
        return CheckReport(problems=self.problems, results=results, notes=self.notes)

    # -- folder rules (RuleSet.folder_rules: v4.1); the official checker rejects a whole folder for each

    def check_root_files(self) -> None:
        """Files beside the division folders are no part of the submission. In a build's output folder (the
        tarball, summaries and plots beside closed/) a note says so; elsewhere v4.1's checker rejects the
        whole tree for any such file but *.md and *.pdf."""
        loose = sorted(p for p in self.root.iterdir() if p.is_file())
        if (self.root / TARBALL).is_file():
            rejects = (f", which the official {self.rules.version} checker rejects whole for the "
                       f"{len(loose)} file(s) beside the division folders" if self.rules.folder_rules else "")
            self.notes.append(f"this folder is a build's output folder ({TARBALL} and summaries beside the division "
                              "folders), checked here as it lies; the submission is the tarball: run the official "
                              f"checker on its unpacked contents (mkdir tree && tar xzf {TARBALL} -C tree), not on "
                              f"this folder{rejects}")
            return
        if not self.rules.folder_rules:
            return
        for path in loose:
            if not path.name.endswith(ROOT_FILE_SUFFIXES):
                self.add(path, "root-files", f"file beside the division folders: the official {self.rules.version} "
                         f"checker rejects the whole tree for it (only {' and '.join(ROOT_FILE_SUFFIXES)} files may "
                         "be there): move it out of the tree")

    def check_division_files(self, div: Path) -> None:
        for path in sorted(div.iterdir()):
            if path.is_file():
                self.add(path, "division-files", f"file beside the submitter folders: the official "
                         f"{self.rules.version} checker rejects all of {div.name}/ for it: move it out")

    def check_folder(self, sub: Path) -> None:
        """v4.1's folder rules over a whole submitter folder. Its checker rejects the folder (every result in
        it) for any one violation and names only the first kind; here each violation is one problem. A
        hidden or __pycache__ folder is reported once, not walked."""
        whole = f"the official {self.rules.version} checker rejects all of {self.rel(sub)}/ for it"
        for dirpath, dirnames, filenames in os.walk(sub):
            here = Path(dirpath)
            if not dirnames and not filenames:
                self.add(here, "empty-folder", f"empty folder: {whole}: remove it")
            for name in sorted(dirnames + filenames):
                if name.startswith("."):
                    self.add(here / name, "dot-name", f"name starts with '.' (hidden, which the checker calls "
                                                      f"git unfriendly): {whole}: remove or rename it")
                if " " in name:
                    self.add(here / name, "space-name", f"space in the name: {whole}: rename it without spaces")
            for name in sorted(dirnames):
                if name.endswith("__pycache__"):
                    self.add(here / name, "pycache", f"__pycache__ folder: {whole}: delete it (bytecode is no source)")
            for name in sorted(filenames):
                self.check_file(here / name, whole)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not d.endswith("__pycache__"))

    def check_file(self, path: Path, whole: str) -> None:
        """A broken symbolic link, or a file over the size limit."""
        if path.is_symlink():
            target = os.readlink(path)
            # the checker runs from the tree root and resolves a relative target from there
            if not path.exists() or not (self.root / target).exists():
                self.add(path, "broken-link", f"symbolic link to {target!r}, which does not exist (resolved from "
                         f"the tree root, as the checker does): {whole}: put the file itself there")
                return
        size = path.stat().st_size
        if size > FILE_SIZE_LIMIT_BYTES:
            self.add(path, "file-size", f"{size} bytes, over the 50 MB limit ({FILE_SIZE_LIMIT_BYTES} bytes): "
                                        f"{whole}: leave it out or make it smaller")

    # -- <division>/<Submitter>/

    def check_submitter(self, sub: Path, division: str) -> None:
        code = self.rules.code_dir
        if not (sub / code).is_dir():
            self.add(sub / code, "src", f"missing {code}/ ({self.rules.version}): put the harness source or a "
                                        "README pointing to it there")
        if division == "closed":
            self.need_file(sub / "documentation" / "calibration.md", "required in closed: say how the "
                           "model was quantized or calibrated, or that it was not")
        results = sub / "results"
        if not results.is_dir():
            self.add(results, "results",
                     "missing results/: a submitter folder needs results/<system>/<benchmark>/<Scenario>/")
            return
        systems = _subdirs(results)
        if not systems:
            self.add(results, "results", "results/ holds no system folder")
        for sys_dir in systems:
            desc = self.check_system_json(sub / "systems" / f"{sys_dir.name}.json", division, sub.name)
            # an unreadable description is reported once, above; do not pile inference problems on it
            stype = str((desc or {}).get("system_type") or self.rules.default_system_type)
            edge = desc is None or "edge" in stype.split(",")
            if not edge and self.rules.layout != "v4":
                stype = "edge"  # reported on the system description already; judge the scenarios as edge
            for bench in _subdirs(sys_dir):
                self.check_benchmark(bench, division, sub.name, sys_dir.name, edge, stype)

    def check_system_json(self, path: Path, division: str, submitter: str) -> dict[str, Any] | None:
        """Check one system description; returns it (None when absent or unreadable)."""
        if not path.is_file():
            self.add(path, "system-json", f"missing systems/{path.name} for results/{path.stem}/: "
                                          "write the system description there")
            return None
        try:
            desc = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            self.add(path, "system-json", f"not valid JSON ({exc}): fix the syntax")
            return None
        if not isinstance(desc, dict):
            self.add(path, "system-json", "not a JSON object: the system description is one {...} object")
            return None
        for key in SYSTEM_DESC_REQUIRED_FIELDS:
            if key not in desc:
                self.add(path, "system-field", f"field {key!r} missing: add it (\"N/A\" where it does not apply)")
        for key in SYSTEM_DESC_MEANINGFUL_FIELDS:
            if key in desc and _is_empty(desc[key]):
                self.add(path, "system-value", f"field {key!r} is {desc[key]!r}, which the checker rejects: give "
                                               "a meaningful value (\"N/A\" if it does not apply, \"0\" for none)")
        if "status" in desc and desc["status"] not in SYSTEM_STATUSES and not _is_empty(desc["status"]):
            self.add(path, "system-status", f"status {desc['status']!r}: use one of {', '.join(SYSTEM_STATUSES)}")
        stype = desc.get("system_type")
        if "system_type" in desc and not _is_empty(stype):
            if stype not in SYSTEM_TYPES:
                self.add(path, "system-type", f"system_type {stype!r}: use one of {', '.join(SYSTEM_TYPES)}")
            elif self.rules.layout != "v4" and "edge" not in str(stype).split(","):
                self.add(path, "system-type", f"system_type {stype!r}: bert is an edge benchmark since v5.0 "
                                              "(the official checker crashes on datacenter bert): use \"edge\"")
        for key, want in (("submitter", submitter), ("division", division)):
            if key in desc and not _is_empty(desc[key]) and desc[key] != want:
                self.add(path, "system-mismatch",
                         f"{key} is {desc[key]!r} but the folder is {want!r}: make them equal")
        is_net = desc.get("is_network")
        if isinstance(is_net, bool):
            # the official checker calls .lower() on it: a JSON true/false crashes it
            self.add(path, "is-network", f"is_network is the JSON boolean {json.dumps(is_net)}: write the string "
                                         f"\"{json.dumps(is_net)}\" (the official checker needs a string)")
        elif division == "network":
            if not _flag(is_net, True):
                self.add(path, "is-network", f"is_network is {is_net!r} in the network division: set it to \"true\"")
        elif is_net is not None and not _flag(is_net, False):
            self.add(path, "is-network", f"is_network is {is_net!r} in {division}: remove it or set \"false\"")
        if division == "network":
            for key in NETWORK_FIELDS:
                if _is_empty(desc.get(key)):
                    self.add(path, "network-field", f"network field {key!r} missing or empty: describe the network")
        return desc

    # -- results/<system>/<benchmark>/

    def check_benchmark(self, bench: Path, division: str, submitter: str, system: str, edge: bool,
                        system_type: str = "edge") -> None:
        if bench.name not in BENCHMARKS:
            self.add(bench, "benchmark",
                     f"unknown benchmark {bench.name!r}: this checker knows {', '.join(BENCHMARKS)}")
            return
        scen_dirs = _subdirs(bench)
        names = {d.name for d in scen_dirs}
        for scen in scen_dirs:
            if scen.name not in KNOWN_SCENARIOS:
                self.add(scen, "scenario-name", f"unknown scenario folder {scen.name!r}: use one of "
                                                f"{', '.join(KNOWN_SCENARIOS)} (case matters)")
        if division in CLOSED_RULES_DIVISIONS:
            required = set(self.rules.required.get(system_type, {}).get(bench.name, ()))
            if not required:
                self.add(bench, "scenario-set", f"{self.rules.version} has no {bench.name} result for system_type "
                                                f"{system_type!r}: change the system_type or the round")
                return
            want = " and ".join(sorted(required))
            for name in sorted(required - names):
                self.add(bench, "scenario-set", f"required scenario {name} missing ({division} {bench.name} needs "
                                                f"exactly {want}): every scenario of this benchmark "
                                                f"is invalid until {name}/ is added")
            for name in sorted(names - required):
                self.add(bench, "scenario-set", f"extra scenario folder {name}/ ({division} {bench.name} allows only "
                                                f"{want}): every scenario of this benchmark is "
                                                f"invalid until {name}/ is removed (or moved to open/)")
        elif not scen_dirs:
            self.add(bench, "scenario-set", f"{bench.name}/ holds no scenario folder")
        for scen in scen_dirs:
            if scen.name in KNOWN_SCENARIOS:
                row = self.check_scenario(scen, division, submitter, system, bench.name, edge)
                self.rows.append((row, self.rel(bench), self.rel(scen)))

    # -- results/<system>/<benchmark>/<Scenario>/

    def check_scenario(self, scen: Path, division: str, submitter: str, system: str, benchmark: str,
                       edge: bool) -> ResultRow:
        sub = scen.parents[3]
        if self.rules.layout == "v6":   # everything inside the scenario folder
            measure_dir, compliance = scen, scen
        else:                           # v5.x / v4.1: measurements/ and compliance/ trees beside results/
            measure_dir = sub / "measurements" / system / benchmark / scen.name
            compliance = sub / "compliance" / system / benchmark / scen.name
        self.need_file(measure_dir / "README.md", "how to reproduce the result", nonempty=True)
        self.need_file(measure_dir / "user.conf", "the LoadGen user.conf the runs used", nonempty=True)
        if self.rules.layout == "v4":
            self.need_file(measure_dir / "mlperf.conf", "the mlperf.conf the runs used (v4.1)", nonempty=True)
        if self.rules.layout == "v6":
            self.check_measurements(measure_dir / "measurements.json")
        else:
            found = sorted(measure_dir.glob(f"{system}*.json"))
            if not found:
                self.add(measure_dir, "missing-file", f"no {system}_<implementation>_{scen.name}.json "
                                                      f"({self.rules.version} measurements file): add it")
            for path in found:
                self.check_measurements(path)
        value = self.check_performance(scen / "performance" / "run_1", scen.name, division, edge)
        f1 = self.check_accuracy(scen / "accuracy", benchmark, division)
        if division in CLOSED_RULES_DIVISIONS or (compliance / "TEST01").exists():
            self.check_test01(compliance / "TEST01", benchmark, scen.name, division, edge)
        if "TEST05" in self.rules.compliance_tests and (division in CLOSED_RULES_DIVISIONS
                                                          or (compliance / "TEST05").exists()):
            self.check_test05(compliance / "TEST05", scen.name, division, edge)
        metric = RESULT_METRICS[scen.name][1]
        return ResultRow(division, submitter, system, benchmark, scen.name, metric, value, f1, valid=True)

    def check_measurements(self, path: Path) -> None:
        if not self.need_file(path, "model and data types of the result"):
            return
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            self.add(path, "measurements", f"not valid JSON ({exc}): fix the syntax")
            return
        if not isinstance(data, dict):
            self.add(path, "measurements", "not a JSON object: write one {...} object")
            return
        for key in MEASUREMENTS_REQUIRED_FIELDS:
            if _is_empty(data.get(key)):
                self.add(path, "measurements", f"key {key!r} missing or empty: fill it in")

    def check_log(self, path: Path, what: str) -> dict[str, Any] | None:
        """Parse a detail log (None when absent) and report the errors LoadGen logged in it."""
        if not self.need_file(path, what):
            return None
        detail = read_detail(path)
        errors = detail["_errors"]                    # error_<kind> keys / metadata.is_error entries
        if errors:
            self.add(path, "loadgen-error", f"LoadGen logged {len(errors)} error(s), first {errors[0]!r}: "
                                            "fix the cause and rerun (a second FromConfig in one process is one)")
        return detail

    def need_key(self, detail: dict[str, Any], path: Path, key: str) -> Any:
        if key not in detail:
            self.add(path, "log-key", f"no {key!r} in the log: use the complete log LoadGen wrote")
        return detail.get(key)

    def need_number(self, detail: dict[str, Any], path: Path, key: str) -> float | None:
        got = self.need_key(detail, path, key)
        if got is None:
            return None
        if isinstance(got, bool) or not isinstance(got, (int, float)):
            self.add(path, "log-key", f"{key} is {got!r}, not a number: use the log LoadGen wrote")
            return None
        return got

    def check_performance(self, run: Path, scenario: str, division: str, edge: bool,
                          seeds: Seeds | None = None) -> float | None:
        """A performance run's checks (also TEST01's and TEST05's, the latter with ``seeds``: the round's
        TEST05 seeds); returns the headline figure (None when unknown). Seeds: the round's table
        (section 0 `seeds`; distbert/submission/rules.py), detail-log keys effective_<name>."""
        self.need_file(run / SUMMARY, "the performance run's summary")
        path = run / DETAIL
        detail = self.check_log(path, "the performance run's detail log")
        if detail is None:
            return None
        for name, want in (seeds or self.rules.seeds).as_dict().items():
            got = self.need_key(detail, path, f"effective_{name}")
            if got is not None and got != want:
                self.add(path, "seed", f"effective_{name} is {got}, not {want} ({self.rules.version}): run with "
                                       f"`distbert run --mlperf-version {self.rules.version}` and set no other seeds")
        mode = detail.get("effective_test_mode")
        if mode is not None and mode not in ("PerformanceOnly", "SubmissionRun"):
            self.add(path, "test-mode", f"effective_test_mode is {mode}: performance/ needs a PerformanceOnly run")
        got = self.need_number(detail, path, "effective_performance_sample_count")
        if got is not None and got < PERFORMANCE_SAMPLE_COUNT:
            self.add(path, "performance-sample-count", f"effective_performance_sample_count is {got} < "
                     f"{PERFORMANCE_SAMPLE_COUNT}: do not override performance_sample_count")
        got = self.need_number(detail, path, "effective_min_duration_ms")
        if got is not None and got < MIN_DURATION_MS:
            self.add(path, "min-duration", f"effective_min_duration_ms is {got} < {MIN_DURATION_MS}: rerun "
                     "without lowering min_duration (a short test run is never a result)")
        got = self.need_key(detail, path, "result_validity")
        if got is not None and got != "VALID":
            self.add(path, "validity", f"result_validity is {got} (TEST01 verify_performance fails on it): "
                     "fix the target_qps / target_latency in user.conf and rerun")
        if self.rules.server_latency_ns and detail.get("effective_scenario") == "Server":
            got = self.need_number(detail, path, "effective_target_latency_ns")
            if got is not None and got > self.rules.server_latency_ns:
                self.add(path, "latency-bound", f"effective_target_latency_ns is {got} > "
                         f"{self.rules.server_latency_ns} ({self.rules.version} Server bound): do not raise it")
        if division == "network":
            name = str(detail.get("sut_name", ""))
            if NETWORK_SUT_MARK not in name:
                self.add(path, "sut-name", f"sut_name {name!r} lacks {NETWORK_SUT_MARK!r} (network division)")
        logged = self.need_key(detail, path, "effective_scenario")
        if logged is None or logged not in KNOWN_SCENARIOS:
            return None
        if logged != scenario and not ((logged, scenario) in INFERABLE and edge):
            # the scenario-specific checks below would only repeat this problem
            self.add(path, "scenario-mismatch", f"the log is a {logged} run in the {scenario}/ folder: copy the "
                     "right logs (an edge system may infer Offline from SingleStream/MultiStream and MultiStream "
                     "from SingleStream only)")
            return None
        # the checks follow the scenario that ran; the figure follows the folder (MLPERF.md section 4)
        if logged == "Offline" and division in CLOSED_RULES_DIVISIONS:
            got = self.need_number(detail, path, "effective_samples_per_query")
            if got is not None and got < OFFLINE_MIN_SAMPLES_PER_QUERY:
                self.add(path, "offline-samples-per-query", f"effective_samples_per_query is {got} < "
                         f"{OFFLINE_MIN_SAMPLES_PER_QUERY}: do not lower bert.Offline.min_query_count")
        if logged in EARLY_STOPPING_SCENARIOS:
            got = self.need_key(detail, path, "early_stopping_met")
            if got is not None and got is not True:
                self.add(path, "early-stopping", "early_stopping_met is false: run more queries (at least 64 "
                                                 "for SingleStream's 90th percentile estimate)")
        if logged != scenario:
            return self.inferred_figure(detail, path, logged, scenario)
        key, _, divisor = RESULT_METRICS[scenario]
        got = self.need_number(detail, path, key)
        return None if got is None else float(got) / divisor

    def inferred_figure(self, detail: dict[str, Any], path: Path, logged: str, scenario: str) -> float | None:
        """The figure of ``scenario`` inferred from a ``logged`` run, as the official checker derives it."""
        if scenario == "Offline" and logged == "SingleStream":
            return self.need_number(detail, path, "result_qps_without_loadgen_overhead")
        if scenario == "Offline":   # from MultiStream: samples per query over the mean query latency
            spq = self.need_number(detail, path, "effective_samples_per_query")
            mean_ns = self.need_number(detail, path, "result_mean_query_latency_ns")
            return spq * 1e9 / mean_ns if spq and mean_ns else None
        # MultiStream from SingleStream: 8 samples per query at the early-stopping latency
        latency_ns = self.need_number(detail, path, "early_stopping_latency_ms")
        if latency_ns == 0:
            self.add(path, "early-stopping", "no early-stopping estimate to infer MultiStream from: run more "
                                             "SingleStream queries (662 for the 99th percentile)")
            return None
        return None if latency_ns is None else latency_ns * 8 / 1e6

    def check_accuracy_log_size(self, path: Path) -> None:
        if not self.need_file(path, "the accuracy log, truncated"):
            return
        size = path.stat().st_size
        if size > ACCURACY_LOG_MAX_BYTES:
            self.add(path, "accuracy-log-size",
                     f"{size} bytes > {ACCURACY_LOG_MAX_BYTES}: not truncated: {_TRUNCATE_FIX}")

    def check_accuracy(self, acc: Path, benchmark: str, division: str) -> float | None:
        """The accuracy run's checks; returns its F1 (None when unknown)."""
        f1s: list[float] = []
        txt = acc / "accuracy.txt"
        if self.need_file(txt, "accuracy-squad.py output plus hash="):
            f1s, has_hash = _f1_of(txt)
            if not f1s:
                self.add(txt, "accuracy-f1-line", "no line like {\"exact_match\": X, \"f1\": Y}: put the "
                                                  "accuracy script's output in it")
            if not has_hash:
                self.add(txt, "accuracy-hash", f"no hash=<sha256> line: {_TRUNCATE_FIX}")
        self.check_accuracy_log_size(acc / ACCURACY_LOG)
        self.need_file(acc / SUMMARY, "the accuracy run's summary")
        path = acc / DETAIL
        detail = self.check_log(path, "the accuracy run's detail log")
        if detail is not None:
            mode = detail.get("effective_test_mode")
            if mode is not None and mode not in ("AccuracyOnly", "SubmissionRun"):
                self.add(path, "test-mode", f"effective_test_mode is {mode}: accuracy/ needs an AccuracyOnly run")
            total = detail.get("qsl_reported_total_count", detail.get("effective_accuracy_sample_count"))
            counts = [c for c in (total, detail.get("effective_accuracy_sample_count")) if c is not None]
            if not counts:
                self.add(path, "log-key",
                         "no qsl_reported_total_count in the log: use the complete log LoadGen wrote")
            elif any(c != DATASET_SIZE for c in counts):
                self.add(path, "accuracy-count", f"the accuracy run covered {min(counts)} samples, not "
                                                 f"{DATASET_SIZE}: run accuracy mode over the whole dev set")
        # the official checker fails a file where any F1 line misses the target
        if f1s and division in CLOSED_RULES_DIVISIONS and min(f1s) < ACCURACY_TARGETS[benchmark]:
            self.add(txt, "accuracy-target", f"F1 {min(f1s)} < {ACCURACY_TARGETS[benchmark]} ({benchmark} target): "
                     "improve the model or submit as bert-99 / in open")
        return f1s[-1] if f1s else None

    def check_test01(self, test: Path, benchmark: str, scenario: str, division: str, edge: bool) -> None:
        if not test.is_dir():
            self.add(test, "test01",
                     "missing TEST01/ (compliance test, required in closed): run it and add its output")
            return
        verify_acc = test / "verify_accuracy.txt"
        if self.need_file(verify_acc, "TEST01 accuracy verification") and not _passed(verify_acc, whole_line=True):
            self.check_test01_fallback(test / "accuracy", verify_acc, benchmark)
        verify_perf = test / "verify_performance.txt"
        if (self.need_file(verify_perf, "TEST01 performance verification")
                and not _passed(verify_perf, whole_line=False)):
            self.add(verify_perf, "test01-verify", f"no {TEST_PASS!r}: the TEST01 performance check failed; rerun "
                                                   "both runs VALID with scores within 10%")
        # the official checker puts the TEST01 run through the same performance checks (600 s included)
        self.check_performance(test / "performance" / "run_1", scenario, division, edge)
        self.check_accuracy_log_size(test / "accuracy" / ACCURACY_LOG)
        txt = test / "accuracy" / "accuracy.txt"
        if self.need_file(txt, "holds the hash of the TEST01 accuracy log") and not _f1_of(txt)[1]:
            self.add(txt, "accuracy-hash", f"no hash=<sha256> line: {_TRUNCATE_FIX}")

    def check_test05(self, test: Path, scenario: str, division: str, edge: bool) -> None:
        """v4.1's TEST05: performance again with the TEST05 seeds, within 5 % (one-sided)."""
        if not test.is_dir():
            self.add(test, "test05", f"missing TEST05/ (compliance test, required in closed {self.rules.version}): "
                                     "run it (`distbert run --mode submission --mlperf-version v4.1`) and add its "
                                     "output")
            return
        verify_perf = test / "verify_performance.txt"
        if (self.need_file(verify_perf, "TEST05 performance verification")
                and not _passed(verify_perf, whole_line=False)):
            self.add(verify_perf, "test05-verify", f"no {TEST_PASS!r}: the TEST05 performance check failed; rerun "
                                                   "both runs VALID with the TEST05 score within 5%")
        self.check_performance(test / "performance" / "run_1", scenario, division, edge, self.rules.test05_seeds)

    def check_test01_fallback(self, acc: Path, verify_acc: Path, benchmark: str) -> None:
        """verify_accuracy failed: accept baseline/compliance F1 within the allowed gap (MLPERF.md section 5)."""
        base, comp = acc / "baseline_accuracy.txt", acc / "compliance_accuracy.txt"
        if not (base.is_file() and comp.is_file()):
            self.add(verify_acc, "test01-verify", f"no {TEST_PASS!r} and no TEST01/accuracy/baseline_accuracy.txt + "
                     "compliance_accuracy.txt: the responses differ from the accuracy run; fix that or add "
                     "the F1 fallback")
            return
        bs, cs = _f1_of(base)[0], _f1_of(comp)[0]
        b, c = (bs[-1] if bs else 0.0), (cs[-1] if cs else 0.0)
        if b <= 0 or c <= 0:
            self.add(verify_acc, "test01-verify",
                     f"no {TEST_PASS!r}, and baseline/compliance_accuracy.txt lack an F1 line")
            return
        gap = f1_gap(b, c)
        if gap > TEST01_ACCURACY_DELTA[benchmark]:
            self.add(verify_acc, "test01-verify", f"no {TEST_PASS!r}, and F1 baseline {b} vs compliance {c} "
                     f"differ by "
                     f"{gap:.5f} > {TEST01_ACCURACY_DELTA[benchmark]}: TEST01 accuracy fails")
