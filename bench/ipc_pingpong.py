"""Round trip of a 100-byte message between two processes: a raw Unix socketpair vs ZeroMQ ipc
(DEALER/ROUTER, plaintext). The floor under any SingleStream query that crosses to a worker process
and back, before distbert does anything.

    .venv/bin/python bench/ipc_pingpong.py [--n 5000]

Prints p50/p90/p99 round-trip microseconds for each. Linux only (fork).
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import tempfile
import time

import numpy as np

MSG = b"x" * 100


def _socketpair(n: int) -> np.ndarray:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        a.close()
        while True:
            data = b.recv(65536)
            if not data:
                os._exit(0)
            b.sendall(data)
    b.close()
    lat = np.empty(n)
    for i in range(n):
        t = time.perf_counter_ns()
        a.sendall(MSG)
        select.select([a], [], [])
        a.recv(65536)
        lat[i] = time.perf_counter_ns() - t
    a.close()
    os.waitpid(pid, 0)
    return lat


def _zmq(n: int) -> np.ndarray:
    import zmq

    addr = f"ipc://{tempfile.mkdtemp()}/pingpong.sock"
    pid = os.fork()
    if pid == 0:
        s = zmq.Context().socket(zmq.DEALER)
        s.connect(addr)
        s.send(b"hello")
        while (m := s.recv()) != b"bye":
            s.send(m)
        os._exit(0)
    r = zmq.Context().socket(zmq.ROUTER)
    r.bind(addr)
    ident, _ = r.recv_multipart()
    lat = np.empty(n)
    for i in range(n):
        t = time.perf_counter_ns()
        r.send_multipart([ident, MSG])
        r.recv_multipart()
        lat[i] = time.perf_counter_ns() - t
    r.send_multipart([ident, b"bye"])
    os.waitpid(pid, 0)
    return lat


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5000)
    n = p.parse_args().n
    for name, fn in (("socketpair", _socketpair), ("zmq ipc", _zmq)):
        p50, p90, p99 = np.percentile(fn(n), [50, 90, 99]) / 1000
        print(f"{name:10s} round trip: p50 {p50:6.1f} us  p90 {p90:6.1f} us  p99 {p99:6.1f} us  ({n} round trips)")


if __name__ == "__main__":
    main()
