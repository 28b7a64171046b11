"""Dense tests of the pure dispatcher (STYLE §3): every event, every scenario, an injected clock.

The ``Sim`` helper plays the driver and the workers: it executes instructions, keeps its own ledger
of what each worker holds, checks the contract on every instruction (credits, caps, unique batch
ids, each response id completed exactly once), and can deliver results in any order.
"""

from __future__ import annotations

import dataclasses
import heapq
import random

import numpy as np
import pytest

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


def ids_of(*xs: int) -> np.ndarray:
    return np.array(xs, dtype=np.uint64)


def idx_of(*xs: int) -> np.ndarray:
    return np.array(xs, dtype=np.int64)


def sends(instrs) -> list[SendBatch]:
    return [i for i in instrs if isinstance(i, SendBatch)]


def one(d: Dispatcher, k: int, now: float, index: int | None = None):
    """LoadGen issues one sample (response id k, QSL index ``index`` or k)."""
    return d.on_samples(ids_of(k), idx_of(k if index is None else index), now)


class Sim:
    """Driver + fake workers with a ledger that checks the contract on every instruction."""

    def __init__(self, d: Dispatcher, lengths: np.ndarray | None = None) -> None:
        self.d = d
        self.lengths = lengths
        self.caps: dict[int, int] = {}
        self.held: dict[int, dict[int, SendBatch]] = {}      # worker -> batch id -> batch
        self.seen_batch_ids: set[int] = set()
        self.retired: list[tuple[int, int]] = []            # (worker, batch id) no longer valid
        self.issued: dict[int, int] = {}                    # response id -> qsl index
        self.completed: dict[int, int] = {}                 # response id -> times completed
        self.sent_batches: list[SendBatch] = []
        self.requeued: list[Requeued] = []
        self.hedged: list[Hedged] = []                      # hedging: the copies announced
        self.retired_copies: list[Retired] = []
        self.no_workers: list[NoWorkers] = []
        self.no_workers_armed = False                       # a worker joined since the last NoWorkers
        self.next_id = 0

    # events -----------------------------------------------------------------------------------
    def add(self, w: int, now: float = 0.0, max_batch: int | None = None) -> list:
        self.caps[w] = min(max_batch or 10**9, self.d.policy.max_batch)
        self.no_workers_armed = True
        self.held[w] = {}
        return self.run(self.d.add_worker(w, now, max_batch))

    def remove(self, w: int, now: float = 0.0) -> list:
        for bid in self.held.pop(w, {}):
            self.retired.append((w, bid))
        self.caps.pop(w, None)
        return self.run(self.d.remove_worker(w, now))

    def issue(self, n: int, now: float = 0.0, indices: list[int] | None = None) -> list:
        ids = list(range(self.next_id, self.next_id + n))
        self.next_id += n
        if indices is None:
            indices = [i % len(self.lengths) if self.lengths is not None else i for i in ids]
        for i, x in zip(ids, indices):
            self.issued[i] = x
        return self.run(self.d.on_samples(np.array(ids, np.uint64), np.array(indices, np.int64), now))

    def result(self, w: int, bid: int, now: float = 0.0) -> list:
        self.held[w].pop(bid)
        self.retired.append((w, bid))
        return self.run(self.d.on_result(w, bid, now))

    def abort(self) -> np.ndarray:
        """The driver gives up: the returned ids are completed empty (they count as completed)."""
        ids = self.d.abort()
        assert ids.dtype == np.uint64
        for w, h in self.held.items():
            self.retired.extend((w, bid) for bid in h)
            h.clear()
        self.run([Complete(-1, -1, ids)] if len(ids) else [])
        return ids

    def tick(self, now: float) -> list:
        return self.run(self.d.on_tick(now))

    def flush(self, now: float) -> list:
        return self.run(self.d.on_flush(now))

    # the driver ------------------------------------------------------------------------------
    def run(self, instrs: list) -> list:
        credits = self.d.policy.credits
        copy_of: SendBatch | None = None                    # hedging: the batch the next SendBatch copies
        for ins in instrs:
            if copy_of is not None:
                assert isinstance(ins, SendBatch) and ins.batch_id == self.hedged[-1].batch_id, "Hedged w/o its send"
                assert ins.ids is copy_of.ids and ins.worker != copy_of.worker
                copy_of = None
            if isinstance(ins, SendBatch):
                assert ins.worker in self.held, f"batch {ins.batch_id} sent to unknown worker {ins.worker}"
                assert ins.batch_id not in self.seen_batch_ids, f"batch id {ins.batch_id} reused"
                self.seen_batch_ids.add(ins.batch_id)
                assert ins.ids.dtype == np.uint64 and ins.indices.dtype == np.int64
                assert len(ins.ids) == len(ins.indices) >= 1
                assert len(ins.ids) <= self.caps[ins.worker], "batch larger than the worker's max_batch"
                for i, x in zip(ins.ids.tolist(), ins.indices.tolist()):
                    assert self.issued.get(i) == x, f"id {i} sent with index {x}"
                self.held[ins.worker][ins.batch_id] = ins
                assert len(self.held[ins.worker]) <= credits, f"worker {ins.worker} over its credits"
                self.sent_batches.append(ins)
            elif isinstance(ins, Complete):
                for i in ins.ids.tolist():
                    assert i in self.issued, f"completed id {i} was never issued"
                    self.completed[i] = self.completed.get(i, 0) + 1
                    assert self.completed[i] == 1, f"id {i} completed twice"
            elif isinstance(ins, Requeued):
                assert ins.batch_id in self.held.get(ins.worker, {}), f"requeued batch {ins.batch_id} was not held"
                assert ins.waited_s >= self.d.policy.batch_timeout_s - 1e-12 > 0   # (now - sent: rounding)
                self.held[ins.worker].pop(ins.batch_id)
                self.retired.append((ins.worker, ins.batch_id))   # the worker may still answer: a duplicate
                self.requeued.append(ins)
            elif isinstance(ins, Hedged):
                assert self.d.policy.hedge, "a hedge with hedging off"
                copy_of = self.held.get(ins.of_worker, {}).get(ins.of_batch_id)
                assert copy_of is not None, f"hedge of batch {ins.of_batch_id} that {ins.of_worker} does not hold"
                assert not any(i in self.completed for i in copy_of.ids.tolist()), "hedge of answered samples"
                self.hedged.append(ins)
            elif isinstance(ins, Retired):
                assert ins.batch_id in self.held.get(ins.worker, {}), f"retired batch {ins.batch_id} was not held"
                self.held[ins.worker].pop(ins.batch_id)
                self.retired.append((ins.worker, ins.batch_id))
                self.retired_copies.append(ins)
            elif isinstance(ins, NoWorkers):
                assert not self.held, "NoWorkers while a worker is alive"
                assert self.no_workers_armed, "NoWorkers twice in one episode, or before any worker joined"
                self.no_workers_armed = False
                assert ins.pending == self.d.pending_samples() > 0
                self.no_workers.append(ins)
            else:  # pragma: no cover
                raise AssertionError(f"unknown instruction {ins!r}")
        assert copy_of is None, "Hedged without its SendBatch"
        self.check()
        return instrs

    def check(self) -> None:
        d = self.d
        in_flight = sum(len(h) for h in self.held.values())
        assert d.in_flight() == in_flight
        for w, h in self.held.items():
            assert d.in_flight(w) == len(h)
        if self.d.policy.hedge:   # two copies of a batch hold the same samples; an answered copy none
            samples_held = len({i for h in self.held.values() for b in h.values() for i in b.ids.tolist()}
                               - self.completed.keys())
        else:
            samples_held = sum(len(b.ids) for h in self.held.values() for b in h.values())
        done = sum(self.completed.values())
        assert d.pending_samples() + samples_held + done == len(self.issued), "a sample was lost or duplicated"
        assert d.idle() == (d.pending_samples() == 0 and in_flight == 0)

    def drain_fifo(self, now: float = 0.0) -> None:
        """Return every held batch, oldest first, until nothing is in flight."""
        while True:
            oldest = min(((b.batch_id, w) for w, h in self.held.items() for b in h.values()), default=None)
            if oldest is None:
                return
            self.result(oldest[1], oldest[0], now)

    def all_done_once(self) -> bool:
        return set(self.completed) == set(self.issued) and all(v == 1 for v in self.completed.values())


# --------------------------------------------------------------------------------------------
# construction


@pytest.mark.parametrize("kw", [dict(max_batch=0), dict(credits=0), dict(token_budget=0), dict(max_wait_s=-1.0),
                                dict(max_wait_s=float("nan"))])
def test_policy_rejects_bad_values(kw):
    with pytest.raises(ValueError):
        BatchPolicy(**kw)


def test_unknown_scenario_rejected():
    with pytest.raises(ValueError, match="MultiStream"):
        Dispatcher("MultiStream", BatchPolicy(), np.ones(4), True)


def test_worker_added_twice_rejected():
    d = Dispatcher("Server", BatchPolicy(), np.ones(4), True)
    d.add_worker(1, 0.0)
    with pytest.raises(ValueError, match="already"):
        d.add_worker(1, 0.0)
    with pytest.raises(ValueError):
        d.add_worker(2, 0.0, max_batch=0)


def test_mismatched_ids_and_indices_rejected():
    d = Dispatcher("Server", BatchPolicy(), np.ones(4), True)
    with pytest.raises(ValueError):
        d.on_samples(ids_of(1, 2), idx_of(1), 0.0)


def test_instructions_are_frozen():
    s = SendBatch(1, 2, ids_of(3), idx_of(4), True)
    with pytest.raises(AttributeError):
        s.worker = 5
    assert not hasattr(s, "__dict__")


# --------------------------------------------------------------------------------------------
# Offline


def offline_sim(lengths, policy: BatchPolicy, workers=(1,), caps=None) -> Sim:
    sim = Sim(Dispatcher("Offline", policy, np.asarray(lengths), want_logits=True), np.asarray(lengths))
    for w in workers:
        sim.add(w, max_batch=(caps or {}).get(w))
    return sim


def test_offline_longest_first_and_stable():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 385, 1000)
    sim = offline_sim(lengths, BatchPolicy(max_batch=16, credits=1))
    perm = rng.permutation(1000).tolist()
    sim.issue(1000, indices=perm)
    sim.drain_fifo()
    order = np.concatenate([b.indices for b in sim.sent_batches])
    seq = lengths[order]
    assert (np.diff(seq) <= 0).all(), "not longest first"
    # Equal lengths keep issue order.
    pos = {x: k for k, x in enumerate(perm)}
    for a, b in zip(order[:-1], order[1:]):
        if lengths[a] == lengths[b]:
            assert pos[int(a)] < pos[int(b)]
    assert sim.all_done_once()


def test_offline_max_batch_only_cuts_full_batches():
    lengths = np.arange(1, 101)
    sim = offline_sim(lengths, BatchPolicy(max_batch=32, credits=8))
    sim.issue(100)
    assert [len(b.ids) for b in sim.sent_batches] == [32, 32, 32, 4]
    assert sim.sent_batches[0].indices.tolist() == list(range(99, 67, -1))


@pytest.mark.parametrize("seed", range(5))
def test_offline_token_budget(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 385, 3000)
    budget, mb = 4096, 48
    sim = offline_sim(lengths, BatchPolicy(max_batch=mb, token_budget=budget, credits=3), workers=(1, 2))
    sim.issue(3000)
    sim.drain_fifo()
    batches = sorted(sim.sent_batches, key=lambda b: b.batch_id)
    for k, b in enumerate(batches):
        rows, longest = len(b.ids), int(lengths[b.indices].max())
        assert rows <= mb
        assert rows * longest <= budget
        assert int(lengths[b.indices[0]]) == longest, "first row must be the longest"
        if k + 1 < len(batches):                     # greedy: one more row would break a limit
            nxt = rows + 1
            assert nxt > mb or nxt * longest > budget
    assert sim.all_done_once()


def test_offline_sample_longer_than_budget_goes_alone():
    lengths = np.array([384, 384, 10, 10, 10])
    sim = offline_sim(lengths, BatchPolicy(max_batch=8, token_budget=300, credits=8))
    sim.issue(5)
    assert [b.indices.tolist() for b in sim.sent_batches] == [[0], [1], [2, 3, 4]]


def test_offline_initial_spread_and_credit_refill():
    sim = offline_sim(np.full(100, 50), BatchPolicy(max_batch=10, credits=2), workers=(3, 1, 2))
    sim.issue(100)
    # Least in flight first, ties by lowest id: 1, 2, 3, 1, 2, 3.
    assert [b.worker for b in sim.sent_batches] == [1, 2, 3, 1, 2, 3]
    assert sim.d.pending_samples() == 40
    first = sim.sent_batches[1]
    out = sim.result(first.worker, first.batch_id)
    assert isinstance(out[0], Complete) and out[0].batch_id == first.batch_id
    assert out[0].ids is first.ids
    assert [(type(i), i.worker) for i in out[1:]] == [(SendBatch, 2)], "freed credit must refill that worker"
    assert sim.d.next_deadline() is None
    assert sim.flush(0.0) == []


def test_offline_batches_cut_to_largest_worker_and_split_for_smaller():
    sim = offline_sim(np.full(40, 100), BatchPolicy(max_batch=64, credits=1), workers=(1, 2), caps={1: 4, 2: 16})
    sim.issue(40)
    # Cut by 16 (the largest worker); worker 1 takes the head 4 of the first batch, worker 2 its tail.
    assert [(b.worker, b.ids.tolist()) for b in sim.sent_batches] == [(1, list(range(4))), (2, list(range(4, 16)))]
    sim.result(1, sim.sent_batches[0].batch_id)
    assert (sim.sent_batches[-1].worker, sim.sent_batches[-1].ids.tolist()) == (1, list(range(16, 20)))
    sim.result(2, sim.sent_batches[1].batch_id)
    assert (sim.sent_batches[-1].worker, sim.sent_batches[-1].ids.tolist()) == (2, list(range(20, 32)))
    sim.drain_fifo()
    assert sim.all_done_once()


def test_offline_tail_of_split_batch_keeps_order():
    sim = offline_sim(np.full(8, 100), BatchPolicy(max_batch=8, credits=1), workers=(1,), caps={1: 3})
    sim.issue(8)
    sim.drain_fifo()
    assert [b.ids.tolist() for b in sim.sent_batches] == [[0, 1, 2], [3, 4, 5], [6, 7]]


def test_offline_arrays_are_read_only():
    sim = offline_sim(np.full(10, 5), BatchPolicy(max_batch=4))
    sim.issue(10)
    with pytest.raises(ValueError):
        sim.sent_batches[0].ids[0] = 7


# --------------------------------------------------------------------------------------------
# Server


def server(max_batch=4, wait=0.002, credits=2, workers=(1,), caps=None) -> Sim:
    sim = Sim(Dispatcher("Server", BatchPolicy(max_batch=max_batch, max_wait_s=wait, credits=credits),
                         np.full(10_000, 128), want_logits=False), np.full(10_000, 128))
    for w in workers:
        sim.add(w, max_batch=(caps or {}).get(w))
    return sim


def test_server_idle_worker_gets_sample_at_once():
    sim = server()
    out = sim.issue(1, now=1.0)
    assert len(out) == 1 and out[0].ids.tolist() == [0] and out[0].want_logits is False
    assert sim.d.next_deadline() is None


def test_server_batches_while_busy_full_batch_leaves_at_once():
    sim = server(max_batch=4)
    sim.issue(1, now=1.0)                              # worker 1 now has one in flight: not idle
    for k in range(3):
        assert sim.issue(1, now=1.0001 + k * 1e-4) == []
        assert sim.d.next_deadline() == pytest.approx(1.0001 + 0.002)
    out = sim.issue(1, now=1.0005)
    assert [b.ids.tolist() for b in out] == [[1, 2, 3, 4]]
    assert sim.d.next_deadline() is None


def test_server_partial_batch_leaves_at_deadline():
    sim = server(max_batch=8, wait=0.002)
    sim.issue(1, now=1.0)
    sim.issue(1, now=1.0005)
    sim.issue(1, now=1.0010)
    assert sim.d.next_deadline() == pytest.approx(1.0025)
    assert sim.tick(1.0020) == []                       # early tick: nothing
    assert sim.d.next_deadline() == pytest.approx(1.0025)
    out = sim.tick(1.0025)
    assert [b.ids.tolist() for b in out] == [[1, 2]]
    assert sim.d.next_deadline() is None
    # The next batch's deadline counts from its own oldest sample.
    sim.issue(1, now=1.0030)
    assert sim.d.next_deadline() == pytest.approx(1.0050)


def test_server_due_batch_without_credit_grows_and_leaves_on_result():
    sim = server(max_batch=8, wait=0.002, credits=2)
    first = sim.issue(1, now=0.0)[0]                   # idle -> at once
    sim.issue(1, now=0.0001)
    second = sim.tick(0.0021)[0]                        # due, credit free -> leaves
    assert second.ids.tolist() == [1]
    sim.issue(1, now=0.0030)                            # worker has 2 in flight: no credit
    assert sim.tick(0.0050) == []                       # due but nowhere to go
    assert sim.d.next_deadline() is None, "a due batch without a credit must not arm a timer (busy loop)"
    for k in range(3):                                  # it keeps growing meanwhile
        assert sim.issue(1, now=0.0051 + k * 1e-4) == []
    assert sim.d.next_deadline() is None
    out = sim.result(1, first.batch_id, now=0.006)
    assert isinstance(out[0], Complete) and out[0].ids.tolist() == [0]
    assert [b.ids.tolist() for b in out[1:]] == [[2, 3, 4, 5]], "due batch leaves on the freed credit"


def test_server_full_batches_queue_fifo_without_credits():
    sim = server(max_batch=2, credits=1)
    b0 = sim.issue(1, now=0.0)[0]
    assert sim.issue(4, now=0.001) == []                # two full batches, no credit
    assert sim.d.pending_samples() == 4
    out = sim.result(1, b0.batch_id, now=0.002)
    assert [b.ids.tolist() for b in sends(out)] == [[1, 2]]
    out = sim.result(1, sends(out)[0].batch_id, now=0.003)
    assert [b.ids.tolist() for b in sends(out)] == [[3, 4]]
    assert sim.d.idle() is False


def test_server_open_batch_caps_at_max_while_queue_waits():
    sim = server(max_batch=3, credits=1)
    b0 = sim.issue(1, now=0.0)[0]
    for k in range(7):
        sim.issue(1, now=0.001 * k)
    # 7 samples: two full batches queued + one open with 1 sample
    assert sim.d.pending_samples() == 7
    sim.result(1, b0.batch_id, now=0.01)
    assert [len(b.ids) for b in sim.sent_batches] == [1, 3]


def test_server_work_conserving_picks_idle_worker():
    sim = server(max_batch=8, credits=2, workers=(1, 2))
    a = sim.issue(1, now=0.0)[0]
    b = sim.issue(1, now=0.0001)[0]                     # worker 2 idle -> at once
    assert (a.worker, b.worker) == (1, 2)
    assert sim.issue(1, now=0.0002) == []               # both busy: batch
    out = sim.result(2, b.batch_id, now=0.0003)
    assert [type(i) for i in out] == [Complete, SendBatch]
    assert out[1].worker == 2 and out[1].ids.tolist() == [2], "a worker that goes idle takes the open batch"


def test_server_worker_max_batch_caps_batches():
    sim = server(max_batch=64, credits=1, workers=(1,), caps={1: 4})
    sim.issue(1)
    sim.issue(9)
    assert sim.d.pending_samples() == 9
    sim.drain_fifo()
    assert [len(b.ids) for b in sim.sent_batches] == [1, 4, 4, 1], "the open batch is capped at the worker's 4"
    assert sim.all_done_once()


def test_server_heterogeneous_caps():
    sim = server(max_batch=16, credits=1, workers=(1, 2), caps={1: 2, 2: 16})
    sim.issue(2)                                        # both go singly to idle workers
    sim.issue(16)                                       # a full 16 batch, queued
    sim.drain_fifo()
    assert all(len(b.ids) <= sim.caps[b.worker] for b in sim.sent_batches)
    assert sim.all_done_once()


def test_server_flush_sends_partial_batch():
    sim = server(max_batch=8, wait=10.0)
    sim.issue(1, now=0.0)
    sim.issue(3, now=0.001)
    assert sim.d.pending_samples() == 3
    out = sim.flush(0.002)
    assert [b.ids.tolist() for b in out] == [[1, 2, 3]]
    assert sim.flush(0.003) == []


def test_server_flush_without_credit_waits_in_queue():
    sim = server(max_batch=8, wait=10.0, credits=1)
    b0 = sim.issue(1)[0]
    sim.issue(2)
    assert sim.flush(0.0) == []
    assert sim.d.next_deadline() is None
    out = sim.result(1, b0.batch_id)
    assert [b.ids.tolist() for b in sends(out)] == [[1, 2]]


def test_server_multi_sample_call_respects_max_batch():
    sim = server(max_batch=4, credits=4)
    sim.issue(1)
    out = sim.issue(9, now=0.0)
    assert [len(b.ids) for b in out] == [4, 4]
    assert sim.d.pending_samples() == 1


def test_server_zero_wait_sends_on_every_free_credit():
    sim = server(max_batch=8, wait=0.0, credits=2)
    sim.issue(1)
    out = sim.issue(1, now=0.0)
    assert len(out) == 1, "max_wait 0: no waiting while a credit is free"


def test_server_no_workers_yet_then_join():
    sim = server(workers=())
    sim.issue(3, now=0.0)
    assert sim.no_workers == [], "no NoWorkers before the first worker ever joined"
    assert sim.tick(1.0) == []
    assert sim.d.next_deadline() is None
    out = sim.add(7, now=1.0)
    assert [b.ids.tolist() for b in out] == [[0, 1, 2]]


# --------------------------------------------------------------------------------------------
# SingleStream


def test_singlestream_one_at_a_time():
    d = Dispatcher("SingleStream", BatchPolicy(max_batch=64, max_wait_s=1.0), np.full(100, 30), True)
    sim = Sim(d, np.full(100, 30))
    sim.add(2)
    sim.add(1)
    used = []
    for k in range(6):
        out = sim.issue(1, now=float(k))
        assert len(out) == 1 and out[0].ids.tolist() == [k]
        used.append(out[0].worker)
        assert d.next_deadline() is None
        done = sim.result(out[0].worker, out[0].batch_id, now=k + 0.5)
        assert len(done) == 1 and isinstance(done[0], Complete) and done[0].ids.tolist() == [k]
        assert d.idle()
    # idle workers tie: they take turns, so every worker stays warm
    assert sorted(set(used)) == [1, 2] and used.count(1) == used.count(2) == 3


def test_singlestream_goes_to_least_loaded():
    sim = Sim(Dispatcher("SingleStream", BatchPolicy(), np.full(10, 30), True), np.full(10, 30))
    sim.add(1)
    sim.add(2)
    a = sim.issue(1)[0]
    b = sim.issue(1)[0]                                 # overlapping (not what LoadGen does, but safe)
    assert (a.worker, b.worker) == (1, 2)
    c = sim.issue(2)
    assert [len(x.ids) for x in c] == [1, 1], "always batches of one"


# --------------------------------------------------------------------------------------------
# credits and load balancing


@pytest.mark.parametrize("credits", [1, 2, 3])
def test_credits_never_exceeded_and_each_result_frees_one(credits):
    sim = offline_sim(np.full(500, 64), BatchPolicy(max_batch=5, credits=credits), workers=(1, 2, 3))
    sim.issue(500)
    assert all(sim.d.in_flight(w) == credits for w in (1, 2, 3))
    rng = random.Random(credits)
    while sim.d.in_flight():
        w = rng.choice([w for w in sim.held if sim.held[w]])
        bid = rng.choice(list(sim.held[w]))
        queued = len(sim.d._queue)
        out = sim.result(w, bid)
        # a freed credit refills at once, except in the Offline tail (fewer queued batches than
        # workers), where only a worker with nothing in flight gets one
        assert isinstance(out[0], Complete)
        assert all(isinstance(i, SendBatch) and i.worker == w for i in out[1:])
        if queued >= 3:
            assert len(out) == 2, "a freed credit must be refilled while work is plentiful"
        assert all(sim.d.in_flight(x) <= credits for x in (1, 2, 3))
    assert sim.all_done_once()


def test_offline_tail_is_not_prefetched_onto_busy_workers():
    """With fewer batches left than workers, a busy worker gets no second batch: the batch waits
    for the next worker that is idle (otherwise it sits behind a running batch while others idle)."""
    sim = offline_sim(np.full(4, 64), BatchPolicy(max_batch=1, credits=2), workers=(1, 2, 3))
    out = sim.issue(4)
    # 3 idle workers take one each; the 4th batch (tail: 1 left < 3 workers) is held
    assert sorted(i.worker for i in out if isinstance(i, SendBatch)) == [1, 2, 3]
    assert sim.d.pending_samples() == 1
    first = next(iter(sim.held[2]))
    out = sim.result(2, first)
    assert [type(i) for i in out] == [Complete, SendBatch] and out[1].worker == 2
    for w in (1, 2, 3):
        for bid in list(sim.held[w]):
            sim.result(w, bid)
    assert sim.all_done_once()


def run_timed(sim: Sim, service: dict[int, float], samples: int) -> None:
    """Event loop: each worker serves its batches one after another in ``service[w]`` seconds."""
    heap: list[tuple[float, int, int]] = []
    free_at = {w: 0.0 for w in service}

    def schedule(instrs, now):
        for i in sends(instrs):
            start = max(now, free_at[i.worker])
            free_at[i.worker] = start + service[i.worker]
            heapq.heappush(heap, (free_at[i.worker], i.batch_id, i.worker))

    schedule(sim.sent_batches, 0.0)
    schedule(sim.issue(samples, now=0.0), 0.0)
    while heap:
        t, bid, w = heapq.heappop(heap)
        schedule(sim.result(w, bid, now=t), t)


def test_fast_worker_gets_more_batches():
    sim = offline_sim(np.full(2000, 100), BatchPolicy(max_batch=10, credits=2), workers=(1, 2))
    run_timed(sim, {1: 0.005, 2: 0.001}, 2000)
    s = sim.d.stats["workers"]
    assert s[2]["batches_completed"] >= 4 * s[1]["batches_completed"], s
    assert s[1]["samples_completed"] + s[2]["samples_completed"] == 2000
    assert sim.all_done_once()


def test_server_latency_low_at_low_load_and_batches_at_high_load():
    rng = np.random.default_rng(0)

    def run(qps: float) -> tuple[float, float]:
        sim = server(max_batch=32, wait=0.002, credits=2, workers=(1, 2))
        d = sim.d
        arrivals = np.cumsum(rng.exponential(1 / qps, 3000)).tolist()
        heap: list[tuple[float, int, int]] = []
        free_at = {1: 0.0, 2: 0.0}
        lat: list[float] = []
        sent_at: dict[int, float] = {}

        def schedule(instrs, now):
            for i in instrs:
                if isinstance(i, SendBatch):
                    start = max(now, free_at[i.worker])
                    free_at[i.worker] = start + 0.004 + 0.0002 * len(i.ids)
                    heapq.heappush(heap, (free_at[i.worker], i.batch_id, i.worker))
                elif isinstance(i, Complete):
                    lat.extend(now - sent_at[x] for x in i.ids.tolist())

        k = 0
        for _guard in range(50 * len(arrivals)):       # a past deadline that never clears would spin here
            if not (k < len(arrivals) or heap):
                break
            dl = d.next_deadline()
            cands = [(arrivals[k] if k < len(arrivals) else np.inf, 0), (heap[0][0] if heap else np.inf, 1),
                     (dl if dl is not None else np.inf, 2)]
            now, kind = min(cands)
            if kind == 0:
                sent_at[k] = now
                schedule(sim.issue(1, now=now), now)
                k += 1
            elif kind == 1:
                _, bid, w = heapq.heappop(heap)
                schedule(sim.result(w, bid, now=now), now)
            else:
                assert dl is not None and now >= dl
                schedule(sim.tick(now), now)
        else:
            raise AssertionError("event loop did not finish: busy loop on next_deadline()")
        assert sim.all_done_once()
        sizes = [len(b.ids) for b in sim.sent_batches]
        return float(np.percentile(lat, 99)), float(np.mean(sizes))

    p99_low, size_low = run(20.0)
    assert size_low < 1.1 and p99_low < 0.0045, "at low load every sample goes at once to an idle worker"
    p99_high, size_high = run(2000.0)                   # above what batches of 1 could serve
    assert size_high > 4 and p99_high < 0.1


# --------------------------------------------------------------------------------------------
# worker loss, duplicates, unknown results


def test_remove_worker_requeues_to_front_with_new_ids():
    sim = offline_sim(np.full(60, 10), BatchPolicy(max_batch=10, credits=2), workers=(1, 2))
    sim.issue(60)
    lost = [b for b in sim.sent_batches if b.worker == 1]
    lost_ids = [b.ids.tolist() for b in lost]
    out = sim.remove(1)
    assert out == [], "nowhere to send: worker 2 has no free credit"
    assert sim.d.pending_samples() == 40
    st = sim.d.stats
    assert st["requeued_batches"] == 2 and st["requeued_samples"] == 20
    # Worker 2 frees a credit: the requeued work goes first, oldest first, under a new batch id.
    b2 = [b for b in sim.sent_batches if b.worker == 2][0]
    out = sim.result(2, b2.batch_id)
    resent = sends(out)[0]
    assert resent.ids.tolist() == lost_ids[0]
    assert resent.batch_id not in {b.batch_id for b in lost}
    # A late result from the lost worker for its old batch is dropped.
    assert sim.d.on_result(1, lost[0].batch_id, 0.0) == []
    assert sim.d.on_result(2, lost[1].batch_id, 0.0) == []
    assert sim.d.stats["duplicates_dropped"] == 2
    sim.drain_fifo()
    assert sim.all_done_once()
    assert sim.d.stats["workers"][1]["alive"] is False


def test_late_result_after_requeued_batch_completed_elsewhere_is_dropped():
    sim = offline_sim(np.full(4, 10), BatchPolicy(max_batch=4, credits=1), workers=(1, 2))
    sim.issue(4)
    old = sim.sent_batches[0]
    assert old.worker == 1
    out = sim.remove(1)
    new = sends(out)[0]
    assert new.worker == 2 and new.ids.tolist() == old.ids.tolist() and new.batch_id != old.batch_id
    sim.result(2, new.batch_id)
    assert sim.d.on_result(1, old.batch_id, 0.0) == []   # late reply of the lost worker
    assert sim.d.on_result(2, old.batch_id, 0.0) == []   # retired id, from anyone
    assert sim.d.on_result(2, new.batch_id, 0.0) == []   # second reply
    assert sim.d.stats["duplicates_dropped"] == 3
    assert sim.all_done_once() and sim.d.idle()


def test_unknown_and_wrong_worker_results_dropped():
    sim = offline_sim(np.full(4, 10), BatchPolicy(max_batch=2, credits=1), workers=(1, 2))
    sim.issue(4)
    b = sim.sent_batches[0]
    assert sim.d.on_result(2, b.batch_id, 0.0) == []     # belongs to worker 1
    assert sim.d.on_result(1, 999, 0.0) == []
    assert sim.d.on_result(1, -1, 0.0) == []
    assert sim.d.on_result(42, b.batch_id, 0.0) == []
    st = sim.d.stats
    assert (st["wrong_worker_dropped"], st["unknown_dropped"], st["duplicates_dropped"]) == (2, 2, 0)
    assert sim.d.in_flight(1) == 1, "a misdirected result must not free the batch"
    sim.drain_fifo()
    assert sim.all_done_once()


def test_remove_unknown_worker_is_noop():
    sim = server()
    assert sim.d.remove_worker(99, 0.0) == []


def test_no_workers_emitted_once_then_rearmed_by_join():
    sim = offline_sim(np.full(30, 10), BatchPolicy(max_batch=10, credits=1), workers=(1, 2))
    sim.issue(30)
    assert sim.remove(1) == []                          # worker 2 still alive
    out = sim.remove(2)
    assert out == [NoWorkers(30)]
    assert sim.d.pending_samples() == 30 and sim.d.in_flight() == 0
    assert sim.issue(1) == [] and sim.tick(1.0) == [] and sim.flush(1.0) == []
    out = sim.add(3)
    assert sends(out) and sends(out)[0].worker == 3
    sim.drain_fifo()
    assert sim.all_done_once()
    sim.issue(2)                                        # new pending work, then lose the last worker
    out = sim.remove(3)
    assert out == [NoWorkers(2)] and len(sim.no_workers) == 2


def test_no_workers_when_work_arrives_after_last_worker_left_idle():
    sim = server()
    assert sim.remove(1) == []                          # idle: nothing to report
    out = sim.issue(1, now=0.0)
    assert out == [NoWorkers(1)]


def test_abort_returns_every_outstanding_id_once():
    sim = server(max_batch=2, credits=1, workers=(1, 2))
    a = sim.issue(1, now=0.0)[0]                       # worker 1
    b = sim.issue(1, now=0.0)[0]                       # worker 2
    sim.result(1, a.batch_id, now=0.001)               # id 0 done
    sim.issue(1, now=0.001)                            # id 2 -> idle worker 1
    sim.issue(2, now=0.001)                            # ids 3, 4: a full batch, queued (no credit)
    sim.issue(1, now=0.001)                            # id 5: open
    d = sim.d
    assert d.pending_samples() == 3 and d.in_flight() == 2
    ids = sim.abort()
    assert sorted(ids.tolist()) == [1, 2, 3, 4, 5]
    assert d.idle() and d.pending_samples() == 0 and d.in_flight() == 0 and d.next_deadline() is None
    assert d.on_result(2, b.batch_id, 0.002) == [], "late result after abort is a duplicate"
    assert d.stats["duplicates_dropped"] == 1 and d.stats["samples_aborted"] == 5
    assert d.abort().tolist() == []
    assert sim.all_done_once()
    out = sim.issue(1, now=0.003)                      # credits were restored: still usable
    assert sends(out) and d.in_flight() == 1


def test_abort_offline_and_empty():
    sim = offline_sim(np.arange(1, 51), BatchPolicy(max_batch=8, credits=2), workers=(1,))
    assert sim.d.abort().tolist() == []
    sim.issue(50)
    first = sim.sent_batches[0]
    sim.result(1, first.batch_id)
    ids = sim.abort()
    assert len(ids) == 50 - len(first.ids) and len(set(ids.tolist())) == len(ids)
    assert sim.all_done_once() and sim.d.idle()


def test_rejoined_worker_keeps_counters():
    sim = server(max_batch=2)
    b = sim.issue(1)[0]
    sim.result(1, b.batch_id)
    sim.remove(1)
    sim.add(1)
    w = sim.d.stats["workers"][1]
    assert w["alive"] and w["batches_completed"] == 1 and sim.d.workers() == [1]


def test_stats_add_up():
    sim = offline_sim(np.full(95, 10), BatchPolicy(max_batch=10, credits=2), workers=(1, 2, 3))
    sim.issue(95)
    sim.drain_fifo()
    st = sim.d.stats
    assert st["samples_issued"] == st["samples_completed"] == 95
    assert st["batches_sent"] == st["batches_completed"] == 10
    assert sum(w["samples_sent"] for w in st["workers"].values()) == 95
    assert st["batches_in_flight"] == 0 and st["samples_pending"] == 0


# --------------------------------------------------------------------------------------------
# randomized: joins, losses, results in random order, duplicates, ticks, flushes


@pytest.mark.parametrize("timeout,hedge", [(0.0, False), (0.004, False), (0.0, True), (0.004, True)])
@pytest.mark.parametrize("scenario", ["Offline", "Server", "SingleStream"])
@pytest.mark.parametrize("seed", range(12))
def test_randomized_every_id_completed_exactly_once(scenario, seed, timeout, hedge):
    """With ``timeout`` > 0 (~8 steps of this fake clock), batches also time out and are requeued
    while their worker may still answer them; with ``hedge``, overdue batches (margins of a few
    steps) are copied, and copies answer, die, time out and answer late in any order: every id must
    still complete exactly once."""
    rng = random.Random(seed * 7919 + len(scenario))
    lengths = np.array([rng.randint(1, 384) for _ in range(500)])
    policy = BatchPolicy(max_batch=rng.choice([1, 3, 8, 32]), credits=rng.choice([1, 2, 3]),
                         token_budget=rng.choice([None, 500, 3000]), max_wait_s=rng.choice([0.0, 0.001, 0.01]),
                         batch_timeout_s=timeout)
    if hedge:   # drawn after the rest, so the runs without hedging keep their seeds' sequences
        policy = dataclasses.replace(policy, hedge=True, hedge_factor=rng.choice([1.0, 2.0]),
                                     hedge_floor_s=rng.choice([0.0, 0.001]), hedge_budget=rng.choice([0.05, 1.0]))
    d = Dispatcher(scenario, policy, lengths, want_logits=bool(seed % 2))
    sim = Sim(d, lengths)
    now = 0.0
    next_worker = 1

    def join():
        nonlocal next_worker
        sim.add(next_worker, now, max_batch=rng.choice([None, 1, 2, 5, 100]))
        next_worker += 1

    for _ in range(rng.randint(1, 3)):
        join()
    issued_target = rng.randint(50, 400)
    for step in range(1500):
        now += rng.expovariate(2000.0)
        r = rng.random()
        live = [w for w in sim.held]
        holding = [(w, b) for w in live for b in sim.held[w]]
        if r < 0.35 and sim.next_id < issued_target:
            if scenario == "Offline":
                sim.issue(rng.randint(1, 60), now)
            else:
                sim.issue(1 if rng.random() < 0.9 else rng.randint(2, 5), now)
        elif r < 0.70 and holding:
            w, b = rng.choice(holding)
            sim.result(w, b, now)
        elif r < 0.75 and sim.retired:
            w, b = rng.choice(sim.retired)                   # late or second reply
            assert d.on_result(w, b, now) == []
        elif r < 0.77 and holding:
            w, b = rng.choice(holding)
            other = rng.choice([x for x in live if x != w] or [10_000])
            assert d.on_result(other, b, now) == []
        elif r < 0.80 and len(live) < 5:
            join()
        elif r < 0.83 and live:
            sim.remove(rng.choice(live), now)
        elif r < 0.86:
            sim.flush(now)
        elif r < 0.865:
            sim.abort()
        else:
            dl = d.next_deadline()
            if dl is not None:
                if not timeout and not hedge:
                    assert dl <= now + policy.max_wait_s + 1e-12
                now = max(now, dl)
                sim.tick(now)
    # Wind down: make sure someone is alive, flush, drain everything.
    if not sim.held:
        join()
    sim.flush(now)
    for _ in range(10_000):
        if d.idle():
            break
        holding = [(w, b) for w in sim.held for b in sim.held[w]]
        if holding:
            w, b = rng.choice(holding)
            sim.result(w, b, now)
        else:
            now += policy.max_wait_s
            sim.tick(now)
            sim.flush(now)
    assert d.idle()
    assert sim.next_id > 0 and sim.all_done_once(), "every issued id must be completed exactly once"
    st = d.stats
    assert st["samples_completed"] + st["samples_aborted"] == st["samples_issued"] == len(sim.issued)
    assert d.next_deadline() is None
    assert st["timed_out_batches"] == len(sim.requeued)
    h = st["hedges"]
    assert h["sent"] == len(sim.hedged) and h["copies_retired"] == len(sim.retired_copies)
    assert h["won"] + h["wasted"] <= h["sent"] and (hedge or h["sent"] == 0)
    assert h["samples"] <= policy.hedge_budget * st["samples_issued"]


# ---------------------------------------------------------------------------------------------
# lost batches: a batch in flight past the timeout is requeued (ZeroMQ may drop a message while
# a worker reconnects; the worker stays alive, so no loss event ever comes)


def test_a_lost_batch_is_requeued_after_the_timeout_and_its_late_result_dropped():
    sim = offline_sim(np.full(4, 10), BatchPolicy(max_batch=4, credits=1, batch_timeout_s=5.0), workers=(1, 2))
    sent = sim.issue(4, now=0.0)
    (lost,) = [i for i in sent if isinstance(i, SendBatch)]
    assert sim.d.next_deadline() == pytest.approx(5.0)
    assert sim.tick(4.999) == []                                      # not yet
    out = sim.tick(5.0)
    assert isinstance(out[0], Requeued) and (out[0].worker, out[0].batch_id) == (lost.worker, lost.batch_id)
    resend = out[1]
    assert isinstance(resend, SendBatch) and resend.batch_id != lost.batch_id
    assert resend.ids.tolist() == lost.ids.tolist()
    assert sim.d.on_result(lost.worker, lost.batch_id, 6.0) == []        # the late reply: a duplicate
    done = sim.result(resend.worker, resend.batch_id, 6.0)
    assert isinstance(done[0], Complete) and done[0].ids.tolist() == lost.ids.tolist()
    assert sim.all_done_once() and sim.d.idle()
    st = sim.d.stats
    assert st["timed_out_batches"] == 1 and st["duplicates_dropped"] == 1 and st["requeued_samples"] == 4


def test_the_timeout_grows_with_the_slowest_batch_seen():
    sim = offline_sim(np.full(8, 10), BatchPolicy(max_batch=2, credits=1, batch_timeout_s=1.0), workers=(1,))
    first = [i for i in sim.issue(8, now=0.0) if isinstance(i, SendBatch)][0]
    out = sim.result(first.worker, first.batch_id, 0.5)                # 0.5 s: timeout max(1, 5) = 5 s
    nxt = [i for i in out if isinstance(i, SendBatch)][0]
    assert sim.d.next_deadline() == pytest.approx(0.5 + 5.0)
    assert sim.tick(5.4) == []
    assert [type(i) for i in sim.tick(5.5)][:1] == [Requeued]
    assert nxt.batch_id not in sim.held[1]
    assert sim.d.stats["slowest_batch_s"] == pytest.approx(0.5)


def test_no_timeout_by_default():
    sim = offline_sim(np.full(4, 10), BatchPolicy(max_batch=4, credits=1), workers=(1,))
    sim.issue(4, now=0.0)
    assert sim.d.next_deadline() is None
    assert sim.tick(1e9) == [] and sim.d.in_flight() == 1
    with pytest.raises(ValueError, match="batch_timeout_s"):
        BatchPolicy(batch_timeout_s=-1.0)
