"""Pieces the three transports share: the wake-able inbox, key checks, bounded drop logging."""

from __future__ import annotations

import hmac
import logging
import queue
import time
from typing import Any

#: The highest worker id a Hello may claim (MPI ranks and ``--rank`` values stay far below).
MAX_RANK = (1 << 24) - 1


class TransportClosed(RuntimeError):
    """``send``/``recv`` on a transport after its ``close()``: a bug in the caller's shutdown order."""


class RankZeroGone(ConnectionError):
    """A worker's transport saw rank 0 go away for good (its connection closed abruptly and its port
    now refuses): the run is over, the worker exits non-zero."""


def keys_match(given: str, expected: str) -> bool:
    """Constant-time comparison, so response timing does not leak how much of a key was right."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


def deadline_after(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + max(0.0, timeout)


class DropLog:
    """Logs dropped traffic without letting a misbehaving peer flood the log.

    The first ``burst`` drops of each kind are logged at WARNING, then one line per ``every`` drops.
    """

    __slots__ = ("_log", "_counts", "_burst", "_every")

    def __init__(self, log: logging.Logger, burst: int = 10, every: int = 1000) -> None:
        self._log = log
        self._counts: dict[str, int] = {}
        self._burst = burst
        self._every = every

    def drop(self, kind: str, text: str, *args: Any) -> None:
        n = self._counts.get(kind, 0) + 1
        self._counts[kind] = n
        if n <= self._burst or n % self._every == 0:
            suffix = f" ({kind}: {n} dropped so far)" if n > 1 else ""
            self._log.warning("dropped " + text + suffix, *args)

    @property
    def counts(self) -> dict[str, int]:
        return dict(self._counts)


_WAKE = object()


class Inbox:
    """A FIFO whose ``get`` also returns ``None`` on ``wake()``; blocking, never busy-waiting.

    ``wake()`` may be called from any thread. It sets a flag and posts a sentinel: the flag makes
    the *next* ``get`` return ``None`` even when items are queued (the contract of
    ``Transport.wake``); the sentinel only unblocks a ``get`` already waiting. A sentinel found with
    the flag already consumed is stale and skipped, so one ``wake`` yields exactly one ``None``.
    """

    __slots__ = ("_q", "_woken")

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._woken = False

    def put(self, item: Any) -> None:
        self._q.put(item)

    def wake(self) -> None:
        if self._woken:
            return  # already pending: the getter returns None for it (one None per pending wake)
        # Flag before sentinel: a getter that sees the sentinel must also see the flag.
        self._woken = True
        self._q.put(_WAKE)

    def get(self, deadline: float | None) -> Any | None:
        """Next item, or ``None`` on wake or when ``deadline`` (monotonic) has passed."""
        q = self._q
        while True:
            if self._woken:
                self._woken = False
                return None
            try:
                if deadline is None:
                    item = q.get()
                else:
                    left = deadline - time.monotonic()
                    item = q.get(timeout=left) if left > 0 else q.get_nowait()
            except queue.Empty:
                return None
            if item is _WAKE:
                continue  # the loop head returns None if this wake is still pending
            return item


class PeerTable:
    """Which connected peer is which worker: filled only by accepted ``Hello``s.

    A peer is whatever the transport knows a sender by (ZeroMQ routing id, in-process worker side,
    MPI rank). ``key``: the session key each Hello must carry, or None where the transport has
    already authenticated the connection (ZeroMQ CURVE) and Hellos carry none.

    A ``Hello`` for a rank that another peer holds is a **pending restart**: the newcomer is told
    its Setup (:meth:`route`) but gets nothing else, and nothing but a ``Ready`` (or another
    ``Hello``) from it is accepted, while the old peer keeps its work. The newcomer's ``Ready``
    promotes it: the old peer is forgotten (its later messages are a stranger's) and queued in
    :meth:`take_displaced` for the transport to tell it to stop; the coordinator sees a ``Ready``
    for a rank it knows and requeues that rank's in-flight batches. One pending peer per rank: a
    newer one displaces it.
    """

    __slots__ = ("_key", "_drops", "_log", "worker_of", "peer_of", "pending", "pending_of", "_displaced")

    def __init__(self, key: str | None, drops: DropLog, log: logging.Logger) -> None:
        self._key = key
        self._drops = drops
        self._log = log
        self.worker_of: dict[Any, int] = {}   # active peer -> worker id
        self.peer_of: dict[int, Any] = {}     # worker id -> active peer
        self.pending: dict[Any, int] = {}     # restarting peer -> worker id (Hello seen, no Ready yet)
        self.pending_of: dict[int, Any] = {}  # worker id -> restarting peer
        self._displaced: list[Any] = []

    def admit(self, peer: Any, hello: Any, known: int | None) -> bool:
        """Check ``hello`` from ``peer`` (already known as worker ``known``, or None) and map it."""
        if not 1 <= hello.rank <= MAX_RANK:
            self._drops.drop("bad-rank", "Hello for rank %d (allowed 1..%d; rank 0 is the coordinator)",
                             hello.rank, MAX_RANK)
            return False
        if self._key is not None and not keys_match(hello.key, self._key):
            self._drops.drop("bad-key", "Hello from rank %d (%s, pid %d): wrong key", hello.rank, hello.host, hello.pid)
            return False
        if known is None:
            known = self.pending.get(peer)
        if known is not None and known != hello.rank:
            self._drops.drop("rank-change", "Hello for rank %d from the peer already known as worker %d",
                             hello.rank, known)
            return False
        old = self.peer_of.get(hello.rank)
        if old is None or old == peer:
            self.worker_of[peer] = hello.rank
            self.peer_of[hello.rank] = peer
            return True
        earlier = self.pending_of.get(hello.rank)
        if earlier is not None and earlier != peer:
            del self.pending[earlier]
            self._displaced.append(earlier)
        self.pending[peer] = hello.rank
        self.pending_of[hello.rank] = peer
        self._log.warning("worker %d said Hello from a new connection (%s, pid %d): a restart; the old "
                          "connection keeps its work until the new one is Ready", hello.rank, hello.host, hello.pid)
        return True

    def promote(self, peer: Any) -> int:
        """The pending ``peer`` said Ready: it becomes its rank's peer; the old one is displaced."""
        rank = self.pending.pop(peer)
        del self.pending_of[rank]
        old = self.peer_of.get(rank)
        if old is not None:
            self.worker_of.pop(old, None)
            self._displaced.append(old)
        self.worker_of[peer] = rank
        self.peer_of[rank] = peer
        return rank

    def route(self, worker: int, msg: Any) -> Any:
        """The peer ``msg`` for ``worker`` goes to: a Setup answers the newest Hello (a pending
        restart's), everything else goes to the active peer. Raises KeyError for an unknown worker."""
        from distbert.wire.messages import Setup  # lazy: no import cycle

        if type(msg) is Setup and worker in self.pending_of:
            return self.pending_of[worker]
        peer = self.peer_of.get(worker)
        if peer is None:
            raise KeyError(f"worker {worker} has not said Hello on this transport")
        return peer

    def drop_pending(self, peer: Any) -> int | None:
        """``peer``'s connection closed: if it was a pending restart, forget it and return its rank."""
        rank = self.pending.pop(peer, None)
        if rank is not None:
            del self.pending_of[rank]
        return rank

    def forget(self, worker: int) -> None:
        """``worker``'s connections become strangers (a worker dropped as faulty): only a new Hello
        is accepted from them again."""
        peer = self.peer_of.pop(worker, None)
        if peer is not None:
            self.worker_of.pop(peer, None)
        pending = self.pending_of.pop(worker, None)
        if pending is not None:
            self.pending.pop(pending, None)

    def take_displaced(self) -> list[Any]:
        """Peers replaced since the last call (the transport tells each to stop)."""
        if not self._displaced:
            return self._displaced
        out, self._displaced = self._displaced, []
        return out


def accept_from(peers: PeerTable, drops: DropLog, peer: Any, frames: Any, who: str, *,
                rank_must_be: int | None = None) -> tuple[int, Any] | None:
    """The coordinator side's receive rule, shared by every transport.

    Returns ``(worker, message)`` for a message from a known worker, for a ``Hello`` that
    ``peers.admit`` accepts (``rank_must_be``: the rank the Hello must claim, where the transport
    knows it, as MPI does), or for the ``Ready`` that promotes a pending restart. Anything else is
    dropped (logged and counted) and None returned: a stranger's non-Hello (never decoded: strangers
    get no parser surface beyond one byte), a bad or refused Hello, garbage from a worker, anything
    but Ready from a restarting peer.
    """
    from distbert.wire.messages import Hello, MessageError, Ready, decode, peek_tag  # lazy: no import cycle

    worker = peers.worker_of.get(peer)
    restarting = peers.pending.get(peer) if worker is None else None
    if worker is None and restarting is None and (not frames or peek_tag(frames[0]) != Hello.TAG):
        drops.drop("unknown-peer", "message from %s, which has not said Hello", who)
        return None
    try:
        msg = decode(frames)
    except MessageError as exc:
        if worker is None:
            drops.drop("bad-hello", "bad message from %s, which is not a worker yet: %s", who, exc)
        else:
            drops.drop("malformed", "malformed message from worker %d: %s", worker, exc)
        return None
    if restarting is not None and type(msg) is Ready:
        return peers.promote(peer), msg
    if type(msg) is not Hello:
        if restarting is not None:
            drops.drop("not-ready", "%s from the new connection of worker %d before its Ready",
                       type(msg).__name__, restarting)
            return None
        return worker, msg  # type: ignore[return-value]  # only known workers get past a non-Hello
    if rank_must_be is not None and msg.rank != rank_must_be:
        # e.g. under MPI the worker id *is* the sender's rank; a Hello claiming another is forged
        drops.drop("rank-change", "Hello claiming rank %d from %s", msg.rank, who)
        return None
    return (msg.rank, msg) if peers.admit(peer, msg, worker) else None
