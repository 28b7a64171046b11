"""The device commands of issue 19 (``bench/gpu/cmd*.sh``), run here as their CPU dry run.

The GPU machine is lent rarely and by the minute, so its scripts must be right before they get
there: the decisive command (``cmd1_shapes.sh``) runs end to end on this CPU with the real tools it
calls (``distbert run`` with its worker process and LoadGen, the backend-alone benches), a tiny random
model and few samples, and must leave the JSON a device run leaves under ``$OUT``. The time guard is
checked with a command that sleeps past its deadline. ``bench/gpu_report.py``'s FLOPs count is
checked against transformers' own parameter count. Scripts are shellcheck-clean where shellcheck is
installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import REPO

GPU = REPO / "bench" / "gpu"
_spec = importlib.util.spec_from_file_location("gpu_report", REPO / "bench" / "gpu_report.py")
assert _spec is not None and _spec.loader is not None
gpu_report: Any = importlib.util.module_from_spec(_spec)   # bench/ is scripts, not a package
_spec.loader.exec_module(gpu_report)

pytestmark = [pytest.mark.slow]


def _env(tmp_path: Path, squad_dev: Path, vocab: Path, cache: Path, **extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("OUT", "LIMIT_S", "DISTBERT_DATA_DIR")}
    e.update(DISTBERT_GPU_DRYRUN="1", PYTHON=sys.executable, OUT=str(tmp_path / "out"),
             GPU_CACHE=str(tmp_path / "gpu"), DISTBERT_CACHE=str(cache), DATASET=str(squad_dev), VOCAB=str(vocab))
    e.update(extra)
    return e


@pytest.mark.timeout(240)
def test_cmd1_dry_run_leaves_the_device_json(tmp_path, squad_dev, vocab, session_cache):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    env = _env(tmp_path, squad_dev, vocab, session_cache, SHAPES_SAMPLES="48", OFFLINE_SAMPLES="48",
               SS_QUERIES="30", SDPA_VARIANTS="auto flash")
    proc = subprocess.run(["bash", str(GPU / "cmd1_shapes.sh")], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=220)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    out = tmp_path / "out"
    # the device returns at most 8 files from $OUT
    assert sorted(p.name for p in out.iterdir()) == [
        "cmd1_shapes.json", "cmd1_shapes.log", "cmd1_shapes_runs.tgz", "gpu_check.json"]

    doc = json.loads((out / "cmd1_shapes.json").read_text())
    assert doc["dry_run"] is True and doc["complete"] is True, doc["steps"]
    assert [s["step"] for s in doc["steps"]] == ["env", "model", "features", "shapes-exact", "shapes-ladder",
                                                 "offline-ladder-fp32", "ss-bare", "shapes-cudnn-deprioritized"]
    assert doc["dataset"]["flops_per_sample"] > 0

    exact = doc["benches"]["shapes-exact-fp32"]["variants"]
    assert [v["name"] for v in exact] == ["default"]
    assert exact[0]["plan"]["ladder"] == "exact"
    assert set(exact[0]["passes"]) == {"first", "warm", "thread"}
    for p in exact[0]["passes"].values():
        assert p["complete"] and p["samples"] == 48 and p["samples_per_s"] > 0
    assert sum(s["count"] for s in exact[0]["shapes"]) == exact[0]["plan"]["batches"]

    ladder = doc["benches"]["shapes-ladder-fp32"]["variants"]
    assert [v["name"] for v in ladder] == ["auto", "flash"]
    assert ladder[1].get("reused_backend") is True          # only the kernel changed: no reload
    for v in ladder:
        assert "error" not in v, v
        assert v["plan"]["ladder"]["step"] > 0 and v["backend"]["sdpa"] == v["name"]
        assert v["plan"]["batch_shapes"] <= exact[0]["plan"]["batch_shapes"]
        assert set(v["passes"]) == {"first", "warm"}

    assert [v["name"] for v in doc["benches"]["shapes-deprioritized-fp32"]["variants"]] == ["auto"]

    bare = doc["benches"]["ss-bare-fp32"]
    assert bare["queries"] == 15 and bare["cold"]["queries"] + bare["warm"]["queries"] == 15
    assert bare["cold"]["queries"] == bare["distinct_shapes"]

    run = doc["runs"]["offline-ladder-fp32"]
    assert "failed" not in run, run
    assert run["scenario"] == "Offline" and run["samples_per_s"] > 0
    assert run["batch_shapes"] >= 1 and 0 <= run["padding_fraction"] < 1
    assert run["rank0_cpu_share"] is not None

    check = json.loads((out / "gpu_check.json").read_text())
    assert set(gpu_report.HEADLINE_KEYS) <= set(check)
    assert check["gpu"] == "cpu (dry run)" and check["dry_run"] is True
    assert check["offline_samples_per_s"] == run["samples_per_s"]
    assert check["mfu"] == pytest.approx(run["samples_per_s"] * doc["dataset"]["flops_per_sample"] / 989e12,
                                         rel=0.01, abs=1e-4)
    assert check["batch_shapes"] == run["batch_shapes"] and check["sdpa"] == "auto"

    with tarfile.open(out / "cmd1_shapes_runs.tgz") as tar:
        names = tar.getnames()
    assert "./offline-ladder-fp32/run.json" in names and "./steps.jsonl" in names


@pytest.mark.timeout(120)
def test_time_guard_cuts_a_step_and_skips_the_rest(tmp_path, squad_dev, vocab, session_cache):
    """A step still running at the command's deadline is stopped there, later steps are skipped, and
    the command's JSON and gpu_check.json are written anyway, inside the limit."""
    script = tmp_path / "guard.sh"
    script.write_text(f"""CMD=guard
LIMIT_S=12
source {GPU / "lib.sh"}
step sleeper 60 sleep 60
step never 60 true
finish
""")
    env = _env(tmp_path, squad_dev, vocab, session_cache, RESERVE_S="4", MIN_STEP_S="3")
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(script)], env=env, cwd=REPO, capture_output=True, text=True, timeout=100)
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads((tmp_path / "out" / "guard.json").read_text())
    steps = {s["step"]: s for s in doc["steps"]}
    assert steps["sleeper"]["status"] == "timeout" and steps["sleeper"]["limit_s"] <= 8
    assert steps["never"]["status"] == "skipped"
    assert doc["complete"] is False
    check = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert set(gpu_report.HEADLINE_KEYS) <= set(check) and check["offline_samples_per_s"] is None
    assert took < 12 + 15, f"the command took {took:.0f} s against its 12 s limit"


def test_flops_per_sample_counts_every_parameter():
    """F(L) = 2 N L + 4 layers hidden L^2, N = every parameter of transformers' BertForQuestionAnswering."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    from distbert.backends.modelmaker import SHAPES

    shape = SHAPES["tiny"]
    model = transformers.BertForQuestionAnswering(transformers.BertConfig(**shape.bert_config()))
    n = sum(p.numel() for p in model.parameters())
    lengths = np.array([100, 384])
    want = np.mean([2 * n * L + 4 * shape.num_hidden_layers * shape.hidden_size * L * L for L in lengths])
    assert gpu_report.flops_per_sample(shape, lengths) == pytest.approx(want, rel=1e-9)


def test_scripts_are_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt install shellcheck)")
    scripts = sorted(str(p) for p in GPU.glob("*.sh"))
    proc = subprocess.run(["shellcheck", "-x", *scripts], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def _bench(path: Path, rates: dict[str, float | None], extra_options: dict[str, dict[str, str]]) -> None:
    variants = []
    for name, rate in rates.items():
        v: dict = {"name": name, "options": extra_options.get(name, {} if name == "default" else {"sdpa": name})}
        if rate is None:
            v["error"] = "RuntimeError: No available kernel"
        else:
            v["passes"] = {"first": {"samples_per_s": rate / 2, "complete": True},
                           "warm": {"samples_per_s": rate, "complete": True}}
        variants.append(v)
    path.write_text(json.dumps({"bench": "gpu_shapes", "variants": variants}))


def _choose(tmp_path: Path, *extra: str) -> tuple[list[str], dict]:
    out = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_report.py"), "choose", "--cmd1-glob",
                          str(tmp_path / "work-cmd1_shapes-*"), "--json", str(tmp_path / "choices.json"), *extra],
                         capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.split(), json.loads((tmp_path / "choices.json").read_text())


def test_cmd2_takes_the_fastest_kernel_and_a_coarser_ladder_from_cmd1(tmp_path):
    """cmd2's options come from the newest cmd1 work folder: the sdpa kernel whose warm pass beat auto by
    more than the margin (not a failed kernel, not a mask variant graphs=1 cannot capture), and step 32
    when cmd1's Offline warm-up overran its budget. The run.json here is hand-written with only the
    fields a worker's record has for its warm-up."""
    old, new = tmp_path / "work-cmd1_shapes-20261201-000000", tmp_path / "work-cmd1_shapes-20261202-000000"
    for d in (old, new):
        (d / "offline-ladder-fp16").mkdir(parents=True)
    _bench(old / "shapes-ladder-fp16.bench.json", {"auto": 1000.0, "math": 5000.0}, {})
    _bench(new / "shapes-ladder-fp16.bench.json",
           {"auto": 4000.0, "cudnn": 4500.0, "flash": None, "old-mask": 9000.0},
           {"old-mask": {"attn_mask": "transformers"}})
    (new / "offline-ladder-fp16" / "run.json").write_text(json.dumps(
        {"config": {"loadgen": {"scenario": "Offline"}},
         "workers": [{"info": {"warmup": {"s": 95.0, "shapes": 208}}, "stats": {"cold_batches": 0}}]}))
    args, why = _choose(tmp_path)
    assert args == ["--option", "sdpa=cudnn", "--shape-ladder", "32"]
    assert why["cmd1_work"] == str(new) and why["shape_ladder"]["cmd1_warmup_s"] == 95.0

    args, _ = _choose(tmp_path, "--warmup-budget-s", "120", "--keep-sdpa")
    assert args == []
    _bench(new / "shapes-ladder-fp16.bench.json", {"auto": 4000.0, "cudnn": 4100.0}, {})   # within the margin
    args, why = _choose(tmp_path, "--keep-ladder")
    assert args == [] and why["sdpa"]["chosen"] is None
    # cmd1's Offline run cut at its step's limit (no run.json): the coarser ladder too
    (new / "offline-ladder-fp16" / "run.json").unlink()
    (new / "steps.jsonl").write_text(json.dumps({"step": "offline-ladder-fp16", "status": "timeout"}) + "\n")
    args, why = _choose(tmp_path)
    assert args == ["--shape-ladder", "32"] and why["shape_ladder"]["cmd1_run_timed_out"] is True
