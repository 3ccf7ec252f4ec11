"""The reference in fp64: gradcheck for every family member, and known values."""
import math

import pytest
import torch

from mvloss import functional as F
from mvloss import margins, reference
from mvloss.config import LossConfig
from families import FAMILIES, needs_unit_features
from helpers import make_inputs


def _exact_gradient(kw):
    # straight-through targets (insightface's ArcFace path) are not the derivative by design: the insightface
    # parity tests cover them instead
    return kw.get("target_grad") != "straight_through" and not (kw.get("preset") == "insightface"
                                                                 and not kw.get("m3"))


@pytest.mark.parametrize("family", sorted(f for f, kw in FAMILIES.items() if _exact_gradient(kw)))
def test_reference_gradcheck(family):
    kw = dict(FAMILIES[family])
    x, w, y = make_inputs(6, 9, 5, torch.float64, ignore=(1,), seed=3)
    if needs_unit_features(kw):
        x = 0.8 * x / x.norm(dim=1, keepdim=True)
    x.requires_grad_(True)
    w.requires_grad_(True)
    if kw.get("mv") == "curricular":
        kw["t"] = 0.3  # a float: the EMA update would make the function stateful under gradcheck

    def f(x, w):
        return F.margin_softmax_loss(x, w, y, backend="reference", reduction="none", **kw)

    assert torch.autograd.gradcheck(f, (x, w), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_reference_gradcheck_learnable_scale_and_bias():
    x, w, y = make_inputs(5, 7, 4, torch.float64, seed=1)
    scale = torch.tensor(8.0, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    x.requires_grad_(True)

    def f(x, scale, bias):
        return F.l2_softmax_loss(x, w, y, alpha=scale, bias=bias, backend="reference", m3=0.1)

    assert torch.autograd.gradcheck(f, (x, scale, bias))


def test_normface_is_scaled_cosine_cross_entropy():
    x, w, y = make_inputs(8, 11, 6, torch.float64)
    cos = torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(w).T
    want = torch.nn.functional.cross_entropy(20.0 * cos, y)
    got = F.normface_loss(x, w, y, scale=20.0, backend="reference")
    torch.testing.assert_close(got, want)


def test_arcface_target_logit_known_values():
    cfg = LossConfig(m2=0.5)
    c = torch.tensor([1.0, 0.5, 0.0, -0.9], dtype=torch.float64)
    f = margins.margin_target(c, cfg)
    theta = torch.acos(c)
    expected = torch.where(c > math.cos(math.pi - 0.5), torch.cos(theta + 0.5), c - math.sin(math.pi - 0.5) * 0.5)
    torch.testing.assert_close(f, expected)
    easy = margins.margin_target(c, LossConfig(m2=0.5, arc_fallback="easy"))
    torch.testing.assert_close(easy, torch.where(c > 0, torch.cos(theta + 0.5), c))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_arc_margin_at_the_poles(dtype):
    """cos(theta + m) at |cos| = 1 and beyond (unclamped cosines): the value is c cos m (the sine term is 0, to
    below an ulp) and the gradient finite, cos m, with the sine term's infinite slope cut to 0 (margins.safe_sqrt);
    inside, the analytic cos m + c sin m / sqrt(1 - c^2)."""
    m = 0.5
    c = torch.tensor([1.0, -1.0, 1.0 + 1e-6, -1.0 - 1e-6, 0.6], dtype=dtype, requires_grad=True)
    f = margins.cos_plus_margin(c, m)
    f.sum().backward()
    cd = c.detach().double()
    assert torch.equal(f[:4].detach(), (c[:4] * math.cos(m)).detach())
    assert torch.isfinite(c.grad).all()
    torch.testing.assert_close(c.grad[:4].double(), torch.full((4,), math.cos(m), dtype=torch.float64))
    inside = math.cos(m) + cd[4] * math.sin(m) / torch.sqrt(1 - cd[4] ** 2)
    torch.testing.assert_close(c.grad[4].double(), inside, rtol=1e-6, atol=0)


def test_sphereface_psi_is_monotone_and_matches_definition():
    c = torch.linspace(-1, 1, 2001, dtype=torch.float64)
    psi = margins.sphere_psi(c, 4)
    theta = torch.acos(c)
    k = torch.floor(4 * theta / math.pi)
    torch.testing.assert_close(psi, (-1.0) ** k * torch.cos(4 * theta) - 2 * k, atol=1e-9, rtol=0)
    assert (psi[1:] - psi[:-1] >= -1e-12).all()  # psi decreases in theta, so increases in cos


def test_sphereface_lambda_schedule():
    sched = margins.SphereFaceLambda()
    assert sched.value == 1000.0
    sched.step()
    assert sched.value == pytest.approx(1000.0 / 1.12)
    for _ in range(100000):
        sched.step()
    assert sched.value == 5.0


def test_mv_mask_uses_margin_adjusted_target():
    # one row, target cos 0.6; negatives at 0.3 and 0.5: with CosFace m = 0.2 the target is 0.4,
    # so only the 0.5 negative is mis-classified and gets h(c) = c + t.
    x = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    def unit(c):
        return [c, math.sqrt(1 - c * c), 0.0]
    w = torch.tensor([unit(0.6), unit(0.3), unit(0.5)], dtype=torch.float64)
    y = torch.tensor([0])
    z = reference.logits(x, w, y, LossConfig(scale=10.0, m3=0.2, mv="fixed", t=0.25))
    torch.testing.assert_close(z, torch.tensor([[10 * 0.4, 10 * 0.3, 10 * 0.75]], dtype=torch.float64))


def test_l2_softmax_alpha_lower_bound():
    assert reference.l2_softmax_alpha_lower_bound(10000, 0.9) == pytest.approx(math.log(0.9 * 9998 / 0.1))
    with pytest.raises(ValueError):
        reference.l2_softmax_alpha_lower_bound(2)


def test_label_smoothing_matches_torch():
    x, w, y = make_inputs(8, 11, 6, torch.float64, ignore=(0,))
    cos = torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(w).T
    want = torch.nn.functional.cross_entropy(30 * cos, y, label_smoothing=0.2)
    torch.testing.assert_close(F.normface_loss(x, w, y, label_smoothing=0.2, backend="reference"), want)


def test_focal_and_hard_mining_definitions():
    x, w, y = make_inputs(10, 7, 4, torch.float64)
    per = F.normface_loss(x, w, y, reduction="none", backend="reference")
    p = torch.exp(-per)
    torch.testing.assert_close(F.focal_softmax_loss(x, w, y, gamma=2.0, reduction="none", backend="reference"),
                               (1 - p) ** 2 * per)
    hm = F.hm_softmax_loss(x, w, y, ratio=0.3, backend="reference")
    torch.testing.assert_close(hm, per.sort(descending=True).values[:3].mean())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_half_zero_rows_are_finite(dtype):
    """A zero weight row and a zero embedding in half precision: the loss is finite and equals the fp64 truth to the
    dtype's rounding (eps = 1e-12 is 0 in fp16, so the normalisation's denominator must not round to it)."""
    x, w, y = make_inputs(7, 11, 6, torch.float32, seed=5)
    w[3] = 0.0
    x[2] = 0.0
    y[0] = 3
    kw = dict(m2=0.5, mv="adaptive", t=0.2, scale=32.0, reduction="none")
    truth = F.margin_softmax_loss(x.double(), w.double(), y, backend="reference", **kw)
    got = F.margin_softmax_loss(x.to(dtype), w.to(dtype), y, backend="reference", **kw)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), truth, rtol=3e-2, atol=3e-2)
