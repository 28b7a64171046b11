"""The torch backend's attention (issue 19, item 3): ``--option sdpa`` picks the SDPA kernel around
every forward, ``--option attn_mask`` the mask form; both are validated and recorded.

On this CPU-only machine torch runs two SDPA kernels, flash and math (efficient and cuDNN are
CUDA-only: refused on CPU in one line). The equality tests run a real tiny random BERT through each
CPU kernel and through transformers' own mask, on padded and unpadded batches. Which mask reaches
SDPA is read by wrapping ``torch.nn.functional.scaled_dot_product_attention`` (transformers calls
it through the module attribute), recording the mask's shape and the kernel flags in force, then
calling the real function.
"""

from __future__ import annotations

import importlib.util
import threading
from typing import Any

import numpy as np
import pytest

from distbert.backends import create, modelmaker
from distbert.backends.base import BackendSpec, dummy_batch
from distbert.backends.shapes import ShapeLadder
from distbert.errors import UserError
from tests.batches import batch

pytestmark = pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("torch", "transformers")),
                                reason="torch and transformers are not installed")


@pytest.fixture(scope="module")
def tiny_torch(tmp_path_factory):
    return modelmaker.make_model("tiny", "torch", 0, tmp_path_factory.mktemp("tiny") / "torch")


def _backend(model: Any, precision: str = "fp32", **options: str) -> Any:
    backend = create(BackendSpec(name="torch", model=str(model), precision=precision, options=tuple(options.items())))
    backend.load()
    return backend


PADDED = batch((40, 25, 33, 12, 7), seed=5)            # rows of different lengths: a mask is needed
UNPADDED = batch((36, 36, 36), seed=6)                  # every row full: no mask at all


def _real(out: tuple[np.ndarray, np.ndarray], inputs: Any) -> list[np.ndarray]:
    """Each row's logits at its real positions only (pad positions are sliced away by the worker)."""
    return [a[i, :n] for a in out for i, n in enumerate(inputs.lengths)]


def _close(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], inputs: Any) -> None:
    for x, y in zip(_real(a, inputs), _real(b, inputs), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------- the option

@pytest.mark.parametrize("value", ["fast", "FLASH", "", "mem_efficient"])
def test_a_bad_sdpa_value_is_a_one_line_user_error_naming_the_valid_ones(tiny_torch, value):
    with pytest.raises(UserError) as err:
        _backend(tiny_torch, sdpa=value)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"--option sdpa={value}: write one of auto, flash, efficient, cudnn, math")


@pytest.mark.parametrize("value", ["efficient", "cudnn"])
def test_cuda_only_kernels_are_refused_on_the_cpu_in_one_line(tiny_torch, value):
    with pytest.raises(UserError, match=rf"^--option sdpa={value}: torch has no {value} attention kernel on the CPU: "
                                        "there use flash, math or auto$"):
        _backend(tiny_torch, sdpa=value)


def test_a_bad_attn_mask_value_is_a_user_error(tiny_torch):
    with pytest.raises(UserError, match=r"^--option attn_mask=dense: write keys .* or transformers"):
        _backend(tiny_torch, attn_mask="dense")


@pytest.mark.parametrize("options,sdpa,mask", [({}, "auto", "keys"), ({"sdpa": "math"}, "math", "keys"),
                                               ({"sdpa": "flash", "attn_mask": "transformers"}, "flash", "transformers")])
def test_the_kernel_and_mask_form_are_recorded_in_the_backend_info(tiny_torch, options, sdpa, mask):
    info = _backend(tiny_torch, **options).info()
    assert (info["sdpa"], info["attn_mask"], info["attention"]) == (sdpa, mask, "sdpa")


# ------------------------------------------------------------------------------- what reaches SDPA

@pytest.fixture
def sdpa_calls(monkeypatch):
    """Every SDPA call of the model: (mask shape or None, mask dtype, flash enabled, math enabled)."""
    import torch

    real = torch.nn.functional.scaled_dot_product_attention
    calls: list[tuple[Any, Any, bool, bool]] = []

    def recording(q, k, v, attn_mask=None, *args, **kw):
        calls.append((None if attn_mask is None else tuple(attn_mask.shape),
                      None if attn_mask is None else attn_mask.dtype,
                      torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()))
        return real(q, k, v, attn_mask, *args, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    return calls


def test_keys_form_passes_no_mask_unpadded_and_a_key_padding_mask_padded(tiny_torch, sdpa_calls):
    """The form that keeps a fused kernel: nothing for a batch without padding; one [B, 1, 1, L]
    additive mask in the model's dtype otherwise, never a [B, 1, L, L] one (transformers' own form)."""
    import torch

    layers = 2   # the tiny model
    keys, own = _backend(tiny_torch), _backend(tiny_torch, attn_mask="transformers")
    keys.run(UNPADDED)
    assert [c[:2] for c in sdpa_calls] == [(None, None)] * layers
    sdpa_calls.clear()
    keys.run(PADDED)
    b, n = PADDED.shape
    assert [c[:2] for c in sdpa_calls] == [((b, 1, 1, n), torch.float32)] * layers
    sdpa_calls.clear()
    own.run(PADDED)
    assert [c[0] for c in sdpa_calls] == [(b, 1, n, n)] * layers      # what the keys form avoids
    sdpa_calls.clear()
    _backend(tiny_torch, precision="bf16").run(PADDED)
    assert {c[1] for c in sdpa_calls} == {torch.bfloat16}             # the model's dtype: SDPA takes no other


def test_the_kernel_is_applied_around_the_forward_and_restored_after(tiny_torch, sdpa_calls):
    import torch

    before = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())
    _backend(tiny_torch, sdpa="math").run(PADDED)
    assert {c[2:] for c in sdpa_calls} == {(False, True)}              # flash off, math on, inside
    sdpa_calls.clear()
    _backend(tiny_torch, sdpa="flash").run(PADDED)
    assert {c[2:] for c in sdpa_calls} == {(True, False)}
    sdpa_calls.clear()
    _backend(tiny_torch).run(PADDED)                                   # auto: the flags as they were
    assert {c[2:] for c in sdpa_calls} == {before}
    assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()) == before


# ------------------------------------------------------------------------------- same answers

@pytest.mark.parametrize("inputs", [PADDED, UNPADDED, batch((384, 200), seed=8), batch((1,), seed=9)],
                         ids=["padded", "unpadded", "long", "one-token"])
def test_every_cpu_kernel_and_both_mask_forms_give_the_same_logits(tiny_torch, inputs):
    """math and flash (the kernels torch has on CPU) and auto, key-padding mask or transformers' own
    (the path before issue 19): the same logits at every real position."""
    import torch

    want = _backend(tiny_torch, attn_mask="transformers").run(inputs)
    model = _backend(tiny_torch)._model
    ids, mask, seg = (torch.from_numpy(np.asarray(a, np.int64)) for a in (inputs.input_ids, inputs.input_mask,
                                                                         inputs.segment_ids))
    with torch.inference_mode():                                       # the model called as before, directly
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=seg)
    _close((out.start_logits.numpy(), out.end_logits.numpy()), want, inputs)
    for options in ({}, {"sdpa": "math"}, {"sdpa": "flash"}, {"sdpa": "flash", "attn_mask": "transformers"}):
        _close(_backend(tiny_torch, **options).run(inputs), want, inputs)


def test_a_dummy_padding_row_changes_no_real_row(tiny_torch):
    """The shape ladder pads a batch with dummy rows (one [CLS] token, mask 1): the real rows' logits
    are those of the batch run alone, in the keys form."""
    backend = _backend(tiny_torch)
    ladder = ShapeLadder(step=32, rows=(1, 2, 4, 8))
    padded = ladder.pad(PADDED)
    assert padded.shape == (8, 64)
    got = backend.run(padded)
    _close((got[0][: len(PADDED.lengths)], got[1][: len(PADDED.lengths)]), backend.run(PADDED), PADDED)


# ------------------------------------------------------------------------------- concurrency of the flags

def test_flags_stay_set_until_the_last_thread_leaves_and_two_kernels_at_once_are_refused():
    """torch's kernel flags are process-wide: a thread leaving its forward must not reset them under
    another thread still in one with the same kernel; a different kernel at the same time fails loudly."""
    import torch

    from distbert.backends.torch import sdpa_scope

    inside, leave = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def other() -> None:
        try:
            with sdpa_scope("math"):
                inside.set()
                leave.wait(10)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=other)
    thread.start()
    assert inside.wait(10)
    with sdpa_scope("math"):
        assert not torch.backends.cuda.flash_sdp_enabled()
    assert not torch.backends.cuda.flash_sdp_enabled()         # the other thread is still in its forward
    with pytest.raises(RuntimeError, match="sdpa=flash and sdpa=math in one process at the same time"), \
            sdpa_scope("flash"):
        pass
    leave.set()
    thread.join(10)
    assert not errors and torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()


# ------------------------------------------------------------------------------- measurement hooks

def test_time_shapes_times_each_shape_and_set_sdpa_switches_the_kernel(tiny_torch, sdpa_calls):
    backend = _backend(tiny_torch)
    rows = backend.time_shapes([(2, 32), (1, 64)])
    assert [(r["rows"], r["length"], r["padded"], r["sdpa"]) for r in rows] == [(2, 32, True, "auto"),
                                                                                (1, 64, True, "auto")]
    assert all(r["ms"] > 0 for r in rows)
    backend.set_sdpa("math")
    sdpa_calls.clear()
    assert backend.time_shapes([(1, 32)], padded=False)[0]["sdpa"] == "math"
    assert {c[2:] for c in sdpa_calls} == {(False, True)} and backend.info()["sdpa"] == "math"
    with pytest.raises(UserError, match="sdpa=cudnn"):
        backend.set_sdpa("cudnn")


def test_cpu_warms_one_batch_and_a_gpu_warms_every_ladder_shape_on_both_attention_paths(tiny_torch):
    """The warm-up plan. The GPU half reads the plan of a CPU-loaded backend told its device is
    cuda: nothing runs, so no GPU is needed; the worker tests run the plan through real threads."""
    import torch

    backend = _backend(tiny_torch)
    ladder = ShapeLadder(step=128, rows=(1, 2, 4), token_budget=1024)
    backend.set_shape_ladder(ladder)
    assert backend.warmup_batches() == [] and backend.info()["warmup_batches"] == 0
    backend._device = torch.device("cuda", 1)
    plan = backend._warm_plan()
    assert {(r, n) for r, n, _ in plan} == set(ladder.shapes()) == {(1, 128), (2, 128), (4, 128), (1, 256),
                                                                  (2, 256), (4, 256), (1, 384), (2, 384)}
    assert sorted(plan) == sorted((r, n, p) for r, n in ladder.shapes() for p in (True, False))
    tokens = [r * n for r, n, _ in plan]
    assert tokens == sorted(tokens, reverse=True)                       # largest first
    for inputs, (rows, length, padded) in zip(backend.warmup_batches(), plan, strict=True):
        assert inputs.shape == (rows, length) and bool(np.all(inputs.input_mask)) is not padded
    assert dummy_batch(3, 1).input_mask.all()                           # one token: nothing to pad
