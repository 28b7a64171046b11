"""Map a BERT ONNX graph's inputs and outputs onto distbert's (ids, mask, segments) -> (start, end).

Shared by the ONNX Runtime and OpenVINO backends, which read the same files: the MLPerf fp32 model
(``input_ids``, ``input_mask``, ``segment_ids`` -> ``output_start_logits``, ``output_end_logits``), the
MLPerf int8 model and Hugging Face exports (``input_ids``, ``attention_mask``, ``token_type_ids`` ->
``start_logits``, ``end_logits`` or one ``[B, L, 2]`` ``logits``). Pure: no runtime imported here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from distbert.backends.base import ModelInputs
from distbert.errors import UserError

# accepted names per role, in order of preference
IDS_NAMES = ("input_ids",)
MASK_NAMES = ("input_mask", "attention_mask")
SEGMENT_NAMES = ("segment_ids", "token_type_ids")
START_NAMES = ("output_start_logits", "start_logits")
END_NAMES = ("output_end_logits", "end_logits")

_INT_DTYPES = {"int32": np.int32, "int64": np.int64}


@dataclasses.dataclass(frozen=True)
class TensorDesc:
    """One graph input or output as the runtime reports it (dims: int, or None/str when dynamic)."""

    name: str
    dtype: str                                  # numpy-style name: "int64", "int32", "float32", ...
    shape: tuple[int | str | None, ...]

    def describe(self) -> str:
        dims = ",".join("?" if not isinstance(d, int) or d < 0 else str(d) for d in self.shape)
        return f"{self.name}:{self.dtype}[{dims}]"


@dataclasses.dataclass(frozen=True)
class IoMap:
    """Which graph tensor plays which role, and what the inputs must look like."""

    ids: str
    mask: str
    segments: str
    dtype: type                       # numpy dtype all three inputs are cast to
    fixed_len: int | None             # the graph's static sequence length, if any (pad to it)
    fixed_batch: int | None           # the graph's static batch size, if any (run in chunks of it)
    start: str | None                 # two outputs ...
    end: str | None
    logits: str | None                # ... or one [B, L, 2]

    @property
    def output_names(self) -> list[str]:
        # without a logits output, start and end are both set (resolve_io)
        return [self.logits] if self.logits else [self.start, self.end]  # type: ignore[list-item]


def resolve_model_file(model: str | None, backend: str) -> Path:
    """The ONNX file of ``spec.model`` (a file, or a directory holding ``model.onnx``)."""
    if not model:
        raise UserError(f"--backend {backend} needs --model PATH to an ONNX file "
                        "(`distbert model make --format onnx` writes a random-weight one)")
    path = Path(model).expanduser()
    if path.is_dir():
        candidates = sorted(path.glob("*.onnx"))
        if (path / "model.onnx").is_file():
            return path / "model.onnx"
        if len(candidates) == 1:
            return candidates[0]
        raise UserError(f"--model {path}: the directory holds {len(candidates)} .onnx files; "
                        "give the file itself")
    if not path.is_file():
        raise UserError(f"--model {path} does not exist: give an ONNX file")
    return path


def _static(dim: int | str | None) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def _pick(descs: Sequence[TensorDesc], names: Sequence[str]) -> TensorDesc | None:
    by_name = {d.name: d for d in descs}
    return next((by_name[n] for n in names if n in by_name), None)


def resolve_io(inputs: Sequence[TensorDesc], outputs: Sequence[TensorDesc], model: str) -> IoMap:
    """Match the graph's tensors to roles or raise a one-line :class:`UserError` listing them."""
    listing = (f"the graph has inputs {', '.join(d.describe() for d in inputs)} and outputs "
               f"{', '.join(d.describe() for d in outputs)}")
    ids, mask, seg = (_pick(inputs, names) for names in (IDS_NAMES, MASK_NAMES, SEGMENT_NAMES))
    if ids is None or mask is None or seg is None or len(inputs) != 3:
        raise UserError(f"model {model}: expected inputs input_ids + input_mask|attention_mask + "
                        f"segment_ids|token_type_ids; {listing}")
    dtypes = {d.dtype for d in (ids, mask, seg)}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _INT_DTYPES:
        raise UserError(f"model {model}: inputs must all be int32 or all int64; {listing}")
    for d in (ids, mask, seg):
        if len(d.shape) != 2:
            raise UserError(f"model {model}: input {d.name} must be 2-D [batch, seq]; {listing}")
    lens = {_static(d.shape[1]) for d in (ids, mask, seg)}
    batches = {_static(d.shape[0]) for d in (ids, mask, seg)}
    if len(lens) != 1 or len(batches) != 1:
        raise UserError(f"model {model}: inputs disagree on their shapes; {listing}")

    start, end = _pick(outputs, START_NAMES), _pick(outputs, END_NAMES)
    logits = None
    if start is None or end is None:
        if len(outputs) == 1 and outputs[0].shape and outputs[0].shape[-1] == 2:
            logits, start, end = outputs[0], None, None
        elif len(outputs) == 2:
            # The MLPerf int8 model's output names are not documented; its reference SUT takes
            # the two outputs in session order as (start, end). Do the same.
            start, end = outputs
        else:
            raise UserError(f"model {model}: expected outputs output_start_logits + output_end_logits, "
                            f"start_logits + end_logits or one [B, L, 2] logits; {listing}")
    for d in [t for t in (start, end, logits) if t is not None]:
        if not d.dtype.startswith("float") and d.dtype != "bfloat16":
            raise UserError(f"model {model}: output {d.name} must be floating point; {listing}")
    return IoMap(ids=ids.name, mask=mask.name, segments=seg.name, dtype=_INT_DTYPES[ids.dtype],
                 fixed_len=lens.pop(), fixed_batch=batches.pop(),
                 start=start.name if start else None, end=end.name if end else None,
                 logits=logits.name if logits else None)


def feeds(io: IoMap, inputs: ModelInputs) -> tuple[dict[str, np.ndarray], int]:
    """The input dict for one batch (cast, padded to a fixed length if the graph has one), and L."""
    batch, length = inputs.shape
    arrays: tuple[np.ndarray, ...] = (inputs.input_ids, inputs.input_mask, inputs.segment_ids)
    if io.fixed_len is not None and length != io.fixed_len:
        if length > io.fixed_len:
            raise UserError(f"the model takes sequences of at most {io.fixed_len} tokens, got {length}")
        padded: list[np.ndarray] = []
        for arr in arrays:
            out: np.ndarray = np.zeros((batch, io.fixed_len), io.dtype)    # pad id, mask and segment are all 0
            out[:, :length] = arr
            padded.append(out)
        arrays = tuple(padded)
    else:
        arrays = tuple(np.ascontiguousarray(a, dtype=io.dtype) for a in arrays)
    return dict(zip((io.ids, io.mask, io.segments), arrays)), length


def split_outputs(io: IoMap, outs: Sequence[np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray]:
    """``(start, end)`` float32 ``[B, length]`` from the runtime's outputs (in ``io.output_names`` order)."""
    if io.logits:
        start, end = outs[0][..., 0], outs[0][..., 1]
    else:
        start, end = outs[0], outs[1]
    # some exports keep a trailing singleton ([B, L, 1]); slice off any padding to a fixed length
    start = start.reshape(start.shape[0], -1)[:, :length]
    end = end.reshape(end.shape[0], -1)[:, :length]
    return (np.ascontiguousarray(start, dtype=np.float32), np.ascontiguousarray(end, dtype=np.float32))


def batch_chunks(batch: int, fixed_batch: int | None) -> list[tuple[int, int]]:
    """Row ranges to run separately when the graph has a static batch size (else one range)."""
    if not fixed_batch:
        return [(0, batch)]
    return [(i, min(i + fixed_batch, batch)) for i in range(0, batch, fixed_batch)]


def pad_rows(arr: np.ndarray, rows: int) -> np.ndarray:
    """``arr`` with zero rows appended up to ``rows`` (for a static batch dimension)."""
    if arr.shape[0] == rows:
        return arr
    out = np.zeros((rows,) + arr.shape[1:], arr.dtype)
    out[: arr.shape[0]] = arr
    return out


def run_graph(io: IoMap, inputs: ModelInputs,
              run_fn: Callable[[dict[str, np.ndarray]], Sequence[np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Run one batch through ``run_fn`` (feeds -> outputs in ``io.output_names`` order).

    Handles the graph's static dims: pads to a fixed sequence length and slices back; runs a
    static batch size in chunks, padding the last one with zero rows.
    """
    feed, length = feeds(io, inputs)
    batch = inputs.shape[0]
    if not io.fixed_batch or io.fixed_batch == batch:
        return split_outputs(io, run_fn(feed), length)
    starts, ends = [], []
    for lo, hi in batch_chunks(batch, io.fixed_batch):
        chunk = {k: pad_rows(v[lo:hi], io.fixed_batch) for k, v in feed.items()}
        s, e = split_outputs(io, run_fn(chunk), length)
        starts.append(s[: hi - lo])
        ends.append(e[: hi - lo])
    return np.concatenate(starts), np.concatenate(ends)
