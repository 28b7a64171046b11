"""In-process transport: rank 0 and its workers as threads of one process (tests, STYLE §11).

Semantics match the ZeroMQ transport: workers are identified by their ``Hello``, a wrong key is
dropped and logged, traffic from a peer without a good ``Hello`` is dropped undecoded, nothing
ever blocks on send, ``wake`` makes the next ``recv`` return ``None``.

Every message still goes through :func:`~distbert.wire.messages.encode` / ``decode`` so tests exercise
the codec; the frames are handed over as they are, so arrays are not copied (the receiver's arrays
are read-only views of the sender's buffers, exactly as with zero-copy ZeroMQ).

Usage::

    hub = InprocHub(key="secret")
    coord = hub.coordinator                      # a CoordinatorTransport
    worker = hub.connect(rank=1)                 # a WorkerTransport; it has sent its Hello
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

from distbert.wire._common import DropLog, Inbox, PeerTable, TransportClosed, accept_from, deadline_after
from distbert.wire.base import CoordinatorTransport, Endpoint, WorkerTransport
from distbert.wire.messages import Hello, Message, MessageError, Shutdown, decode, encode

log = logging.getLogger(__name__)

_hub_names = itertools.count(1)


class InprocHub:
    """One coordinator side (``.coordinator``) and any number of worker sides (``.connect``)."""

    def __init__(self, key: str = "", name: str | None = None) -> None:
        self.key = key
        address = f"inproc://{name or f'hub-{next(_hub_names)}'}"
        self.coordinator = InprocCoordinatorTransport(Endpoint(address, key))

    @property
    def endpoint(self) -> Endpoint:
        return self.coordinator.endpoint

    def connect(self, rank: int, key: str | None = None, *, host: str = "inproc",
                pid: int = 0) -> InprocWorkerTransport:
        """A worker side for ``rank`` that has already sent ``Hello(rank, host, pid, key)``.

        ``key`` defaults to the hub's key; pass another to test refusal.
        """
        worker = InprocWorkerTransport(self.coordinator, rank)
        worker.send(Hello(rank, host, pid, self.key if key is None else key))
        return worker

    def close(self) -> None:
        self.coordinator.close()


class InprocCoordinatorTransport(CoordinatorTransport):
    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._inbox = Inbox()  # items: (sending InprocWorkerTransport, frames)
        self._drops = DropLog(log)
        self._peers = PeerTable(endpoint.key, self._drops, log)  # worker side <-> worker id
        self.closed = False

    # Called by worker sides, from their threads.
    def _deliver(self, sender: InprocWorkerTransport, frames: list[Any]) -> None:
        if not self.closed:
            self._inbox.put((sender, frames))

    def send(self, worker: int, msg: Message) -> None:
        if self.closed:
            raise TransportClosed("send() on a closed in-process transport")
        side = self._peers.route(worker, msg)
        frames = encode(msg)
        if side.closed:
            self._drops.drop("unreachable", "%s for worker %d: it has closed", type(msg).__name__, worker)
            return
        side._inbox.put(frames)

    def recv(self, timeout: float | None) -> tuple[int, Message] | None:
        if self.closed:
            raise TransportClosed("recv() on a closed in-process transport")
        deadline = deadline_after(timeout)
        while True:
            item = self._inbox.get(deadline)
            if item is None:
                return None
            got = self._accept(*item)
            if got is not None:
                return got

    def _accept(self, sender: InprocWorkerTransport, frames: list[Any]) -> tuple[int, Message] | None:
        got = accept_from(self._peers, self._drops, sender, frames, "an in-process peer")
        for old in self._peers.take_displaced():  # a restarted worker's old side: told to stop
            if not old.closed:
                old._inbox.put(encode(Shutdown(reason="replaced by a newer connection for this rank")))
        return got

    def wake(self) -> None:
        self._inbox.wake()

    def close(self) -> None:
        self.closed = True

    @property
    def drops(self) -> dict[str, int]:
        return self._drops.counts


class InprocWorkerTransport(WorkerTransport):
    def __init__(self, coordinator: InprocCoordinatorTransport, rank: int) -> None:
        self.rank = rank
        self._coordinator = coordinator
        self._inbox = Inbox()  # items: frames from the coordinator
        self._drops = DropLog(log)
        self.closed = False

    def send(self, msg: Message) -> None:
        if self.closed:
            raise TransportClosed("send() on a closed in-process transport")
        self._coordinator._deliver(self, encode(msg))

    def recv(self, timeout: float | None) -> Message | None:
        if self.closed:
            raise TransportClosed("recv() on a closed in-process transport")
        deadline = deadline_after(timeout)
        while True:
            frames = self._inbox.get(deadline)
            if frames is None:
                return None
            try:
                return decode(frames)
            except MessageError as exc:
                self._drops.drop("malformed", "malformed message from the coordinator: %s", exc)

    def wake(self) -> None:
        self._inbox.wake()

    def close(self) -> None:
        self.closed = True
