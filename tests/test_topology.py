"""Which rank am I: the launcher variables each launcher really sets."""

from __future__ import annotations

import os

import pytest

from distbert.topology import Topology, bind_worker, detect, visible_gpus

CASES = {
    "none": ({}, ("none", 0, 1, 0, 1)),
    "hydra": ({"PMI_RANK": "3", "PMI_SIZE": "9", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "5"},
              ("mpi", 3, 9, 1, 5)),
    "open-mpi": ({"OMPI_COMM_WORLD_RANK": "4", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
                  "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, ("mpi", 4, 8, 0, 4)),
    # srun --mpi=pmi2 on 2 nodes x 8 tasks: PMI_RANK/PMI_SIZE, but the local rank only from Slurm
    "srun-pmi2": ({"PMI_RANK": "11", "PMI_SIZE": "16", "SLURM_PROCID": "11", "SLURM_STEP_NUM_TASKS": "16",
                   "SLURM_LOCALID": "3", "SLURM_STEP_TASKS_PER_NODE": "8(x2)"}, ("mpi", 11, 16, 3, 8)),
    "srun": ({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "6", "SLURM_LOCALID": "2",
              "SLURM_STEP_TASKS_PER_NODE": "3(x2)"}, ("slurm", 5, 6, 2, 3)),
    "sbatch-script": ({"SLURM_PROCID": "0", "SLURM_JOB_ID": "7"}, ("none", 0, 1, 0, 1)),
    "torchrun": ({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}, ("env", 2, 4, 0, 2)),
    "one-rank-launcher": ({"PMI_RANK": "0", "PMI_SIZE": "1"}, ("none", 0, 1, 0, 1)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_detect(name):
    env, (launcher, rank, size, local_rank, local_size) = CASES[name]
    t = detect(env)
    assert (t.launcher, t.rank, t.world_size, t.local_rank, t.local_size) == (launcher, rank, size, local_rank,
                                                                              local_size)
    assert isinstance(t, Topology) and t.distributed == (launcher != "none")


# --- GPU binding: the visible GPU count comes from CUDA_VISIBLE_DEVICES, as visible_gpus() reads it first

@pytest.mark.parametrize("cvd,count", [("0,1,2,3", 4), ("3", 1), (" 2, 5 ,", 2), ("", 0), ("-1", 0)])
def test_visible_gpus_counts_cuda_visible_devices(monkeypatch, cvd, count):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", cvd)
    assert visible_gpus() == count


def _bind_all(monkeypatch, cvd: str, requested: str, workers: int) -> list[str]:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", cvd)
    allowed = tuple(sorted(os.sched_getaffinity(0)))
    bindings = [bind_worker(requested, i, workers) for i in range(workers)]
    assert all(b.cores == allowed for b in bindings)      # GPU workers are not pinned to a core subset
    assert tuple(sorted(os.sched_getaffinity(0))) == allowed
    return [b.device for b in bindings]


def test_k_workers_on_k_gpus_get_one_gpu_each(monkeypatch):
    assert _bind_all(monkeypatch, "0,1,2,3", "cuda", 4) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]


def test_two_workers_sharing_one_gpu_both_get_cuda_0(monkeypatch):
    assert _bind_all(monkeypatch, "0", "cuda", 2) == ["cuda:0", "cuda:0"]


def test_more_workers_than_gpus_wrap_round(monkeypatch):
    assert _bind_all(monkeypatch, "4,5", "cuda", 5) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]


def test_explicit_gpu_index_is_respected_for_every_worker(monkeypatch):
    assert _bind_all(monkeypatch, "0,1,2,3", "cuda:2", 3) == ["cuda:2"] * 3
    assert _bind_all(monkeypatch, "0,1", "rocm:1", 2) == ["rocm:1"] * 2


def test_rocm_keeps_its_kind(monkeypatch):
    assert _bind_all(monkeypatch, "0,1", "rocm", 2) == ["rocm:0", "rocm:1"]
