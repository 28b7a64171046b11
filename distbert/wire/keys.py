"""The session key and the ZeroMQ CURVE keys derived from it.

One secret per run, the *session key*: hex text of at least 128 bits (16 bytes, 32 hex digits). The
key *is* its bytes: the bit count and the CURVE keys come from the decoded bytes, so upper and lower
case are the same key; whitespace around it (a file's newline) is stripped, whitespace inside it is
refused (``bytes.fromhex`` would skip it, and a 120-bit key with two spaces would look like 128). It travels
like a password: by ``MPI.bcast`` to launched ranks, in the environment (``DISTBERT_SESSION_KEY``) to
rank 0's own child workers, and from ``DISTBERT_SESSION_KEY`` or ``--key-file`` to external
``distbert worker --connect`` processes. Never on a command line, never on the wire.

From it, each side derives two CURVE key pairs (HMAC-SHA256 of the key with a fixed label, used as
the Curve25519 secret): rank 0's **server** pair and the workers' **worker** pair. A worker sets the
server's public key, so it only talks to a rank 0 that holds the session key; rank 0's ZAP handler
admits only the worker public key, so only holders of the session key get a connection at all.
Neither public key crosses the wire in clear (CURVE sends the client's long-term key encrypted) and
the session key itself is never sent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets

from distbert.errors import UserError

MIN_KEY_BITS = 128
_LABEL = b"distbert-curve-v1:"


def new_session_key() -> str:
    """A fresh 256-bit session key (64 hex digits)."""
    return secrets.token_hex(32)


def check_session_key(key: str, source: str) -> str:
    """``key`` (from ``source``: an env var, a file) in its canonical form (stripped, lower case), or a
    UserError naming the fix."""
    session_key_bytes(key.strip(), source)
    return key.strip().lower()


def session_key_bytes(key: str, source: str | None = None) -> bytes:
    """The bytes of a session key's hex text: what its strength and the CURVE keys are made of."""
    fix = "make one with `distbert key --out FILE` (or `openssl rand -hex 32`)"
    where = f"the session key in {source}" if source else "the session key"
    if any(c.isspace() for c in key):
        raise UserError(f"{where} has whitespace inside it (hex digits only, no spaces or line breaks); {fix}")
    try:
        raw = bytes.fromhex(key)
    except ValueError:
        what = "an odd number of hex digits" if all(c in "0123456789abcdefABCDEF" for c in key) else "not hex text"
        raise UserError(f"{where} is {what}; {fix}") from None
    bits = 8 * len(raw)
    if bits < MIN_KEY_BITS:
        raise UserError(f"{where} has {bits} bits, fewer than the {MIN_KEY_BITS} required; {fix}")
    return raw


@dataclasses.dataclass(frozen=True)
class CurveKeys:
    """Z85-encoded CURVE keys (40 bytes each), as ZeroMQ socket options take them."""

    server_public: bytes
    server_secret: bytes = dataclasses.field(repr=False)
    worker_public: bytes
    worker_secret: bytes = dataclasses.field(repr=False)


def curve_keys(session_key: str) -> CurveKeys:
    """The run's CURVE keys, derived from ``session_key``'s bytes (the same on every rank, whatever
    the case of its hex digits)."""
    import zmq
    import zmq.utils.z85

    secret_bytes = session_key_bytes(session_key.strip())

    def pair(role: bytes) -> tuple[bytes, bytes]:
        raw = hmac.new(secret_bytes, _LABEL + role, hashlib.sha256).digest()
        secret = zmq.utils.z85.encode(raw)  # any 32 bytes are a Curve25519 secret (libsodium clamps)
        return zmq.curve_public(secret), secret

    server_public, server_secret = pair(b"server")
    worker_public, worker_secret = pair(b"worker")
    return CurveKeys(server_public, server_secret, worker_public, worker_secret)
