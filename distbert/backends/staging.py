"""Host staging buffers taken in turn, each reused only after the device copy that read it completed.

A GPU backend fills a pinned host buffer with a batch, then copies it to the device asynchronously
on a copy stream and records an event there (the copy's *fence*). While that copy may still be in
flight, the buffer must not be written again: :class:`StagingRing` keeps ``slots`` buffers, hands
them out in turn, and before handing one out again waits on the fence of its last copy (a CUDA
event's ``synchronize``: that copy only, never the whole device). With two or more slots, the next
batch is written into another buffer while this one's copy runs.

Plain Python: the buffers, the fences and how to wait on one are the caller's (torch pinned tensors
and CUDA events in :mod:`distbert.backends.torch`; plain objects in the CPU tests).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

B = TypeVar("B")   # a host buffer
F = TypeVar("F")   # a fence: "the copy that last read this buffer has completed" once waited on


class StagingRing(Generic[B, F]):
    """``slots`` buffers, used in turn. ``acquire(need)`` returns ``(slot, buffer)`` with at least
    ``need`` elements, after waiting on that slot's last fence; ``fence(slot, f)`` records the copy
    just issued from it. A slot acquired but never fenced (the copy was not issued) is free at once.

    Not thread-safe: one thread at a time prepares batches.
    """

    def __init__(self, slots: int, alloc: Callable[[int], B], size: Callable[[B], int],
                 wait: Callable[[F], None], min_size: int = 0) -> None:
        if slots < 1:
            raise ValueError(f"staging ring of {slots} slots: must be at least 1")
        self.slots = slots
        self.min_size = min_size
        self._alloc = alloc
        self._size = size
        self._wait = wait
        self._buffers: list[B | None] = [None] * slots
        self._fences: list[F | None] = [None] * slots
        self._next = 0
        self.allocations = 0

    def acquire(self, need: int) -> tuple[int, B]:
        slot = self._next
        self._next = (slot + 1) % self.slots
        fence = self._fences[slot]
        if fence is not None:
            # before writing (or dropping) this buffer: its last copy must have read it
            self._wait(fence)
            self._fences[slot] = None
        buf = self._buffers[slot]
        if buf is None or self._size(buf) < need:
            buf = self._buffers[slot] = self._alloc(max(need, self.min_size))
            self.allocations += 1
        return slot, buf

    def fence(self, slot: int, fence: F) -> None:
        if self._fences[slot] is not None:
            raise RuntimeError(f"staging slot {slot} fenced twice without an acquire in between")
        self._fences[slot] = fence

    def drain(self) -> None:
        """Wait on every outstanding fence (before the buffers are freed)."""
        for slot, fence in enumerate(self._fences):
            if fence is not None:
                self._wait(fence)
                self._fences[slot] = None
