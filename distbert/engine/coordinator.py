"""Rank 0: LoadGen's SUT and QSL, and the I/O driver that feeds the dispatcher.

Threads (STYLE §5):

* **LoadGen's threads** call ``issue``/``flush``; they only append to the inbox and wake the driver
  (only when it sleeps).
* **The driver thread** owns the transport and the :class:`~distbert.engine.dispatcher.Dispatcher` from
  the first Hello to the last Bye: it hands out ``Setup``, collects ``Ready``, turns LoadGen samples
  and worker results into dispatcher events, sends batches, watches heartbeats and child processes,
  and completes each finished batch with one ``QuerySamplesComplete`` call (which releases the GIL
  and is wait-free in LoadGen; a separate completion thread measured slower, see ``_complete``).
* **The main thread** runs the LoadGen tests one after another and waits on events.

Faults (``docs/faults.md``): a worker whose connection closes is lost at once (the transport says so,
:class:`~distbert.wire.base.PeerGone`), a silent one at ``--heartbeat-timeout``; its batches are
requeued. A restarted worker (a new connection's Hello for a known rank) takes over at its Ready with
no moment without a worker. With no worker left, work waits up to ``--rejoin-timeout`` for any
worker to join or return (saying so every few seconds) before the run fails; a pending restart is
waited for as long as a start-up may take (``--ready-timeout``).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distbert.backends.shapes import ladder_json, run_ladder
from distbert.config import MAX_BATCH, RunConfig  # MAX_BATCH: the largest max_batch a worker may announce
from distbert.engine.completion import Completer
from distbert.engine.dispatcher import (
    BatchPolicy,
    Complete,
    Dispatcher,
    Hedged,
    NoWorkers,
    Requeued,
    Retired,
    SendBatch,
)
from distbert.engine.hedge import hedge_policy
from distbert.util import trace
from distbert.wire import messages as m
from distbert.wire.base import CoordinatorTransport, PeerGone

log = logging.getLogger(__name__)

MAX_SEQ = 384          # the longest row a worker may return logits for


def max_result_bytes(max_rows: int | None) -> int:
    """The largest frame a worker may send: the logits of its largest legal batch plus headers
    (rows x 384 x 2 float32; ``max_rows`` None = :data:`MAX_BATCH`). The transport's message limit."""
    return (max_rows or MAX_BATCH) * MAX_SEQ * 2 * 4 + (1 << 16)


# The driver's inbox holds, in arrival order: sample tuples ``(ids, indices)`` from LoadGen's issue
# callback (plain tuples: the Server hot path), and the control items below.
@dataclass(frozen=True)
class _Flush:
    """LoadGen's flush callback: cut the open batch now."""


@dataclass(frozen=True)
class _Begin:
    """A new test: the driver adopts ``dispatcher``, gives it the ready workers, then sets ``done``."""

    dispatcher: Dispatcher
    done: threading.Event


@dataclass(frozen=True)
class _Shutdown:
    """Tell every worker to stop with ``reason``; wait for their Bye."""

    reason: str


_FLUSH = _Flush()
_Control = _Flush | _Begin | _Shutdown
PROGRESS_S = 10.0
#: with no worker left, the wait for one is logged this often (s)
REJOIN_LOG_S = 5.0
#: the reason in the Shutdown a run sends when the process that started it is gone: its workers exit 3
#: (rank 0 is gone) rather than 0, so a launched rank does not wait for a next step that never comes
ORCHESTRATOR_GONE = m.SHUTDOWN_RANK0_GONE + "the process that started this run ended"
SWITCH = 0.0005  # s; see start()


class RunFailed(Exception):
    """A worker failed or every worker was lost; the message names the rank and the cause."""


@dataclass
class WorkerHandle:
    """Rank 0's live view of one worker (its spec is the config it was sent)."""

    worker: int
    host: str = "?"
    pid: int = 0
    ready: bool = False
    lost: bool = False
    faulty: bool = False      # broke the protocol: dropped, and nothing it sends is used again
    device: str = "?"
    backend: str = "?"
    max_batch: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    last_seen: float = 0.0
    stats: dict[str, Any] | None = None
    restart_since: float | None = None   # a new connection's Hello for this rank, awaiting its Ready


def _json_object(text: str) -> dict[str, Any] | None:
    """``text`` as a JSON object; None when it is not one (or not JSON at all)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


_switch_lock = threading.Lock()
_switch_users = 0
_switch_saved = 0.005


def _switch_interval(delta: int) -> None:
    """Coordinators running in this process (+1 at start, -1 at stop): the first sets SWITCH, the last
    puts the process's own interval back (tests run several, and overlap)."""
    global _switch_users, _switch_saved
    with _switch_lock:
        if delta > 0 and _switch_users == 0:
            _switch_saved = sys.getswitchinterval()
            sys.setswitchinterval(SWITCH)
        _switch_users += delta
        if delta < 0 and _switch_users == 0:
            sys.setswitchinterval(_switch_saved)


def switch_interval_users() -> int:
    return _switch_users


def _joined(ids: list[int], indices: list[int],
            pieces: list[tuple[Any, Any]]) -> tuple[list[int] | np.ndarray, list[int] | np.ndarray]:
    """The samples drained in one look, in issue order: the lists when no array came (the binding's
    callbacks), one array pair as it is, else every piece concatenated in order."""
    if not pieces:
        return ids, indices
    if len(pieces) == 1:
        return np.asarray(pieces[0][0], np.uint64), np.asarray(pieces[0][1], np.int64)
    return (np.concatenate([np.asarray(p[0], np.uint64) for p in pieces]),
            np.concatenate([np.asarray(p[1], np.int64) for p in pieces]))


class Coordinator:
    def __init__(self, cfg: RunConfig, transport: CoordinatorTransport, lengths: np.ndarray,
                 expected_workers: set[int], is_alive: Callable[[int], bool] | None = None,
                 external_workers: int = 0, parent_pid: int | None = None, joinable: bool = True) -> None:
        self.cfg = cfg
        self.transport = transport
        self.lengths = lengths
        self.expected = set(expected_workers)
        self.is_alive = is_alive
        self.external_workers = external_workers  # unknown ids that may join (distbert worker --connect)
        self.parent_pid = parent_pid  # the run ends when this process is no longer our parent (a watchdog)
        # False when no worker can join but rank 0's own local processes (no --listen, no launched
        # ranks, no external workers): once they have all exited, waiting for a rejoin is pointless
        self.joinable = joinable
        self._no_worker_since: float | None = None   # every worker lost (or none yet in a test) since then
        self._began: float | None = None             # the test began then and no result has come yet
        self._rejoin_logged = 0.0
        self.workers: dict[int, WorkerHandle] = {}
        self.dispatcher: Dispatcher | None = None
        self.failure: str | None = None
        # (ids, indices) as lists (the binding) or arrays (the native SUT), and control items
        self._inbox: collections.deque[tuple[Any, Any] | _Control] = collections.deque()
        self._stop = threading.Event()
        self._all_ready = threading.Event()
        self._all_bye = threading.Event()
        self._shutting_down = False
        self._driver: threading.Thread | None = None
        self._sleeping = False
        self._progress_mark = (0.0, 0)
        self._completer: Completer | None = None
        self._dead = False    # the driver thread died: callbacks complete at once, without data
        # The direct path (an in-process worker, engine/inline.py): LoadGen's issue thread runs a
        # one-sample query itself when the driver is idle. The driver holds _lock whenever it is
        # awake, so dispatcher and transport still have one user at a time.
        self._direct: Callable[[m.Batch], m.Message] | None = getattr(transport, "compute", None)
        self._direct_completing = False   # the direct path is inside a completion (see _direct_or_fail)
        self._lock = threading.Lock()
        self._switch_held = False

    # --- start-up: Hello -> Setup -> Ready ------------------------------------------------------

    def start(self) -> None:
        # LoadGen's issue thread must take the GIL to call us; with Python's default 5 ms switch
        # interval it waits behind the driver thread and falls behind its Server schedule.
        # 0.5 ms: highest VALID Server QPS with the null backend 75k -> 90k+ (measured). The last
        # coordinator to stop restores the process's own value.
        _switch_interval(+1)
        self._switch_held = True
        self._driver = threading.Thread(target=self._drive, name="distbert-driver", daemon=True)
        self._driver.start()
        deadline = self.cfg.ready_timeout_s
        if not self._all_ready.wait(timeout=deadline):
            if self.failure:
                raise RunFailed(self.failure)
            missing = sorted(w for w in self.expected if not self.workers.get(w, WorkerHandle(w)).ready)
            raise RunFailed(f"workers {missing} not ready within {deadline:.0f} s (model load and warm-up "
                            "too slow? raise --ready-timeout; unreachable? check --bind-host)")
        if self.failure:
            raise RunFailed(self.failure)
        warm = getattr(self.transport, "warm_caller", None)
        if warm is not None:   # an in-process worker: LoadGen issues on this thread, the direct path runs here
            warm()

    def _policy(self) -> BatchPolicy:
        ready = [h for h in self.workers.values() if h.ready]
        known = [h.info["token_budget"] for h in ready if h.info.get("token_budget")]
        hinted_budget = min(known) if known else None
        budget = self.cfg.batch.token_budget if self.cfg.batch.token_budget is not None else hinted_budget
        largest = max(h.max_batch for h in ready)
        max_batch = self.cfg.batch.max_batch or largest
        ladder = run_ladder(self.cfg, largest, hinted_budget)
        ours = ladder_json(ladder)
        for h in ready:   # the same spec on every worker gives the same ladder; a calibrated one may differ
            theirs = h.info.get("shape_ladder")
            if theirs is not None and theirs != ours:
                log.warning("worker %d pads to the shape ladder %s, rank 0 plans with %s (--calibrate gave "
                            "it another batching?): its batches run at its own shapes", h.worker, theirs, ours)
        return BatchPolicy(max_batch=max_batch, token_budget=budget,
                           max_wait_s=self.cfg.batch.max_wait_ms / 1000.0, credits=self.cfg.batch.credits,
                           batch_timeout_s=self.cfg.batch.batch_timeout_s, ladder=ladder)

    # --- LoadGen callbacks: enqueue only --------------------------------------------------------

    def issue(self, ids: list[int] | np.ndarray, indices: list[int] | np.ndarray) -> None:
        """LoadGen issued samples: lists from the Python binding, arrays (uint64 ids, int64
        indices) from the native SUT for big queries (``engine/lgnative.NativeSUT``)."""
        if trace.ON:
            trace.mark("issue", int(ids[0]))
        if self._direct is not None and len(ids) == 1 and self._lock.acquire(blocking=False):
            try:
                if (self.dispatcher is not None and self.failure is None and not self._dead and not self._inbox
                        and not self._shutting_down):
                    self._direct_or_fail(ids, indices)
                    return
            finally:
                self._lock.release()
        self._inbox.append((ids, indices))
        # From here the samples are ours: nothing below may raise into LoadGen (a native SUT could
        # not tell whether they were taken; see engine/lgnative.NativeSUT).
        try:
            if self._dead:
                self._complete_dead()
                return
            # Wake the driver only when it may be blocked: it sets _sleeping *before* its last look
            # at the inbox, so an append that sees False here is always seen by that look (GIL ordering).
            if self._sleeping:
                self.transport.wake()
        except Exception as exc:   # the driver still drains the inbox at its next heartbeat tick
            log.exception("issue callback")
            self._fail(f"rank 0 could not hand LoadGen's samples to its driver: {type(exc).__name__}: {exc}")

    def _direct_or_fail(self, ids: list[int] | np.ndarray, indices: list[int] | np.ndarray) -> None:
        """The direct path under the native callback's rule (``engine/lgnative``): no exception reaches
        LoadGen's thread. A failure fails the run with one line and completes the sample (empty) if the
        dispatcher never took it, and everything the dispatcher still holds; if it struck while
        completing, nobody knows whether LoadGen has the sample, and the process stops (exit 70)."""
        dispatcher = self.dispatcher
        assert dispatcher is not None
        issued = dispatcher.samples_issued
        self._direct_completing = False
        try:
            self._issue_direct(ids, indices)
        except BaseException as exc:
            from distbert.engine.lgnative import _stop_process

            log.exception("direct path")
            text = f"rank 0's in-process worker path failed: {type(exc).__name__}: {exc}"
            if self._direct_completing:
                _stop_process(text + " (while completing a sample)")
            self._fail(text)
            try:
                if dispatcher.samples_issued == issued:   # not taken: complete it here
                    self._complete(np.asarray(ids, np.uint64), None)
                self._abort_outstanding()
            except BaseException as again:
                _stop_process(f"{text}; then completing its query failed: {type(again).__name__}: {again}")

    def _issue_direct(self, ids: list[int] | np.ndarray, indices: list[int] | np.ndarray) -> None:
        """The driver is idle: dispatch, compute and complete this sample here, on LoadGen's thread
        (the hand-off to the driver was half of an in-process SingleStream query's added latency)."""
        assert self.dispatcher is not None and self._direct is not None
        if trace.ON:
            trace.mark("drain", ids[0])
        todo = collections.deque(self.dispatcher.on_samples(np.asarray(ids, np.uint64),
                                                            np.asarray(indices, np.int64), time.monotonic()))
        while todo:
            ins = todo.popleft()
            if not isinstance(ins, SendBatch):
                self._execute([ins])
                continue
            if trace.ON:
                trace.mark("send", ins.batch_id, int(ins.ids[0]))
            res = self._direct(m.Batch(batch_id=ins.batch_id, want_logits=ins.want_logits, ids=ins.ids,
                                       indices=ins.indices))
            if not isinstance(res, m.Result) or self._invalid(ins.worker, res) is not None:
                self._on_message(ins.worker, res)   # a Failure or a bad result: the usual handling
                continue
            if trace.ON:
                trace.mark("recv", res.batch_id)
            now = time.monotonic()
            self.workers[ins.worker].last_seen = now
            for nxt in self.dispatcher.on_result(ins.worker, res.batch_id, now):
                if isinstance(nxt, SendBatch):
                    todo.append(nxt)
                else:
                    self._direct_completing = isinstance(nxt, Complete)
                    self._execute([nxt], result=res)
                    self._direct_completing = False

    def flush(self) -> None:
        if self._dead:
            return
        self._inbox.append(_FLUSH)
        self.transport.wake()

    # --- one LoadGen test -----------------------------------------------------------------------

    def begin_test(self, scenario: str, want_logits: bool) -> None:
        """Fresh dispatcher for a test; the driver picks it up through the inbox."""
        ready = [h for h in self.workers.values() if h.ready and not h.lost]
        if not ready:
            if not any(h.ready for h in self.workers.values()):   # none ever was: nothing to plan batches by
                raise RunFailed("no worker is ready")
            if not self.cfg.rejoin_timeout_s and not self._restart_pending():
                raise RunFailed("no worker is ready (--rejoin-timeout 0: the run does not wait for one)")
            log.warning("no worker is connected: the test starts and waits up to %g s (--rejoin-timeout) for one",
                        self.cfg.rejoin_timeout_s)
        policy = dataclasses.replace(self._policy(), **hedge_policy(self.cfg.batch, scenario))
        dispatcher = Dispatcher(scenario, policy, self.lengths, want_logits)
        if self._completer is None:
            self._completer = Completer()
            log.info("completing samples through %s", self._completer.why if self._completer.path == "native"
                     else f"LoadGen's Python binding ({self._completer.why})")
        done = threading.Event()
        self._inbox.append(_Begin(dispatcher, done))
        self.transport.wake()
        while not done.wait(timeout=0.5):
            if self._dead:
                raise RunFailed(self.failure or "rank 0 driver died")

    # --- shutdown -------------------------------------------------------------------------------

    def stop(self, reason: str = "run complete", deadline_s: float = 10.0) -> None:
        """Tell workers to stop, wait for their Bye (bounded), stop our threads. Safe to call twice."""
        if self._driver is None or self._stop.is_set():
            return
        if self._dead:  # nobody reads the inbox; the parked driver no longer touches the transport
            self._tell_workers_to_stop(reason)
        self._inbox.append(_Shutdown(reason))
        self.transport.wake()
        self._all_bye.wait(timeout=deadline_s)
        try:
            self._stop.set()
            self.transport.wake()
            self._driver.join(timeout=deadline_s)
        finally:
            if self._switch_held:
                self._switch_held = False
                _switch_interval(-1)

    # --- the driver loop ------------------------------------------------------------------------

    def _drive(self) -> None:
        self._lock.acquire()   # held while awake; released around every wait (see _drive_loop)
        try:
            self._drive_loop()
        except Exception as exc:  # a bug here must not hang LoadGen: record and abort
            log.exception("driver crashed")
            self._fail(f"rank 0 driver crashed: {type(exc).__name__}: {exc}")
            # From here LoadGen's callbacks complete their samples themselves; what is in the inbox
            # and in flight is completed now, so every outstanding query ends and the test returns.
            self._dead = True
            self._complete_dead()
            self._abort_outstanding()
            self._all_ready.set()
            self._all_bye.set()
            self._lock.release()
            # Stay alive until stop(): LoadGen keeps a logger per thread that called it, and a thread
            # that completes samples and then exits while the test still runs crashes LoadGen
            # (SIGSEGV, seen with 10833 samples completed at once from a thread that then ended).
            self._stop.wait()
        else:
            self._lock.release()

    def _complete_dead(self) -> None:
        """Complete every queued sample without data (fresh response objects: this may run on a
        LoadGen thread and on the dying driver at once, so the recycled pool is not used)."""
        import mlperf_loadgen as lg

        while self._inbox:
            try:
                item = self._inbox.popleft()
            except IndexError:  # the other thread took the last one
                return
            if isinstance(item, tuple):
                ids = item[0] if isinstance(item[0], list) else item[0].tolist()
                lg.QuerySamplesComplete([lg.QuerySampleResponse(i, 0, 0) for i in ids])

    def _drive_loop(self) -> None:
        cfg = self.cfg
        next_beat = time.monotonic() + cfg.heartbeat_s
        transport = self.transport
        while not self._stop.is_set():
            now = time.monotonic()
            timeout = next_beat - now
            if self.dispatcher is not None:
                deadline = self.dispatcher.next_deadline()
                if deadline is not None:
                    timeout = min(timeout, deadline - now)
            self._sleeping = True
            if self._inbox:
                timeout = 0.0
            self._lock.release()   # asleep: the direct path may run (issue())
            try:
                got = transport.recv(timeout=max(timeout, 0.0))
            finally:
                self._lock.acquire()
            self._sleeping = False
            # handle everything that is already there before looking at timers (batching)
            n = 0
            while got is not None:
                self._on_message(*got)
                n += 1
                if n >= 256:
                    break
                got = transport.recv(timeout=0)
            self._drain_inbox()
            now = time.monotonic()
            if self.dispatcher is not None:
                deadline = self.dispatcher.next_deadline()
                if deadline is not None and deadline <= now:
                    self._execute(self.dispatcher.on_tick(now))
            if now >= next_beat:
                next_beat = now + cfg.heartbeat_s
                self._beat(now)
                self._progress(now)

    def _beat(self, now: float) -> None:
        for handle in self.workers.values():
            if handle.lost or handle.stats is not None:
                continue
            alive = self.is_alive(handle.worker) if self.is_alive else True
            # Before Ready a worker is loading its model and cannot beat (a torch import plus a
            # BERT-Large load takes ~15 s on a CPU): start-up is bounded by --ready-timeout instead.
            silent = handle.ready and now - handle.last_seen > self.cfg.heartbeat_timeout_s
            if not alive or silent:
                why = "process exited" if not alive else f"silent for {now - handle.last_seen:.1f} s"
                self._lose(handle, why)
                continue
            try:
                self.transport.send(handle.worker, m.Heartbeat(rank=0, sent_at=time.time()))
            except KeyError:
                pass
        if not self._all_ready.is_set() and self.is_alive:
            for w in self.expected:
                if w not in self.workers and not self.is_alive(w):
                    self._fail(f"worker {w} exited before saying hello (see its log above)")
                    self._all_ready.set()
        self._check_parent()
        self._check_rejoin(now)

    def _check_parent(self) -> None:
        """The watchdog: a run started by another process (``distbert submission run``) ends when that
        process is gone, and tells its workers that rank 0 is gone (they exit 3, not 0)."""
        if self.parent_pid is None or os.getppid() == self.parent_pid or self.failure is not None:
            return
        self._tell_workers_to_stop(ORCHESTRATOR_GONE)
        self._fail(f"the process that started this run (pid {self.parent_pid}) is gone: the run stops")
        self._abort_outstanding()
        self._all_ready.set()

    def _live_workers(self) -> int:
        return sum(1 for h in self.workers.values() if h.ready and not h.lost)

    def _restart_pending(self) -> bool:
        return any(h.restart_since is not None for h in self.workers.values())

    def _check_rejoin(self, now: float) -> None:
        """No worker left while samples wait: say so every REJOIN_LOG_S, fail after --rejoin-timeout (a
        pending restart: after --ready-timeout from its Hello, the time a start-up may take)."""
        since, d = self._no_worker_since, self.dispatcher
        if since is not None and self._live_workers():
            self._no_worker_since = since = None
        if since is None or d is None or self.failure is not None or self._shutting_down:
            return
        pending = d.samples_issued - d.samples_completed
        if not pending:
            return   # nothing waits; the clock keeps running from the loss
        if self._none_can_return():
            self._fail(f"every worker is lost and none can come back: the local worker processes exited (see "
                       f"their errors above); {pending} samples cannot be processed (--rejoin-timeout waits only "
                       f"where a worker can rejoin: --listen, external or launched workers)")
            self._abort_outstanding()
            return
        deadline = since + self.cfg.rejoin_timeout_s
        for h in self.workers.values():
            if h.restart_since is not None:
                deadline = max(deadline, h.restart_since + self.cfg.ready_timeout_s)
        if now >= deadline:
            self._fail(f"every worker is lost and none came back within {self.cfg.rejoin_timeout_s:g} s "
                       f"(--rejoin-timeout); {pending} samples cannot be processed")
            self._abort_outstanding()
        elif now - self._rejoin_logged >= REJOIN_LOG_S:
            self._rejoin_logged = now
            log.warning("no worker for %.0f s: %d samples pending; waiting %.0f s more for a worker to join or "
                        "return (--rejoin-timeout %g s)%s", now - since, pending, deadline - now,
                        self.cfg.rejoin_timeout_s, ": a restart is loading" if self._restart_pending() else "")

    def _none_can_return(self) -> bool:
        """No worker can join (``joinable`` False) and every worker of this run is a local process
        that has exited, with no restart pending."""
        if self.joinable or self.is_alive is None or self._restart_pending():
            return False
        return all(not self.is_alive(w) for w in self.expected | set(self.workers))

    def _workers_gone(self, now: float) -> None:
        """The last live worker is gone: the clock of --rejoin-timeout starts (if not running)."""
        if self._no_worker_since is None and not self._live_workers():
            self._no_worker_since = self._rejoin_logged = now

    def _worker_back(self, handle: WorkerHandle, now: float) -> None:
        if self._no_worker_since is not None:
            d = self.dispatcher
            pending = d.samples_issued - d.samples_completed if d is not None else 0
            log.warning("worker %d is back after %.1f s without a worker: %d samples pending go to it", handle.worker,
                        now - self._no_worker_since, pending)
            self._no_worker_since = None

    def _progress(self, now: float) -> None:
        """Every PROGRESS_S during a test, one log line: long runs (600 s, CPU models) show life."""
        d = self.dispatcher
        if d is None:
            return
        done, issued = d.samples_completed, d.samples_issued
        last_t, last_done = self._progress_mark
        if last_t == 0.0 or done < last_done:
            self._progress_mark = (now, done)
            return
        if now - last_t >= PROGRESS_S and issued > done:
            log.info("progress: %d of %d issued samples completed, %.1f samples/s over the last %.0f s, "
                     "%d batches in flight", done, issued, (done - last_done) / (now - last_t), now - last_t,
                     d.in_flight())
            self._progress_mark = (now, done)

    def _lose(self, handle: WorkerHandle, why: str) -> None:
        if handle.lost:
            return
        handle.lost = True
        if self._shutting_down:
            self._check_all_bye()
            return
        log.warning("lost worker %d on %s: %s; requeueing its batches", handle.worker, handle.host, why)
        if not handle.ready and not self._all_ready.is_set() and handle.worker in self.expected:
            # an expected (launched) worker cannot be done without; an external one that never became
            # ready (a stranger's bad Ready, a restart gone wrong) is just not used
            self._fail(f"worker {handle.worker} on {handle.host} lost during start-up: {why}")
            self._all_ready.set()
        now = time.monotonic()
        if handle.ready:
            self._workers_gone(now)
        if self.dispatcher is not None and handle.ready:
            self._execute(self.dispatcher.remove_worker(handle.worker, now))

    def _peer_gone(self, worker: int, gone: PeerGone) -> None:
        """The transport saw a connection of ``worker`` close."""
        handle = self.workers.get(worker)
        if handle is None or handle.stats is not None:   # (after its Bye: a clean exit)
            return
        if gone.pending:
            if handle.restart_since is not None:
                handle.restart_since = None
                log.warning("the restart of worker %d closed its connection before its Ready (%s)", worker, gone.why)
            return
        alive = self.is_alive(worker) if self.is_alive else True
        self._lose(handle, gone.why if alive else f"{gone.why} (its process exited)")

    def _on_message(self, worker: int, msg: m.Message | PeerGone) -> None:
        if isinstance(msg, PeerGone):
            self._peer_gone(worker, msg)
            return
        now = time.monotonic()
        handle = self.workers.get(worker)
        if handle is not None:
            # A faulty worker's connection was forgotten by the transport: only a new Hello gets here.
            if handle.faulty and not isinstance(msg, m.Hello):
                return
            handle.last_seen = now
        problem = self._invalid(worker, msg)
        if problem is not None:
            self._faulty(worker, handle, problem)
            return
        if handle is not None and handle.lost and handle.ready and not handle.faulty \
                and isinstance(msg, (m.Heartbeat, m.Result)):
            self._readmit(handle, now)  # its link came back
        if isinstance(msg, m.Result):
            if trace.ON:
                trace.mark("recv", msg.batch_id, worker)   # aux: who sent it (bench/chaos.py)
            if self.dispatcher is None:
                return
            if self._began is not None:
                log.info("first result of the test: worker %d, %.3f s after the test began", worker, now - self._began)
                self._began = None
            self._execute(self.dispatcher.on_result(worker, msg.batch_id, now), result=msg)
        elif isinstance(msg, m.Heartbeat):
            pass
        elif isinstance(msg, m.Hello):
            if self._shutting_down:   # after the last test: nothing to set up, and nothing to wait for
                log.warning("hello from worker %d (%s, pid %d) after the run's last test: told to stop", worker,
                            msg.host, msg.pid)
                self.transport.send(worker, m.Shutdown(reason="the run is over"))
                return
            if handle is None:
                handle = self.workers[worker] = WorkerHandle(worker, host=msg.host, pid=msg.pid, last_seen=now)
                log.info("hello from worker %d (%s, pid %d)", worker, msg.host, msg.pid)
            else:  # a restart: its old connection (if any) keeps its work until this one is Ready
                if handle.faulty:  # its connection was forgotten: this Hello is a new connection's,
                    handle.faulty = handle.ready = False  # which gets work only after its own Ready
                handle.restart_since = now
                log.warning("hello again from worker %d (%s, pid %d, was pid %d): a restart, awaiting its Ready",
                            worker, msg.host, msg.pid, handle.pid)
            self.transport.send(worker, m.Setup(config_json=self.cfg.to_json()))
        elif isinstance(msg, m.Ready):
            if handle is None:
                handle = self.workers[worker] = WorkerHandle(worker, host=msg.host, last_seen=now)
            if self._shutting_down:   # it said Hello before the last test ended: nothing to do now
                log.warning("worker %d ready after the run's last test: told to stop", worker)
                self.transport.send(worker, m.Shutdown(reason="the run is over"))
                handle.restart_since = None
                handle.lost = True   # not waited for
                self._check_all_bye()
                return
            # a restarted worker's Ready while its old connection still counts: the old one's batches are
            # requeued and the new one takes over, with no moment without a worker (dispatcher.replace_worker)
            replacing = handle.ready and not handle.lost and self.dispatcher is not None
            restart = handle.ready
            handle.restart_since = None
            handle.ready, handle.device, handle.backend = True, msg.device, msg.backend
            handle.lost = handle.faulty = False
            handle.stats = None
            handle.host = msg.host
            handle.max_batch = msg.max_batch
            handle.info = _json_object(msg.info_json) or {}
            if type(handle.info.get("pid")) is int:
                handle.pid = handle.info["pid"]
            log.info("worker %d %s: %s on %s, %s", worker, "ready again" if restart else "ready", msg.backend,
                     msg.host, msg.device)
            self._worker_back(handle, now)
            if replacing:
                assert self.dispatcher is not None
                self._execute(self.dispatcher.replace_worker(worker, now, msg.max_batch))
            elif self.dispatcher is not None:  # a late joiner or a restart during a test
                self._execute(self.dispatcher.add_worker(worker, now, msg.max_batch))
            ready = {w for w, h in self.workers.items() if h.ready}
            if self.expected <= ready and len(ready - self.expected) >= self.external_workers:
                self._all_ready.set()
        elif isinstance(msg, m.Failure):
            where = f"worker {msg.rank} on {msg.host}"
            batch = f" in batch {msg.batch_id}" if msg.batch_id >= 0 else ""
            self._fail(f"{where} failed{batch}: {msg.exc_type}: {msg.text}")
            log.error("%s traceback:\n%s", where, msg.traceback)
            if not self._all_ready.is_set():
                self._all_ready.set()
            self._abort_outstanding()
        elif isinstance(msg, m.Bye):
            if handle is None:
                handle = self.workers[worker] = WorkerHandle(worker)
            handle.stats = _json_object(msg.stats_json) or {}
            if self._shutting_down:
                handle.lost = False   # a clean exit, even where its connection's close was seen first
            self._check_all_bye()

    def _invalid(self, worker: int, msg: m.Message) -> str | None:
        """Why ``msg`` breaks the protocol, or None. Checked before anything acts on it, so a bad
        message is that worker's fault and never an exception in the driver (DESIGN: trust)."""
        if isinstance(msg, m.Result):
            expected = self.dispatcher.expected_ids(worker, msg.batch_id) if self.dispatcher else None
            if expected is None:
                return None  # a duplicate or unknown batch: the dispatcher drops it
            if not np.array_equal(msg.ids, expected):
                return (f"Result of batch {msg.batch_id} carries {len(msg.ids)} ids that are not the "
                        f"batch's {len(expected)}")
            shape = msg.logits.shape
            if msg.logits.size and not (len(shape) == 3 and shape[0] == len(expected) and 1 <= shape[1] <= MAX_SEQ
                                        and shape[2] == 2):
                return f"Result of batch {msg.batch_id} has logits of shape {shape} for {len(expected)} samples"
            if self.dispatcher is not None and self.dispatcher.want_logits and not msg.logits.size:
                return f"Result of batch {msg.batch_id} has no logits, and this test needs them"
        elif isinstance(msg, m.Ready):
            if not 1 <= msg.max_batch <= MAX_BATCH:
                return f"Ready with max_batch {msg.max_batch} (allowed 1..{MAX_BATCH})"
            info = _json_object(msg.info_json) if msg.info_json else {}
            if info is None:
                return "Ready whose info is not a JSON object"
            budget = info.get("token_budget")
            if budget is not None and (type(budget) is not int or not MAX_SEQ <= budget <= MAX_BATCH * MAX_SEQ):
                return f"Ready with token_budget {budget!r} (allowed: null or {MAX_SEQ}..{MAX_BATCH * MAX_SEQ})"
        elif isinstance(msg, m.Bye):
            if msg.stats_json and _json_object(msg.stats_json) is None:
                return "Bye whose stats are not a JSON object"
        return None

    def _faulty(self, worker: int, handle: WorkerHandle | None, problem: str) -> None:
        """Drop a worker that broke the protocol: its batches are requeued, it is told to stop."""
        if handle is None:
            handle = self.workers[worker] = WorkerHandle(worker)
        handle.faulty = True
        log.error("worker %d on %s broke the protocol (%s): dropping it", worker, handle.host, problem)
        self._lose(handle, f"protocol error: {problem}")
        try:
            self.transport.send(worker, m.Shutdown(reason=f"protocol error: {problem}"))
        except KeyError:
            pass
        self.transport.forget(worker)  # nothing more from that connection; a new Hello may rejoin

    def _readmit(self, handle: WorkerHandle, now: float) -> None:
        """A worker declared lost is heard from again on the same connection (its link recovered):
        it gets work again. What it had in flight was requeued at the loss; late results for those
        batches are dropped by the dispatcher (their ids were retired)."""
        handle.lost = False
        log.warning("worker %d on %s is heard from again: it gets work again (its batches were requeued "
                    "when it was lost)", handle.worker, handle.host)
        self._worker_back(handle, now)
        if self.dispatcher is not None and not self._shutting_down:
            self._execute(self.dispatcher.add_worker(handle.worker, now, handle.max_batch))

    def _check_all_bye(self) -> None:
        if self._shutting_down and all(h.stats is not None or h.lost for h in self.workers.values()):
            self._all_bye.set()

    def _drain_inbox(self) -> None:
        now = time.monotonic()
        # Samples issued since the last look go to the dispatcher in one call: under Server load
        # many one-sample callbacks pile up while the driver works, and one call per pile (not per
        # sample) is what keeps rank 0 from becoming the bottleneck.
        ids: list[int] = []
        indices: list[int] = []
        pieces: list[tuple[Any, Any]] = []   # in order, once an array (native SUT, big query) came
        while self._inbox:
            item = self._inbox.popleft()
            if isinstance(item, tuple):
                if trace.ON:
                    trace.mark("drain", int(item[0][0]))
                if not pieces and isinstance(item[0], list):
                    ids += item[0]
                    indices += item[1]
                else:
                    if not pieces and ids:
                        pieces.append((ids, indices))
                    pieces.append(item)
                continue
            self._on_samples(*_joined(ids, indices, pieces), now)  # samples before a control item go first
            ids, indices, pieces = [], [], []
            self._on_control(item, now)
        self._on_samples(*_joined(ids, indices, pieces), now)

    def _on_control(self, item: _Control, now: float) -> None:
        if isinstance(item, _Flush):
            if self.dispatcher is not None and self.failure is None:
                self._execute(self.dispatcher.on_flush(now))
        elif isinstance(item, _Begin):
            if self.dispatcher is not None:   # a late result of the last test (a hedged copy) stays a duplicate
                item.dispatcher.continue_ids(self.dispatcher)
            self.dispatcher = item.dispatcher
            for handle in sorted(self.workers.values(), key=lambda h: h.worker):
                if handle.ready and not handle.lost:
                    self._execute(item.dispatcher.add_worker(handle.worker, now, handle.max_batch))
            self._workers_gone(now)   # none at the start of a test: the wait for one is bounded too
            self._began = now
            item.done.set()
        elif isinstance(item, _Shutdown):
            self._shutting_down = True
            self._tell_workers_to_stop(item.reason)
            self._check_all_bye()

    def _tell_workers_to_stop(self, reason: str) -> None:
        for handle in self.workers.values():
            if not handle.lost:
                try:
                    self.transport.send(handle.worker, m.Shutdown(reason=reason))
                except KeyError:
                    pass

    def _on_samples(self, ids: list[int] | np.ndarray, indices: list[int] | np.ndarray, now: float) -> None:
        if not len(ids):
            return
        if self.failure is not None or self.dispatcher is None:
            self._complete(np.asarray(ids, np.uint64), None)
            return
        self._execute(self.dispatcher.on_samples(np.asarray(ids, np.uint64), np.asarray(indices, np.int64), now))

    def _execute(self, instructions: list[Any], result: m.Result | None = None) -> None:
        """Carry out dispatcher instructions; ``result`` is the message behind a ``Complete``."""
        for ins in instructions:
            if isinstance(ins, SendBatch):
                if self.workers[ins.worker].lost:
                    # lost earlier in this same list: the dispatcher already requeued this work
                    continue
                try:
                    self.transport.send(ins.worker, m.Batch(batch_id=ins.batch_id, want_logits=ins.want_logits,
                                                            ids=ins.ids, indices=ins.indices))
                except KeyError:
                    self._lose(self.workers[ins.worker], "transport does not know it")
                if trace.ON:
                    trace.mark("send", ins.batch_id, int(ins.ids[0]))
            elif isinstance(ins, Complete):
                # the result's ids and logits were checked against the batch in _invalid
                # a result without logits (performance mode) carries a (B, 0, 2) array
                self._complete(ins.ids, result.logits if result is not None else None)
                if trace.ON:
                    trace.mark("complete", ins.batch_id, len(ins.ids))   # aux: its samples
            elif isinstance(ins, Requeued):
                log.warning("batch %d on worker %d has had no result for %.1f s: requeued (a message lost "
                            "on a reconnect?); a late result will be dropped", ins.batch_id, ins.worker, ins.waited_s)
            elif isinstance(ins, Hedged):
                log.info("batch %d on worker %d overdue after %.0f ms: hedged as batch %d on worker %d (the first "
                         "result wins)", ins.of_batch_id, ins.of_worker, ins.waited_s * 1000, ins.batch_id, ins.worker)
            elif isinstance(ins, Retired):
                log.warning("batch %d on worker %d has had no result for %.1f s: retired (its hedged copy answers "
                            "it); a late result will be dropped", ins.batch_id, ins.worker, ins.waited_s)
            elif isinstance(ins, NoWorkers):
                self._no_workers(ins.pending)

    def _no_workers(self, pending: int) -> None:
        """Work is pending and no worker is left: fail at once under --rejoin-timeout 0 (unless a
        restart is pending), else wait for one (``_check_rejoin`` bounds the wait)."""
        restarting = [h.worker for h in self.workers.values() if h.restart_since is not None]
        if not self.cfg.rejoin_timeout_s and not restarting:
            self._fail(f"every worker is lost; {pending} samples cannot be processed (--rejoin-timeout 0: "
                       "the run does not wait for a worker to come back)")
            self._abort_outstanding()
            return
        self._workers_gone(time.monotonic())
        if restarting:
            log.warning("no worker is working; %d samples wait for the restart of worker(s) %s (Hello seen, "
                        "awaiting Ready)", pending, restarting)
        else:
            log.warning("every worker is lost; %d samples wait for a worker to join or return (up to %g s, "
                        "--rejoin-timeout)", pending, self.cfg.rejoin_timeout_s)

    def _fail(self, text: str) -> None:
        if self.failure is None:  # the first failure is the one reported (STYLE §8)
            self.failure = text
            log.error("%s", text)

    def _abort_outstanding(self) -> None:
        """After a failure LoadGen still needs every id completed to return: complete them empty."""
        if self.dispatcher is None:
            return
        ids = self.dispatcher.abort()
        if len(ids):
            self._complete(np.asarray(ids, np.uint64), None)

    # --- completion (inline on the driver thread) --------------------------------------------------

    @property
    def completion_path(self) -> str | None:
        """"native" or "python" once a test has begun (``engine/completion.Completer``)."""
        return self._completer.path if self._completer is not None else None

    def _complete(self, ids: np.ndarray, logits: np.ndarray | None) -> None:
        # Inline on the driver thread. DESIGN.md had a separate completion thread; measured here it
        # cost throughput and latency (null backend, 4 workers, 2 cores: 85k QPS p99 46-66 ms with
        # the thread, 12-17 ms inline; 105k QPS INVALID with it, VALID inline), because every
        # hand-off is a GIL switch on a CPU-starved rank 0. QuerySamplesComplete releases the GIL
        # and is wait-free in LoadGen, so calling it from the loop blocks nothing.
        assert self._completer is not None
        self._completer.complete(ids, logits)
