"""Pieces the three transports share: the wake-able inbox, key checks, bounded drop logging."""

from __future__ import annotations

import hmac
import logging
import queue
import time
from typing import Any


class TransportClosed(RuntimeError):
    """``send``/``recv`` on a transport after its ``close()``: a bug in the caller's shutdown order."""


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
    """Which connected peer is which worker: filled only by ``Hello``s with the right key.

    A peer is whatever the transport knows a sender by (ZeroMQ routing id, in-process worker side,
    MPI rank). A second good ``Hello`` for a rank from a *different* peer replaces the old peer (a
    restarted worker); the coordinator sees that ``Hello`` and must treat it as a restart.
    """

    __slots__ = ("_key", "_drops", "_log", "worker_of", "peer_of")

    def __init__(self, key: str, drops: DropLog, log: logging.Logger) -> None:
        self._key = key
        self._drops = drops
        self._log = log
        self.worker_of: dict[Any, int] = {}  # peer -> worker id
        self.peer_of: dict[int, Any] = {}  # worker id -> peer

    def admit(self, peer: Any, hello: Any, known: int | None) -> bool:
        """Check ``hello`` from ``peer`` (already known as worker ``known``, or None) and map it."""
        if not keys_match(hello.key, self._key):
            self._drops.drop("bad-key", "Hello from rank %d (%s, pid %d): wrong key", hello.rank, hello.host, hello.pid)
            return False
        if known is not None and known != hello.rank:
            self._drops.drop("rank-change", "Hello for rank %d from the peer already known as worker %d",
                             hello.rank, known)
            return False
        old = self.peer_of.get(hello.rank)
        if old is not None and old != peer:
            self._log.warning("worker %d said Hello again from a new connection (%s, pid %d): it replaces the old one",
                              hello.rank, hello.host, hello.pid)
            del self.worker_of[old]
        self.worker_of[peer] = hello.rank
        self.peer_of[hello.rank] = peer
        return True


def accept_from(peers: PeerTable, drops: DropLog, peer: Any, frames: Any, who: str, *,
                rank_must_be: int | None = None) -> tuple[int, Any] | None:
    """The coordinator side's receive rule, shared by every transport.

    Returns ``(worker, message)`` for a message from a known worker, or for a ``Hello`` that
    ``peers.admit`` accepts (``rank_must_be``: the rank the Hello must claim, where the transport
    knows it, as MPI does). Anything else is dropped (logged and counted) and None returned: a
    stranger's non-Hello (never decoded: strangers get no parser surface beyond one byte), a bad or
    refused Hello, garbage from a worker.
    """
    from distbert.wire.messages import Hello, MessageError, decode, peek_tag  # lazy: no import cycle

    worker = peers.worker_of.get(peer)
    if worker is None and (not frames or peek_tag(frames[0]) != Hello.TAG):
        drops.drop("unknown-peer", "message from %s, which has not said Hello", who)
        return None
    try:
        msg = decode(frames)
    except MessageError as exc:
        if worker is None:
            drops.drop("bad-hello", "bad Hello from %s: %s", who, exc)
        else:
            drops.drop("malformed", "malformed message from worker %d: %s", worker, exc)
        return None
    if type(msg) is not Hello:
        return worker, msg  # type: ignore[return-value]  # only known workers get past a non-Hello
    if rank_must_be is not None and msg.rank != rank_must_be:
        # e.g. under MPI the worker id *is* the sender's rank; a Hello claiming another is forged
        drops.drop("rank-change", "Hello claiming rank %d from %s", msg.rank, who)
        return None
    return (msg.rank, msg) if peers.admit(peer, msg, worker) else None
