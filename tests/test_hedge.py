"""Hedged re-sends in the pure dispatcher, with an injected clock (STYLE §3): when a hedge fires, where
it goes, the budget, which copy wins, and every way a copy can be lost. ``Sim`` (tests/test_dispatcher)
checks the contract on every instruction: above all that each response id is completed exactly once.
The randomized exactly-once test in tests/test_dispatcher.py also runs with hedging on."""

from __future__ import annotations

import numpy as np
import pytest

from distbert.config import BatchConfig
from distbert.engine.dispatcher import BatchPolicy, Complete, Dispatcher, Hedged, Requeued, Retired, SendBatch
from distbert.engine.hedge import BatchTimes, hedge_policy, hedging, size_class
from tests.test_dispatcher import Sim, sends

TOOK = 0.010                       # every warm-up batch takes 10 ms
MARGIN = 2 * TOOK + 0.05           # factor 2 x p90 + floor 50 ms


def server(workers=(1, 2), credits=2, budget=1.0, timeout=0.0, scenario="Server", warm=True, max_wait=0.002):
    policy = BatchPolicy(max_batch=8, credits=credits, max_wait_s=max_wait, batch_timeout_s=timeout, hedge=True,
                         hedge_factor=2.0, hedge_floor_s=0.05, hedge_budget=budget)
    sim = Sim(Dispatcher(scenario, policy, np.full(10_000, 10), want_logits=False))
    for w in workers:
        sim.add(w, 0.0)
    if warm:   # each worker has run single samples in 10 ms: a 1-sample batch is overdue after 70 ms
        now = 0.0
        for _ in range(4 * len(workers)):
            (s,) = sends(sim.issue(1, now))
            sim.result(s.worker, s.batch_id, now + TOOK)
            now += 0.05
    return sim


def stuck(sim, now=1.0) -> SendBatch:
    """One sample issued at ``now`` that goes to an idle worker (which then never answers)."""
    (s,) = sends(sim.issue(1, now))
    return s


def hedged_pair(**kw) -> tuple[Sim, SendBatch, SendBatch]:
    """``server(**kw)`` with one sample stuck on its worker since t = 1 s and hedged at its due time:
    the simulation, the original batch and its copy."""
    sim = server(**kw)
    orig = stuck(sim, 1.0)
    _, copy = hedge_of(sim.tick(1.0 + MARGIN))
    return sim, orig, copy


def hedge_of(out) -> tuple[Hedged, SendBatch]:
    (h,) = [i for i in out if isinstance(i, Hedged)]
    (s,) = [i for i in out if isinstance(i, SendBatch) and i.batch_id == h.batch_id]
    return h, s


# --------------------------------------------------------------------------------------------
# when and where


def test_a_hedge_fires_only_past_the_margin_and_goes_to_the_idle_worker():
    sim = server()
    orig = stuck(sim, 1.0)
    assert sim.d.next_deadline() == pytest.approx(1.0 + MARGIN)
    assert sim.tick(1.0 + MARGIN - 1e-6) == []
    h, copy = hedge_of(sim.tick(1.0 + MARGIN))
    assert (h.of_worker, h.of_batch_id) == (orig.worker, orig.batch_id)
    assert copy.worker == h.worker != orig.worker and copy.ids is orig.ids and copy.batch_id != orig.batch_id
    assert h.waited_s == pytest.approx(MARGIN)
    st = sim.d.stats["hedges"]
    assert st["sent"] == 1 and st["samples"] == 1 and st["won"] == st["wasted"] == 0


def test_the_margin_follows_the_batch_size_and_the_worker():
    times = BatchTimes(factor=2.0, floor_s=0.05)
    assert times.margin(1, 1) is None                       # nothing known: no hedge
    for t in [0.010] * 9 + [0.5]:                           # one stall among ten: the p90 ignores it
        times.record(1, 1, t)
    assert times.margin(1, 1) == pytest.approx(2 * 0.010 + 0.05)
    times.record(1, 32, 0.200)
    assert times.margin(1, 20) == pytest.approx(2 * 0.200 + 0.05)   # 20 rows: the 16..31 class...
    assert size_class(20) == size_class(31) != size_class(32)
    assert times.margin(1, 4) == pytest.approx(2 * 0.200 + 0.05)    # ...no own time for 4 rows: the next larger
    assert times.margin(2, 1) == pytest.approx(2 * 0.010 + 0.05)    # a worker with none: its peers'


def test_no_history_no_hedge():
    sim = server(warm=False)
    stuck(sim, 0.0)
    assert sim.d.next_deadline() is None
    assert sim.tick(100.0) == [] and sim.d.stats["hedges"]["sent"] == 0


def test_no_idle_worker_no_hedge_until_a_credit_frees_and_no_timer_spins():
    sim = server(credits=1)
    orig = stuck(sim, 1.0)
    other = stuck(sim, 1.0)                                 # the other worker is busy too
    assert other.worker != orig.worker
    sim.result(other.worker, other.batch_id, 1.0 + TOOK)
    busy = stuck(sim, 1.0 + TOOK)                           # and busy again
    assert busy.worker == other.worker
    assert sim.tick(1.0 + MARGIN) == []                     # overdue, but nowhere to hedge to
    assert sim.d.next_deadline() != pytest.approx(1.0 + MARGIN) and (
        sim.d.next_deadline() is None or sim.d.next_deadline() > 1.0 + MARGIN)   # nothing in the past to spin on
    out = sim.result(busy.worker, busy.batch_id, 1.2)       # a credit frees: the hedge takes it
    assert isinstance(out[0], Complete)
    h, copy = hedge_of(out)
    assert copy.worker == busy.worker and h.of_batch_id == orig.batch_id


def test_the_slow_worker_never_gets_its_own_hedge_nor_does_another_overdue_one():
    sim = server(workers=(1, 2, 3))
    a, b, c = stuck(sim, 1.0), stuck(sim, 1.0), stuck(sim, 1.0)   # one on each worker
    assert {a.worker, b.worker, c.worker} == {1, 2, 3}
    sim.result(c.worker, c.batch_id, 1.0 + TOOK)              # c's worker is healthy and idle
    out = sim.tick(1.0 + MARGIN)                               # a's and b's workers are overdue
    hedged = [i for i in out if isinstance(i, Hedged)]
    assert sorted(h.of_batch_id for h in hedged) == sorted([a.batch_id, b.batch_id])
    assert {h.worker for h in hedged} == {c.worker}            # both on the one healthy worker (2 credits)


def test_a_batch_waiting_behind_a_stuck_one_is_hedged_too():
    sim = server(workers=(1, 2), max_wait=0.0)
    first = stuck(sim, 1.0)                                    # worker 1 never answers
    more = [stuck(sim, 1.0) for _ in range(3)]                 # 2 credits each: worker 1 takes one more
    (behind,) = [s for s in more if s.worker == first.worker]
    for s in more:
        if s.worker != first.worker:
            sim.result(s.worker, s.batch_id, 1.0 + TOOK)       # the other worker is free again
    out = sim.tick(1.0 + MARGIN)
    assert sorted(h.of_batch_id for h in out if isinstance(h, Hedged)) == sorted([first.batch_id, behind.batch_id])


def test_the_clock_starts_when_a_batch_reaches_the_head_not_when_it_is_sent():
    """Two credits pipeline two batches: the second waits behind the first on a healthy worker, and
    that wait is not slowness."""
    sim = server(workers=(1, 2), max_wait=0.0)
    batches = [stuck(sim, 1.0) for _ in range(4)]               # two on each worker
    first = batches[0]
    second = next(s for s in batches[1:] if s.worker == first.worker)
    for s in batches:
        if s.worker != first.worker:
            sim.result(s.worker, s.batch_id, 1.0 + TOOK)        # the other worker is done
    sim.result(first.worker, first.batch_id, 1.0 + 0.06)         # slow-ish, but within its 70 ms margin
    assert not any(isinstance(i, Hedged) for i in sim.tick(1.0 + MARGIN + 0.01))   # sent 80 ms ago, head for 20
    assert sim.d.next_deadline() == pytest.approx(1.06 + MARGIN)
    h, _ = hedge_of(sim.tick(1.06 + MARGIN))
    assert h.of_batch_id == second.batch_id


def test_the_budget_caps_hedged_samples_and_grows_with_issued_samples():
    sim = server(budget=0.1)                                   # warm-up: 8 samples issued
    orig = stuck(sim, 1.0)                                     # 9 issued: a budget of 0.9 samples
    assert sim.tick(1.0 + MARGIN) == []
    assert sim.d.stats["hedges"]["sent"] == 0
    out = sim.issue(1, 1.0 + MARGIN + 0.001)                   # 10 issued: 1 sample may be hedged
    h, _ = hedge_of(out)
    assert h.of_batch_id == orig.batch_id
    st = sim.d.stats
    assert st["hedges"]["samples"] == 1 <= 0.1 * st["samples_issued"]


def test_a_batch_is_hedged_at_most_once():
    sim = server(workers=(1, 2, 3))
    orig = stuck(sim, 1.0)
    h, copy = hedge_of(sim.tick(1.0 + MARGIN))
    sim.remove(orig.worker, 1.2)                               # the original is gone; the copy stalls too
    assert sim.tick(5.0) == [] and sim.d.stats["hedges"]["sent"] == 1
    sim.result(copy.worker, copy.batch_id, 5.1)
    assert sim.all_done_once()


# --------------------------------------------------------------------------------------------
# the first result wins, the late one is dropped


@pytest.mark.parametrize("first", ["copy", "original"])
def test_the_first_result_completes_and_the_late_one_is_dropped(first):
    sim, orig, copy = hedged_pair()
    winner, loser = (copy, orig) if first == "copy" else (orig, copy)
    out = sim.result(winner.worker, winner.batch_id, 1.2)
    assert [type(i) for i in out][:1] == [Complete] and out[0].batch_id == winner.batch_id
    assert sim.d.in_flight(loser.worker) == 1                  # the loser's worker is still busy with it
    assert sim.d.expected_ids(loser.worker, loser.batch_id) is None   # nothing of its result will be used
    late = sim.result(loser.worker, loser.batch_id, 3.0)
    assert not any(isinstance(i, Complete) for i in late)
    assert sim.d.in_flight(loser.worker) == 0 and sim.d.idle() and sim.all_done_once()
    st = sim.d.stats
    assert st["hedges"] == {"sent": 1, "won": int(first == "copy"), "wasted": int(first == "original"),
                            "samples": 1, "late_results_dropped": 1, "copies_retired": 0}
    assert st["duplicates_dropped"] == 0 and st["samples_completed"] == st["samples_issued"]
    assert sim.d.on_result(loser.worker, loser.batch_id, 3.1) == []   # a third reply: a plain duplicate


def test_a_stuck_worker_gets_no_new_work_while_its_answered_copy_holds_its_credits():
    sim, orig, copy = hedged_pair(credits=1)
    sim.result(copy.worker, copy.batch_id, 1.1)
    nxt = stuck(sim, 1.2)
    assert nxt.worker == copy.worker                           # not the stuck one: its credit is taken
    assert sim.d.stats["workers"][orig.worker]["in_flight"] == 1


# --------------------------------------------------------------------------------------------
# loss: a lost copy is forgotten while its twin lives; the last copy lost is requeued once


@pytest.mark.parametrize("lost", ["original", "copy"])
def test_one_copys_worker_lost_the_other_alone_answers(lost):
    sim, orig, copy = hedged_pair()
    gone, left = (orig, copy) if lost == "original" else (copy, orig)
    assert sends(sim.remove(gone.worker, 1.1)) == [] and sim.d.pending_samples() == 0
    out = sim.result(left.worker, left.batch_id, 1.2)
    assert isinstance(out[0], Complete) and sim.all_done_once()
    st = sim.d.stats
    assert st["requeued_batches"] == 0
    assert (st["hedges"]["won"], st["hedges"]["wasted"]) == ((1, 0) if lost == "original" else (0, 1))


@pytest.mark.parametrize("order", ["original first", "copy first"])
def test_both_copies_lost_the_samples_are_requeued_once(order):
    sim, orig, copy = hedged_pair(workers=(1, 2))
    first, second = (orig, copy) if order == "original first" else (copy, orig)
    sim.add(3, 1.1)
    assert sends(sim.remove(first.worker, 1.2)) == []
    (again,) = sends(sim.remove(second.worker, 1.3))           # the last copy: requeued once, to worker 3
    assert again.worker == 3 and again.ids.tolist() == orig.ids.tolist()
    sim.result(3, again.batch_id, 1.4)
    assert sim.all_done_once()
    st = sim.d.stats
    assert st["requeued_batches"] == 1 and st["requeued_samples"] == 1


def test_a_worker_lost_with_an_answered_copy_requeues_nothing():
    sim, orig, copy = hedged_pair()
    sim.result(copy.worker, copy.batch_id, 1.1)
    out = sim.remove(orig.worker, 1.2)
    assert out == [] and sim.d.pending_samples() == 0 and sim.d.idle() and sim.all_done_once()
    assert sim.d.stats["requeued_batches"] == 0


def test_a_restart_drops_the_old_copy_and_the_new_worker_starts_clean():
    """The coordinator handles a restarted worker's Ready as a removal and a join under the same id."""
    sim, orig, copy = hedged_pair()
    sim.remove(orig.worker, 1.1)
    sim.add(orig.worker, 1.1)
    assert sim.d.in_flight(orig.worker) == 0 and sim.d.pending_samples() == 0
    sim.result(copy.worker, copy.batch_id, 1.2)
    fresh = stuck(sim, 1.3)
    sim.result(fresh.worker, fresh.batch_id, 1.3 + TOOK)
    assert sim.all_done_once() and sim.d.idle()


def test_the_lost_batch_timeout_retires_a_copy_and_requeues_only_the_last():
    sim, orig, copy = hedged_pair(timeout=1.0)   # 10 x slowest (10 ms) < 1 s: the timeout is 1 s; the copy stalls too
    out = sim.tick(2.0)
    assert [type(i) for i in out] == [Retired] and (out[0].worker, out[0].batch_id) == (orig.worker, orig.batch_id)
    assert sim.d.pending_samples() == 0 and sim.d.in_flight(orig.worker) == 0
    out = sim.tick(1.0 + MARGIN + 1.0)                         # the copy, sent at 1 + MARGIN
    assert isinstance(out[0], Requeued) and out[0].batch_id == copy.batch_id
    (again,) = sends(out)
    assert again.ids.tolist() == orig.ids.tolist()
    assert sim.d.on_result(orig.worker, orig.batch_id, 2.5) == []   # late replies of both: duplicates
    sim.result(again.worker, again.batch_id, 2.6)
    assert sim.d.on_result(copy.worker, copy.batch_id, 2.7) == []
    assert sim.all_done_once()
    st = sim.d.stats
    assert st["timed_out_batches"] == st["requeued_batches"] == 1 and st["hedges"]["copies_retired"] == 1


def test_an_answered_copy_past_the_timeout_frees_its_workers_credit():
    sim, orig, copy = hedged_pair(timeout=1.0, credits=1)
    sim.result(copy.worker, copy.batch_id, 1.1)                # the original never comes (its message was lost)
    assert sim.d.next_deadline() == pytest.approx(2.0)
    out = sim.tick(2.0)
    assert [type(i) for i in out] == [Retired] and sim.d.in_flight(orig.worker) == 0
    assert sim.d.idle() and sim.all_done_once() and sim.d.next_deadline() is None


def test_abort_returns_a_hedged_pairs_ids_once():
    sim, _, _ = hedged_pair()
    ids = sim.abort()                                          # Sim completes them: twice would fail
    assert len(ids) == 1 and sim.all_done_once()
    assert sim.d.idle() and sim.d.next_deadline() is None


# --------------------------------------------------------------------------------------------
# Offline, and the run's policy


def test_offline_hedges_only_once_the_queue_has_drained():
    sim = server(scenario="Offline", credits=1, warm=False)
    sim.d._times.record(1, 8, TOOK)                            # both workers ran 8-row batches in 10 ms
    sim.d._times.record(2, 8, TOOK)
    slow, other = sends(sim.issue(40, 1.0))                    # 5 batches of 8: one on each worker, 3 queued
    now = 1.0
    for _ in range(3):                                         # the healthy one takes 30 ms a batch
        now += 0.03
        out = sim.result(other.worker, other.batch_id, now) + sim.tick(now)
        assert not any(isinstance(i, Hedged) for i in out)     # overdue at 1.07, but queued work goes first
        (other,) = sends(out)
    assert sim.d.pending_samples() == 0
    h, copy = hedge_of(sim.result(other.worker, other.batch_id, now + 0.03))
    assert h.of_batch_id == slow.batch_id and copy.worker == other.worker


def test_offline_tail_a_held_batch_goes_before_a_hedge():
    """The Offline tail holds a queued batch for the next idle worker rather than prefetch it onto a
    busy one (dispatcher._pump): the free credit that leaves is not a hedge's either."""
    sim = server(scenario="Offline", credits=2, warm=False)
    sim.d._times.record(1, 8, TOOK)
    sim.d._times.record(2, 8, TOOK)
    sent = sends(sim.issue(40, 1.0))                           # 5 batches: 2 on each worker, 1 queued
    a_batches = [s for s in sent if s.worker == 1]
    b_batches = [s for s in sent if s.worker == 2]
    assert len(a_batches) == len(b_batches) == 2
    assert sends(sim.result(2, b_batches[0].batch_id, 1.0 + TOOK)) == []   # held: worker 2 is still busy
    assert sim.d.pending_samples() == 8
    assert not any(isinstance(i, Hedged) for i in sim.tick(1.0 + MARGIN))  # worker 1 overdue; queue first
    out = sim.result(2, b_batches[1].batch_id, 1.0 + MARGIN + 0.001)
    held, copy = sends(out)[0], hedge_of(out)[1]
    assert held.worker == copy.worker == 2 and held.batch_id < copy.batch_id
    assert copy.ids is a_batches[0].ids


def test_the_run_policy_per_scenario():
    assert all(hedging("auto", s) for s in ("Offline", "Server", "SingleStream"))   # measured: docs/faults.md
    assert hedging("on", "Offline") and not hedging("off", "Server")
    got = hedge_policy(BatchConfig(hedge="auto", hedge_factor=3.0, hedge_floor_ms=80.0, hedge_budget_pct=2.0),
                       "Server")
    assert got == {"hedge": True, "hedge_factor": 3.0, "hedge_floor_s": 0.08, "hedge_budget": 0.02}
    assert BatchPolicy().hedge is False                        # the pure default: the driver decides


def test_a_late_copy_from_the_last_test_is_a_duplicate_in_the_next():
    sim, orig, copy = hedged_pair()
    sim.result(copy.worker, copy.batch_id, 1.1)               # the test ends; the original is still owed
    nxt = Dispatcher("Server", sim.d.policy, np.full(10_000, 10), want_logits=False)
    nxt.continue_ids(sim.d)
    nxt.add_worker(orig.worker, 2.0)
    (first,) = sends(nxt.on_samples(np.array([7], np.uint64), np.array([7], np.int64), 2.0))
    assert first.batch_id > copy.batch_id                      # not the owed batch's id
    assert nxt.on_result(orig.worker, orig.batch_id, 2.1) == [] and nxt.stats["duplicates_dropped"] == 1
    assert nxt.in_flight(orig.worker) == 1


@pytest.mark.parametrize("kw", [dict(hedge_factor=0.5), dict(hedge_floor_s=-1.0), dict(hedge_budget=1.5),
                                dict(hedge_budget=float("nan"))])
def test_policy_rejects_bad_hedge_values(kw):
    with pytest.raises(ValueError, match="hedge"):
        BatchPolicy(**kw)
