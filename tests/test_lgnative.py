"""LoadGen's C entry points (engine/lgnative.py) and the completer that uses them.

The real LoadGen wheel is read and called here; the end-to-end runs (tests/test_engine_mp.py and the
A/B below) check that every response reaches LoadGen with the right id and data through the native
path. The completer unit test stands a Python function in for LoadGen's C call (it cannot be called
outside a running test) and reads back what LoadGen would have read.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distbert.engine import completion, lgnative
from distbert.engine.coordinator import _joined
from tests.conftest import REPO

lg = pytest.importorskip("mlperf_loadgen")
WHEEL = Path(lg.__file__)
ALL = {lgnative.COMPLETE_SYMBOL, lgnative.CONSTRUCT_SYMBOL, lgnative.DESTROY_SYMBOL, lgnative.ANCHOR_SYMBOL}


def test_the_installed_loadgen_carries_its_c_api():
    found = lgnative.elf_functions(WHEEL, ALL).values
    assert found.keys() == ALL and all(v > 0 for v in found.values())
    entry, why = lgnative.native_entry()
    assert entry is not None, why
    assert entry.complete.dtype == lgnative.VERIFIED[lgnative.loadgen_version()]
    assert frozenset(entry.complete.dtype.names) == lgnative.response_fields()


def _without_symtab(tmp_path: Path) -> Path:
    """A copy of the wheel's module whose symbol table section is marked empty (a stripped build)."""
    data = bytearray(WHEEL.read_bytes())
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    for i in range(shnum):
        at = shoff + i * shentsize
        if struct.unpack_from("<I", data, at + 4)[0] == 2:   # SHT_SYMTAB -> SHT_NULL
            struct.pack_into("<I", data, at + 4, 0)
    out = tmp_path / WHEEL.name
    out.write_bytes(bytes(data))
    return out


def test_a_build_without_symbols_or_an_unverified_layout_is_refused_with_the_reason(tmp_path):
    fields, version = lgnative.response_fields(), lgnative.loadgen_version()
    why = lgnative.resolve(_without_symtab(tmp_path), fields, version)
    assert isinstance(why, str) and "stripped build?" in why
    text = tmp_path / "not-elf.so"
    text.write_text("hello")
    why = lgnative.resolve(text, fields, version)
    assert isinstance(why, str) and "not a 64-bit little-endian ELF" in why
    why = lgnative.resolve(WHEEL, fields | {"first_token_ns"}, version)
    assert isinstance(why, str) and "differ from the verified layout" in why
    why = lgnative.resolve(WHEEL, fields, "9.9.9")
    assert isinstance(why, str) and "LoadGen 9.9.9: its response layout has not been verified" in why
    why = lgnative.resolve(WHEEL, fields, None)
    assert isinstance(why, str) and "(version unknown)" in why


_REPLACED = r"""
import ctypes, json, shutil, sys
from pathlib import Path
import mlperf_loadgen as lg
from distbert.engine import lgnative

copy = Path(sys.argv[1]) / Path(lg.__file__).name
shutil.copy(lg.__file__, copy)
fields, version = lgnative.response_fields(), lgnative.loadgen_version()
ok = lgnative.resolve(copy, fields, version)          # the copy is loaded here (a second mapping)
elf = lgnative.elf_functions(copy, {lgnative.COMPLETE_SYMBOL})
data = bytearray(copy.read_bytes())
at = next(off + elf.values[lgnative.COMPLETE_SYMBOL] - vaddr for vaddr, off, size in elf.segments
          if vaddr <= elf.values[lgnative.COMPLETE_SYMBOL] < vaddr + size)
data[at] ^= 0xFF                   # a new file takes the path while the old one is loaded (as pip does)
fresh = copy.with_suffix(".new")
fresh.write_bytes(bytes(data))
fresh.replace(copy)
print(json.dumps({"before": isinstance(ok, lgnative.Entry), "after": lgnative.resolve(copy, fields, version)}))
"""


@pytest.mark.timeout(60)
def test_code_in_memory_must_match_the_file(tmp_path):
    """A module file replaced on disk after it was loaded (a pip upgrade mid-run): the symbol table
    no longer describes the code in memory, so the C API is refused."""
    proc = subprocess.run([sys.executable, "-c", _REPLACED, str(tmp_path)], capture_output=True, text=True,
                          timeout=50, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["before"] is True
    assert "differs from" in out["after"] and "file replaced while loaded?" in out["after"]


def test_the_switch_turns_the_native_path_off(monkeypatch):
    monkeypatch.setenv("DISTBERT_LOADGEN_NATIVE", "0")
    entry, why = lgnative.native_entry()
    assert entry is None and why == "DISTBERT_LOADGEN_NATIVE=0"
    c = completion.Completer()
    assert c.path == "python" and c.why == "DISTBERT_LOADGEN_NATIVE=0"


class _Recorder:
    """Stands in for LoadGen's C QuerySamplesComplete: reads the responses at the address it is given."""

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype
        self.calls: list[np.ndarray] = []

    def __call__(self, address: int, n: int) -> None:
        raw = ctypes.string_at(address, n * self.dtype.itemsize)
        self.calls.append(np.frombuffer(raw, self.dtype).copy())


def test_completer_writes_ids_data_pointers_and_sizes_as_loadgen_reads_them():
    real, _ = lgnative.native_complete()
    assert real is not None
    rec = _Recorder(real.dtype)
    c = completion.Completer()
    assert c.path == "native"
    c._native = lgnative.NativeComplete(call=rec, dtype=real.dtype)
    rng = np.random.default_rng(0)
    # with logits: every data pointer reads back its own row, size = one row's bytes
    ids = rng.integers(1, 2**62, 700, dtype=np.uint64)
    logits = rng.standard_normal((700, 384, 2)).astype(np.float32)
    c.complete(ids, logits)
    got = rec.calls[-1]
    assert (got["id"] == ids).all() and (got["size"] == 384 * 2 * 4).all()
    for k in (0, 1, 350, 699):
        row = np.frombuffer(ctypes.string_at(int(got["data"][k]), 384 * 2 * 4), np.float32).reshape(384, 2)
        assert (row == logits[k]).all()
    # then without: no stale pointer survives (a performance test after an accuracy test)
    c.complete(ids[:5], None)
    got = rec.calls[-1]
    assert (got["id"] == ids[:5]).all() and (got["data"] == 0).all() and (got["size"] == 0).all()
    # one sample, a (B, 0, 2) result, and a batch bigger than the buffer (it grows)
    c.complete(np.array([7], np.uint64), np.zeros((1, 0, 2), np.float32))
    assert rec.calls[-1]["id"].tolist() == [7] and rec.calls[-1]["size"].tolist() == [0]
    big = np.arange(1, 5001, dtype=np.uint64)
    c.complete(big, None)
    assert (rec.calls[-1]["id"] == big).all() and len(rec.calls[-1]) == 5000
    # more than one call carries (an aborted Offline query): slices, the buffer stays bounded
    huge = np.arange(1, 2 * lgnative.COMPLETE_CHUNK + 11, dtype=np.uint64)
    before = len(rec.calls)
    c.complete(huge, None)
    parts = rec.calls[before:]
    assert [len(p) for p in parts] == [lgnative.COMPLETE_CHUNK, lgnative.COMPLETE_CHUNK, 10]
    assert (np.concatenate([p["id"] for p in parts]) == huge).all()
    assert len(c._buffer) <= lgnative.COMPLETE_CHUNK


def test_drained_samples_keep_issue_order_across_lists_and_arrays():
    ids, idx = _joined([1, 2], [10, 20], [])
    assert ids == [1, 2] and idx == [10, 20]
    a = (np.array([3, 4], np.uint64), np.array([30, 40], np.int64))
    ids, idx = _joined([], [], [a])
    assert ids is a[0] or (ids == a[0]).all()
    ids, idx = _joined([], [], [([1, 2], [10, 20]), a, ([5], [50])])
    assert ids.tolist() == [1, 2, 3, 4, 5] and idx.tolist() == [10, 20, 30, 40, 50]
    assert ids.dtype == np.uint64 and idx.dtype == np.int64


@pytest.fixture(scope="module")
def env(squad_dev, vocab, session_cache) -> dict[str, str]:
    return dict(os.environ, DISTBERT_CACHE=str(session_cache), DISTBERT_NO_PROGRESS="1", PYTHONPATH=str(REPO))


@pytest.mark.timeout(300)
def test_native_and_binding_paths_give_loadgen_the_same_responses(env, squad_dev, vocab, tmp_path):
    """The same Offline accuracy run through LoadGen's C API and through its Python binding: the
    accuracy logs (every qsl_idx with its logits as LoadGen copied them) are identical."""
    logs = {}
    for native in ("1", "0"):
        out = tmp_path / f"run-{native}"
        cmd = [sys.executable, "-m", "distbert", "run", "--dataset", str(squad_dev), "--vocab", str(vocab),
               "--output", str(out), "--backend", "oracle", "--workers", "2", "--scenario", "Offline",
               "--mode", "accuracy", "--max-examples", "600", "--max-batch", "16"]
        proc = subprocess.run(cmd, env=dict(env, DISTBERT_LOADGEN_NATIVE=native), capture_output=True, text=True,
                              timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        record = json.loads((out / "run.json").read_text())
        acc = record["results"]["accuracy"]
        want = "native" if native == "1" else "python"
        assert (acc["issue"], acc["completion"]) == (want, want)
        assert acc["loadgen_errors"] == 0
        entries = json.loads((out / "accuracy" / "mlperf_log_accuracy.json").read_text())
        logs[native] = {e["qsl_idx"]: e["data"] for e in entries}
        assert len(logs[native]) == len(entries)   # each sample once
    assert logs["1"] == logs["0"] and len(logs["1"]) >= 600
    assert os.environ.get("DISTBERT_LOADGEN_NATIVE") in (None, "", "1")   # the suite runs the native path


_SUT_SCRIPT = r"""
import json, sys, tempfile
import numpy as np
import mlperf_loadgen as lg
from distbert.engine import lgnative

entry, why = lgnative.native_entry()
assert entry is not None, why
case = sys.argv[1]
seen = []

def good(ids, indices):
    seen.append((type(ids).__name__, len(ids)))
    r = np.zeros(len(ids), entry.complete.dtype)
    r["id"] = ids
    entry.complete(r)

def bad(ids, indices):
    raise ValueError("boom")

if case == "unreadable":   # reading LoadGen's sample array fails before the callback is called
    lgnative.SAMPLE = "not a dtype"
sut = lgnative.NativeSUT(entry, "test", bad if case == "raises" else good, lambda: None)
qsl = lg.ConstructQSL(500, 500, lambda s: None, lambda s: None)
s = lg.TestSettings()
s.scenario = lg.TestScenario.Offline
s.mode = lg.TestMode.PerformanceOnly
s.offline_expected_qps = 1.0
s.min_query_count = 2000
s.min_duration_ms = 0
log = lg.LogSettings()
log.log_output.outdir = tempfile.mkdtemp()
log.enable_trace = False
lg.StartTestWithLogSettings(sut.handle, qsl, s, log)
lg.DestroyQSL(qsl)
sut.destroy()
summary = open(log.log_output.outdir + "/mlperf_log_summary.txt").read()
print(json.dumps({"error": repr(sut.error), "valid": "Result is : VALID" in summary,
                  "no_errors": "No errors encountered" in summary, "seen": seen}))
"""


def _sut_case(case: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _SUT_SCRIPT, case], capture_output=True, text=True, timeout=100,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


@pytest.mark.timeout(120)
def test_native_sut_hands_a_big_query_over_as_arrays():
    proc = _sut_case("good")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # Offline: one query of all 2000 samples, as arrays; LoadGen saw every one completed
    assert out == {"error": "None", "valid": True, "no_errors": True, "seen": [["ndarray", 2000]]}


@pytest.mark.timeout(120)
def test_native_sut_errors_end_the_test_instead_of_hanging_loadgen():
    # the samples could not be read: the callback was not called, the query was completed empty
    # (LoadGen returned without an error of its own) and the cause is kept for the caller
    proc = _sut_case("unreadable")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["seen"] == [] and out["no_errors"] and out["error"].startswith("AttributeError(")
    # the callback raised after (maybe) taking them: neither complete twice nor wait: a one-line error, exit 70
    proc = _sut_case("raises")
    assert proc.returncode == 70
    assert proc.stderr.strip().splitlines()[-1] == (
        "distbert: error: LoadGen's issue callback failed after taking 2000 samples: ValueError: boom")
