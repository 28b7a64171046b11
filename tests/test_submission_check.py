"""distbert.submission.check on a closed bert-99 tree built from REAL LoadGen 6.0.17 logs.

A tiny SUT (every sample answered at once with float32 zeros) runs LoadGen for Offline and
SingleStream in performance, accuracy and TEST01 (audit.config) mode. Each run is its own
subprocess (this file run as a script): LoadGen counts ``FromConfig`` calls per *process*, and a
second call logs ERROR ``error_invalid_config`` and skips the embedded mlperf.conf. The runs use
min_duration 0, so the pristine tree breaks exactly one rule (the 600 s duration) in both
performance logs; every mutation test asserts the problems it adds on top of that.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distbert.errors import UserError
from distbert.submission.check import CheckReport, Problem, check_tree

pytestmark = pytest.mark.timeout(120)

SUBMITTER = "Acme"
SYSTEM = "box1"
ROWS = 8   # response rows per sample; small keeps the accuracy logs a few MB
USER_CONF = "*.SingleStream.target_latency = 10\n*.Offline.target_qps = 32.0\n"
# compliance/TEST01/bert/audit.config (MLPERF.md section 5)
AUDIT_CONFIG = ("*.*.mode = 2\n*.*.accuracy_log_rng_seed = 720381539243781796\n"
                "*.*.accuracy_log_sampling_target = 4096\n")
RUNS = [("Offline", "performance"), ("Offline", "accuracy"), ("Offline", "test01"),
        ("SingleStream", "performance"), ("SingleStream", "accuracy"), ("SingleStream", "test01"),
        ("SingleStream", "twice")]   # "twice": FromConfig called twice -> a real LoadGen ERROR

SUB = f"closed/{SUBMITTER}"
BENCH = f"{SUB}/results/{SYSTEM}/bert-99"
SYS_JSON = f"{SUB}/systems/{SYSTEM}.json"
PERF = "performance/run_1/mlperf_log_detail.txt"
# the official checker applies the performance checks to TEST01's run too, the 600 s included
PRISTINE = {("min-duration", f"{BENCH}/{scenario}/{where}{PERF}")
            for scenario in ("Offline", "SingleStream") for where in ("", "TEST01/")}

SYSTEM_DESC = {
    "division": "closed", "submitter": SUBMITTER, "status": "available",
    "system_name": "test box", "system_type": "edge", "system_type_detail": "N/A",
    "number_of_nodes": 1, "host_processor_model_name": "Some CPU", "host_processors_per_node": 1,
    "host_processor_core_count": 2, "host_processor_frequency": "", "host_processor_caches": "",
    "host_processor_interconnect": "", "host_memory_capacity": "24 GB", "host_memory_configuration": "1x24GB",
    "host_storage_capacity": "100 GB", "host_storage_type": "SSD", "host_networking": "N/A",
    "host_networking_topology": "N/A", "host_network_card_count": "N/A",
    "accelerators_per_node": "0", "accelerator_model_name": "N/A", "accelerator_memory_capacity": "N/A",
    "accelerator_frequency": "", "accelerator_host_interconnect": "N/A", "accelerator_interconnect": "N/A",
    "accelerator_interconnect_topology": "", "accelerator_memory_configuration": "N/A",
    "accelerator_on-chip_memories": "", "cooling": "air", "framework": "onnxruntime 1.20",
    "operating_system": "Linux", "other_software_stack": "python 3.11, loadgen 6.0.17",
    "hw_notes": "", "sw_notes": "",
}
MEASUREMENTS = {"input_data_types": "int64", "retraining": "No",
                "starting_weights_filename": "model.onnx (zenodo 3733910)", "weight_data_types": "fp32",
                "weight_transformations": "none"}


# --- the LoadGen side: runs in a child process --------------------------------------------------

def _loadgen_main(scenario: str, mode: str, outdir: str) -> None:
    import mlperf_loadgen as lg
    import numpy as np

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    response = np.zeros((ROWS, 2), np.float32)   # alive for the whole run

    def issue(samples: list) -> None:
        lg.QuerySamplesComplete([lg.QuerySampleResponse(s.id, response.ctypes.data, response.nbytes)
                                 for s in samples])

    (out / "user.conf").write_text(USER_CONF)
    audit = out / "audit.config"
    if mode == "test01":
        audit.write_text(AUDIT_CONFIG)
    settings = lg.TestSettings()
    for _ in range(2 if mode == "twice" else 1):
        assert settings.FromConfig(str(out / "user.conf"), "bert", scenario) == 0
    settings.scenario = getattr(lg.TestScenario, scenario)
    settings.mode = lg.TestMode.AccuracyOnly if mode == "accuracy" else lg.TestMode.PerformanceOnly
    settings.min_duration_ms = 0
    if scenario == "SingleStream":
        settings.min_query_count = 100
        settings.max_query_count = 100
    log_settings = lg.LogSettings()
    log_settings.log_output.outdir = str(out)
    log_settings.enable_trace = False
    sut = lg.ConstructSUT(issue, lambda: None)
    qsl = lg.ConstructQSL(10833, 10833, lambda s: None, lambda s: None)
    # an absent audit path means no audit, whatever lies in the CWD
    lg.StartTestWithLogSettings(sut, qsl, settings, log_settings, str(audit))
    lg.DestroyQSL(qsl)
    lg.DestroySUT(sut)


# --- the tree -------------------------------------------------------------------------------------

def _truncate(src: Path, dst: Path) -> str:
    """As truncate_accuracy_log.py: first 4 KiB + marker + last 4 KiB; returns the full log's sha256."""
    data = src.read_bytes()
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data[:4096] + b"\n\n...\n\n" + data[-4096:])
    return hashlib.sha256(data).hexdigest()


def _copy_logs(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("mlperf_log_detail.txt", "mlperf_log_summary.txt"):
        shutil.copy(src / name, dst / name)


def _build_tree(logs: Path, root: Path) -> None:
    sub = root / SUB
    (sub / "systems").mkdir(parents=True)
    (sub / "systems" / f"{SYSTEM}.json").write_text(json.dumps(SYSTEM_DESC, indent=2))
    (sub / "src" / "bert-99").mkdir(parents=True)
    (sub / "src" / "bert-99" / "README.md").write_text("# distbert\nrun with `distbert run`\n")
    (sub / "documentation").mkdir()
    (sub / "documentation" / "calibration.md").write_text("No calibration: fp32 weights as published.\n")
    for scenario in ("Offline", "SingleStream"):
        scen = root / BENCH / scenario
        scen.mkdir(parents=True)
        (scen / "README.md").write_text(f"# bert-99 {scenario}\n`distbert run --scenario {scenario}`\n")
        shutil.copy(logs / f"{scenario}-performance" / "user.conf", scen / "user.conf")
        (scen / "measurements.json").write_text(json.dumps(MEASUREMENTS))
        _copy_logs(logs / f"{scenario}-performance", scen / "performance" / "run_1")
        acc = scen / "accuracy"
        _copy_logs(logs / f"{scenario}-accuracy", acc)
        digest = _truncate(logs / f"{scenario}-accuracy" / "mlperf_log_accuracy.json", acc / "mlperf_log_accuracy.json")
        (acc / "accuracy.txt").write_text(f'{{"exact_match": 83.0, "f1": 90.5}}\nhash={digest}\n')
        test = scen / "TEST01"
        _copy_logs(logs / f"{scenario}-test01", test / "performance" / "run_1")
        digest = _truncate(logs / f"{scenario}-test01" / "mlperf_log_accuracy.json",
                           test / "accuracy" / "mlperf_log_accuracy.json")
        (test / "accuracy" / "accuracy.txt").write_text(f'{{"exact_match": 83.1, "f1": 90.6}}\nhash={digest}\n')
        (test / "verify_accuracy.txt").write_text(
            "num_acc_log_entries = 10833\nnum_acc_log_duplicate_keys = 0\nnum_acc_log_data_mismatch = 0\n"
            "num_perf_log_entries = 4096\nnum_perf_log_qsl_idx_match = 4096\nnum_perf_log_data_mismatch = 0\n"
            "num_missing_qsl_idxs = 0\nTEST PASS\n")
        (test / "verify_performance.txt").write_text("Reference score = 1.0\nTest score = 1.0\nTEST PASS\n")


@pytest.fixture(scope="session")
def loadgen_logs(tmp_path_factory) -> Path:
    logs = tmp_path_factory.mktemp("loadgen-logs")
    procs = []
    for scenario, mode in RUNS:
        outdir = logs / f"{scenario}-{mode}"
        outdir.mkdir()
        procs.append((outdir, subprocess.Popen([sys.executable, __file__, scenario, mode, str(outdir)], cwd=outdir,
                                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    for outdir, proc in procs:
        output, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, f"LoadGen run {outdir.name} failed:\n{output}"
    return logs


@pytest.fixture(scope="session")
def pristine(loadgen_logs, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine") / "submission"
    _build_tree(loadgen_logs, root)
    return root


@pytest.fixture
def tree(pristine, tmp_path) -> Path:
    root = tmp_path / "submission"
    shutil.copytree(pristine, root)
    return root


# --- helpers --------------------------------------------------------------------------------------

def kinds(report: CheckReport) -> set[tuple[str, str]]:
    return {(p.rule, p.path) for p in report.problems}


def added(root: Path) -> set[tuple[str, str]]:
    """The (rule, path) pairs on top of the pristine tree's duration problems."""
    report = check_tree(root)
    assert all(p.message and "\n" not in p.message for p in report.problems)
    return kinds(report) - _moved(PRISTINE, root)


def _moved(pairs: set[tuple[str, str]], root: Path) -> set[tuple[str, str]]:
    """PRISTINE, with closed/ replaced by open/ when the tree was moved to open."""
    if (root / "open").is_dir():
        return {(rule, path.replace("closed/", "open/", 1)) for rule, path in pairs}
    return pairs


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DELETE:
            del data[key]
        else:
            data[key] = value
    path.write_text(json.dumps(data))


_DELETE = object()


def set_log_value(path: Path, key: str, value) -> None:
    """Rewrite one ``:::MLLOG`` entry's value in a copied detail log."""
    lines = path.read_text().splitlines()
    hits = 0
    for i, line in enumerate(lines):
        head, sep, body = line.partition(":::MLLOG ")
        if sep:
            entry = json.loads(body)
            if entry.get("key") == key:
                entry["value"] = value
                lines[i] = head + sep + json.dumps(entry)
                hits += 1
    assert hits == 1, f"{key} found {hits} times in {path}"
    path.write_text("\n".join(lines) + "\n")


def meet_duration(root: Path, division: str = "closed") -> None:
    """Make the short runs look like 600 s ones (the only rule they break), for validity tests."""
    for scenario in ("Offline", "SingleStream"):
        for where in ("", "TEST01/"):
            path = root / division / SUBMITTER / "results" / SYSTEM / "bert-99" / scenario / f"{where}{PERF}"
            if path.is_file():
                set_log_value(path, "effective_min_duration_ms", 600000)


def to_open(root: Path) -> None:
    (root / "closed").rename(root / "open")
    edit_json(root / "open" / SUBMITTER / "systems" / f"{SYSTEM}.json", division="open")


def rows(report: CheckReport) -> dict[str, bool]:
    return {r.scenario: r.valid for r in report.results}


# --- the pristine tree ------------------------------------------------------------------------------

def test_pristine_tree_breaks_only_the_duration_rule(pristine):
    report = check_tree(pristine)
    assert kinds(report) == PRISTINE
    assert not report.ok
    assert len(report.problems) == 4
    for p in report.problems:
        assert "effective_min_duration_ms is 0 < 600000" in p.message
    assert [(r.scenario, r.valid) for r in report.results] == [("Offline", False), ("SingleStream", False)]
    assert report.summary_lines()[-1] == "SUMMARY: submission has errors"


def test_duration_met_tree_is_ok_with_real_figures(tree, tmp_path):
    meet_duration(tree)
    report = check_tree(tree)
    assert report.problems == []
    assert report.ok
    offline, single = report.results
    assert (offline.division, offline.submitter, offline.system) == ("closed", SUBMITTER, SYSTEM)
    assert offline.benchmark == "bert-99"
    assert (offline.scenario, offline.metric) == ("Offline", "samples/s") and offline.value > 0
    assert (single.scenario, single.metric) == ("SingleStream", "latency (ms)") and 0 < single.value < 1000
    assert offline.f1 == single.f1 == 90.5
    assert offline.valid and single.valid
    lines = report.summary_lines()
    assert lines[-1] == "SUMMARY: submission looks OK"
    assert lines[-2].startswith("Results=2 NoResults=0")
    assert any("Offline" in line and "samples/s" in line and "90.5" in line for line in lines)
    out = tmp_path / "summary.csv"
    report.write_csv(out)
    with out.open() as f:
        table = list(csv.DictReader(f))
    assert [t["scenario"] for t in table] == ["Offline", "SingleStream"]
    assert float(table[0]["value"]) == offline.value and table[0]["f1"] == "90.5" and table[0]["valid"] == "true"


def test_the_real_loadgen_keys_the_checker_relies_on(loadgen_logs):
    from distbert.data.loadgen_logs import read_detail

    offline = read_detail(loadgen_logs / "Offline-performance" / "mlperf_log_detail.txt")
    assert offline["effective_qsl_rng_seed"] == 2085463073848966840
    assert offline["effective_sample_index_rng_seed"] == 2747215439041700203
    assert offline["effective_schedule_rng_seed"] == 16159082839903944936
    assert offline["effective_scenario"] == "Offline"
    assert offline["effective_samples_per_query"] == 10833
    assert offline["effective_performance_sample_count"] == 10833
    assert offline["effective_min_duration_ms"] == 0
    assert offline["result_validity"] == "VALID"
    single = read_detail(loadgen_logs / "SingleStream-performance" / "mlperf_log_detail.txt")
    assert single["early_stopping_met"] is True and single["early_stopping_latency_ss"] > 0
    accuracy = read_detail(loadgen_logs / "Offline-accuracy" / "mlperf_log_detail.txt")
    assert accuracy["qsl_reported_total_count"] == accuracy["effective_accuracy_sample_count"] == 10833
    twice = loadgen_logs / "SingleStream-twice" / "mlperf_log_detail.txt"
    # LoadGen's errors use error_<kind> keys (flagged is_error): read_detail collects them
    assert '"key": "error_invalid_config"' in twice.read_text()
    assert read_detail(twice)["_errors"] == ["error_invalid_config: Multiple conf files are used. "
                                             "This is not valid for official submission."]
    assert read_detail(loadgen_logs / "Offline-performance" / "mlperf_log_detail.txt")["_errors"] == []


# --- system description --------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["cooling", "hw_notes", "accelerators_per_node", "system_type_detail"])
def test_missing_system_field(tree, field):
    edit_json(tree / SYS_JSON, **{field: _DELETE})
    assert added(tree) == {("system-field", SYS_JSON)}


@pytest.mark.parametrize("value, accepted", [("", False), (None, False), (0, False), ("   ", False),
                                             ("0", True), ("N/A", True), (1, True)])
def test_accelerators_per_node_needs_a_meaningful_value(tree, value, accepted):
    edit_json(tree / SYS_JSON, accelerators_per_node=value)
    assert added(tree) == (set() if accepted else {("system-value", SYS_JSON)})


def test_empty_string_allowed_where_no_meaningful_value_is_required(tree):
    edit_json(tree / SYS_JSON, hw_notes="", accelerator_frequency="")
    assert added(tree) == set()


@pytest.mark.parametrize("changes, rule", [
    ({"submitter": "Other"}, "system-mismatch"),
    ({"division": "open"}, "system-mismatch"),
    ({"status": "unavailable"}, "system-status"),
    ({"system_type": "datacenter"}, "system-type"),
    ({"system_type": "server"}, "system-type"),
    ({"is_network": "true"}, "is-network"),
    ({"is_network": True}, "is-network"),
    ({"is_network": False}, "is-network"),   # a JSON boolean crashes the official checker (.lower())
])
def test_system_json_values(tree, changes, rule):
    edit_json(tree / SYS_JSON, **changes)
    assert added(tree) == {(rule, SYS_JSON)}


@pytest.mark.parametrize("changes", [{"is_network": "false"}, {"is_network": "False"},
                                     {"system_type": "datacenter,edge"}])
def test_system_json_accepted_values(tree, changes):
    edit_json(tree / SYS_JSON, **changes)
    assert added(tree) == set()


def test_submitter_mismatch_message_names_both(tree):
    edit_json(tree / SYS_JSON, submitter="Other")
    message = next(p.message for p in check_tree(tree).problems if p.rule == "system-mismatch")
    assert "'Other'" in message and f"'{SUBMITTER}'" in message


def test_results_without_system_json(tree):
    (tree / SYS_JSON).unlink()
    assert added(tree) == {("system-json", SYS_JSON)}


def test_broken_system_json(tree):
    (tree / SYS_JSON).write_text("{not json")
    assert added(tree) == {("system-json", SYS_JSON)}


# --- submitter layout ----------------------------------------------------------------------------

def test_src_and_calibration_required(tree):
    shutil.rmtree(tree / SUB / "src")
    (tree / SUB / "documentation" / "calibration.md").unlink()
    assert added(tree) == {("src", f"{SUB}/src"), ("missing-file", f"{SUB}/documentation/calibration.md")}


def test_calibration_not_required_in_open(tree):
    to_open(tree)
    (tree / "open" / SUBMITTER / "documentation" / "calibration.md").unlink()
    assert added(tree) == set()


def test_unknown_division_and_benchmark(tree):
    (tree / "closedd").mkdir()
    shutil.copytree(tree / BENCH, tree / f"{SUB}/results/{SYSTEM}/resnet50")
    assert added(tree) == {("division", "closedd"), ("benchmark", f"{SUB}/results/{SYSTEM}/resnet50")}


def test_empty_root(tmp_path):
    report = check_tree(tmp_path)
    assert kinds(report) == {("division", ".")} and report.results == []
    assert report.summary_lines()[-1] == "SUMMARY: submission has errors"


def test_bad_arguments(tmp_path):
    with pytest.raises(UserError, match="v3.0: distbert knows"):
        check_tree(tmp_path, version="v3.0")
    with pytest.raises(UserError, match="no such directory"):
        check_tree(tmp_path / "absent")


def test_each_round_checks_its_own_seeds_and_layout(tree):
    """The v6.1 tree under another round's rules: v6.0 (same layout) finds only the seeds wrong, in
    every performance log; v5.1 also misses its compliance/ and measurements/ trees and code/."""
    meet_duration(tree)
    v60 = check_tree(tree, "v6.0")
    seeds = {p.path for p in v60.problems if p.rule == "seed"}
    assert seeds == {f"{BENCH}/{scenario}/{where}{PERF}" for scenario in ("Offline", "SingleStream")
                     for where in ("", "TEST01/")}
    assert {p.rule for p in v60.problems} == {"seed"}
    v51 = check_tree(tree, "v5.1")
    rules_hit = {p.rule for p in v51.problems}
    assert {"seed", "src", "test01", "missing-file"} <= rules_hit
    assert any(p.path == f"{SUB}/compliance/{SYSTEM}/bert-99/Offline/TEST01" for p in v51.problems)
    assert any(p.path.startswith(f"{SUB}/measurements/{SYSTEM}/bert-99/") for p in v51.problems)


# --- folder rules (v4.1's checker rejects a whole submitter folder, division or tree for each) ----

def _write(path: Path, text: str = "x\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _big_files(folder: Path) -> None:
    """Sparse files one byte over the 50 MB limit and exactly at it (only the first breaks it)."""
    for name, size in (("big.bin", 50 * 1024 * 1024 + 1), ("limit.bin", 50 * 1024 * 1024)):
        with (folder / name).open("wb") as f:
            f.truncate(size)


CODE = f"{SUB}/src/bert-99"
FOLDER_EDITS = {   # case -> (rule, edit on the tree root, the path of the one problem it must add)
    "broken-link": ("broken-link", lambda r: os.symlink("no-such-file", r / CODE / "gone.py"), f"{CODE}/gone.py"),
    # valid from its own folder, but the official checker resolves a relative target from the tree root
    "link-from-root": ("broken-link", lambda r: os.symlink("README.md", r / CODE / "link.md"), f"{CODE}/link.md"),
    "file-size": ("file-size", lambda r: _big_files(r / SUB / "documentation"), f"{SUB}/documentation/big.bin"),
    "dot-file": ("dot-name", lambda r: _write(r / CODE / ".build.py.swp"), f"{CODE}/.build.py.swp"),
    "dot-folder": ("dot-name", lambda r: _write(r / CODE / ".ipynb_checkpoints" / "x.py"),
                   f"{CODE}/.ipynb_checkpoints"),
    "space-name": ("space-name", lambda r: _write(r / CODE / "copy of x.py"), f"{CODE}/copy of x.py"),
    "pycache": ("pycache", lambda r: _write(r / CODE / "__pycache__" / "x.cpython-311.pyc"), f"{CODE}/__pycache__"),
    "empty-folder": ("empty-folder", lambda r: (r / SUB / "documentation" / "extra").mkdir(),
                     f"{SUB}/documentation/extra"),
    "division-files": ("division-files", lambda r: _write(r / "closed" / "notes.txt"), "closed/notes.txt"),
    "root-files": ("root-files", lambda r: _write(r / "summary.csv"), "summary.csv"),
}


@pytest.mark.parametrize("case", list(FOLDER_EDITS))
def test_each_folder_rule_is_one_problem_in_v41_and_none_in_v61(pristine, tree, case):
    """One small edit of a copy of the tree per rule of the v4.1 checker's folder checks: under v4.1 it
    adds exactly that one problem, naming the path; under v6.1 (whose stored checker has no folder
    rules) nothing."""
    rule, edit, path = FOLDER_EDITS[case]
    edit(tree)
    report = check_tree(tree, "v4.1")
    assert kinds(report) - kinds(check_tree(pristine, "v4.1")) == {(rule, path)}
    message = next(p.message for p in report.problems if p.rule == rule)
    assert "\n" not in message and "official v4.1 checker rejects" in message
    assert added(tree) == set()


def test_pristine_tree_breaks_no_folder_rule_and_md_pdf_may_lie_beside_closed(pristine, tree):
    folder_rules = {rule for rule, _, _ in FOLDER_EDITS.values()}
    assert not {p.rule for p in check_tree(pristine, "v4.1").problems} & folder_rules
    _write(tree / "README.md")
    _write(tree / "system-notes.pdf")
    assert kinds(check_tree(tree, "v4.1")) == kinds(check_tree(pristine, "v4.1"))


def test_a_build_output_folder_gets_a_note_to_check_the_unpacked_tarball(pristine, tree):
    """The build writes its tarball, summaries and plots beside closed/: no part of the submission, so
    no root-files problem there, but a note that the official checker needs the unpacked tarball."""
    for name in ("mlperf_submission.tar.gz", "summary.csv", "summary.txt", "Offline.png"):
        _write(tree / name)
    assert check_tree(pristine, "v4.1").notes == [] and check_tree(pristine).notes == []
    v41 = check_tree(tree, "v4.1")
    assert kinds(v41) == kinds(check_tree(pristine, "v4.1"))
    assert len(v41.notes) == 1 and "tar xzf mlperf_submission.tar.gz -C tree" in v41.notes[0]
    assert "v4.1 checker rejects whole for the 4 file(s) beside the division folders" in v41.notes[0]
    v61 = check_tree(tree)
    assert kinds(v61) == PRISTINE and len(v61.notes) == 1 and "tar xzf" in v61.notes[0]
    assert "rejects" not in v61.notes[0]


# --- scenario set --------------------------------------------------------------------------------

def test_extra_server_dir_in_closed_invalidates_every_scenario(tree):
    meet_duration(tree)
    assert all(rows(check_tree(tree)).values())
    shutil.copytree(tree / BENCH / "Offline", tree / BENCH / "Server")
    report = check_tree(tree)
    scenario_set = [p for p in report.problems if p.rule == "scenario-set"]
    assert [p.path for p in scenario_set] == [BENCH]
    assert "Server" in scenario_set[0].message and "every scenario" in scenario_set[0].message
    assert rows(report) == {"Offline": False, "Server": False, "SingleStream": False}
    # Offline and SingleStream have no problem of their own: the benchmark-level one invalidates them
    assert not [p for p in report.problems if p.path.startswith(f"{BENCH}/Offline")]


def test_missing_singlestream_in_closed(tree):
    meet_duration(tree)
    shutil.rmtree(tree / BENCH / "SingleStream")
    report = check_tree(tree)
    assert kinds(report) == {("scenario-set", BENCH)}
    assert "SingleStream" in report.problems[0].message and "every scenario" in report.problems[0].message
    assert rows(report) == {"Offline": False}


def test_open_division_takes_any_subset_of_known_scenarios(tree):
    to_open(tree)
    meet_duration(tree, "open")
    open_bench = f"open/{SUBMITTER}/results/{SYSTEM}/bert-99"
    shutil.rmtree(tree / open_bench / "SingleStream")
    shutil.copytree(tree / open_bench / "Offline", tree / open_bench / "offline")
    report = check_tree(tree)
    assert kinds(report) == {("scenario-name", f"{open_bench}/offline")}
    assert rows(report) == {"Offline": True}


# --- scenario files ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["README.md", "user.conf"])
def test_readme_and_user_conf_present_and_nonempty(tree, name):
    path = f"{BENCH}/Offline/{name}"
    (tree / path).write_text("\n")
    assert added(tree) == {("empty-file", path)}
    (tree / path).unlink()
    assert added(tree) == {("missing-file", path)}


@pytest.mark.parametrize("key", ["input_data_types", "retraining", "starting_weights_filename",
                                 "weight_data_types", "weight_transformations"])
def test_measurements_keys(tree, key):
    path = f"{BENCH}/SingleStream/measurements.json"
    edit_json(tree / path, **{key: _DELETE})
    assert added(tree) == {("measurements", path)}
    edit_json(tree / path, **{key: ""})
    assert added(tree) == {("measurements", path)}


# --- performance logs ----------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["effective_qsl_rng_seed", "effective_sample_index_rng_seed",
                                 "effective_schedule_rng_seed"])
def test_tampered_seed(tree, key):
    path = f"{BENCH}/Offline/{PERF}"
    set_log_value(tree / path, key, 12345)
    assert added(tree) == {("seed", path)}


def test_loadgen_error_line_appended(tree):
    path = f"{BENCH}/SingleStream/{PERF}"
    entry = {"key": "error_runtime", "value": "query took too long", "time_ms": 1.0, "namespace": "mlperf::logging",
             "event_type": "POINT_IN_TIME", "metadata": {"is_error": True, "is_warning": False}}
    with (tree / path).open("a") as f:
        f.write(":::MLLOG " + json.dumps(entry) + "\n")
    assert added(tree) == {("loadgen-error", path)}
    assert "error_runtime" in next(p.message for p in check_tree(tree).problems if p.rule == "loadgen-error")


def test_real_loadgen_error_from_two_fromconfig_calls(tree, loadgen_logs):
    path = f"{BENCH}/SingleStream/{PERF}"
    shutil.copy(loadgen_logs / "SingleStream-twice" / "mlperf_log_detail.txt", tree / path)
    assert added(tree) == {("loadgen-error", path)}


def test_loadgen_error_in_accuracy_log(tree, loadgen_logs):
    path = f"{BENCH}/Offline/accuracy/mlperf_log_detail.txt"
    shutil.copy(loadgen_logs / "SingleStream-twice" / "mlperf_log_detail.txt", tree / path)
    # a performance-mode SingleStream log in accuracy/: the error and the wrong mode are both reported
    assert added(tree) == {("loadgen-error", path), ("test-mode", path)}


@pytest.mark.parametrize("scenario, key, value, rule", [
    ("Offline", "effective_performance_sample_count", 1000, "performance-sample-count"),
    ("Offline", "effective_samples_per_query", 5000, "offline-samples-per-query"),
    ("Offline", "effective_scenario", "Server", "scenario-mismatch"),
    ("Offline", "result_validity", "INVALID", "validity"),
    ("SingleStream", "early_stopping_met", False, "early-stopping"),
    ("SingleStream", "effective_test_mode", "AccuracyOnly", "test-mode"),
])
def test_performance_log_rules(tree, scenario, key, value, rule):
    path = f"{BENCH}/{scenario}/{PERF}"
    set_log_value(tree / path, key, value)
    assert added(tree) == {(rule, path)}


def test_offline_samples_per_query_not_enforced_in_open(tree):
    to_open(tree)
    for where in ("", "TEST01/"):
        path = tree / f"open/{SUBMITTER}/results/{SYSTEM}/bert-99/Offline/{where}{PERF}"
        set_log_value(path, "effective_samples_per_query", 5000)
    assert added(tree) == set()


def test_logs_swapped_between_scenarios(tree, loadgen_logs):
    off, single = tree / BENCH / "Offline" / "performance", tree / BENCH / "SingleStream" / "performance"
    off.rename(tree / "tmp")
    single.rename(off)
    (tree / "tmp").rename(single)
    # an edge system may infer Offline from a SingleStream run (MLPERF.md section 4), not the reverse
    assert added(tree) == {("scenario-mismatch", f"{BENCH}/SingleStream/{PERF}")}
    from distbert.data.loadgen_logs import read_detail

    single_detail = read_detail(loadgen_logs / "SingleStream-performance" / "mlperf_log_detail.txt")
    offline_row = check_tree(tree).results[0]
    assert offline_row.scenario == "Offline"
    assert offline_row.value == single_detail["result_qps_without_loadgen_overhead"]


def test_no_inference_for_a_datacenter_system(tree):
    edit_json(tree / SYS_JSON, system_type="datacenter")
    shutil.rmtree(tree / BENCH / "Offline" / "performance")
    shutil.copytree(tree / BENCH / "SingleStream" / "performance", tree / BENCH / "Offline" / "performance")
    assert added(tree) == {("system-type", SYS_JSON), ("scenario-mismatch", f"{BENCH}/Offline/{PERF}")}


@pytest.mark.parametrize("name", ["mlperf_log_detail.txt", "mlperf_log_summary.txt"])
def test_performance_log_missing(tree, name):
    path = f"{BENCH}/Offline/performance/run_1/{name}"
    (tree / path).unlink()
    new = added(tree)
    assert new == {("missing-file", path)}
    # without the detail log there is no figure to report
    report = check_tree(tree)
    assert (report.results[0].value is None) == (name == "mlperf_log_detail.txt")


# --- accuracy ------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["accuracy", "TEST01/accuracy"])
def test_untruncated_accuracy_log(tree, loadgen_logs, where):
    path = f"{BENCH}/Offline/{where}/mlperf_log_accuracy.json"
    full = (loadgen_logs / "Offline-accuracy" / "mlperf_log_accuracy.json").read_bytes()
    (tree / path).write_bytes(full[:11 * 1024])
    assert added(tree) == {("accuracy-log-size", path)}
    message = next(p.message for p in check_tree(tree).problems if p.rule == "accuracy-log-size")
    assert "not truncated" in message and "distbert submission build" in message


@pytest.mark.parametrize("where", ["accuracy", "TEST01/accuracy"])
def test_accuracy_txt_without_hash(tree, where):
    path = f"{BENCH}/SingleStream/{where}/accuracy.txt"
    (tree / path).write_text('{"exact_match": 83.0, "f1": 90.5}\n')
    assert added(tree) == {("accuracy-hash", path)}


def test_accuracy_txt_without_f1_line(tree):
    path = f"{BENCH}/Offline/accuracy/accuracy.txt"
    (tree / path).write_text("exact_match 83.0 f1 90.5\nhash=abc123\n")
    assert added(tree) == {("accuracy-f1-line", path)}
    assert check_tree(tree).results[0].f1 is None


def _set_f1(root: Path, bench: str, f1: float) -> None:
    for scenario in ("Offline", "SingleStream"):
        path = root / bench / scenario / "accuracy" / "accuracy.txt"
        path.write_text(f"{{'exact_match': 82.0, 'f1': {f1}}}\nhash=0123abcd\n")


def test_f1_below_bert99_target_fails_in_closed(tree):
    _set_f1(tree, BENCH, 89.9)
    assert added(tree) == {("accuracy-target", f"{BENCH}/Offline/accuracy/accuracy.txt"),
                           ("accuracy-target", f"{BENCH}/SingleStream/accuracy/accuracy.txt")}
    _set_f1(tree, BENCH, 89.96526)
    assert added(tree) == set()


def test_every_f1_line_must_meet_the_target(tree):
    path = f"{BENCH}/Offline/accuracy/accuracy.txt"
    (tree / path).write_text('{"exact_match": 80.0, "f1": 89.0}\n{"exact_match": 84.0, "f1": 91.0}\nhash=ab12\n')
    assert added(tree) == {("accuracy-target", path)}


def test_f1_below_target_is_only_reported_in_open(tree):
    to_open(tree)
    _set_f1(tree, f"open/{SUBMITTER}/results/{SYSTEM}/bert-99", 89.9)
    report = check_tree(tree)
    assert added(tree) == set()
    assert [r.f1 for r in report.results] == [89.9, 89.9]


def test_bert999_target(tree):
    bench999 = f"{SUB}/results/{SYSTEM}/bert-99.9"
    (tree / BENCH).rename(tree / bench999)
    report = check_tree(tree)
    # F1 90.5 passes bert-99 but not bert-99.9 (90.78313)
    assert {p.rule for p in report.problems if p.rule != "min-duration"} == {"accuracy-target"}
    assert {p.path for p in report.problems if p.rule == "accuracy-target"} == {
        f"{bench999}/Offline/accuracy/accuracy.txt", f"{bench999}/SingleStream/accuracy/accuracy.txt"}
    assert {r.benchmark for r in report.results} == {"bert-99.9"}


def test_accuracy_run_must_cover_the_dev_set(tree):
    path = f"{BENCH}/Offline/accuracy/mlperf_log_detail.txt"
    set_log_value(tree / path, "effective_accuracy_sample_count", 1000)
    assert added(tree) == {("accuracy-count", path)}


def test_accuracy_detail_log_missing(tree):
    path = f"{BENCH}/Offline/accuracy/mlperf_log_detail.txt"
    (tree / path).unlink()
    assert added(tree) == {("missing-file", path)}


# --- TEST01 --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["verify_accuracy.txt", "verify_performance.txt"])
def test_test01_verify_without_pass(tree, name):
    path = f"{BENCH}/Offline/TEST01/{name}"
    (tree / path).write_text((tree / path).read_text().replace("TEST PASS", "TEST FAIL"))
    assert added(tree) == {("test01-verify", path)}


def test_verify_accuracy_needs_a_test_pass_line_of_its_own(tree):
    path = f"{BENCH}/Offline/TEST01/verify_accuracy.txt"
    (tree / path).write_text("num_acc_log_data_mismatch = 1\nNOT A TEST PASS\n")
    assert added(tree) == {("test01-verify", path)}


@pytest.mark.parametrize("compliance_f1, passes", [(90.0, True), (89.0, False)])
def test_test01_accuracy_fallback(tree, compliance_f1, passes):
    test = tree / BENCH / "SingleStream" / "TEST01"
    (test / "verify_accuracy.txt").write_text("num_acc_log_data_mismatch = 3\nTEST FAIL\n")
    (test / "accuracy" / "baseline_accuracy.txt").write_text('{"exact_match": 83.0, "f1": 90.5}\n')
    (test / "accuracy" / "compliance_accuracy.txt").write_text(f'{{"exact_match": 83.0, "f1": {compliance_f1}}}\n')
    expected = set() if passes else {("test01-verify", f"{BENCH}/SingleStream/TEST01/verify_accuracy.txt")}
    assert added(tree) == expected


def test_test01_required_in_closed_optional_in_open(tree):
    shutil.rmtree(tree / BENCH / "Offline" / "TEST01")
    assert added(tree) == {("test01", f"{BENCH}/Offline/TEST01")}
    to_open(tree)
    assert added(tree) == set()


def test_test01_performance_run_is_checked_like_the_main_one(tree):
    path = f"{BENCH}/SingleStream/TEST01/{PERF}"
    set_log_value(tree / path, "effective_schedule_rng_seed", 1)
    assert added(tree) == {("seed", path)}


def test_test01_present_in_open_is_checked(tree):
    to_open(tree)
    path = f"open/{SUBMITTER}/results/{SYSTEM}/bert-99/Offline/TEST01/performance/run_1/mlperf_log_summary.txt"
    (tree / path).unlink()
    assert added(tree) == {("missing-file", path)}


# --- report API ----------------------------------------------------------------------------------

def test_problem_is_one_line_and_prints_with_its_path():
    problem = Problem("closed/x/systems/y.json", "field 'cooling' missing: add it")
    assert str(problem) == "closed/x/systems/y.json: field 'cooling' missing: add it"
    assert problem.rule == ""


def test_every_problem_of_a_broken_tree_is_reported(tree):
    edit_json(tree / SYS_JSON, cooling=_DELETE, submitter="Other")
    (tree / BENCH / "Offline" / "TEST01" / "verify_performance.txt").write_text("TEST FAIL\n")
    edit_json(tree / BENCH / "SingleStream" / "measurements.json", retraining="")
    report = check_tree(tree)
    assert {rule for rule, _ in kinds(report)} == {"min-duration", "system-field", "system-mismatch",
                                                    "test01-verify", "measurements"}
    assert report.summary_lines()[-1] == "SUMMARY: submission has errors"
    assert report.summary_lines()[-2] == "Results=0 NoResults=2 Problems=8"


if __name__ == "__main__":   # one LoadGen run per process (see the module docstring)
    _loadgen_main(*sys.argv[1:])
