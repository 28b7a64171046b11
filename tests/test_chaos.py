"""The chaos harness's short version (``bench/chaos.py``): about 60 s of Server with a fault every 9 s.

Rank 0 and three `distbert worker --connect` hosts as network namespaces, the oracle backend, a
Server accuracy test sized to the data set in use (every sample once in ~60 s); five faults of at
least four kinds (SIGKILL + restart at once and after 2 s, SIGSTOP 3 s, a 5-s link cut, a CPU hog on
rank 0's host, and a 20 % loss burst where ``nft`` exists). The harness runs as a subprocess, as an
operator runs it; the test reads its JSON: every sample answered exactly once, the oracle's F1
exact, and each fault's recovery observed (the hit worker's first result at rank 0 after the fault
ended; for the hog, the tail back under the latency bound). Root only (namespaces); skipped elsewhere
with the reason, a failure under DISTBERT_REQUIRE_LAUNCHERS=1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests import netns
from tests.conftest import REPO, launchers_unavailable
from tests.test_engine_mp import env, n_features  # noqa: F401 - the shared fixtures

PY = sys.executable
RUN_S = 60          # the accuracy test's length: samples = QPS x this
EVERY_S = 9         # faults at 9, 18, 27, 36, 45 s: the last (<= 5 s) is over well before the run ends

pytestmark = [pytest.mark.slow]


@pytest.mark.timeout(400)
def test_chaos_short_server_run(env, squad_dev, vocab, n_features, tmp_path):  # noqa: F811 - fixtures
    launchers_unavailable(netns.available())
    kinds = ["kill", "kill-2s", "stop-3s", "cut-5s", "hog"] + (["loss-2s"] if shutil.which("nft") else [])
    n = min(n_features, 2400)
    qps = round(n / RUN_S, 1)
    cmd = [PY, str(REPO / "bench" / "chaos.py"), "--workers", "3", "--scenario", "Server", "--mode", "accuracy",
           "--qps", str(qps), "--max-examples", str(n), "--every", str(EVERY_S), "--duration", str(5 * EVERY_S),
           "--kinds", ",".join(kinds), "--seed", "3", "--dataset", str(squad_dev), "--vocab", str(vocab),
           "--out", str(tmp_path / "out"), "--label", "ci", "--keep", str(tmp_path / "work")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=380)
    reports = list((tmp_path / "out").glob("chaos-*-ci.json"))
    assert reports, f"no report (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = json.loads(reports[0].read_text())
    rank0_log = "".join(p.read_text(errors="replace")[-3000:] for p in (tmp_path / "work").glob("cluster/logs/rank0-*"))
    where = f"\n{proc.stdout[-3000:]}\nrank 0:\n{rank0_log}"
    faults = report["faults"]
    assert len(faults) == 5 and len({f["kind"] for f in faults}) >= 4, [f["kind"] for f in faults]
    acc = report["checks"]["accuracy"]
    assert acc["exactly_once"] and acc["entries"] == n, f"missing {acc['missing']}, repeated {acc['repeated']}{where}"
    assert acc["f1_exact"], f"F1 {acc['f1']} != {acc['f1_direct']}{where}"
    assert report["checks"]["rank0_exit"] == 0, where
    unrecovered = [(f["kind"], f["targets"]) for f in faults if f["timeline"].get("recovery_s") is None]
    assert not unrecovered, f"no recovery observed for {unrecovered}{where}"
    assert report["checks"]["passed"] and proc.returncode == 0, where
    assert (tmp_path / "out" / reports[0].name.replace(".json", ".png")).is_file()
    print("\n" + proc.stdout[proc.stdout.find("chaos: Server"):])
