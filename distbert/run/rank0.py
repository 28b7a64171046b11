"""Rank 0's run, phase by phase: transport, data, workers, the LoadGen tests, the record.

Each phase is one method of :class:`Rank0Run`; :func:`coordinator_main` runs them in order and, on
any failure, stops the workers, marks the run directory failed and reports the first cause.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from distbert import envs
from distbert import topology as topo_mod
from distbert.backends import HARNESS
from distbert.backends.base import BackendSpec
from distbert.config import RunConfig
from distbert.data.squad.cache import FeatureStore
from distbert.engine.coordinator import Coordinator, RunFailed, max_result_bytes
from distbert.engine.local import LocalWorkers
from distbert.errors import UserError
from distbert.run import record as rec
from distbert.run.loadgen import TEST_SERVER_QPS, probe_server, run_test
from distbert.run.rendezvous import bcast_json
from distbert.run.rundir import RunDir, output_dir
from distbert.topology import Topology
from distbert.util.fs import atomic_write_text
from distbert.util.net import host_address
from distbert.wire.base import CoordinatorTransport
from distbert.wire.keys import check_session_key, new_session_key

log = logging.getLogger(__name__)

#: --find-peak: doubling/halving steps at most, and the bracket width (relative) where bisection stops
FIND_PEAK_STEPS = 8
FIND_PEAK_PRECISION = 0.03

#: the LoadGen tests each ``--mode`` runs, in order
MODE_TESTS = {"performance": ["performance"], "accuracy": ["accuracy"], "both": ["performance", "accuracy"],
              "submission": ["performance", "accuracy", "TEST01"]}


def tests_of(cfg: RunConfig) -> list[str]:
    """The LoadGen tests of this run: ``--mode``'s, and for a submission the round's compliance tests."""
    tests = list(MODE_TESTS[cfg.loadgen.mode])
    if cfg.loadgen.mode == "submission":
        from distbert.submission.rules import rules

        tests += [t for t in rules(cfg.loadgen.mlperf_version).compliance_tests if t not in tests]
    return tests


def coordinator_main(cfg: RunConfig, topology: Topology, comm: Any) -> int:
    """Rank 0 of any launch mode (``comm`` is MPI's world under a launcher, else None)."""
    try:
        rundir = RunDir(output_dir(cfg))
    except BaseException as exc:  # e.g. a non-empty --output: the launched ranks must hear of it
        tell_ranks_failed(comm, exc)
        raise
    run = Rank0Run(cfg, topology, comm, rundir)
    try:
        run.rendezvous()
        run.start_workers()
        results = run.run_tests()
        run.finish(results)
        return 0
    except BaseException as exc:
        failed = run.abort(exc)
        if isinstance(exc, RunFailed):
            raise UserError(f"run failed: {exc} (partial logs in {failed})") from exc
        raise
    finally:
        run.close()


def tell_ranks_failed(comm: Any, exc: BaseException) -> None:
    """Rank 0 failed before the rendezvous: the broadcast the launched ranks wait in says so (they
    exit 2 at once instead of waiting for an address that never comes)."""
    if comm is not None:
        bcast_json(comm, {"error": f"{type(exc).__name__}: {exc}"})


def with_in_process_default(cfg: RunConfig, launched: bool) -> RunConfig:
    """``--in-process-worker`` left unset: on for SingleStream on a GPU (``--device cuda``/``rocm``)
    when nothing asks for worker processes (no launcher, no --workers/--expect-workers/--listen/
    --transport mpi/--coordinator-hosts-worker, no DISTBERT_LOCAL_SLOT placing the worker: the
    in-process worker always takes slot 0). SingleStream keeps one query in flight, so one GPU serves
    it whatever the node has, and a worker process would only add two process crossings to every
    query (README: 658 -> 41 us p90 on the test VM). Off on CPUs: there the worker process computes a
    one-sample query on its main thread, and PyTorch's OpenMP pool is slower from any other thread
    (tiny model, batch 1: 2.2 -> 4.4 ms; bench notes in notes/latency.md), which is where rank 0
    would run it. Else off."""
    if cfg.in_process_worker is not None:
        return cfg
    on = (not launched and cfg.loadgen.scenario == "SingleStream" and cfg.workers is None
          and not cfg.expect_workers and not cfg.listen and cfg.transport == "zmq"
          and not cfg.coordinator_hosts_worker and not envs.local_slot_given()
          and cfg.backend.device.startswith(("cuda", "rocm")))
    if on:
        log.info("SingleStream on a GPU: rank 0 runs the worker itself, on %s (--no-in-process-worker: a worker "
                 "process instead)", cfg.backend.device)
    return cfg.replace(in_process_worker=on)


class Rank0Run:
    def __init__(self, cfg: RunConfig, topology: Topology, comm: Any, rundir: RunDir) -> None:
        self.cfg = with_in_process_default(cfg, launched=comm is not None)
        self.topology = topology
        self.comm = comm
        self.rundir = rundir
        self.key = ""  # set by rendezvous(): a bad DISTBERT_SESSION_KEY is a user error every rank hears of
        self.transport: CoordinatorTransport | None = None
        self.local: LocalWorkers | None = None
        self.coordinator: Coordinator | None = None
        self.store: FeatureStore | None = None
        self.qsl_size = 0
        self.started = time.time()

    # --- 1. checks and data, then the transport; launched ranks learn where to connect ----------

    def rendezvous(self) -> None:
        """Everything that can fail for a user's reason happens before the broadcast, so launched
        workers hear of it at once (and exit 2) instead of waiting for a Setup that never comes."""
        comm = self.comm
        try:
            given = envs.session_key()
            self.key = check_session_key(given, "DISTBERT_SESSION_KEY") if given else new_session_key()
            self._check_launch()
            self.prepare_data()
            self.transport = self._open_transport()
        except BaseException as exc:
            tell_ranks_failed(comm, exc)
            raise
        announce = envs.announce_file()
        if announce is not None and comm is None:
            atomic_write_text(announce, json.dumps({"address": self.transport.endpoint.address,
                                                    "rank0_host": socket.gethostname()}))
        if comm is not None:
            hello: dict[str, Any] = {"key": self.key}
            if self.cfg.transport == "zmq":
                hello |= {"address": self.transport.endpoint.address, "rank0_host": socket.gethostname()}
            bcast_json(comm, hello)

    def _check_launch(self) -> None:
        if self.cfg.in_process_worker and self.comm is not None:
            raise UserError("--in-process-worker is for a run without a launcher (rank 0 computing alone); "
                            "under mpirun/srun use --coordinator-hosts-worker")
        if self.cfg.transport == "mpi" and self.comm is None:
            raise UserError("--transport mpi needs an MPI launcher (mpirun/mpiexec/srun) with 2 or more ranks")
        if self.cfg.transport == "mpi" and self.cfg.coordinator_hosts_worker:
            raise UserError("--coordinator-hosts-worker needs --transport zmq (rank 0's own worker is a "
                            "local process that connects over ZeroMQ)")

    def _open_transport(self) -> CoordinatorTransport:
        if self.cfg.in_process_worker:
            from distbert.engine.inline import InlineWorker

            return InlineWorker(rank=1)
        if self.comm is not None and self.cfg.transport == "mpi":
            from distbert.wire.mpi import MpiCoordinatorTransport

            return MpiCoordinatorTransport(self.comm, key=self.key)
        from distbert.wire.zmq import ZmqCoordinatorTransport

        transport = ZmqCoordinatorTransport.bind(self._zmq_address(), self.key,
                                                 max_message_bytes=max_result_bytes(self.cfg.batch.max_batch))
        transport.spin_s = self.cfg.spin_s()
        return transport

    def _zmq_address(self) -> str:
        if self.cfg.listen:
            return self.cfg.listen
        if self.comm is None:
            return f"ipc://{tempfile.gettempdir()}/distbert-{os.getpid()}-{secrets.token_hex(4)}.sock"
        return f"tcp://{self.cfg.bind_host or host_address()}:0"

    # --- 2. data: resolve the files, build (or map) the feature cache; workers get its path -----

    def prepare_data(self) -> None:
        from distbert.data.artifacts import resolve_squad
        from distbert.data.squad.features import load_features

        dataset, vocab = resolve_squad(self.cfg.dataset, self.cfg.vocab, download_missing=True)
        self.store = load_features(Path(dataset), Path(vocab))
        self.cfg = self.cfg.replace(dataset=str(dataset), vocab=str(vocab), features_path=str(self.store.path),
                                    backend=resolve_model(self.cfg.backend))
        self.qsl_size = min(len(self.store), self.cfg.max_examples or len(self.store))

    # --- 3. workers: launched ranks, local processes, external joiners; wait for every Ready ----

    def start_workers(self) -> None:
        cfg, comm, topology = self.cfg, self.comm, self.topology
        assert self.transport is not None and self.store is not None
        expected = set(range(1, topology.world_size)) if comm is not None else set()
        if cfg.expect_workers:
            log.info("waiting for %d external workers at %s", cfg.expect_workers, self.transport.endpoint.address)
        if cfg.in_process_worker:
            expected = {1}
        elif (comm is None and cfg.workers != 0) or cfg.coordinator_hosts_worker:
            count = cfg.workers or (1 if comm is not None else topo_mod.default_local_workers())
            address = self.transport.endpoint.address
            if comm is not None:  # rank 0's own worker takes rank 0's device slot on this node
                self.local = LocalWorkers(count, address, self.key, first_rank=topology.world_size,
                                          first_local_index=topology.local_rank, local_count=topology.local_size)
            else:
                first_rank, first_index, local_count = envs.local_slot()
                self.local = LocalWorkers(count, address, self.key, first_rank=first_rank,
                                          first_local_index=first_index, local_count=local_count)
            expected |= self.local.ranks
        self.coordinator = Coordinator(cfg, self.transport, self.store.lengths[: self.qsl_size], expected,
                                       is_alive=self.local.is_alive if self.local else None,
                                       external_workers=cfg.expect_workers, parent_pid=envs.parent_pid(),
                                       joinable=comm is not None or bool(cfg.expect_workers or cfg.listen))
        t0 = time.monotonic()
        self.coordinator.start()
        ready = sum(1 for h in self.coordinator.workers.values() if h.ready)
        log.info("all %d workers ready in %.1f s", ready, time.monotonic() - t0)

    # --- 4. the LoadGen tests, one TestSettings for all of them ---------------------------------

    def run_tests(self) -> dict[str, Any]:
        assert self.coordinator is not None
        results: dict[str, Any] = {}
        settings: list[Any] = []
        work = self.rundir.work
        if self.cfg.find_peak:
            results["find_peak"] = self._find_peak(work / "find-peak")
            best = results["find_peak"]["best_valid_qps"]
            self.cfg = self.cfg.replace(loadgen=dataclasses.replace(self.cfg.loadgen, target_qps=best))
        for mode in tests_of(self.cfg):
            audit = None
            if mode == "TEST01":  # a performance run with the compliance audit.config
                from distbert.submission.compliance import write_audit_config

                (work / mode).mkdir(parents=True, exist_ok=True)
                audit = write_audit_config(work / mode)
            results[mode] = run_test(self.cfg, self.coordinator, self.qsl_size, mode, work / mode, audit, settings)
            if self.coordinator.failure:
                raise RunFailed(self.coordinator.failure)
            lg = self.cfg.loadgen
            if (mode == "performance" and lg.mode == "submission" and lg.execution_mode == "valid"
                    and results[mode].get("result_validity") != "VALID"):
                # it cannot be part of a submission: do not spend another 600 s + the accuracy run on it
                log.warning("the performance run is %s: accuracy and compliance runs skipped (see its "
                            "mlperf_log_summary.txt; `distbert submission run` picks a new target)",
                            results[mode].get("result_validity"))
                results["skipped"] = {"tests": [t for t in tests_of(self.cfg) if t != "performance"],
                                      "why": "performance run not VALID"}
                break
        self.coordinator.stop()
        if self.local is not None:
            self.local.stop()
        return results

    def _find_peak(self, folder: Path) -> dict[str, Any]:
        """``--find-peak``: the highest Server QPS that LoadGen calls VALID, by short probes (doubling
        or halving from --target-qps to a bracket, then bisection to FIND_PEAK_PRECISION)."""
        assert self.coordinator is not None
        cfg = self.cfg
        probes: list[dict[str, Any]] = []

        def valid(qps: float) -> bool:
            res = probe_server(cfg, self.coordinator, self.qsl_size, qps, cfg.find_peak_probe_s,  # type: ignore[arg-type]
                               folder / f"probe-{len(probes) + 1:02d}")
            if self.coordinator.failure:  # type: ignore[union-attr]
                raise RunFailed(self.coordinator.failure)  # type: ignore[union-attr]
            ok = res.get("result_validity") == "VALID"
            p99 = res.get("result_99.00_percentile_latency_ns")
            probes.append({"target_qps": round(qps, 1), "validity": res.get("result_validity"),
                           "p99_ms": round(p99 / 1e6, 2) if p99 else None})
            log.info("find-peak probe %d: %.1f QPS -> %s", len(probes), qps, res.get("result_validity"))
            return ok

        q = cfg.loadgen.target_qps or TEST_SERVER_QPS
        lo = hi = None
        if valid(q):
            lo = q
            for _ in range(FIND_PEAK_STEPS):
                if not valid(lo * 2):
                    hi = lo * 2
                    break
                lo *= 2
        else:
            hi = q
            for _ in range(FIND_PEAK_STEPS):
                if valid(hi / 2):
                    lo = hi / 2
                    break
                hi /= 2
        if lo is None:
            raise RunFailed(f"--find-peak: no VALID Server run from {q:g} QPS down to {hi:g} QPS "
                            f"(see {folder}): check the latency bound and the workers")
        while hi is not None and (hi - lo) / hi > FIND_PEAK_PRECISION:
            mid = (lo + hi) / 2
            if valid(mid):
                lo = mid
            else:
                hi = mid
        if hi is None:
            log.warning("find-peak: still VALID at %.1f QPS after %d doublings: the peak may be higher; "
                        "start higher with --target-qps", lo, FIND_PEAK_STEPS)
        log.info("find-peak: highest VALID Server QPS %.1f (%d probes of %g s)", lo, len(probes),
                 cfg.find_peak_probe_s)
        return {"best_valid_qps": round(lo, 1), "lowest_invalid_qps": None if hi is None else round(hi, 1),
                "probe_s": cfg.find_peak_probe_s, "probes": probes}

    # --- 5. accuracy, TEST01 verdict, run.json, plots, summary; then the directory goes live ----

    def finish(self, results: dict[str, Any]) -> Path:
        assert self.coordinator is not None and self.store is not None
        work = self.rundir.work
        if "accuracy" in results:
            results["accuracy"].update(rec.score(self.cfg, self.store, work / "accuracy"))
        if "TEST01" in results:
            from distbert.submission.compliance import verify_test01

            verdict = verify_test01(work, self.store, self.cfg.loadgen.benchmark)
            results["TEST01"].update({"accuracy_pass": verdict.accuracy_pass,
                                      "first_element_pass": verdict.first_element_pass,
                                      "performance_pass": verdict.performance_pass})
        if "TEST05" in results:
            from distbert.submission.compliance import verify_test05

            results["TEST05"]["performance_pass"] = verify_test05(work)
        record = rec.build_record(self.cfg, self.topology, self.coordinator, results, self.started)
        rec.write_json(work / "run.json", record)
        rec.write_plots(record, work)
        final = self.rundir.commit()
        rec.print_summary(record, final)
        return final

    # --- failure and clean-up ---------------------------------------------------------------------

    def abort(self, exc: BaseException) -> Path:
        """Stop workers (bounded), mark the run directory failed with the cause; returns its path."""
        if self.coordinator is not None:
            self.coordinator.stop(reason=f"rank 0 failed: {exc}", deadline_s=5.0)
        if self.local is not None:
            self.local.stop(grace_s=5.0)
        return self.rundir.fail(exc)

    def close(self) -> None:
        if self.transport is None:
            return
        self.transport.close()
        address = self.transport.endpoint.address
        if address.startswith("ipc://"):  # our socket file: leave nothing in /tmp
            Path(address[len("ipc://"):]).unlink(missing_ok=True)


def resolve_model(spec: BackendSpec, generate: bool = True) -> BackendSpec:
    """Fill in ``--model`` for real backends: the official file if cached, else a random-weight one
    (generated now unless ``generate`` is False: then only its path, e.g. to compare with old runs)."""
    if spec.name in HARNESS or spec.model:
        return spec
    from distbert.backends.modelmaker import ensure_random_model, random_model_path
    from distbert.data.artifacts import resolve_model as resolve_official

    fmt = "pytorch" if spec.name == "torch" else ("onnx-int8" if spec.precision == "int8" else "onnx")
    path = resolve_official(fmt, None, download_missing=False)
    if path is None:
        shape = spec.option("random_shape", "large") or "large"
        if not generate:
            return dataclasses.replace(spec, model=str(random_model_path(shape, "torch" if spec.name == "torch"
                                                                         else fmt, seed=0)))
        path = ensure_random_model(shape, "torch" if spec.name == "torch" else fmt, seed=0)
        log.warning("no official %s model in the cache: using a RANDOM-WEIGHT BERT-%s model (%s); "
                    "speed is representative, accuracy is meaningless", fmt, shape, path)
    return dataclasses.replace(spec, model=str(path))
