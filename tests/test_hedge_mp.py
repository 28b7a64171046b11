"""Hedged re-sends in a real run: ``distbert run`` with four local worker processes (ZeroMQ, the sim
backend), a short Server test, and one worker SIGSTOPped for 3 s mid-test and then continued, through
``bench/hedge_stall.py`` as an operator runs it. Hedging on, the slowest query stays far below the
stall and run.json's hedge counters move; hedging off, the same stall holds a query for its whole
length (so the fault did land: the first run's figure is hedging's, not luck's). LoadGen checks every
sample was completed exactly once (a second or a missing completion is one of its errors)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.test_engine_mp import env  # noqa: F401 - the shared fixture (feature cache built once)

pytestmark = [pytest.mark.slow]

STALL_S = 3.0


@pytest.mark.timeout(300)
def test_a_stopped_worker_costs_the_slowest_query_far_less_than_its_stall(env, squad_dev, vocab, tmp_path):  # noqa: F811
    out = tmp_path / "figures.json"
    cmd = [sys.executable, str(REPO / "bench" / "hedge_stall.py"), "--scenario", "Server", "--qps", "100",
           "--seconds", "8", "--stall-at", "2", "--stall", str(STALL_S), "--hedge", "on,off", "--timeout", "120",
           "--run-args", f"--dataset {squad_dev} --vocab {vocab}", "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-4000:]}"
    on, off = json.loads(out.read_text())["runs"]
    for run in (on, off):
        assert run["stall_s"] == STALL_S and run["loadgen_errors"] == 0, run
        assert run["samples"] == run["issued"] >= 800, run         # every query answered
    assert off["max_latency_s"] > 0.8 * STALL_S, off              # the stall held a query this long...
    assert off["hedges"]["sent"] == 0
    assert on["max_latency_s"] < 0.25 * STALL_S, on               # ...and hedging routed around it
    assert on["hedges"]["sent"] >= 1 and on["hedges"]["won"] >= 1, on
    assert on["hedge_log_lines"] == on["hedges"]["sent"]          # rank 0 said so, once per hedge
