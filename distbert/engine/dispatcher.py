"""The coordinator's brain: a pure scheduling state machine (STYLE §3).

Events go in (a worker joined or was lost, LoadGen issued samples or flushed, a worker returned a
batch, a timer fired) and each returns the list of instructions the driver must execute, **in
order**: :class:`SendBatch`, :class:`Complete`, :class:`NoWorkers`. Nothing here touches a socket,
a thread, a clock or LoadGen; time is passed in as ``now`` (a Python float in seconds, any monotonic
origin, e.g. ``time.monotonic()``; numpy scalars work but slow every call down), so the tests drive it
with an injected clock. Design notes and measurements: ``notes/dispatcher.md``.

Scheduling (DESIGN.md "Scheduling"):

* **Offline** -- each ``on_samples`` call is sorted by real length, longest first (stable, so equal
  lengths keep issue order), and cut into batches of at most ``cap`` rows and, with a token budget,
  at most ``token_budget`` padded tokens (rows x longest row; the longest row of a batch is its
  first). A single sample longer than the budget goes out alone. ``cap`` is
  ``min(policy.max_batch, largest max_batch among live workers)``. With a shape ladder
  (``policy.ladder``, ``backends/shapes``) a batch takes the largest ladder row count whose rows x
  *ladder* length (of its longest row) fit the budget and the cap, so full batches need no row
  padding and the whole set runs in about one shape per ladder length.
* **Server** -- samples accumulate in one *open* batch. It leaves (a) at once when it is full
  (``cap`` rows); (b) at once when some worker has **nothing in flight** (work-conserving: an idle
  worker is never kept waiting for a batch to fill, which is what keeps latency low at low load);
  (c) when its oldest sample has waited ``max_wait_s`` and a worker has a free credit. So batching
  only happens while every worker is busy, and ``max_wait_s`` is an upper bound on the wait for a
  free credit to be *used*, not a fixed delay. When the wait has passed but no worker has a free
  credit, the open batch is not cut: it keeps growing (up to ``cap``) and leaves the moment a
  credit frees, as one larger batch. Full batches that find no free credit wait in a FIFO queue.
  With a shape ladder, a closed batch with more rows than the ladder allows at its ladder length
  (the budget, the largest rung) is cut, in arrival order, into pieces that fit, so every batch is a
  shape the worker warmed.
* **SingleStream** -- every sample is its own batch, sent at once to the least-loaded worker.

Choosing a worker (all scenarios): pull-based credits. A worker holds at most ``policy.credits``
batches in flight; a batch goes to the worker with the fewest in flight (= most free credits), ties
rotating round-robin from the worker after the last one picked. A result frees a credit, which the
queue refills at once, so faster workers are fed more. A batch larger than the chosen worker's own
``max_batch`` is split: the head goes, the tail goes back to the front of the queue.

Exactly once (STYLE §2): every sample is in exactly one place -- the open batch, the queue, or one
in-flight batch. Batch ids are allocated at *send* time from a counter and never reused. When a
worker is lost, its in-flight batches go back to the front of the queue (oldest first) and their ids
are **retired**; when re-sent they get new ids. A result for a retired id (a late reply from a lost
worker, or a second reply) is therefore a duplicate and is dropped, as are results for ids never
sent and results from a worker other than the one the batch was sent to. Response ids are opaque:
the dispatcher never keys on them (LoadGen does not promise they are unique across a whole run).

Shapes (``stats()["batch_shapes"]``, ``["padding_fraction"]``): every completed batch counts as the
shape the worker runs it at, ``(ladder.rows_for(rows), ladder.length_for(longest row))`` (exact
trimming: its rows x longest row); padded tokens are that shape's tokens less the rows' real lengths.
The counting is folded in bulk (numpy), off the per-result path.

Lost batches (a message ZeroMQ dropped while a worker reconnected: the worker stays alive, so no
loss event comes): a batch in flight longer than ``max(policy.batch_timeout_s, 10 x the slowest
batch completed so far)`` is retired and requeued like a lost worker's, and its worker's credit is
freed. A late result for it is a duplicate. ``batch_timeout_s = 0`` turns this off.

Hedges (``policy.hedge``; "The Tail at Scale"): a stopped process or a cut link holds its batches
until the heartbeat declares it lost (seconds). So a worker whose oldest batch has been at the head
of its queue longer than its margin (``engine/hedge.BatchTimes``: ``hedge_factor`` x the p90 of its
recent times for that batch size, plus ``hedge_floor_s``) is *overdue*, and each of its batches is
copied (``Hedged``, then ``SendBatch`` with a new id) to the least-loaded other worker with a free
credit that is not overdue itself, once the queue is empty (queued work goes first), before the
open Server batch. Both ids map to the same samples; the first result completes them, and the other
copy stays on its worker (holding its credit: that worker is still busy with it) until its late
result, which is dropped (``stats["hedges"]["late_results_dropped"]``), or its loss or timeout
(``Retired``). A batch is hedged at most once, and hedged samples stay within ``hedge_budget`` x the
samples issued so far. Loss: a lost or timed-out copy whose twin is in flight is forgotten, not
requeued; only when the last copy goes are the samples requeued, once; ``abort`` returns a pair's
ids once. ``stats["hedges"]``: sent, won (the copy answered first), wasted (the original did),
samples, late_results_dropped, copies_retired. Which scenarios hedge in a run: ``engine/hedge.hedging``.
"""

from __future__ import annotations

import collections
import heapq
from dataclasses import dataclass
from typing import Any

import numpy as np

from distbert.backends.shapes import EXACT, ShapeLadder, shape_summary
from distbert.config import SCENARIOS
from distbert.engine.hedge import BatchTimes


@dataclass(frozen=True)
class BatchPolicy:
    max_batch: int = 64              # max samples per batch
    token_budget: int | None = None  # Offline: max (rows x longest real length); None = by max_batch only
    max_wait_s: float = 0.002        # Server: upper bound on how long the oldest open sample waits for a free credit
    credits: int = 2                 # max batches in flight per worker
    batch_timeout_s: float = 0.0     # floor of the lost-batch timeout (10 x slowest batch seen); 0 = off
    ladder: ShapeLadder = EXACT      # the batch shapes workers pad to (backends/shapes); EXACT = trimming only
    # Hedged re-sends (module docstring, "Hedges"; engine/hedge): off here; a run decides (hedge.hedging)
    hedge: bool = False
    hedge_factor: float = 2.0        # overdue: at the head of its worker longer than factor x p90 of its recent times
    hedge_floor_s: float = 0.05      # ... plus this
    hedge_budget: float = 0.05       # hedged samples <= this fraction of the samples issued so far

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"BatchPolicy.max_batch must be >= 1, got {self.max_batch}")
        if self.token_budget is not None and self.token_budget < 1:
            raise ValueError(f"BatchPolicy.token_budget must be >= 1 or None, got {self.token_budget}")
        if not self.max_wait_s >= 0.0:
            raise ValueError(f"BatchPolicy.max_wait_s must be >= 0, got {self.max_wait_s}")
        if self.credits < 1:
            raise ValueError(f"BatchPolicy.credits must be >= 1, got {self.credits}")
        if not self.batch_timeout_s >= 0.0:
            raise ValueError(f"BatchPolicy.batch_timeout_s must be >= 0, got {self.batch_timeout_s}")
        if not self.hedge_factor >= 1.0:
            raise ValueError(f"BatchPolicy.hedge_factor must be >= 1, got {self.hedge_factor}")
        if not self.hedge_floor_s >= 0.0:
            raise ValueError(f"BatchPolicy.hedge_floor_s must be >= 0, got {self.hedge_floor_s}")
        if not 0.0 <= self.hedge_budget <= 1.0:
            raise ValueError(f"BatchPolicy.hedge_budget must be in [0, 1], got {self.hedge_budget}")


# ---------------------------------------------------------------------------------------------
# Instructions


@dataclass(frozen=True, slots=True)
class SendBatch:
    """Send these samples to ``worker`` as batch ``batch_id``. Arrays are read-only and contiguous."""

    worker: int
    batch_id: int
    ids: np.ndarray        # uint64 LoadGen response ids
    indices: np.ndarray    # int64 QSL indices, same order
    want_logits: bool


@dataclass(frozen=True, slots=True)
class Complete:
    """Complete ``ids`` with LoadGen using the logits of the result of ``batch_id`` that the driver holds."""

    batch_id: int
    worker: int
    ids: np.ndarray        # uint64, the same array (same order) as in the SendBatch


@dataclass(frozen=True, slots=True)
class Requeued:
    """Batch ``batch_id`` on ``worker`` passed the lost-batch timeout: its id is retired and its
    samples are back at the front of the queue (the driver logs it; a late result is dropped)."""

    worker: int
    batch_id: int
    waited_s: float


@dataclass(frozen=True, slots=True)
class Hedged:
    """Batch ``of_batch_id`` on ``of_worker`` is overdue (in flight ``waited_s``): the ``SendBatch``
    that follows sends a copy of it to ``worker`` as ``batch_id``. The first result completes the
    samples; the other copy's result is dropped (the driver logs it)."""

    worker: int
    batch_id: int
    of_worker: int
    of_batch_id: int
    waited_s: float


@dataclass(frozen=True, slots=True)
class Retired:
    """Batch ``batch_id`` on ``worker`` passed the lost-batch timeout, but another copy of it (a
    hedge) answers its samples: its id is retired and its worker's credit freed, nothing requeued."""

    worker: int
    batch_id: int
    waited_s: float


@dataclass(frozen=True, slots=True)
class NoWorkers:
    """Work is pending and no worker is left: the driver aborts the run with a clear error."""

    pending: int


Instr = SendBatch | Complete | Requeued | Hedged | Retired | NoWorkers


# ---------------------------------------------------------------------------------------------
# Internal state


class _Worker:
    __slots__ = ("id", "cap", "inflight", "batches_sent", "samples_sent", "batches_completed",
                 "samples_completed", "requeued_batches", "timeline", "head", "overdue")

    def __init__(self, worker: int, cap: int) -> None:
        self.id = worker
        self.cap = cap
        self.inflight: dict[int, None] = {}   # batch ids, in send order
        self.batches_sent = 0
        self.samples_sent = 0
        self.batches_completed = 0
        self.samples_completed = 0
        self.requeued_batches = 0
        self.timeline: dict[int, int] = {}    # TIMELINE_BIN_S bin since the test's first result -> samples
        self.head = -1                        # hedging: the batch whose service clock runs (its oldest)
        self.overdue = False                  # hedging: that batch is past its margin (the worker is stuck)

    def counts(self, alive: bool) -> dict:
        return {"alive": alive, "max_batch": self.cap, "in_flight": len(self.inflight),
                "batches_sent": self.batches_sent, "samples_sent": self.samples_sent,
                "batches_completed": self.batches_completed, "samples_completed": self.samples_completed,
                "requeued_batches": self.requeued_batches}


class _Flight:
    __slots__ = ("worker", "ids", "indices", "sent", "start", "due", "twin", "hedged")

    def __init__(self, worker: int, ids: np.ndarray, indices: np.ndarray, sent: float) -> None:
        self.worker = worker
        self.ids = ids
        self.indices = indices
        self.sent = sent
        self.start = -1.0      # hedging: when it reached the head of its worker's queue (-1: not yet)
        self.due = 0.0         # hedging: start + margin (0: no margin known)
        self.twin = -1         # hedging: the batch id of its other copy while both are in flight
        self.hedged = 0        # hedging: 1 = the original of a hedge, 2 = the copy (never hedged again)


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


#: per-worker throughput over time: samples completed per bin of this many seconds (stats()["timeline"]
#: merges bins so that at most TIMELINE_MAX_BINS remain)
TIMELINE_BIN_S = 0.25
TIMELINE_MAX_BINS = 600
#: completed batches whose shapes are counted together (one numpy pass instead of one per result)
FOLD_BATCHES = 4096


class Dispatcher:
    """See the module docstring. Not thread-safe: one loop owns it (STYLE §5)."""

    def __init__(self, scenario: str, policy: BatchPolicy, lengths: np.ndarray, want_logits: bool) -> None:
        if scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {', '.join(SCENARIOS)}, got {scenario!r}")
        self.scenario = scenario
        self.policy = policy
        self.want_logits = bool(want_logits)
        self._lengths = np.asarray(lengths)
        if self._lengths.ndim != 1:
            raise ValueError("lengths must be a 1-D array (real token count per QSL index)")
        self._offline = scenario == "Offline"
        self._credits = policy.credits
        self._max_wait = float(policy.max_wait_s)
        # Workers in order of joining; _pick rotates through them on ties.
        self._workers: dict[int, _Worker] = {}
        self._gone: dict[int, _Worker] = {}          # removed workers, for stats
        self._ever_had_worker = False
        self._no_workers_sent = False
        # Counters kept so the per-sample path never scans the workers.
        self._free_total = 0                          # sum of free credits over live workers
        self._idle_count = 0                          # live workers with nothing in flight
        self._cap = 1 if scenario == "SingleStream" else policy.max_batch
        # Closed batches waiting for a credit: (ids, indices) arrays. Requeued work goes to the front.
        self._queue: collections.deque[tuple[np.ndarray, np.ndarray]] = collections.deque()
        self._queued_samples = 0
        # Server open batch: plain lists; arrays are built only when it is cut.
        self._open_ids: list[int] = []
        self._open_idx: list[int] = []
        self._open_deadline = 0.0                     # arrival of its oldest sample + max_wait_s
        self._open_due = False                        # its wait has passed; it leaves at the next free credit
        self._flights: dict[int, _Flight] = {}          # in send order: the first is the oldest
        self._slowest = 0.0                           # longest send-to-result time seen (s)
        self._timed_out = 0
        self._next_batch_id = 0
        self._rr = 0  # round-robin start for ties in _pick
        self._issued = 0
        self._completed = 0
        self._t0: float | None = None                 # time of the first result: the timeline's origin
        self._requeued_batches = 0
        self._requeued_samples = 0
        self._dup_dropped = 0
        self._unknown_dropped = 0
        self._wrong_worker_dropped = 0
        self._aborted = 0
        # Shapes run: completed batches' QSL indices wait in _unfolded and are folded in bulk.
        self._ladder = policy.ladder
        self._unfolded: list[np.ndarray] = []
        self._shape_counts: dict[tuple[int, int], int] = {}
        self._tokens_run = 0
        self._tokens_real = 0
        # ladder with row rungs: the most rows a batch may have, by the real length of its longest row
        self._rows_limit = (np.array([self._ladder.max_rows(self._ladder.length_for(max(1, n)))
                                      for n in range(self._ladder.max_length + 1)], np.int64)
                            if self._ladder.rows else None)
        # Hedging (section "Hedges" below): copies answered by their twin first ("zombies") stay
        # held by their worker until its late result, its loss or the lost-batch timeout.
        self._hedge = policy.hedge
        self._times = BatchTimes(policy.hedge_factor, policy.hedge_floor_s)
        self._zombies: dict[int, _Flight] = {}        # in send order
        self._due_heap: list[tuple[float, int]] = []  # (due, batch id) of worker heads; stale ones popped lazily
        self._candidates: dict[int, None] = {}        # in-flight batch ids on overdue workers, oldest first
        self._hedges = {"sent": 0, "won": 0, "wasted": 0, "samples": 0, "late_results_dropped": 0,
                        "copies_retired": 0}

    # -----------------------------------------------------------------------------------------
    # Events

    def add_worker(self, worker: int, now: float, max_batch: int | None = None) -> list[Instr]:
        """A worker said Ready. ``max_batch`` (its own limit) caps every batch sent to it."""
        if worker in self._workers:
            raise ValueError(f"worker {worker} is already registered")
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"worker {worker}: max_batch must be >= 1, got {max_batch}")
        cap = self.policy.max_batch if max_batch is None else min(max_batch, self.policy.max_batch)
        w = _Worker(worker, cap)
        old = self._gone.pop(worker, None)
        if old is not None:                           # a rejoin keeps its counters
            for name in ("batches_sent", "samples_sent", "batches_completed", "samples_completed",
                         "requeued_batches"):
                setattr(w, name, getattr(old, name))
        self._workers[worker] = w
        self._workers = dict(sorted(self._workers.items()))
        self._ever_had_worker = True
        self._no_workers_sent = False                 # a new episode without workers may warn again
        self._free_total += self._credits
        self._idle_count += 1
        self._update_cap()
        out: list[Instr] = []
        self._pump(now, out)
        return out

    def remove_worker(self, worker: int, now: float) -> list[Instr]:
        """A worker is lost. Its in-flight batches go to the front of the queue with their ids retired
        (a hedged batch whose other copy is still in flight elsewhere is only forgotten)."""
        w = self._workers.pop(worker, None)
        if w is None:
            return []
        self._gone[worker] = w
        n = len(w.inflight)
        self._free_total -= self._credits - n
        if n == 0:
            self._idle_count -= 1
        # Oldest first at the front: appendleft in reverse send order.
        for bid in reversed(list(w.inflight)):
            if self._zombies.pop(bid, None) is not None:
                continue                              # answered already by its other copy
            f = self._flights.pop(bid)
            if f.twin >= 0:
                self._orphan(f)                       # its other copy alone answers it now
                continue
            self._queue.appendleft((f.ids, f.indices))
            self._queued_samples += len(f.ids)
            self._requeued_batches += 1
            self._requeued_samples += len(f.ids)
            w.requeued_batches += 1
        w.inflight.clear()
        self._update_cap()
        out: list[Instr] = []
        self._pump(now, out)
        return out

    def continue_ids(self, previous: Dispatcher) -> None:
        """Before any batch is sent: this test's batch ids follow ``previous``'s, so a result that
        test's workers still owe (an answered hedge copy, a requeued batch) is a duplicate here,
        never taken for another batch of this test."""
        assert self._next_batch_id == 0, "continue_ids after a batch was sent"
        self._next_batch_id = previous._next_batch_id

    def replace_worker(self, worker: int, now: float, max_batch: int | None = None) -> list[Instr]:
        """``worker`` restarted (its new connection said Ready): what its old connection held is
        requeued as by :meth:`remove_worker` and the new one joins, with no moment without a worker
        in between, so no ``NoWorkers`` even when it is the only worker."""
        self._no_workers_sent = True                  # (add_worker re-arms it)
        out = self.remove_worker(worker, now)
        return out + self.add_worker(worker, now, max_batch)

    def on_samples(self, ids: np.ndarray, indices: np.ndarray, now: float) -> list[Instr]:
        """LoadGen issued these samples (uint64 response ids, int64 QSL indices)."""
        n = len(ids)
        if n != len(indices):
            raise ValueError(f"on_samples: {n} ids but {len(indices)} indices")
        self._issued += n
        if n == 1 and not self._offline:
            # Server hot path: one sample per call. While every worker is busy and the open batch
            # is neither full nor due, this is two list appends and a few compares.
            oid = self._open_ids
            if not oid:
                self._open_deadline = now + self._max_wait
            oid.append(ids.item())
            self._open_idx.append(indices.item())
            if (len(oid) < self._cap and not self._idle_count and now < self._open_deadline
                    and self._workers):
                return []
        elif self._offline:
            if n:
                self._cut_offline(np.asarray(ids, dtype=np.uint64), np.asarray(indices, dtype=np.int64))
        else:
            # A pile of samples (Server callbacks that queued up while the driver worked): fill the
            # open batch a slice at a time, closing it whenever it reaches the cap.
            id_list, idx_list = ids.tolist(), indices.tolist()
            k = 0
            while k < n:
                oid = self._open_ids
                if not oid:
                    self._open_deadline = now + self._max_wait
                take = min(max(1, self._cap - len(oid)), n - k)   # >= 1 even if the cap shrank below it
                oid.extend(id_list[k:k + take])
                self._open_idx.extend(idx_list[k:k + take])
                k += take
                if len(oid) >= self._cap:
                    self._close_open()
        out: list[Instr] = []
        self._pump(now, out)
        return out

    def on_flush(self, now: float) -> list[Instr]:
        """LoadGen flush: the open batch leaves now (or at the first free credit)."""
        if self._open_ids:
            self._close_open()
        out: list[Instr] = []
        self._pump(now, out)
        return out

    def expected_ids(self, worker: int, batch_id: int) -> np.ndarray | None:
        """The response ids of ``batch_id`` if it is in flight on ``worker`` (what its result must
        carry), else None (a duplicate, unknown or wrong-worker result, which ``on_result`` drops)."""
        f = self._flights.get(batch_id)
        return f.ids if f is not None and f.worker == worker else None

    def on_result(self, worker: int, batch_id: int, now: float) -> list[Instr]:
        """``worker`` returned ``batch_id``: ``Complete`` first, then whatever the freed credit sends."""
        f = self._flights.get(batch_id)
        if f is None:
            z = self._zombies.get(batch_id) if self._zombies else None
            if z is not None and z.worker == worker:
                return self._late_copy(z, batch_id, now)   # its other copy answered first
            if 0 <= batch_id < self._next_batch_id:
                self._dup_dropped += 1                # completed already, or retired by a requeue
            else:
                self._unknown_dropped += 1
            return []
        if f.worker != worker:
            self._wrong_worker_dropped += 1           # the batch stays in flight on its own worker
            return []
        del self._flights[batch_id]
        if now - f.sent > self._slowest:
            self._slowest = now - f.sent
        w = self._workers[worker]                     # present: removal retires all its flights
        del w.inflight[batch_id]
        self._free_total += 1
        if not w.inflight:
            self._idle_count += 1
        if self._hedge:
            self._hedge_result(w, batch_id, f, now)
        k = len(f.ids)
        unfolded = self._unfolded
        unfolded.append(f.indices)
        if len(unfolded) >= FOLD_BATCHES:
            self._fold_shapes()
        w.batches_completed += 1
        w.samples_completed += k
        if self._t0 is None:
            self._t0 = f.sent
        b = int((now - self._t0) / TIMELINE_BIN_S)
        w.timeline[b] = w.timeline.get(b, 0) + k
        self._completed += k
        out: list[Instr] = [Complete(batch_id, worker, f.ids)]
        self._pump(now, out)
        return out

    def on_tick(self, now: float) -> list[Instr]:
        """Timers: the Server open batch whose oldest sample has waited ``max_wait_s``, batches
        in flight past the lost-batch timeout (``Requeued``, then back at the front of the queue; a
        hedged copy is only ``Retired``), and hedging's overdue batches (``Hedged``, ``SendBatch``)."""
        out: list[Instr] = []
        timeout = self._batch_timeout()
        expired: list[tuple[int, _Flight]] = []
        if timeout:
            for bid, f in self._flights.items():
                if f.sent + timeout > now:
                    break                             # send order: the rest are younger
                expired.append((bid, f))
        requeue: list[_Flight] = []
        for bid, f in expired:
            del self._flights[bid]
            w = self._workers[f.worker]               # present: removal retires all its flights
            del w.inflight[bid]
            self._free_total += 1
            if not w.inflight:
                self._idle_count += 1
            if f.twin >= 0:                           # hedged: its other copy alone answers it now
                self._orphan(f)
                self._hedges["copies_retired"] += 1
                out.append(Retired(w.id, bid, now - f.sent))
                continue
            self._requeued_batches += 1
            self._requeued_samples += len(f.ids)
            w.requeued_batches += 1
            self._timed_out += 1
            out.append(Requeued(f.worker, bid, now - f.sent))
            requeue.append(f)
        for f in reversed(requeue):                   # oldest ends up first in the queue
            self._queue.appendleft((f.ids, f.indices))
            self._queued_samples += len(f.ids)
        if self._hedge:
            self._hedge_tick(now, timeout, expired, out)
        self._pump(now, out)
        return out

    def _batch_timeout(self) -> float:
        floor = self.policy.batch_timeout_s
        return max(floor, 10.0 * self._slowest) if floor else 0.0

    def next_deadline(self) -> float | None:
        """When the driver must call ``on_tick`` next; ``None`` = no timer armed.

        Once the open batch is due but no credit is free, no timer is armed: it leaves on the event
        that frees a credit (a result, a new worker), so the driver never spins on a past deadline.
        """
        deadline = self._open_deadline if self._open_ids and not self._open_due else None
        timeout = self._batch_timeout()
        if timeout and self._flights:
            oldest = next(iter(self._flights.values())).sent + timeout
            deadline = oldest if deadline is None else min(deadline, oldest)
        if self._due_heap:
            due = self._next_due()
            if due is not None:
                deadline = due if deadline is None else min(deadline, due)
        if timeout and self._zombies:
            oldest = min(z.sent for z in self._zombies.values()) + timeout
            deadline = oldest if deadline is None else min(deadline, oldest)
        return deadline

    def abort(self) -> np.ndarray:
        """Give up on all outstanding work after a fatal failure; return its response ids (uint64).

        Every pending (queued or open) and in-flight sample is forgotten and its id returned, so the
        driver can complete them empty and LoadGen can return. In-flight batch ids are retired: late
        results for them are dropped as duplicates. Workers stay registered with all credits free.
        Safe to call twice (the second call returns an empty array).
        """
        parts = [ids for ids, _ in self._queue]
        parts += [f.ids for bid, f in self._flights.items() if f.twin < bid]   # a hedged pair once
        if self._open_ids:
            parts.append(np.array(self._open_ids, dtype=np.uint64))
        for w in self._workers.values():
            if w.inflight:
                self._free_total += len(w.inflight)
                self._idle_count += 1
                w.inflight.clear()
            w.head, w.overdue = -1, False
        self._flights.clear()
        self._zombies.clear()
        self._candidates.clear()
        self._due_heap.clear()
        self._queue.clear()
        self._queued_samples = 0
        self._open_ids = []
        self._open_idx = []
        self._open_due = False
        out = np.concatenate(parts).astype(np.uint64, copy=False) if parts else np.empty(0, np.uint64)
        self._aborted += len(out)
        return out

    # -----------------------------------------------------------------------------------------
    # Queries

    def idle(self) -> bool:
        return not self._flights and not self._zombies and not self._queue and not self._open_ids

    def in_flight(self, worker: int | None = None) -> int:
        """Batches held by ``worker`` (or by all): a hedged copy answered by the other one counts
        until its own result, as it still takes its worker's credit."""
        if worker is None:
            return len(self._flights) + len(self._zombies)
        w = self._workers.get(worker)
        return 0 if w is None else len(w.inflight)

    @property
    def samples_issued(self) -> int:
        return self._issued

    @property
    def samples_completed(self) -> int:
        return self._completed

    def pending_samples(self) -> int:
        """Samples issued and not yet sent (queued or in the open batch)."""
        return self._queued_samples + len(self._open_ids)

    def workers(self) -> list[int]:
        """Live worker ids, sorted."""
        return list(self._workers)

    @property
    def stats(self) -> dict:
        per = {wid: w.counts(False) for wid, w in self._gone.items()}
        per.update({wid: w.counts(True) for wid, w in self._workers.items()})
        return {
            "scenario": self.scenario,
            "samples_issued": self._issued,
            "samples_completed": self._completed,
            "samples_pending": self.pending_samples(),
            "batches_in_flight": len(self._flights),
            "batches_sent": sum(w["batches_sent"] for w in per.values()),
            "batches_completed": sum(w["batches_completed"] for w in per.values()),
            "requeued_batches": self._requeued_batches,
            "requeued_samples": self._requeued_samples,
            "timed_out_batches": self._timed_out,
            "slowest_batch_s": round(self._slowest, 6),
            "duplicates_dropped": self._dup_dropped,
            "unknown_dropped": self._unknown_dropped,
            "wrong_worker_dropped": self._wrong_worker_dropped,
            "samples_aborted": self._aborted,
            "hedges": dict(self._hedges),
            "workers": dict(sorted(per.items())),
            "timeline": self._timeline(),
        } | self.shape_stats()

    def shape_stats(self) -> dict[str, Any]:
        """The shapes the completed batches ran at (module docstring, "Shapes"): ``batch_shapes`` (the
        number of distinct (rows, length) pairs), ``padding_fraction`` (padded tokens / tokens run),
        ``tokens_run``, ``tokens_padded``, and ``shapes`` ("RxL": batches) when few shapes ran
        (``backends/shapes.shape_summary``)."""
        self._fold_shapes()
        return shape_summary(self._shape_counts, self._tokens_run, self._tokens_real)

    def _timeline(self) -> dict[str, Any]:
        """Samples completed per worker per time bin (bins merged to at most TIMELINE_MAX_BINS)."""
        everyone = {**self._gone, **self._workers}
        last = max((max(w.timeline) for w in everyone.values() if w.timeline), default=-1)
        merge = max(1, -(-(last + 1) // TIMELINE_MAX_BINS))
        out: dict[str, list[int]] = {}
        for wid, w in sorted(everyone.items()):
            row = [0] * ((last + 1 + merge - 1) // merge)
            for b, k in w.timeline.items():
                row[b // merge] += k
            out[str(wid)] = row
        return {"bin_s": TIMELINE_BIN_S * merge, "workers": out}

    # -----------------------------------------------------------------------------------------
    # Internals

    def _update_cap(self) -> None:
        if self.scenario == "SingleStream":
            return
        self._cap = max((w.cap for w in self._workers.values()), default=self.policy.max_batch)

    def _fold_shapes(self) -> None:
        """Count the shapes of the completed batches not counted yet (see ``shape_stats``)."""
        batches = self._unfolded
        if not batches:
            return
        self._unfolded = []
        sizes = np.fromiter((len(b) for b in batches), np.int64, len(batches))
        lens = self._lengths[np.concatenate(batches)].astype(np.int64)
        starts = np.zeros(len(batches), np.int64)
        np.cumsum(sizes[:-1], out=starts[1:])
        rows, width = self._ladder.shapes_of(sizes, np.maximum.reduceat(lens, starts))
        self._tokens_run += int((rows * width).sum())
        self._tokens_real += int(lens.sum())
        keys, counts = np.unique(rows << 32 | width, return_counts=True)   # 1-D: far faster than axis=0
        sc = self._shape_counts
        for key, c in zip(keys.tolist(), counts.tolist()):
            shape = (key >> 32, key & 0xFFFFFFFF)
            sc[shape] = sc.get(shape, 0) + c

    def _close_open(self) -> None:
        ids = np.array(self._open_ids, dtype=np.uint64)
        idx = np.array(self._open_idx, dtype=np.int64)
        ids.flags.writeable = False
        idx.flags.writeable = False
        if self._rows_limit is not None and len(ids) > 1:
            for a, b in self._ladder_pieces(idx):
                self._queue.append((ids[a:b], idx[a:b]))
        else:
            self._queue.append((ids, idx))
        self._queued_samples += len(ids)
        self._open_ids = []
        self._open_idx = []
        self._open_due = False

    def _ladder_pieces(self, idx: np.ndarray) -> list[tuple[int, int]]:
        """A Server batch (arrival order) as consecutive pieces, each within the ladder's row limit
        for the ladder length of its own longest row."""
        assert self._rows_limit is not None
        limit = self._rows_limit
        lens = np.minimum(self._lengths[idx].astype(np.int64), len(limit) - 1)
        n, start, out = len(idx), 0, []
        while start < n:
            allowed = limit[np.maximum.accumulate(lens[start:])]
            over = np.flatnonzero(np.arange(1, n - start + 1) > allowed)
            stop = start + int(over[0]) if over.size else n      # over[0] >= 1: one row always fits
            out.append((start, stop))
            start = stop
        return out

    def _offline_rows(self, longest: int, left: int) -> int:
        """Rows of the next Offline batch under a shape ladder: the largest rung whose rows x ladder
        length of ``longest`` fit the cap and the token budget, at most ``left``."""
        ladder, budget = self._ladder, self.policy.token_budget
        length = ladder.length_for(longest)
        limit = self._cap if budget is None else min(self._cap, max(1, budget // length))
        if ladder.rows:
            limit = ladder.fit_rows(min(limit, ladder.max_rows(length)))
        return min(limit, left)

    def _cut_offline(self, ids: np.ndarray, indices: np.ndarray) -> None:
        lens = self._lengths[indices]
        hi = int(lens.max())
        if hi < 32768 and int(lens.min()) >= 0:
            # numpy's stable sort of int16 keys is a radix sort: O(n).
            order = np.argsort((hi - lens).astype(np.int16), kind="stable")
        else:
            order = np.argsort(-lens.astype(np.int64), kind="stable")
        ids = _frozen(ids[order])
        indices = _frozen(indices[order])
        n, cap, budget = len(ids), self._cap, self.policy.token_budget
        if not self._ladder.exact:
            slens = lens[order]
            k = 0
            while k < n:
                rows = self._offline_rows(int(slens[k]), n - k)       # row k is the batch's longest
                self._queue.append((ids[k:k + rows], indices[k:k + rows]))
                k += rows
        elif budget is None:
            for k in range(0, n, cap):
                self._queue.append((ids[k:k + cap], indices[k:k + cap]))
        else:
            slens = lens[order]
            k = 0
            while k < n:
                rows = min(cap, max(1, budget // max(1, int(slens[k]))), n - k)   # row k is the batch's longest
                self._queue.append((ids[k:k + rows], indices[k:k + rows]))
                k += rows
        self._queued_samples += n

    def _pick(self) -> _Worker | None:
        """Least in flight among workers with a free credit; ties rotate (round-robin from the worker
        after the last one picked), so in SingleStream every worker stays warm and is exercised."""
        workers = list(self._workers.values())
        n = len(workers)
        start = self._rr % n if n else 0
        best, bn, pos = None, self._credits, 0
        for k in range(n):
            w = workers[(start + k) % n]
            inflight = len(w.inflight)
            if inflight < bn:
                best, bn, pos = w, inflight, (start + k) % n
                if inflight == 0:
                    break
        if best is not None:
            self._rr = pos + 1
        return best

    def _send(self, w: _Worker, ids: np.ndarray, idx: np.ndarray, out: list[Instr], now: float) -> None:
        if len(ids) > w.cap:                          # the tail waits at the front of the queue
            self._queue.appendleft((ids[w.cap:], idx[w.cap:]))
            self._queued_samples += len(ids) - w.cap
            ids, idx = ids[:w.cap], idx[:w.cap]
        bid = self._next_batch_id
        self._next_batch_id = bid + 1
        if not w.inflight:
            self._idle_count -= 1
        w.inflight[bid] = None
        self._free_total -= 1
        self._flights[bid] = _Flight(w.id, ids, idx, now)
        w.batches_sent += 1
        w.samples_sent += len(ids)
        out.append(SendBatch(w.id, bid, ids, idx, self.want_logits))
        if self._hedge:
            if w.overdue:
                self._candidates[bid] = None          # it waits behind a stuck batch
            self._advance(w, now)

    def _pump(self, now: float, out: list[Instr]) -> None:
        """Send what may be sent now. After it: queue non-empty => no free credit, and an open batch
        that is due (or that an idle worker could take) has left unless no credit is free."""
        queue = self._queue
        while True:
            while queue and self._free_total:
                worker = self._pick()
                if (self._offline and worker is not None and worker.inflight
                        and len(queue) < len(self._workers)):
                    # Offline tail: fewer batches left than workers. Prefetching one onto a busy
                    # worker would leave an idle worker waiting while it queues behind a running
                    # batch; hold it for the next worker that frees up (measured: 87% -> ~100%
                    # efficiency at 16 simulated GPUs with 6 batches each).
                    break
                assert worker is not None, "a free credit means some worker can take a batch"
                ids, idx = queue.popleft()
                self._queued_samples -= len(ids)
                self._send(worker, ids, idx, out, now)
            if self._candidates and self._free_total and not queue:
                self._send_hedges(now, out)           # overdue samples before the open batch
            if not self._open_ids:
                break
            if len(self._open_ids) >= self._cap:      # the cap shrank: a worker left
                self._close_open()
                continue
            # Work-conserving: an idle worker takes the open batch at once; otherwise it waits to
            # fill until its oldest sample has waited max_wait_s.
            if self._idle_count or self._open_due or now >= self._open_deadline:
                if self._free_total:                  # (so the queue is empty)
                    self._close_open()
                    continue
                self._open_due = True                 # leaves at the next free credit; no timer
            break
        if not self._workers and self._ever_had_worker and not self._no_workers_sent:
            pending = self.pending_samples()
            if pending:
                self._no_workers_sent = True
                out.append(NoWorkers(pending))

    # -----------------------------------------------------------------------------------------
    # Hedges (module docstring, "Hedges"; the margins: engine/hedge.BatchTimes)

    def _advance(self, w: _Worker, now: float) -> None:
        """``w``'s oldest batch may have changed: start its service clock and arm its due time."""
        if not w.inflight:
            w.head, w.overdue = -1, False
            return
        head = next(iter(w.inflight))
        if head == w.head:
            return
        w.head, w.overdue = head, False
        f = self._flights.get(head) or self._zombies[head]
        if f.start < 0:
            f.start = now
            margin = self._times.margin(w.id, len(f.ids))
            if margin is not None:
                f.due = f.start + margin
                heapq.heappush(self._due_heap, (f.due, head))

    def _head_due(self, due: float, bid: int) -> _Worker | None:
        """The worker whose head ``bid`` is, when ``(due, bid)`` is still its armed due time."""
        f = self._flights.get(bid) or self._zombies.get(bid)
        w = self._workers.get(f.worker) if f is not None else None
        return w if w is not None and w.head == bid and not w.overdue and f is not None and f.due == due else None

    def _next_due(self) -> float | None:
        heap = self._due_heap
        while heap:
            due, bid = heap[0]
            if self._head_due(due, bid) is not None:
                return due
            heapq.heappop(heap)                       # stale: that batch returned or was retired
        return None

    def _hedge_tick(self, now: float, timeout: float, expired: list[tuple[int, _Flight]],
                    out: list[Instr]) -> None:
        """After the lost-batch timeouts: answered copies past it are retired too, heads move on, and
        every head past its due time makes its worker overdue (its batches become candidates)."""
        if timeout:
            for bid, z in [(b, z) for b, z in self._zombies.items() if z.sent + timeout <= now]:
                holder = self._drop_zombie(bid, now)
                self._hedges["copies_retired"] += 1
                out.append(Retired(holder.id, bid, now - z.sent))
        for _, f in expired:
            self._advance(self._workers[f.worker], now)
        heap = self._due_heap
        while heap and heap[0][0] <= now:
            due, bid = heapq.heappop(heap)
            stuck = self._head_due(due, bid)
            if stuck is None:
                continue
            stuck.overdue = True
            for b in stuck.inflight:
                g = self._flights.get(b)
                if g is not None and not g.hedged:
                    self._candidates[b] = None

    def _send_hedges(self, now: float, out: list[Instr]) -> None:
        """Copy candidates (oldest first) to workers with a free credit, within the budget."""
        budget = self.policy.hedge_budget * self._issued
        for bid in list(self._candidates):
            f = self._flights.get(bid)
            src = self._workers.get(f.worker) if f is not None else None
            if f is None or src is None or not src.overdue or f.hedged:
                del self._candidates[bid]             # returned, lost, hedged, or its worker moved on
                continue
            n = len(f.ids)
            if self._hedges["samples"] + n > budget:
                continue                              # the budget grows with the samples issued
            target = self._hedge_target(src.id, n)
            if target is None:
                continue
            del self._candidates[bid]
            copy = self._next_batch_id
            out.append(Hedged(target.id, copy, src.id, bid, now - f.sent))
            self._send(target, f.ids, f.indices, out, now)
            h = self._flights[copy]
            f.twin, h.twin = copy, bid
            f.hedged, h.hedged = 1, 2
            self._hedges["sent"] += 1
            self._hedges["samples"] += n
            if not self._free_total:
                return

    def _hedge_target(self, exclude: int, rows: int) -> _Worker | None:
        """The live worker with the fewest batches in flight and a free credit, not ``exclude``, not
        overdue itself, whose cap takes ``rows`` (a copy is never split)."""
        best = None
        for w in self._workers.values():
            if (w.id != exclude and not w.overdue and w.cap >= rows and len(w.inflight) < self._credits
                    and (best is None or len(w.inflight) < len(best.inflight))):
                best = w
        return best

    def _hedge_result(self, w: _Worker, bid: int, f: _Flight, now: float) -> None:
        """``f`` (batch ``bid``, just removed from ``w``) returned: its time, its twin, ``w``'s next head."""
        if f.start >= 0:
            self._times.record(w.id, len(f.ids), now - f.start)
        if f.twin >= 0:                               # the other copy is answered: it becomes a zombie
            twin = self._flights.pop(f.twin)
            twin.twin = -1
            self._zombies[f.twin] = twin
        if f.hedged:                                  # (its twin may have been lost before)
            self._hedges["won" if f.hedged == 2 else "wasted"] += 1
        self._advance(w, now)

    def _late_copy(self, z: _Flight, bid: int, now: float) -> list[Instr]:
        """The late result of a copy whose twin answered first: dropped; its worker's credit is free."""
        self._drop_zombie(bid, now)
        self._hedges["late_results_dropped"] += 1
        out: list[Instr] = []
        self._pump(now, out)
        return out

    def _drop_zombie(self, bid: int, now: float) -> _Worker:
        """Forget the answered copy ``bid`` and free its worker's credit; that worker."""
        z = self._zombies.pop(bid)
        w = self._workers[z.worker]                   # present: removal forgets its zombies
        del w.inflight[bid]
        self._free_total += 1
        if not w.inflight:
            self._idle_count += 1
        self._advance(w, now)
        return w

    def _orphan(self, f: _Flight) -> None:
        """``f`` is gone (lost worker, timeout) while its twin is in flight: the twin alone answers."""
        self._flights[f.twin].twin = -1
        f.twin = -1
