"""Rank 0's coordinator and N worker threads in one process over the in-process transport (STYLE §11,
level 2), for the engine tests. ``wrap`` puts a test's own layer (dropping, tampering) between the
coordinator and its transport."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

from distbert.config import RunConfig
from distbert.engine.coordinator import SWITCH, Coordinator, switch_interval_users
from distbert.engine.worker import worker_run
from distbert.wire.inproc import InprocHub


def make_cluster(cfg: RunConfig, store: Any, n: int, wrap: Callable[[Any], Any] | None = None
                 ) -> tuple[Coordinator, list[threading.Thread], InprocHub]:
    """Workers 1..n running, the coordinator built but not started (``coord.start()`` waits for Ready)."""
    hub = InprocHub(key="k")
    cfg = cfg.replace(features_path=str(store.path))
    transport = wrap(hub.coordinator) if wrap else hub.coordinator
    coord = Coordinator(cfg, transport, store.lengths, expected_workers=set(range(1, n + 1)))
    threads = [threading.Thread(target=worker_run, args=(hub.connect(rank), rank, rank - 1, n),
                                kwargs={"pin": False}, daemon=True) for rank in range(1, n + 1)]
    for t in threads:
        t.start()
    return coord, threads, hub


def start_cluster(cfg: RunConfig, store: Any, n: int, wrap: Callable[[Any], Any] | None = None
                  ) -> tuple[Coordinator, list[threading.Thread], InprocHub]:
    coord, threads, hub = make_cluster(cfg, store, n, wrap)
    coord.start()
    return coord, threads, hub


def stop_cluster(coord: Coordinator, threads: list[threading.Thread], hub: InprocHub) -> None:
    coord.stop()
    # coordinators lower the GIL switch interval while they run; the last one gives the process its own back
    if switch_interval_users() == 0:
        assert sys.getswitchinterval() != SWITCH
    for t in threads:
        t.join(timeout=10)
        assert not t.is_alive(), "a worker thread did not stop"
    hub.close()
