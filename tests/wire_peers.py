"""Network helpers for tests: a free port, a raw ZeroMQ socket that holds the session key but runs no
distbert code, and a TCP relay that records every byte crossing it."""

from __future__ import annotations

import socket
import threading
from typing import Any

from distbert.wire.keys import curve_keys


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a server the test starts next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def key_holder_socket(ctx: Any, key: str, routing_id: bytes | None = None) -> Any:
    """A DEALER with the CURVE keys of ``key``'s workers (a key holder: it passes the handshake)."""
    import zmq

    keys = curve_keys(key)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.worker_public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.worker_secret)
    if routing_id is not None:
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
    return sock


class RecordingRelay:
    """Listens on 127.0.0.1 (``.port``) and relays each connection to ``target`` (host, port),
    keeping every byte in both directions in ``.captured`` (a wire tap for tests)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.captured = bytearray()
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = [self._listener]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:   # the target is not listening yet: drop this one, the peer redials
                client.close()
                continue
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                return
            with self._lock:
                self.captured += data
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self._closed = True
        for s in self._sockets:
            try:
                s.close()
            except OSError:
                pass
