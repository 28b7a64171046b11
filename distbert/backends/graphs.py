"""Static-shape buckets for captured graphs: which (batch, length) shape runs a batch, and a cache.

A captured CUDA graph replays fixed shapes, so every batch ``[B, L]`` is run as one or more
*buckets* ``[b, l]`` with ``l >= L``: the inputs are padded (extra columns: mask 0, so attention
ignores them; extra rows: ids, mask and segments 0) and the outputs sliced back to ``[B, L]``.
Nothing here imports torch: the planner and the cache are plain Python and numpy, tested as such.

Ladder (why these shapes):

* lengths: multiples of :data:`LENGTH_STEP` (32) up to :data:`MAX_LENGTH` (384, the longest MLPerf
  feature). 12 rungs; a batch pays at most 31 pad columns, and 32 keeps GEMM shapes multiples of
  8/16 (tensor-core friendly).
* batches: powers of two up to the backend's max batch (which is added as the top rung when it is
  not a power of two). 9 rungs for 256. Padding 170 rows to 256 would waste a third of an Offline
  batch, so :func:`plan` splits instead: it pads a chunk up to the next rung only when the pad rows
  are at most a quarter of that rung (or the rung is at most :data:`SMALL_BATCH` rows, where a pass
  costs about the same whatever the rows), else it runs the largest rung that fits and plans the
  rest: 200 rows -> 256 (56 pad rows); 170 rows -> 128 + 32 + 8 + 2 (4 replays, no pad row);
  5 rows -> 8. Batches above the top rung are split the same way.

With 9 x 12 = 108 possible buckets, :data:`DEFAULT_CAPACITY` (128) holds them all, so a run with the
default ladder never captures a bucket twice; a smaller cap (memory) evicts least recently used.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Generic, TypeVar

import numpy as np

LENGTH_STEP = 32
MAX_LENGTH = 384
SMALL_BATCH = 8
DEFAULT_CAPACITY = 128


@dataclasses.dataclass(frozen=True, order=True)
class Bucket:
    """One static shape: ``batch`` rows of ``length`` tokens."""

    batch: int
    length: int


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Rows ``[start, stop)`` of a batch, run padded to ``bucket``."""

    start: int
    stop: int
    bucket: Bucket

    @property
    def rows(self) -> int:
        return self.stop - self.start


def batch_ladder(max_batch: int) -> tuple[int, ...]:
    """Powers of two below ``max_batch``, then ``max_batch`` itself."""
    if max_batch < 1:
        raise ValueError(f"max batch {max_batch}: must be at least 1")
    rungs = []
    rung = 1
    while rung < max_batch:
        rungs.append(rung)
        rung *= 2
    return (*rungs, max_batch)


def bucket_length(length: int) -> int:
    """``length`` rounded up to a multiple of :data:`LENGTH_STEP`, at most :data:`MAX_LENGTH`."""
    if not 1 <= length <= MAX_LENGTH:
        raise ValueError(f"sequence length {length}: graphs run 1..{MAX_LENGTH} tokens")
    return min(MAX_LENGTH, -(-length // LENGTH_STEP) * LENGTH_STEP)


def plan(rows: int, length: int, ladder: tuple[int, ...]) -> list[Chunk]:
    """The chunks that run a ``[rows, length]`` batch, in row order, covering every row once."""
    if rows < 1:
        raise ValueError(f"batch of {rows} rows: must be at least 1")
    padded_len = bucket_length(length)
    chunks: list[Chunk] = []
    start, left = 0, rows
    while left:
        up = next((r for r in ladder if r >= left), None)
        if up is not None and (up <= SMALL_BATCH or 4 * (up - left) <= up):
            chunks.append(Chunk(start, rows, Bucket(up, padded_len)))
            break
        # padding up would waste more than a quarter of the rung (or there is no rung that big)
        down = max(r for r in ladder if r <= left)
        chunks.append(Chunk(start, start + down, Bucket(down, padded_len)))
        start, left = start + down, left - down
    return chunks


def pad_into(out: np.ndarray, chunk: Chunk, input_ids: np.ndarray, input_mask: np.ndarray,
             segment_ids: np.ndarray) -> None:
    """Fill ``out`` (``[3, bucket.batch, bucket.length]``: ids, mask, segments) with the chunk's
    rows, zeros elsewhere. Only the pad region is cleared: ``out`` may be a reused staging buffer."""
    rows, length = chunk.rows, input_ids.shape[1]
    if out.shape != (3, chunk.bucket.batch, chunk.bucket.length) or length > chunk.bucket.length:
        raise ValueError(f"staging buffer {out.shape} does not fit {chunk} of a length-{length} batch")
    for plane, src in enumerate((input_ids, input_mask, segment_ids)):
        out[plane, :rows, :length] = src[chunk.start:chunk.stop]
    out[:, :rows, length:] = 0
    out[:, rows:, :] = 0


def unpad(outputs: np.ndarray, rows: int, length: int) -> np.ndarray:
    """The real ``[..., rows, length]`` corner of a bucket's outputs (a view)."""
    return outputs[..., :rows, :length]


G = TypeVar("G")


class GraphCache(Generic[G]):
    """Captured graphs by bucket, least recently used evicted beyond ``capacity``.

    ``capture(bucket)`` builds an entry on a miss; ``release(entry)`` (optional) frees an evicted one.
    Not thread-safe: the backend runs from one thread.
    """

    def __init__(self, capture: Callable[[Bucket], G], capacity: int = DEFAULT_CAPACITY,
                 release: Callable[[G], None] | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"graph cache capacity {capacity}: must be at least 1")
        self.capacity = capacity
        self._capture = capture
        self._release = release
        self._entries: collections.OrderedDict[Bucket, G] = collections.OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, bucket: Bucket) -> G:
        entry = self._entries.get(bucket)
        if entry is not None:
            self.hits += 1
            self._entries.move_to_end(bucket)
            return entry
        self.misses += 1
        entry = self._capture(bucket)
        self._entries[bucket] = entry
        while len(self._entries) > self.capacity:
            _, old = self._entries.popitem(last=False)
            self.evictions += 1
            if self._release is not None:
                self._release(old)
        return entry

    def __contains__(self, bucket: object) -> bool:
        return bucket in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def buckets(self) -> list[Bucket]:
        """Cached buckets, least recently used first."""
        return list(self._entries)

    def clear(self) -> None:
        while self._entries:
            _, old = self._entries.popitem(last=False)
            if self._release is not None:
                self._release(old)

    def stats(self) -> dict[str, int]:
        return {"graphs": len(self._entries), "capacity": self.capacity, "hits": self.hits,
                "misses": self.misses, "evictions": self.evictions}
