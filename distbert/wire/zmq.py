"""ZeroMQ transport: rank 0 binds a ROUTER, every worker connects a DEALER.

Wire: one ZeroMQ multipart message per :mod:`distbert.wire.messages` message (the ROUTER adds/strips
the peer's routing-id frame). Arrays go out zero-copy (``copy=False``; pyzmq still copies frames
under ``copy_threshold``, 64 KiB, because that is cheaper than tracking them) and are decoded as
read-only views of the received ``zmq.Frame`` buffers.

Identity: the ROUTER knows peers by routing id; a peer becomes worker ``N`` only after a ``Hello``
whose key matches. Anything else from an unknown routing id is dropped (and logged) without being
decoded. Each worker sets a stable routing id, so a TCP reconnect (the DEALER redials by itself)
keeps its mapping; a *new* worker process that says ``Hello`` for an existing rank replaces the old
mapping (the coordinator sees a second ``Hello`` for that rank and must treat it as a restart).

Blocking: ``recv`` waits in ``zmq.Poller`` on the socket and on the read end of a pipe; ``wake()``
writes one byte to the pipe (``os.write`` is thread-safe and, the pipe being non-blocking, never
blocks). ``send`` never blocks: high-water marks are off (queues are unbounded) and every send is
``NOBLOCK``; a message to a peer whose connection is gone is dropped with a log line
(``ROUTER_MANDATORY`` turns that case into ``EHOSTUNREACH`` instead of a silent drop).

Threads: ``send``/``recv``/``close`` from the one thread that owns the transport (ZeroMQ sockets
are not thread-safe); ``wake`` from any thread.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import secrets
import socket
import threading
from time import monotonic as _monotonic
from typing import Any

import zmq

from distbert.util.net import host_address
from distbert.wire._common import DropLog, PeerTable, TransportClosed, accept_from
from distbert.wire.base import CoordinatorTransport, Endpoint, WorkerTransport
from distbert.wire.messages import Hello, Message, MessageError, decode, encode

log = logging.getLogger(__name__)

#: ``close()`` waits at most this long for queued outgoing messages (a final ``Shutdown``/``Bye``).
DEFAULT_LINGER_S = 1.0
#: A peer sending a bigger frame is disconnected by libzmq instead of making us allocate it.
MAX_FRAME_BYTES = 1 << 30
#: Frames below this many bytes are copied into the socket; bigger ones are sent zero-copy.
COPY_THRESHOLD = 1 << 16
# Plain ints: pyzmq's flag enums make every ``|`` a Python-level call, which cost more than the
# send itself on the hot path (measured: send_multipart 3x slower than this loop).
_NOBLOCK = int(zmq.NOBLOCK)
_MORE = int(zmq.NOBLOCK) | int(zmq.SNDMORE)


def _tune(sock: zmq.Socket, linger_s: float) -> None:
    sock.setsockopt(zmq.LINGER, int(linger_s * 1000))
    # HWM 0 = unbounded queues: a ROUTER at its HWM silently drops, a DEALER at its HWM blocks;
    # neither is acceptable, and the dispatcher's credits already bound what is in flight.
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    # Dead peers on quiet connections: ZMTP heartbeats notice within ~10 s, TCP keepalive is the
    # backstop for half-open connections (a host that vanished without a FIN).
    sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10000)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 30)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 5)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, 6)


def _split_tcp(address: str) -> tuple[str, str]:
    """``tcp://HOST:PORT`` -> (host, port); ``[v6]`` hosts keep their brackets."""
    rest = address[len("tcp://"):]
    host, sep, port = rest.rpartition(":")
    if not sep or not host:
        raise ValueError(f"bad tcp address {address!r}: want tcp://HOST:PORT (PORT 0 or * = any free port)")
    return host, port


_WILDCARDS = {"*", "0.0.0.0", "[::]", "::", "[*]"}


class _Waker:
    """Self-pipe: ``wake()`` from any thread makes the owner's ``zmq.Poller`` return."""

    __slots__ = ("rfd", "wfd", "woken", "_lock", "_closed")

    def __init__(self) -> None:
        self.rfd, self.wfd = os.pipe()
        os.set_blocking(self.rfd, False)
        os.set_blocking(self.wfd, False)
        self.woken = False
        # Guards the write end against close(): writing to a closed fd number that the process
        # has already reused for another file would put a byte into that file.
        self._lock = threading.Lock()
        self._closed = False

    def wake(self) -> None:
        if self.woken:
            # A wake is already pending: its byte is in the pipe, or the owner is about to return
            # None for it. Skipping keeps a wake per LoadGen sample from costing a system call.
            return
        # Flag before byte: the owner that wakes on the byte must see the flag (see Inbox).
        self.woken = True
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self.wfd, b"\0")
            except BlockingIOError:
                pass  # the pipe is full, hence readable: the owner will wake anyway

    def drain(self) -> None:
        try:
            while os.read(self.rfd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self.rfd)
            os.close(self.wfd)


class _ZmqPeer:
    """The socket + poller + waker loop both sides share."""

    def __init__(self, ctx: zmq.Context, sock: zmq.Socket, linger_s: float) -> None:
        self._ctx = ctx
        self._sock = sock
        self._linger_ms = int(linger_s * 1000)
        self._waker = _Waker()
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._waker.rfd, zmq.POLLIN)
        self._closed = False

    def _recv_frames(self, timeout: float | None) -> list[zmq.Frame] | None:
        """One multipart message, or ``None`` on wake / timeout. Never busy-waits."""
        if self._closed:
            raise TransportClosed("recv() on a closed ZeroMQ transport")
        sock, waker = self._sock, self._waker
        deadline = None if timeout is None else _monotonic() + max(0.0, timeout)
        while True:
            if waker.woken:
                waker.woken = False
                waker.drain()
                return None
            # Try first, poll second: under load the message is already queued and the poll
            # system call is skipped entirely.
            try:
                frame = sock.recv(_NOBLOCK, copy=False)
            except zmq.Again:
                pass
            else:
                # The rest of a multipart message is already here (ZeroMQ delivers it whole).
                parts = [frame]
                while frame.more:
                    frame = sock.recv(0, copy=False)
                    parts.append(frame)
                return parts
            if deadline is None:
                wait_ms = None
            else:
                left = deadline - _monotonic()
                if left <= 0:
                    return None
                wait_ms = max(1, math.ceil(left * 1000))
            ready = dict(self._poller.poll(wait_ms))
            if waker.rfd in ready:
                # Drain now or poll would keep returning at once; the flag at the loop head
                # decides whether this is a real wake or a stale byte from an already-served one.
                waker.drain()

    def _send_frames(self, frames: list[Any]) -> bool:
        if self._closed:
            raise TransportClosed("send() on a closed ZeroMQ transport")
        send = self._sock.send
        last = len(frames) - 1
        try:
            for i, frame in enumerate(frames):
                # Small frames are copied (cheaper than a tracked zero-copy zmq.Frame), big ones
                # go zero-copy: libzmq keeps a reference until its I/O thread has sent them.
                send(frame, _NOBLOCK if i == last else _MORE, copy=len(frame) < COPY_THRESHOLD, track=False)
            return True
        except zmq.Again:
            # Only at a high-water mark, which is off (0); never block on it anyway.
            return False
        except zmq.ZMQError as exc:
            if exc.errno == errno.EHOSTUNREACH:  # ROUTER_MANDATORY: the first frame names a gone peer
                return False
            raise

    def wake(self) -> None:
        self._waker.wake()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._poller.unregister(self._sock)
        except KeyError:
            pass
        # LINGER bounds how long queued output (a last Shutdown/Bye) may delay close; term()
        # returns once every socket of this private context is closed and its linger expired.
        self._sock.close(linger=self._linger_ms)
        self._ctx.term()
        self._waker.close()


class ZmqCoordinatorTransport(_ZmqPeer, CoordinatorTransport):
    """Rank 0's side. Build with :meth:`bind`; ``endpoint`` is what workers pass to ``connect``."""

    def __init__(self, ctx: zmq.Context, sock: zmq.Socket, endpoint: Endpoint, linger_s: float) -> None:
        super().__init__(ctx, sock, linger_s)
        self.endpoint = endpoint
        self._drops = DropLog(log)
        self._peers = PeerTable(endpoint.key, self._drops, log)  # routing id <-> worker id

    @classmethod
    def bind(
        cls, address: str, key: str, *, host: str | None = None, linger_s: float = DEFAULT_LINGER_S
    ) -> ZmqCoordinatorTransport:
        """Bind a ROUTER at ``address``: ``tcp://HOST:PORT`` (PORT ``0`` or ``*`` = a free port;
        HOST ``*`` = all interfaces) or ``ipc:///path`` (one host).

        ``host`` is the name or IP written into ``endpoint`` when HOST is a wildcard (default:
        :func:`distbert.util.net.host_address`); a concrete HOST is advertised as is unless ``host`` is given.
        """
        if address.startswith("tcp://"):
            bind_host, port = _split_tcp(address)
            zmq_address = f"tcp://{bind_host}:{'*' if port in ('0', '*') else port}"
        elif address.startswith("ipc://"):
            bind_host, zmq_address = "", address
        else:
            raise ValueError(f"bad ZeroMQ bind address {address!r}: want tcp://HOST:PORT or ipc:///path")
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        try:
            _tune(sock, linger_s)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            # A worker whose old connection is not yet known dead takes its routing id over.
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
            sock.bind(zmq_address)
            concrete = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except BaseException:
            sock.close(linger=0)
            ctx.term()
            raise
        if concrete.startswith("tcp://"):
            real_host, real_port = _split_tcp(concrete)
            if host is None and (bind_host in _WILDCARDS or real_host in _WILDCARDS):
                host = host_address()
                if host.startswith("127."):
                    log.warning(
                        "bound %s on all interfaces but this host's name resolves to %s: "
                        "workers on other hosts cannot reach that; pass the host to advertise",
                        concrete, host,
                    )
            adv = host or real_host
            if ":" in adv and not adv.startswith("["):
                adv = f"[{adv}]"
            concrete = f"tcp://{adv}:{real_port}"
        self = cls(ctx, sock, Endpoint(concrete, key), linger_s)
        log.info("ZeroMQ coordinator bound %s, workers connect to %s", address, concrete)
        return self

    def send(self, worker: int, msg: Message) -> None:
        ident = self._peers.peer_of.get(worker)
        if ident is None:
            raise KeyError(f"worker {worker} has not said Hello on this transport")
        frames = encode(msg)
        if not self._send_frames([ident, *frames]):
            # The peer's connection is gone (or reconnecting); rank 0 learns of the loss from
            # heartbeats, not from here, so dropping is the right thing for a non-blocking send.
            self._drops.drop("unreachable", "%s for worker %d: its connection is gone", type(msg).__name__, worker)

    def recv(self, timeout: float | None) -> tuple[int, Message] | None:
        deadline = None if timeout is None else _monotonic() + max(0.0, timeout)
        while True:
            left = None if deadline is None else max(0.0, deadline - _monotonic())
            frames = self._recv_frames(left)
            if frames is None:
                return None
            got = self._accept(frames)
            if got is not None:
                return got

    def _accept(self, frames: list[zmq.Frame]) -> tuple[int, Message] | None:
        ident = frames[0].bytes
        return accept_from(self._peers, self._drops, ident, frames[1:], f"peer {ident!r}")

    @property
    def drops(self) -> dict[str, int]:
        """How many messages were dropped, by reason (for ``run.json`` and tests)."""
        return self._drops.counts


class ZmqWorkerTransport(_ZmqPeer, WorkerTransport):
    """A worker's side. Build with :meth:`connect`, which also sends the ``Hello``."""

    def __init__(self, ctx: zmq.Context, sock: zmq.Socket, rank: int, linger_s: float) -> None:
        super().__init__(ctx, sock, linger_s)
        self.rank = rank
        self._drops = DropLog(log)

    @classmethod
    def connect(
        cls, endpoint: Endpoint, rank: int, *, host: str | None = None, linger_s: float = DEFAULT_LINGER_S
    ) -> ZmqWorkerTransport:
        """Connect to ``endpoint`` and queue ``Hello(rank, host, pid, endpoint.key)``.

        Returns at once: ZeroMQ connects in the background and delivers the Hello (and anything
        sent after it) once the coordinator is reachable, reconnecting by itself if it drops.
        """
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        try:
            _tune(sock, linger_s)
            # Stable for this process, unique across processes: a TCP reconnect keeps the
            # coordinator's mapping, a restarted worker is a new peer.
            sock.setsockopt(zmq.ROUTING_ID, f"distbert:{rank}:{os.getpid()}:{secrets.token_hex(4)}".encode())
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
            sock.connect(endpoint.address)
        except BaseException:
            sock.close(linger=0)
            ctx.term()
            raise
        self = cls(ctx, sock, rank, linger_s)
        try:
            self.send(Hello(rank, host or socket.gethostname(), os.getpid(), endpoint.key))
        except BaseException:
            self.close()
            raise
        log.info("ZeroMQ worker %d connecting to %s", rank, endpoint.address)
        return self

    def send(self, msg: Message) -> None:
        if not self._send_frames(encode(msg)):
            self._drops.drop("unsent", "%s to the coordinator: socket refused it", type(msg).__name__)

    def recv(self, timeout: float | None) -> Message | None:
        deadline = None if timeout is None else _monotonic() + max(0.0, timeout)
        while True:
            left = None if deadline is None else max(0.0, deadline - _monotonic())
            frames = self._recv_frames(left)
            if frames is None:
                return None
            try:
                return decode(frames)
            except MessageError as exc:
                self._drops.drop("malformed", "malformed message from the coordinator: %s", exc)

