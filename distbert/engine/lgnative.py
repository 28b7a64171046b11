"""LoadGen's C API, reached from Python without pybind's per-sample objects.

Python's ``mlperf_loadgen.QuerySamplesComplete`` takes a list of ``QuerySampleResponse`` objects: each
costs rank 0 a Python object (or an attribute set on a recycled one) and a pybind conversion, about
0.75 us a sample on the 2-vCPU test VM, three times what LoadGen itself spends on it. The same
extension module also carries LoadGen's C API (``mlperf::c::QuerySamplesComplete(response*, count)``,
``ConstructSUT``, ``DestroySUT``), compiled in but not exported. This module finds those functions
by name in the module file's ELF symbol table, relocates them by the exported
``PyInit_mlperf_loadgen`` (same file, same load base), checks that the code at each relocated
address is the code the file has there, and calls them through ctypes: completions from a NumPy array
laid out as LoadGen's ``QuerySampleResponse``, and (:class:`NativeSUT`) an issue callback that
reads LoadGen's sample array by address into NumPy arrays. The calls release the GIL, as pybind's
do. They end in the same LoadGen functions the Python binding calls (``mlperf::QuerySamplesComplete`` with no response
callback; a ``SystemUnderTest`` whose IssueQuery calls back).

Used only when every check passes: a 64-bit little-endian x86-64/aarch64 ELF, the four symbols found
as functions, their code in memory equal to the file's, and a LoadGen version whose response layout
was verified (:data:`VERIFIED`). Otherwise :func:`native_entry` returns None with the reason, and the
caller uses the binding and says so in the run record. ``DISTBERT_LOADGEN_NATIVE=0`` forces the
binding (A/B measurements, or a LoadGen build where something here is wrong).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distbert import envs

log = logging.getLogger(__name__)

#: ``mlperf::c::QuerySamplesComplete(mlperf::QuerySampleResponse*, unsigned long)``, Itanium-mangled
COMPLETE_SYMBOL = "_ZN6mlperf1c20QuerySamplesCompleteEPNS_19QuerySampleResponseEm"
#: ``mlperf::c::ConstructSUT(ClientData, char const*, size_t, IssueQueryCallback, FlushQueriesCallback)``
CONSTRUCT_SYMBOL = "_ZN6mlperf1c12ConstructSUTEmPKcmPFvmPKNS_11QuerySampleEmEPFvvE"
#: ``mlperf::c::DestroySUT(void*)``
DESTROY_SYMBOL = "_ZN6mlperf1c10DestroySUTEPv"
ANCHOR_SYMBOL = "PyInit_mlperf_loadgen"
_FUNCTIONS = (COMPLETE_SYMBOL, CONSTRUCT_SYMBOL, DESTROY_SYMBOL)

_SHT_SYMTAB = 2
_STT_FUNC = 2
_PT_LOAD = 1
_EM_X86_64, _EM_AARCH64 = 62, 183
#: bytes of each function's code compared between the file and memory
CODE_CHECK_BYTES = 32

#: ``QuerySampleResponse`` as loadgen/query_sample.h lays it out: id, data, size (24 bytes), plus
#: ``n_tokens`` since LoadGen 4.0 (32 bytes)
RESPONSE_24 = np.dtype([("id", "<u8"), ("data", "<u8"), ("size", "<u8")])
RESPONSE_32 = np.dtype([("id", "<u8"), ("data", "<u8"), ("size", "<u8"), ("n_tokens", "<i8")])
#: LoadGen versions whose response layout was checked against the binary, and that layout. 6.0.17:
#: ``mlperf::QuerySamplesComplete`` strides its input by ``shl $0x5`` (32 bytes) and the binding
#: exposes id/data/size/n_tokens. Add a version only after the same check (``objdump -d`` of that
#: function, and the binding's fields).
VERIFIED = {"6.0.17": RESPONSE_32}
#: LoadGen's ``QuerySample`` (id, index): unchanged since LoadGen 0.5
SAMPLE = np.dtype([("id", "<u8"), ("index", "<u8")])
#: the most samples one native completion call carries (larger batches are completed in slices)
COMPLETE_CHUNK = 65536

IssueCallback = ctypes.CFUNCTYPE(None, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t)
FlushCallback = ctypes.CFUNCTYPE(None)


class NativeUnavailable(Exception):
    """Why the C API cannot be used (the message is the reason)."""


@dataclass(frozen=True)
class ElfFunctions:
    """Named function symbols of one ELF file, and how to read their code from it."""
    values: dict[str, int]                      # symbol -> virtual address relative to the load base
    segments: list[tuple[int, int, int]]        # PT_LOAD (vaddr, file offset, file size)
    data: bytes

    def code(self, name: str, n: int) -> bytes | None:
        """The first ``n`` bytes of ``name``'s code as the file holds them (None: not in a segment)."""
        value = self.values[name]
        for vaddr, offset, size in self.segments:
            if vaddr <= value and value + n <= vaddr + size:
                at = offset + value - vaddr
                return self.data[at:at + n]
        return None


def elf_functions(path: Path, wanted: set[str]) -> ElfFunctions:
    """The named function symbols in ``path``'s ``.symtab`` (absent ones are left out)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise NativeUnavailable(f"{path.name} is not a 64-bit little-endian ELF file")
    machine, = struct.unpack_from("<H", data, 0x12)
    if machine not in (_EM_X86_64, _EM_AARCH64):
        raise NativeUnavailable(f"{path.name}: machine type {machine} is not x86-64 or aarch64")
    phoff, shoff = struct.unpack_from("<QQ", data, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 0x36)
    segments = []
    for i in range(phnum):
        kind, _flags, offset, vaddr, _paddr, filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if kind == _PT_LOAD:
            segments.append((vaddr, offset, filesz))
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
            name = data[start:data.index(b"\0", start)]
            if name in keys:
                found[name.decode()] = value
    return ElfFunctions(values=found, segments=segments, data=data)


@dataclass(frozen=True)
class NativeComplete:
    """``call(address, count)``: LoadGen's C QuerySamplesComplete on ``count`` responses laid out as
    ``dtype`` at ``address``."""
    call: Callable[[int, int], None]
    dtype: np.dtype

    def __call__(self, responses: np.ndarray) -> None:
        if responses.dtype != self.dtype or not responses.flags.c_contiguous:
            raise ValueError("responses must be a contiguous array of LoadGen's response layout")
        self.call(responses.ctypes.data, len(responses))


@dataclass(frozen=True)
class Entry:
    """LoadGen's C API, relocated into this process."""
    construct: Any
    destroy: Any
    complete: NativeComplete


class NativeSUT:
    """A LoadGen SUT made through ``mlperf::c::ConstructSUT``: the issue callback receives LoadGen's
    sample array by address; ``issue(ids, indices)`` gets ``uint64``/``int64`` arrays (no per-sample
    Python object for an Offline query of millions; distbert uses it for Offline only).
    ``handle`` is what ``mlperf_loadgen.StartTest*`` takes; ``destroy()`` once the test returned.
    (The binding casts that integer to ``SystemUnderTest*``; the C API's trampoline derives from
    ``SystemUnderTest`` alone, so the pointer is the same on the Itanium C++ ABI.)

    ``issue`` must not raise once it has taken the samples (the coordinator's does not). If reading
    LoadGen's array fails, ``issue`` is not called and the query is completed empty (``error`` keeps
    the cause for the caller). If ``issue`` itself raises, nobody knows whether the samples were
    taken: completing them again would make LoadGen crash, leaving them would make it wait forever,
    so the process stops with the cause on stderr."""

    def __init__(self, entry: Entry, name: str, issue: Callable[[Any, Any], None], flush: Callable[[], None]):
        #: an error reading LoadGen's sample array (its query was completed empty); the caller raises it
        self.error: BaseException | None = None

        def on_issue(_client: int, address: int, n: int) -> None:
            try:
                samples = np.frombuffer(ctypes.string_at(address, SAMPLE.itemsize * n), SAMPLE)
                ids, indices = samples["id"].copy(), samples["index"].astype(np.int64)
                del samples
            except BaseException as exc:
                # ctypes would print it and return, and LoadGen would wait forever for these samples
                if self.error is None:
                    self.error = exc
                _complete_empty(entry.complete, address, n)
                return
            try:
                issue(ids, indices)
            except BaseException as exc:
                _stop_process(f"LoadGen's issue callback failed after taking {n} samples: "
                              f"{type(exc).__name__}: {exc}")

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


def _complete_empty(complete: NativeComplete, address: int, n: int) -> None:
    """Complete LoadGen's ``n`` samples at ``address`` without data, a slice at a time (little memory)."""
    try:
        ids = np.ctypeslib.as_array(ctypes.cast(address, ctypes.POINTER(ctypes.c_uint64)), shape=(n, 2))[:, 0]
        for k in range(0, n, COMPLETE_CHUNK):
            part = ids[k:k + COMPLETE_CHUNK]
            responses = np.zeros(len(part), complete.dtype)
            responses["id"] = part
            complete(responses)
    except BaseException as exc:
        _stop_process(f"could not complete LoadGen's query after an error: {type(exc).__name__}: {exc}")


def _stop_process(message: str) -> None:
    """The one way out that neither hangs LoadGen nor completes a sample twice: say why and stop."""
    log.critical("%s; stopping (LoadGen cannot finish this test)", message)
    os.write(2, f"distbert: error: {message}\n".encode(errors="replace"))
    os._exit(70)


def resolve(path: Path, fields: frozenset[str], version: str | None) -> Entry | str:
    """LoadGen's C API in the extension module at ``path`` (already imported, so mapped once in this
    process), given the field names its ``QuerySampleResponse`` binding exposes and the installed
    LoadGen version; or why it cannot be used."""
    dtype = VERIFIED.get(version or "")
    if dtype is None:
        return (f"LoadGen {version or '(version unknown)'}: its response layout has not been verified here "
                f"(verified: {', '.join(VERIFIED)})")
    if fields != frozenset(dtype.names or ()):
        return f"QuerySampleResponse fields {sorted(fields)} differ from the verified layout {list(dtype.names or ())}"
    wanted = {*_FUNCTIONS, ANCHOR_SYMBOL}
    try:
        elf = elf_functions(path, wanted)
    except (OSError, struct.error, ValueError, IndexError) as exc:
        return f"cannot read {path.name}'s symbol table: {exc}"
    except NativeUnavailable as exc:
        return str(exc)
    missing = wanted - elf.values.keys()
    if missing:
        return f"{path.name} has no symbol table entry for LoadGen's C API ({len(missing)} missing: stripped build?)"
    library = ctypes.PyDLL(str(path))   # already loaded: dlopen returns the same mapping
    anchor = ctypes.cast(getattr(library, ANCHOR_SYMBOL), ctypes.c_void_p).value
    if not anchor:
        return f"{ANCHOR_SYMBOL} not found in the loaded {path.name}"
    base = anchor - elf.values[ANCHOR_SYMBOL]
    for name in _FUNCTIONS:
        expected = elf.code(name, CODE_CHECK_BYTES)
        if expected is None or ctypes.string_at(base + elf.values[name], CODE_CHECK_BYTES) != expected:
            return f"the code of {name} in memory differs from {path.name} on disk (file replaced while loaded?)"
    # CFUNCTYPE releases the GIL around each call (pybind's entry points do the same)
    complete = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_size_t)(base + elf.values[COMPLETE_SYMBOL])
    construct = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t,
                                 IssueCallback, FlushCallback)(base + elf.values[CONSTRUCT_SYMBOL])
    destroy = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(base + elf.values[DESTROY_SYMBOL])
    return Entry(construct=construct, destroy=destroy, complete=NativeComplete(call=complete, dtype=dtype))


def response_fields() -> frozenset[str]:
    """The data fields the installed binding's ``QuerySampleResponse`` exposes."""
    import mlperf_loadgen as lg

    return frozenset(name for name in dir(lg.QuerySampleResponse()) if not name.startswith("_"))


def loadgen_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("mlcommons-loadgen")
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def _resolve() -> Entry | str:
    import mlperf_loadgen as lg

    return resolve(Path(lg.__file__ or ""), response_fields(), loadgen_version())


def native_entry() -> tuple[Entry | None, str]:
    """LoadGen's C API, or None and why not (``DISTBERT_LOADGEN_NATIVE=0``, a build without a symbol
    table, a LoadGen whose layout is not verified, code in memory that differs from the file)."""
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
