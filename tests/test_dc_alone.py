"""dc alone: with a training step's flags (no logit-sum gradient, no dscale / dbias partials) the Triton recompute
kernels form the gradient w.r.t. the cosines in a shorter form (``_tiles.dc_tile``): g_lse folded into the row
factor, and the clamp's zeros taken from p = 0 in the select that removes the target column.  It must give the
full form's gradients (``_tiles.dlogit_tile``, taken when dscale is asked for) to fp32 rounding, for every treatment,
with and without the clamp, where the clamp actually cuts cosines, in each backward design and loop form.  Where a
program has one class tile, the fused weight gradient's target entries are stored over the finished tile
(TARGET_AFTER: no label compare an entry); the loop forms select them in the tile.
"""
import importlib.util

import pytest
import torch

from mvloss import dispatch
from mvloss.negatives import Treatment, inverse_norms

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PARAMS = {Treatment.NONE: 0.0, Treatment.FIXED: 0.1, Treatment.ADAPTIVE: 0.2, Treatment.CURRICULAR: 0.3,
          Treatment.FILTER: 0.0}


def _inputs(seed=0):
    """Contract inputs in which rows 0 and 1 lie along class rows 5 and 7 (not their labels), with x_inv raised 5%:
    their cosines with those classes are +-1.05, so the clamp cuts them, and with row 0's the largest logit (the
    largest p of its row) a dc left uncut there would move the gradients far beyond rounding."""
    g = torch.Generator().manual_seed(seed)
    b, c, d = 21, 150, 80  # d = 80: rows a TMA descriptor can cover
    x = torch.randn(b, d, generator=g)
    w = torch.randn(c, d, generator=g)
    x[0], x[1] = 2.0 * w[5], -0.5 * w[7]
    labels = torch.randint(0, c, (b,), generator=g)
    labels[0], labels[1], labels[4] = 3, 9, -1
    x, w, labels = x.to(DEVICE), w.to(DEVICE), labels.to(DEVICE)
    x_inv, w_inv = inverse_norms(x, 1e-12), inverse_norms(w, 1e-12)
    x_inv[:2] *= 1.05
    thr = (torch.rand(b, generator=g) * 0.6 - 0.3).to(DEVICE)
    scale = (torch.rand(b, generator=g) * 20 + 5).to(DEVICE)
    g_lse = (torch.rand(b, generator=g) + 0.1).to(DEVICE)
    g_cos = torch.randn(b, generator=g).to(DEVICE)
    return (x, w, x_inv, w_inv, labels, thr, scale, None), g_lse, g_cos


@pytest.mark.parametrize("design", ["gemm", "tma", "ws", "recompute"])
@pytest.mark.parametrize("clamp", [True, False])
@pytest.mark.parametrize("treatment", list(PARAMS), ids=lambda t: t.name)
def test_dc_alone_gives_the_full_forms_gradients(monkeypatch, treatment, clamp, design):
    from mvloss.triton import _config

    if design == "recompute":
        monkeypatch.setenv("MVLOSS_TRITON_BACKWARD", "recompute")
    elif design in ("tma", "ws"):
        monkeypatch.setenv("MVLOSS_TRITON_DLOGITS", design)
    after = []
    decide = _config.target_after
    monkeypatch.setattr(_config, "target_after", lambda *a: (after.append(decide(*a)), after[-1])[1])
    be = dispatch.get("triton")
    args, g_lse, g_cos = _inputs()
    rule = (int(treatment), PARAMS[treatment], clamp)
    lse = dispatch.lse_for_backward(be.forward(*args, *rule, need_zsum=False))
    assert torch.isfinite(lse).all()
    if clamp:  # the clamp really cuts: row 0's largest cosine is class 5's, beyond 1
        raw = (args[0][:2] * args[2][:2, None]) @ (args[1] * args[3][:, None]).T
        assert raw[0].argmax() == 5 and raw[0, 5] > 1.04 and raw[1, 7] < -1.04
    alone = be.backward(*args, lse, g_lse, None, *rule, False, False)
    full = be.backward(*args, lse, g_lse, None, *rule, True, False)
    for name, a, e in zip(("dxhat", "dwhat"), alone, full):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6 * e.abs().max().item(), msg=name)
    if design != "recompute":  # the fused weight gradient (what training runs): the target column rides along
        tail = (True, 1e-12)
        alone = be.backward_fused_w(*args, lse, g_lse, None, g_cos, *rule, False, False, *tail)
        full = be.backward_fused_w(*args, lse, g_lse, None, g_cos, *rule, True, False, *tail)
        for name, a, e in zip(("dxhat", "dW"), alone, full):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6 * e.abs().max().item(), msg=name)
        # the plain calls, then the fused ones: stored after the tile only with dc alone and one tile a program
        assert after == [False, False, design != "ws", False], after


def test_dc_alone_would_be_caught_if_the_clamp_were_not_applied(monkeypatch):
    """The inputs above make an uncut dc visible: without the clamp (the cut entries kept) the gradients differ."""
    be = dispatch.get("triton")
    args, g_lse, _ = _inputs()
    rule = (int(Treatment.ADAPTIVE), 0.2)
    lse = dispatch.lse_for_backward(be.forward(*args, *rule, True, need_zsum=False))
    cut = be.backward(*args, lse, g_lse, None, *rule, True, False, False)[0]
    kept = be.backward(*args, lse, g_lse, None, *rule, False, False, False)[0]
    assert (cut[0] - kept[0]).abs().max() > 1e-2 * kept[0].abs().max()
