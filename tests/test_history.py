"""--target-qps auto / --target-latency-ms auto: targets from earlier runs in the results directory,
with real runs (null backend, test mode).

Every run reads the data set in use (``--dataset/--vocab``: official or synthetic, tests/conftest.py),
never the cache or the network, and takes at most as many features as that set has."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.test_engine_mp import env, n_features  # noqa: F401 - the shared run environment

PY = sys.executable
pytestmark = [pytest.mark.slow]


@pytest.fixture
def data(squad_dev, vocab, n_features) -> list[str]:  # noqa: F811
    """The data flags of every run: the set in use, its first 600 features (all of a smaller set)."""
    return ["--dataset", str(squad_dev), "--vocab", str(vocab), "--max-examples", str(min(600, n_features))]


def _run(e, data, results, name, *args):
    proc = subprocess.run([PY, "-m", "distbert", "run", "--backend", "null", "--workers", "1", *data,
                           "--output", str(results / name), *args], env=e, capture_output=True, text=True, timeout=120)
    return proc, (json.loads((results / name / "run.json").read_text()) if proc.returncode == 0 else None)


@pytest.mark.timeout(300)
def test_auto_targets_come_from_the_newest_comparable_run(env, data, tmp_path):  # noqa: F811
    results = tmp_path / "results"
    results.mkdir()
    proc, _ = _run(env, data, results, "ss0", "--scenario", "SingleStream", "--target-latency-ms", "auto")
    assert proc.returncode == 2 and "no earlier comparable run" in proc.stderr.strip().splitlines()[-1]

    _, off = _run(env, data, results, "off1", "--scenario", "Offline")
    rate = off["results"]["performance"]["result_samples_per_second"]
    _, other = _run(env, data, results, "off-sim", "--scenario", "Offline", "--backend", "sim", "--sim-latency", "0.002")
    # the sim run is newer but not comparable (another backend): auto ignores it
    _, off2 = _run(env, data, results, "off2", "--scenario", "Offline", "--target-qps", "auto")
    assert off2["config"]["loadgen"]["target_qps"] == pytest.approx(rate, rel=1e-6)

    _, srv = _run(env, data, results, "srv1", "--scenario", "Server", "--target-qps", "auto", "--test-query-count", "300")
    offline_rates = [off2["results"]["performance"]["result_samples_per_second"]]
    assert srv["config"]["loadgen"]["target_qps"] == pytest.approx(0.8 * offline_rates[0], rel=1e-6)
    _, srv2 = _run(env, data, results, "srv2", "--scenario", "Server", "--target-qps", "auto", "--test-query-count", "300")
    verdict = srv["results"]["performance"]["result_validity"]
    want = srv["config"]["loadgen"]["target_qps"] * (1.0 if verdict == "VALID" else 0.9)
    assert srv2["config"]["loadgen"]["target_qps"] == pytest.approx(want, rel=1e-3)

    _, ss = _run(env, data, results, "ss1", "--scenario", "SingleStream", "--test-query-count", "200")
    _, ss2 = _run(env, data, results, "ss2", "--scenario", "SingleStream", "--test-query-count", "200",
                  "--target-latency-ms", "auto")
    p90 = ss["results"]["performance"]["result_90.00_percentile_latency_ns"] / 1e6
    assert ss2["config"]["loadgen"]["target_latency_ms"] == pytest.approx(p90, abs=1e-3)
    assert other is not None


@pytest.mark.timeout(300)
def test_find_peak_brackets_then_bisects_and_runs_at_the_peak(env, data, tmp_path):  # noqa: F811
    results = tmp_path / "results"
    results.mkdir()
    proc, rec = _run(env, data, results, "fp", "--scenario", "Server", "--workers", "2", "--find-peak",
                     "--find-peak-probe-s", "0.5", "--target-qps", "20000", "--test-query-count", "500")
    assert proc.returncode == 0, proc.stderr[-3000:]
    fp = rec["results"]["find_peak"]
    probes = fp["probes"]
    best = fp["best_valid_qps"]
    assert len(probes) >= 3 and {"VALID", "INVALID"} <= {p["validity"] for p in probes}  # bracketed
    assert any(p["validity"] == "VALID" and p["target_qps"] == pytest.approx(best, abs=0.1) for p in probes)
    lowest_invalid = min(p["target_qps"] for p in probes if p["validity"] == "INVALID")
    assert fp["lowest_invalid_qps"] == pytest.approx(lowest_invalid, abs=0.1)
    assert best < lowest_invalid and (lowest_invalid - best) / lowest_invalid <= 0.03 + 1e-9
    assert rec["config"]["loadgen"]["target_qps"] == pytest.approx(best, abs=0.1)   # the tests ran at it
    assert len(list((results / "fp" / "find-peak").glob("probe-*/mlperf_log_detail.txt"))) == len(probes)
    assert "find-peak: highest VALID Server QPS" in proc.stdout


@pytest.mark.timeout(120)
def test_find_peak_that_finds_nothing_fails_with_one_line(env, data, tmp_path):  # noqa: F811
    """A 1 µs latency bound: no QPS is VALID; the search halves 8 times and stops with the cause."""
    proc, _ = _run(env, data, tmp_path, "fp", "--scenario", "Server", "--find-peak", "--find-peak-probe-s", "0.2",
                   "--target-qps", "50000", "--target-latency-ms", "0.001")
    assert proc.returncode == 2
    assert "--find-peak: no VALID Server run" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.timeout(300)
def test_auto_compares_with_the_model_the_run_will_use(env, data, tmp_path):  # noqa: F811
    """A real backend without --model: earlier runs recorded the generated model's path, and auto
    must compare with that path, not with 'no --model given'."""
    results = tmp_path / "results"
    results.mkdir()
    flags = ["--backend", "onnxruntime", "--random-shape", "tiny", "--scenario", "Offline", "--test-query-count", "64"]
    proc, first = _run(env, data, results, "ort1", *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert first["config"]["backend"]["model"]   # the resolved (generated) model's path
    proc, second = _run(env, data, results, "ort2", *flags, "--target-qps", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rate = first["results"]["performance"]["result_samples_per_second"]
    assert second["config"]["loadgen"]["target_qps"] == pytest.approx(rate, rel=1e-3)


_PROBE_PROG = r"""
import json, sys
import mlperf_loadgen as lg
from distbert.backends.base import BackendSpec
from distbert.config import BatchConfig, LoadGenConfig, RunConfig
from distbert.run.loadgen import probe_settings

qps, seconds, outdir = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
cfg = RunConfig(loadgen=LoadGenConfig(scenario="Server"), backend=BackendSpec("null"), batch=BatchConfig())
settings = probe_settings(cfg, 1000, qps, seconds)
sut = lg.ConstructSUT(lambda qs: lg.QuerySamplesComplete([lg.QuerySampleResponse(q.id, 0, 0) for q in qs]),
                      lambda: None)
qsl = lg.ConstructQSL(1000, 1000, lambda s: None, lambda s: None)
log = lg.LogSettings()
log.log_output.outdir = outdir
log.log_output.copy_summary_to_stdout = False
lg.StartTestWithLogSettings(sut, qsl, settings, log)
lg.DestroySUT(sut)
lg.DestroyQSL(qsl)
print(json.dumps({"min_query_count": settings.min_query_count}))
"""


@pytest.mark.timeout(60)
def test_a_short_find_peak_probe_issues_enough_queries_for_loadgen_early_stopping(tmp_path):
    """A SUT that answers at once must be VALID in a short, slow probe. With the old floor of 100
    queries a 0.1 s probe at 2000 QPS issued 200 queries and LoadGen's early stopping called it
    INVALID ("would need to run at least N more queries"), which made --find-peak halve to nothing."""
    proc = subprocess.run([sys.executable, "-c", _PROBE_PROG, "2000", "0.1", str(tmp_path)],
                          capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = (tmp_path / "mlperf_log_summary.txt").read_text()
    assert "Result is : VALID" in summary, summary
    assert json.loads(proc.stdout.strip().splitlines()[-1])["min_query_count"] >= 480
