"""MPI transport: point-to-point on a communicator; rank 0 (``coordinator_rank``) is the coordinator,
a worker's id is its MPI rank.

Wire: one MPI message (``MPI.BYTE``) per :mod:`distbert.wire.messages` message: the frames packed into
one buffer behind a length table (``<I`` frame count, ``<Q`` per frame length; the table and each
frame start on 8-byte boundaries so decoded arrays are aligned). Two tags, one per direction, so a
coordinator and a worker may even share a rank (rank 0 hosting a worker) without stealing each
other's messages. Nothing is pickled; only uppercase (buffer) MPI calls are used.

Receiving: a daemon thread per transport probes (``Improbe``, matched so no other thread can take
the message between probe and receive), receives into a fresh aligned buffer and hands it to an
:class:`~distbert.wire._common.Inbox`; ``recv`` blocks on that queue (decode happens there, on
the owner's thread) and ``wake`` posts to it. The thread polls instead of a blocking ``Probe``:
MPICH and Open MPI implement blocking calls by spinning the progress engine, which would burn a
whole core a worker needs for inference. Polling is *hot* (``hot_poll_s``, 50 us sleeps) while
traffic flows (a message within the last ``hot_window_s``, 0.5 s), so latency stays near 0.1 ms
per hop during a run, and *cold* (``max_poll_s``, 1 ms sleeps, ~1000 cheap wake-ups/s) once idle.

Sending: ``Isend``, then wait for completion (eager messages complete at once; big ones complete
once the peer's receiver thread takes them). A peer that never receives cannot hold ``send``
longer than ``send_timeout_s``: the request is then parked (its buffer kept alive) and logged.
So rank 0 should keep receiving until every worker's ``Bye`` before it closes: a worker's big
``Result`` sent after rank 0 stopped receiving is only parked, never delivered.

MPI needs ``MPI_THREAD_MULTIPLE`` here (two threads call MPI); mpi4py asks for it by default, and
the constructors refuse to start without it.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import struct
import threading
import time
import weakref
from typing import Any

import numpy as np

from distbert.errors import UserError
from distbert.wire._common import DropLog, Inbox, PeerTable, TransportClosed, accept_from, deadline_after
from distbert.wire.base import CoordinatorTransport, Endpoint, WorkerTransport
from distbert.wire.messages import Hello, Message, MessageError, decode, encode

log = logging.getLogger(__name__)

#: Message tags, one per direction (a rank may host both sides).
TAG_TO_COORDINATOR = 0x4442  # "DB"
TAG_TO_WORKER = 0x4443
DEFAULT_MAX_POLL_S = 0.001
DEFAULT_HOT_POLL_S = 50e-6
DEFAULT_HOT_WINDOW_S = 0.5
DEFAULT_SEND_TIMEOUT_S = 10.0
#: How long ``close()`` lets still-running sends finish before parking them.
DEFAULT_LINGER_S = 1.0
_MAX_FRAMES = 64

_COUNT = struct.Struct("<I")


def _align8(n: int) -> int:
    return (n + 7) & ~7


def pack_frames(frames: list[Any]) -> bytearray:
    """One contiguous buffer: ``<I n``, ``<Q len`` x n, pad to 8, each frame padded to 8."""
    sizes = [memoryview(f).nbytes for f in frames]
    n = len(frames)
    table = struct.pack(f"<I{n}Q", n, *sizes)
    offset = _align8(len(table))
    total = offset + sum(_align8(s) for s in sizes)
    buf = bytearray(total)  # zero-filled: padding never leaks stale memory onto the wire
    out = memoryview(buf)
    out[: len(table)] = table
    for frame, size in zip(frames, sizes):
        if size:
            out[offset : offset + size] = memoryview(frame).cast("B")
        offset += _align8(size)
    return buf


def unpack_frames(buf: Any) -> list[memoryview]:
    """The frames of a :func:`pack_frames` buffer, as views into it (no copy)."""
    mv = memoryview(buf).cast("B")
    total = mv.nbytes
    if total < _COUNT.size:
        raise MessageError(f"MPI message of {total} bytes is shorter than its frame count")
    (n,) = _COUNT.unpack_from(mv)
    if not 1 <= n <= _MAX_FRAMES:
        raise MessageError(f"MPI message claims {n} frames (1..{_MAX_FRAMES} allowed)")
    table_end = _COUNT.size + 8 * n
    if table_end > total:
        raise MessageError(f"MPI message of {total} bytes is shorter than its {n}-frame length table")
    sizes = struct.unpack_from(f"<{n}Q", mv, _COUNT.size)
    offset = _align8(table_end)
    frames = []
    for size in sizes:
        if offset + size > total:
            raise MessageError(f"MPI message of {total} bytes is shorter than its length table says")
        frames.append(mv[offset : offset + size])
        offset += _align8(size)
    if offset != total:
        raise MessageError(f"MPI message has {total - offset} bytes after its last frame")
    return frames


def _mpi():
    from mpi4py import MPI

    if not MPI.Is_initialized() or MPI.Is_finalized():
        raise UserError("MPI transport: MPI is not initialized (or already finalized); "
                        "start the run under mpiexec/srun")
    if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
        names = {MPI.THREAD_SINGLE: "SINGLE", MPI.THREAD_FUNNELED: "FUNNELED", MPI.THREAD_SERIALIZED: "SERIALIZED"}
        raise UserError(
            "MPI transport needs MPI_THREAD_MULTIPLE but MPI provides "
            f"THREAD_{names.get(MPI.Query_thread(), MPI.Query_thread())}: unset MPI4PY_RC_THREAD_LEVEL "
            "(or mpi4py.rc.thread_level), use an MPI library built with thread support, or use the zmq transport"
        )
    return MPI


# Transports still open at interpreter exit are closed from a Python atexit hook, which runs before
# mpi4py finalizes MPI (a C-level Py_AtExit hook, run later): a receiver thread still calling MPI
# during MPI_Finalize would crash or hang the rank.
_live: weakref.WeakSet[_MpiPeer] = weakref.WeakSet()
_abandoned: list[tuple[Any, Any]] = []  # (request, buffer) given up on: the buffer must outlive MPI


def _close_live() -> None:
    for peer in list(_live):
        peer.close()


_atexit_registered = False


class _MpiPeer:
    """Receiver thread + inbox + send bookkeeping, shared by both sides."""

    def __init__(
        self, comm: Any, recv_source: int, recv_tag: int, max_poll_s: float, send_timeout_s: float, linger_s: float
    ) -> None:
        global _atexit_registered
        MPI = _mpi()
        self._MPI = MPI
        self._comm = comm if comm is not None else MPI.COMM_WORLD
        self._inbox = Inbox()
        self._stop = threading.Event()
        self._max_poll_s = max_poll_s
        self._hot_poll_s = min(DEFAULT_HOT_POLL_S, max_poll_s)
        self._hot_window_s = DEFAULT_HOT_WINDOW_S
        self._send_timeout_s = send_timeout_s
        self._linger_s = linger_s
        self._parked: list[tuple[Any, Any]] = []  # (request, buffer): sends not yet complete
        self._drops = DropLog(log)
        self._closed = False
        self._thread = threading.Thread(
            target=self._receive_loop, args=(recv_source, recv_tag),
            name=f"distbert-mpi-recv-{self._comm.Get_rank()}", daemon=True,
        )
        self._thread.start()
        _live.add(self)
        if not _atexit_registered:
            atexit.register(_close_live)
            _atexit_registered = True

    # -- receiving (receiver thread) --

    def _receive_loop(self, source: int, tag: int) -> None:
        MPI, comm, stop, put = self._MPI, self._comm, self._stop, self._inbox.put
        status = MPI.Status()
        hot_poll, hot_window, cold_poll = self._hot_poll_s, self._hot_window_s, self._max_poll_s
        idle = 0
        last = time.monotonic()  # of the last message; start hot so the start-up handshake is quick
        try:
            while not stop.is_set():
                msg = comm.Improbe(source, tag, status)
                if msg is None:
                    idle += 1
                    if idle < 8:
                        time.sleep(0)  # bare yields catch back-to-back messages
                    elif time.monotonic() - last < hot_window:
                        time.sleep(hot_poll)
                    else:
                        time.sleep(cold_poll)
                    continue
                idle = 0
                last = time.monotonic()
                buf = np.empty(status.Get_count(MPI.BYTE), dtype=np.uint8)  # aligned: numpy allocates 16+
                msg.Recv([buf, MPI.BYTE])
                put((status.Get_source(), buf))
        except BaseException as exc:  # an MPI error here is fatal for this transport: tell the owner
            log.exception("MPI receiver thread failed")
            put((-1, exc))

    def _next(self, deadline: float | None) -> tuple[int, list[memoryview]] | None:
        """Next ``(source, frames)``, ``None`` on wake/timeout; malformed packing is dropped."""
        while True:
            item = self._inbox.get(deadline)
            if item is None:
                return None
            source, buf = item
            if isinstance(buf, BaseException):
                raise TransportClosed("the MPI receiver thread failed; see the log") from buf
            try:
                return source, unpack_frames(buf)
            except MessageError as exc:
                self._drops.drop("malformed", "malformed MPI message from rank %d: %s", source, exc)

    # -- sending (owner thread) --

    def _send_frames(self, dest: int, tag: int, frames: list[Any]) -> None:
        if self._closed:
            raise TransportClosed("send() on a closed MPI transport")
        if self._parked:
            self._reap()
        buf = pack_frames(frames)
        req = self._comm.Isend([buf, self._MPI.BYTE], dest, tag)
        if not self._wait(req, time.monotonic() + self._send_timeout_s):
            log.warning("send to rank %d not taken after %.1f s: parked (is that rank still receiving?)",
                        dest, self._send_timeout_s)
            self._parked.append((req, buf))

    @staticmethod
    def _wait(req: Any, deadline: float) -> bool:
        # Test() drives MPI progress for rendezvous sends; yield between tests, never spin hot.
        spins = 0
        while not req.Test():
            spins += 1
            if time.monotonic() > deadline:
                return False
            time.sleep(0 if spins < 64 else 50e-6)
        return True

    def _reap(self) -> None:
        self._parked = [(r, b) for r, b in self._parked if not r.Test()]

    # -- both --

    def wake(self) -> None:
        self._inbox.wake()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        # Bounded by one back-off sleep (<= max_poll_s) or one in-progress receive.
        self._thread.join(timeout=max(5.0, 10 * self._max_poll_s))
        if self._thread.is_alive():
            log.warning("MPI receiver thread did not stop within 5 s; leaving it (daemon)")
        deadline = time.monotonic() + self._linger_s
        left = [(r, b) for r, b in self._parked if not self._wait(r, deadline)]
        if left:
            log.warning("%d MPI send(s) never completed; abandoned at close", len(left))
            _abandoned.extend(left)
        self._parked = []
        _live.discard(self)

    @property
    def drops(self) -> dict[str, int]:
        return self._drops.counts


class MpiCoordinatorTransport(_MpiPeer, CoordinatorTransport):
    """Rank ``coordinator_rank`` (0) of ``comm`` (default ``COMM_WORLD``); workers are the other ranks
    that construct an :class:`MpiWorkerTransport` with the same ``key``."""

    def __init__(
        self,
        comm: Any = None,
        key: str = "",
        *,
        max_poll_s: float = DEFAULT_MAX_POLL_S,
        send_timeout_s: float = DEFAULT_SEND_TIMEOUT_S,
        linger_s: float = DEFAULT_LINGER_S,
    ) -> None:
        MPI = _mpi()
        super().__init__(comm, MPI.ANY_SOURCE, TAG_TO_COORDINATOR, max_poll_s, send_timeout_s, linger_s)
        self.endpoint = Endpoint("mpi://", key)
        self._peers = PeerTable(key, self._drops, log)  # MPI rank <-> worker id (the same number)

    def send(self, worker: int, msg: Message) -> None:
        if worker not in self._peers.peer_of:
            raise KeyError(f"worker {worker} has not said Hello on this transport")
        self._send_frames(worker, TAG_TO_WORKER, encode(msg))

    def recv(self, timeout: float | None) -> tuple[int, Message] | None:
        if self._closed:
            raise TransportClosed("recv() on a closed MPI transport")
        deadline = deadline_after(timeout)
        while True:
            got = self._next(deadline)
            if got is None:
                return None
            source, frames = got
            accepted = accept_from(self._peers, self._drops, source, frames, f"MPI rank {source}",
                                   rank_must_be=source)
            if accepted is not None:
                return accepted


class MpiWorkerTransport(_MpiPeer, WorkerTransport):
    """A worker: its id is its rank in ``comm``; sends ``Hello`` to ``coordinator_rank`` on construction."""

    def __init__(
        self,
        comm: Any = None,
        key: str = "",
        *,
        coordinator_rank: int = 0,
        host: str | None = None,
        max_poll_s: float = DEFAULT_MAX_POLL_S,
        send_timeout_s: float = DEFAULT_SEND_TIMEOUT_S,
        linger_s: float = DEFAULT_LINGER_S,
    ) -> None:
        super().__init__(comm, coordinator_rank, TAG_TO_WORKER, max_poll_s, send_timeout_s, linger_s)
        self._coordinator_rank = coordinator_rank
        self.rank = self._comm.Get_rank()
        try:
            self.send(Hello(self.rank, host or socket.gethostname(), os.getpid(), key))
        except BaseException:
            self.close()
            raise

    def send(self, msg: Message) -> None:
        self._send_frames(self._coordinator_rank, TAG_TO_COORDINATOR, encode(msg))

    def recv(self, timeout: float | None) -> Message | None:
        if self._closed:
            raise TransportClosed("recv() on a closed MPI transport")
        deadline = deadline_after(timeout)
        while True:
            got = self._next(deadline)
            if got is None:
                return None
            try:
                return decode(got[1])
            except MessageError as exc:
                self._drops.drop("malformed", "malformed message from the coordinator: %s", exc)
