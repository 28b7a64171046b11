"""``distbert run``: the benchmark in any launch mode (flags -> one frozen ``RunConfig``)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Any

from distbert.backends import NAMES, backend_class
from distbert.backends.base import BackendSpec
from distbert.cli.logs import setup_logging
from distbert.config import BatchConfig, LoadGenConfig, RunConfig, validate
from distbert.errors import UserError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the benchmark (mpirun/srun: rank 0 coordinates; no launcher: local workers)",
                       description="Run MLPerf BERT through LoadGen on rank 0 and workers on every other rank.")
    add_run_arguments(p)
    p.set_defaults(handler=cmd_run)


#: what ``distbert submission run`` decides per step itself (see distbert/submission/campaign.py)
CAMPAIGN_OWNED = frozenset({"--scenario", "--mode", "--output", "--target-latency-ms", "--find-peak"})


def add_run_arguments(p: argparse.ArgumentParser, skip: frozenset[str] = frozenset()) -> list[argparse.Action]:
    """Every ``distbert run`` flag (except those in ``skip``); returns their actions, so that
    ``distbert submission run`` can pass the flags a user gave on to each run it starts."""
    actions: list[argparse.Action] = []

    class _Group:
        def __init__(self, title: str) -> None:
            self.group = p.add_argument_group(title)

        def add_argument(self, *flags: str, **kw: Any) -> None:
            if flags[0] not in skip:
                actions.append(self.group.add_argument(*flags, **kw))

    g = _Group("LoadGen")
    g.add_argument("--scenario", default="Offline",
                   help="Offline | Server | SingleStream (default Offline); MultiStream is refused: it is not "
                        "defined for BERT")
    g.add_argument("--mode", default="performance",
                   help="performance | accuracy | both (two LoadGen runs, separate log directories) | submission "
                        "(both, then compliance TEST01 and its verification; docs/submission.md); "
                        "default performance")
    g.add_argument("--execution-mode", default="test",
                   help="test: short run, min duration 0, --test-query-count samples or queries (default); valid: "
                        "the full MLPerf rules from LoadGen's embedded mlperf.conf (600 s, seeds, 10833 samples)")
    g.add_argument("--test-query-count", type=int,
                   help="test mode: samples (Offline) or queries to issue (default: Offline 10833, Server 2000, "
                        "SingleStream 100)")
    g.add_argument("--target-qps", type=_number_or_auto,
                   help="Offline expected QPS (make a valid run last 600 s) / Server target QPS (test mode default "
                        "1000). auto: from the newest comparable run (same backend, model, device, precision, "
                        "workers) in the results directory (the folder holding --output, else results/): Offline "
                        "its samples/s; Server its last VALID target, 0.9 x an INVALID one, or 0.8 x the Offline "
                        "samples/s; the run logs where the number came from")
    g.add_argument("--find-peak", action="store_true",
                   help="Server: first find the highest QPS LoadGen calls VALID (short probes from --target-qps, "
                        "doubling or halving to a bracket, then bisection to 3 %%), then run the tests at it. The "
                        "probes' logs go to DIR/find-peak/, the search to run.json (results.find_peak) and the "
                        "summary")
    g.add_argument("--find-peak-probe-s", type=float, default=5.0,
                   help="seconds of traffic per --find-peak probe (at least 1000 queries: fewer cannot meet "
                        "LoadGen's early stopping, so a slow probe lasts 1000/QPS seconds)")
    g.add_argument("--target-latency-ms", type=_number_or_auto,
                   help="SingleStream expected latency / Server latency bound; auto (SingleStream): the p90 latency "
                        "of the newest comparable SingleStream run")
    g.add_argument("--min-duration-ms", type=int, help="LoadGen override: min duration")
    g.add_argument("--max-duration-ms", type=int, help="LoadGen override: max duration")
    g.add_argument("--user-conf", help="a LoadGen user.conf (model key 'bert')")
    g.add_argument("--audit-conf", help="a compliance audit.config; logits then travel in performance mode too (--mode "
                        "submission writes TEST01's own)")
    g.add_argument("--benchmark", default="bert-99",
                   help="bert-99 | bert-99.9: the accuracy target for verdicts and TEST01's fallback (default "
                        "bert-99)")
    g.add_argument("--mlperf-version", default="v6.1",
                   help="the MLPerf Inference round whose LoadGen seeds (and, with --mode submission, compliance "
                        "tests) the run uses: v6.1 (default, LoadGen 6.0.17's own), v6.0, v5.1, v5.0, v4.1 (set on "
                        "LoadGen's settings); with --mode submission, v4.1 adds TEST05")
    g.add_argument("--max-examples", type=int,
                   help="use only the first N features as the QSL (quick runs; the official F1 then counts the "
                        "unscored questions as 0, and the summary also gives the F1 over the scored questions)")
    g = _Group("backend")
    g.add_argument("--backend", default="onnxruntime",
                   help=f"one of {', '.join(NAMES)} (default onnxruntime); the harness backends: null (zeros: the "
                        "harness ceiling), oracle (logits at the gold answer: proves every response reaches its "
                        "sample), sim (sleeps per --sim-latency); docs/backends.md")
    g.add_argument("--model", help="model file or directory (default: official model in the cache, "
                                   "else a generated random-weight BERT-Large)")
    g.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | rocm (default cpu)")
    g.add_argument("--precision", default="fp32", help="fp32 | fp16 | bf16 | int8 (default fp32)")
    g.add_argument("--threads", type=int, help="intra-op threads per worker (default: its cores)")
    g.add_argument("--ort-provider",
                   help="force an ONNX Runtime execution provider (CPU, CUDA, TensorRT, ROCm, OpenVINO; default: "
                        "by device); one that is not available is an error, never a silent CPU fallback")
    g.add_argument("--sim-latency", default="0.001 + 1e-6*tokens",
                   help="sim backend: seconds per batch as a + b*tokens + c*rows, e.g. "
                        "'0.002 + 6e-7*tokens + 1e-5*rows'")
    g.add_argument("--random-shape", default="large",
                   help="shape of the generated random-weight model when no official model is cached: large "
                        "(default) | base | tiny")
    g.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="backend option (repeatable), e.g. compile=1 (torch.compile), graphs=1 (CUDA graphs per "
                        "batch/length bucket; torch, CUDA only), seq_trim=0 (run a static-length ONNX graph "
                        "padded), oracle_latency=0.05 (slow the oracle for long dry runs); docs/backends.md")
    g = _Group("batching")
    g.add_argument("--max-batch", type=int, help="max samples per batch (default: the backend's)")
    g.add_argument("--token-budget", type=int,
                   help="Offline: max rows x trimmed length per batch (default: the backend's)")
    g.add_argument("--max-wait-ms", type=float, default=2.0,
                   help="Server: the longest a sample waits in an open batch, in ms (batches leave at once when a "
                        "worker is idle; default 2)")
    g.add_argument("--credits", type=int, default=2,
                   help="batches in flight per worker: pull-based load balancing (default 2)")
    g.add_argument("--batch-timeout", type=float, default=60.0,
                   help="requeue a batch with no result after max(this, 10 x the slowest batch) seconds "
                        "and drop a late result (recovers a message ZeroMQ lost on a reconnect); 0 = off (default 60); "
                        "raise it for compile=1 (first compiles can take minutes)")
    g.add_argument("--shape-ladder", type=int, metavar="N",
                   help="round every batch up to a bounded set of shapes: lengths to multiples of N (to 384), rows "
                        "to powers of two; 0 = exact trimming (default: a ladder of 16 on a GPU with torch or "
                        "onnxruntime, exact elsewhere; docs/gpu.md)")
    g.add_argument("--hedge", choices=("auto", "on", "off"), default="auto",
                   help="send a batch overdue on its worker (stopped, cut off, stalled) again to another worker; the "
                        "first answer wins (default auto: on in every scenario, as measured in docs/faults.md)")
    g.add_argument("--hedge-floor-ms", type=float, default=50.0,
                   help="a batch is overdue after --hedge-factor x its worker's recent p90 for that batch size plus "
                        "this (default 50)")
    g.add_argument("--hedge-factor", type=float, default=2.0, help="see --hedge-floor-ms (default 2)")
    g.add_argument("--hedge-budget", type=float, default=5.0, metavar="PCT",
                   help="hedged samples at most this percentage of the samples issued so far (default 5)")
    g.add_argument("--calibrate", action="store_true",
                   help="each worker times a few batch sizes at start-up (<= 20 s) and reports its knee as "
                        "max batch / token budget (instead of the backend's static hint)")
    g = _Group("processes")
    g.add_argument("--workers", type=int,
                   help="no launcher: local worker processes (default: one per GPU, else per CPU socket; 0 with "
                        "--expect-workers)")
    g.add_argument("--expect-workers", type=int, default=0,
                   help="also wait for N workers that join with `distbert worker --connect` "
                        "(key: DISTBERT_SESSION_KEY)")
    g.add_argument("--listen",
                   help="zmq address to bind, e.g. tcp://0.0.0.0:5555 (default: ipc locally, tcp under MPI)")
    g.add_argument("--transport", default="zmq", help="zmq (default) | mpi (needs a launcher)")
    g.add_argument("--coordinator-hosts-worker", action="store_true",
                   help="under a launcher, rank 0 also runs a worker")
    g.add_argument("--spin-us", type=float, default=0.0,
                   help="µs a ZeroMQ receive polls without sleeping, on rank 0 and the workers (default 0: "
                        "off; for hosts with free cores: it costs latency where cores are scarce, e.g. on a 2-vCPU VM)")
    g.add_argument("--in-process-worker", action=argparse.BooleanOptionalAction, default=None,
                   help="no launcher: rank 0 runs the one worker itself, on its driver thread (lowest "
                        "SingleStream latency; no overlap of batches, so not for Offline/Server throughput). "
                        "Default: on for SingleStream on a GPU (--device cuda/rocm; any number of GPUs: one query in "
                        "flight needs one), saying so in its log, without a launcher, --workers, "
                        "--expect-workers, --listen, --transport mpi or --coordinator-hosts-worker; "
                        "--no-in-process-worker: off. On a CPU the worker process is faster for PyTorch "
                        "(docs/benchmarks.md, where a SingleStream query's time goes)")
    g.add_argument("--bind-host", help="zmq: the address workers reach rank 0 at (default: this host's address)")
    g.add_argument("--ready-timeout", type=float, default=600.0,
                   help="seconds to wait for every worker's Ready: model loaded and warmed up (default 600)")
    g.add_argument("--heartbeat-timeout", type=float, default=10.0,
                   help="seconds of silence before a worker counts as lost: its batches are requeued; heard from "
                        "again, it is taken back (default 10)")
    g.add_argument("--rejoin-timeout", type=float,
                   help="how long a lost party may take to come back (default 60, or --heartbeat-timeout if longer): "
                        "with every worker lost, rank 0 waits this long for one to join or return before the run "
                        "fails (0: fails at once; a plain run whose local workers all exited fails at once too, "
                        "as none can rejoin); a worker whose link to rank 0 is down keeps trying this long "
                        "before it exits (status 3); a rank 0 that is gone (its port refuses) is noticed within "
                        "seconds. See docs/faults.md")
    g = _Group("data")
    g.add_argument("--dataset", help="SQuAD v1.1 dev json (default: DISTBERT_DATA_DIR, then the cache, then download)")
    g.add_argument("--vocab", help="BERT uncased vocab.txt (same defaults)")
    g.add_argument("--output", help="run directory, which must not exist or be empty (default "
                        "results/<time>-<scenario>-<backend>)")
    return actions


def _number_or_auto(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a number or auto") from None


def _resolve_auto(cfg: RunConfig, qps: float | str | None, latency: float | str | None) -> RunConfig:
    """``auto`` targets from the earlier runs in the results directory (run/history.py)."""
    if qps != "auto" and latency != "auto":
        return cfg
    import json
    from pathlib import Path

    from distbert import topology
    from distbert.run import history
    from distbert.run.rank0 import resolve_model

    results = Path(cfg.output).parent if cfg.output else Path("results")
    # compare with the model the run will use (earlier runs recorded the resolved path)
    resolved = cfg.replace(backend=resolve_model(cfg.backend, generate=False))
    config, world = json.loads(resolved.to_json()), topology.detect().world_size
    lg = cfg.loadgen
    if qps == "auto":
        value, why = history.auto_target_qps(results, config, world)
        lg = dataclasses.replace(lg, target_qps=round(value, 3))
        log.info("--target-qps auto: %.1f, from %s", value, why)
    if latency == "auto":
        value, why = history.auto_latency_ms(results, config, world)
        lg = dataclasses.replace(lg, target_latency_ms=round(value, 3))
        log.info("--target-latency-ms auto: %.3f ms, from %s", value, why)
    return dataclasses.replace(cfg, loadgen=lg)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    options: list[tuple[str, str]] = [("sim_latency", args.sim_latency), ("random_shape", args.random_shape)]
    if args.ort_provider:
        options.append(("ort_provider", args.ort_provider))
    for item in args.option:
        if "=" not in item:
            raise UserError(f"--option {item!r}: write KEY=VALUE")
        k, v = item.split("=", 1)
        options.append((k.strip(), v.strip()))
    cfg = RunConfig(
        loadgen=LoadGenConfig(scenario=args.scenario, mode=args.mode, execution_mode=args.execution_mode,
                              user_conf=args.user_conf,
                              target_qps=None if args.target_qps == "auto" else args.target_qps,
                              target_latency_ms=None if args.target_latency_ms == "auto" else args.target_latency_ms,
                              test_query_count=args.test_query_count,
                              min_duration_ms=args.min_duration_ms, max_duration_ms=args.max_duration_ms,
                              audit_conf=args.audit_conf, benchmark=args.benchmark,
                              mlperf_version=args.mlperf_version),
        backend=BackendSpec(name=args.backend, model=args.model, device=args.device, precision=args.precision,
                            threads=args.threads, options=tuple(options)),
        batch=BatchConfig(max_batch=args.max_batch, token_budget=args.token_budget, max_wait_ms=args.max_wait_ms,
                          credits=args.credits, calibrate=args.calibrate, batch_timeout_s=args.batch_timeout,
                          shape_ladder=args.shape_ladder, hedge=args.hedge, hedge_factor=args.hedge_factor,
                          hedge_floor_ms=args.hedge_floor_ms, hedge_budget_pct=args.hedge_budget),
        dataset=args.dataset, vocab=args.vocab, workers=args.workers, listen=args.listen,
        expect_workers=args.expect_workers, max_examples=args.max_examples,
        transport=args.transport, coordinator_hosts_worker=args.coordinator_hosts_worker,
        in_process_worker=args.in_process_worker, spin_us=args.spin_us, find_peak=args.find_peak,
        find_peak_probe_s=args.find_peak_probe_s, output=args.output,
        bind_host=args.bind_host, ready_timeout_s=args.ready_timeout, heartbeat_timeout_s=args.heartbeat_timeout,
        rejoin_timeout_s=args.rejoin_timeout if args.rejoin_timeout is not None else max(60.0, args.heartbeat_timeout))
    backend_class(cfg.backend.name)  # unknown backend / missing extra: fail before starting anything
    if cfg.in_process_worker is None:   # resolved here so that `auto` targets compare like with like
        from distbert import topology
        from distbert.run.rank0 import with_in_process_default

        cfg = with_in_process_default(cfg, launched=topology.detect().world_size > 1)
    return validate(_resolve_auto(validate(cfg), args.target_qps, args.target_latency_ms))


def cmd_run(args: argparse.Namespace) -> int:
    from distbert import topology
    from distbert.run import launch

    topo = topology.detect()
    setup_logging(topo.rank)
    return launch.run(config_from_args(args), topo)
