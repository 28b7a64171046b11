"""The transport contract: how rank 0 and its workers exchange :mod:`distbert.wire.messages`.

Two halves, named alike (STYLE §7):

* :class:`CoordinatorTransport` lives on rank 0. ``send(worker, msg)`` and ``recv(timeout)`` are
  called from **one** thread only (the coordinator's I/O loop). ``wake()`` may be called from any
  thread (LoadGen callbacks) and makes a blocked ``recv`` return ``None`` promptly.
* :class:`WorkerTransport` lives on each worker. Same rule: ``send``/``recv`` from one thread,
  ``wake`` from any thread.

Workers are identified by an ``int`` id: the MPI rank under a launcher, ``1..K`` in single-node
mode. A transport does not interpret messages except ``Hello``, from which it learns a worker's id.
Every implementation passes the same conformance tests (``tests/test_transport.py``).

Shared semantics (all implementations):

* ``send`` never blocks for long: queues are unbounded; a message for a worker whose connection is
  gone is dropped with a log line (rank 0 learns of the loss from ``recv``, below, or from heartbeats,
  never from ``send``).
* Where the transport sees a connection close (ZeroMQ: its socket monitor), ``recv`` returns
  ``(worker, PeerGone(...))`` for it: a local event, never on the wire. A silent peer (a stopped
  process, a cut link) closes nothing: heartbeats find it.
  Arrays are sent zero-copy where the transport can: do not mutate an array after sending it.
* ``wake()`` sets a pending flag: the next ``recv`` (or the one blocked now) returns ``None`` even
  if messages are queued; several wakes before that ``recv`` give one ``None``. Cheap enough to
  call per LoadGen sample (no system call while a wake is already pending).
* Received arrays are read-only views of the receive buffers.
* ``close()`` is called from the owning thread, returns within about a second (bounded linger for
  queued output) and may be called twice; ``send``/``recv`` afterwards raise
  :class:`distbert.wire.TransportClosed`; ``wake`` afterwards is a no-op.
"""

from __future__ import annotations

import abc
import dataclasses

from distbert.wire._common import PeerTable
from distbert.wire.messages import Message


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """Where workers connect. ``address`` is e.g. ``tcp://10.0.0.5:41234``, ``ipc:///tmp/x``,
    ``mpi://`` or ``inproc://name``; ``key`` authenticates workers (never put it on a command line)."""

    address: str
    key: str = dataclasses.field(repr=False)  # never in logs


@dataclasses.dataclass(frozen=True, slots=True)
class PeerGone:
    """Not a wire message: the transport saw a connection of ``worker`` close (its process ended or
    its connection was reset). ``pending``: it was a restart's new connection that had not said Ready
    (the worker's active connection, if any, is unaffected); else the worker's active connection."""

    worker: int
    pending: bool
    why: str


class CoordinatorTransport(abc.ABC):
    endpoint: Endpoint
    _peers: PeerTable  # which connection is which worker (every implementation keeps one)

    @abc.abstractmethod
    def send(self, worker: int, msg: Message) -> None:
        """Queue ``msg`` for ``worker``. Never blocks for long; raises ``KeyError`` for an unknown worker."""

    @abc.abstractmethod
    def recv(self, timeout: float | None) -> tuple[int, Message | PeerGone] | None:
        """Next ``(worker, message)`` from any worker, or ``None`` on timeout or ``wake()``; a
        :class:`PeerGone` where the transport saw that worker's connection close.

        The first message of every worker is its ``Hello``; a ``Hello`` whose key does not match is
        dropped by the transport (and logged), never returned.
        """

    def forget(self, worker: int) -> None:
        """Treat ``worker``'s connection as a stranger's from now on (it broke the protocol): only
        a new ``Hello`` is accepted from it. Owner thread only."""
        self._peers.forget(worker)

    @abc.abstractmethod
    def wake(self) -> None:
        """Make a concurrent or the next ``recv`` return ``None``. Thread-safe."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release sockets. Safe to call twice."""


class WorkerTransport(abc.ABC):
    @abc.abstractmethod
    def send(self, msg: Message) -> None: ...

    @abc.abstractmethod
    def recv(self, timeout: float | None) -> Message | None: ...

    @abc.abstractmethod
    def wake(self) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...
