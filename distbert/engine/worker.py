"""A worker rank: load a backend, then turn ``Batch`` messages into ``Result`` messages.

Two threads, so the transport is only ever touched by one of them (STYLE §5):

* the **I/O thread** (the caller of :func:`worker_run`) owns the transport: it receives batches and
  control messages, sends results, heartbeats and failures;
* the **compute thread** gathers each batch's rows from the memory-mapped feature cache, trims them
  to the longest real length, pads them up to the run's shape ladder (``backends/shapes``; exact
  trimming unless the backend's policy or ``--shape-ladder`` says otherwise), runs the backend, slices
  the outputs back to the real rows and length, and hands the result back through a deque, waking
  the I/O thread.

With a backend that gains from overlapping host work and device compute
(:attr:`~distbert.backends.base.Backend.overlap_prepare`: the torch backend on CUDA) a third thread,
the **prepare thread**, does the gather and ``backend.prepare`` (pinned buffer, copy to the device)
and hands each batch to the compute thread through a one-slot queue; the compute thread only calls
``backend.run_prepared``. So batch k+1's gather and copy overlap batch k's compute. Other backends
(CPU) keep the two threads: no extra hand-off. ``DISTBERT_WORKER_PIPELINE=0`` turns it off.

Warm-up where it runs (issue 19): a GPU keeps per-thread state (the current device, cuBLAS/cuDNN
handles, attention plans), so a shape warmed on one thread is cold on another. The serving threads
start in :meth:`Worker.configure`, before the Ready; each first binds the backend's device
(``backend.bind_thread``), then the backend's :meth:`~distbert.backends.base.Backend.warmup_batches`
(a GPU backend: every shape of the run's ladder) go through them as batches do (prepare thread:
``prepare``, compute thread: ``run_prepared``; unpipelined: ``run`` on the compute thread), and the
one-row ones also run on the I/O thread, which serves one-sample batches itself. Only then the Ready.
A backend with no warm-up batches (CPU) gets one ``backend.warmup()`` on the I/O thread, as before.
The time goes into the log and into the Ready's info (``run.json``: ``workers[].info.warmup``), and a
batch later run on a thread where its shape was not warmed is counted (``cold_batches`` in the stats).

A worker exits 0 when rank 0 says ``Shutdown``. It exits 3 when rank 0 is gone: its transport saw
rank 0's process end (:class:`~distbert.wire.RankZeroGone`, within about a second), rank 0 stayed
unreachable for ``--rejoin-timeout`` (a cut link: until then it keeps trying, and rank 0 takes it
back when it is heard again), rank 0 says so (``Shutdown`` with :data:`~distbert.wire.messages.SHUTDOWN_RANK0_GONE`:
the process that started rank 0 ended), or (single-node mode) its parent process is gone. So no run leaves
orphans, and no orphan reports success.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import queue
import socket
import threading
import time
import traceback
from typing import Any

import numpy as np

from distbert import envs
from distbert.backends import create
from distbert.backends.base import Backend, ModelInputs
from distbert.backends.shapes import EXACT, ShapeLadder, ladder_json, run_ladder, shape_summary
from distbert.config import RunConfig
from distbert.errors import UserError
from distbert.topology import DeviceBinding, bind_worker
from distbert.util import trace
from distbert.wire import messages as m
from distbert.wire._common import RankZeroGone
from distbert.wire.base import WorkerTransport

log = logging.getLogger(__name__)


class _Stop(Exception):
    pass


class CoordinatorLost(Exception):
    """Rank 0 is gone or unreachable for good: the worker exits with status 3."""


#: A worker's exit status when rank 0 vanished (0: told to stop; 1: a failure; 2: a user error).
EXIT_COORDINATOR_LOST = 3


@dataclasses.dataclass
class _Prepared:
    """A batch through stage one (the prepare thread), for stage two (the compute thread)."""

    batch: m.Batch
    prepared: object       # what backend.prepare returned
    prepare_s: float       # gather + prepare time
    width: int             # the batch's longest real row: outputs are sliced back to it
    shape: tuple[int, int] = (0, 0)   # as the backend runs it (padded to the ladder)


@dataclasses.dataclass
class _Warm:
    """A warm-up batch on its way through the serving threads (``prepared`` once staged)."""

    inputs: ModelInputs
    prepared: object = None


class _WarmEnd:
    """Behind the last warm-up batch: the thread that meets it last says the warm-up is over."""


_WARM_END = _WarmEnd()
#: how often a long warm-up says how far it is
WARM_PROGRESS_S = 30.0


def _failure(rank: int, batch_id: int, exc: BaseException) -> m.Failure:
    return m.Failure(rank=rank, host=socket.gethostname(), batch_id=batch_id, exc_type=type(exc).__name__,
                     text=str(exc), traceback="".join(traceback.format_exception(exc)))


class Worker:
    """The worker's state; :func:`worker_run` drives it."""

    def __init__(self, transport: WorkerTransport, rank: int, local_index: int, local_count: int,
                 parent_pid: int | None = None, pin: bool = True, serving_threads: bool = True) -> None:
        self.transport = transport
        self.pin = pin
        # False: batches run on the caller's threads (the in-process worker, engine/inline), which
        # configure() warms instead of starting a compute thread
        self.serving_threads = serving_threads
        self.rank = rank
        self.local_index = local_index
        self.local_count = local_count
        self.parent_pid = parent_pid
        self.cfg: RunConfig | None = None
        self.backend: Backend | None = None
        self.store: Any = None
        self._lengths: np.ndarray | None = None
        self.binding: DeviceBinding | None = None
        self._todo: queue.SimpleQueue[m.Batch | _Warm | _WarmEnd | None] = queue.SimpleQueue()
        self._done: collections.deque[m.Result | m.Failure] = collections.deque()
        self._last_heard = time.monotonic()
        self._warned_silence = False
        self.inline = envs.worker_inline()  # one-sample batches on the I/O thread when compute is idle
        self.pipeline = envs.worker_pipeline()  # a prepare thread, if the backend gains from one
        self.pipelined = False                  # whether serve() runs one
        # prepare thread -> compute thread; bounded, so the prepare thread stays at most two batches
        # ahead (one queued, one in hand): enough to hide a copy, without holding every batch staged
        self._staged: queue.Queue[_Prepared | m.Failure | _Warm | _WarmEnd | None] = queue.Queue(maxsize=1)
        self._threads: list[threading.Thread] = []
        # warm-up: (thread id, rows, length) warmed; seconds per thread name; the first error
        self._warmed: set[tuple[int, int, int]] = set()
        self._warm_s: dict[str, float] = {}
        self._warm_done = threading.Event()
        self._warm_error: BaseException | None = None
        self.warmup: dict[str, Any] = {}
        self.cold_batches = 0   # batches run on a thread where their shape was not warmed
        self._queued = 0       # batches handed to the compute thread (I/O thread writes)
        self._finished = 0     # batches it finished (compute thread writes)
        self.batches = 0
        self.inline_batches = 0  # of those, run on the I/O thread
        self.samples = 0
        self.compute_s = 0.0
        self.ladder: ShapeLadder = EXACT        # set in configure, before the backend warms up
        self._shape_lock = threading.Lock()     # _inputs runs on the compute, prepare or I/O thread
        self._shapes: dict[tuple[int, int], int] = {}   # (rows, length) run -> batches
        self._tokens_run = 0
        self._tokens_real = 0

    # --- start-up ------------------------------------------------------------------------------

    def _await_setup(self, deadline_s: float) -> RunConfig:
        deadline = time.monotonic() + deadline_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"rank {self.rank}: no Setup from rank 0 within {deadline_s:.0f} s")
            msg = self.transport.recv(timeout=min(left, 1.0))
            self._check_parent()
            if isinstance(msg, m.Setup):
                return RunConfig.from_json(msg.config_json)
            if isinstance(msg, m.Shutdown):
                raise _Stop(msg.reason)

    def setup(self, setup_timeout_s: float = 600.0) -> None:
        ready = self.configure(self._await_setup(setup_timeout_s))
        if hasattr(self.transport, "spin_s"):  # ZeroMQ: spin as rank 0 says (SingleStream)
            self.transport.spin_s = self.cfg.spin_s()  # type: ignore[union-attr]
        self.transport.send(ready)

    def configure(self, cfg: RunConfig) -> m.Ready:
        """Bind the device, load and warm the backend; the Ready that says so (STYLE §6)."""
        self.cfg = cfg
        spec = cfg.backend
        if self.pin:
            self.binding = bind_worker(spec.device, self.local_index, self.local_count)
        else:  # in-process workers (tests; --in-process-worker in rank 0) must not pin the whole process
            self.binding = DeviceBinding(spec.device, tuple(sorted(os.sched_getaffinity(0))))
        threads = spec.threads or len(self.binding.cores)
        spec = dataclasses.replace(spec, device=self.binding.device,
                                   threads=threads)
        log.info("device %s, cores %s, %d threads, backend %s", self.binding.device,
                 _ranges(self.binding.cores), threads, spec.name)
        from distbert.data.squad.features import FeatureStore  # lazy: heavy import after setup

        if cfg.features_path is None:
            raise UserError("run config has no feature cache path (rank 0 must set it)")
        if not os.path.exists(cfg.features_path):
            raise UserError(f"the feature cache {cfg.features_path} is not on host {socket.gethostname()}: every "
                            f"worker opens rank 0's cache at the same path (put DISTBERT_CACHE on a shared "
                            f"filesystem, or copy the cache there first)")
        self.store = FeatureStore.open(cfg.features_path)
        backend = self.backend = create(spec)
        backend.load()
        if backend.needs_features:
            backend.attach_features(self.store)
        own = backend.batch_hint()
        self.ladder = run_ladder(cfg, own.max_batch, own.token_budget)
        backend.set_shape_ladder(self.ladder)
        if not self.ladder.exact:
            log.info("shape ladder: lengths to multiples of %d, rows %s (%d shapes)", self.ladder.step,
                     list(self.ladder.rows), len(self.ladder.shapes()))
        try:
            self._warm(backend)
        except BaseException:
            self._stop_threads()
            raise
        hint = backend.batch_hint()
        if cfg.batch.calibrate and backend.needs_tokens:
            from distbert.backends.batching import calibrate

            # a seeded sample of the whole set: the dev set is in article order, so a prefix is not typical
            pick = np.random.default_rng(0).choice(len(self.store), size=min(2048, len(self.store)), replace=False)
            hint = calibrate(backend, np.asarray(self.store.lengths)[pick])
        info = backend.info() | {"cores": list(self.binding.cores), "pid": os.getpid(),
                                 "shape_ladder": ladder_json(self.ladder), "warmup": self.warmup}
        # Ready only now: rank 0 must not start LoadGen's clock before every model is warm.
        return m.Ready(rank=self.rank, host=socket.gethostname(), device=self.binding.device, backend=spec.name,
                       max_batch=hint.max_batch, info_json=json.dumps(info | {"token_budget": hint.token_budget}))

    # --- warm-up: every shape on every thread that will run it ----------------------------------

    def _warm(self, backend: Backend) -> None:
        """Start the serving threads and warm each (module docstring); the I/O thread (or, in
        process, this caller's thread) too. Raises the first warm-up error."""
        t0 = time.perf_counter()
        backend.bind_thread()
        batches = backend.warmup_batches()
        if not batches:
            backend.warmup()   # a CPU backend: once, here, as before
            self._warm_s[threading.current_thread().name] = time.perf_counter() - t0
        if self.serving_threads:
            self._start_threads()
            for inputs in batches:
                self._todo.put(_Warm(inputs))
            self._todo.put(_WARM_END)   # also when there is nothing to warm: every thread has started
            self._await_warm(len(batches))
            if self.inline and batches:   # one-sample batches run on this (the I/O) thread
                self.warm_here(one_sample=True)
        elif batches:
            self.warm_here()
        self.warmup = {"s": round(time.perf_counter() - t0, 3), "batches": len(batches),
                       "shapes": len({b.shape for b in batches}),
                       "threads": {name: round(s, 3) for name, s in self._warm_s.items()}}
        log.info("warm-up: %d batches (%d shapes) in %.1f s, threads %s", len(batches), self.warmup["shapes"],
                 self.warmup["s"], ", ".join(f"{n} {s:.1f} s" for n, s in self.warmup["threads"].items()) or "-")

    def warm_here(self, one_sample: bool = False) -> int:
        """Run the backend's warm-up batches on the calling thread (``one_sample``: only those with
        the rows of a one-sample batch, the only ones a thread serving one-sample batches meets);
        how many ran."""
        assert self.backend is not None
        self.backend.bind_thread()
        rows, ran = self.ladder.rows_for(1), 0
        for inputs in self.backend.warmup_batches():
            if not one_sample or inputs.shape[0] == rows:
                self._warm_one(inputs, "run")
                ran += 1
        if self.warmup:   # after the Ready (the in-process caller's thread): the stats say it
            self.warmup["threads"] = {name: round(s, 3) for name, s in self._warm_s.items()}
        return ran

    def _warm_one(self, item: ModelInputs | _Warm, stage: str) -> _Warm | None:
        """One warm-up batch's ``stage`` (run, prepare or run_prepared) on this thread; the first
        error is kept for :meth:`_await_warm` (or raised when warming the caller's own thread)."""
        assert self.backend is not None
        inputs = item.inputs if isinstance(item, _Warm) else item
        t0 = time.perf_counter()
        if stage == "prepare":
            out = _Warm(inputs, self.backend.prepare(inputs))
        elif stage == "run_prepared":
            self.backend.run_prepared(item.prepared if isinstance(item, _Warm) else item)
            out = None
        else:
            self.backend.run(inputs)
            out = None
        thread = threading.current_thread()
        self._warmed.add((thread.ident or 0, *inputs.shape))
        self._warm_s[thread.name] = self._warm_s.get(thread.name, 0.0) + time.perf_counter() - t0
        return out

    def _warm_step(self, item: _Warm, stage: str) -> _Warm | None:
        """:meth:`_warm_one` on a serving thread: an error stops the warm-up, not the thread."""
        if self._warm_error is not None:
            return None
        try:
            return self._warm_one(item, stage)
        except BaseException as exc:
            log.exception("warm-up of a %s batch failed in %s on %s", item.inputs.shape, stage,
                          threading.current_thread().name)
            self._warm_error = exc
            return None

    def _await_warm(self, n: int) -> None:
        """Wait for the serving threads' warm-up, saying how long it takes (rank 0 waits for the Ready
        up to --ready-timeout); a vanished parent still ends the wait."""
        t0 = time.monotonic()
        note = t0 + WARM_PROGRESS_S
        while not self._warm_done.wait(timeout=1.0):
            self._check_parent()
            if time.monotonic() >= note:
                note += WARM_PROGRESS_S
                log.info("warm-up still running after %.0f s (%d batches per thread)", time.monotonic() - t0, n)
        if self._warm_error is not None:
            raise self._warm_error

    def _bind_serving_thread(self) -> bool:
        """First thing on a serving thread: the backend's device. False (and the warm-up fails) if not."""
        try:
            self.backend.bind_thread()  # type: ignore[union-attr]  # set before the threads start
            return True
        except BaseException as exc:
            log.exception("binding %s to the device failed", threading.current_thread().name)
            self._warm_error = exc
            self._warm_done.set()
            return False

    def _note_shape(self, shape: tuple[int, int]) -> None:
        """Count a batch whose shape was not warmed on this thread (only when there was a warm-up)."""
        if self._warmed and (threading.get_ident(), *shape) not in self._warmed:
            with self._shape_lock:
                self.cold_batches += 1

    def _start_threads(self) -> None:
        assert self.backend is not None
        self.pipelined = self.pipeline and self.backend.overlap_prepare
        if self.pipelined:
            log.info("pipelined: a prepare thread gathers and copies the next batch during compute")
            self._threads = [threading.Thread(target=self._prepare_loop, name="distbert-prepare", daemon=True),
                             threading.Thread(target=self._run_loop, name="distbert-compute", daemon=True)]
        else:
            self._threads = [threading.Thread(target=self._compute_loop, name="distbert-compute", daemon=True)]
        for thread in self._threads:
            thread.start()

    def _stop_threads(self, timeout_s: float = 5.0) -> None:
        """Stop the serving threads after the work queued before (bounded)."""
        if not self._threads:
            return
        self._todo.put(None)
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:   # the prepare thread first: it passes the stop on to the compute thread
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    # --- compute thread ------------------------------------------------------------------------

    def _inputs(self, batch: m.Batch) -> tuple[ModelInputs, int]:
        """The batch as the backend runs it (trimmed, then padded to the shape ladder), and its
        longest real row (the width its outputs are sliced back to)."""
        indices = np.asarray(batch.indices, dtype=np.int64)
        assert self.backend is not None
        if self.backend.needs_tokens:
            ids, mask, seg, lengths = self.store.gather(indices)
        else:  # the harness backends read no tokens: zero rows of the right shape, cheaply
            if self._lengths is None:
                self._lengths = np.asarray(self.store.lengths)  # a plain view: memmap indexing is slower
            lengths = self._lengths[indices]
            ids = mask = seg = np.zeros((len(indices), int(lengths.max()) if len(indices) else 0), np.int32)
        inputs = ModelInputs(indices, ids, mask, seg, lengths)
        width = inputs.shape[1]
        if not self.ladder.exact:
            inputs = self.ladder.pad(inputs)
        self._count_shape(inputs.shape, int(lengths.sum()))
        return inputs, width

    def _count_shape(self, shape: tuple[int, int], real_tokens: int) -> None:
        with self._shape_lock:
            self._shapes[shape] = self._shapes.get(shape, 0) + 1
            self._tokens_run += shape[0] * shape[1]
            self._tokens_real += real_tokens

    def _result(self, batch: m.Batch, start: np.ndarray, end: np.ndarray, t0: float,
                earlier_s: float = 0.0, width: int | None = None) -> m.Result:
        """The Result of ``batch``; outputs of a padded batch are cut back to its real rows and
        ``width`` (its longest real row)."""
        if batch.want_logits:
            rows = len(batch.ids)
            if len(start) != rows or (width is not None and start.shape[1] != width):
                start, end = start[:rows, :width], end[:rows, :width]
            logits = np.stack([np.asarray(start, np.float32), np.asarray(end, np.float32)], axis=-1)
        else:
            logits = np.zeros((len(batch.ids), 0, 2), np.float32)
        took = time.perf_counter() - t0 + earlier_s
        self.compute_s += took
        self.batches += 1
        self.samples += len(batch.ids)
        return m.Result(batch_id=batch.batch_id, ids=batch.ids, logits=logits, compute_s=took)

    def _failed(self, batch: m.Batch, exc: Exception, stage: str) -> m.Failure:
        """A failure is a message (STYLE §8)."""
        log.exception("batch %d failed in %s", batch.batch_id, stage)
        return _failure(self.rank, batch.batch_id, exc)

    def _compute(self, batch: m.Batch) -> m.Result | m.Failure:
        """Run one batch on the backend (the compute thread, or inline on the I/O thread)."""
        if trace.ON:
            trace.mark("w_start", batch.batch_id)
        t0 = time.perf_counter()
        try:
            inputs, width = self._inputs(batch)
            self._note_shape(inputs.shape)
            start, end = self.backend.run(inputs)  # type: ignore[union-attr]  # set before serve()
            out: m.Result | m.Failure = self._result(batch, start, end, t0, width=width)
        except Exception as exc:
            out = self._failed(batch, exc, "run")
        if trace.ON:
            trace.mark("w_end", batch.batch_id)
        return out

    def _prepare(self, batch: m.Batch) -> _Prepared | m.Failure:
        """Stage one of a pipelined batch (the prepare thread): gather its rows, ``backend.prepare``."""
        if trace.ON:
            trace.mark("w_start", batch.batch_id)
        t0 = time.perf_counter()
        try:
            inputs, width = self._inputs(batch)
            self._note_shape(inputs.shape)
            prepared = self.backend.prepare(inputs)  # type: ignore[union-attr]  # set before serve()
        except Exception as exc:
            return self._failed(batch, exc, "prepare")
        return _Prepared(batch, prepared, time.perf_counter() - t0, width, inputs.shape)

    def _run_prepared(self, item: _Prepared) -> m.Result | m.Failure:
        """Stage two of a pipelined batch (the compute thread): ``backend.run_prepared``."""
        t0 = time.perf_counter()
        try:
            self._note_shape(item.shape)
            start, end = self.backend.run_prepared(item.prepared)  # type: ignore[union-attr]  # set before serve()
            return self._result(item.batch, start, end, t0, item.prepare_s, item.width)
        except Exception as exc:
            return self._failed(item.batch, exc, "run")

    def _deliver(self, out: m.Result | m.Failure) -> None:
        self._done.append(out)
        self._finished += 1   # written by the compute thread only; the I/O thread reads it
        self.transport.wake()

    def _compute_loop(self) -> None:
        if not self._bind_serving_thread():
            return
        while True:
            batch = self._todo.get()
            if batch is None:
                return
            if isinstance(batch, _Warm):
                self._warm_step(batch, "run")
            elif isinstance(batch, _WarmEnd):
                self._warm_done.set()
            else:
                self._deliver(self._compute(batch))

    def _prepare_loop(self) -> None:
        """The prepare thread: stage one of each batch, in arrival order."""
        if not self._bind_serving_thread():
            self._staged.put(None)
            return
        while True:
            batch = self._todo.get()
            if batch is None:
                self._staged.put(None)   # behind every staged batch: the compute thread runs them first
                return
            if isinstance(batch, _Warm):
                staged = self._warm_step(batch, "prepare")
                if staged is not None:
                    self._staged.put(staged)
            elif isinstance(batch, _WarmEnd):
                self._staged.put(batch)
            else:
                self._staged.put(self._prepare(batch))   # waits while the compute thread is behind

    def _run_loop(self) -> None:
        """The compute thread when pipelined. A batch that failed in stage one arrives as its Failure
        and is delivered from here too, so that this thread alone counts finished batches."""
        if not self._bind_serving_thread():
            return
        while True:
            item = self._staged.get()
            if item is None:
                return
            if isinstance(item, _Warm):
                self._warm_step(item, "run_prepared")
                continue
            if isinstance(item, _WarmEnd):
                self._warm_done.set()
                continue
            out = item if isinstance(item, m.Failure) else self._run_prepared(item)
            if trace.ON:
                trace.mark("w_end", out.batch_id)
            self._deliver(out)

    def _take(self, batch: m.Batch) -> None:
        """A batch arrived. A one-sample batch while the compute thread is idle runs right here, on
        the I/O thread: two thread hand-offs (queue in, wake out) are most of a SingleStream query's
        cost in the worker. Anything else goes to the compute thread, so receiving overlaps compute."""
        if trace.ON:
            trace.mark("w_recv", batch.batch_id)
        if self.inline and len(batch.ids) == 1 and self._queued == self._finished:
            self.inline_batches += 1
            self._send(self._compute(batch))
            return
        self._queued += 1
        self._todo.put(batch)

    def _send(self, msg: m.Result | m.Failure) -> None:
        if trace.ON and isinstance(msg, m.Result):
            trace.mark("w_send", msg.batch_id)
        self.transport.send(msg)

    # --- I/O thread ----------------------------------------------------------------------------

    def _check_parent(self) -> None:
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            raise CoordinatorLost(f"rank {self.rank}: the parent process (rank 0, pid {self.parent_pid}) is gone")

    def _check_silence(self, now: float) -> None:
        """Rank 0 silent: past the heartbeat timeout say so once (a cut link?); past the rejoin
        timeout give up. Rank 0's own death is seen sooner, by the transport."""
        assert self.cfg is not None
        silent = now - self._last_heard
        limit = max(self.cfg.rejoin_timeout_s, self.cfg.heartbeat_timeout_s)   # --rejoin-timeout 0: the heartbeat's
        if silent > limit:
            raise CoordinatorLost(f"rank {self.rank}: rank 0 unreachable for {silent:.0f} s (--rejoin-timeout "
                                  f"{self.cfg.rejoin_timeout_s:g} s); giving up")
        if silent > self.cfg.heartbeat_timeout_s and not self._warned_silence:
            self._warned_silence = True
            log.warning("rank 0 silent for %.1f s: link down? still trying for up to %g s (--rejoin-timeout)",
                        silent, limit)
        elif silent <= self.cfg.heartbeat_timeout_s and self._warned_silence:
            self._warned_silence = False
            log.warning("rank 0 heard from again")

    def serve(self) -> str:
        """Run until Shutdown or rank 0 is gone; returns the reason."""
        assert self.cfg is not None and self.backend is not None
        assert self._threads, "serve() after configure(): the serving threads start (and warm up) there"
        cfg = self.cfg
        next_beat = time.monotonic() + cfg.heartbeat_s
        self._last_heard = time.monotonic()  # model loading was not silence
        reason = "?"
        try:
            while True:
                while self._done:
                    self._send(self._done.popleft())
                now = time.monotonic()
                if now >= next_beat:
                    self.transport.send(m.Heartbeat(rank=self.rank, sent_at=time.time()))
                    next_beat = now + cfg.heartbeat_s
                    self._check_parent()
                    self._check_silence(now)
                msg = self.transport.recv(timeout=max(0.0, next_beat - time.monotonic()))
                if msg is None:
                    continue
                self._last_heard = time.monotonic()
                if isinstance(msg, m.Batch):
                    self._take(msg)
                elif isinstance(msg, m.Shutdown):
                    reason = f"shutdown: {msg.reason}"
                    break
        except _Stop as stop:
            reason = str(stop)
        finally:
            # let the batches in progress finish (bounded) so their results are not lost on a clean stop
            self._stop_threads()
        while self._done:
            self.transport.send(self._done.popleft())
        return reason

    def stats(self) -> dict[str, Any]:
        return {"rank": self.rank, "host": socket.gethostname(), "batches": self.batches,
                "inline_batches": self.inline_batches, "samples": self.samples, "pipelined": self.pipelined,
                "compute_s": round(self.compute_s, 6), "warmup": self.warmup, "cold_batches": self.cold_batches,
                "backend": self.backend.info() if self.backend else None} | self.shape_stats()

    def shape_stats(self) -> dict[str, Any]:
        """The shapes this worker ran (as padded) and its padding: the figures rank 0's dispatcher
        reports per test (``Dispatcher.shape_stats``), observed here for the whole run."""
        with self._shape_lock:
            summary = shape_summary(dict(self._shapes), self._tokens_run, self._tokens_real)
        return {"shape_ladder": ladder_json(self.ladder)} | summary


def worker_run(transport: WorkerTransport, rank: int, local_index: int = 0, local_count: int = 1,
               parent_pid: int | None = None, pin: bool = True) -> int:
    """Whole life of a worker. Returns a process exit code; never raises."""
    worker = Worker(transport, rank, local_index, local_count, parent_pid, pin)
    code = 0
    try:
        worker.setup()
        reason = worker.serve()
        log.info("stopping (%s) after %d batches, %d samples", reason, worker.batches,
                 worker.samples)
        if m.SHUTDOWN_RANK0_GONE in reason:   # told so by rank 0 itself: the run is over for good
            code = EXIT_COORDINATOR_LOST
        try:
            transport.send(m.Bye(rank=rank, stats_json=json.dumps(worker.stats())))
        except Exception:  # rank 0 may already be gone
            pass
    except _Stop as stop:
        log.info("stopped before serving: %s", stop)
        if str(stop).startswith(m.SHUTDOWN_RANK0_GONE):
            code = EXIT_COORDINATOR_LOST
    except (CoordinatorLost, RankZeroGone) as exc:
        code = EXIT_COORDINATOR_LOST
        log.error("%s", exc)
    except BaseException as exc:  # report the first failure to rank 0, then exit non-zero
        code = 2 if isinstance(exc, UserError) else 1
        log.error("%s: %s", type(exc).__name__, exc)
        try:
            transport.send(_failure(rank, -1, exc))
        except Exception:
            pass
    finally:
        if worker.backend is not None:
            worker.backend.close()
        transport.close()
    return code


def _ranges(cores: tuple[int, ...]) -> str:
    if not cores:
        return "-"
    out, start, prev = [], cores[0], cores[0]
    for c in cores[1:] + (None,):
        if c is not None and c == prev + 1:
            prev = c
            continue
        out.append(f"{start}-{prev}" if start != prev else str(start))
        if c is not None:
            start = prev = c
    return ",".join(out)
