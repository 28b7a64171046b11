"""The wire codec: every message round-trips; the decoder rejects malformed input with MessageError."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from distbert.wire import messages as m
from distbert.wire.messages import (
    Batch,
    Bye,
    Failure,
    Heartbeat,
    Hello,
    MessageError,
    Ready,
    Result,
    Setup,
    Shutdown,
    decode,
    encode,
)

pytestmark = pytest.mark.timeout(60)


def _ids(n: int) -> np.ndarray:
    return (np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1 << 63)


def _logits(b: int, length: int) -> np.ndarray:
    return np.random.default_rng(b * 1000 + length).standard_normal((b, length, 2)).astype(np.float32)


SAMPLES = [
    Hello(rank=3, host="node-07.cluster", pid=123456, key="s3cr3t-é"),
    Hello(rank=0, host="", pid=0, key=""),
    Setup(config_json='{"scenario": "Offline", "cache": "/data/c", "backend": {"name": "null"}}'),
    Setup(config_json="x" * 100_000),
    Ready(rank=1, host="h", device="cuda:0", backend="onnxruntime", max_batch=256, info_json='{"fp": "fp16"}'),
    Batch(batch_id=7, want_logits=True, ids=_ids(1), indices=np.array([10832], dtype=np.int64)),
    Batch(batch_id=2**40, want_logits=False, ids=_ids(256), indices=np.arange(256, dtype=np.int64)[::-1].copy()),
    Batch(batch_id=-1, want_logits=True, ids=_ids(0), indices=np.zeros(0, dtype=np.int64)),
    Result(batch_id=7, ids=_ids(1), logits=_logits(1, 384), compute_s=0.0123),
    Result(batch_id=8, ids=_ids(256), logits=_logits(256, 171), compute_s=1.5),
    Result(batch_id=9, ids=_ids(5), logits=np.zeros((5, 0, 2), np.float32), compute_s=0.0),
    Failure(rank=2, host="h", batch_id=-1, exc_type="RuntimeError", text="CUDA OOM ✗", traceback="Traceback...\n  x"),
    Heartbeat(rank=4, sent_at=1_700_000_000.25),
    Shutdown(reason="test finished"),
    Bye(rank=5, stats_json='{"batches": 10}'),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda x: type(x).__name__)
def test_round_trip(msg):
    frames = encode(msg)
    assert isinstance(frames[0], bytes) and frames[0][0] == msg.TAG
    got = decode(frames)
    assert type(got) is type(msg)
    assert got == msg
    # Also from bytes copies and bytearrays (what a socket or a file would hand us).
    assert decode([bytes(f) for f in frames]) == msg
    assert decode([bytearray(f) for f in frames]) == msg


def test_every_message_class_is_sampled_and_tags_unique():
    classes = {type(s) for s in SAMPLES}
    assert classes == set(m._CLASSES)
    tags = [c.TAG for c in m._CLASSES]
    assert len(tags) == len(set(tags))


def test_arrays_are_separate_zero_copy_frames():
    ids = _ids(64)
    logits = _logits(64, 384)
    frames = encode(Result(1, ids, logits, 0.0))
    assert len(frames) == 3
    # Encode aliases the arrays: no copy of already-contiguous wire-dtype arrays.
    assert np.shares_memory(np.frombuffer(frames[1], np.uint8), ids)
    assert np.shares_memory(np.frombuffer(frames[2], np.uint8), logits)
    got = decode(frames)
    # Decode views the frames: no copy either, and the views are read-only.
    assert np.shares_memory(got.logits, logits)
    assert got.logits.shape == (64, 384, 2) and got.logits.dtype == np.float32
    assert not got.logits.flags.writeable and not got.ids.flags.writeable


def test_non_contiguous_and_other_dtype_arrays_are_made_contiguous():
    big = np.arange(20, dtype=np.int32)
    strided = big[::2]
    assert not strided.flags.c_contiguous
    msg = Batch(1, True, ids=strided, indices=strided)
    got = decode(encode(msg))
    assert got.ids.dtype == np.uint64 and got.indices.dtype == np.int64
    assert got.ids.tolist() == list(range(0, 20, 2)) and got.indices.tolist() == list(range(0, 20, 2))

    logits = np.asfortranarray(_logits(3, 8).astype(np.float64))
    got = decode(encode(Result(2, [1, 2, 3], logits, 0.5)))
    assert got.logits.flags.c_contiguous and got.logits.dtype == np.float32
    np.testing.assert_array_equal(got.logits, logits.astype(np.float32))


def test_equality_compares_arrays_by_value():
    a = Batch(1, True, _ids(4), np.arange(4))
    assert a == Batch(1, True, _ids(4).copy(), np.arange(4).copy())
    assert a != Batch(1, True, _ids(4), np.arange(4) + 1)
    assert a != Batch(2, True, _ids(4), np.arange(4))
    assert a != Batch(1, True, _ids(4), np.arange(4, dtype=np.int32))  # dtype is part of the value
    r = Result(1, _ids(2), np.full((2, 3, 2), np.nan, np.float32), 0.0)
    assert r == Result(1, _ids(2), np.full((2, 3, 2), np.nan, np.float32), 0.0)
    with pytest.raises(TypeError):
        hash(a)
    assert hash(Heartbeat(1, 2.0)) == hash(Heartbeat(1, 2.0))


def test_repr_is_short_and_hides_the_key():
    assert "s3cr3t" not in repr(SAMPLES[0])
    assert len(repr(SAMPLES[9])) < 200  # no dump of 256x171x2 floats in a log line


# -- encode refuses what cannot be represented ----------------------------------------------------


@pytest.mark.parametrize(
    "msg, match",
    [
        (Batch(1, True, _ids(3), np.arange(4)), "3 ids but 4 indices"),
        (Batch(1, True, _ids(3).reshape(3, 1), np.arange(3)), "dimension"),
        (Result(1, _ids(3), _logits(2, 4), 0.0), "does not fit"),
        (Result(1, _ids(2), np.zeros((2, 4, 3), np.float32), 0.0), "does not fit"),
        (Result(1, _ids(2), np.zeros((2, 4)), 0.0), "dimension"),
        (Heartbeat(2**63, 0.0), "out of range"),
        (Hello(1, "\udcff", 1, "k"), "UTF-8"),
        (Setup(None), "UTF-8"),  # type: ignore[arg-type]
    ],
)
def test_encode_rejects(msg, match):
    with pytest.raises(MessageError, match=match):
        encode(msg)


def test_encode_rejects_non_messages():
    with pytest.raises(MessageError, match="not a distbert message"):
        encode("hello")


# -- decode rejects anything malformed ------------------------------------------------------------


def _frames(msg) -> list[bytes]:
    return [bytes(f) for f in encode(msg)]


BATCH = Batch(5, True, _ids(4), np.arange(4, dtype=np.int64))
RESULT = Result(5, _ids(4), _logits(4, 6), 0.25)


def _bad_inputs():
    b = _frames(BATCH)
    r = _frames(RESULT)
    hello = _frames(SAMPLES[0])
    yield "no frames", [], "no frames"
    yield "empty frame 0", [b""], "empty"
    yield "unknown tag", [b"\x00" + b[0][1:], *b[1:]], "unknown message tag 0x00"
    yield "unknown tag 0xff", [b"\xff"], "unknown message tag 0xff"
    yield "short header", [b[0][:10], *b[1:]], "shorter than its"
    yield "tag only", [bytes([Heartbeat.TAG])], "expected"
    yield "long header", [b[0] + b"\0", *b[1:]], "frame 0 has"
    yield "missing frame", b[:2], "expected 3 frame"
    yield "extra frame", [*b, b"\0" * 8], "expected 3 frame"
    yield "extra frame on a scalar message", [*hello, b""], "expected 1 frame"
    yield "ids byte count", [b[0], b[1][:-8], b[2]], "Batch.ids: frame has 24 bytes"
    yield "indices byte count", [b[0], b[1], b[2] + b"\0"], "Batch.indices: frame has 33 bytes"
    yield "logits byte count", [r[0], r[1], r[2][:-4]], "Result.logits: frame has"
    ids_as_float = bytearray(b[0])
    ids_as_float[1 + 8 + 1] = 3  # the dtype code of ids -> float32
    yield "dtype mismatch", [bytes(ids_as_float), *b[1:]], "dtype float32 on the wire, expected uint64"
    unknown_dtype = bytearray(b[0])
    unknown_dtype[1 + 8 + 1] = 99
    yield "unknown dtype", [bytes(unknown_dtype), *b[1:]], "unknown dtype code 99"
    lying = bytearray(b[0])
    struct.pack_into("<Q", lying, 1 + 8 + 1 + 1 + 8 + 1, 5)  # indices count 5 != ids count 4
    yield "count mismatch", [bytes(lying), *b[1:]], "4 ids but 5 indices"
    bad_bool = bytearray(b[0])
    bad_bool[1 + 8] = 7
    yield "bool byte", [bytes(bad_bool), *b[1:]], "not a boolean"
    r_shape = bytearray(r[0])
    struct.pack_into("<Q", r_shape, len(r_shape) - 8, 3)  # last logits dim 3
    yield "logits last dim", [bytes(r_shape), *r[1:]], "logits shape"
    # Strings: lengths that overrun frame 0, trailing bytes, invalid UTF-8.
    h = bytearray(hello[0])
    yield "truncated string", [bytes(h[:-3])], "frame 0 has"
    yield "trailing bytes after strings", [bytes(h) + b"zz"], "frame 0 has"
    bad_utf8 = bytearray(_frames(Shutdown("abcd"))[0])
    bad_utf8[-2] = 0xFF
    yield "bad utf-8", [bytes(bad_utf8)], "Shutdown.reason: invalid UTF-8"
    huge_len = bytearray(_frames(Setup("{}"))[0])
    struct.pack_into("<I", huge_len, 1, 0xFFFFFFFF)
    yield "huge string length", [bytes(huge_len)], "frame 0 has"
    version = bytearray(hello[0])
    struct.pack_into("<H", version, 1, m.WIRE_VERSION + 1)
    yield "wire version", [bytes(version)], "wire version"
    yield "not a buffer", [12345], "not a buffer"
    yield "string frame", ["B"], "not a buffer"


@pytest.mark.parametrize("frames, match", [(f, mt) for _, f, mt in _bad_inputs()], ids=[n for n, _, _ in _bad_inputs()])
def test_decode_rejects(frames, match):
    with pytest.raises(MessageError, match=match):
        decode(frames)


def test_decode_accepts_non_byte_buffers_and_zmq_frames():
    zmq = pytest.importorskip("zmq")
    frames = encode(RESULT)
    as_frames = [zmq.Frame(bytes(f)) for f in frames]
    assert decode(as_frames) == RESULT
    # A float32 numpy array as the logits frame is a buffer too (itemsize != 1).
    assert decode([frames[0], frames[1], np.ascontiguousarray(RESULT.logits)]) == RESULT
    # Non-contiguous buffers and non-buffers as array frames: clean errors, not crashes.
    with pytest.raises(MessageError, match="Result.logits: frame has"):
        decode([frames[0], frames[1], RESULT.logits[:, ::2]])
    with pytest.raises(MessageError, match="Result.ids: frame has no buffer"):
        decode([frames[0], "abc", frames[2]])
    with pytest.raises(MessageError, match="frame 0: not a contiguous buffer"):
        decode([RESULT.logits[:, ::2]])


def test_fuzzed_frames_only_raise_message_error():
    """100,000 mutated messages (bytes flipped, frames cut, added, dropped): decode returns a message
    or raises MessageError, nothing else, and what it returns re-encodes."""
    rng = np.random.default_rng(0)
    seeds = [_frames(s) for s in SAMPLES]
    decoded = 0
    for i in range(100_000):
        frames = [bytearray(f) for f in seeds[i % len(seeds)]]
        j = int(rng.integers(len(frames)))
        r = rng.random()
        if len(frames[j]) and r < 0.6:
            for _ in range(int(rng.integers(1, 4))):
                frames[j][int(rng.integers(len(frames[j])))] = int(rng.integers(256))
        elif r < 0.8:
            frames[j] = frames[j][: int(rng.integers(len(frames[j]) + 1))]
        elif r < 0.9:
            frames.append(bytearray(rng.bytes(int(rng.integers(0, 16)))))
        else:
            del frames[j]
        try:
            msg = decode(frames)
        except MessageError:
            continue
        decoded += 1
        encode(msg)
    assert 0 < decoded < 100_000   # both paths taken


def test_peek_tag():
    assert m.peek_tag(encode(BATCH)[0]) == Batch.TAG
    assert m.peek_tag(b"") is None
    assert m.peek_tag(object()) is None
