"""``distbert run``: one code path for every launch mode.

* under a launcher (mpirun/mpiexec, srun, torchrun-style env) with N > 1 ranks: rank 0 coordinates,
  ranks >= 1 are workers; ZeroMQ rendezvous by MPI broadcast, or the pure MPI transport;
* no launcher: the single-node fallback; rank 0 spawns ``--workers K`` local worker processes.

The run directory is written under a temporary name and renamed into place only when the run
succeeded; a failed run is renamed to ``<output>.failed`` with ``error.txt`` inside, so a results
tree on disk is either complete or plainly marked.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import secrets
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from distbert import topology as topo_mod
from distbert.config import RunConfig
from distbert.errors import UserError
from distbert.util.sysinfo import host_facts
from distbert.topology import Topology

log = logging.getLogger(__name__)


# --- rendezvous ---------------------------------------------------------------------------------

def _bcast_json(comm: Any, payload: dict[str, Any] | None) -> dict[str, Any]:
    """Broadcast a small JSON object from rank 0 with buffer calls (nothing pickled)."""
    import numpy as np  # noqa: PLC0415

    data = json.dumps(payload).encode() if comm.Get_rank() == 0 else b""
    size = np.array([len(data)], dtype=np.int64)
    comm.Bcast(size, root=0)
    buf = bytearray(data) if comm.Get_rank() == 0 else bytearray(int(size[0]))
    comm.Bcast(buf, root=0)
    return json.loads(bytes(buf))


def _host_address(bind_host: str | None) -> str:
    if bind_host:
        return bind_host
    try:  # the address other hosts reach us at: the one the default route would use
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET address, no packet is sent for UDP connect
            return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


# --- entry --------------------------------------------------------------------------------------

def run(cfg: RunConfig, topology: Topology | None = None) -> int:
    topology = topology or topo_mod.detect()
    if topology.distributed:
        from mpi4py import MPI  # noqa: PLC0415 - only under a launcher

        comm = MPI.COMM_WORLD
        if comm.Get_size() != topology.world_size:
            raise UserError(f"launcher says {topology.world_size} ranks but MPI has {comm.Get_size()}: "
                            "run distbert with the mpiexec of the MPI that mpi4py uses")
        if topology.rank == 0:
            return coordinator_main(cfg, topology, comm)
        return launched_worker_main(cfg, topology, comm)
    return coordinator_main(cfg, topology, None)


def launched_worker_main(cfg: RunConfig, topology: Topology, comm: Any) -> int:
    from distbert.engine.worker import worker_run  # noqa: PLC0415

    hello = _bcast_json(comm, None)  # rank 0 says where to connect, or that it failed first
    if "error" in hello:
        return 2
    if cfg.transport == "mpi":
        from distbert.wire.mpi import MpiWorkerTransport  # noqa: PLC0415

        transport: Any = MpiWorkerTransport(comm, key=hello["key"])
    else:
        from distbert.wire.base import Endpoint  # noqa: PLC0415
        from distbert.wire.zmq import ZmqWorkerTransport  # noqa: PLC0415

        transport = ZmqWorkerTransport.connect(Endpoint(hello["address"], hello["key"]), topology.rank)
    # ranks on this node that are workers: local index among them picks GPU / cores
    local_count = topology.local_size
    local_index = topology.local_rank
    if hello.get("rank0_host") == socket.gethostname() and not cfg.coordinator_hosts_worker:
        # rank 0 shares this node but runs no model: give its share to the workers
        local_count = max(1, local_count - 1)
        local_index = max(0, local_index - 1)
    return worker_run(transport, topology.rank, local_index, local_count)


def _output_dir(cfg: RunConfig) -> Path:
    if cfg.output:
        out = Path(cfg.output)
        if out.exists() and any(out.iterdir()):
            raise UserError(f"--output {out} exists and is not empty: choose another directory or remove it")
        return out
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("results") / f"{stamp}-{cfg.loadgen.scenario}-{cfg.backend.name}"


def coordinator_main(cfg: RunConfig, topology: Topology, comm: Any) -> int:
    from distbert.engine.coordinator import Coordinator, RunFailed  # noqa: PLC0415

    from distbert import envs  # noqa: PLC0415

    key = envs.session_key() or secrets.token_hex(16)
    transport: Any = None
    local: Any = None
    final = _output_dir(cfg)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    expected: set[int] = set()
    coordinator: Any = None
    started = time.time()
    try:
        # 1. transport first, so launched workers can connect while we build features
        try:
            if comm is not None and cfg.transport == "mpi":
                from distbert.wire.mpi import MpiCoordinatorTransport  # noqa: PLC0415

                transport = MpiCoordinatorTransport(comm, key=key)
                _bcast_json(comm, {"key": key})
            else:
                from distbert.wire.zmq import ZmqCoordinatorTransport  # noqa: PLC0415

                if cfg.listen:
                    address = cfg.listen
                elif comm is None:
                    address = f"ipc://{tempfile.gettempdir()}/distbert-{os.getpid()}-{secrets.token_hex(4)}.sock"
                else:
                    address = f"tcp://{_host_address(cfg.bind_host)}:0"
                transport = ZmqCoordinatorTransport.bind(address, key)
                if comm is not None:
                    _bcast_json(comm, {"address": transport.endpoint.address, "key": key,
                                       "rank0_host": socket.gethostname()})
        except BaseException as exc:
            if comm is not None:  # never leave workers hanging in the broadcast
                _bcast_json(comm, {"error": str(exc)})
            raise
        if cfg.transport == "mpi" and comm is None:
            raise UserError("--transport mpi needs an MPI launcher (mpirun/mpiexec/srun) with 2 or more ranks")

        # 2. data: resolve the files and build (or map) the feature cache; workers get its path
        from distbert.data.artifacts import resolve_squad  # noqa: PLC0415
        from distbert.data.squad.features import load_features  # noqa: PLC0415

        dataset, vocab = resolve_squad(cfg.dataset, cfg.vocab, download_missing=True)
        store = load_features(Path(dataset), Path(vocab))
        cfg = cfg.replace(dataset=str(dataset), vocab=str(vocab), features_path=str(store.path),
                          backend=_resolve_model(cfg))
        lengths = store.lengths
        if cfg.max_examples:
            lengths = lengths[: cfg.max_examples]

        # 3. workers
        if comm is not None:
            expected = set(range(1, topology.world_size))
        is_alive = None
        if cfg.expect_workers:
            log.info("waiting for %d external workers at %s", cfg.expect_workers, transport.endpoint.address)
        if (comm is None and cfg.workers != 0) or cfg.coordinator_hosts_worker:
            from distbert.engine.local import LocalWorkers  # noqa: PLC0415

            count = cfg.workers or (1 if comm is not None else topo_mod.default_local_workers())
            if comm is not None and cfg.transport == "mpi":
                raise UserError("--coordinator-hosts-worker needs --transport zmq")
            first = topology.world_size if comm is not None else 1
            if comm is not None:  # rank 0's own worker takes rank 0's device slot on this node
                local = LocalWorkers(count, transport.endpoint.address, key, first_rank=first,
                                     first_local_index=topology.local_rank, local_count=topology.local_size)
            else:
                local = LocalWorkers(count, transport.endpoint.address, key, first_rank=first)
            expected |= local.ranks
            is_alive = local.is_alive
        coordinator = Coordinator(cfg, transport, lengths, expected, is_alive=is_alive,
                                  external_workers=cfg.expect_workers)
        t0 = time.monotonic()
        coordinator.start()
        log.info("all %d workers ready in %.1f s", len(expected), time.monotonic() - t0)

        # 4. the LoadGen tests
        results: dict[str, Any] = {}
        modes = {"both": ["performance", "accuracy"], "submission": ["performance", "accuracy", "TEST01"]
                 }.get(cfg.loadgen.mode, [cfg.loadgen.mode])
        settings: list[Any] = []           # one TestSettings for every test of this process
        for mode in modes:
            audit = None
            if mode == "TEST01":      # a performance run with the compliance audit.config
                from distbert.submission.compliance import write_audit_config  # noqa: PLC0415

                (work / mode).mkdir(parents=True, exist_ok=True)
                audit = write_audit_config(work / mode)
            results[mode] = _run_test(cfg, coordinator, store, len(lengths), mode, work / mode, audit, settings)
            if coordinator.failure:
                raise RunFailed(coordinator.failure)
        coordinator.stop()
        if local is not None:
            local.stop()

        # 5. accuracy, record, summary
        if "accuracy" in results:
            results["accuracy"].update(_score(cfg, store, work / "accuracy"))
        if "TEST01" in results:
            from distbert.submission.compliance import verify_test01  # noqa: PLC0415

            verdict = verify_test01(work, store, cfg.loadgen.benchmark)
            results["TEST01"].update({"accuracy_pass": verdict.accuracy_pass,
                                      "first_element_pass": verdict.first_element_pass,
                                      "performance_pass": verdict.performance_pass})
        record = _record(cfg, topology, coordinator, results, started)
        (work / "run.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        _plots(record, work)
        os.replace(work, final)
        _print_summary(record, final)
        return 0
    except BaseException as exc:
        if coordinator is not None:
            coordinator.stop(reason=f"rank 0 failed: {exc}", deadline_s=5.0)
        if local is not None:
            local.stop(grace_s=5.0)
        failed = final.with_name(final.name + ".failed")
        if failed.exists():
            shutil.rmtree(failed, ignore_errors=True)
        (work / "error.txt").write_text(f"{type(exc).__name__}: {exc}\n")
        os.replace(work, failed)
        if isinstance(exc, (UserError, KeyboardInterrupt)):
            raise
        if isinstance(exc, RunFailed):
            raise UserError(f"run failed: {exc} (partial logs in {failed})") from exc
        raise
    finally:
        if transport is not None:
            transport.close()
            address = transport.endpoint.address
            if address.startswith("ipc://"):  # our socket file: leave nothing in /tmp
                Path(address[len("ipc://"):]).unlink(missing_ok=True)


def _resolve_model(cfg: RunConfig) -> Any:
    """Fill in ``--model`` for real backends: the official file if cached, else a random-weight one."""
    spec = cfg.backend
    if spec.name in ("null", "oracle", "sim") or spec.model:
        return spec
    from distbert.data.artifacts import resolve_model  # noqa: PLC0415
    from distbert.backends.modelmaker import ensure_random_model  # noqa: PLC0415

    fmt = "pytorch" if spec.name == "torch" else ("onnx-int8" if spec.precision == "int8" else "onnx")
    path = resolve_model(fmt, None, download_missing=False)
    if path is None:
        shape = spec.option("random_shape", "large") or "large"
        maker_fmt = "torch" if spec.name == "torch" else fmt
        path = ensure_random_model(shape, maker_fmt, seed=0)
        log.warning("no official %s model in the cache: using a RANDOM-WEIGHT BERT-%s model (%s); "
                    "speed is representative, accuracy is meaningless", fmt, shape, path)
    return dataclasses.replace(spec, model=str(path))


def _run_test(cfg: RunConfig, coordinator: Any, store: Any, qsl_size: int, mode: str, logdir: Path,
              audit: Path | None = None, settings_box: list[Any] | None = None) -> dict[str, Any]:
    """One LoadGen test; ``mode`` "TEST01" is a performance test under ``audit`` (a compliance audit.config)."""
    import mlperf_loadgen as lg  # noqa: PLC0415

    from distbert.run.loadgen import headline, make_settings, read_detail, write_user_conf  # noqa: PLC0415

    logdir.mkdir(parents=True, exist_ok=True)
    user_conf = write_user_conf(cfg.loadgen, logdir / "user.conf")
    box = settings_box if settings_box is not None else []
    settings = make_settings(cfg.loadgen, "performance" if mode == "TEST01" else mode, user_conf, qsl_size,
                             base=box[0] if box else None)
    box[:] = [settings]
    log_settings = lg.LogSettings()
    log_settings.log_output.outdir = str(logdir)
    log_settings.log_output.copy_summary_to_stdout = False
    log_settings.enable_trace = False
    want_logits = mode == "accuracy" or bool(audit or cfg.loadgen.audit_conf)
    coordinator.begin_test(cfg.loadgen.scenario, want_logits)
    sut = lg.ConstructFastSUT(coordinator.issue, coordinator.flush)
    qsl = lg.ConstructQSL(qsl_size, min(qsl_size, 10833), lambda s: None, lambda s: None)
    audit_path = str(audit or cfg.loadgen.audit_conf or logdir / "audit.config")  # absent file = no audit
    log.info("LoadGen %s %s test starting (logs in %s)", cfg.loadgen.scenario, mode, logdir)
    t0 = time.monotonic()
    try:
        lg.StartTestWithLogSettings(sut, qsl, settings, log_settings, audit_path)
    finally:
        lg.DestroyQSL(qsl)
        lg.DestroyFastSUT(sut)
    wall = time.monotonic() - t0
    detail = read_detail(logdir / "mlperf_log_detail.txt")
    out = headline(detail, cfg.loadgen.scenario) | {"wall_s": round(wall, 3)}
    if coordinator.dispatcher is not None:
        out["dispatcher"] = coordinator.dispatcher.stats
        out["batch_policy"] = dataclasses.asdict(coordinator.dispatcher.policy)
    log.info("LoadGen %s %s test done in %.1f s: %s", cfg.loadgen.scenario, mode, wall,
             {k: v for k, v in out.items() if k not in ("dispatcher", "batch_policy")})
    return out


def _score(cfg: RunConfig, store: Any, logdir: Path) -> dict[str, Any]:
    from distbert.data.squad.accuracy import score_log, write_accuracy_txt  # noqa: PLC0415

    result = score_log(logdir / "mlperf_log_accuracy.json", store)
    write_accuracy_txt(result, logdir / "accuracy.txt")
    out: dict[str, Any] = {"exact_match": result.exact_match, "f1": result.f1,
                           "coverage": result.coverage_line(), "verdicts": result.verdicts()}
    if result.n_questions_scored < result.n_questions_total:
        out["f1_scored_questions_only"] = result.f1_scored
    out["accuracy_meaningful"] = _meaningful(cfg)
    return out


def _meaningful(cfg: RunConfig) -> bool:
    """False for harness backends and generated random-weight models (their accuracy means nothing)."""
    spec = cfg.backend
    if spec.name in ("null", "oracle", "sim") or not spec.model:
        return False
    from distbert.backends.modelmaker import is_random_model  # noqa: PLC0415

    return not is_random_model(spec.model)


def _versions() -> dict[str, str]:
    from importlib import metadata  # noqa: PLC0415

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("distbert", "mlcommons-loadgen", "numpy", "pyzmq", "mpi4py", "onnxruntime", "torch",
                "transformers", "openvino", "tokenizers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _record(cfg: RunConfig, topology: Topology, coordinator: Any, results: dict[str, Any],
            started: float) -> dict[str, Any]:
    workers = []
    for handle in sorted(coordinator.workers.values(), key=lambda h: h.worker):
        workers.append({"worker": handle.worker, "host": handle.host, "device": handle.device,
                        "backend": handle.backend, "lost": handle.lost, "info": handle.info,
                        "stats": handle.stats})
    return {
        "distbert_run": 1,
        "started": dt.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "finished": dt.datetime.now().isoformat(timespec="seconds"),
        "command": sys.argv,
        "config": json.loads(cfg.to_json()),
        "topology": dataclasses.asdict(topology),
        "workers": workers,
        "results": results,
        "accuracy_meaningful": _meaningful(cfg),
        "versions": _versions(),
        "system": host_facts(),
    }


def _plots(record: dict[str, Any], out: Path) -> None:
    try:
        from distbert.run.plots import plot_run  # noqa: PLC0415

        plot_run(record, out)
    except Exception as exc:  # a plot must never fail a run
        log.warning("could not draw plots: %s", exc)


def _print_summary(record: dict[str, Any], final: Path) -> None:
    cfg = record["config"]
    lg = cfg["loadgen"]
    n = len(record["workers"])
    print(f"distbert {lg['scenario']} {lg['mode']} run, backend {cfg['backend']['name']}, "
          f"{n} worker{'s' if n != 1 else ''} -> {final}")
    for mode, res in record["results"].items():
        parts = []
        for key, label in (("result_samples_per_second", "samples/s"),
                           ("result_completed_samples_per_sec", "completed samples/s"),
                           ("result_scheduled_samples_per_sec", "scheduled samples/s")):
            if res.get(key) is not None:
                parts.append(f"{float(res[key]):,.1f} {label}")
        for key, label in (("result_99.00_percentile_latency_ns", "p99"),
                           ("result_90.00_percentile_latency_ns", "p90"),
                           ("result_mean_latency_ns", "mean")):
            if res.get(key) is not None:
                parts.append(f"{label} {float(res[key]) / 1e6:,.1f} ms")
        if res.get("result_validity"):
            parts.append(f"LoadGen: {res['result_validity']}")
        if "f1" in res:
            parts.append(f"exact_match {res['exact_match']:.3f}, f1 {res['f1']:.3f} (official)")
        parts.append(f"{res.get('loadgen_errors', 0)} LoadGen errors, {res.get('wall_s', 0):.1f} s")
        print(f"  {mode}: " + "; ".join(parts))
        if "verdicts" in res:
            print(f"  accuracy: {res['coverage']}")
            print("  accuracy: " + "; ".join(res["verdicts"]))
        if "performance_pass" in res:
            how = "same first bytes" if res["first_element_pass"] else "first bytes differ, F1 within the tolerance"
            print(f"  TEST01: accuracy {'PASS (' + how + ')' if res['accuracy_pass'] else 'FAIL'}, "
                  f"performance {'PASS' if res['performance_pass'] else 'FAIL'} (see {final}/TEST01/verify_*.txt)")
            if not res["performance_pass"] and lg["execution_mode"] == "test":
                print("  TEST01: test-mode runs last seconds, so their scores rarely match within 10 %; "
                      "use --execution-mode valid for a submission")
    if "accuracy" in record["results"] and not record["accuracy_meaningful"]:
        print("  note: this accuracy comes from a harness backend or a RANDOM-WEIGHT model: it is meaningless")
    print(f"  details: {final / 'run.json'}, LoadGen logs in {final}/<mode>/")
