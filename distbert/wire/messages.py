"""Every message that crosses a process boundary, and its codec (STYLE §1).

Wire format
-----------
A message is a list of frames (ZeroMQ multipart frames, or the frames of one packed MPI buffer):

* **frame 0** = one tag byte, then the message's fixed header (a precompiled little-endian
  :class:`struct.Struct`: integers, floats, the byte length of every string, a dtype code and the
  shape of every array), then the UTF-8 bytes of its strings, back to back, in field order.
  Frame 0 must be exactly that long: trailing bytes are an error.
* **frames 1..n** = the raw little-endian C-order buffers of the message's arrays, in field order,
  one frame per array. They are never copied on encode when the array is already contiguous with
  the wire dtype (``memoryview`` of the array), and never copied on decode (``np.frombuffer``).

Nothing is pickled: a peer can only make the decoder raise :class:`MessageError`.

Contracts
---------
* :func:`encode` makes non-contiguous or wrongly typed arrays contiguous with the wire dtype (a copy
  only then). The returned frames *alias* the message's arrays: do not mutate an array after
  handing its message to a transport (ZeroMQ may still be sending it).
* :func:`decode` returns arrays that are **read-only views** of the received frames; they keep the
  frames alive. Copy them if you need to write.
* Each field holds one dtype on the wire (``ids``: uint64, ``indices``: int64, ``logits``:
  float32); a frame whose dtype code or byte count disagrees with the header is rejected.
* ``Hello`` also carries :data:`WIRE_VERSION`, so a worker from another build is refused at the
  door with a clear error instead of being misread later.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "WIRE_VERSION",
    "MessageError",
    "Hello",
    "Setup",
    "Ready",
    "Batch",
    "Result",
    "Failure",
    "Heartbeat",
    "Shutdown",
    "Bye",
    "Message",
    "encode",
    "decode",
    "peek_tag",
]

#: Bumped whenever the layout of any message changes; checked on ``Hello``.
WIRE_VERSION = 1


class MessageError(ValueError):
    """A message could not be encoded or decoded; the text says which message and which field."""


# -- arrays ---------------------------------------------------------------------------------------

_U64 = np.dtype("<u8")
_I64 = np.dtype("<i8")
_F32 = np.dtype("<f4")
# One byte per dtype on the wire. The code is redundant with the field (each field has exactly
# one dtype) but makes a sender/receiver mismatch an error instead of garbage numbers.
_U64_CODE, _I64_CODE, _F32_CODE = 1, 2, 3
_CODE_NAME = {_U64_CODE: "uint64", _I64_CODE: "int64", _F32_CODE: "float32"}
_EMPTY = b""


def _wire_array(value: Any, dtype: np.dtype, ndim: int, what: str) -> np.ndarray:
    """``value`` as a C-contiguous array of the wire dtype (no copy when it already is one)."""
    try:
        arr = np.ascontiguousarray(value, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise MessageError(f"{what}: cannot convert to {dtype.name}: {exc}") from None
    if arr.ndim != ndim:
        raise MessageError(f"{what}: expected {ndim} dimension(s), got shape {arr.shape}")
    return arr


def _frame_of(arr: np.ndarray) -> memoryview | bytes:
    # memoryview.cast refuses shapes with a zero in them, and an empty frame needs no buffer.
    # (numpy's stubs give ndarray the buffer protocol's __buffer__ only for Python >= 3.12)
    return memoryview(arr).cast("B") if arr.size else _EMPTY  # type: ignore[arg-type]


def _array_from(
    frame: Any, code: int, want_code: int, dtype: np.dtype, shape: tuple[int, ...], what: str
) -> np.ndarray:
    """A read-only view of ``frame`` as ``dtype`` with ``shape``; the frame is any contiguous buffer."""
    if code != want_code:
        got = _CODE_NAME.get(code, f"unknown dtype code {code}")
        raise MessageError(f"{what}: dtype {got} on the wire, expected {dtype.name}")
    try:
        # Straight from the frame object (bytes, zmq.Frame, memoryview...): no intermediate view.
        arr = np.frombuffer(frame, dtype=dtype)
        ok = True
    except (TypeError, ValueError):  # not a buffer, not contiguous, or not a whole number of items
        ok = False
    count = 1
    for dim in shape:
        count *= dim
    if not ok or arr.size != count:
        raise MessageError(
            f"{what}: frame has {_nbytes(frame)} bytes, header says shape {shape} of {dtype.name}"
            f" = {count * dtype.itemsize} bytes"
        )
    if len(shape) != 1:
        arr = arr.reshape(shape)
    # ZeroMQ frames and MPI receive buffers are writable; the contract is read-only views.
    arr.flags.writeable = False
    return arr


def _nbytes(frame: Any) -> str:
    try:
        return str(memoryview(frame).nbytes)
    except TypeError:
        return f"no buffer ({type(frame).__name__}), 0"


def _arrays_equal(a: np.ndarray, b: np.ndarray) -> bool:
    a = np.asarray(a)
    b = np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))


def _array_repr(arr: Any) -> str:
    arr = np.asarray(arr)
    return f"{arr.dtype.name}{list(arr.shape)}"


# -- strings --------------------------------------------------------------------------------------


def _utf8(value: str, what: str) -> bytes:
    try:
        return value.encode("utf-8")
    except (AttributeError, UnicodeEncodeError) as exc:
        raise MessageError(f"{what}: not encodable as UTF-8 text: {exc}") from None


def _read_strings(head: bytes | memoryview, offset: int, lengths: Sequence[int], names: Sequence[str],
                  msg: str) -> list[str]:
    """Decode the strings that follow the fixed header; frame 0 must end exactly after them."""
    end = offset + sum(lengths)
    if end != len(head):
        raise MessageError(
            f"{msg}: frame 0 has {len(head)} bytes, header and string lengths say {end}"
        )
    out = []
    for length, name in zip(lengths, names):
        try:
            out.append(str(head[offset : offset + length], "utf-8"))
        except UnicodeDecodeError as exc:
            raise MessageError(f"{msg}.{name}: invalid UTF-8: {exc}") from None
        offset += length
    return out


def _unpack(st: struct.Struct, head: bytes | memoryview, msg: str) -> tuple:
    if len(head) < st.size:
        raise MessageError(f"{msg}: frame 0 has {len(head)} bytes, shorter than its {st.size}-byte header")
    return st.unpack_from(head)


def _pack(st: struct.Struct, msg: str, *values: Any) -> bytes:
    try:
        return st.pack(*values)
    except struct.error as exc:
        raise MessageError(f"{msg}: a field is out of range or of the wrong type: {exc}") from None


def _expect_frames(frames: Sequence[Any], n: int, msg: str) -> None:
    if len(frames) != n:
        raise MessageError(f"{msg}: expected {n} frame(s), got {len(frames)}")


# -- messages -------------------------------------------------------------------------------------
#
# Each class: TAG (one byte, ASCII so hex dumps read), _HEAD (the fixed header after the tag byte
# is part of it), _encode() -> frames, _decode(head, frames) -> instance. Field order on the wire is
# the field order of the dataclass.


@dataclasses.dataclass(slots=True, frozen=True)
class Hello:
    """Worker -> rank 0, the first message of every worker. ``key`` authenticates it."""

    rank: int
    host: str
    pid: int
    key: str

    TAG: ClassVar[int] = ord("H")
    _HEAD: ClassVar[struct.Struct] = struct.Struct("<BHqqII")  # tag, version, rank, pid, len(host), len(key)

    def _encode(self) -> list[bytes | memoryview]:
        host = _utf8(self.host, "Hello.host")
        key = _utf8(self.key, "Hello.key")
        head = _pack(self._HEAD, "Hello", self.TAG, WIRE_VERSION, self.rank, self.pid, len(host), len(key))
        return [b"".join((head, host, key))]

    @classmethod
    def _decode(cls, head: bytes | memoryview, frames: Sequence[Any]) -> Hello:
        _expect_frames(frames, 1, "Hello")
        _, version, rank, pid, n_host, n_key = _unpack(cls._HEAD, head, "Hello")
        if version != WIRE_VERSION:
            raise MessageError(
                f"Hello: wire version {version} from the peer, this build speaks {WIRE_VERSION}; "
                "run the same distbert version on every rank"
            )
        host, key = _read_strings(head, cls._HEAD.size, (n_host, n_key), ("host", "key"), "Hello")
        return cls(rank, host, pid, key)

    def __repr__(self) -> str:
        # Never log the key.
        return f"Hello(rank={self.rank}, host={self.host!r}, pid={self.pid}, key=<{len(self.key)} chars>)"


@dataclasses.dataclass(slots=True, frozen=True)
class Setup:
    """Rank 0 -> worker: the run configuration as JSON text (feature cache path, backend spec...)."""

    config_json: str

    TAG: ClassVar[int] = ord("S")
    _HEAD: ClassVar[struct.Struct] = struct.Struct("<BI")

    def _encode(self) -> list[bytes | memoryview]:
        text = _utf8(self.config_json, "Setup.config_json")
        return [b"".join((_pack(self._HEAD, "Setup", self.TAG, len(text)), text))]

    @classmethod
    def _decode(cls, head: bytes | memoryview, frames: Sequence[Any]) -> Setup:
        _expect_frames(frames, 1, "Setup")
        _, n = _unpack(cls._HEAD, head, "Setup")
        (text,) = _read_strings(head, cls._HEAD.size, (n,), ("config_json",), "Setup")
        return cls(text)


@dataclasses.dataclass(slots=True, frozen=True)
class Ready:
    """Worker -> rank 0, only after the model is loaded and warmed up (STYLE §6)."""

    rank: int
    host: str
    device: str
    backend: str
    max_batch: int
    info_json: str

    TAG: ClassVar[int] = ord("R")
    _HEAD: ClassVar[struct.Struct] = struct.Struct("<BqqIIII")  # tag, rank, max_batch, 4 string lengths

    def _encode(self) -> list[bytes | memoryview]:
        strs = (
            _utf8(self.host, "Ready.host"),
            _utf8(self.device, "Ready.device"),
            _utf8(self.backend, "Ready.backend"),
            _utf8(self.info_json, "Ready.info_json"),
        )
        head = _pack(self._HEAD, "Ready", self.TAG, self.rank, self.max_batch, *map(len, strs))
        return [b"".join((head, *strs))]

    @classmethod
    def _decode(cls, head: bytes | memoryview, frames: Sequence[Any]) -> Ready:
        _expect_frames(frames, 1, "Ready")
        _, rank, max_batch, *lengths = _unpack(cls._HEAD, head, "Ready")
        host, device, backend, info = _read_strings(
            head, cls._HEAD.size, lengths, ("host", "device", "backend", "info_json"), "Ready"
        )
        return cls(rank, host, device, backend, max_batch, info)


@dataclasses.dataclass(slots=True, frozen=True, eq=False)
class Batch:
    """Rank 0 -> worker: LoadGen response ``ids`` [B] (uint64) and QSL sample ``indices`` [B] (int64).

    The worker echoes ``batch_id`` and ``ids`` in its :class:`Result` (STYLE §2: matched by id).
    """

    batch_id: int
    want_logits: bool
    ids: np.ndarray
    indices: np.ndarray

    TAG: ClassVar[int] = ord("B")
    # tag, batch_id, want_logits, ids dtype, len(ids), indices dtype, len(indices)
    _HEAD: ClassVar[struct.Struct] = struct.Struct("<BqBBQBQ")

    def _encode(self) -> list[bytes | memoryview]:
        ids = _wire_array(self.ids, _U64, 1, "Batch.ids")
        indices = _wire_array(self.indices, _I64, 1, "Batch.indices")
        if ids.shape[0] != indices.shape[0]:
            raise MessageError(f"Batch: {ids.shape[0]} ids but {indices.shape[0]} indices")
        head = _pack(
            self._HEAD, "Batch", self.TAG, self.batch_id, bool(self.want_logits),
            _U64_CODE, ids.shape[0], _I64_CODE, indices.shape[0],
        )
        return [head, _frame_of(ids), _frame_of(indices)]

    @classmethod
    def _decode(cls, head: bytes | memoryview, frames: Sequence[Any]) -> Batch:
        _expect_frames(frames, 3, "Batch")
        _, batch_id, want, ids_code, n_ids, idx_code, n_idx = _unpack(cls._HEAD, head, "Batch")
        if len(head) != cls._HEAD.size:
            raise MessageError(f"Batch: frame 0 has {len(head)} bytes, expected {cls._HEAD.size}")
        if want > 1:
            raise MessageError(f"Batch.want_logits: byte {want} is not a boolean")
        if n_ids != n_idx:
            raise MessageError(f"Batch: header says {n_ids} ids but {n_idx} indices")
        ids = _array_from(frames[1], ids_code, _U64_CODE, _U64, (n_ids,), "Batch.ids")
        indices = _array_from(frames[2], idx_code, _I64_CODE, _I64, (n_idx,), "Batch.indices")
        return cls(batch_id, bool(want), ids, indices)

    def __eq__(self, other: object) -> bool:
        if type(other) is not Batch:
            return NotImplemented
        return (
            self.batch_id == other.batch_id
            and bool(self.want_logits) == bool(other.want_logits)
            and _arrays_equal(self.ids, other.ids)
            and _arrays_equal(self.indices, other.indices)
        )

    __hash__ = None  # type: ignore[assignment]  # holds arrays

    def __repr__(self) -> str:
        return (
            f"Batch(batch_id={self.batch_id}, want_logits={self.want_logits}, "
            f"ids={_array_repr(self.ids)}, indices={_array_repr(self.indices)})"
        )


@dataclasses.dataclass(slots=True, frozen=True, eq=False)
class Result:
    """Worker -> rank 0: ``logits`` [B, L, 2] float32 (start/end interleaved) for the ``ids`` [B] of
    batch ``batch_id``; shape ``(B, 0, 2)`` when the batch did not want logits. ``compute_s`` is the
    worker's own gather + inference time."""

    batch_id: int
    ids: np.ndarray
    logits: np.ndarray
    compute_s: float

    TAG: ClassVar[int] = ord("r")
    # tag, batch_id, compute_s, ids dtype, len(ids), logits dtype, logits shape (3 dims)
    _HEAD: ClassVar[struct.Struct] = struct.Struct("<BqdBQBQQQ")

    def _encode(self) -> list[bytes | memoryview]:
        ids = _wire_array(self.ids, _U64, 1, "Result.ids")
        logits = _wire_array(self.logits, _F32, 3, "Result.logits")
        b, length, two = logits.shape
        if b != ids.shape[0] or two != 2:
            raise MessageError(f"Result: logits shape {logits.shape} does not fit {ids.shape[0]} ids (want (B, L, 2))")
        head = _pack(
            self._HEAD, "Result", self.TAG, self.batch_id, self.compute_s, _U64_CODE, ids.shape[0], _F32_CODE, b,
            length, two
        )
        return [head, _frame_of(ids), _frame_of(logits)]

    @classmethod
    def _decode(cls, head: bytes | memoryview, frames: Sequence[Any]) -> Result:
        _expect_frames(frames, 3, "Result")
        _, batch_id, compute_s, ids_code, n_ids, lg_code, b, length, two = _unpack(cls._HEAD, head, "Result")
        if len(head) != cls._HEAD.size:
            raise MessageError(f"Result: frame 0 has {len(head)} bytes, expected {cls._HEAD.size}")
        if b != n_ids or two != 2:
            raise MessageError(f"Result: header says {n_ids} ids but logits shape ({b}, {length}, {two})")
        ids = _array_from(frames[1], ids_code, _U64_CODE, _U64, (n_ids,), "Result.ids")
        logits = _array_from(frames[2], lg_code, _F32_CODE, _F32, (b, length, two), "Result.logits")
        return cls(batch_id, ids, logits, compute_s)

    def __eq__(self, other: object) -> bool:
        if type(other) is not Result:
            return NotImplemented
        return (
            self.batch_id == other.batch_id
            and self.compute_s == other.compute_s
            and _arrays_equal(self.ids, other.ids)
            and _arrays_equal(self.logits, other.logits)
        )

    __hash__ = None  # type: ignore[assignment]  # holds arrays

    def __repr__(self) -> str:
        return (
            f"Result(batch_id={self.batch_id}, ids={_array_repr(self.ids)}, "
            f"logits={_array_repr(self.logits)}, compute_s={self.compute_s:.6f})"
        )


@dataclasses.dataclass(slots=True, frozen=True)
class Failure:
    """Worker -> rank 0: an exception, as strings (STYLE §8). ``batch_id`` -1 = not tied to a batch."""

    rank: int
    host: str
    batch_id: int
    exc_type: str
    text: str
    traceback: str

    TAG: ClassVar[int] = ord("F")
    _HEAD: ClassVar[struct.Struct] = struct.Struct("<BqqIIII")  # tag, rank, batch_id, 4 string lengths

    def _encode(self) -> list[bytes | memoryview]:
        strs = (
            _utf8(self.host, "Failure.host"),
            _utf8(self.exc_type, "Failure.exc_type"),
            _utf8(self.text, "Failure.text"),
            _utf8(self.traceback, "Failure.traceback"),
        )
        head = _pack(self._HEAD, "Failure", self.TAG, self.rank, self.batch_id, *map(len, strs))
        return [b"".join((head, *strs))]

    @classmethod
    def _decode(cls, head: bytes | memoryview, frames: Sequence[Any]) -> Failure:
        _expect_frames(frames, 1, "Failure")
        _, rank, batch_id, *lengths = _unpack(cls._HEAD, head, "Failure")
        host, exc_type, text, tb = _read_strings(
            head, cls._HEAD.size, lengths, ("host", "exc_type", "text", "traceback"), "Failure"
        )
        return cls(rank, host, batch_id, exc_type, text, tb)


@dataclasses.dataclass(slots=True, frozen=True)
class Heartbeat:
    """Both ways: ``sent_at`` is the sender's clock (``time.time()``); only differences on one host mean anything."""

    rank: int
    sent_at: float

    TAG: ClassVar[int] = ord("h")
    _HEAD: ClassVar[struct.Struct] = struct.Struct("<Bqd")

    def _encode(self) -> list[bytes | memoryview]:
        return [_pack(self._HEAD, "Heartbeat", self.TAG, self.rank, self.sent_at)]

    @classmethod
    def _decode(cls, head: bytes | memoryview, frames: Sequence[Any]) -> Heartbeat:
        _expect_frames(frames, 1, "Heartbeat")
        if len(head) != cls._HEAD.size:
            raise MessageError(f"Heartbeat: frame 0 has {len(head)} bytes, expected {cls._HEAD.size}")
        _, rank, sent_at = cls._HEAD.unpack_from(head)
        return cls(rank, sent_at)


#: A Shutdown whose reason starts with this tells a worker that rank 0 is going away for good (the
#: process that started the run ended): it exits 3, as when rank 0's connection is gone, not 0.
SHUTDOWN_RANK0_GONE = "rank 0 is gone: "


@dataclasses.dataclass(slots=True, frozen=True)
class Shutdown:
    """Rank 0 -> worker: finish (or drop) in-flight work, send :class:`Bye`, exit."""

    reason: str

    TAG: ClassVar[int] = ord("X")
    _HEAD: ClassVar[struct.Struct] = struct.Struct("<BI")

    def _encode(self) -> list[bytes | memoryview]:
        text = _utf8(self.reason, "Shutdown.reason")
        return [b"".join((_pack(self._HEAD, "Shutdown", self.TAG, len(text)), text))]

    @classmethod
    def _decode(cls, head: bytes | memoryview, frames: Sequence[Any]) -> Shutdown:
        _expect_frames(frames, 1, "Shutdown")
        _, n = _unpack(cls._HEAD, head, "Shutdown")
        (reason,) = _read_strings(head, cls._HEAD.size, (n,), ("reason",), "Shutdown")
        return cls(reason)


@dataclasses.dataclass(slots=True, frozen=True)
class Bye:
    """Worker -> rank 0: the last message before a worker exits cleanly."""

    rank: int
    stats_json: str

    TAG: ClassVar[int] = ord("Y")
    _HEAD: ClassVar[struct.Struct] = struct.Struct("<BqI")

    def _encode(self) -> list[bytes | memoryview]:
        text = _utf8(self.stats_json, "Bye.stats_json")
        return [b"".join((_pack(self._HEAD, "Bye", self.TAG, self.rank, len(text)), text))]

    @classmethod
    def _decode(cls, head: bytes | memoryview, frames: Sequence[Any]) -> Bye:
        _expect_frames(frames, 1, "Bye")
        _, rank, n = _unpack(cls._HEAD, head, "Bye")
        (stats,) = _read_strings(head, cls._HEAD.size, (n,), ("stats_json",), "Bye")
        return cls(rank, stats)


Message = Hello | Setup | Ready | Batch | Result | Failure | Heartbeat | Shutdown | Bye

_CLASSES: tuple[type[Message], ...] = (Hello, Setup, Ready, Batch, Result, Failure, Heartbeat, Shutdown, Bye)
# Indexed by tag byte: one list lookup per decode, no dict building.
_DECODERS: list[Any] = [None] * 256
for _cls in _CLASSES:
    assert _DECODERS[_cls.TAG] is None, f"duplicate tag {_cls.TAG}"
    _DECODERS[_cls.TAG] = _cls._decode
del _cls


def encode(msg: Message) -> list[bytes | memoryview]:
    """Frames for ``msg``: frame 0 = tag + header + strings, then one frame per array (aliasing it)."""
    try:
        enc = msg._encode
    except AttributeError:
        raise MessageError(f"cannot encode {type(msg).__name__}: not a distbert message") from None
    return enc()


def _view(frame: Any, i: int) -> memoryview:
    try:
        mv = memoryview(frame)
    except TypeError:
        raise MessageError(f"frame {i}: {type(frame).__name__} is not a buffer") from None
    if mv.ndim != 1 or mv.format != "B":
        try:
            mv = mv.cast("B")
        except TypeError as exc:
            raise MessageError(f"frame {i}: not a contiguous buffer: {exc}") from None
    return mv


def decode(frames: Sequence[Any]) -> Message:
    """The message in ``frames`` (bytes, memoryviews, ``zmq.Frame`` or any contiguous buffers).

    Raises :class:`MessageError` for anything malformed; never anything else for bad input.
    """
    if not frames:
        raise MessageError("empty message: no frames")
    head = frames[0]
    if type(head) is not bytes:  # bytes index and unpack as they are; anything else gets a view
        head = _view(head, 0)
    if not head:
        raise MessageError("frame 0 is empty: no tag byte")
    dec = _DECODERS[head[0]]
    if dec is None:
        raise MessageError(f"unknown message tag {head[0]:#04x}")
    return dec(head, frames)


def peek_tag(frame0: Any) -> int | None:
    """The tag byte of a frame 0 without decoding the message (``None`` if empty or not a buffer).

    Transports use it to refuse non-``Hello`` traffic from unauthenticated peers without decoding it.
    """
    try:
        mv = _view(frame0, 0)
    except MessageError:
        return None
    return mv[0] if mv.nbytes else None
