"""Submission runs (performance + accuracy + TEST01) and the tree built from them.

Real runs: ``distbert run --mode submission`` in subprocesses (real LoadGen, ZeroMQ, workers) with
the oracle backend, whose logits are deterministic, so TEST01's byte comparison must pass. The
runs are test-mode runs (seconds, not 600 s), so the built tree is a dry run: the checks must fail
for exactly the reasons a short run gives (and, on a data set smaller than the official dev set, the
reasons a small QSL gives), and pass everything else. Runs on the data set in use (official or
synthetic, tests/conftest.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from distbert.data.squad import DEV_FEATURES
from distbert.errors import UserError
from distbert.submission import build as build_mod
from distbert.submission import compliance
from tests.conftest import REPO

PY = sys.executable
pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def env(session_cache) -> dict[str, str]:
    e = dict(os.environ)
    e["DISTBERT_CACHE"] = str(session_cache)
    e["DISTBERT_NO_PROGRESS"] = "1"
    e["PYTHONPATH"] = str(REPO)
    return e


@pytest.fixture(scope="module")
def runs(env, squad_dev, vocab, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("submission-runs")
    out = {}
    for scenario, workers in (("Offline", "2"), ("SingleStream", "1")):
        out[scenario] = root / scenario
        proc = subprocess.run([PY, "-m", "distbert", "run", "--backend", "oracle", "--mode", "submission",
                               "--scenario", scenario, "--workers", workers, "--dataset", str(squad_dev),
                               "--vocab", str(vocab), "--output", str(out[scenario])],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "TEST01: accuracy PASS (same first bytes)" in proc.stdout
    return out


@pytest.fixture(scope="module")
def store(squad_dev, vocab, session_cache):
    from distbert.data.squad.features import load_features

    return load_features(squad_dev, vocab, cache_dir=session_cache)


def _entries(path: Path) -> list[dict]:
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------- TEST01 run

@pytest.mark.timeout(600)
def test_submission_run_holds_performance_accuracy_and_test01(runs, store):
    for scenario, run in runs.items():
        record = json.loads((run / "run.json").read_text())
        assert list(record["results"]) == ["performance", "accuracy", "TEST01"]
        for sub in record["results"]:
            # three LoadGen tests in one process, one FromConfig: a second one logs an ERROR
            # ("Multiple conf files are used") that fails the submission checker
            assert compliance.read_detail(run / sub / "mlperf_log_detail.txt")["_errors"] == [], sub
        assert (run / "performance" / "user.conf").read_text().strip()     # never empty
        assert (run / "TEST01" / "audit.config").read_text() == compliance.AUDIT_CONFIG
        t01 = record["results"]["TEST01"]
        assert t01["accuracy_pass"] is True and t01["first_element_pass"] is True
        lines = (run / "TEST01" / "verify_accuracy.txt").read_text().splitlines()
        counts = dict(line.split(" = ") for line in lines if " = " in line)
        assert counts["num_acc_log_entries"] == str(len(store))
        assert counts["num_perf_log_data_mismatch"] == "0" and counts["num_missing_qsl_idxs"] == "0"
        sampled = _entries(run / "TEST01" / "mlperf_log_accuracy.json")
        assert int(counts["num_perf_log_entries"]) == len(sampled) > 0
        assert lines[-1] == "TEST PASS"
        if scenario == "Offline":      # LoadGen samples ~4096 of the responses (accuracy_log_sampling_target)
            issued = min(len(store), DEV_FEATURES)   # test mode: one pass over the QSL, at most 10833
            if issued <= 4096:
                assert len(sampled) == issued        # sampling probability 4096 / issued >= 1: all of them
            else:
                assert 3000 < len(sampled) < 6000
        perf = (run / "TEST01" / "verify_performance.txt").read_text()
        assert "Reference score = " in perf and "Test score = " in perf
        # the plain performance run logged no responses; the TEST01 one did
        assert _entries(run / "performance" / "mlperf_log_accuracy.json") == []


def test_a_changed_first_byte_fails_the_byte_check_but_not_the_f1_fallback(runs, store, tmp_path):
    run = tmp_path / "run"
    for sub in ("accuracy", "performance", "TEST01"):
        (run / sub).mkdir(parents=True)
        for f in (runs["Offline"] / sub).iterdir():
            (run / sub / f.name).write_bytes(f.read_bytes())
    test_log = run / "TEST01" / "mlperf_log_accuracy.json"
    entries = _entries(test_log)
    first = entries[0]["data"]
    entries[0]["data"] = f"{(int(first[:2], 16) ^ 1):02X}" + first[2:]   # last mantissa bit of start[0]
    test_log.write_text(json.dumps(entries))
    verdict = compliance.verify_test01(run, store)
    assert not verdict.first_element_pass
    assert "num_perf_log_data_mismatch = 1" in verdict.lines["verify_accuracy.txt"]
    assert verdict.accuracy_pass                          # F1 identical: the fallback accepts it
    assert (run / "TEST01" / "baseline_accuracy.txt").read_text() == \
        (run / "TEST01" / "compliance_accuracy.txt").read_text()

    # wrong answers in performance mode: start logits moved to another token on every sampled entry
    # (start[0] nudged too: the byte check compares only that one value, so it alone would not notice)
    import numpy as np

    for entry in entries:
        rows = np.frombuffer(bytes.fromhex(entry["data"]), np.float32).reshape(-1, 2).copy()
        rows[:, 0] = np.roll(rows[:, 0], 3)
        rows[0, 0] = np.nextafter(rows[0, 0], np.float32(np.inf))
        entry["data"] = rows.tobytes().hex().upper()
    test_log.write_text(json.dumps(entries))
    verdict = compliance.verify_test01(run, store)
    assert not verdict.accuracy_pass
    assert "TEST FAIL" in verdict.lines["verify_accuracy.txt"]


def test_verify_performance_needs_valid_runs_within_ten_percent(runs, tmp_path):
    ref = runs["Offline"] / "performance" / "mlperf_log_detail.txt"
    text = ref.read_text()
    score = float(compliance.read_detail(ref)["result_samples_per_second"])

    def variant(name: str, old: str, new: str) -> Path:
        assert old in text
        path = tmp_path / name
        path.write_text(text.replace(old, new))
        return path

    same, lines = compliance.verify_performance(ref, ref)
    assert same and lines[-1] == "TEST PASS"
    key = '"key": "result_samples_per_second", "value": '
    line = next(ln for ln in text.splitlines() if key in ln)
    value = line.split(key)[1].split(",")[0]
    slower = variant("slow.txt", key + value, key + repr(score * 0.85))
    ok, lines = compliance.verify_performance(ref, slower)
    assert not ok and lines[-1] == "TEST FAIL: Test score invalid"
    invalid = variant("invalid.txt", '"value": "VALID"', '"value": "INVALID"')
    ok, lines = compliance.verify_performance(ref, invalid)
    assert not ok and lines[-1].startswith("TEST FAIL: Invalid results")


def test_submission_mode_refuses_an_audit_conf(env, tmp_path):
    proc = subprocess.run([PY, "-m", "distbert", "run", "--backend", "null", "--mode", "submission",
                           "--audit-conf", "x.config", "--output", str(tmp_path / "r")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["distbert: error: --mode submission runs TEST01 with its own "
                                                "audit.config: drop --audit-conf"]


# ---------------------------------------------------------------------------------- the tree

def test_build_refuses_test_mode_runs_unless_asked(runs, tmp_path):
    with pytest.raises(UserError, match=r"--execution-mode test.*--allow-invalid"):
        build_mod.build([runs["Offline"], runs["SingleStream"]], tmp_path / "out", "Org", "box")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,match", [
    (["Offline"], r"exactly one run per scenario Offline, SingleStream \(got Offline\)"),
    (["Offline", "Offline"], r"both Offline runs"),
])
def test_build_refuses_wrong_scenario_sets_in_closed(runs, tmp_path, args, match):
    with pytest.raises(UserError, match=match):
        build_mod.build([runs[a] for a in args], tmp_path / "out", "Org", "box", allow_invalid=True)
    assert not (tmp_path / "out").exists()


def test_build_refuses_a_non_submission_run_and_a_non_empty_out(runs, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        build_mod.build([runs["Offline"], runs["SingleStream"]], tmp_path / "full", "Org", "box", allow_invalid=True)
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    with pytest.raises(UserError, match="has no run.json"):
        build_mod.build([tmp_path / "full"], tmp_path / "out", "Org", "box", division="open", allow_invalid=True)


def test_system_fields_distbert_cannot_measure_must_be_given(runs):
    run = build_mod.load_run(runs["Offline"])
    with pytest.raises(UserError, match=r"needs host_memory_configuration, host_storage_type, cooling.*--system-json"):
        build_mod.system_description([run], "Org", "box", "closed", {}, allow_invalid=False)
    given = {"host_memory_configuration": "1x24GB", "host_storage_type": "SSD", "cooling": "air"}
    desc = build_mod.system_description([run], "Org", "box", "closed", given, allow_invalid=False)
    assert desc["accelerators_per_node"] == "0" and desc["accelerator_model_name"] == "N/A"
    assert desc["number_of_nodes"] == 1 and desc["system_type"] == "edge" and desc["cooling"] == "air"
    assert desc["host_processor_core_count"] >= 1 and desc["host_memory_capacity"].endswith(" GB")


def test_run_json_records_the_source_and_its_commit(runs):
    """The package's digest, and from a git checkout (this one, when the tests run in one) its commit
    and whether the package's files differ from it."""
    from distbert.util.sysinfo import package_dir, source_digest

    source = json.loads((runs["SingleStream"] / "run.json").read_text())["source"]
    assert source["path"] == str(package_dir()) and len(source["digest"]) == 64 and source["files"] > 50
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0 and (REPO / ".git").exists():
        assert source["commit"] == head.stdout.strip() and isinstance(source["dirty"], bool)
        status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "distbert"],
                                capture_output=True, text=True, check=True).stdout
        if not status.strip():   # (a dirty package changes under the test: its digest may have moved since)
            assert source["dirty"] is False and source["digest"] == source_digest(package_dir())[0]


def test_the_code_folder_holds_no_name_the_official_checker_rejects(tmp_path):
    """A checkout's package folder may hold an editor's swap file, a stray ``copy of x.py``, bytecode;
    the official v4.1 checker rejects the whole submitter folder for a dot-name, a name with a space,
    a ``__pycache__`` folder or an empty folder (notes/submission_check.md, session 11). None of them
    ran, so none is source: not in the digest, not in the tree's code folder."""
    from distbert.util.sysinfo import source_digest, source_facts, source_files

    pkg = tmp_path / "distbert"
    for rel in ("__init__.py", "run/rank0.py", "data/vocab.json"):
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(f"# {rel}\n")
    clean = source_digest(pkg)
    junk = (".build.py.swp", "run/.rank0.py.swp", ".DS_Store", ".idea/workspace.xml", "copy of build.py",
            "run/a b/c.py", "run/__pycache__/rank0.cpython-311.pyc", "stale.pyc", "empty/")
    for rel in junk:
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        if not rel.endswith("/"):
            (pkg / rel).write_text("junk\n")
    assert [p.as_posix() for p in source_files(pkg)] == ["__init__.py", "data/vocab.json", "run/rank0.py"]
    assert source_digest(pkg) == clean          # junk appearing between the run and the build changes nothing

    code = tmp_path / "tree" / "code" / "bert-99"
    record = {"versions": {"distbert": "0", "python": "3"}, "command": ["distbert", "run"],
              "config": {"loadgen": {"scenario": "Offline"}}}
    build_mod._code_folder(code, [build_mod.Run(tmp_path, record)], "bert-99", source_facts(pkg))
    tree = tmp_path / "tree"
    names = [p.relative_to(tree) for p in tree.rglob("*")]
    assert {p.as_posix() for p in names if (tree / p).is_file()} == {
        "code/bert-99/README.md", "code/bert-99/source.json", "code/bert-99/distbert/__init__.py",
        "code/bert-99/distbert/data/vocab.json", "code/bert-99/distbert/run/rank0.py"}
    for p in names:     # the checker's folder rules, over every file and folder
        assert not any(part.startswith(".") or " " in part or part == "__pycache__" for part in p.parts), p
        assert (tree / p).is_file() or any((tree / p).iterdir()), f"empty folder {p}"


def test_a_run_of_other_source_cannot_build_a_tree_whose_code_folder_would_not_hold_it(runs, tmp_path):
    """A run whose recorded digest is not the source building the tree (another commit, or a run made
    before distbert recorded its source) is refused, naming the fix; --allow-invalid lists why."""
    copies = {}
    for scenario, run in runs.items():
        copies[scenario] = tmp_path / scenario
        shutil.copytree(run, copies[scenario])
    record = json.loads((copies["Offline"] / "run.json").read_text())
    record["source"] |= {"digest": "0" * 64, "commit": "1234567890abcdef" * 2 + "12345678", "dirty": True}
    (copies["Offline"] / "run.json").write_text(json.dumps(record))
    given = tmp_path / "sys.json"
    given.write_text(json.dumps({"host_memory_configuration": "x", "host_storage_type": "SSD", "cooling": "air"}))
    with pytest.raises(UserError, match=r"ran other distbert source \(commit 1234567890ab with local changes\) than "
                                        r"the one building the tree .*build with the source it ran"):
        build_mod.build([copies["Offline"], copies["SingleStream"]], tmp_path / "out", "Org", "box", division="open",
                        system_json=given)
    del record["source"]
    (copies["Offline"] / "run.json").write_text(json.dumps(record))
    result = build_mod.build([copies["Offline"], copies["SingleStream"]], tmp_path / "out", "Org", "box",
                             division="open", system_json=given, allow_invalid=True)
    assert any("recorded no distbert source" in why for why in result.invalid[str(copies["Offline"])])


def test_one_rule_decides_the_fields_a_system_needs():
    need = build_mod.required_system_fields(["a"], ["cpu", "cpu"])
    assert list(need) == list(build_mod.USER_FIELDS)
    need = build_mod.required_system_fields(["a", "a"], ["cpu", "cuda:1"])
    assert list(need) == [*build_mod.USER_FIELDS, *build_mod.GPU_USER_FIELDS]
    assert need["accelerator_interconnect"] == "a worker runs on cuda:1"
    need = build_mod.required_system_fields(["b", "a"], ["rocm"])
    assert set(build_mod.NETWORK_USER_FIELDS) <= set(need) and need["host_networking"] == "the runs span 2 hosts: a, b"
    given = dict.fromkeys(build_mod.USER_FIELDS, "x")
    assert build_mod.missing_system_fields(build_mod.required_system_fields(["a"], ["cpu"]), given) == ""


def test_the_build_wants_the_networking_fields_of_runs_that_span_two_hosts(runs):
    """The same rule from the records: workers on another host than rank 0 (the record says so)."""
    run = build_mod.load_run(runs["Offline"])
    record = json.loads(json.dumps(run.record))
    for w in record["workers"]:
        w["host"] = "node2"
    two_hosts = build_mod.Run(run.path, record)
    given = {"host_memory_configuration": "1x24GB", "host_storage_type": "SSD", "cooling": "air"}
    with pytest.raises(UserError, match=r"needs host_networking, host_network_card_count, host_networking_topology "
                                        r"\(the runs span 2 hosts: "):
        build_mod.system_description([two_hosts], "Org", "box", "closed", given, allow_invalid=False)
    desc = build_mod.system_description([run], "Org", "box", "closed", given, allow_invalid=False)
    assert desc["host_networking"] == "N/A"


@pytest.mark.timeout(300)
def test_dry_run_tree_is_complete_truncated_and_checked(runs, env, store, tmp_path):
    out = tmp_path / "sub"
    proc = subprocess.run([PY, "-m", "distbert", "submission", "build", str(runs["Offline"]), str(runs["SingleStream"]),
                           "--out", str(out), "--submitter", "Org", "--system", "box", "--allow-invalid"],
                          env=env, capture_output=True, text=True, timeout=120)
    # a dry run from test-mode runs: written, and the checks say it is not a valid submission
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "SUMMARY: submission has errors" in proc.stdout
    top = out / "closed" / "Org"
    for scenario, run in runs.items():
        d = top / "results" / "box" / "bert-99" / scenario
        for rel in ("README.md", "user.conf", "measurements.json", "performance/run_1/mlperf_log_detail.txt",
                    "performance/run_1/mlperf_log_summary.txt", "accuracy/accuracy.txt",
                    "accuracy/mlperf_log_accuracy.json", "accuracy/mlperf_log_detail.txt",
                    "accuracy/mlperf_log_summary.txt", "TEST01/verify_accuracy.txt", "TEST01/verify_performance.txt",
                    "TEST01/performance/run_1/mlperf_log_detail.txt", "TEST01/performance/run_1/mlperf_log_summary.txt",
                    "TEST01/accuracy/accuracy.txt", "TEST01/accuracy/mlperf_log_accuracy.json"):
            assert (d / rel).is_file() and (d / rel).stat().st_size > 0, rel
        for acc, src in ((d / "accuracy", run / "accuracy"), (d / "TEST01" / "accuracy", run / "TEST01")):
            full = (src / "mlperf_log_accuracy.json").read_bytes()
            assert (acc / "mlperf_log_accuracy.json").stat().st_size <= 10 * 1024 < len(full)
            text = (acc / "accuracy.txt").read_text()
            assert text.splitlines()[-1] == f"hash={hashlib.sha256(full).hexdigest()}"
            assert text.startswith('{"exact_match": ')
        assert json.loads((d / "measurements.json").read_text())["weight_data_types"] == "fp32"
    assert (top / "systems" / "box.json").is_file() and (top / "documentation" / "calibration.md").is_file()
    # the code folder holds distbert's source as it ran: the package's files, the same digest as the runs'
    from distbert.util.sysinfo import package_dir, source_digest, source_files

    code = top / "src" / "bert-99"
    ran = json.loads((runs["Offline"] / "run.json").read_text())["source"]
    assert source_digest(code / "distbert") == (ran["digest"], ran["files"])
    assert set(source_files(code / "distbert")) == set(source_files(package_dir()))
    assert (code / "distbert" / "submission" / "build.py").read_bytes() == Path(build_mod.__file__).read_bytes()
    facts = json.loads((code / "source.json").read_text())
    assert facts["digest"] == ran["digest"] and facts["commit"] == ran["commit"]
    assert facts["versions"]["mlcommons-loadgen"] and facts["versions"]["numpy"]
    readme = (code / "README.md").read_text()
    assert ran["digest"] in readme and "mlcommons-loadgen" in readme
    if ran["commit"]:
        assert ran["commit"] in readme
    with tarfile.open(out / "mlperf_submission.tar.gz") as tar:
        names = {m.name for m in tar.getmembers() if m.isfile()}
    on_disk = {str(p.relative_to(out)) for p in (out / "closed").rglob("*") if p.is_file()}
    assert names == on_disk
    rows = (out / "summary.csv").read_text().splitlines()
    assert len(rows) == 3                             # header + Offline + SingleStream
    assert list(out.parent.glob(".sub.partial-*")) == []

    # the checker on the tree agrees with the build; only what a seconds-long run cannot meet fails:
    # the 600 s minimum (main and TEST01 performance logs of both scenarios) and, by chance at these
    # durations, TEST01's 10 % performance match
    from distbert.submission.check import check_tree

    report = check_tree(out)
    rules = [p.rule for p in report.problems]
    assert rules.count("min-duration") == 4, report.problems
    allowed = {"min-duration", "test01-verify"}
    if len(store) < DEV_FEATURES:
        # a data set smaller than the dev set cannot make a closed submission either, and the checker
        # says where: every performance log (main and TEST01) has performance_sample_count = the QSL,
        # the Offline ones fewer samples per query, and both accuracy runs cover fewer samples
        small = {"performance-sample-count": 4, "offline-samples-per-query": 2, "accuracy-count": 2}
        assert {rule: rules.count(rule) for rule in small} == small, report.problems
        allowed |= set(small)
    assert set(rules) <= allowed, report.problems
    check = subprocess.run([PY, "-m", "distbert", "submission", "check", str(out)], env=env,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 1 and "SUMMARY: submission has errors" in check.stdout
    assert check.stdout.count("ERROR closed/Org/results/box/bert-99/") == len(rules)
    # pointed at the build's output folder, it says the official checker needs the unpacked tarball
    assert "NOTE this folder is a build's output folder" in check.stdout
    assert "NOTE this folder is a build's output folder" in proc.stdout   # the build says it too
