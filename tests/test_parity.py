"""Drop-in means equal numbers: our heads against re-statements of FaceX-Zoo's and insightface's heads."""
import pytest
import torch
import torch.nn.functional as TF

from mvloss import nn as mnn
from compat_heads import facexzoo_curricular_logits, facexzoo_mv_softmax_logits, insightface_loss

D, C, B = 24, 53, 19


def feats(scale_to=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    if scale_to is not None:
        x = scale_to * x / x.norm(dim=1, keepdim=True)
    return x


def labels(seed=0):
    return torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(seed + 1))


def grads_of(fn, x, params):
    x = x.clone().requires_grad_(True)
    loss = fn(x)
    loss.backward()
    return [loss.detach()] + [x.grad] + [p.grad for p in params]


def plant(x, w_cd, y, amount=1.5):
    """Pull half the rows toward their class so targets, masks and fallbacks all see traffic."""
    x = x.clone()
    x[: B // 2] += amount * TF.normalize(w_cd[y[: B // 2]]) * x[: B // 2].norm(dim=1, keepdim=True)
    return x


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("is_am", [True, False])
@pytest.mark.parametrize("feature_norm", [0.7, None])  # FaceX-Zoo uses raw features: norms above 1 clamp
def test_mv_softmax_head_equals_facexzoo(is_am, feature_norm, backend):
    torch.manual_seed(0)
    head = mnn.MVSoftmaxHead(D, C, is_am=is_am, margin=0.35, mv_weight=1.12, scale=32, backend=backend).double()
    theirs = {"weight": torch.empty(D, C, dtype=torch.float64).uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)}
    head.load_state_dict(theirs)  # FaceX-Zoo's state_dict (weight D x C) loads as it is
    y = labels()
    x = plant(feats(feature_norm), theirs["weight"].T, y)
    if feature_norm is None and not is_am:
        x = 0.95 * x / x.norm(dim=1, keepdim=True).clamp_min(1.0)  # FaceX-Zoo's Arc sqrt has a NaN gradient at |cos| = 1
    w_theirs = theirs["weight"].clone().requires_grad_(True)
    want = grads_of(lambda x: TF.cross_entropy(
        facexzoo_mv_softmax_logits(x, w_theirs, y, is_am, 0.35, 1.12, 32.0), y), x, [w_theirs])
    got = grads_of(lambda x: head(x, y), x, [head.weight])
    for name, a, b in zip(("loss", "dx", "dW"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_curricular_head_equals_facexzoo_over_steps(backend):
    torch.manual_seed(0)
    head = mnn.CurricularFaceHead(D, C, m=0.5, s=64.0, backend=backend).double()
    kernel = head.kernel.detach().clone()
    t_theirs = torch.zeros(1, dtype=torch.float64)
    assert set(head.state_dict()) == {"kernel", "t"}
    for step in range(3):
        y = labels(step)
        x = plant(feats(0.9, seed=step), kernel.T, y)
        k_theirs = kernel.clone().requires_grad_(True)
        want = grads_of(lambda x: TF.cross_entropy(facexzoo_curricular_logits(x, k_theirs, y, t_theirs), y),
                        x, [k_theirs])
        head.kernel.grad = None
        got = grads_of(lambda x: head(x, y), x, [head.kernel])
        for name, a, b in zip(("loss", "dx", "dW"), got, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"step {step} {name}")
        torch.testing.assert_close(head.t, t_theirs)
    assert head.t.abs().item() > 0


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("margins", [dict(m1=1.0, m2=0.5, m3=0.0), dict(m1=1.0, m2=0.0, m3=0.4),
                                     dict(m1=1.0, m2=0.5, m3=0.0, interclass_filtering_threshold=0.2),
                                     dict(m1=1.0, m2=0.3, m3=0.2)])
def test_combined_margin_head_equals_insightface(margins, backend):
    torch.manual_seed(0)
    head = mnn.CombinedMarginHead(D, C, s=64.0, backend=backend, **margins).double()
    theirs = {"weight": torch.normal(0, 0.01, (C, D), dtype=torch.float64)}
    head.load_state_dict(theirs)
    y = labels()
    y[4] = -1  # insightface's ignored label
    x = plant(feats(), theirs["weight"], y.clamp_min(0))
    w_theirs = theirs["weight"].clone().requires_grad_(True)
    want = grads_of(lambda x: insightface_loss(x, w_theirs, y, s=64.0, **margins), x, [w_theirs])
    got = grads_of(lambda x: head(x, y), x, [head.weight])
    for name, a, b in zip(("loss", "dx", "dW"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=name)


def test_heads_state_dict_layouts():
    assert mnn.MVSoftmaxHead(8, 5, is_am=True).weight.shape == (8, 5)
    assert mnn.CombinedMarginHead(8, 5).weight.shape == (5, 8)
    assert mnn.ArcFaceHead(8, 5).weight.shape == (5, 8)
    soft = mnn.SoftmaxHead(8, 5)
    assert set(soft.state_dict()) == {"weight", "bias"}


@pytest.mark.parametrize("head_cls,kw", [(mnn.ArcFaceHead, {}), (mnn.CosFaceHead, {}), (mnn.NormFaceHead, {}),
                                          (mnn.SphereFaceHead, {}), (mnn.SoftmaxHead, {}),
                                          (mnn.MVSoftmaxHead, {"is_am": False}), (mnn.CurricularFaceHead, {}),
                                          (mnn.CombinedMarginHead, {})])
def test_every_head_trains_and_its_logits_agree_with_its_loss(head_cls, kw):
    torch.manual_seed(0)
    head = head_cls(D, C, **kw).double()
    if isinstance(head, mnn.CurricularFaceHead):
        head.eval()  # keep tau fixed so loss and logits see the same state
    x = feats(0.9 if isinstance(head, (mnn.MVSoftmaxHead, mnn.CurricularFaceHead)) else None)
    y = labels()
    loss = head(x, y)
    z = head.logits(x, y)
    assert z.shape == (B, C)
    torch.testing.assert_close(loss, TF.cross_entropy(z, y), rtol=1e-9, atol=1e-9)
    loss.backward()
    assert head.stored_weight.grad is not None and head.stored_weight.grad.abs().sum() > 0
