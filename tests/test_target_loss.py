"""The target side's kernels (``mvloss.triton.target_loss``: the mask thresholds, the loss and its backward, which
eager CUDA steps run instead of about sixty PyTorch ops) equal the PyTorch path they replace, which defines them.

Without a GPU the kernels run under the interpreter with ``mvloss.autograd.triton_glue`` forced on for CPU tensors.
"""
import importlib.util
import math

import pytest
import torch

from mvloss import autograd, margins
from mvloss import functional as F
from mvloss import loss as loss_mod
from mvloss.config import LossConfig
from families import FAMILIES, needs_unit_features
from helpers import make_inputs

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _kernels():
    from mvloss.triton import target_loss
    return target_loss


def _supported(kw) -> bool:
    x = torch.zeros(1, 1)
    return _kernels().supports(LossConfig(**{k: v for k, v in kw.items() if k != "chunk_size"}), x, None)


SUPPORTED = sorted(f for f in FAMILIES if _supported(FAMILIES[f]))


def test_supported_families_are_the_common_ones():
    assert {"normface", "cosface", "arcface", "arcface_easy", "arcface_none", "arcface_straight_through", "combined",
            "mv_am_fixed", "mv_arc_adaptive", "mv_arc_raw_mask", "sv_softmax", "insightface_filter",
            "facexzoo_mv_arc", "clamped"} <= set(SUPPORTED)
    for family in ("sphereface", "curricular", "focal", "hard_mining", "label_smoothing"):
        assert family not in SUPPORTED, family
    assert not _kernels().supports(LossConfig(m2=0.5), torch.zeros(1, 1), torch.zeros(3))           # bias
    assert not _kernels().supports(LossConfig(scale=torch.tensor(3.0)), torch.zeros(1, 1), None)   # tensor scale
    assert not _kernels().supports(LossConfig(m2=0.5), torch.zeros(1, 1, dtype=torch.float64), None)


def _step(x, w, y, glue: bool, monkeypatch, backend="chunked", **kw):
    calls = []
    with monkeypatch.context() as mp:
        mp.setattr(autograd, "triton_glue", (lambda t: t.dtype != torch.float64) if glue else (lambda t: False))
        real = loss_mod.target_kernels
        mp.setattr(loss_mod, "target_kernels", lambda *a: calls.append(real(*a)) or calls[-1])
        xd, wd = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = F.margin_softmax_loss(xd, wd, y, backend=backend, **kw)
        out.sum().backward()
    return [out.detach(), xd.grad, wd.grad], calls


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("family", SUPPORTED)
def test_kernels_give_the_pytorch_paths_loss_and_gradients(family, reduction, monkeypatch):
    kw = dict(FAMILIES[family], reduction=reduction)
    x, w, y = make_inputs(37, 203, 24, torch.float32, ignore=(3, 11), device=DEVICE)
    if needs_unit_features(kw):
        x = 0.9 * x / x.norm(dim=1, keepdim=True)
    want, calls = _step(x, w, y, False, monkeypatch, **kw)
    assert calls == [None]
    got, calls = _step(x, w, y, True, monkeypatch, **kw)
    assert calls[0] is _kernels()  # the kernels did run
    for name, a, b in zip(("loss", "dx", "dW"), got, want):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6 * b.abs().max().item(), msg=name)


def test_kernels_with_the_triton_backend_bf16(monkeypatch):
    kw = dict(FAMILIES["mv_arc_adaptive"])
    x, w, y = make_inputs(37, 203, 24, torch.float32, ignore=(3,), device=DEVICE)
    x, w = x.bfloat16(), w.bfloat16()
    want, _ = _step(x, w, y, False, monkeypatch, backend="triton", **kw)
    got, calls = _step(x, w, y, True, monkeypatch, backend="triton", **kw)
    assert calls[0] is _kernels()
    for name, a, b in zip(("loss", "dx", "dW"), got, want):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=1e-2 * b.float().abs().max().item(),
                                   msg=name)


def _pytorch_target_loss(cos_y, lse_neg, labels, cfg):
    """The PyTorch path of mvloss.loss after the negatives pass (bias-free, number scale)."""
    valid = labels != cfg.ignore_index
    z_y, _ = loss_mod.target_logits(margins.clamp_cos(cos_y, cfg), cfg, cos_y)
    return loss_mod.finish(loss_mod.negatives_nll(lse_neg, z_y), None, None, valid, 10, cfg)


EDGE_COS = [-1.5, -1.0, -1.0 + 2 ** -23, -0.9, math.cos(math.pi - 0.5), math.cos(math.pi - 0.5) + 1e-6, -0.3, 0.0,
            1e-30, 0.2, 0.35, 0.35 + 1e-7, 0.7, 1.0 - 2 ** -24, 1.0, 1.2]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("family", SUPPORTED)
def test_loss_function_at_the_edges(family, reduction):
    """Cosines at every branch point of the margins (|cos| = 1, beyond it, the insightface threshold, m3), very
    large and very small lse_neg - z_y (softplus's threshold, log1p of a tiny e^t) and -inf (no negatives)."""
    cfg = LossConfig(**dict(FAMILIES[family], reduction=reduction))
    n = len(EDGE_COS)
    cos = torch.tensor(EDGE_COS * 3, dtype=torch.float32, device=DEVICE)
    lse = torch.tensor([-math.inf] + [-80.0, -30.0, -5.0, 0.0, 3.0, 39.0, 41.0, 90.0] * 6, device=DEVICE)[:3 * n]
    labels = (torch.arange(6 * n, device=DEVICE) % 10)[::2]  # strided: the kernels must not assume contiguous
    labels[5::7] = cfg.ignore_index
    g = torch.randn(3 * n, device=DEVICE) if reduction == "none" else torch.tensor(1.7, device=DEVICE)
    out = {}
    for name, fn in (("want", lambda c, s: _pytorch_target_loss(c, s, labels, cfg)),
                     ("got", lambda c, s: _kernels().TargetLossFunction.apply(c, s, labels, cfg))):
        c, s = cos.clone().requires_grad_(True), lse.clone().requires_grad_(True)
        v = fn(c, s)
        v.backward(g)
        out[name] = (v.detach(), c.grad, s.grad)
    for what, a, b in zip(("loss", "d cos", "d lse"), out["got"], out["want"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * max(b.abs().max().item(), 1.0), msg=what)


def test_thresholds_at_the_edges():
    for family in SUPPORTED:
        cfg = LossConfig(**FAMILIES[family])
        if cfg.mv == "none" or cfg.interclass_filtering_threshold > 0:
            continue
        cos = torch.tensor(EDGE_COS, dtype=torch.float32, device=DEVICE)
        want = loss_mod.mask_thresholds(margins.clamp_cos(cos, cfg), torch.ones_like(cos, dtype=torch.bool), cfg)
        torch.testing.assert_close(_kernels().thresholds(cos, cfg), want, rtol=1e-6, atol=1e-7, msg=family)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_rows_and_every_row_ignored(reduction, monkeypatch):
    kw = dict(FAMILIES["mv_arc_adaptive"], reduction=reduction)
    for b, ignore in ((0, ()), (6, tuple(range(6)))):
        x, w, y = make_inputs(b, 50, 8, torch.float32, ignore=ignore, device=DEVICE)
        want, _ = _step(x, w, y, False, monkeypatch, **kw)
        got, calls = _step(x, w, y, True, monkeypatch, **kw)
        assert calls[0] is _kernels()
        for name, a, c in zip(("loss", "dx", "dW"), got, want):
            assert torch.equal(a, c), (b, name)


def test_environment_variable_turns_the_kernels_off(monkeypatch):
    x, w, y = make_inputs(9, 40, 8, torch.float32, device=DEVICE)
    monkeypatch.setenv("MVLOSS_TARGET_KERNELS", "0")
    _, calls = _step(x, w, y, True, monkeypatch, m2=0.5)
    assert calls == [None]
    monkeypatch.setenv("MVLOSS_TARGET_KERNELS", "1")
    _, calls = _step(x, w, y, True, monkeypatch, m2=0.5)
    assert calls[0] is _kernels()

