"""Fail fast under a launcher: a user error on rank 0 before the run ends every rank at once.

Real ``mpiexec`` (the mpich wheel's hydra) with three ranks; no data is needed, since the error is
that the data set does not exist.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

PY = sys.executable
MPIEXEC = shutil.which("mpiexec", path=str(Path(PY).parent))

pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found next to the Python interpreter "
                                                        "(install the 'mpich' wheel)")


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), DISTBERT_CACHE=str(tmp_path / "cache"), DISTBERT_NO_PROGRESS="1")
    env.pop("DISTBERT_DATA_DIR", None)
    return env


@pytest.mark.parametrize("extra, needle", [
    (["--dataset", "/nonexistent/dev-v1.1.json"], "/nonexistent/dev-v1.1.json"),
    (["--transport", "mpi", "--coordinator-hosts-worker"], "--coordinator-hosts-worker needs --transport zmq"),
])
def test_user_error_on_rank0_ends_every_rank_at_once(tmp_path, extra, needle):
    proc, took = _mpirun(tmp_path, extra)
    failed = tmp_path / "run.failed"
    assert needle in (failed / "error.txt").read_text()
    assert not (tmp_path / "run").exists()
    _assert_failed_fast(proc, took, needle)


def test_a_non_empty_output_dir_ends_every_rank_at_once(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("earlier results\n")
    proc, took = _mpirun(tmp_path, [])
    _assert_failed_fast(proc, took, "exists and is not empty")
    assert (tmp_path / "run" / "keep.txt").read_text() == "earlier results\n"


def _mpirun(tmp_path, extra):
    cmd = [MPIEXEC, "-n", "3", PY, "-m", "distbert", "run", "--backend", "null",
           "--output", str(tmp_path / "run"), *extra]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - t0


def _assert_failed_fast(proc, took, needle):
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("distbert: error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-3000:]
    # both workers heard of it from the broadcast, not from a timeout
    assert proc.stderr.count("rank 0 failed before the run started") == 2, proc.stderr[-3000:]
    assert took < 60, f"ranks took {took:.0f} s to exit"


def test_a_flag_with_no_subcommand_starts_a_run(tmp_path):
    """``distbert --scenario Offline ...`` is ``distbert run --scenario Offline ...``."""
    proc = subprocess.run([PY, "-m", "distbert", "--scenario", "MultiStream", "--backend", "null",
                           "--output", str(tmp_path / "run")], env=_env(tmp_path), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "MultiStream" in proc.stderr and "invalid choice" not in proc.stderr


def test_a_launcher_mpi_mismatch_names_the_fix():
    """Each rank of a mismatched launch prints this line and exits 2 (srun without PMI is run for real
    in tests/test_slurm.py; an Open MPI mpirun cannot be installed beside MPICH here)."""
    from distbert.run.launch import launch_mismatch
    from distbert.topology import Topology

    slurm = launch_mismatch(Topology("slurm", 0, 3, 0, 3, "h"), 1, "MPICH Version: 4.3.0")
    assert "srun --mpi=pmi2" in slurm and "MPICH" in slurm and "\n" not in slurm
    ompi = launch_mismatch(Topology("mpi", 0, 4, 0, 4, "h"), 1, "MPICH Version: 4.3.0")
    assert ".venv/bin/mpiexec" in ompi and "(MPICH)" in ompi
