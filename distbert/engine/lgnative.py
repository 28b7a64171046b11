"""LoadGen's C entry point for completions, reached from Python without pybind's per-sample objects.

Python's ``mlperf_loadgen.QuerySamplesComplete`` takes a list of ``QuerySampleResponse`` objects: each
costs rank 0 a Python object (or an attribute set on a recycled one) and a pybind conversion, about
0.75 us a sample on the 2-vCPU test VM, three times what LoadGen itself spends on it. The same
extension module also carries LoadGen's C API (``mlperf::c::QuerySamplesComplete(response*, count)``),
compiled in but not exported. This module finds it by name in the module file's ELF symbol table,
relocates it by the exported ``PyInit_mlperf_loadgen`` (same file, same load base) and calls it
through ctypes with a NumPy array laid out as LoadGen's ``QuerySampleResponse`` (id, data, size
[, n_tokens]). The call releases the GIL, as pybind's does. It is the same LoadGen function the
Python binding ends in (``mlperf::QuerySamplesComplete`` with no response callback).

Used only when every check passes (ELF x86-64/aarch64 little-endian, both symbols found as
functions, the response fields the binding exposes are exactly a known layout); otherwise
:func:`native_complete` returns None with the reason and the caller keeps the Python path, saying so
in the run record. ``DISTBERT_LOADGEN_NATIVE=0`` forces the Python path (A/B, or a LoadGen build
where something here is wrong).
"""

from __future__ import annotations

import ctypes
import functools
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distbert import envs

#: ``mlperf::c::QuerySamplesComplete(mlperf::QuerySampleResponse*, unsigned long)``, Itanium-mangled
COMPLETE_SYMBOL = "_ZN6mlperf1c20QuerySamplesCompleteEPNS_19QuerySampleResponseEm"
#: ``mlperf::c::ConstructSUT(ClientData, char const*, size_t, IssueQueryCallback, FlushQueriesCallback)``
CONSTRUCT_SYMBOL = "_ZN6mlperf1c12ConstructSUTEmPKcmPFvmPKNS_11QuerySampleEmEPFvvE"
#: ``mlperf::c::DestroySUT(void*)``
DESTROY_SYMBOL = "_ZN6mlperf1c10DestroySUTEPv"
ANCHOR_SYMBOL = "PyInit_mlperf_loadgen"

_SHT_SYMTAB = 2
_STT_FUNC = 2
_EM_X86_64, _EM_AARCH64 = 62, 183

#: LoadGen's ``QuerySampleResponse`` by the fields its binding exposes (loadgen/query_sample.h):
#: 24 bytes before LoadGen 4.0, 32 since ``n_tokens`` was added (checked against 6.0.17's
#: ``mlperf::QuerySamplesComplete``, which strides its input by ``shl $5``).
LAYOUTS = {
    frozenset({"id", "data", "size"}): np.dtype([("id", "<u8"), ("data", "<u8"), ("size", "<u8")]),
    frozenset({"id", "data", "size", "n_tokens"}):
        np.dtype([("id", "<u8"), ("data", "<u8"), ("size", "<u8"), ("n_tokens", "<i8")]),
}


class NativeUnavailable(Exception):
    """Why the C entry point cannot be used (the message is the reason)."""


def elf_function_symbols(path: Path, wanted: set[str]) -> dict[str, int]:
    """Values (file-relative addresses) of the named function symbols in ``path``'s ``.symtab``."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise NativeUnavailable(f"{path.name} is not a 64-bit little-endian ELF file")
    machine, = struct.unpack_from("<H", data, 0x12)
    if machine not in (_EM_X86_64, _EM_AARCH64):
        raise NativeUnavailable(f"{path.name}: machine type {machine} is not x86-64 or aarch64")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    found: dict[str, int] = {}
    keys = {name.encode() for name in wanted}
    for _name, kind, _flags, _addr, offset, size, link, _info, _align, entsize in sections:
        if kind != _SHT_SYMTAB or not entsize:
            continue
        strings = sections[link][4]
        for k in range(size // entsize):
            name_at, info, _other, _shndx, value, _size = struct.unpack_from("<IBBHQQ", data, offset + k * entsize)
            if info & 0xF != _STT_FUNC or not value:
                continue
            start = strings + name_at
            end = data.index(b"\0", start)
            name = data[start:end]
            if name in keys:
                found[name.decode()] = value
    return found


#: LoadGen's ``QuerySample`` (id, index): unchanged since LoadGen 0.5
SAMPLE = np.dtype([("id", "<u8"), ("index", "<u8")])
#: at most this many samples in one issue callback arrive as Python lists (Server, SingleStream:
#: cheaper than arrays for a few); more arrive as NumPy arrays (Offline: no per-sample objects)
LIST_MAX = 64

IssueCallback = ctypes.CFUNCTYPE(None, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t)
FlushCallback = ctypes.CFUNCTYPE(None)


class NativeSUT:
    """A LoadGen SUT made through ``mlperf::c::ConstructSUT``: the issue callback receives LoadGen's
    sample array by address; ``issue(ids, indices)`` gets lists for up to LIST_MAX samples, else
    ``uint64``/``int64`` arrays (no per-sample Python object for an Offline query of millions).
    ``handle`` is what ``mlperf_loadgen.StartTest*`` takes; ``destroy()`` once the test returned."""

    def __init__(self, entry: Entry, name: str, issue: Callable[[Any, Any], None], flush: Callable[[], None]):
        #: an exception raised by ``issue`` (its query was completed empty); the caller re-raises it
        self.error: BaseException | None = None

        def on_issue(_client: int, address: int, n: int) -> None:
            raw = ctypes.string_at(address, 16 * n)
            try:
                if n <= LIST_MAX:
                    both = struct.unpack(f"<{2 * n}Q", raw)
                    issue(list(both[0::2]), list(both[1::2]))
                else:
                    samples = np.frombuffer(raw, SAMPLE)
                    issue(samples["id"].copy(), samples["index"].astype(np.int64))
            except BaseException as exc:
                # ctypes would print it and return, and LoadGen would wait forever for these samples:
                # complete the query empty so the test ends, and keep the error for the caller.
                if self.error is None:
                    self.error = exc
                empty = np.zeros(n, entry.complete.dtype)
                empty["id"] = np.frombuffer(raw, SAMPLE)["id"]
                entry.complete(empty)

        # the callbacks must outlive the SUT: LoadGen calls them until StartTest returns
        self._callbacks = (IssueCallback(on_issue), FlushCallback(flush))
        encoded = name.encode()
        self._entry = entry
        self.handle: int | None = entry.construct(0, encoded, len(encoded), *self._callbacks)
        if not self.handle:
            raise RuntimeError("LoadGen's C ConstructSUT returned null")

    def destroy(self) -> None:
        if self.handle:
            self._entry.destroy(self.handle)
            self.handle = None


@dataclass(frozen=True)
class Entry:
    """LoadGen's C entry points, relocated into this process."""
    construct: Any
    destroy: Any
    complete: NativeComplete


@dataclass(frozen=True)
class NativeComplete:
    """``call(array.ctypes.data, count)`` completes ``count`` responses laid out as ``dtype``."""
    call: Callable[[int, int], None]
    dtype: np.dtype
    address: int

    def __call__(self, responses: np.ndarray) -> None:
        if responses.dtype != self.dtype or not responses.flags.c_contiguous:
            raise ValueError("responses must be a contiguous array of LoadGen's response layout")
        self.call(responses.ctypes.data, len(responses))


def resolve(path: Path, fields: frozenset[str]) -> Entry | str:
    """LoadGen's C entry points in the extension module at ``path`` (already imported: it is mapped
    once, so relocating by its ``PyInit`` finds this process's copy), given the field names its
    ``QuerySampleResponse`` binding exposes; or why they cannot be used."""
    dtype = LAYOUTS.get(fields)
    if dtype is None:
        return f"unknown QuerySampleResponse fields {sorted(fields)} (this LoadGen's layout is not known here)"
    wanted = {COMPLETE_SYMBOL, CONSTRUCT_SYMBOL, DESTROY_SYMBOL, ANCHOR_SYMBOL}
    try:
        symbols = elf_function_symbols(path, wanted)
    except (OSError, struct.error, ValueError, IndexError) as exc:
        return f"cannot read {path.name}'s symbol table: {exc}"
    except NativeUnavailable as exc:
        return str(exc)
    missing = wanted - symbols.keys()
    if missing:
        return f"{path.name} has no symbol table entry for LoadGen's C API ({len(missing)} missing: stripped build?)"
    library = ctypes.PyDLL(str(path))   # already loaded: dlopen returns the same mapping
    anchor = ctypes.cast(getattr(library, ANCHOR_SYMBOL), ctypes.c_void_p).value
    if not anchor:
        return f"{ANCHOR_SYMBOL} not found in the loaded {path.name}"
    base = anchor - symbols[ANCHOR_SYMBOL]
    # CFUNCTYPE releases the GIL around each call (pybind's entry points do the same)
    complete = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_size_t)(base + symbols[COMPLETE_SYMBOL])
    construct = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t,
                                 IssueCallback, FlushCallback)(base + symbols[CONSTRUCT_SYMBOL])
    destroy = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(base + symbols[DESTROY_SYMBOL])
    return Entry(construct=construct, destroy=destroy,
                 complete=NativeComplete(call=complete, dtype=dtype, address=base + symbols[COMPLETE_SYMBOL]))


def response_fields() -> frozenset[str]:
    """The data fields the installed binding's ``QuerySampleResponse`` exposes."""
    import mlperf_loadgen as lg

    return frozenset(name for name in dir(lg.QuerySampleResponse()) if not name.startswith("_"))


@functools.lru_cache(maxsize=1)
def _resolve() -> Entry | str:
    import mlperf_loadgen as lg

    return resolve(Path(lg.__file__ or ""), response_fields())


def native_entry() -> tuple[Entry | None, str]:
    """LoadGen's C entry points, or None and why not (``DISTBERT_LOADGEN_NATIVE=0``, a build
    without a symbol table, an unknown response layout)."""
    if not envs.loadgen_native():
        return None, "DISTBERT_LOADGEN_NATIVE=0"
    found = _resolve()
    if isinstance(found, str):
        return None, found
    return found, "LoadGen's C API (mlperf::c::ConstructSUT, QuerySamplesComplete)"


def native_complete() -> tuple[NativeComplete | None, str]:
    """LoadGen's C QuerySamplesComplete, or None and why not."""
    entry, why = native_entry()
    return (entry.complete if entry is not None else None), why
