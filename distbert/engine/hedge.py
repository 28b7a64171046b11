"""Hedged re-sends: how long a batch may take on its worker before a copy goes to another one.

"The Tail at Scale" (Dean and Barroso): a request that has waited longer than the slow end of its
peers' times is sent again to another replica, and the first answer wins; that cuts the tail a slow
or stopped replica causes for a few percent of extra work. Here the replica is a worker and the
request a batch. This module is the pure bookkeeping the dispatcher (``engine/dispatcher``) asks:

* :class:`BatchTimes` keeps each worker's recent *service* times per batch-size class (``rows``
  rounded down to a power of two): the time from when a batch reached the head of its worker's
  queue (it was sent to an idle worker, or the batch before it returned) to its result. Measuring
  from the send would count the wait behind the batch ahead (``credits = 2`` pipelines two) as
  slowness. A batch is *overdue* once it has been at the head longer than
  ``factor x p90 + floor``, the p90 taken over that worker's last :data:`WINDOW` times for that
  size class. The p90 (not the maximum) keeps one earlier stall from raising the bar for the next
  ones; the floor keeps scheduler jitter of a few ms on a fast backend from firing hedges.
* With no time yet for that worker and class, the slowest p90 of the other workers for the class
  stands in, then the worker's own next larger class; with nothing known, no hedge (the lost-batch
  timeout still applies).

Defaults (``BatchPolicy``, ``--hedge-*``) and the measurement behind them: ``docs/faults.md``,
"Hedged re-sends".
"""

from __future__ import annotations

import collections
from typing import Any

from distbert.config import BatchConfig

#: service times kept per (worker, size class)
WINDOW = 16
#: the percentile of the window a margin is taken from
PERCENTILE = 0.9


def size_class(rows: int) -> int:
    """1 -> 1, 2..3 -> 2, 4..7 -> 3, ...: batches within a factor of two share their times."""
    return rows.bit_length()


class BatchTimes:
    """Recent service times by (worker, size class), and the margin a batch may run before it is overdue."""

    def __init__(self, factor: float, floor_s: float) -> None:
        self.factor = factor
        self.floor_s = floor_s
        self._times: dict[tuple[int, int], collections.deque[float]] = {}
        self._high: dict[tuple[int, int], float] = {}    # p90 of each window, kept current by record()

    def record(self, worker: int, rows: int, seconds: float) -> None:
        key = (worker, size_class(rows))
        window = self._times.get(key)
        if window is None:
            window = self._times[key] = collections.deque(maxlen=WINDOW)
        window.append(seconds)
        ordered = sorted(window)
        self._high[key] = ordered[int(PERCENTILE * (len(ordered) - 1))]

    def high(self, worker: int, rows: int) -> float | None:
        """The p90 service time for a batch of ``rows`` on ``worker`` (or a stand-in; None: unknown)."""
        c = size_class(rows)
        own = self._high.get((worker, c))
        if own is not None:
            return own
        peers = [t for (w, k), t in self._high.items() if k == c]
        if peers:
            return max(peers)
        larger = [(k, t) for (w, k), t in self._high.items() if w == worker and k > c]
        return min(larger)[1] if larger else None

    def margin(self, worker: int, rows: int) -> float | None:
        """Seconds a batch of ``rows`` may spend at the head of ``worker``'s queue before it is overdue."""
        high = self.high(worker, rows)
        return None if high is None else self.factor * high + self.floor_s


#: the scenarios ``--hedge auto`` hedges in: all three (docs/faults.md, "Hedged re-sends"). Offline too:
#: a hedge goes out only once the queue is empty, so there it is the tail's backup batch: a worker
#: stopped 3 s over the tail of a 6000-sample run, 8.58 -> 6.75 s with hedging; stopped mid-run (the
#: queue outlasted the stall), no hedge and the same 7.15 s; no fault, no hedge.
AUTO_SCENARIOS = frozenset({"Offline", "Server", "SingleStream"})


def hedging(mode: str, scenario: str) -> bool:
    """Whether a test of ``scenario`` hedges under ``--hedge mode`` (auto | on | off)."""
    return scenario in AUTO_SCENARIOS if mode == "auto" else mode == "on"


def hedge_policy(batch: BatchConfig, scenario: str) -> dict[str, Any]:
    """The ``BatchPolicy`` hedging fields of a test of ``scenario`` under the run's ``--hedge*`` flags."""
    return {"hedge": hedging(batch.hedge, scenario), "hedge_factor": batch.hedge_factor,
            "hedge_floor_s": batch.hedge_floor_ms / 1000.0, "hedge_budget": batch.hedge_budget_pct / 100.0}
