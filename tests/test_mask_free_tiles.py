"""The Triton kernels drop their row, feature and class masks where the shapes make them all true (EVEN_B, EVEN_K,
FULL): the same values, bit for bit, as with every mask kept (MVLOSS_TRITON_MASKED=1), on shapes that take each
specialisation and on ones that take the partial tail tile."""
import importlib.util

import pytest
import torch

from mvloss import functional as F
from helpers import make_inputs

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _step(x, w, y, smoothing):
    xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = F.mv_softmax_loss(xx, ww, y, scale=32, margin=0.5, mv="adaptive", t=0.2, label_smoothing=smoothing,
                             backend="triton")
    loss.backward()
    return loss.detach(), xx.grad, ww.grad


def _flags_seen(monkeypatch):
    """Record what the launchers ask for: (EVEN_B, EVEN_K) pairs and FULL decisions."""
    from mvloss.triton import _config

    seen = {"even": [], "full": []}
    even, whole = _config.even_flags, _config.whole_tiles

    def spy_even(*a, **k):
        out = even(*a, **k)
        seen["even"].append((out["EVEN_B"], out["EVEN_K"]))
        return out

    def spy_whole(*a, **k):
        out = whole(*a, **k)
        seen["full"].append(out)
        return out

    monkeypatch.setattr(_config, "even_flags", spy_even)
    monkeypatch.setattr(_config, "whole_tiles", spy_whole)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 256, 64), (64, 300, 64), (37, 320, 96), (64, 203, 77)],
                         ids=["every-mask-free", "partial-tail", "odd-batch", "odd-everything"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mask_free_kernels_give_the_masked_bits(monkeypatch, shape, dtype, smoothing):
    b, c, d = shape
    x, w, y = make_inputs(b, c, d, torch.float32, ignore=(5,), device=DEVICE)
    x, w = x.to(dtype), w.to(dtype)
    monkeypatch.setenv("MVLOSS_TRITON_WORKSPACE_ELEMS", str(b * 128))  # several backward chunks, the last partial
    monkeypatch.setenv("MVLOSS_TRITON_MASKED", "1")
    masked = _step(x, w, y, smoothing)
    monkeypatch.setenv("MVLOSS_TRITON_MASKED", "0")
    seen = _flags_seen(monkeypatch)
    free = _step(x, w, y, smoothing)
    for name, a, e in zip(("loss", "dx", "dW"), free, masked):
        assert torch.equal(a, e), name
    if DEVICE == "cpu":  # the interpreter's tiles: 32 rows, 64 classes, 32 features
        if shape[0] % 32 == 0 and shape[2] % 32 == 0:
            assert (True, True) in seen["even"], seen
        if shape == (64, 256, 64):
            assert all(seen["full"]), seen  # every class range whole tiles, forward and backward
        if shape == (64, 300, 64):
            assert True in seen["full"] and False in seen["full"], seen  # whole chunks, then the partial last one


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 256, 64), (64, 300, 64), (37, 320, 96)],
                         ids=["every-mask-free", "partial-tail", "odd-batch"])
def test_tma_forward_whole_tiles_give_the_masked_bits(monkeypatch, shape, dtype):
    """MVLOSS_TRITON_FORWARD=tma walks a split's whole class tiles without column masks and its partial last tile
    after them (as the pointer form does): the same bits as with every mask kept."""
    from mvloss.triton import tma

    b, c, d = shape
    x, w, y = make_inputs(b, c, d, torch.float32, ignore=(5,), device=DEVICE)
    x, w = x.to(dtype), w.to(dtype)
    monkeypatch.setenv("MVLOSS_TRITON_FORWARD", "tma")
    used = []
    allocator = tma.ensure_allocator
    monkeypatch.setattr(tma, "ensure_allocator", lambda: (used.append(1), allocator())[1])
    monkeypatch.setenv("MVLOSS_TRITON_MASKED", "1")
    masked = _step(x, w, y, 0.0)
    monkeypatch.setenv("MVLOSS_TRITON_MASKED", "0")
    free = _step(x, w, y, 0.0)
    assert used, "the tma forward did not run"
    for name, a, e in zip(("loss", "dx", "dW"), free, masked):
        assert torch.equal(a, e), name
    monkeypatch.setenv("MVLOSS_TRITON_FORWARD", "tiles")  # and the tma form's sums are the pointer form's
    for name, a, e in zip(("loss", "dx", "dW"), _step(x, w, y, 0.0), free):
        assert torch.equal(a, e), name
