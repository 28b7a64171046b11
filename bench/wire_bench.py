"""Wire micro-benchmarks: codec cost per message, and transport round trips with one worker thread.

    python bench/wire_bench.py                  # codec; inproc, zmq tcp/ipc (worker thread); zmq tcp (worker process)
                                                # zmq cases twice: CURVE (as runs use it) and plaintext (cost of CURVE)
    python bench/wire_bench.py --quick          # fewer iterations
    mpiexec -n 2 python bench/wire_bench.py --mpi   # MPI transport round trips (rank 1 echoes)

Round trips: the coordinator sends ``Batch`` (B samples), the worker answers ``Result`` (ids only,
or logits [B, 384, 2] with ``want_logits``). "ping-pong" keeps one batch in flight (latency);
"window 64" keeps 64 in flight (what the dispatcher's credits allow; throughput).
The output is this script's report, hence plain prints.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import timeit
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distbert.wire.keys import new_session_key
from distbert.wire.messages import Batch, Message, Result, Shutdown, decode, encode

L = 384


def _batch(b: int, want: bool = False) -> Batch:
    return Batch(1, want, np.arange(b, dtype=np.uint64), np.arange(b, dtype=np.int64))


def _result(b: int, length: int) -> Result:
    return Result(1, np.arange(b, dtype=np.uint64), np.zeros((b, length, 2), np.float32), 0.001)


def bench_codec(quick: bool) -> None:
    # CPU time of this thread, not wall time: on a shared machine wall time mostly measures the
    # neighbours. Best of 5 repeats.
    print("codec (encode + decode of one message, CPU µs, best of 5):")
    cases: list[tuple[str, Message]] = [
        ("Batch B=1", _batch(1)),
        ("Batch B=256", _batch(256)),
        ("Result B=1, ids only", _result(1, 0)),
        ("Result B=1, logits L=384", _result(1, L)),
        ("Result B=256, ids only", _result(256, 0)),
        ("Result B=256, logits L=384", _result(256, L)),
    ]
    for name, msg in cases:
        n = 20_000 if quick else 100_000
        enc = min(timeit.repeat(lambda: encode(msg),  # noqa: B023 - timed here, within this iteration
                                number=n, repeat=5, timer=time.thread_time)) / n * 1e6
        frames = encode(msg)
        dec = min(timeit.repeat(lambda: decode(frames),  # noqa: B023 - timed here, within this iteration
                                number=n, repeat=5, timer=time.thread_time)) / n * 1e6
        print(f"  {name:28s} encode {enc:6.2f}  decode {dec:6.2f}  total {enc + dec:6.2f}")


def _echo(worker) -> None:
    """Worker loop: Batch -> Result (logits only when wanted); Shutdown ends it."""
    logits_cache: dict[int, np.ndarray] = {}
    while True:
        msg = worker.recv(30)
        if msg is None or isinstance(msg, Shutdown):
            break
        b = len(msg.ids)
        if msg.want_logits:
            logits = logits_cache.setdefault(b, np.zeros((b, L, 2), np.float32))
        else:
            logits = logits_cache.setdefault(-b, np.zeros((b, 0, 2), np.float32))
        worker.send(Result(msg.batch_id, msg.ids, logits, 0.0))
    worker.close()


def _round_trips(coord, worker_id: int, b: int, want: bool, window: int, seconds: float) -> tuple[float, float, float]:
    """(round trips/s, samples/s, coordinator CPU µs per round trip) with ``window`` batches in flight.

    The CPU figure is this thread's CPU time (send Batch + receive Result, codec included): what
    rank 0's I/O loop pays per batch whatever the machine's load, so 1e6 / it bounds one core.
    """
    ids = np.arange(b, dtype=np.uint64)
    idx = np.arange(b, dtype=np.int64)
    sent = done = 0
    cpu0 = time.thread_time()
    t0 = time.perf_counter()
    end = t0 + seconds
    while sent < window:
        coord.send(worker_id, Batch(sent, want, ids, idx))
        sent += 1
    while True:
        got = coord.recv(10)
        if got is None:
            raise RuntimeError("worker stopped answering")
        done += 1
        now = time.perf_counter()
        if now >= end:
            break
        coord.send(worker_id, Batch(sent, want, ids, idx))
        sent += 1
    while done < sent:  # drain what is still in flight so the next case starts clean
        if coord.recv(10) is None:
            raise RuntimeError("worker stopped answering")
        done += 1
    rate = done / (time.perf_counter() - t0)
    return rate, rate * b, (time.thread_time() - cpu0) / done * 1e6


CASES = [
    # (label, B, want_logits, window)
    ("B=1 ids only, ping-pong", 1, False, 1),
    ("B=1 ids only, window 64", 1, False, 64),
    ("B=8 logits, window 64", 8, True, 64),
    ("B=256 ids only, window 8", 256, False, 8),
    ("B=256 logits, window 4", 256, True, 4),
]


def _run_cases(label: str, coord, worker_id: int, seconds: float) -> None:
    print(f"{label} (one worker):")
    for name, b, want, window in CASES:
        rate, samples, cpu_us = _round_trips(coord, worker_id, b, want, window, seconds)
        mb = rate * b * L * 2 * 4 / 1e6 if want else 0.0
        extra = f"  {mb:6.0f} MB/s logits" if want else ""
        print(f"  {name:28s} {rate:7.0f} round trips/s {samples:9.0f} samples/s  "
              f"rank-0 CPU {cpu_us:5.1f} µs/trip{extra}")


def bench_threads(quick: bool, tmp: str) -> None:
    from distbert.wire.inproc import InprocHub
    from distbert.wire.zmq import ZmqCoordinatorTransport, ZmqWorkerTransport

    seconds = 0.5 if quick else 2.0
    hub = InprocHub("k")
    t = threading.Thread(target=_echo, args=(hub.connect(1),))
    t.start()
    assert hub.coordinator.recv(5) is not None
    _run_cases("inproc", hub.coordinator, 1, seconds)
    hub.coordinator.send(1, Shutdown("bench"))
    t.join()

    key = new_session_key()
    for address in ("tcp://127.0.0.1:0", f"ipc://{tmp}/wire_bench.sock"):
        for encrypt in (True, False):
            coord = ZmqCoordinatorTransport.bind(address, key, encrypt=encrypt)
            w = ZmqWorkerTransport.connect(coord.endpoint, 1, encrypt=encrypt)
            t = threading.Thread(target=_echo, args=(w,))
            t.start()
            assert coord.recv(5) is not None
            _run_cases(f"zmq {address.split(':')[0]} loopback, {_label(encrypt)}", coord, 1, seconds)
            coord.send(1, Shutdown("bench"))
            t.join()
            coord.close()


def _label(encrypt: bool) -> str:
    return "CURVE" if encrypt else "plaintext (not selectable in runs)"


def bench_process(quick: bool) -> None:
    """ZeroMQ tcp loopback with the worker in its own process: no GIL shared with the coordinator."""
    import os
    import subprocess

    from distbert.wire.zmq import ZmqCoordinatorTransport

    key = new_session_key()
    for encrypt in (True, False):
        coord = ZmqCoordinatorTransport.bind("tcp://127.0.0.1:0", key, encrypt=encrypt)
        env = dict(os.environ, DISTBERT_SESSION_KEY=key)
        proc = subprocess.Popen([sys.executable, __file__, "--echo-worker", coord.endpoint.address,
                                 *([] if encrypt else ["--plaintext"])], env=env)
        try:
            assert coord.recv(30) is not None, "worker process did not connect"
            _run_cases(f"zmq tcp loopback, worker process, {_label(encrypt)}", coord, 1, 0.5 if quick else 2.0)
            coord.send(1, Shutdown("bench"))
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
            coord.close()


def echo_worker(address: str, encrypt: bool) -> None:
    import os

    from distbert.wire import Endpoint
    from distbert.wire.zmq import ZmqWorkerTransport

    _echo(ZmqWorkerTransport.connect(Endpoint(address, os.environ["DISTBERT_SESSION_KEY"]), 1, encrypt=encrypt))


def bench_mpi(quick: bool) -> None:
    from mpi4py import MPI

    from distbert.wire.mpi import MpiCoordinatorTransport, MpiWorkerTransport

    if MPI.COMM_WORLD.Get_rank() == 0:
        coord = MpiCoordinatorTransport(key="k")
        assert coord.recv(10) is not None
        _run_cases("mpi (rank 1 echoes)", coord, 1, 0.5 if quick else 2.0)
        coord.send(1, Shutdown("bench"))
        coord.close()
    else:
        _echo(MpiWorkerTransport(key="k"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--mpi", action="store_true", help="run under mpiexec -n 2")
    ap.add_argument("--no-codec", action="store_true")
    ap.add_argument("--echo-worker", metavar="ADDRESS", help=argparse.SUPPRESS)
    ap.add_argument("--plaintext", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.echo_worker:
        echo_worker(args.echo_worker, not args.plaintext)
        return
    if args.mpi:
        bench_mpi(args.quick)
        return
    if not args.no_codec:
        bench_codec(args.quick)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        bench_threads(args.quick, tmp)
    bench_process(args.quick)


if __name__ == "__main__":
    main()
