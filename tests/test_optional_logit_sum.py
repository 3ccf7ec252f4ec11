"""The logit sum zsum (label smoothing's one input) is computed only when asked, and a missing g_sum is zero.

Without label smoothing the loss asks the backend for no zsum (``need_zsum=False``) and the autograd engine hands
the backward ``g_sum=None`` (``set_materialize_grads(False)``): the Triton kernels then skip the sum's per-entry
work, and nothing else changes: the same lse and the same gradients, bit for bit.
"""
import importlib.util

import pytest
import torch

from mvloss import dispatch
from mvloss import functional as F
from mvloss.negatives import Treatment, inverse_norms
from helpers import make_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _backends():
    names = ["chunked"]
    if HAS_TRITON:
        names.append("triton")
    if dispatch.get("cpu").reason() is None and DEVICE == "cpu":
        names.append("cpu")
    if dispatch.get("cuda").reason() is None and DEVICE == "cuda":
        names.append("cuda")
    return names


def _contract_inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, c, d = 13, 150, 24
    x = torch.randn(b, d, generator=g).to(DEVICE).to(dtype)
    w = torch.randn(c, d, generator=g).to(DEVICE).to(dtype)
    x_inv, w_inv = inverse_norms(x, 1e-12), inverse_norms(w, 1e-12)
    labels = torch.randint(0, c, (b,), generator=g).to(DEVICE)
    labels[2] = -1
    thr = (torch.rand(b, generator=g) * 0.6 - 0.3).to(DEVICE)
    scale = (torch.rand(b, generator=g) * 20 + 5).to(DEVICE)
    g_lse = torch.rand(b, generator=g).to(DEVICE)
    return (x, w, x_inv, w_inv, labels, thr, scale, None), g_lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", _backends())
def test_no_logit_sum_same_lse_and_same_gradients(backend, dtype):
    be = dispatch.get(backend)
    args, g_lse = _contract_inputs(dtype)
    rule = (int(Treatment.ADAPTIVE), 0.2, True)
    out = be.forward(*args, *rule)
    out_no = be.forward(*args, *rule, need_zsum=False)
    (lse, zsum), (lse_no, zsum_no) = out[:2], out_no[:2]
    assert torch.equal(lse_no, lse) and torch.equal(dispatch.lse_for_backward(out_no), dispatch.lse_for_backward(out))
    lse = dispatch.lse_for_backward(out)  # what the backward takes
    assert zsum.abs().sum() > 0
    if backend in ("triton", "chunked"):  # the others may compute it anyway
        assert torch.equal(zsum_no, torch.zeros_like(zsum_no))
    with_zero = be.backward(*args, lse, g_lse, torch.zeros_like(g_lse), *rule, True, False)
    with_none = be.backward(*args, lse, g_lse, None, *rule, True, False)
    for name, a, e in zip(("dxhat", "dwhat", "dscale"), with_none, with_zero):
        assert torch.equal(a, e), name
    if be.backward_fused_w is not None:
        g_cos = torch.rand_like(g_lse)
        tail = (True, False, True, 1e-12)
        with_zero = be.backward_fused_w(*args, lse, g_lse, torch.zeros_like(g_lse), g_cos, *rule, *tail)
        with_none = be.backward_fused_w(*args, lse, g_lse, None, g_cos, *rule, *tail)
        for name, a, e in zip(("dxhat", "dW", "dscale"), with_none, with_zero):
            assert torch.equal(a, e), name


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("backend", _backends())
def test_loss_asks_for_the_logit_sum_only_with_label_smoothing(monkeypatch, backend, smoothing):
    """The plumbing: what the backend is asked for and handed, and the loss and gradients against the reference."""
    be = dispatch.get(backend)
    seen = {}
    forward, backward = be.forward, be.backward_fused_w or be.backward

    def spy_forward(*args, need_zsum=True, **kwargs):
        seen["need_zsum"] = need_zsum
        return forward(*args, need_zsum=need_zsum, **kwargs)

    def spy_backward(*args, **kwargs):
        seen["g_sum"] = args[10]
        return backward(*args, **kwargs)

    monkeypatch.setattr(be, "forward", spy_forward)
    monkeypatch.setattr(be, "backward_fused_w" if be.backward_fused_w is not None else "backward", spy_backward)
    x, w, y = make_inputs(11, 97, 16, torch.float32, ignore=(4,), device=DEVICE)
    grads = {}
    for name in ("reference", backend):
        xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = F.mv_softmax_loss(xx, ww, y, scale=32, margin=0.5, mv="adaptive", t=0.2, label_smoothing=smoothing,
                                 backend=name)
        loss.backward()
        grads[name] = (loss.detach(), xx.grad, ww.grad)
    assert seen["need_zsum"] == (smoothing > 0)
    assert (seen["g_sum"] is None) == (smoothing == 0)
    for what, got, want in zip(("loss", "dx", "dW"), grads[backend], grads["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * (1 + want.abs().max().item()), msg=what)
