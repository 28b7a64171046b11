"""Give a static-sequence-length ONNX graph a symbolic sequence dimension, and prove it still works.

The official MLPerf fp32 model (``model.onnx``, zenodo 3733910) declares its inputs and outputs
``[batch, 384]``. Run as it is, every trimmed batch must be padded back to 384 tokens, which throws
away distbert's main CPU gain. Most BERT exports compute their internal shapes from the input
(Shape -> Gather, Reshape with 0/-1), so the 384 lives only in the declared dims; such a graph runs
at any length once the declaration says so. Some graphs bake 384 into a constant (a Reshape target,
a position-embedding slice), and they fail or give other numbers at other lengths.

So distbert does not guess: :func:`dynamic_copy` rewrites the declared dims (and drops the inferred
intermediate shapes, which carry the 384 too) into a cached copy, and :func:`probe` runs that copy
on a short batch and on the same batch padded to the static length. Only when the real positions
agree does the backend keep the rewritten graph; otherwise it says why and pads.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from distbert import envs
from distbert.backends.base import ModelInputs

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SEQ_DIM = "seq"
# probe rows: real lengths (the batch is trimmed to the longest); tolerance on real positions,
# relative to the largest logit (fp32 summation order differs between lengths by ~1e-6)
PROBE_LENGTHS = (48, 29)
PROBE_RTOL = 1e-3


def cache_path(path: Path) -> Path:
    """Where the rewritten copy of ``path`` lives (keyed by its real path, size and mtime)."""
    stat = path.stat()
    key = hashlib.sha256(f"{FORMAT_VERSION}:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return envs.cache_dir() / "models" / "dynamic-seq" / key.hexdigest()[:20] / path.name


def dynamic_copy(path: Path, seq_axis_names: list[str]) -> Path:
    """A copy of ``path`` whose inputs and outputs in ``seq_axis_names`` have a symbolic dim 1.

    Cached (built once, then reused by every worker of the node); written to a temporary name and
    renamed, so a concurrent builder or an interrupted one never leaves a half-written model.
    """
    import onnx

    out = cache_path(path)
    if out.is_file():
        return out
    log.info("rewriting %s with a symbolic sequence length (once; cached in %s)", path.name, out.parent)
    model = onnx.load(str(path))
    wanted = set(seq_axis_names)
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if vi.name in wanted and len(dims) >= 2:
            dims[1].ClearField("dim_value")
            dims[1].dim_param = SEQ_DIM
    # shapes inferred at export time hold the static length too; runtimes re-infer them
    del model.graph.value_info[:]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        if sum(len(t.raw_data) for t in model.graph.initializer) >= 2**31 - 2**24:
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=out.name + ".data")
        else:
            onnx.save_model(model, str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def probe_inputs(length: int | None = None, dtype: type = np.int64) -> ModelInputs:
    """Two right-padded rows of plausible tokens, trimmed (``length`` None) or padded to ``length``."""
    rng = np.random.default_rng(0)
    width = length or max(PROBE_LENGTHS)
    ids: np.ndarray = np.zeros((len(PROBE_LENGTHS), width), dtype)
    seg = np.zeros_like(ids)
    mask = np.zeros_like(ids)
    for row, n in enumerate(PROBE_LENGTHS):
        ids[row, :n] = rng.integers(1000, 2000, n)
        ids[row, 0], ids[row, n - 1] = 101, 102
        seg[row, 12:n] = 1
        mask[row, :n] = 1
    return ModelInputs(np.arange(len(PROBE_LENGTHS), dtype=np.int64), ids, mask, seg,
                       np.array(PROBE_LENGTHS, np.int32))


def probe(run: Callable[[ModelInputs], tuple[np.ndarray, np.ndarray]], static_len: int) -> str | None:
    """``None`` when trimmed and padded-to-``static_len`` runs agree on real positions, else why not."""
    batch = probe_inputs()
    try:
        trimmed = run(batch)
        padded = run(probe_inputs(static_len))
    except Exception as exc:  # runtimes raise their own types; any failure means "keep padding"
        text = str(exc).strip().splitlines()
        return f"a {max(PROBE_LENGTHS)}-token batch fails ({text[0][:200] if text else type(exc).__name__})"
    real = batch.input_mask.astype(bool)
    width = real.shape[1]
    worst, scale = 0.0, 1.0
    for t, p in zip(trimmed, padded):
        if t.shape != real.shape:
            return f"a {width}-token batch returns shape {t.shape}, expected {real.shape}"
        worst = max(worst, float(np.abs(t - p[:, :width])[real].max()))
        scale = max(scale, float(np.abs(p[:, :width])[real].max()))
    if not np.isfinite(worst) or worst > PROBE_RTOL * scale:
        return f"trimmed and padded logits differ by {worst:.3g} (the graph depends on its length)"
    return None


def rewritten_mode(static_len: int) -> str:
    """The backend's ``seq_len_mode`` when the rewritten graph passed the probe."""
    return f"static length {static_len} rewritten as dynamic (probe exact)"


def padded_mode(path: Path, static_len: int, why: str) -> str:
    """Log why a static-length graph keeps padding; return the backend's ``seq_len_mode``."""
    log.warning("%s declares a static sequence length %d and is run padded to it, so trimming saves "
                "no compute: %s", path, static_len, why)
    return f"padded to its static length {static_len}: {why}"
