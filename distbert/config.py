"""The run configuration: one frozen tree, built once from the command line.

Every process parses the same command line (under ``mpirun``) or receives this tree as JSON in the
``Setup`` message (single-node workers, ``distbert worker --connect``), so all ranks agree on it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from distbert.backends.base import BackendSpec
from distbert.errors import UserError

SCENARIOS = ("Offline", "Server", "SingleStream")
MODES = ("performance", "accuracy", "both", "submission")
TRANSPORTS = ("zmq", "mpi")


@dataclasses.dataclass(frozen=True)
class LoadGenConfig:
    """What goes into LoadGen's ``TestSettings``, on top of the embedded mlperf.conf."""

    scenario: str = "Offline"
    mode: str = "performance"             # performance | accuracy | both | submission (both + TEST01)
    execution_mode: str = "test"          # test: short run (min duration lowered); valid: mlperf.conf rules
    user_conf: str | None = None
    target_qps: float | None = None       # Offline expected qps / Server target qps
    target_latency_ms: float | None = None  # SingleStream expected latency / Server latency bound
    test_query_count: int | None = None   # test mode: number of queries (Server/SingleStream) or samples (Offline)
    min_duration_ms: int | None = None    # override (test mode default 0)
    max_duration_ms: int | None = None
    audit_conf: str | None = None         # compliance (TEST01) audit.config
    benchmark: str = "bert-99"            # bert-99 | bert-99.9: the accuracy target TEST01 and submissions use
    mlperf_version: str = "v6.1"          # the submission round whose seeds (and compliance tests) the run uses


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    """Batching overrides; ``None`` means the backend's own hint (see ``Backend.batch_hint``)."""

    max_batch: int | None = None
    token_budget: int | None = None
    max_wait_ms: float = 2.0
    credits: int = 2
    calibrate: bool = False          # each worker measures its backend at start-up (batching.calibrate)
    batch_timeout_s: float = 60.0    # a batch without a result after max(this, 10 x slowest batch) is requeued; 0 = off
    shape_ladder: int | None = None  # batch shapes: length step (backends/shapes); 0 = exact; None = the backend's
    hedge: str = "auto"              # re-send overdue batches to another worker: auto (per scenario) | on | off
    hedge_factor: float = 2.0        # overdue after factor x p90 of the worker's recent batch times ...
    hedge_floor_ms: float = 50.0     # ... plus this
    hedge_budget_pct: float = 5.0    # hedged samples at most this % of the samples issued so far


@dataclasses.dataclass(frozen=True)
class RunConfig:
    loadgen: LoadGenConfig
    backend: BackendSpec
    batch: BatchConfig
    dataset: str | None = None       # resolved by rank 0 before workers see the config
    vocab: str | None = None
    features_path: str | None = None  # feature cache dir, set by rank 0
    workers: int | None = None       # single-node fallback: local worker processes
    listen: str | None = None        # zmq bind address for the coordinator (default: ipc locally, tcp under MPI)
    expect_workers: int = 0          # external workers (`distbert worker --connect`) to wait for
    max_examples: int | None = None  # QSL = the first N features only (quick runs)
    transport: str = "zmq"
    coordinator_hosts_worker: bool = False   # under a launcher, rank 0 also runs a worker
    # no launcher: the one worker runs on rank 0's driver thread; None = auto (run/rank0.with_in_process_default)
    in_process_worker: bool | None = None
    spin_us: float = 0.0             # ZeroMQ receive spin before sleeping, µs (0: off)
    find_peak: bool = False          # Server: search the highest VALID QPS first, run the tests at it
    find_peak_probe_s: float = 5.0   # seconds of traffic per --find-peak probe
    output: str | None = None
    bind_host: str | None = None     # zmq: address workers reach rank 0 at (default: this host's IP)
    heartbeat_s: float = 1.0
    heartbeat_timeout_s: float = 10.0
    # how long a lost party may take to come back: rank 0 with no worker left waits this long for one
    # (0: fails at once), a worker that cannot reach rank 0 keeps trying this long (at least the heartbeat timeout)
    rejoin_timeout_s: float = 60.0
    ready_timeout_s: float = 600.0

    def spin_s(self) -> float:
        """Seconds a ZeroMQ receive spins before it sleeps (both sides of the wire)."""
        return self.spin_us / 1e6

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        raw: dict[str, Any] = json.loads(text)
        spec = raw.pop("backend")
        spec["options"] = tuple(tuple(kv) for kv in spec.get("options", ()))
        return cls(loadgen=LoadGenConfig(**raw.pop("loadgen")), backend=BackendSpec(**spec),
                   batch=BatchConfig(**raw.pop("batch")), **raw)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


#: the largest batch a worker may announce or a run may ask for (rank 0 sizes its message limit on it)
MAX_BATCH = 4096


#: every precision some backend runs (each backend refuses the ones it does not, at load)
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


def validate(cfg: RunConfig) -> RunConfig:
    lg = cfg.loadgen
    if lg.scenario == "MultiStream":
        raise UserError("--scenario MultiStream is not defined for BERT in MLPerf Inference: "
                        "use Offline, Server or SingleStream")
    if lg.scenario not in SCENARIOS:
        raise UserError(f"unknown --scenario {lg.scenario!r}: choose one of {', '.join(SCENARIOS)}")
    if lg.mode not in MODES:
        raise UserError(f"unknown --mode {lg.mode!r}: choose one of {', '.join(MODES)}")
    if cfg.backend.precision not in PRECISIONS:
        raise UserError(f"unknown --precision {cfg.backend.precision!r}: choose one of {', '.join(PRECISIONS)} "
                        "(which ones a backend runs, it says at start-up)")
    from distbert.submission.rules import rules

    rules(lg.mlperf_version)  # an unknown round is a user error
    if lg.benchmark not in ("bert-99", "bert-99.9"):
        raise UserError(f"unknown --benchmark {lg.benchmark!r}: choose bert-99 or bert-99.9")
    if lg.mode == "submission" and lg.audit_conf:
        raise UserError("--mode submission runs TEST01 with its own audit.config: drop --audit-conf")
    if lg.execution_mode not in ("test", "valid"):
        raise UserError(f"unknown --execution-mode {lg.execution_mode!r}: choose test or valid")
    if cfg.transport not in TRANSPORTS:
        raise UserError(f"unknown --transport {cfg.transport!r}: choose zmq or mpi")
    if cfg.workers is not None and cfg.workers < 0:
        raise UserError("--workers must be 0 or more")
    if cfg.in_process_worker and (cfg.workers not in (None, 1) or cfg.expect_workers or cfg.transport != "zmq"
                                  or cfg.coordinator_hosts_worker):
        raise UserError("--in-process-worker is rank 0 computing alone: drop --workers/--expect-workers/"
                        "--transport/--coordinator-hosts-worker (or drop --in-process-worker)")
    if cfg.workers == 0 and cfg.expect_workers < 1:
        raise UserError("--workers 0 needs --expect-workers N (workers that join with `distbert worker --connect`)")
    if lg.target_qps is not None and lg.target_qps <= 0:
        raise UserError("--target-qps must be positive")
    b = cfg.batch
    if b.max_batch is not None and b.max_batch < 1:
        raise UserError("--max-batch must be at least 1")
    if b.credits < 1:
        raise UserError("--credits must be at least 1")
    if b.batch_timeout_s < 0:
        raise UserError("--batch-timeout must be 0 (off) or a number of seconds")
    if b.hedge not in ("auto", "on", "off"):
        raise UserError(f"unknown --hedge {b.hedge!r}: choose auto, on or off")
    if not b.hedge_factor >= 1:
        raise UserError("--hedge-factor must be at least 1")
    if not b.hedge_floor_ms >= 0:
        raise UserError("--hedge-floor-ms must be 0 or more")
    if not 0 <= b.hedge_budget_pct <= 100:
        raise UserError("--hedge-budget must be a percentage between 0 and 100")
    if b.shape_ladder is not None and not 0 <= b.shape_ladder <= 384:
        raise UserError("--shape-ladder must be 0 (exact trimming) or a length step between 1 and 384")
    if b.token_budget is not None and b.token_budget < 384:
        raise UserError("--token-budget must be at least 384 (one full-length sample)")
    if b.max_batch is not None and b.max_batch > MAX_BATCH:
        raise UserError(f"--max-batch must be at most {MAX_BATCH} (the largest batch a worker may announce)")
    if cfg.find_peak and lg.scenario != "Server":
        raise UserError("--find-peak searches a Server QPS: use it with --scenario Server")
    if cfg.find_peak_probe_s <= 0:
        raise UserError("--find-peak-probe-s must be positive")
    if not 0 <= cfg.spin_us <= 100_000:
        raise UserError("--spin-us must be between 0 (off) and 100000")
    if not cfg.heartbeat_timeout_s > 0:
        raise UserError("--heartbeat-timeout must be positive")
    if cfg.rejoin_timeout_s != 0 and not cfg.heartbeat_timeout_s <= cfg.rejoin_timeout_s:
        raise UserError("--rejoin-timeout must be 0 (no wait for a lost worker) or at least --heartbeat-timeout")
    return cfg
