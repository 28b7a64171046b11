"""--target-qps auto / --target-latency-ms auto: targets from earlier runs in the results directory,
with real runs (null backend, test mode)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.test_engine_mp import env  # noqa: F401 - the shared run environment

PY = sys.executable
pytestmark = [pytest.mark.slow]


def _run(e, results, name, *args):
    proc = subprocess.run([PY, "-m", "distbert", "run", "--backend", "null", "--workers", "1", "--max-examples", "600",
                           "--output", str(results / name), *args], env=e, capture_output=True, text=True, timeout=120)
    return proc, (json.loads((results / name / "run.json").read_text()) if proc.returncode == 0 else None)


@pytest.mark.timeout(300)
def test_auto_targets_come_from_the_newest_comparable_run(env, tmp_path):  # noqa: F811
    results = tmp_path / "results"
    results.mkdir()
    proc, _ = _run(env, results, "ss0", "--scenario", "SingleStream", "--target-latency-ms", "auto")
    assert proc.returncode == 2 and "no earlier comparable run" in proc.stderr.strip().splitlines()[-1]

    _, off = _run(env, results, "off1", "--scenario", "Offline")
    rate = off["results"]["performance"]["result_samples_per_second"]
    _, other = _run(env, results, "off-sim", "--scenario", "Offline", "--backend", "sim", "--sim-latency", "0.002")
    # the sim run is newer but not comparable (another backend): auto ignores it
    _, off2 = _run(env, results, "off2", "--scenario", "Offline", "--target-qps", "auto")
    assert off2["config"]["loadgen"]["target_qps"] == pytest.approx(rate, rel=1e-6)

    _, srv = _run(env, results, "srv1", "--scenario", "Server", "--target-qps", "auto", "--test-query-count", "300")
    offline_rates = [off2["results"]["performance"]["result_samples_per_second"]]
    assert srv["config"]["loadgen"]["target_qps"] == pytest.approx(0.8 * offline_rates[0], rel=1e-6)
    _, srv2 = _run(env, results, "srv2", "--scenario", "Server", "--target-qps", "auto", "--test-query-count", "300")
    verdict = srv["results"]["performance"]["result_validity"]
    want = srv["config"]["loadgen"]["target_qps"] * (1.0 if verdict == "VALID" else 0.9)
    assert srv2["config"]["loadgen"]["target_qps"] == pytest.approx(want, rel=1e-3)

    _, ss = _run(env, results, "ss1", "--scenario", "SingleStream", "--test-query-count", "200")
    _, ss2 = _run(env, results, "ss2", "--scenario", "SingleStream", "--test-query-count", "200",
                  "--target-latency-ms", "auto")
    p90 = ss["results"]["performance"]["result_90.00_percentile_latency_ns"] / 1e6
    assert ss2["config"]["loadgen"]["target_latency_ms"] == pytest.approx(p90, abs=1e-3)
    assert other is not None
