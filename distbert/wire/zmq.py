"""ZeroMQ transport: rank 0 binds a ROUTER, every worker connects a DEALER; every connection is
encrypted and authenticated with CURVE.

Wire: one ZeroMQ multipart message per :mod:`distbert.wire.messages` message (the ROUTER adds/strips
the peer's routing-id frame). Arrays go out zero-copy (``copy=False``; pyzmq still copies frames
under ``copy_threshold``, 64 KiB, because that is cheaper than tracking them) and are decoded as
read-only views of the received ``zmq.Frame`` buffers.

Security (:mod:`distbert.wire.keys`): both sides derive CURVE key pairs from the session key. The
worker pins rank 0's public key; rank 0 runs a ZAP handler (a thread on ``inproc://zeromq.zap.01``)
that admits only the workers' public key, with ``ZAP_ENFORCE_DOMAIN`` so that no handler means no
admission. A peer without the session key fails the first handshake message inside libzmq: no
Python runs for it and it gets no pipe, no queue and no parser. The session key never crosses the
wire (the ``Hello`` carries an empty key here: the connection itself is the proof).

Identity: a connection, not a name. ``ROUTER_HANDOVER`` is off, so a second connection that
presents a routing id already in use is ignored by libzmq instead of taking the first one's traffic.
A peer becomes worker ``N`` only after its ``Hello``; a second ``Hello`` for a live rank is a
pending restart (:class:`distbert.wire._common.PeerTable`).

Lost workers: rank 0's socket monitor reports each connection that closes (``EVENT_DISCONNECTED``,
tcp and ipc alike: a killed process's kernel closes its sockets). A monitor event names the
connection's file descriptor, not its routing id, so rank 0 learns each worker's descriptor from
its first message (``ZMQ_SRCFD``) and ``recv`` returns a :class:`~distbert.wire.base.PeerGone` for
the worker whose connection it was: rank 0 requeues its batches within milliseconds instead of at
the heartbeat timeout, and sends nothing more into that connection. A silent peer (a stopped
process, a cut link) closes nothing: heartbeats (ZeroMQ's, and rank 0's own) find it.

Bounds: at most ``RCV_HWM`` messages queued per connection on receive (then TCP pushes back),
frames above ``max_message_bytes`` disconnect the sender (libzmq never allocates them), a handshake
must finish within ``HANDSHAKE_S``. Sends never block: the send high-water mark is off and every send
is ``NOBLOCK`` (the dispatcher's credits bound what is in flight); a message to a peer whose
connection is gone is dropped with a log line (``ROUTER_MANDATORY`` turns that case into
``EHOSTUNREACH`` instead of a silent drop).

Blocking: ``recv`` waits in ``zmq.Poller`` on the socket, its monitor and the read end of a pipe;
``wake()`` writes one byte to the pipe (``os.write`` is thread-safe and, the pipe being non-blocking,
never blocks).

Threads: ``send``/``recv``/``close`` from the one thread that owns the transport (ZeroMQ sockets
are not thread-safe); ``wake`` from any thread.
"""

from __future__ import annotations

import collections
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
import zmq.utils.monitor

from distbert.errors import UserError
from distbert.util.net import host_address
from distbert.wire._common import DropLog, PeerTable, RankZeroGone, TransportClosed, accept_from
from distbert.wire.base import CoordinatorTransport, Endpoint, PeerGone, WorkerTransport
from distbert.wire.keys import CurveKeys, curve_keys
from distbert.wire.messages import Hello, Message, MessageError, Shutdown, decode, encode

log = logging.getLogger(__name__)

#: ``close()`` waits at most this long for queued outgoing messages (a final ``Shutdown``/``Bye``).
DEFAULT_LINGER_S = 1.0
#: The largest frame rank 0 accepts unless told (a run passes its exact bound: the logits of its
#: largest legal batch, :func:`distbert.engine.coordinator.max_result_bytes`).
COORDINATOR_MAX_MESSAGE = 16 << 20
#: The largest frame a worker accepts from rank 0 (a Setup, a Batch's ids: well under 1 MiB).
WORKER_MAX_MESSAGE = 16 << 20
#: Messages queued per connection on receive before libzmq stops reading that connection.
RCV_HWM = 1000
#: A connection that has not finished its CURVE handshake by then is closed.
HANDSHAKE_S = 5.0
#: Consecutive failed handshakes after which a worker gives up (wrong key, not a distbert rank 0).
HANDSHAKE_FAILURES = 3
#: A connection that closes within this long of rank 0's last message closed abruptly (rank 0's process
#: ended: its kernel sent FIN/RST); a cut link goes silent first and is closed by the 10 s heartbeat.
ABRUPT_S = 3.0
#: Refused reconnects after an abrupt close that mean rank 0 is gone (about 0.7 s at 100 ms back-off).
GONE_RETRIES = 3
#: Rank 0 reads its socket monitor at least this often while messages keep it from sleeping (s): a
#: closed connection is noticed within this long under load, at once when idle.
MONITOR_S = 0.02
#: A close is reported this long after the monitor showed it (s): what the peer sent just before it (a
#: last Result, its Bye) can reach the socket after the event; it is read first.
GONE_HOLD_S = 0.02
#: Frames below this many bytes are copied into the socket; bigger ones are sent zero-copy.
COPY_THRESHOLD = 1 << 16
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"distbert"
WORKER_USER_ID = b"distbert-worker"
# Plain ints: pyzmq's flag enums make every ``|`` a Python-level call, which cost more than the
# send itself on the hot path (measured: send_multipart 3x slower than this loop).
_NOBLOCK = int(zmq.NOBLOCK)
_MORE = int(zmq.NOBLOCK) | int(zmq.SNDMORE)
_HANDSHAKE_FAILED = {zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                     zmq.EVENT_HANDSHAKE_FAILED_AUTH}
_HANDSHAKES = int(zmq.EVENT_HANDSHAKE_SUCCEEDED) | sum(int(e) for e in _HANDSHAKE_FAILED)


def _tune(sock: zmq.Socket, linger_s: float, max_message_bytes: int) -> None:
    sock.setsockopt(zmq.LINGER, int(linger_s * 1000))
    # Send HWM 0 = unbounded: a ROUTER at its HWM silently drops, a DEALER at its HWM blocks; neither
    # is acceptable, and the dispatcher's credits already bound what is in flight. Receive HWM set:
    # a peer that floods us is pushed back by TCP instead of growing our memory.
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, RCV_HWM)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    sock.setsockopt(zmq.HANDSHAKE_IVL, int(HANDSHAKE_S * 1000))
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
        # One read: wake() writes one byte per pending wake, so a 4096-byte read empties the pipe;
        # if more were left the pipe stays readable and the next poll simply returns at once.
        # (A loop until EAGAIN cost a second system call and an exception per wake-up: 6 % of the
        # driver's busy samples in a py-spy profile at 230k Server QPS; no throughput change was
        # measurable through this VM's noise.)
        try:
            os.read(self.rfd, 4096)
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
    """The socket + monitor + poller + waker loop both sides share."""

    #: the monitor events this side handles in ``_on_event``
    EVENTS = _HANDSHAKES

    def __init__(self, ctx: zmq.Context, sock: zmq.Socket, linger_s: float) -> None:
        self._ctx = ctx
        self._sock = sock
        self._linger_ms = int(linger_s * 1000)
        self._waker = _Waker()
        # Connection events (a wrong key shows up only here: libzmq drops such a peer by itself).
        self._monitor = sock.get_monitor_socket(self.EVENTS)
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._poller.register(self._waker.rfd, zmq.POLLIN)
        self._closed = False
        #: seconds ``recv`` polls the socket without sleeping before it blocks (0: never): on a
        #: free core this saves the wake-up of a sleeping thread per message (SingleStream)
        self.spin_s = 0.0

    def _on_event(self, event: int, endpoint: str, value: int) -> None:
        """A monitor ``event`` on ``endpoint`` (one of ``EVENTS``; ``value``: its file descriptor or
        error code); called on the owner thread."""

    def _interrupted(self) -> bool:
        """After monitor events: whether ``recv`` must look again (rank 0: a worker's connection closed)."""
        return False

    def _read_monitor(self) -> None:
        mon = self._monitor
        while True:
            try:
                frames = mon.recv_multipart(_NOBLOCK)
            except zmq.Again:
                return
            event = zmq.utils.monitor.parse_monitor_message(frames)
            self._on_event(int(event["event"]), event["endpoint"].decode(errors="replace"), int(event["value"]))

    def _recv_frames(self, timeout: float | None) -> list[zmq.Frame] | None:
        """One multipart message, ``None`` on wake / timeout, ``[]`` when a monitor event needs the
        owner (``_interrupted``). Never busy-waits."""
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
            if self.spin_s > 0.0:
                got = self._spin(deadline)
                if got is not None:
                    return got
            if deadline is None:
                wait_ms = None
            else:
                left = deadline - _monotonic()
                if left <= 0:
                    return None
                wait_ms = max(1, math.ceil(left * 1000))
            ready = dict(self._poller.poll(wait_ms))
            if self._monitor in ready:
                self._read_monitor()
                if self._interrupted():
                    return []
            if waker.rfd in ready:
                # Drain now or poll would keep returning at once; the flag at the loop head
                # decides whether this is a real wake or a stale byte from an already-served one.
                waker.drain()

    def _spin(self, deadline: float | None) -> list[zmq.Frame] | None:
        """Try the socket without sleeping for up to ``spin_s`` (or until ``deadline`` or a wake)."""
        sock, waker = self._sock, self._waker
        end = _monotonic() + self.spin_s
        if deadline is not None:
            end = min(end, deadline)
        while not waker.woken and _monotonic() < end:
            try:
                frame = sock.recv(_NOBLOCK, copy=False)
            except zmq.Again:
                continue
            parts = [frame]
            while frame.more:
                frame = sock.recv(0, copy=False)
                parts.append(frame)
            return parts
        return None

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
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        # LINGER bounds how long queued output (a last Shutdown/Bye) may delay close; term()
        # returns once every socket of this private context is closed and its linger expired.
        self._sock.close(linger=self._linger_ms)
        self._ctx.term()
        self._waker.close()
        self._after_term()

    def _after_term(self) -> None:
        """Join helper threads whose sockets ``term()`` closed (rank 0's ZAP handler)."""


class _ZapHandler:
    """Rank 0's ZAP handler: admits a CURVE client only if its long-term public key is the workers'.

    A thread serving a REP socket on ``inproc://zeromq.zap.01`` of the transport's context; it ends
    when the context is terminated. Only peers that already proved they know the server's public
    key (itself derived from the session key) get this far.
    """

    def __init__(self, ctx: zmq.Context, worker_public: bytes, drops: DropLog) -> None:
        import zmq.utils.z85

        self._worker_key = zmq.utils.z85.decode(worker_public)
        self._drops = drops
        self._sock = ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(ZAP_ENDPOINT)
        self.admitted = 0
        self._thread = threading.Thread(target=self._serve, name="distbert-zap", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        sock = self._sock
        try:
            while True:
                try:
                    request = sock.recv_multipart()
                except zmq.ContextTerminated:
                    return
                sock.send_multipart(self._answer(request))
        except Exception:  # never silently: without this thread nobody is admitted (ZAP_ENFORCE_DOMAIN)
            log.exception("ZAP handler failed; no new worker can connect")
        finally:
            sock.close(linger=0)

    def _answer(self, request: list[bytes]) -> list[bytes]:
        # RFC 27: version, request id, domain, address, routing id, mechanism, credentials...
        if len(request) < 6:
            return [b"1.0", b"", b"500", b"malformed ZAP request", b"", b""]
        version, request_id, domain, address, _, mechanism, *credentials = request
        ok = (version == b"1.0" and domain == ZAP_DOMAIN and mechanism == b"CURVE"
              and len(credentials) == 1 and credentials[0] == self._worker_key)
        if ok:
            self.admitted += 1
            return [b"1.0", request_id, b"200", b"OK", WORKER_USER_ID, b""]
        self._drops.drop("zap-denied", "connection from %s: not a worker of this run (its CURVE key is "
                         "not the session's)", address.decode(errors="replace"))
        return [b"1.0", request_id, b"400", b"not a worker key of this run", b"", b""]

    def join(self) -> None:
        self._thread.join(timeout=5.0)


class ZmqCoordinatorTransport(_ZmqPeer, CoordinatorTransport):
    """Rank 0's side. Build with :meth:`bind`; ``endpoint`` is what workers pass to ``connect``."""

    #: handshake failures (strangers), and each connection's open and close (a lost worker, see the module doc)
    EVENTS = _HANDSHAKES | int(zmq.EVENT_ACCEPTED) | int(zmq.EVENT_DISCONNECTED)

    def __init__(self, ctx: zmq.Context, sock: zmq.Socket, endpoint: Endpoint, linger_s: float,
                 drops: DropLog, zap: _ZapHandler | None) -> None:
        super().__init__(ctx, sock, linger_s)
        self.endpoint = endpoint
        self._drops = drops
        self._zap = zap
        # Routing id <-> worker id. Under CURVE the handshake already proved the key: Hellos carry none.
        self._peers = PeerTable(None if zap else endpoint.key, self._drops, log)
        # Connection file descriptor <-> routing id, learned from each peer's first accepted message;
        # a monitor event names the descriptor only.
        self._fd_peer: dict[int, bytes] = {}
        self._peer_fd: dict[bytes, int] = {}
        self._closed_fds: set[int] = set()        # descriptors closed and not accepted again (monitor order)
        self._closed_peers: set[bytes] = set()   # routing ids whose connection closed: nothing is sent to them
        # (when seen, worker, event): a close is reported after what that peer sent before it
        self._gone: collections.deque[tuple[float, int, PeerGone]] = collections.deque()
        self._srcfd = True                        # ZMQ_SRCFD readable (deprecated in libzmq: heartbeats remain)
        self._monitor_due = 0.0

    @classmethod
    def bind(
        cls, address: str, key: str, *, host: str | None = None, linger_s: float = DEFAULT_LINGER_S,
        max_message_bytes: int = COORDINATOR_MAX_MESSAGE, encrypt: bool = True,
    ) -> ZmqCoordinatorTransport:
        """Bind a ROUTER at ``address``: ``tcp://HOST:PORT`` (PORT ``0`` or ``*`` = a free port;
        HOST ``*`` = all interfaces) or ``ipc:///path`` (one host).

        ``key`` is the session key (checked by the caller, see :mod:`distbert.wire.keys`);
        ``max_message_bytes`` the largest frame a worker may send (its largest legal Result).
        ``host`` is the name or IP written into ``endpoint`` when HOST is a wildcard (default:
        :func:`distbert.util.net.host_address`); a concrete HOST is advertised as is unless ``host`` is given.
        ``encrypt=False`` (no CURVE, the key checked in clear in each Hello) exists only to measure
        what encryption costs (``bench/wire_bench.py``); the command line cannot select it.
        """
        if address.startswith("tcp://"):
            bind_host, port = _split_tcp(address)
            zmq_address = f"tcp://{bind_host}:{'*' if port in ('0', '*') else port}"
        elif address.startswith("ipc://"):
            bind_host, zmq_address = "", address
        else:
            raise ValueError(f"bad ZeroMQ bind address {address!r}: want tcp://HOST:PORT or ipc:///path")
        ctx = zmq.Context()
        drops = DropLog(log)
        zap = None
        sock = None
        try:
            if encrypt:
                keys = curve_keys(key)
                zap = _ZapHandler(ctx, keys.worker_public, drops)  # bound before any peer can connect
            sock = ctx.socket(zmq.ROUTER)
            _tune(sock, linger_s, max_message_bytes)
            if encrypt:
                sock.setsockopt(zmq.CURVE_SERVER, 1)
                sock.setsockopt(zmq.CURVE_SECRETKEY, keys.server_secret)
                sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
                sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no ZAP answer = no admission
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            # No ROUTER_HANDOVER: a second connection with a routing id in use is ignored by libzmq.
            sock.bind(zmq_address)
            concrete = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except BaseException:
            if sock is not None:
                sock.close(linger=0)
            ctx.term()
            if zap is not None:
                zap.join()
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
        self = cls(ctx, sock, Endpoint(concrete, key), linger_s, drops, zap)
        log.info("ZeroMQ coordinator bound %s (%s), workers connect to %s", address,
                 "CURVE" if encrypt else "NOT ENCRYPTED", concrete)
        return self

    def _on_event(self, event: int, endpoint: str, value: int) -> None:
        if event == zmq.EVENT_ACCEPTED:
            self._closed_fds.discard(value)
            return
        if event == zmq.EVENT_DISCONNECTED:
            self._closed_fds.add(value)
            ident = self._fd_peer.pop(value, None)
            if ident is not None:
                del self._peer_fd[ident]
                self._connection_closed(ident, f"its connection to {endpoint} closed")
            return
        if event in _HANDSHAKE_FAILED and event != zmq.EVENT_HANDSHAKE_FAILED_AUTH:  # AUTH: logged by ZAP
            self._drops.drop("handshake", "connection on %s: its handshake failed (a peer without this "
                             "run's session key, or not a distbert worker)", endpoint)

    def _connection_closed(self, ident: bytes, why: str) -> None:
        """The connection of ``ident`` closed: a worker's is reported by ``recv``, a pending restart's
        is forgotten (and reported), a displaced or unknown one needs nothing."""
        self._closed_peers.add(ident)
        worker = self._peers.worker_of.get(ident)
        if worker is not None:
            self._gone.append((_monotonic(), worker, PeerGone(worker, False, why)))
            return
        rank = self._peers.drop_pending(ident)
        if rank is not None:
            self._gone.append((_monotonic(), rank, PeerGone(rank, True, why)))

    def _interrupted(self) -> bool:
        return bool(self._gone)   # recv sets its wait by the oldest close

    def _learn_fd(self, ident: bytes, frame: zmq.Frame) -> None:
        """Which connection ``ident`` speaks on (its descriptor), for the monitor's close events."""
        try:
            fd = int(frame.get(zmq.SRCFD))
        except (zmq.ZMQError, AttributeError, TypeError, ValueError) as exc:
            self._srcfd = False
            log.warning("this libzmq does not tell a message's connection (ZMQ_SRCFD: %s): a worker whose "
                        "connection closes is found by the heartbeat only", exc)
            return
        self._read_monitor()   # a closed connection whose descriptor number this one reuses: its event first
        if fd in self._closed_fds:
            return   # sent before its connection closed (read after the close): that connection is gone
        earlier = self._fd_peer.get(fd)
        if earlier is not None and earlier != ident:   # its close event was missed: the number is reused
            del self._peer_fd[earlier]
            self._connection_closed(earlier, "its connection closed")
        self._fd_peer[fd] = ident
        self._peer_fd[ident] = fd
        self._closed_peers.discard(ident)

    def _after_term(self) -> None:
        if self._zap is not None:
            self._zap.join()

    def send(self, worker: int, msg: Message) -> None:
        ident = self._peers.route(worker, msg)
        if ident in self._closed_peers:
            pending = self._peers.pending_of.get(worker)
            if type(msg) is not Shutdown or pending is None:
                self._drops.drop("closed", "%s for worker %d: its connection closed", type(msg).__name__, worker)
                return
            ident = pending   # a restart told to stop before its Ready: the old connection is closed
        frames = encode(msg)
        if not self._send_frames([ident, *frames]):
            # The peer's connection is gone (or reconnecting); rank 0 learns of the loss from the
            # monitor or the heartbeats, not from here, so dropping is right for a non-blocking send.
            self._drops.drop("unreachable", "%s for worker %d: its connection is gone", type(msg).__name__, worker)

    def recv(self, timeout: float | None) -> tuple[int, Message | PeerGone] | None:
        deadline = None if timeout is None else _monotonic() + max(0.0, timeout)
        while True:
            now = _monotonic()
            if now >= self._monitor_due:   # under load the poll below never runs: look at the monitor anyway
                self._monitor_due = now + MONITOR_S
                self._read_monitor()
            if self._gone and now - self._gone[0][0] >= GONE_HOLD_S:
                return self._pop_gone()
            left = None if deadline is None else max(0.0, deadline - now)
            if self._gone:   # wake up when the close is due
                hold = self._gone[0][0] + GONE_HOLD_S - now
                left = hold if left is None else min(left, hold)
            frames = self._recv_frames(left)
            if frames == []:     # a close: wait again, now until it is due
                continue
            if frames is None:   # a wake, the deadline, or a close that fell due
                due = self._gone and _monotonic() - self._gone[0][0] >= GONE_HOLD_S
                return self._pop_gone() if due else None
            got = self._accept(frames)
            if got is not None:
                return got

    def _pop_gone(self) -> tuple[int, PeerGone]:
        _, worker, event = self._gone.popleft()
        return worker, event

    def _accept(self, frames: list[zmq.Frame]) -> tuple[int, Message] | None:
        ident = frames[0].bytes
        got = accept_from(self._peers, self._drops, ident, frames[1:], f"peer {ident!r}")
        if got is not None and self._srcfd and ident not in self._peer_fd and len(frames) > 1:
            self._learn_fd(ident, frames[1])
        for old in self._peers.take_displaced():
            # a restarted worker's old connection: told to stop (unless it is closed), then forgotten
            if old in self._closed_peers:
                self._closed_peers.discard(old)
                continue
            self._send_frames([old, *encode(Shutdown(reason="replaced by a newer connection for this rank"))])
        return got

    @property
    def drops(self) -> dict[str, int]:
        """How many messages were dropped, by reason (for ``run.json`` and tests)."""
        return self._drops.counts


class HandshakeFailed(UserError):
    """A worker could not complete the encrypted handshake with rank 0 (wrong session key)."""


class ZmqWorkerTransport(_ZmqPeer, WorkerTransport):
    """A worker's side. Build with :meth:`connect`, which also sends the ``Hello``.

    ``recv`` raises :class:`HandshakeFailed` after repeated failed handshakes (wrong key) and
    :class:`~distbert.wire._common.RankZeroGone` when the connection closed abruptly (within
    ``ABRUPT_S`` of rank 0's last message) and ``GONE_RETRIES`` reconnects then failed: rank 0's
    process ended. A link that goes silent is not that: ZeroMQ redials until it is back.
    """

    EVENTS = (_HANDSHAKES | int(zmq.EVENT_DISCONNECTED) | int(zmq.EVENT_CONNECT_RETRIED))

    def __init__(self, ctx: zmq.Context, sock: zmq.Socket, rank: int, linger_s: float, address: str) -> None:
        super().__init__(ctx, sock, linger_s)
        self.rank = rank
        self._address = address
        self._drops = DropLog(log)
        self._failed_handshakes = 0
        self._connected = False
        self._last_rx = _monotonic()          # when rank 0 was last heard from
        self._closed_at: float | None = None  # an abrupt close of the connection, not yet reopened
        self._refused = 0                      # reconnects that failed since then

    @classmethod
    def connect(
        cls, endpoint: Endpoint, rank: int, *, host: str | None = None, linger_s: float = DEFAULT_LINGER_S,
        max_message_bytes: int = WORKER_MAX_MESSAGE, encrypt: bool = True,
    ) -> ZmqWorkerTransport:
        """Connect to ``endpoint`` (pinning rank 0's CURVE key, derived from ``endpoint.key``) and
        queue ``Hello(rank, host, pid)``.

        Returns at once: ZeroMQ connects in the background and delivers the Hello (and anything
        sent after it) once the coordinator is reachable, reconnecting by itself if it drops. A
        handshake that fails ``HANDSHAKE_FAILURES`` times in a row makes ``recv`` raise
        :class:`HandshakeFailed`. ``encrypt=False``: see :meth:`ZmqCoordinatorTransport.bind`.
        """
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        try:
            _tune(sock, linger_s, max_message_bytes)
            if encrypt:
                keys: CurveKeys = curve_keys(endpoint.key)
                sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
                sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.worker_public)
                sock.setsockopt(zmq.CURVE_SECRETKEY, keys.worker_secret)
            # Stable for this process, unique across processes: a TCP reconnect keeps the
            # coordinator's mapping, a restarted worker is a new peer.
            sock.setsockopt(zmq.ROUTING_ID, f"distbert:{rank}:{os.getpid()}:{secrets.token_hex(4)}".encode())
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
            # A dial into a cut link is abandoned after 2 s and retried, so a link that returns is
            # used within seconds (the kernel would otherwise retry one SYN for about two minutes).
            sock.setsockopt(zmq.CONNECT_TIMEOUT, 2000)
            sock.connect(endpoint.address)
        except BaseException:
            sock.close(linger=0)
            ctx.term()
            raise
        self = cls(ctx, sock, rank, linger_s, endpoint.address)
        try:
            self.send(Hello(rank, host or socket.gethostname(), os.getpid(), "" if encrypt else endpoint.key))
        except BaseException:
            self.close()
            raise
        log.info("ZeroMQ worker %d connecting to %s (%s)", rank, endpoint.address,
                 "CURVE" if encrypt else "NOT ENCRYPTED")
        return self

    def _on_event(self, event: int, endpoint: str, value: int) -> None:
        now = _monotonic()
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._failed_handshakes = self._refused = 0
            self._connected, self._closed_at = True, None
            return
        if event == zmq.EVENT_DISCONNECTED:
            if self._connected and now - self._last_rx < ABRUPT_S:
                self._closed_at, self._refused = now, 0
            return
        if event == zmq.EVENT_CONNECT_RETRIED:
            if self._closed_at is not None:
                self._refused += 1
                if self._refused >= GONE_RETRIES:
                    raise RankZeroGone(f"rank {self.rank}: rank 0 at {self._address} is gone: its connection "
                                       f"closed abruptly and {self._refused} reconnects in "
                                       f"{now - self._closed_at:.1f} s failed")
            return
        self._failed_handshakes += 1
        if self._failed_handshakes >= HANDSHAKE_FAILURES:
            raise HandshakeFailed(
                f"rank {self.rank}: the encrypted handshake with {self._address} failed "
                f"{self._failed_handshakes} times: this worker's session key is not rank 0's (check "
                "DISTBERT_SESSION_KEY / --key-file), or that address is not a distbert coordinator")

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
            self._last_rx = _monotonic()
            try:
                return decode(frames)
            except MessageError as exc:
                self._drops.drop("malformed", "malformed message from the coordinator: %s", exc)

