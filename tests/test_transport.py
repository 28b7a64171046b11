"""Transport conformance (one suite, every implementation) plus real multi-process runs.

In-process: inproc, ZeroMQ over tcp (concrete and wildcard bind) and ipc, with workers as threads.
Multi-process: a ZeroMQ worker in a subprocess, and the MPI transport under ``mpiexec -n 3``
(``tests/mpi_transport_prog.py``; the pytest process itself never initializes MPI).
Every test has a hard time limit: a hang is a failure, not a stuck CI job.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from distbert.wire import CoordinatorTransport, Endpoint, TransportClosed, WorkerTransport
from distbert.wire.base import PeerGone
from distbert.wire.inproc import InprocHub
from distbert.wire.messages import (
    Batch,
    Bye,
    Failure,
    Heartbeat,
    Hello,
    Ready,
    Result,
    Setup,
    Shutdown,
    encode,
)
from distbert.wire.mpi import pack_frames, unpack_frames
from distbert.wire.zmq import ZmqCoordinatorTransport, ZmqWorkerTransport
from tests.wire_peers import key_holder_socket

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parent.parent
KEY = "5e55104b" * 8  # 256 bits of hex, as a real session key


@dataclass
class Cluster:
    """A coordinator side and a way to make worker sides, whatever the transport."""

    coordinator: CoordinatorTransport
    connect: Callable[..., WorkerTransport]  # (rank, key=None) -> worker side that has sent Hello
    workers: list[WorkerTransport]
    hello_key: str = KEY  # what a Hello carries: the key, or nothing where CURVE authenticates

    def worker(self, rank: int, key: str | None = None) -> WorkerTransport:
        w = self.connect(rank, key)
        self.workers.append(w)
        return w


def _inproc(tmp_path: Path) -> Cluster:
    hub = InprocHub(key=KEY)
    return Cluster(hub.coordinator, lambda rank, key=None: hub.connect(rank, key), [])


def _zmq(address: str, **kw) -> Callable[[Path], Cluster]:
    def make(tmp_path: Path) -> Cluster:
        coord = ZmqCoordinatorTransport.bind(address.format(tmp=tmp_path), KEY, **kw)

        def connect(rank: int, key: str | None = None) -> WorkerTransport:
            ep = Endpoint(coord.endpoint.address, KEY if key is None else key)
            return ZmqWorkerTransport.connect(ep, rank, linger_s=0.2)

        return Cluster(coord, connect, [], hello_key="")

    return make


KINDS = {
    "inproc": _inproc,
    "zmq-tcp": _zmq("tcp://127.0.0.1:0"),
    "zmq-tcp-wildcard": _zmq("tcp://*:0", host="127.0.0.1"),
    "zmq-ipc": _zmq("ipc://{tmp}/coord.sock"),
}


@pytest.fixture(params=list(KINDS))
def cluster(request, tmp_path) -> Iterator[Cluster]:
    c = KINDS[request.param](tmp_path)
    yield c
    for w in c.workers:
        w.close()
    c.coordinator.close()


def _recv(coord: CoordinatorTransport, timeout: float = 5.0):
    """The next message; a closed connection's PeerGone (a worker thread that finished) is skipped."""
    deadline = time.monotonic() + timeout
    while True:
        got = coord.recv(max(0.0, deadline - time.monotonic()))
        assert got is not None, f"nothing received within {timeout} s"
        if not isinstance(got[1], PeerGone):
            return got


def _hello(c: Cluster, rank: int) -> WorkerTransport:
    w = c.worker(rank)
    worker, msg = _recv(c.coordinator)
    assert worker == rank and isinstance(msg, Hello) and msg.rank == rank and msg.key == c.hello_key
    return w


def _ids(n: int, base: int = 0) -> np.ndarray:
    return np.arange(base, base + n, dtype=np.uint64) | np.uint64(1 << 63)


TO_WORKER = [
    Setup('{"scenario": "Server"}'),
    Batch(1, True, _ids(3), np.array([5, 9, 1], np.int64)),
    Batch(2, False, _ids(256), np.arange(256, dtype=np.int64)),
    Heartbeat(0, 12.5),
    Shutdown("bye"),
]
TO_COORDINATOR = [
    Ready(1, "h", "cpu:0", "null", 64, "{}"),
    Result(1, _ids(3), np.ones((3, 384, 2), np.float32), 0.01),
    Result(2, _ids(256), np.zeros((256, 0, 2), np.float32), 0.02),
    Failure(1, "h", 7, "ValueError", "boom", "Traceback..."),
    Heartbeat(1, 13.0),
    Bye(1, '{"n": 2}'),
]


# -- conformance ----------------------------------------------------------------------------------


def test_hello_then_every_message_both_ways(cluster):
    w = _hello(cluster, 1)
    for msg in TO_WORKER:
        cluster.coordinator.send(1, msg)
        assert w.recv(5) == msg
    for msg in TO_COORDINATOR:
        w.send(msg)
        assert _recv(cluster.coordinator) == (1, msg)


def test_offline_sized_arrays(cluster):
    w = _hello(cluster, 1)
    logits = np.random.default_rng(0).standard_normal((256, 384, 2)).astype(np.float32)
    w.send(Result(9, _ids(256), logits, 1.25))
    worker, got = _recv(cluster.coordinator)
    assert worker == 1 and got == Result(9, _ids(256), logits, 1.25)
    assert not got.logits.flags.writeable


def test_send_to_unknown_worker_raises_key_error(cluster):
    with pytest.raises(KeyError):
        cluster.coordinator.send(4, Shutdown("x"))


def test_wrong_key_is_dropped(cluster):
    if cluster.hello_key == "":
        pytest.skip("ZeroMQ refuses a wrong key in the CURVE handshake: tests/test_wire_security.py")
    bad = cluster.worker(2, key="not-the-key")
    bad.send(Heartbeat(2, 1.0))  # traffic after a refused Hello is dropped too
    _hello(cluster, 1)
    cluster.workers[-1].send(Heartbeat(1, 2.0))
    assert _recv(cluster.coordinator) == (1, Heartbeat(1, 2.0))
    assert cluster.coordinator.recv(0.3) is None
    with pytest.raises(KeyError):
        cluster.coordinator.send(2, Shutdown("x"))
    drops = cluster.coordinator.drops
    assert drops.get("bad-key") == 1 and drops.get("unknown-peer") == 1


def test_recv_timeout(cluster):
    w = _hello(cluster, 1)
    for side in (lambda t: cluster.coordinator.recv(t), w.recv):
        t0 = time.monotonic()
        assert side(0.2) is None
        assert 0.18 <= time.monotonic() - t0 < 2.0
        t0 = time.monotonic()
        assert side(0) is None
        assert time.monotonic() - t0 < 0.5


def test_wake_unblocks_a_concurrent_recv(cluster):
    w = _hello(cluster, 1)
    for wake, recv in ((cluster.coordinator.wake, cluster.coordinator.recv), (w.wake, w.recv)):
        timer = threading.Timer(0.2, wake)
        timer.start()
        t0 = time.monotonic()
        assert recv(10) is None
        assert 0.15 <= time.monotonic() - t0 < 3.0
        timer.join()


def test_wake_first_makes_the_next_recv_return_none_once(cluster):
    w = _hello(cluster, 1)
    w.send(Heartbeat(1, 1.0))
    time.sleep(0.1)  # let it arrive: the wake must win even over a queued message
    cluster.coordinator.wake()
    cluster.coordinator.wake()  # two wakes before a recv still make one None (a flag, not a count)
    assert cluster.coordinator.recv(5) is None
    assert _recv(cluster.coordinator) == (1, Heartbeat(1, 1.0))
    t0 = time.monotonic()
    assert cluster.coordinator.recv(0.2) is None  # no stale wake left behind
    assert time.monotonic() - t0 >= 0.18

    cluster.coordinator.send(1, Heartbeat(0, 2.0))
    time.sleep(0.1)
    w.wake()
    assert w.recv(5) is None
    assert w.recv(5) == Heartbeat(0, 2.0)
    t0 = time.monotonic()
    assert w.recv(0.2) is None
    assert time.monotonic() - t0 >= 0.18


def test_wake_from_many_threads_while_traffic_flows(cluster):
    w = _hello(cluster, 1)
    stop = threading.Event()

    def waker():
        while not stop.is_set():
            cluster.coordinator.wake()
            time.sleep(0.001)

    threads = [threading.Thread(target=waker) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(300):
            w.send(Heartbeat(1, float(i)))
        got = []
        deadline = time.monotonic() + 20
        while len(got) < 300 and time.monotonic() < deadline:
            item = cluster.coordinator.recv(1.0)
            if item is not None:
                got.append(item[1].sent_at)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert got == [float(i) for i in range(300)]


def _echo_worker(c: Cluster, rank: int, ready: threading.Barrier, errors: list) -> None:
    """A worker thread: answers every Batch with a Result whose logits encode (index, position)."""
    try:
        w = c.connect(rank)
        ready.wait(10)
        while True:
            msg = w.recv(10)
            if msg is None:
                raise AssertionError(f"worker {rank}: nothing from the coordinator for 10 s")
            if isinstance(msg, Shutdown):
                w.send(Bye(rank, "{}"))
                break
            assert isinstance(msg, Batch)
            length = 8 if msg.want_logits else 0
            logits = np.empty((len(msg.ids), length, 2), np.float32)
            logits[:] = msg.indices[:, None, None] + np.arange(length, dtype=np.float32)[None, :, None]
            w.send(Result(msg.batch_id, msg.ids, logits, float(rank)))
        w.close()
    except BaseException as exc:  # reported by the main thread
        errors.append(exc)


def test_results_match_by_id_across_workers(cluster):
    ranks = [1, 2, 3]
    barrier = threading.Barrier(len(ranks) + 1)
    errors: list = []
    threads = [threading.Thread(target=_echo_worker, args=(cluster, r, barrier, errors)) for r in ranks]
    for t in threads:
        t.start()
    barrier.wait(10)
    hellos = {_recv(cluster.coordinator)[0] for _ in ranks}
    assert hellos == set(ranks)
    sent: dict[int, tuple[int, Batch]] = {}
    for batch_id in range(60):
        n = 1 + batch_id % 5
        batch = Batch(batch_id, batch_id % 2 == 0, _ids(n, base=batch_id * 100), np.arange(n, dtype=np.int64) + batch_id)
        worker = ranks[batch_id % len(ranks)]
        cluster.coordinator.send(worker, batch)
        sent[batch_id] = (worker, batch)
    while sent:
        worker, res = _recv(cluster.coordinator)
        assert isinstance(res, Result), res
        expect_worker, batch = sent.pop(res.batch_id)
        assert worker == expect_worker and res.compute_s == float(worker)
        np.testing.assert_array_equal(res.ids, batch.ids)
        length = 8 if batch.want_logits else 0
        assert res.logits.shape == (len(batch.ids), length, 2)
        if length:
            np.testing.assert_array_equal(res.logits[:, 3, 1], batch.indices + 3)
    for r in ranks:
        cluster.coordinator.send(r, Shutdown("done"))
    byes = {_recv(cluster.coordinator)[1].rank for _ in ranks}
    assert byes == set(ranks)
    for t in threads:
        t.join(10)
    assert not errors, errors


def test_ten_thousand_messages_each_way_arrive_in_order_once(cluster):
    n = 10_000
    w = _hello(cluster, 1)
    errors: list = []
    seen: list[int] = []

    def worker_side():
        try:
            for i in range(n):
                w.send(Heartbeat(1, float(i)))
            while len(seen) < n:
                msg = w.recv(10)
                assert msg is not None, f"worker stalled after {len(seen)} messages"
                seen.append(msg.batch_id)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=worker_side)
    t0 = time.monotonic()
    t.start()
    ids = _ids(1)
    idx = np.zeros(1, np.int64)
    for i in range(n):
        cluster.coordinator.send(1, Batch(i, False, ids, idx))
    got = []
    while len(got) < n:
        item = _recv(cluster.coordinator, 10)
        got.append(int(item[1].sent_at))
    t.join(30)
    assert not errors, errors
    assert got == list(range(n))
    assert seen == list(range(n))
    assert time.monotonic() - t0 < 30


def test_close_is_idempotent_fast_and_final(cluster):
    w = _hello(cluster, 1)
    for i in range(100):
        cluster.coordinator.send(1, Batch(i, True, _ids(2), np.arange(2)))
        w.send(Heartbeat(1, float(i)))
    t0 = time.monotonic()
    w.close()
    w.close()
    cluster.coordinator.close()
    cluster.coordinator.close()
    assert time.monotonic() - t0 < 5
    with pytest.raises(TransportClosed):
        cluster.coordinator.recv(0)
    with pytest.raises(TransportClosed):
        cluster.coordinator.send(1, Shutdown("x"))
    with pytest.raises(TransportClosed):
        w.send(Heartbeat(1, 0.0))
    with pytest.raises(TransportClosed):
        w.recv(0)
    cluster.coordinator.wake()  # harmless after close
    w.wake()


def test_send_to_a_vanished_worker_never_blocks(cluster):
    w = _hello(cluster, 1)
    w.close()
    time.sleep(0.2)
    big = Result(0, _ids(256), np.zeros((256, 384, 2), np.float32), 0.0)
    t0 = time.monotonic()
    for i in range(200):
        cluster.coordinator.send(1, Batch(i, True, _ids(64), np.arange(64)))
    assert time.monotonic() - t0 < 2
    # And a worker whose coordinator is gone can still send (and close) without blocking.
    w2 = _hello(cluster, 2)
    cluster.coordinator.close()
    t0 = time.monotonic()
    for _ in range(20):
        w2.send(big)
    w2.close()
    assert time.monotonic() - t0 < 5


def test_a_second_hello_is_a_pending_restart_until_its_ready(cluster):
    c = cluster.coordinator
    old = _hello(cluster, 1)
    new = _hello(cluster, 1)  # same rank, new connection: pending
    c.send(1, Setup("{}"))
    assert new.recv(5) == Setup("{}")  # the Setup answers the newest Hello...
    c.send(1, Heartbeat(0, 1.0))
    assert old.recv(5) == Heartbeat(0, 1.0)  # ...everything else still goes to the old connection
    assert new.recv(0.2) is None
    new.send(Heartbeat(1, 2.0))  # nothing but Ready is taken from the newcomer
    old.send(Heartbeat(1, 3.0))
    assert _recv(c) == (1, Heartbeat(1, 3.0))
    new.send(Ready(1, "h", "cpu:0", "null", 8, "{}"))
    assert _recv(c) == (1, Ready(1, "h", "cpu:0", "null", 8, "{}"))  # promoted
    assert old.recv(5) == Shutdown("replaced by a newer connection for this rank")
    old.send(Heartbeat(1, 4.0))  # the old connection is a stranger now
    new.send(Heartbeat(1, 5.0))
    assert _recv(c) == (1, Heartbeat(1, 5.0))
    c.send(1, Shutdown("to the new one"))
    assert new.recv(5) == Shutdown("to the new one")
    assert c.recv(0.5) is None  # the old connection's heartbeat (a separate connection: no order) is dropped
    assert c.drops.get("not-ready") == 1 and c.drops.get("unknown-peer") == 1


def test_forget_makes_a_worker_a_stranger_until_a_new_hello(cluster):
    c = cluster.coordinator
    w = _hello(cluster, 1)
    c.forget(1)
    w.send(Heartbeat(1, 1.0))
    assert c.recv(0.3) is None
    with pytest.raises(KeyError):
        c.send(1, Shutdown("x"))
    w.send(Hello(1, "h", 1, cluster.hello_key))
    assert _recv(c)[0] == 1


def test_importing_the_package_initializes_neither_mpi_nor_zmq():
    code = (
        "import sys, distbert.wire as t; "
        "assert 'mpi4py' not in sys.modules and 'zmq' not in sys.modules, sorted(sys.modules); "
        "t.InprocHub; assert 'zmq' not in sys.modules; "
        "t.ZmqCoordinatorTransport; assert 'zmq' in sys.modules and 'mpi4py' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=50)


# -- ZeroMQ specifics -----------------------------------------------------------------------------


def test_zmq_endpoint_is_concrete(tmp_path):
    c = ZmqCoordinatorTransport.bind("tcp://*:0", KEY, host="127.0.0.1")
    try:
        host_port = c.endpoint.address.removeprefix("tcp://")
        host, port = host_port.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0 and c.endpoint.key == KEY
    finally:
        c.close()
    c = ZmqCoordinatorTransport.bind("tcp://127.0.0.1:*", KEY)
    try:
        assert c.endpoint.address.startswith("tcp://127.0.0.1:") and not c.endpoint.address.endswith(":0")
    finally:
        c.close()
    path = tmp_path / "x.sock"
    c = ZmqCoordinatorTransport.bind(f"ipc://{path}", KEY)
    try:
        assert c.endpoint.address == f"ipc://{path}"
    finally:
        c.close()
    with pytest.raises(ValueError, match="bad ZeroMQ bind address"):
        ZmqCoordinatorTransport.bind("udp://x:1", KEY)


def test_zmq_malformed_frames_from_a_raw_dealer_are_dropped():
    zmq = pytest.importorskip("zmq")
    coord = ZmqCoordinatorTransport.bind("tcp://127.0.0.1:0", KEY)
    ctx = zmq.Context()
    raw = key_holder_socket(ctx, KEY)  # a peer with the session key, but no distbert code
    raw.connect(coord.endpoint.address)
    try:
        # Before any Hello: garbage, a Batch, a Hello with a bad layout. Nothing gets through.
        raw.send_multipart([b"\x00garbage"])
        raw.send_multipart(encode(Batch(1, True, _ids(1), np.zeros(1, np.int64))))
        raw.send_multipart([bytes([Hello.TAG]) + b"\x01"])
        raw.send(b"")
        assert coord.recv(0.3) is None
        # A proper Hello makes the raw socket worker 5...
        raw.send_multipart(encode(Hello(5, "raw", 1, KEY)))
        assert _recv(coord) == (5, Hello(5, "raw", 1, KEY))
        # ...whose malformed messages are dropped one by one without hurting the coordinator.
        good = encode(Batch(2, True, _ids(2), np.arange(2)))
        raw.send_multipart([b"\xfe"])  # unknown tag
        raw.send_multipart([bytes(good[0])[:5], good[1], good[2]])  # short header
        raw.send_multipart([good[0], good[1]])  # missing frame
        raw.send_multipart([good[0], bytes(good[1])[:-1], good[2]])  # array byte count
        raw.send_multipart([*good, b"extra"])  # extra frame
        raw.send(b"")  # empty frame 0
        raw.send_multipart(encode(Hello(6, "raw", 1, KEY)))  # an authenticated peer may not change rank
        raw.send_multipart(encode(Heartbeat(5, 9.0)))
        assert _recv(coord) == (5, Heartbeat(5, 9.0))
        drops = coord.drops
        assert drops["malformed"] == 6 and drops["rank-change"] == 1
        assert drops["unknown-peer"] == 3 and drops["bad-hello"] == 1
        # The coordinator still serves well-behaved workers.
        w = ZmqWorkerTransport.connect(coord.endpoint, 1)
        assert _recv(coord)[0] == 1
        w.close()
    finally:
        raw.close(0)
        ctx.term()
        coord.close()


_SUBPROCESS_WORKER = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    from distbert.wire.messages import Batch, Bye, Result, Shutdown
    from distbert.wire import Endpoint
    from distbert.wire.zmq import ZmqWorkerTransport

    rank = int(sys.argv[2])
    w = ZmqWorkerTransport.connect(Endpoint(sys.argv[1], os.environ["DISTBERT_SESSION_KEY"]), rank)
    done = 0
    while True:
        msg = w.recv(20)
        if msg is None:
            sys.exit("no message from the coordinator for 20 s")
        if isinstance(msg, Shutdown):
            w.send(Bye(rank, '{"done": %d}' % done))
            break
        logits = np.broadcast_to(msg.indices.astype(np.float32)[:, None, None], (len(msg.ids), 384, 2))
        w.send(Result(msg.batch_id, msg.ids, logits, 0.0))  # non-contiguous: encode makes it so
        done += 1
    w.close()
    """
)


@pytest.mark.slow
def test_zmq_worker_in_a_separate_process():
    coord = ZmqCoordinatorTransport.bind("tcp://127.0.0.1:0", KEY)
    env = dict(os.environ, DISTBERT_SESSION_KEY=KEY, PYTHONPATH=str(REPO))  # key never on a command line
    procs = [
        subprocess.Popen([sys.executable, "-c", _SUBPROCESS_WORKER, coord.endpoint.address, str(r)], env=env)
        for r in (1, 2)
    ]
    try:
        assert {_recv(coord, 30)[0] for _ in procs} == {1, 2}
        for i in range(40):
            coord.send(1 + i % 2, Batch(i, True, _ids(4, base=4 * i), np.arange(4, dtype=np.int64) + i))
        got = {}
        while len(got) < 40:
            worker, res = _recv(coord, 20)
            assert isinstance(res, Result) and worker == 1 + res.batch_id % 2
            got[res.batch_id] = res
        for i, res in got.items():
            np.testing.assert_array_equal(res.ids, _ids(4, base=4 * i))
            np.testing.assert_array_equal(res.logits[:, -1, 0], np.arange(4) + i)
        for r in (1, 2):
            coord.send(r, Shutdown("done"))
        byes = [_recv(coord, 20)[1] for _ in procs]
        assert sorted(b.stats_json for b in byes) == ['{"done": 20}'] * 2
        assert [p.wait(20) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        coord.close()


# -- MPI ------------------------------------------------------------------------------------------


def test_mpi_frame_packing_round_trips_and_is_aligned():
    frames = encode(Result(3, _ids(5), np.ones((5, 7, 2), np.float32), 0.5))
    buf = np.frombuffer(pack_frames(frames), np.uint8).copy()  # numpy buffers are 16-byte aligned
    out = unpack_frames(buf)
    assert [bytes(f) for f in out] == [bytes(f) for f in frames]
    for f in out[1:]:
        assert np.frombuffer(f, np.uint8).ctypes.data % 8 == 0
    assert [bytes(f) for f in unpack_frames(pack_frames([b"", b"abc"]))] == [b"", b"abc"]


@pytest.mark.parametrize(
    "buf, match",
    [
        (b"\x01\x00", "shorter than its frame count"),
        (b"\x00\x00\x00\x00", "claims 0 frames"),
        (b"\x02\x00\x00\x00" + b"\x00" * 8, "length table"),
        (b"\x01\x00\x00\x00" + (100).to_bytes(8, "little") + b"\x00" * 4 + b"x" * 8, "shorter than its length table says"),
        (bytes(pack_frames([b"abc"])) + b"\x00" * 8, "after its last frame"),
    ],
)
def test_mpi_frame_unpacking_rejects_garbage(buf, match):
    from distbert.wire.messages import MessageError

    with pytest.raises(MessageError, match=match):
        unpack_frames(buf)


def _mpiexec() -> Path:
    path = Path(sys.executable).parent / "mpiexec"
    if not path.exists():
        pytest.skip(f"{path} is absent: install the mpich wheel into this venv")
    return path


def _run_mpi(n: int, *args: str, env: dict | None = None, timeout: float = 90) -> subprocess.CompletedProcess:
    cmd = [str(_mpiexec()), "-n", str(n), sys.executable, str(REPO / "tests" / "mpi_transport_prog.py"), *args]
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    try:
        return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(cmd)} hung for {timeout} s:\n{exc.stderr!r}")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_mpi_three_ranks():
    proc = _run_mpi(3, "conformance")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "coordinator: all checks passed" in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_mpi_wrong_key_and_garbage_are_dropped():
    proc = _run_mpi(3, "badkey")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "coordinator: all checks passed" in proc.stderr


@pytest.mark.timeout(60)
def test_mpi_refuses_without_thread_multiple():
    proc = _run_mpi(1, "threadlevel", env={"MPI4PY_RC_THREAD_LEVEL": "serialized"}, timeout=50)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "refused: MPI transport needs MPI_THREAD_MULTIPLE" in proc.stderr


def test_zmq_receive_spin_keeps_the_contract(tmp_path):
    """--spin-us: recv polls without sleeping first; messages, wake and timeouts behave the same."""
    coord = ZmqCoordinatorTransport.bind("tcp://127.0.0.1:0", KEY)
    w = ZmqWorkerTransport.connect(Endpoint(coord.endpoint.address, KEY), 1, linger_s=0.2)
    coord.spin_s = w.spin_s = 0.005
    try:
        assert _recv(coord)[0] == 1
        for i in range(50):
            coord.send(1, Heartbeat(0, float(i)))
            assert w.recv(5) == Heartbeat(0, float(i))
            w.send(Heartbeat(1, float(i)))
            assert _recv(coord) == (1, Heartbeat(1, float(i)))
        t0 = time.monotonic()
        assert coord.recv(0.05) is None and 0.04 <= time.monotonic() - t0 < 1.0
        threading.Timer(0.05, coord.wake).start()
        t0 = time.monotonic()
        assert coord.recv(5) is None and time.monotonic() - t0 < 1.0
    finally:
        w.close()
        coord.close()
