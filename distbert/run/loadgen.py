"""The LoadGen test driver: ``TestSettings`` for bert (embedded mlperf.conf, then one user.conf, then
CLI overrides), and one test run with rank 0's coordinator as the SUT.

LoadGen must see exactly one ``FromConfig`` call (a second one logs an ERROR that fails the
submission checker). distbert therefore writes the user.conf it actually used into the run
directory: the user's ``--user-conf`` verbatim plus the CLI overrides as ``bert.<Scenario>.<key>``
lines (later lines win in LoadGen's parser), and loads that one file. The same file goes into a
submission as ``user.conf``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from distbert import envs
from distbert.config import LoadGenConfig, RunConfig
from distbert.data.loadgen_logs import headline, read_detail
from distbert.data.squad import DEV_FEATURES
from distbert.engine.coordinator import Coordinator, RunFailed
from distbert.engine.lgnative import NativeSUT, native_entry
from distbert.errors import UserError

log = logging.getLogger(__name__)

MODEL_KEY = "bert"

# defaults for --execution-mode test (short runs; never a valid MLPerf result)
TEST_QUERY_COUNT = {"Offline": DEV_FEATURES, "Server": 2000, "SingleStream": 100}
TEST_SERVER_QPS = 1000.0


def write_user_conf(cfg: LoadGenConfig, path: Path) -> Path:
    # never empty: a submission needs a non-empty user.conf, even when nothing is overridden
    lines: list[str] = [f"# LoadGen user.conf of this distbert run (model key {MODEL_KEY}, "
                        f"{cfg.scenario}, execution mode {cfg.execution_mode})"]
    if cfg.execution_mode == "test" and cfg.scenario == "Server":
        # a test-mode default that a --user-conf or --target-qps below may override
        lines.append(f"{MODEL_KEY}.Server.target_qps = {TEST_SERVER_QPS:g}")
    if cfg.user_conf:
        src = Path(cfg.user_conf)
        if not src.is_file():
            raise UserError(f"--user-conf {src}: no such file")
        lines.append(f"# from {src}")
        lines.extend(src.read_text().splitlines())
        lines.append("# distbert command-line overrides")
    sc = cfg.scenario
    if cfg.target_qps is not None:
        key = {"Offline": "target_qps", "Server": "target_qps"}.get(sc)
        if key:
            lines.append(f"{MODEL_KEY}.{sc}.{key} = {cfg.target_qps:g}")
    if cfg.target_latency_ms is not None:
        if sc in ("SingleStream", "Server"):
            lines.append(f"{MODEL_KEY}.{sc}.target_latency = {cfg.target_latency_ms:g}")
    path.write_text("\n".join(lines) + "\n")
    return path


def make_settings(cfg: LoadGenConfig, mode: str, user_conf: Path, qsl_size: int, base: Any = None) -> Any:
    """TestSettings for ``mode`` in {"performance", "accuracy", "TEST05"} (TEST05: performance with
    the round's TEST05 seeds).

    Pass the settings of this process's previous test as ``base``: LoadGen logs an ERROR ("Multiple
    conf files are used") into every later test of a process that calls ``FromConfig`` twice, and
    that error fails the submission checker. So ``FromConfig`` runs once; later tests reuse the
    object with only the mode and the CLI overrides set again.
    """
    import mlperf_loadgen as lg

    settings = base
    if settings is None:
        settings = lg.TestSettings()
        rc = settings.FromConfig(str(user_conf), MODEL_KEY, cfg.scenario)
        if rc != 0:
            raise UserError(f"LoadGen rejected {user_conf} (code {rc}): "
                            "check its 'bert.<Scenario>.<key> = value' lines")
    settings.scenario = getattr(lg.TestScenario, cfg.scenario)
    settings.mode = lg.TestMode.AccuracyOnly if mode == "accuracy" else lg.TestMode.PerformanceOnly
    set_seeds(settings, cfg.mlperf_version, test05=mode == "TEST05")
    if cfg.execution_mode == "test":
        count = cfg.test_query_count or TEST_QUERY_COUNT[cfg.scenario]
        settings.min_duration_ms = cfg.min_duration_ms if cfg.min_duration_ms is not None else 0
        if cfg.scenario == "Offline":
            settings.min_query_count = min(count, qsl_size) if qsl_size < DEV_FEATURES else count
        else:
            settings.min_query_count = count
            # Server's schedule already holds exactly min_query_count queries; a max there makes
            # LoadGen log error_runtime ("Max query count reached") into every test-mode Server log
            if cfg.scenario != "Server":
                settings.max_query_count = count
    else:
        if cfg.min_duration_ms is not None:
            settings.min_duration_ms = cfg.min_duration_ms
    if cfg.max_duration_ms is not None:
        settings.max_duration_ms = cfg.max_duration_ms
    if qsl_size < DEV_FEATURES:
        settings.performance_sample_count_override = qsl_size
    return settings


def set_seeds(settings: Any, version: str, test05: bool = False) -> None:
    """The round's LoadGen seeds (``--mlperf-version``), or its TEST05 seeds (v4.1's compliance test
    that reruns performance with other seeds). Set on every test: the settings object is reused."""
    from distbert.submission.rules import rules

    round_rules = rules(version)
    seeds = round_rules.test05_seeds if test05 else round_rules.seeds
    if seeds is None:
        raise UserError(f"--mlperf-version {version} has no TEST05")
    for name, value in seeds.as_dict().items():
        setattr(settings, name, value)


def run_test(cfg: RunConfig, coordinator: Coordinator, qsl_size: int, mode: str, logdir: Path,
             audit: Path | None = None, settings_box: list[Any] | None = None) -> dict[str, Any]:
    """One LoadGen test through ``coordinator`` (the SUT); ``mode`` "TEST01" is a performance test
    under ``audit`` (a compliance audit.config), "TEST05" one with the round's TEST05 seeds.
    ``settings_box`` carries this process's one ``TestSettings`` from test to test (see
    :func:`make_settings`). Returns the headline figures."""
    logdir.mkdir(parents=True, exist_ok=True)
    user_conf = write_user_conf(cfg.loadgen, logdir / "user.conf")
    box = settings_box if settings_box is not None else []
    settings = make_settings(cfg.loadgen, "performance" if mode == "TEST01" else mode, user_conf, qsl_size,
                             base=box[0] if box else None)
    box[:] = [settings]
    if cfg.loadgen.scenario == "Server" and cfg.loadgen.target_qps:
        settings.server_target_qps = cfg.loadgen.target_qps   # also when the settings are reused
    want_logits = mode == "accuracy" or bool(audit or cfg.loadgen.audit_conf)
    return _start(cfg, coordinator, qsl_size, settings, logdir, mode, want_logits,
                  str(audit or cfg.loadgen.audit_conf or logdir / "audit.config"))  # absent file = no audit


#: MLPerf's Server latency bound for BERT (mlperf.conf: bert.Server.target_latency = 130)
SERVER_BOUND_NS = 130_000_000


#: the fewest queries a ``--find-peak`` probe issues. LoadGen judges a Server run by early stopping
#: as well as by its 99th percentile: with no query over the latency bound it needs about 460
#: queries to call a run VALID (LoadGen 6.0.17, measured: 450 queries INVALID, "would need to run at
#: least 9 more queries"; 480 VALID), more when some are late. The old floor of 100 made every probe
#: below ~170 QPS (at 3 s) INVALID whatever the system did, so a search started high on a slow GPU
#: halved down to a few QPS and found nothing (the 2026-11-30 H200 run). A slow probe lasts longer.
PROBE_MIN_QUERIES = 1000


def probe_settings(cfg: RunConfig, qsl_size: int, qps: float, duration_s: float) -> Any:
    """The ``TestSettings`` of one ``--find-peak`` probe: built by hand, not by ``FromConfig`` (a
    second FromConfig in a process puts an ERROR into every later log)."""
    import mlperf_loadgen as lg

    s = lg.TestSettings()
    s.scenario = lg.TestScenario.Server
    s.mode = lg.TestMode.PerformanceOnly
    s.server_target_qps = qps
    set_seeds(s, cfg.loadgen.mlperf_version)
    s.server_target_latency_ns = int(cfg.loadgen.target_latency_ms * 1e6) if cfg.loadgen.target_latency_ms \
        else SERVER_BOUND_NS
    s.server_target_latency_percentile = 0.99
    s.min_duration_ms = int(duration_s * 1000)
    s.min_query_count = max(PROBE_MIN_QUERIES, int(qps * duration_s))
    if qsl_size < DEV_FEATURES:
        s.performance_sample_count_override = qsl_size
    return s


def probe_server(cfg: RunConfig, coordinator: Coordinator, qsl_size: int, qps: float, duration_s: float,
                 logdir: Path) -> dict[str, Any]:
    """A short Server performance test at ``qps`` for ``--find-peak`` (settings: :func:`probe_settings`)."""
    s = probe_settings(cfg, qsl_size, qps, duration_s)
    return _start(cfg, coordinator, qsl_size, s, logdir, "performance", False, str(logdir / "audit.config"))


#: generation-0 threshold while a test runs (Python's default is 700)
GC_GEN0_DURING_TEST = 200_000


@contextlib.contextmanager
def quiet_gc() -> Iterator[None]:
    """Fewer garbage collections while LoadGen runs: every issue callback hands Python two fresh
    lists, so at Server rates the default threshold ran a generation-0 collection every few hundred
    samples (7 % of rank 0's samples in a py-spy profile at 200k QPS). Objects that exist before the
    test are frozen out of the collector, and the threshold is raised; both are restored after.
    Acyclic garbage is still freed at once by reference counting. ``DISTBERT_GC_TUNE=0``: off."""
    if not envs.gc_tune():
        yield
        return
    old = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_DURING_TEST, old[1], old[2])
    try:
        yield
    finally:
        gc.set_threshold(*old)
        gc.unfreeze()


def _make_sut(scenario: str, coordinator: Coordinator) -> tuple[int, Callable[[], None], NativeSUT | None]:
    """(handle for StartTest, its destroy, the native SUT or None when the binding's is used).

    Offline's one query of every sample comes through LoadGen's C API as arrays
    (``engine/lgnative.NativeSUT``): the binding would hand Python one int object per id and index
    (2.2M samples: ~0.3 s of rank 0 before the first batch). Server and SingleStream keep the
    binding's callback: for one sample it is the cheaper of the two."""
    import mlperf_loadgen as lg

    if scenario == "Offline":
        entry, _why = native_entry()
        if entry is not None:
            native = NativeSUT(entry, "distbert", coordinator.issue, coordinator.flush)
            assert native.handle is not None
            return native.handle, native.destroy, native
    sut = lg.ConstructFastSUT(coordinator.issue, coordinator.flush)
    return sut, lambda: lg.DestroyFastSUT(sut), None


def _start(cfg: RunConfig, coordinator: Coordinator, qsl_size: int, settings: Any, logdir: Path, mode: str,
           want_logits: bool, audit_path: str) -> dict[str, Any]:
    import mlperf_loadgen as lg

    logdir.mkdir(parents=True, exist_ok=True)
    log_settings = lg.LogSettings()
    log_settings.log_output.outdir = str(logdir)
    log_settings.log_output.copy_summary_to_stdout = False
    log_settings.enable_trace = False
    coordinator.begin_test(cfg.loadgen.scenario, want_logits)
    # The SUT's callbacks only enqueue (STYLE §5); the QSL needs no loading: workers map the cache.
    sut, destroy_sut, native = _make_sut(cfg.loadgen.scenario, coordinator)
    qsl = lg.ConstructQSL(qsl_size, min(qsl_size, DEV_FEATURES), lambda s: None, lambda s: None)
    log.info("LoadGen %s %s test starting (logs in %s)", cfg.loadgen.scenario, mode, logdir)
    t0, cpu0 = time.monotonic(), time.process_time()
    try:
        with quiet_gc():
            lg.StartTestWithLogSettings(sut, qsl, settings, log_settings, audit_path)
    finally:
        lg.DestroyQSL(qsl)
        destroy_sut()
    if native is not None and native.error is not None:   # its query was completed empty so the test could end
        error = native.error
        raise RunFailed(f"rank 0 failed to take LoadGen's query: {type(error).__name__}: {error}") from error
    wall = time.monotonic() - t0
    cpu = time.process_time() - cpu0   # rank 0's own CPU time, all its threads (LoadGen's included)
    detail = read_detail(logdir / "mlperf_log_detail.txt")
    out = headline(detail, cfg.loadgen.scenario) | {"wall_s": round(wall, 3), "rank0_cpu_s": round(cpu, 3),
                                                    "rank0_cores_busy": round(cpu / wall, 3) if wall > 0 else None,
                                                    "issue": "native" if native is not None else "python",
                                                    "completion": coordinator.completion_path}
    if coordinator.dispatcher is not None:
        out["dispatcher"] = coordinator.dispatcher.stats
        out["batch_policy"] = dataclasses.asdict(coordinator.dispatcher.policy)
        # the shapes this test's batches ran at (as the workers pad them: backends/shapes)
        out["batch_shapes"] = out["dispatcher"]["batch_shapes"]
        out["padding_fraction"] = out["dispatcher"]["padding_fraction"]
    log.info("LoadGen %s %s test done in %.1f s: %s", cfg.loadgen.scenario, mode, wall,
             {k: v for k, v in out.items() if k not in ("dispatcher", "batch_policy")})
    return out
