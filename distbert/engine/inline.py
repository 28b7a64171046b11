"""Rank 0's own worker on rank 0's driver thread (``distbert run --in-process-worker``).

For the edge scenarios on a machine whose one device rank 0 can drive itself: the driver runs each
batch on the backend the moment it dispatches it, so a SingleStream query crosses one thread
hand-off (LoadGen's issue thread to the driver) instead of five, and no socket at all; when the
driver is idle, not even that: the coordinator runs a one-sample query on LoadGen's issue thread
itself (:meth:`compute`, ``Coordinator.issue``).

It is a :class:`~distbert.wire.base.CoordinatorTransport` to the coordinator, so the coordinator,
the dispatcher and every guarantee (exactly-once, validation, the run record) are the same code as
with any other worker: ``send(Setup)`` loads the model and queues the Ready, ``send(Batch)`` runs the
batch and queues its Result (or Failure), ``send(Heartbeat)`` queues one back, ``send(Shutdown)``
queues the Bye; ``recv`` hands them over in order. The price: while a batch computes, the driver
does nothing else, so there is no overlap of batches (Offline and Server want worker processes).

Warm where it serves (issue 19): batches run on two threads here, the driver (``send(Batch)``) and
LoadGen's issue thread (the direct path), and a GPU keeps per-thread state. The driver warms every
warm-up batch while it handles the Setup, before the Ready; LoadGen issues on the thread that calls
``StartTest`` (checked with mlcommons-loadgen 6.0.17: SingleStream, Server and Offline), which is the
thread that started the coordinator, so :meth:`InlineWorker.warm_caller`, which the coordinator
calls on that thread once everyone is Ready, warms the one-sample shapes the direct path runs there.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import traceback

from distbert.config import RunConfig
from distbert.engine.worker import Worker
from distbert.util import trace
from distbert.wire import messages as m
from distbert.wire._common import DropLog, Inbox, PeerTable, deadline_after
from distbert.wire.base import CoordinatorTransport, Endpoint

log = logging.getLogger(__name__)


class InlineWorker(CoordinatorTransport):
    def __init__(self, rank: int = 1) -> None:
        self.rank = rank
        self.endpoint = Endpoint("inline://", "")
        self._peers = PeerTable(None, DropLog(log), log)
        self._peers.worker_of[rank] = rank  # the one peer: forget() may drop it
        self._peers.peer_of[rank] = rank
        self._out = Inbox()
        self._worker = Worker(transport=None, rank=rank, local_index=0, local_count=1,  # type: ignore[arg-type]
                              pin=False, serving_threads=False)
        self._closed = False
        self._out.put(m.Hello(rank, socket.gethostname(), os.getpid(), ""))

    def send(self, worker: int, msg: m.Message) -> None:
        if worker not in self._peers.peer_of:
            raise KeyError(f"worker {worker} is not rank 0's in-process worker")
        w = self._worker
        if isinstance(msg, m.Batch):
            self._out.put(self.compute(msg))
        elif isinstance(msg, m.Heartbeat):
            self._out.put(m.Heartbeat(rank=self.rank, sent_at=time.time()))
        elif isinstance(msg, m.Setup):
            try:
                self._out.put(w.configure(RunConfig.from_json(msg.config_json)))
            except Exception as exc:  # the model did not load: a Failure, as from any worker
                log.exception("in-process worker: setup failed")
                self._out.put(m.Failure(rank=self.rank, host=socket.gethostname(), batch_id=-1,
                                        exc_type=type(exc).__name__, text=str(exc),
                                        traceback="".join(traceback.format_exception(exc))))
        elif isinstance(msg, m.Shutdown):
            self._out.put(m.Bye(rank=self.rank, stats_json=json.dumps(w.stats())))

    def compute(self, batch: m.Batch) -> m.Result | m.Failure:
        """Run ``batch`` now and return its Result (or Failure) instead of queueing it: the
        coordinator's direct path, on LoadGen's issue thread (``Coordinator.issue``)."""
        if trace.ON:
            trace.mark("w_recv", batch.batch_id)
        result = self._worker._compute(batch)
        if trace.ON:
            trace.mark("w_send", batch.batch_id)
        return result

    def warm_caller(self) -> None:
        """Bind and warm the calling thread for the direct path (one-sample batches): the coordinator
        calls it from the thread that will call StartTest, after the Ready and before any test."""
        if self._worker.backend is None:
            return
        t0 = time.perf_counter()
        ran = self._worker.warm_here(one_sample=True)
        self._worker.warmup["caller_s"] = round(time.perf_counter() - t0, 3)
        if ran:
            log.info("in-process worker: %d warm-up batches on %s (the direct path's thread) in %.1f s", ran,
                     threading.current_thread().name, time.perf_counter() - t0)

    def recv(self, timeout: float | None) -> tuple[int, m.Message] | None:
        item = self._out.get(deadline_after(timeout))
        return None if item is None else (self.rank, item)

    def wake(self) -> None:
        self._out.wake()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._worker.backend is not None:
            self._worker.backend.close()
