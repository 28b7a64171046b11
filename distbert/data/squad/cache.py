"""The SQuAD feature store: its on-disk format and the content-addressed cache that holds it.

A store is one directory of ``.npy`` files plus ``meta.json`` and ``manifest.json``::

    <cache_dir>/features/<key>/
        input_ids.npy input_mask.npy segment_ids.npy   int32 [N, S]   (S = max_seq_length)
        lengths.npy                                    int32 [N]      real tokens per feature
        oracle_start.npy oracle_end.npy                int32 [N]      gold span in the feature, or -1
        example_index.npy doc_span_index.npy           int32 [N]      feature -> question, window number
        doc_offset.npy span_start.npy span_len.npy     int32 [N]      window: first doc position, start, length
        max_context.npy                                uint8 [sum span_len]  token_is_max_context, flat
        example_context.npy                            int32 [E]      question -> context
        tok_to_orig.npy tok_ptr.npy                    int32 [T], int64 [C+1]  word of each context token
        meta.json                                      strings: vocab, qas ids, questions, answers, context words
        manifest.json                                  written last: params, key, size + sha256 of every file

Feature *i* is QSL index *i* (reference ``unique_id`` 1000000000 + i). The reference's per-feature
``tokens``, ``token_to_orig_map`` and ``token_is_max_context`` are derived from these arrays (see
:meth:`FeatureStore.tokens` and friends); nothing is pickled.

Contract of the cache: a directory under ``features/`` is only ever created by an atomic rename of a
complete temporary directory, and is trusted only after every file's size and sha256 match the
manifest (hashing ~60 MB costs ~50 ms with SHA-NI). A store that fails the check is logged, moved
aside and rebuilt. Builders of the same key on one host serialize on an ``flock``; where locks are not
supported (some network file systems) concurrent builders race harmlessly and the loser of the
rename uses the winner's directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from distbert.errors import UserError
from distbert.util.fs import file_sha256, locked

log = logging.getLogger(__name__)

#: Bump whenever the featurization or the on-disk layout changes: old caches are then ignored.
FORMAT_VERSION = 1

HOT_ARRAYS = ("input_ids", "input_mask", "segment_ids", "lengths", "oracle_start", "oracle_end")
META_ARRAYS = ("example_index", "doc_span_index", "doc_offset", "span_start", "span_len",
               "max_context", "example_context", "tok_to_orig", "tok_ptr")
META_JSON = "meta.json"
MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class FeatureParams:
    """The three featurization parameters of the MLPerf reference (``squad_QSL.py``)."""

    max_seq_length: int = 384
    doc_stride: int = 128
    max_query_length: int = 64

    def __post_init__(self) -> None:
        if min(self.max_seq_length, self.doc_stride, self.max_query_length) < 1:
            raise ValueError(f"feature parameters must be positive: {self}")
        if self.max_query_length + 3 >= self.max_seq_length:
            # max_tokens_for_doc = max_seq_length - len(query) - 3 must stay >= 1
            raise ValueError(f"max_query_length + 3 must be < max_seq_length: {self}")

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class CacheError(UserError):
    """A store directory that is missing pieces, truncated or corrupted."""


def cache_key(dataset_sha256: str, vocab_sha256: str, params: FeatureParams) -> str:
    """Content address of a store: sha256 over both inputs' digests, the parameters and the format."""
    h = hashlib.sha256()
    h.update(b"distbert-squad-features\0")
    h.update(json.dumps({"format": FORMAT_VERSION, "dataset_sha256": dataset_sha256,
                         "vocab_sha256": vocab_sha256, "params": params.as_dict()},
                        sort_keys=True).encode())
    return h.hexdigest()[:32]


@dataclasses.dataclass
class SquadMeta:
    """Post-processing metadata (what ``accuracy-squad.py`` keeps in its pickled features).

    Per feature ``f``: the question ``example_index[f]``, the window ``doc_span_index[f]``, and the
    window's doc tokens ``span_start[f] .. span_start[f]+span_len[f]-1`` of the context, placed at
    positions ``doc_offset[f] ..`` of the sequence (``doc_offset = len(query) + 2``).
    ``max_context[mc_ptr[f] + k]`` is ``token_is_max_context`` of the window's k-th token.
    Per context ``c``: token ``t`` of ``c`` came from whitespace word ``tok_to_orig[tok_ptr[c] + t]``
    of ``doc_words[c]``.
    """

    vocab: list[str]
    qas_ids: list[str]
    questions: list[str]
    answers: list[list[str]]
    doc_words: list[list[str]]
    dataset_version: str
    example_index: np.ndarray
    doc_span_index: np.ndarray
    doc_offset: np.ndarray
    span_start: np.ndarray
    span_len: np.ndarray
    max_context: np.ndarray
    example_context: np.ndarray
    tok_to_orig: np.ndarray
    tok_ptr: np.ndarray

    @property
    def n_examples(self) -> int:
        return len(self.qas_ids)

    @cached_property
    def mc_ptr(self) -> np.ndarray:
        """int64 [N+1]: start of each feature's slice of ``max_context``."""
        ptr = np.zeros(len(self.span_len) + 1, dtype=np.int64)
        np.cumsum(self.span_len, out=ptr[1:])
        return ptr

    def json_part(self) -> dict[str, Any]:
        return {"vocab": self.vocab, "qas_ids": self.qas_ids, "questions": self.questions,
                "answers": self.answers, "doc_words": self.doc_words,
                "dataset_version": self.dataset_version}

    def array_part(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in META_ARRAYS}

    @classmethod
    def load(cls, path: Path) -> SquadMeta:
        with open(path / META_JSON, encoding="utf-8") as f:
            doc = json.load(f)
        arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in META_ARRAYS}
        return cls(**doc, **arrays)


class FeatureStore:
    """SQuAD features in QSL order, memory-mapped read-only from a store directory.

    ``input_ids``/``input_mask``/``segment_ids`` are int32 ``[N, S]``; ``lengths``,
    ``oracle_start``, ``oracle_end`` int32 ``[N]``. ``meta`` (post-processing data) loads on first
    use. A store returned by :func:`distbert.data.squad.features.build_features` lives in memory and has
    ``path = None``; everything else behaves the same.
    """

    def __init__(self, path: Path | None, params: FeatureParams, arrays: dict[str, np.ndarray],
                 meta: SquadMeta | None = None, manifest: dict[str, Any] | None = None) -> None:
        self.path = path
        self.params = params
        self.manifest = manifest or {}
        self.input_ids: np.ndarray = arrays["input_ids"]
        self.input_mask: np.ndarray = arrays["input_mask"]
        self.segment_ids: np.ndarray = arrays["segment_ids"]
        self.lengths: np.ndarray = arrays["lengths"]
        self.oracle_start: np.ndarray = arrays["oracle_start"]
        self.oracle_end: np.ndarray = arrays["oracle_end"]
        self._meta = meta

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def __repr__(self) -> str:
        return f"FeatureStore({self.path or 'in-memory'}, n={len(self)}, {self.params})"

    @property
    def meta(self) -> SquadMeta:
        if self._meta is None:
            assert self.path is not None
            self._meta = SquadMeta.load(self.path)
        return self._meta

    def gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Rows ``indices`` trimmed to their longest real length: three int32 ``[B, Lmax]`` + lengths ``[B]``."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            raise ValueError("gather needs at least one index")
        lengths = np.ascontiguousarray(self.lengths[idx])
        width = int(lengths.max())
        return (np.ascontiguousarray(self.input_ids[idx, :width]),
                np.ascontiguousarray(self.input_mask[idx, :width]),
                np.ascontiguousarray(self.segment_ids[idx, :width]),
                lengths)

    # The reference's per-feature structures, rebuilt on demand (tests, debugging, post-processing).

    def tokens(self, i: int) -> list[str]:
        """``InputFeatures.tokens``: the wordpiece strings of feature ``i`` (no padding)."""
        vocab = self.meta.vocab
        return [vocab[t] for t in self.input_ids[i, : int(self.lengths[i])].tolist()]

    def token_to_orig_map(self, i: int) -> dict[int, int]:
        """``InputFeatures.token_to_orig_map``: sequence position -> whitespace word of the context."""
        m = self.meta
        ctx = int(m.example_context[m.example_index[i]])
        base = int(m.tok_ptr[ctx]) + int(m.span_start[i])
        off, n = int(m.doc_offset[i]), int(m.span_len[i])
        words = m.tok_to_orig[base: base + n].tolist()
        return {off + k: w for k, w in enumerate(words)}

    def token_is_max_context(self, i: int) -> dict[int, bool]:
        """``InputFeatures.token_is_max_context``: sequence position -> is this window the best one."""
        m = self.meta
        flags = m.max_context[m.mc_ptr[i]: m.mc_ptr[i + 1]].tolist()
        off = int(m.doc_offset[i])
        return {off + k: bool(v) for k, v in enumerate(flags)}

    # On-disk form.

    def save(self, directory: Path, manifest_extra: dict[str, Any]) -> dict[str, Any]:
        """Write every file into the (empty, existing) ``directory``; the manifest goes last."""
        files: dict[str, dict[str, Any]] = {}
        arrays = {name: getattr(self, name) for name in HOT_ARRAYS} | self.meta.array_part()
        for name, arr in arrays.items():
            path = directory / f"{name}.npy"
            np.save(path, np.ascontiguousarray(arr), allow_pickle=False)
            files[path.name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
        path = directory / META_JSON
        path.write_text(json.dumps(self.meta.json_part(), ensure_ascii=False), encoding="utf-8")
        files[path.name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
        manifest = {"format": FORMAT_VERSION, "params": self.params.as_dict(),
                    "n_features": len(self), "n_examples": self.meta.n_examples,
                    "seq_length": int(self.input_ids.shape[1]), **manifest_extra,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        return manifest

    @classmethod
    def open(cls, path: str | Path, verify: bool = True, expect_key: str | None = None) -> FeatureStore:
        """Open an existing store directory read-only (workers call this with the path rank 0 sends).

        Checks the manifest, then every file's size and (``verify``, the default) sha256.
        Raises :class:`FileNotFoundError` if ``path`` has no manifest yet, :class:`CacheError` if
        anything does not match.
        """
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path} does not exist")
        fix = "delete the directory and run `distbert squad features` again"
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            files = {str(name): (int(info["size"]), str(info["sha256"]))
                     for name, info in manifest["files"].items()}
            params = FeatureParams(**manifest["params"])
            n, width = int(manifest["n_features"]), int(manifest["seq_length"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CacheError(f"feature cache {manifest_path} is unreadable ({exc}): {fix}") from None
        if manifest.get("format") != FORMAT_VERSION:
            raise CacheError(f"feature cache {path} has format {manifest.get('format')}, expected "
                             f"{FORMAT_VERSION}: {fix}")
        if expect_key is not None and manifest.get("key") != expect_key:
            raise CacheError(f"feature cache {path} holds key {manifest.get('key')}, expected {expect_key}: {fix}")
        expected = {f"{name}.npy" for name in HOT_ARRAYS + META_ARRAYS} | {META_JSON}
        if set(files) != expected:
            raise CacheError(f"feature cache {path} lists files {sorted(files)}: {fix}")
        for name, (want_size, want_sha) in files.items():
            file = path / name
            try:
                size = file.stat().st_size
            except OSError:
                raise CacheError(f"feature cache file {file} is missing: {fix}") from None
            if size != want_size:
                raise CacheError(f"feature cache file {file} has {size} bytes, manifest says "
                                 f"{want_size}: {fix}")
            if verify and file_sha256(file) != want_sha:
                raise CacheError(f"feature cache file {file} does not match its sha256: {fix}")
        arrays: dict[str, np.ndarray] = {}
        for name in HOT_ARRAYS:
            file = path / f"{name}.npy"
            try:
                arr = np.load(file, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as exc:
                raise CacheError(f"feature cache file {file} is not a valid .npy ({exc}): {fix}") from None
            shape = (n, width) if name in ("input_ids", "input_mask", "segment_ids") else (n,)
            if arr.dtype != np.int32 or arr.shape != shape:
                raise CacheError(f"feature cache file {file} is {arr.dtype}{list(arr.shape)}, expected "
                                 f"int32{list(shape)}: {fix}")
            arrays[name] = arr
        return cls(path, params, arrays, manifest=manifest)


#: Tests switch this off to exercise the lock-free race (two builders, one rename wins).
USE_LOCK = True


def load_or_build(root: Path, key: str, build: Callable[[], FeatureStore],
                  manifest_extra: dict[str, Any]) -> FeatureStore:
    """Return the verified store ``root/features/<key>``, building it with ``build()`` if needed."""
    parent = root / "features"
    final = parent / key
    try:
        return FeatureStore.open(final, expect_key=key)
    except FileNotFoundError:
        pass
    except CacheError as exc:
        log.warning("%s; rebuilding it", exc)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the feature cache {parent} ({exc.strerror}): "
                        f"set --cache-dir or DISTBERT_CACHE to a writable folder") from None
    lock = locked(parent / f".{key}.lock") if USE_LOCK else contextlib.nullcontext()
    with lock:
        stale = False
        try:  # another process may have built or repaired it while we waited for the lock
            return FeatureStore.open(final, expect_key=key)
        except FileNotFoundError:
            stale = final.exists()  # a directory without manifest: never ours to trust
        except CacheError:
            stale = True
        store = build()
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=parent))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the store is read by every rank
            store.save(tmp, {"key": key, **manifest_extra})
            if stale:
                trash = Path(tempfile.mkdtemp(prefix=f".trash-{key}-", dir=parent))
                with contextlib.suppress(FileNotFoundError):
                    os.rename(final, trash / "old")
                shutil.rmtree(trash, ignore_errors=True)
            try:
                os.rename(tmp, final)
                log.info("feature cache written: %s", final)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                log.info("feature cache %s was built concurrently by another process; using it", final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return FeatureStore.open(final, expect_key=key)
