"""Run under ``mpiexec -n N`` by tests/test_transport.py: the MPI transport, for real.

Modes (argv[1]):

* ``conformance``: rank 0 coordinates, ranks 1..N-1 work. Hello; Setup -> 10,000 ordered Heartbeats
  + Ready (ordering, none lost); 200 Batches with arrays both ways, results matched by id; wake on
  both sides; Shutdown -> Bye; close twice.
* ``badkey``: like conformance, but rank N-1 presents a wrong key and then sends garbage; rank 0
  checks it is never heard from and that the other workers are unaffected.
* ``threadlevel``: (-n 1, MPI4PY_RC_THREAD_LEVEL=serialized) the constructors must refuse.

Exit status 0 = every check on this rank passed. Rank 0 logs ``coordinator: all checks passed``.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

import numpy as np

log = logging.getLogger("mpi_transport_prog")

KEY = "mpi-test-key"
N_ORDERED = 10_000
N_BATCHES = 200
LENGTH = 384


def _logits_for(indices: np.ndarray, length: int) -> np.ndarray:
    out = np.empty((len(indices), length, 2), np.float32)
    out[:] = indices[:, None, None] + np.arange(length, dtype=np.float32)[None, :, None] / 1000
    return out


def _check_wake(recv, wake, who: str) -> None:
    timer = threading.Timer(0.2, wake)
    timer.start()
    t0 = time.monotonic()
    got = recv(10)
    elapsed = time.monotonic() - t0
    timer.join()
    assert got is None and 0.15 <= elapsed < 3, f"{who}: wake took {elapsed:.3f} s, got {got!r}"


def _check_closed(send, recv, who: str) -> None:
    from distbert.wire import TransportClosed

    for call in (send, recv):
        try:
            call()
        except TransportClosed:
            continue
        raise AssertionError(f"{who}: send/recv after close did not raise TransportClosed")


def coordinator(mode: str) -> None:
    from mpi4py import MPI

    from distbert.wire.messages import Batch, Bye, Heartbeat, Hello, Ready, Result, Setup, Shutdown
    from distbert.wire.mpi import MpiCoordinatorTransport

    size = MPI.COMM_WORLD.Get_size()
    bad = size - 1 if mode == "badkey" else None
    workers = [r for r in range(1, size) if r != bad]
    t = MpiCoordinatorTransport(key=KEY)

    def recv(timeout: float = 20):
        got = t.recv(timeout)
        assert got is not None, f"coordinator: nothing received within {timeout} s"
        return got

    hellos: dict[int, Any] = {}
    while len(hellos) < len(workers):
        worker, msg = recv()
        assert isinstance(msg, Hello) and msg.rank == worker and msg.key == KEY, (worker, msg)
        hellos[worker] = msg
    assert sorted(hellos) == workers

    for w in workers:
        t.send(w, Setup('{"mode": "%s"}' % mode))
    # Per worker: N_ORDERED heartbeats in order, then Ready.
    seq = {w: 0 for w in workers}
    ready: set[int] = set()
    while len(ready) < len(workers):
        worker, msg = recv()
        if isinstance(msg, Heartbeat):
            assert msg.sent_at == seq[worker], f"worker {worker}: heartbeat {msg.sent_at}, expected {seq[worker]}"
            seq[worker] += 1
        else:
            assert isinstance(msg, Ready) and seq[worker] == N_ORDERED, (worker, msg, seq[worker])
            ready.add(worker)

    _check_wake(t.recv, t.wake, "coordinator")
    t0 = time.monotonic()
    assert t.recv(0.2) is None and 0.18 <= time.monotonic() - t0 < 2, "coordinator: recv(0.2) timing"

    in_flight = {}
    for i in range(N_BATCHES):
        n = 1 + i % 16
        batch = Batch(i, i % 3 != 0, np.arange(n, dtype=np.uint64) + np.uint64(10 * i), np.arange(n, dtype=np.int64) * 7 + i)
        worker = workers[i % len(workers)]
        t.send(worker, batch)
        in_flight[i] = (worker, batch)
    while in_flight:
        worker, res = recv()
        assert isinstance(res, Result), res
        expect, batch = in_flight.pop(res.batch_id)
        assert worker == expect
        np.testing.assert_array_equal(res.ids, batch.ids)
        np.testing.assert_array_equal(res.logits, _logits_for(batch.indices, LENGTH if batch.want_logits else 0))

    if bad is not None:
        assert t.recv(1.0) is None
        drops = t.drops
        assert drops.get("bad-key") == 1, drops
        assert drops.get("unknown-peer", 0) >= 1 and drops.get("malformed", 0) >= 1, drops
        try:
            t.send(bad, Shutdown("x"))
        except KeyError:
            pass
        else:
            raise AssertionError("send to the refused rank did not raise KeyError")

    for w in workers:
        t.send(w, Shutdown("done"))
    byes: set[int] = set()
    while len(byes) < len(workers):
        worker, msg = recv()
        assert isinstance(msg, Bye) and msg.rank == worker, (worker, msg)
        byes.add(worker)
    t.close()
    t.close()
    _check_closed(lambda: t.send(workers[0], Shutdown("late")), lambda: t.recv(0), "coordinator")
    t.wake()  # a no-op after close
    log.info("coordinator: all checks passed")


def worker(mode: str) -> None:
    from mpi4py import MPI

    from distbert.wire.messages import Batch, Bye, Heartbeat, Ready, Result, Setup, Shutdown, encode
    from distbert.wire.mpi import TAG_TO_COORDINATOR, MpiWorkerTransport, pack_frames

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    if mode == "badkey" and rank == comm.Get_size() - 1:
        t = MpiWorkerTransport(key="wrong")
        t.send(Heartbeat(rank, 0.0))  # from a refused peer: dropped undecoded
        # Garbage on the transport's tag from a rank the coordinator does not know...
        comm.Send([b"\x05\x00", MPI.BYTE], 0, TAG_TO_COORDINATOR)
        # ...and a well-packed message with a bad frame table.
        bad = bytearray(pack_frames(encode(Heartbeat(rank, 0.0))))
        bad[0] = 0
        comm.Send([bad, MPI.BYTE], 0, TAG_TO_COORDINATOR)
        assert t.recv(3.0) is None, "the refused worker received something"
        t.close()
        return

    t = MpiWorkerTransport(key=KEY)
    while True:
        msg = t.recv(30)
        assert msg is not None, f"worker {rank}: nothing from the coordinator for 30 s"
        if isinstance(msg, Setup):
            for i in range(N_ORDERED):
                t.send(Heartbeat(rank, float(i)))
            _check_wake(t.recv, t.wake, f"worker {rank}")
            t.send(Ready(rank, "h", "cpu", "test", 16, "{}"))
        elif isinstance(msg, Batch):
            length = LENGTH if msg.want_logits else 0
            t.send(Result(msg.batch_id, msg.ids, _logits_for(msg.indices, length), 0.0))
        elif isinstance(msg, Shutdown):
            t.send(Bye(rank, "{}"))
            break
        else:
            raise AssertionError(f"worker {rank}: unexpected {msg!r}")
    t.close()
    t.close()
    _check_closed(lambda: t.send(Heartbeat(rank, 0.0)), lambda: t.recv(0), f"worker {rank}")


def threadlevel() -> None:
    from distbert.errors import UserError
    from distbert.wire.mpi import MpiCoordinatorTransport, MpiWorkerTransport

    for cls in (MpiCoordinatorTransport, MpiWorkerTransport):
        try:
            cls(key=KEY)
        except UserError as exc:
            log.info("refused: %s", exc)
        else:
            raise AssertionError(f"{cls.__name__} started without MPI_THREAD_MULTIPLE")


def main() -> int:
    mode = sys.argv[1]
    from mpi4py import MPI

    rank = MPI.COMM_WORLD.Get_rank()
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(name)s: %(message)s")
    try:
        if mode == "threadlevel":
            threadlevel()
        elif rank == 0:
            coordinator(mode)
        else:
            worker(mode)
    except BaseException:
        log.exception("rank %d failed", rank)
        # Abort so the other ranks do not wait forever for a peer that is gone.
        MPI.COMM_WORLD.Abort(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
