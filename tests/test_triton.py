"""The Triton backend equals the reference (loss, dx, dW, dscale, dbias) per dtype, on odd shapes, for every family.

Without a GPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1) on small shapes; the
tests marked ``gpu`` (bf16, the 1M-class shape, opcheck, torch.compile, memory, determinism) run on a CUDA device.
"""
import importlib.util
import os

import pytest
import torch

import mvloss
from mvloss import dispatch
from mvloss import functional as F
from mvloss.negatives import Treatment, inverse_norms
from families import FAMILIES, needs_unit_features
from helpers import (REL_FLOOR, allowed_error, assert_matches_reference, bench_script, bwd_args,
                     env_without_interpreter, make_inputs, op_args, run)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, C, D = 37, 203, 77          # odd: no dimension is a multiple of a tile
C_BIG = 1003                   # several class tiles and class splits


def inputs(kw, dtype=torch.float32, b=B, c=C, d=D, ignore=(3, 11), **extra):
    x, w, y = make_inputs(b, c, d, torch.float32, ignore=tuple(i for i in ignore if i < b), device=DEVICE, **extra)
    if needs_unit_features(kw):
        x = 0.9 * x / x.norm(dim=1, keepdim=True)
    return x.to(dtype), w.to(dtype), y


# ----------------------------------------------------------------------------------------------- loss vs reference

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_triton_fp32_every_family(family):
    kw = FAMILIES[family]
    x, w, y = inputs(kw)
    assert_matches_reference(x, w, y, "triton", **kw)


@pytest.mark.parametrize("family", ["arcface", "mv_am_fixed", "mv_arc_adaptive", "curricular", "insightface_filter",
                                    "facexzoo_mv_am", "label_smoothing", "unnormalized_x"])
def test_triton_fp16(family):
    kw = FAMILIES[family]
    x, w, y = inputs(kw, torch.float16)
    assert_matches_reference(x, w, y, "triton", **kw)


@pytest.mark.parametrize("family", ["arcface", "mv_arc_adaptive", "curricular", "label_smoothing"])
def test_triton_bf16_interpreted(family, monkeypatch):
    """bf16 under the interpreter (operands upcast for tl.dot, workspaces still rounded to bf16): the training step's
    backward, with the target column's gradient carried by the two GEMMs of each class chunk (four chunks here)."""
    monkeypatch.setenv("MVLOSS_TRITON_WORKSPACE_ELEMS", str(B * 64))
    kw = FAMILIES[family]
    x, w, y = inputs(kw, torch.bfloat16)
    assert_matches_reference(x, w, y, "triton", **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_many_classes_and_splits(dtype):
    """C = 1003: many class tiles, and (B = 37 under the interpreter) several class splits merged per row."""
    kw = FAMILIES["mv_arc_adaptive"]
    x, w, y = inputs(kw, dtype, c=C_BIG)
    assert_matches_reference(x, w, y, "triton", label_smoothing=0.1, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("family", ["mv_arc_adaptive", "facexzoo_curricular", "insightface_filter", "label_smoothing"])
def test_triton_one_d_slice(family, dtype):
    """D <= 64: each backward program accumulates the whole feature dimension (one D slice, under the interpreter);
    D = 77 elsewhere takes two slices."""
    kw = FAMILIES[family]
    x, w, y = inputs(kw, dtype, d=48)
    assert_matches_reference(x, w, y, "triton", **kw)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("family", ["mv_am_fixed", "hard_mining"])
def test_triton_reductions(family, reduction):
    x, w, y = inputs(FAMILIES[family])
    assert_matches_reference(x, w, y, "triton", reduction=reduction, **FAMILIES[family])


@pytest.mark.parametrize("normalize_x", [True, False])
def test_triton_normalize_x_both_ways(normalize_x):
    kw = dict(m2=0.5, mv="fixed", t=0.2, normalize_x=normalize_x, scale=32.0 if normalize_x else 4.0)
    x, w, y = inputs({})
    assert_matches_reference(x, w, y, "triton", **kw)


def test_triton_facexzoo_preset_clamps():
    """normalize_x False with features of norm > 1: many cosines clamp to [-1, 1] and get no gradient."""
    x, w, y = inputs({})
    x = 0.5 * x
    assert_matches_reference(x, w, y, "triton", m3=0.35, mv="adaptive", t=0.12, scale=32.0, preset="facexzoo")


@pytest.mark.parametrize("shape", [(1, C_BIG, D), (1, 5, 3), (B, 20, D), (5, 203, 200), (17, 1, 8)],
                         ids=["B1", "tiny", "C_below_tile", "D_above_tile", "one_class"])
def test_triton_edge_shapes(shape):
    b, c, d = shape
    x, w, y = inputs({}, b=b, c=c, d=d, ignore=(2,))
    assert_matches_reference(x, w, y, "triton", m2=0.5, mv="adaptive", t=0.2, label_smoothing=0.1)


def test_triton_every_row_ignored():
    x, w, y = inputs({}, b=6, c=40, d=9)
    y = torch.full_like(y, -100)
    got = run(x, w, y, "triton", m2=0.5)
    assert got[0].item() == 0.0 and not got[1].any() and not got[2].any()


def test_triton_non_contiguous_inputs():
    """W stored D x C (FaceX-Zoo's layout) and passed as a transposed view; x a column slice."""
    x, w, y = inputs({})
    w_t = w.T.contiguous().T
    x_wide = torch.cat([x, torch.ones_like(x[:, :5])], dim=1)[:, :D]
    assert not w_t.is_contiguous() and not x_wide.is_contiguous()
    assert_matches_reference(x_wide, w_t, y, "triton", m3=0.35, mv="fixed", t=0.2)


def test_triton_forced_splits(monkeypatch):
    monkeypatch.setenv("MVLOSS_TRITON_SPLITS", "3")
    x, w, y = inputs({}, c=C_BIG)
    assert_matches_reference(x, w, y, "triton", m2=0.5, mv="curricular", t=0.3, label_smoothing=0.1)


@pytest.mark.parametrize("mode", ["flat", "tma", "ws"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_forward_loop_forms_are_the_same_sum(monkeypatch, dtype, mode):
    """MVLOSS_TRITON_FORWARD = flat (one loop over class tiles x K slices), tma (TMA-descriptor loads) and ws (tma,
    warp-specialised) add the same products in the same order as the default: identical lse and zsum under the
    interpreter (on a GPU the tma/ws tiles and warp layout may order a row's sum differently: equal to fp32
    rounding), several class tiles per split, a feature dimension of three K slices, two row tiles and a part one;
    then a whole loss."""
    import mvloss.triton.ops  # noqa: F401

    from mvloss.triton import tma

    # 80 features: rows a descriptor can cover; 130 rows: the warp-specialised form splits 128-row tiles (B > 64)
    x, w, y = inputs(FAMILIES["mv_arc_adaptive"], dtype, b=130, c=C_BIG, d=80)
    assert tma.usable(x, w)
    bias = torch.linspace(-0.3, 0.3, C_BIG, device=DEVICE)
    args = op_args(x, w, y, bias)
    got = {}
    for form in ("tiles", mode):
        monkeypatch.setenv("MVLOSS_TRITON_FORWARD", form)
        got[form] = torch.ops.mvloss.triton_neg_forward(*args)
    for a, b in zip(got["tiles"], got[mode]):
        assert torch.isfinite(a).all()
        if mode == "flat" or DEVICE == "cpu":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * a.abs().max().item())
    kw = FAMILIES["facexzoo_curricular"]
    x, w, y = inputs(kw, dtype, d=80)
    assert_matches_reference(x, w, y, "triton", **kw)


@pytest.mark.parametrize("mode", ["tma", "ws"])
def test_triton_tma_forward_falls_back_where_descriptors_cannot_go(monkeypatch, mode):
    """A TMA descriptor needs unit feature strides and 16-byte aligned rows and base: W stored D x C (a transposed
    view), rows of 7 bf16 features (14 bytes) and x one element off an aligned base take the pointer kernel, with
    the same results."""
    from mvloss.triton import tma

    monkeypatch.setenv("MVLOSS_TRITON_FORWARD", mode)
    x, w, y = inputs({}, torch.bfloat16, d=7)
    assert not tma.usable(x, w)
    assert_matches_reference(x, w, y, "triton", m2=0.5, mv="adaptive", t=0.2)
    x, w, y = inputs({}, d=80)
    w_t = w.T.contiguous().T
    x_off = torch.cat([torch.zeros(1, device=DEVICE), x.flatten()])[1:].view_as(x)
    assert tma.usable(x, w) and not tma.usable(x, w_t) and not tma.usable(x_off, w)
    assert_matches_reference(x_off, w_t, y, "triton", m3=0.35, mv="fixed", t=0.2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_targets_on_chunk_edges_and_zero_rows(monkeypatch, dtype):
    """The target column's gradient rides in the backward's GEMMs: labels on the first and last class of every class
    chunk and on the last class overall, a zero weight row as some rows' target and as everyone's negative, a zero
    embedding (not in fp16), an ignored row."""
    monkeypatch.setenv("MVLOSS_TRITON_WORKSPACE_ELEMS", str(B * 64))  # chunks of 64 classes
    x, w, _ = inputs({}, dtype, c=C)
    x, w = x.clone(), w.clone()
    edges = [c for c0 in range(0, C, 64) for c in (c0, min(c0 + 63, C - 1))] + [C - 1]
    y = torch.tensor([edges[i % len(edges)] for i in range(B)], device=DEVICE)
    if dtype != torch.float16:  # (fp16: d/dw of w / max(|w|, 1e-12) at w = 0 is ~1/eps, inf in fp16: the
        # next test holds the rest of the gradients there)
        w[edges[3]] = 0.0      # the target of a few rows, a negative of the others
        x[5] = 0.0             # a zero embedding
    y[7] = -100                # an ignored row
    assert_matches_reference(x, w, y, "triton", m2=0.5, mv="adaptive", t=0.2, label_smoothing=0.1)


FP16_ZERO_W_ROW = 11


@pytest.mark.parametrize("mode", ["gemm", "recompute"])
def test_triton_fp16_zero_weight_row_leaves_the_other_gradients_finite(monkeypatch, mode):
    """fp16 and a zero weight row, whose inverse norm is 1/eps = 1e12: the backward's fp16 gradient tiles carry
    dc w_inv, which overflowed there (inf, then inf * 0 = NaN in every row of dx).  The inverse norm the tiles carry
    is capped (_config.FP16_INV_NORM_CAP) and the weight-gradient side scaled back: loss, dx and every other row of
    dW within the tests' rule; the zero row's own dW is the fp64 truth's ~1/eps-sized value, past fp16's range, inf
    as the chunked backend gives it.  Both backward forms (the gemm workspace and the recompute kernels, which only
    a frozen W takes), through the op's dwhat too."""
    import mvloss.triton.ops  # noqa: F401  (registers the ops)
    from mvloss.backends import chunked

    monkeypatch.setenv("MVLOSS_TRITON_BACKWARD", mode)
    monkeypatch.setenv("MVLOSS_TRITON_WORKSPACE_ELEMS", str(B * 64))  # several class chunks
    x, w, y = inputs({}, torch.float16)
    w[FP16_ZERO_W_ROW] = 0.0
    y[0] = FP16_ZERO_W_ROW  # the zero row is one row's target and everyone else's negative
    kw = dict(m2=0.5, mv="adaptive", t=0.2, scale=32.0)
    truth = run(x.double(), w.double(), y, "reference", **kw)
    ref = run(x, w, y, "reference", **kw)
    got = run(x, w, y, "triton", **kw)
    keep = torch.arange(C, device=DEVICE) != FP16_ZERO_W_ROW
    for name, t, r, g in zip(("loss", "dx", "dW"), truth, ref, got):
        if name == "dW":
            assert torch.isinf(g[FP16_ZERO_W_ROW]).any() and torch.isinf(ref[2][FP16_ZERO_W_ROW]).any()
            t, r, g = t[keep], r[keep], g[keep]
        assert torch.isfinite(g).all(), name
        assert (g - t).abs().max().item() <= allowed_error(t, r, torch.float16), name
    # the op's contract values, dwhat (the gradient w.r.t. w-hat) included: finite and as the chunked backend's
    fwd = op_args(x, w, y)
    _, _, lse = torch.ops.mvloss.triton_neg_forward(*fwd)
    bwd = bwd_args(fwd, lse)
    dxhat, dwhat, _, _ = torch.ops.mvloss.triton_neg_backward(*bwd)
    up = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in bwd]
    dxhat_ref, dwhat_ref, _, _ = chunked.backward(*up)
    for name, g, r in (("dxhat", dxhat, dxhat_ref), ("dwhat", dwhat, dwhat_ref)):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, r.float(), rtol=2e-2, atol=2e-3 * r.abs().max().item(), msg=name)


@pytest.mark.parametrize("mode", ["persistent", "tma", "ws"])
@pytest.mark.parametrize("b", [B, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_dlogits_loop_forms_same_gradients(monkeypatch, dtype, b, mode):
    """MVLOSS_TRITON_DLOGITS = persistent (each program loops over several class tiles: one class program at B = 37
    under the interpreter, two at B = 16), tma (TMA-descriptor loads) and ws (tma, looping over class tiles like
    persistent; warp-specialised only from 65 rows and without a learnable bias: test_triton_step_with_other_tiles)
    write the same workspaces: identical gradients, learnable scale and bias (their per-tile partials) included, over
    several class chunks (tma / ws on a GPU: equal to fp32 rounding, their tiles may sum in another order)."""
    from mvloss.triton import tma

    monkeypatch.setenv("MVLOSS_TRITON_WORKSPACE_ELEMS", str(b * 256))
    x, w, y = inputs({}, dtype, b=b, c=C_BIG, d=80)  # 80: rows a TMA descriptor can cover
    assert tma.usable(x, w)
    bias = torch.linspace(-0.3, 0.3, C_BIG, device=DEVICE)
    results = {}
    for form in ("tiles", mode):
        monkeypatch.setenv("MVLOSS_TRITON_DLOGITS", form)
        scale = torch.tensor(12.0, device=DEVICE, requires_grad=True)
        bb = bias.clone().requires_grad_(True)
        xd, wd = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = F.arcface_loss(xd, wd, y, scale=scale, bias=bb, backend="triton", mv="adaptive", t=0.2,
                              label_smoothing=0.1)
        loss.backward()
        results[form] = [loss, xd.grad, wd.grad, scale.grad, bb.grad]
    for name, a, p in zip(("loss", "dx", "dW", "dscale", "dbias"), results["tiles"], results[mode]):
        assert torch.isfinite(p).all(), name
        if mode == "persistent" or DEVICE == "cpu":
            assert torch.equal(a, p), name
        else:
            torch.testing.assert_close(p, a, rtol=1e-5, atol=1e-6 * a.abs().max().item())


@pytest.mark.parametrize("mode", ["gemm_small_workspace", "recompute"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_backward_modes(monkeypatch, mode, dtype):
    """Both backward designs: the workspace one cut into many class chunks (a 64-class chunk at B = 37), and the
    two-kernel recompute one; learnable scale and bias, label smoothing, ignored rows."""
    if mode == "recompute":
        monkeypatch.setenv("MVLOSS_TRITON_BACKWARD", "recompute")
    else:
        monkeypatch.setenv("MVLOSS_TRITON_WORKSPACE_ELEMS", str(B * 64))
    x, w, y = inputs({}, dtype, c=C_BIG)
    bias = torch.linspace(-0.3, 0.3, C_BIG, device=DEVICE)
    results = {}
    for backend in ("reference", "triton"):
        scale = torch.tensor(12.0, device=DEVICE, requires_grad=True)
        b = bias.clone().requires_grad_(True)
        xd, wd = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = F.arcface_loss(xd, wd, y, scale=scale, bias=b, backend=backend, mv="adaptive", t=0.2,
                              label_smoothing=0.1)
        loss.backward()
        results[backend] = [loss, xd.grad, wd.grad, scale.grad, b.grad]
    tol = 1e-4 if dtype == torch.float32 else 4e-3
    for name, r, t in zip(("loss", "dx", "dW", "dscale", "dbias"), results["reference"], results["triton"]):
        torch.testing.assert_close(t.float(), r.float(), rtol=tol, atol=tol * r.abs().max().item(), msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("normalize", [True, False])
def test_triton_norm_backward_kernel(dtype, normalize):
    """The one-pass normalisation backward equals mvloss.autograd.normalization_backward, including rows whose norm
    is below eps (no projection there) and a transposed (FaceX-Zoo D x C) output layout."""
    from mvloss.autograd import normalization_backward
    from mvloss.triton import norm_backward

    g = torch.Generator().manual_seed(1)
    t = torch.randn(45, 77, generator=g).to(DEVICE).to(dtype)
    t[3] = 1e-5 * t[3]
    dhat = torch.randn(45, 77, generator=g).to(DEVICE)
    eps = 1e-3
    inv = inverse_norms(t, eps)
    want = normalization_backward(dhat.clone(), t, inv, eps, normalize)  # (it may write into its input)
    out = torch.empty(77, 45, dtype=dtype, device=DEVICE).T
    got = norm_backward.launch(dhat, t, inv, eps, normalize, out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-5 if dtype == torch.float32 else 1e-3,
                               atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_one_pass_norm_backward(dtype):
    """mvloss.autograd's one-pass route (used on eager CUDA tensors) equals its PyTorch block path on a transposed
    (FaceX-Zoo layout) weight."""
    from mvloss import autograd

    g = torch.Generator().manual_seed(2)
    w = torch.randn(61, 77, generator=g).to(DEVICE).to(dtype).T  # (77, 61), stored transposed
    dhat = torch.randn(77, 61, generator=g).to(DEVICE)
    inv = inverse_norms(w, 1e-12)
    want = None if DEVICE == "cuda" else autograd.normalization_backward(dhat.clone(), w, inv, 1e-12, True)
    got = autograd.one_pass_norm_backward(dhat.clone(), w, inv, 1e-12)
    if want is None:  # on a GPU normalization_backward itself takes the one-pass route: compare with fp64
        want = autograd.normalization_backward(dhat.double(), w.double(), inv.double(), 1e-12, True).to(dtype)
    assert got.dtype == w.dtype
    if dtype != torch.float32:  # a fresh output keeps W's layout; an fp32 dhat is overwritten in place instead
        assert got.stride() == w.stride()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("smoothing", [0.0, 0.1])  # 0: the target side's kernels too (mvloss/triton/target_loss.py)
@pytest.mark.parametrize("backend", ["triton", "chunked", "cpu"])
def test_eager_cuda_glue_kernels_give_the_same_loss(monkeypatch, backend, smoothing):
    """With ``mvloss.autograd.triton_glue`` on (what eager CUDA tensors get: both inverse norms in one Triton kernel,
    the one-pass normalisation backward, the target side's kernels), any backend still matches the reference;
    forced on for CPU tensors under the interpreter, natural on a GPU."""
    from mvloss import autograd, dispatch

    if backend == "cpu" and DEVICE == "cuda":
        pytest.skip("the cpu backend never runs CUDA tensors, the only ones the glue is for (runs where DEVICE is cpu)")
    if dispatch.get(backend).reason() is not None:
        pytest.fail(f"backend {backend} unavailable: {dispatch.get(backend).reason()}")
    monkeypatch.setattr(autograd, "triton_glue", lambda t: t.dtype != torch.float64)
    kw = FAMILIES["mv_arc_adaptive"]
    x, w, y = inputs(kw, c=C_BIG)
    assert_matches_reference(x, w.T.contiguous().T, y, backend, label_smoothing=smoothing, **kw)


def test_triton_learnable_scale_and_bias():
    x, w, y = make_inputs(B, C, D, ignore=(5,), device=DEVICE)
    results = {}
    for backend in ("reference", "triton"):
        scale = torch.tensor(12.0, device=DEVICE, requires_grad=True)
        bias = torch.linspace(-0.3, 0.3, C, device=DEVICE).requires_grad_(True)
        xd, wd = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = F.l2_softmax_loss(xd, wd, y, alpha=scale, bias=bias, backend=backend, label_smoothing=0.05, m3=0.1)
        loss.backward()
        results[backend] = [loss, xd.grad, wd.grad, scale.grad, bias.grad]
    for name, r, t in zip(("loss", "dx", "dW", "dscale", "dbias"), results["reference"], results["triton"]):
        torch.testing.assert_close(t, r, rtol=1e-4, atol=1e-5 * r.abs().max().item(), msg=name)


def test_triton_softmax_with_bias_no_normalisation():
    x, w, y = inputs({})
    x, w = 0.3 * x, 0.3 * w
    results = {}
    for backend in ("reference", "triton"):
        bias = torch.linspace(-1.0, 1.0, C, device=DEVICE).requires_grad_(True)
        xd, wd = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = F.softmax_loss(xd, wd, y, bias=bias, backend=backend, reduction="sum")
        loss.backward()
        results[backend] = [loss, xd.grad, wd.grad, bias.grad]
    for name, r, t in zip(("loss", "dx", "dW", "dbias"), results["reference"], results["triton"]):
        torch.testing.assert_close(t, r, rtol=1e-4, atol=1e-5 * r.abs().max().item(), msg=name)


# ------------------------------------------------------------------------------------- the contract, op by op

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("treatment", list(Treatment))
@pytest.mark.parametrize("clamp", [False, True])
def test_triton_contract_matches_chunked(treatment, clamp, dtype):
    """forward/backward of the backend against the chunked backend (same half inputs, upcast), every treatment,
    dscale and dbias; per-row scales and upstream gradients differ, so the per-row dc normaliser is exercised."""
    from mvloss.backends import chunked
    from mvloss.triton import backward, forward

    g = torch.Generator().manual_seed(int(treatment) * 2 + clamp)
    b, c, d = 19, 150, 40
    x = torch.randn(b, d, generator=g).to(DEVICE).to(dtype)
    w = torch.randn(c, d, generator=g).to(DEVICE).to(dtype)
    x_inv, w_inv = inverse_norms(x, 1e-12), inverse_norms(w, 1e-12)
    if clamp:
        x_inv = x_inv * 1.5  # cosines beyond [-1, 1], so the clamp bites
    labels = torch.randint(0, c, (b,), generator=g).to(DEVICE)
    labels[4] = -1
    thr = (torch.rand(b, generator=g) * 0.6 - 0.3).to(DEVICE)
    if treatment == Treatment.NONE:
        thr = torch.full_like(thr, float("inf"))
    scale = (torch.rand(b, generator=g) * 20 + 5).to(DEVICE)
    bias = (torch.randn(c, generator=g) * 0.1).to(DEVICE)
    param = 0.3
    want = chunked.forward(x, w, x_inv, w_inv, labels, thr, scale, bias, int(treatment), param, clamp)
    got = forward(x, w, x_inv, w_inv, labels, thr, scale, bias, int(treatment), param, clamp, chunk_size=7)
    for name, a, e in zip(("lse", "zsum"), got, want):
        assert a.dtype == torch.float32 and a.shape == (b,)
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-4, msg=name)
    assert got[2].dtype == torch.float64 and torch.equal(got[2].float(), got[0])  # lse_wide: lse before rounding
    lse = want[0]
    g_lse = torch.rand(b, generator=g).to(DEVICE)
    g_sum = (torch.rand(b, generator=g) * 0.01).to(DEVICE)
    want = chunked.backward(x, w, x_inv, w_inv, labels, thr, scale, bias, lse, g_lse, g_sum, int(treatment), param,
                            clamp, True, True)
    got = backward(x, w, x_inv, w_inv, labels, thr, scale, bias, lse, g_lse, g_sum, int(treatment), param, clamp,
                   True, True)
    # half inputs: dc is rounded to the input dtype once for the gradient GEMMs (2^-11 relative in fp16)
    rtol, atol = (1e-4, 1e-5) if dtype == torch.float32 else (1e-2, 2e-3)
    for name, a, e in zip(("dxhat", "dwhat", "dscale", "dbias"), got, want):
        torch.testing.assert_close(a.float(), e, rtol=rtol, atol=atol * (1 + e.abs().max().item()), msg=name)
    got = backward(x, w, x_inv, w_inv, labels, thr, scale, None, lse, g_lse, g_sum, int(treatment), param, clamp,
                   False, True)
    assert got[2] is None and got[3] is None


def test_triton_backward_is_bitwise_deterministic(monkeypatch):
    """No atomics: the same call twice gives the same bits (class splits summed in a fixed order)."""
    from mvloss.triton import backward, forward

    monkeypatch.setenv("MVLOSS_TRITON_SPLITS", "3")
    x, w, y = make_inputs(9, 700, 33, device=DEVICE)
    x_inv, w_inv = inverse_norms(x, 1e-12), inverse_norms(w, 1e-12)
    thr = torch.full((9,), 0.1, device=DEVICE)
    scale = torch.full((9,), 30.0, device=DEVICE)
    outs = []
    for _ in range(2):
        lse, zsum, lse_wide = forward(x, w, x_inv, w_inv, y, thr, scale, None, int(Treatment.FIXED), 0.2, False)
        grads = backward(x, w, x_inv, w_inv, y, thr, scale, None, lse_wide, torch.ones_like(lse),
                         torch.zeros_like(lse), int(Treatment.FIXED), 0.2, False, True, False)
        outs.append((lse, zsum, lse_wide) + grads[:3])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_triton_kernel_launches_get_whole_tensors(monkeypatch):
    """No Triton launch of a training step is handed a view (a slice of a bigger tensor): a row block is passed as the
    whole tensor and its first row.  torch.compile (2.11) turns a user kernel's write into a slice into a functional
    copy sized to the slice's end and then reads past it (illegal memory access at C = 100k, several class chunks)."""
    from mvloss.triton import _config

    views = []
    real = _config.launcher

    def spying_launcher(kernel, *operands):
        launch = real(kernel, *operands)

        class Spy:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "?")
                    views.extend((name, i) for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a._is_view())
                    return launch[grid](*args, **kwargs)
                return run
        return Spy()

    monkeypatch.setattr(_config, "launcher", spying_launcher)
    monkeypatch.setenv("MVLOSS_TRITON_WORKSPACE_ELEMS", str(16 * 64))  # 64 classes a chunk: 5 chunks
    x, w, y = make_inputs(16, 300, 24, device=DEVICE)
    x.requires_grad_(True)
    w.requires_grad_(True)
    F.arcface_loss(x, w, y, backend="triton", mv="adaptive", t=0.2, label_smoothing=0.1).backward()
    assert x.grad is not None and w.grad is not None
    assert not views, f"kernel launches given views (kernel, argument index): {views}"


def test_triton_dw_side_stream_order_on_cpu(monkeypatch):
    """The MVLOSS_TRITON_DW_STREAM branch of the default backward, run on the CPU with stand-in streams: each
    chunk's normalisation backward runs inside the side stream's context after it waited for the main stream; the
    chunk's GEMM writes one of two buffers in turn, waiting (from the third chunk) for the side stream's read of
    it two chunks before; the main stream waits for the side one once at the end; the gradients are the default's
    bits, fp32 and bf16 (test_triton_dw_side_stream_same_bits runs the real streams on a GPU)."""
    import contextlib

    from mvloss.triton import backward_gemm

    events, inside = [], []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            events.append(f"{self.name} waits {other.name}")

        def wait_event(self, event):
            events.append(f"{self.name} waits event {event.n}")

    class Event:
        made = 0

        def __init__(self):
            self.n, Event.made = Event.made, Event.made + 1

        def record(self, stream):
            events.append(f"event {self.n} on {stream.name}")

    main, side = Stream("main"), Stream("side")

    @contextlib.contextmanager
    def on(stream):
        inside.append(stream.name)
        yield
        inside.pop()

    finish = backward_gemm._finish_chunk
    monkeypatch.setattr(backward_gemm, "_finish_chunk",
                        lambda *a: (events.append(f"finish on {inside[-1] if inside else 'main'}"), finish(*a)))
    monkeypatch.setenv("MVLOSS_TRITON_WORKSPACE_ELEMS", str(16 * 64))  # 64 classes a chunk: 5 chunks
    side_chunks = [(["main waits event %d" % (k - 2)] if k >= 2 else [])
                   + ["side waits main", "finish on side", f"event {k} on side"] for k in range(5)]
    for dtype in (torch.float32, torch.bfloat16):
        x, w, y = make_inputs(16, 300, 24, dtype, device=DEVICE)
        grads = []
        with monkeypatch.context() as m:
            for stand_ins in (False, True):
                events.clear()
                if stand_ins:
                    Event.made = 0
                    m.setattr(backward_gemm, "_side_stream_ok", lambda x: True)
                    m.setattr(backward_gemm, "_dw_stream", lambda device: side)
                    m.setattr(torch.cuda, "current_stream", lambda device=None: main)
                    m.setattr(torch.cuda, "stream", on)
                    m.setattr(torch.cuda, "Event", Event)
                xd, wd = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
                F.arcface_loss(xd, wd, y, backend="triton", mv="adaptive", t=0.2).backward()
                grads.append((xd.grad, wd.grad))
                want = [e for chunk in side_chunks for e in chunk] + ["main waits side"] if stand_ins else \
                    ["finish on main"] * 5
                assert events == want, (dtype, events)
        assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1]), dtype


def test_triton_inverse_norms_kernel():
    from mvloss.triton import inverse_norms_pair

    x = torch.randn(37, 77, device=DEVICE)
    w = torch.randn(203, 77, device=DEVICE).T.contiguous().T
    x[3] = 0.0  # below eps
    a, b = inverse_norms_pair(x, w, 1e-6)
    torch.testing.assert_close(a, inverse_norms(x, 1e-6))
    torch.testing.assert_close(b, inverse_norms(w, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", [(True, True), (False, True), (True, False)])
def test_triton_target_rows_kernel(dtype, normalize):
    """The pre-pass's one-launch target rows equal its PyTorch path (mvloss.loss.target_rows_of with the glue off):
    x-hat, w-hat at the labels of a transposed W (FaceX-Zoo's layout), the cosine, 0 where a row has no label, and a
    zero row below eps."""
    from mvloss import autograd
    from mvloss.loss import target_rows_of
    from mvloss.config import LossConfig
    from mvloss.triton import target_rows

    g = torch.Generator().manual_seed(5)
    x = torch.randn(37, 77, generator=g).to(DEVICE).to(dtype)
    w = torch.randn(77, 203, generator=g).to(DEVICE).to(dtype).T  # (203, 77), stored transposed
    x[3] = 0.0
    labels = torch.randint(0, 203, (37,), generator=g).to(DEVICE)
    has = torch.ones(37, dtype=torch.bool, device=DEVICE)
    has[[4, 30]] = False
    cfg = LossConfig(normalize_x=normalize[0], normalize_w=normalize[1], eps=1e-6)
    got = target_rows.target_rows(x, w, labels, has, cfg.normalize_x, cfg.normalize_w, cfg.eps)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(autograd, "triton_glue", lambda t: False)
        want = target_rows_of(x, w, labels, has, cfg)
    for name, a, b in zip(("xhat", "what_y", "cos_y"), got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6 * b.abs().max().item(), msg=name)
    assert (got[2][[4, 30]] == 0).all()


_FAKE_SCRIPT = r"""
import torch
import mvloss.triton.ops  # noqa: F401
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
b, c, d = 5, 70, 20
x, w = torch.randn(b, d, dtype=torch.float16), torch.randn(c, d, dtype=torch.float16)
vec = lambda n: torch.rand(n)
fwd = (x, w, vec(b), vec(c), torch.randint(0, c, (b,)), vec(b), vec(b), vec(c), 2, 0.2, True)
bwd = fwd[:8] + (vec(b), vec(b), vec(b), 2, 0.2, True, True, True)
bwd_w = bwd[:11] + (vec(b),) + bwd[11:] + (True, 1e-12)
no_sum = bwd[:10] + (None,) + bwd[11:]  # no gradient of the logit sum
with FakeTensorMode() as mode:
    out = torch.ops.mvloss.triton_neg_forward(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                for a in fwd])
    assert [tuple(o.shape) for o in out] == [(b,), (b,), (b,)]
    assert [o.dtype for o in out] == [torch.float32, torch.float32, torch.float64]
    out = torch.ops.mvloss.triton_neg_backward(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                 for a in bwd])
    assert [tuple(o.shape) for o in out] == [(b, d), (c, d), (b,), (c,)]
    out = torch.ops.mvloss.triton_neg_backward_w(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                   for a in bwd_w])
    assert [tuple(o.shape) for o in out] == [(b, d), (c, d), (b,), (c,)] and out[1].dtype == w.dtype
# the GPU branches (torch.compile traces them with fake CUDA tensors; no GPU needed): half GEMMs with fp32 output,
# the dxhat accumulation over several class chunks
import os
os.environ["MVLOSS_TRITON_WORKSPACE_ELEMS"] = str(b * 256)
cb = 1000
with FakeTensorMode() as mode:
    xg = torch.empty(b, d, dtype=torch.bfloat16, device="cuda")
    wg = torch.empty(cb, d, dtype=torch.bfloat16, device="cuda")
    v = lambda n: torch.empty(n, device="cuda")
    lab = torch.zeros(b, dtype=torch.int64, device="cuda")
    out = torch.ops.mvloss.triton_neg_backward_w(xg, wg, v(b), v(cb), lab, v(b), v(b), None, v(b), v(b), v(b), v(b),
                                                 2, 0.2, False, True, False, True, 1e-12)
    assert [tuple(o.shape) for o in out] == [(b, d), (cb, d), (b,), (0,)] and out[1].dtype == torch.bfloat16, out
    assert out[0].device.type == "cuda" and out[0].dtype == torch.float32
os.environ.pop("MVLOSS_TRITON_WORKSPACE_ELEMS")
for op, args in ((torch.ops.mvloss.triton_neg_forward, fwd), (torch.ops.mvloss.triton_neg_backward, bwd),
                 (torch.ops.mvloss.triton_neg_backward_w, bwd_w), (torch.ops.mvloss.triton_neg_forward, fwd + (False,)),
                 (torch.ops.mvloss.triton_neg_backward, no_sum)):
    graph = make_fx(lambda *a: op(*a), tracing_mode="symbolic")(*args)
    assert "mvloss.triton_neg" in graph.code
print("ok")
"""


@pytest.mark.parametrize("forms", ["default", "ws"])
def test_triton_ops_fake_and_symbolic_tracing(forms):
    """The ops' fake implementations (the triton_op bodies) trace with fake and symbolic shapes, in the default
    forms and with the warp-specialised ones asked for (fake tensors take the pointer kernels).  Runs in a fresh
    interpreter without TRITON_INTERPRET: under the interpreter Triton kernels are not traceable (known)."""
    import subprocess
    import sys

    env = env_without_interpreter()
    env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "")
    if forms == "ws":
        env.update(MVLOSS_TRITON_FORWARD="ws", MVLOSS_TRITON_DLOGITS="ws")
    proc = subprocess.run([sys.executable, "-c", _FAKE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


_COMPILE_SCRIPT = r"""
import torch
from mvloss.triton._compile_check import SHARED_LIMIT, compile_kernel
cases = [(torch.bfloat16, 1024, 512), (torch.bfloat16, 7, 77), (torch.float16, 64, 1000), (torch.float32, 300, 128),
         (torch.float32, 64, 40)]


def check(kernel, dtype, b, d, r):
    assert r["shared"] <= SHARED_LIMIT, r
    # rows a multiple of 16 elements: loads go through asynchronous copies (the software pipeline), and bf16 dots
    # through warp-group MMA
    assert r["async_copies"] > 0 or d % 16, r
    if dtype == torch.bfloat16 and b == 1024:
        assert r["wgmma"] > 0 or kernel in ("dx", "dw"), r
        # the ws form's table tile is warp-specialised (a producer group and two consumer groups: 12 warps),
        # its rows split between the groups (x copied in two halves, plus W: 3 TMA copies)
        ws = kernel in ("fwd_ws", "dlogits_ws")
        assert r["warp_specialized"] == ws and (r["warps"] == 12) == ws, r
        assert not ws or r["tma_copies"] == 3, r
        if kernel in ("fwd", "fwd_tma"):  # the table tile's register cap: two programs an SM
            assert r["registers"] <= 128 and r["programs_per_sm"] == 2, r
    assert r["tma_boxes_match"], r  # each TMA copy moves what its buffer holds
    # z log2 e rounded alike in the forward and the backward (an FMA of it into the backward's z - lse broke
    # exp(z - lse)'s consistency with the forward's lse: fp32 on a GPU, sixteenth session)
    assert r["rounded_products"] > 0, r
    assert not r["rows_shifted_twice"], r  # each consumer group's rows are its own half of the row tile
    # the default path spills at most a few words (fp32 fwd: 32 bytes); the recompute design's 512-wide
    # accumulators spill a little (3.8: <= 64 bytes, 3.6: up to 136)
    # (the persistent recompute kernel, a candidate, keeps more alive across its loop: up to 116 bytes); the
    # forward's half-precision table tile is capped at 128 registers (2 programs an SM): 80-92 bytes
    assert r["spill_bytes"] <= {"dx": 256, "dw": 256, "dlogits_persistent": 128, "fwd": 96}.get(kernel, 64), r


for dtype, b, d in cases:
    for kernel in ("fwd", "fwd_flat", "fwd_tma", "fwd_ws", "dlogits", "dlogits_persistent", "dlogits_tma",
                   "dlogits_ws", "dx", "dw"):
        if kernel not in ("dx", "dw") and (dtype, b, d) != cases[0] and dtype != torch.float32:
            continue
        if kernel in ("fwd_tma", "fwd_ws", "dlogits_tma", "dlogits_ws") and d % 4:
            continue  # rows a TMA descriptor cannot describe: the launcher takes the pointer kernel
        # the table shape also with a training step's flags (no bias, dscale, dbias or logit sum), and with a
        # partial last class tile (the forward's tail copy, the recompute kernel of a partial last chunk)
        for step, whole in (((False, True), (True, True), (True, False)) if (dtype, b, d) == cases[0]
                            else ((False, True),)):
            r = compile_kernel(kernel, dtype, b, d, arch=90, training_step=step, whole_tiles=whole)
            check(kernel, dtype, b, d, r)
# every other treatment (a constexpr: its own kernel, with its own selects) at the table shape, a step's flags
for kernel in ("fwd", "dlogits"):
    for treatment in (0, 1, 3, 4):
        check(kernel, *cases[0], compile_kernel(kernel, *cases[0], arch=90, treatment=treatment, training_step=True))
# the eager-CUDA glue kernel of the pre-pass, from the narrowest rows to the widest it takes
from mvloss.triton._compile_check import compile_target_rows
from mvloss.triton.target_rows import MAX_D
for dtype in (torch.bfloat16, torch.float32):
    for d in (1, 77, 512, MAX_D):
        r = compile_target_rows(dtype, d)
        assert r["spill_bytes"] == 0 and r["registers"] <= 160 and not r["approximate"], r
# the deferred label check's kernel, int64 and int32 labels
from mvloss.triton._compile_check import compile_label_check
for labels_dtype in ("i64", "i32"):
    r = compile_label_check(labels_dtype)
    assert r["spill_bytes"] == 0 and r["registers"] <= 128, r
# the target side's three kernels (thresholds, loss, its backward)
from mvloss.triton._compile_check import compile_target_loss
for r in compile_target_loss():  # IEEE rounding throughout: no ex2.approx, no div.full
    assert r["spill_bytes"] == 0 and r["registers"] <= 128 and not r["approximate"], r
# the forward's merge of its class splits: lse without approximate exp and log
from mvloss.triton._compile_check import compile_lse_merge
r = compile_lse_merge()
assert r["spill_bytes"] == 0 and r["registers"] <= 128 and not r["approximate"], r
# the fused weight-gradient GEMM (MVLOSS_TRITON_DW_GEMM=fused): on tensor cores, pipelined, no spills at the table
# shape (its epilogue passes in 32-column steps: 120-123 registers); partial feature tiles spill ~100 bytes
from mvloss.triton._compile_check import compile_dw_fused
for dtype, b, d in cases:
    r = compile_dw_fused(dtype, b, d)
    assert r["shared"] <= SHARED_LIMIT and (r["async_copies"] > 0 or d % 16), r
    assert r["spill_bytes"] <= (0 if d % 32 == 0 else 128), r
    if dtype == torch.bfloat16 and b == 1024:
        assert r["wgmma"] > 0 and r["registers"] <= 128, r
        r = compile_dw_fused(dtype, b, d, use_tma=True)  # fused_tma: the GEMM's tiles by descriptors
        assert r["tma_copies"] > 0 and r["tma_boxes_match"] and r["spill_bytes"] == 0 and r["registers"] <= 128, r
        # the row dots from the accumulator, on the 128 x 64 tile of bench/tiles/dw_fused_accdot_128x64.json
        r = compile_dw_fused(dtype, b, d, config=dict(BLOCK_N=64, ACC_DOT=True))
        assert r["spill_bytes"] == 0 and r["registers"] <= 128 and r["programs_per_sm"] == 2, r
print("ok")
"""


def test_tma_boxes_match_catches_a_box_larger_than_its_buffer():
    """The compile check's TMA consistency test on IR lines as Triton 3.6 and 3.8 print them: a copy whose
    descriptor block is its buffer's shape passes, and so does a box of a 128-byte slice of a wider row; the 3.6
    warp-specialisation miscompile (a 128-row box into a 64-row buffer) and an in-kernel descriptor whose box no copy
    matches fail."""
    from mvloss.triton._compile_check import tma_boxes_match

    def copy(desc, dst, printed_36=True):
        ty = f"tensor<{desc}xbf16, #shared>" if printed_36 else f"{desc}xbf16, #shared1"
        return (f"ttng.async_tma_copy_global_to_local %x_desc[%r0, %k] %60, %59, %true : !tt.tensordesc<{ty}>, "
                f"!ttg.memdesc<1xi64, #shared1, #smem, mutable> -> !ttg.memdesc<{dst}xbf16, #shared, #smem>\n")

    make = "ttng.tensormap_create %xd_0, %x_ptr, [%c64_i32, %c64_i32], [%D, %B], [%s], [%c1_i32, %c1_i32]\n"
    assert tma_boxes_match(copy("64x64", "64x64") + copy("128x64", "128x64", False) + make, 2)
    assert not tma_boxes_match(copy("128x64", "64x64"), 2)
    assert not tma_boxes_match(copy("128x64", "128x64", False) + make, 2)
    # a 256-byte row copied in 128-byte slices (the swizzle's width): the fused dW GEMM's 64 x 128 bf16 tiles
    assert tma_boxes_match(copy("64x128", "64x128") + make, 2)
    assert not tma_boxes_match(copy("64x128", "64x128") + make.replace("%c64_i32, %c64_i32", "%c32_i32, %c64_i32"), 2)
    assert tma_boxes_match("no copies here", 2)


def test_rows_shifted_twice_catches_the_split_rows_offset_twice():
    """The compile check's row-split test on a consumer partition as Triton 3.6 and 3.8 print it: rows made from the
    copy coordinate r0 (which Triton rewrote to r0 + 64 in that group) plus an index range starting at 64 are caught;
    rows made from the program id (_tiles.tma_row_tile) and a partition with no shifted range pass."""
    from mvloss.triton._compile_check import rows_shifted_twice

    head = ("partition1(%x_inv_ptr_0: !tt.ptr<f32>) num_warps(4) {\n"
            "  %c64_i32_20 = arith.constant {async_task_id = array<i32: 2>} 64 : i32\n"
            "  %c128_i32_23 = arith.constant {async_task_id = array<i32: 2>} 128 : i32\n"
            "  %pid_b = tt.get_program_id x {async_task_id = array<i32: 2>} : i32\n"
            "  %r0 = arith.muli %pid_b, %c128_i32_23 {async_task_id = array<i32: 2>} : i32\n"
            "  %xt = arith.addi %r0, %c64_i32_20 {async_task_id = array<i32: 2>} : i32\n"
            "  %rows_27 = tt.make_range {async_task_id = array<i32: 2>, end = 128 : i32, start = 64 : i32} : "
            "tensor<64xi32, #blocked>\n")
    twice = head + "  %rows_30 = tt.splat %xt {async_task_id = array<i32: 2>} : i32 -> tensor<64xi32, #blocked>\n"
    once = head + "  %rows_30 = tt.splat %r64 {async_task_id = array<i32: 2>} : i64 -> tensor<64xi64, #blocked>\n"
    assert rows_shifted_twice("ttg.warp_specialize(%a)\ndefault {\n}\n" + twice)
    assert not rows_shifted_twice("ttg.warp_specialize(%a)\ndefault {\n}\n" + once)
    assert not rows_shifted_twice(twice.replace("start = 64", "start = 0"))
    assert not rows_shifted_twice("no partitions here")


def _skip_without_ptxas():
    """The sm_90 compile checks need Triton's bundled ptxas (no GPU)."""
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("Triton's bundled ptxas is missing")


def test_triton_kernels_compile_for_sm90():
    """The GPU path (not the interpreter's) compiles for sm_90 with the chosen configurations: shared memory fits,
    (almost) no register spills.  Uses Triton's bundled ptxas; no GPU needed."""
    import subprocess
    import sys

    _skip_without_ptxas()
    env = env_without_interpreter()
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_programs_per_sm():
    from mvloss.triton._compile_check import programs_per_sm

    assert programs_per_sm(214, 8, 96 * 1024) == 1  # the forward's table tile (registers bound it)
    assert programs_per_sm(128, 8, 72 * 1024) == 2
    assert programs_per_sm(152, 4, 48 * 1024) == 3
    assert programs_per_sm(64, 4, 100 * 1024) == 2  # shared memory bounds it


def test_triton_occupancy_script(tmp_path):
    """bench/triton_occupancy.py compiles the table's and the sweep's tiles for sm_90 (no GPU) and writes the table;
    the register cap of the sweep's last recompute configuration holds."""
    import subprocess
    import sys

    _skip_without_ptxas()
    script = bench_script("triton_occupancy.py")
    out = tmp_path / "occ.md"
    env = env_without_interpreter()
    proc = subprocess.run([sys.executable, script, "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| forward")
             or line.startswith("| recompute")]
    assert len(table) >= 10 and table[0][0].strip() == "forward — table"
    capped = [r for r in table if r[4].strip() == "128"]
    assert capped and all(int(r[5]) <= 128 for r in capped), capped

def test_triton_gpu_timings_script_smoke(tmp_path):
    """bench/triton_gpu_timings.py runs end to end and writes its records: on a GPU on a small shape, elsewhere with
    --smoke (CPU, interpreter, tiny shape).  (On the GPU image, triton 3.6's interpreter fails on numpy 2.5.)"""
    import json
    import subprocess
    import sys

    script = bench_script("triton_gpu_timings.py")
    out = tmp_path / "t.json"
    args = ["--B", "64", "--C", "3000", "--D", "64"] if torch.cuda.is_available() else ["--smoke"]
    profile = tmp_path / "profile.txt"
    proc = subprocess.run([sys.executable, script, *args, "--out", str(out), "--profile", str(profile)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(out.read_text())[0]
    assert {"device", "triton", "triton_ops", "chunked", "gemms", "triton_candidates"} <= set(rec)
    assert rec["triton_candidates"]["fwd_bwd_ms"] > 0 and rec["triton_ops"]["bwd_w_candidate_ms"] > 0
    assert 0 < rec["triton"]["host_issue_ms"] <= 2 * rec["triton"]["fwd_bwd_ms"] + 50  # at most a step, plus noise
    for r in (rec["triton"], rec["chunked"], rec["triton_deferred_check"]):  # each half of a step, issued alone
        assert 0 < r["host_issue_fwd_ms"] and 0 < r["host_issue_bwd_ms"], r
    text = profile.read_text()
    assert "3 steps" in text and "mvloss::triton_neg_forward" in text and "mvloss::triton_neg_backward_w" in text
    python_part = text[text.index("cProfile of 3 steps"):]
    assert "mvloss/triton/ops.py" in python_part and "(_neg_backward_w)" in python_part
    assert 0 < rec["triton"]["steady_ms"] and 0 < rec["triton_deferred_check"]["steady_ms"]
    assert "triton_tiles" not in rec  # only with --tiles


def test_triton_gpu_timings_blocking_calls_text():
    """The profile's last table: the host calls that can wait on the device (syncs, copies, allocations), slowest
    first, each with the Python stack that made it; other calls are left out."""
    import importlib.util as iu
    from types import SimpleNamespace as Avg

    spec = iu.spec_from_file_location("triton_gpu_timings", bench_script("triton_gpu_timings.py"))
    timings = iu.module_from_spec(spec)
    spec.loader.exec_module(timings)
    rows = [Avg(key="cudaLaunchKernel", count=90, self_cpu_time_total=900.0, stack=["a.py(1): f"]),
            Avg(key="cudaMemcpyAsync", count=3, self_cpu_time_total=40.0, stack=["mvloss/loss.py(7): g"]),
            Avg(key="cudaStreamSynchronize", count=3, self_cpu_time_total=7000.0, stack=["mvloss/x.py(3): h", "b"])]
    text = timings.blocking_calls_text(rows)
    assert "cudaLaunchKernel" not in text
    sync, copy = text.index("cudaStreamSynchronize: 3 calls, 7.000 ms"), text.index("cudaMemcpyAsync: 3 calls")
    assert sync < copy and "    mvloss/x.py(3): h\n    b\n" in text and "    mvloss/loss.py(7): g" in text
    assert timings.blocking_calls_text(rows[:1]).endswith("(none)\n")


def test_triton_gpu_timings_script_times_candidate_tiles(tmp_path):
    """--tiles times the step again with each candidate's tiles (MVLOSS_TRITON_TILES; JSON or a file of it, the fused
    dW GEMM's too), one at a time, records which tiles ran, and times the table's step once more after them;
    --step-only (the tune stage's quick run) times nothing else."""
    import json
    import subprocess
    import sys

    script = bench_script("triton_gpu_timings.py")
    out = tmp_path / "t.json"
    first = {"forward": {"BLOCK_B": 16, "BLOCK_C": 32, "num_warps": 4}, "dlogits": {"BLOCK_B": 16}}
    second = {"dlogits": {"BLOCK_B": 16, "BLOCK_C": 32}, "dw": {"mode": "fused", "BLOCK_M": 16}}
    second_file = tmp_path / "second.json"
    second_file.write_text(json.dumps(second))
    args = ["--B", "64", "--C", "3000", "--D", "64"] if torch.cuda.is_available() else ["--smoke"]
    proc = subprocess.run([sys.executable, script, *args, "--step-only", "--tiles", json.dumps(first),
                           str(second_file), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(out.read_text())[0]
    assert set(rec) - {"triton_graphed"} == {"device", "B", "C", "D", "dtype", "tiles", "triton", "triton_tiles",
                                             "triton_again", "triton_deferred_check"}
    table = rec["tiles"]
    assert rec["triton_again"]["tiles"] == table and rec["triton_again"]["fwd_bwd_ms"] > 0
    assert table["forward"]["BLOCK_B"] != 16 or table["forward"]["BLOCK_C"] != 32  # the table's
    ran1, ran2 = (r["tiles"] for r in rec["triton_tiles"])
    assert all(r["fwd_bwd_ms"] > 0 for r in rec["triton_tiles"])
    assert {k: ran1["forward"][k] for k in first["forward"]} == first["forward"]
    assert ran1["dlogits"]["BLOCK_B"] == 16 and ran1["dlogits"]["BLOCK_C"] == table["dlogits"]["BLOCK_C"]
    # the second candidate alone: the forward the table's, nothing of the first left over
    assert ran2["forward"] == table["forward"] and (ran2["dlogits"]["BLOCK_B"], ran2["dlogits"]["BLOCK_C"]) == (16, 32)
    # and the fused dW GEMM with its tiles, the table's being cuBLAS's
    assert (ran2["dw"]["mode"], ran2["dw"]["BLOCK_M"], table["dw"]["mode"], ran1["dw"]) == ("fused", 16, "cublas",
                                                                                              table["dw"])
    assert "table again" in proc.stdout and "tiles 2:" in proc.stdout


def test_triton_accuracy_script(tmp_path):
    """bench/triton_accuracy.py writes its table, every error finite and below PyTorch's own at the same dtype."""
    import subprocess
    import sys

    script = bench_script("triton_accuracy.py")
    out = tmp_path / "acc.md"
    proc = subprocess.run([sys.executable, script, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [ln.split("|")[1:-1] for ln in out.read_text().splitlines() if ln.startswith("| bfloat16") or
            ln.startswith("| float16")]
    assert len(rows) == 8
    for row in rows:
        tri, ref = [float(v) for v in row[2:5]], [float(v) for v in row[5:8]]
        assert all(e < r for e, r in zip(tri[1:], ref[1:])), row  # dx and dW


def test_triton_sweep_script_smoke(tmp_path):
    """bench/triton_sweep.py times every configuration in every loop form of each kernel (a small shape on a GPU,
    --smoke elsewhere), each run's outputs equal to the table's; --best gives the fastest, its form included;
    --modes narrows the forms."""
    import json
    import subprocess
    import sys

    script = bench_script("triton_sweep.py")
    out = tmp_path / "s.json"
    args = ["--B", "64", "--C", "3000", "--D", "64"] if torch.cuda.is_available() else ["--smoke"]
    proc = subprocess.run([sys.executable, script, *args, "--out", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = json.loads(out.read_text())
    assert all("ms" in r and "error" not in r for r in recs), [r for r in recs if "ms" not in r or "error" in r]
    assert all(r["max_rel_err"] <= 1e-4 for r in recs)
    forms = {("forward", m) for m in ("tiles", "flat", "tma", "ws")}
    assert {(r["kernel"], r["mode"]) for r in recs} == forms | {("backward_gemm", m) for m in
                                                                ("tiles", "persistent", "tma", "ws")}
    for kernel, mode in {(r["kernel"], r["mode"]) for r in recs}:  # the table's tiles first and again last
        group = [r for r in recs if (r["kernel"], r["mode"]) == (kernel, mode)]
        assert group[0].get("table") and group[-1].get("repeat") and sum("repeat" in r for r in group) == 1, group
    best = subprocess.run([sys.executable, script, "--best", str(out)], capture_output=True, text=True, timeout=60)
    assert best.returncode == 0, best.stderr[-3000:]
    tiles = json.loads(best.stdout)
    for kernel, kind in (("forward", "forward"), ("backward_gemm", "dlogits")):
        fastest = min((r for r in recs if r["kernel"] == kernel), key=lambda r: r["ms"])
        want = {k: fastest[k] for k in ("BLOCK_B", "BLOCK_C", "num_warps", "num_stages", "maxnreg") if k in fastest}
        if fastest["mode"] != "tiles":
            want["mode"] = fastest["mode"]
        assert tiles[kind] == want
    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, script, *args, "--modes", "ws", "--out", str(out)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert {(r["kernel"], r["mode"]) for r in json.loads(out.read_text())} == {("forward", "ws"),
                                                                                ("backward_gemm", "ws")}


def test_sweep_best_tiles_skips_errors_and_names_the_loop_form():
    import importlib.util as iu

    import torch as _torch

    spec = iu.spec_from_file_location("triton_sweep", bench_script("triton_sweep.py"))
    sweep = iu.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    recs = [dict(kernel="forward", mode="tiles", ms=2.0, BLOCK_B=128, BLOCK_C=128, BLOCK_K=64, num_warps=8,
                 num_stages=3, table=True),
            dict(kernel="forward", mode="ws", ms=0.5, BLOCK_B=128, BLOCK_C=128, num_warps=4, num_stages=3,
                 max_rel_err=0.3, error="outputs differ from the table's by 0.3 (relative)"),
            dict(kernel="forward", mode="flat", ms=1.0, BLOCK_B=64, BLOCK_C=64, num_warps=4, num_stages=4),
            dict(kernel="forward", mode="tiles", error="OutOfResources", BLOCK_B=256, BLOCK_C=128),
            dict(kernel="forward", mode="tiles", ms=1.5, BLOCK_B=64, BLOCK_C=128, num_warps=4, num_stages=3),
            dict(kernel="backward_gemm", mode="tiles", ms=3.0, BLOCK_B=64, BLOCK_C=128, num_warps=8, num_stages=3,
                 maxnreg=128)]
    assert sweep.best_tiles(recs) == {
        "forward": dict(BLOCK_B=64, BLOCK_C=64, num_warps=4, num_stages=4, mode="flat"),
        "dlogits": dict(BLOCK_B=64, BLOCK_C=128, num_warps=8, num_stages=3, maxnreg=128)}
    assert sweep.best_tiles([]) == {}
    ref = (_torch.tensor([1.0, -2.0]), _torch.empty(0))
    assert sweep.max_rel_err(ref, ref) == 0.0
    assert sweep.max_rel_err((_torch.tensor([1.0, -2.5]), _torch.empty(0)), ref) == 0.25


def test_approximate_ops_finds_the_approximate_instructions():
    """The compile test's check for approximate PTX (the target side's kernels must have none) can fail: it finds
    ex2.approx (tl.exp's lowering) and div.full (a plain '/'), and passes IEEE forms."""
    from mvloss.triton._compile_check import approximate_ops

    ptx = ("mul.f32 %f2, %f1, 0f3FB8AA3B;\n ex2.approx.f32 %f3, %f2;\n div.full.f32 %f4, %f3, %f1;\n"
           "ex2.approx.ftz.f32 %f5, %f4;\n div.rn.f32 %f6, %f5, %f1;\n sqrt.rn.f32 %f7, %f6;")
    assert approximate_ops(ptx) == ["div.full.f32", "ex2.approx.f32", "ex2.approx.ftz.f32"]
    assert approximate_ops("div.rn.f32 %f6, %f5, %f1;\n sqrt.rn.f32 %f7, %f6;") == []


def test_forward_register_cap_goes_to_the_timed_forms(monkeypatch):
    """The GPU table's half-precision 128 x 128 forward tile is capped at 128 registers in the tiles and tma forms
    (both timed capped on an H100), not in flat or ws, nor in fp32's or a small batch's tiles; a traced launch
    (torch.compile) drops the cap, which torch takes for a kernel argument."""
    from mvloss.triton import _config

    monkeypatch.setattr(_config, "interpreting", lambda: False)
    bf16 = torch.bfloat16
    for mode, capped in (("tiles", True), ("tma", True), ("flat", False), ("ws", False)):
        assert _config.forward_config(1024, 512, bf16, mode=mode).get("maxnreg") == (128 if capped else None), mode
    assert _config.forward_config(1024, 512, bf16, tma_runs=False, mode="ws")["maxnreg"] == 128  # pointer kernel
    assert _config.forward_config(1024, 512, torch.float16)["maxnreg"] == 128
    assert "maxnreg" not in _config.forward_config(1024, 512, torch.float32)
    assert "maxnreg" not in _config.forward_config(64, 512, bf16)
    cfg = _config.forward_config(1024, 512, bf16)
    assert _config.traceable(cfg) is cfg
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _config.traceable(cfg) == {k: v for k, v in cfg.items() if k != "maxnreg"} and "maxnreg" in cfg


def test_tile_override_parsing(tmp_path, monkeypatch):
    """MVLOSS_TRITON_TILES as JSON text or a file replaces only the tiles it names, and its "mode" the loop form;
    unknown kernels, keys and forms, and a BLOCK_C that would break the class splits' alignment, are ValueErrors
    naming them."""
    import json

    from mvloss.triton import _config

    table = _config.forward_config(1024, 512, torch.bfloat16)
    monkeypatch.setenv("MVLOSS_TRITON_TILES", '{"forward": {"BLOCK_B": 16, "num_stages": 2}}')
    got = _config.forward_config(1024, 512, torch.bfloat16)
    assert got == {**table, "BLOCK_B": 16, "num_stages": 2}
    assert _config.dlogits_config(1024, 512, torch.bfloat16) == _config._dlogits_table(1024, 512, torch.bfloat16)
    path = tmp_path / "tiles.json"
    path.write_text(json.dumps({"dlogits": {"BLOCK_C": 64, "maxnreg": 128}}))
    monkeypatch.setenv("MVLOSS_TRITON_TILES", str(path))
    assert _config.dlogits_config(1024, 512, torch.bfloat16)["BLOCK_C"] == 64
    monkeypatch.setenv("MVLOSS_TRITON_TILES",
                       '{"forward": {"BLOCK_B": 64, "mode": "tma"}, "dlogits": {"mode": "persistent"}}')
    monkeypatch.setenv("MVLOSS_TRITON_FORWARD", "flat")
    assert _config.forward_mode() == "tma" and _config.dlogits_mode() == "persistent"  # the override's form wins
    assert _config.forward_config(1024, 512, torch.bfloat16) == {**table, "BLOCK_B": 64}  # "mode" is not a tile
    for bad, word in (('{"dx": {}}', "dx"), ('{"forward": {"BLOCK_K": 32}}', "BLOCK_K"),
                      ('{"forward": {"BLOCK_C": 96}}', "BLOCK_C"), ('{"dlogits": {"mode": "flat"}}', "mode")):
        monkeypatch.setenv("MVLOSS_TRITON_TILES", bad)
        with pytest.raises(ValueError, match=word):
            _config.forward_config(1024, 512, torch.bfloat16)


@pytest.mark.parametrize("tiles", [
    {"forward": {"BLOCK_B": 16, "BLOCK_C": 128}, "dlogits": {"BLOCK_B": 64, "BLOCK_C": 32}},
    {"forward": {"mode": "ws"}, "dlogits": {"mode": "ws"}},
    {"forward": {"BLOCK_B": 64, "mode": "tma"}, "dlogits": {"BLOCK_C": 64, "mode": "tma"}}], ids=["tiles", "ws", "tma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_step_with_other_tiles_matches_reference(monkeypatch, tiles, dtype):
    """The kernels are correct with tiles and loop forms other than the table's (what the tune stage times):
    smaller and rectangular forward and recompute tiles, and the warp-specialised / TMA forms, through
    MVLOSS_TRITON_TILES, in a whole loss (bf16: on a GPU the forms' own kernels, 130 rows: two consumer groups)."""
    import json

    monkeypatch.setenv("MVLOSS_TRITON_TILES", json.dumps(tiles))
    kw = FAMILIES["mv_arc_adaptive"]
    x, w, y = inputs(kw, dtype, b=130, c=C_BIG, d=80)
    assert_matches_reference(x, w, y, "triton", label_smoothing=0.1, **kw)


def test_ncu_step_script_smoke():
    """bench/ncu_step.py (the step Nsight Compute profiles in gpu_session.sh's ncu stage) runs: a small shape on a
    GPU, --smoke elsewhere."""
    import subprocess
    import sys

    script = bench_script("ncu_step.py")
    args = ["--B", "64", "--C", "3000", "--D", "64"] if torch.cuda.is_available() else ["--smoke"]
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("profiled one step" if torch.cuda.is_available() else "step ok") in proc.stdout, proc.stdout


# --------------------------------------------------------------------------------------------- dispatch rules

def _spec(dtype=torch.float32, device=DEVICE):
    return dispatch.CallSpec(device=torch.device(device), dtype=dtype, batch=4, num_classes=10, dim=8,
                             has_bias=False, scale_requires_grad=False, bias_requires_grad=False)


def test_triton_declines_fp64():
    backend = dispatch.get("triton")
    assert "float64" in backend.cannot_run(_spec(torch.float64))
    x, w, y = make_inputs(4, 10, 8, torch.float64, device=DEVICE)
    with pytest.raises(RuntimeError, match="float64"):
        F.arcface_loss(x, w, y, backend="triton")


def test_triton_declines_more_classes_than_int32_indices():
    """Class indices are compared in int32 inside the kernels: 2**31 classes or more go elsewhere, with the reason."""
    import dataclasses

    backend = dispatch.get("triton")
    assert backend.cannot_run(dataclasses.replace(_spec(), num_classes=2**31 - 1)) is None
    assert "int32" in backend.cannot_run(dataclasses.replace(_spec(), num_classes=2**31))
    assert backend.cannot_run(dataclasses.replace(_spec(), num_classes=None)) is None  # traced: sizes unknown


def test_triton_cpu_rules(monkeypatch):
    """CPU tensors: only under TRITON_INTERPRET=1, and "auto" never picks the interpreter."""
    backend = dispatch.get("triton")
    assert dispatch.select("auto", _spec(device="cpu")).name != "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.cannot_run(_spec(device="cpu")) is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CUDA" in backend.cannot_run(_spec(device="cpu"))
    if not torch.cuda.is_available():
        assert "TRITON_INTERPRET=1" in backend.unavailable()
    assert any(b["name"] == "triton" for b in mvloss.backends())


_NO_TRITON_SCRIPT = r"""
import sys
import torch
sys.modules["triton"] = None  # "import triton" now fails, as without the package
import mvloss
from mvloss import functional as F
info = {b["name"]: b for b in mvloss.backends()}
assert not info["triton"]["available"] and "triton" in info["triton"]["reason"], info["triton"]
x, w, y = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, 3, 4])
F.arcface_loss(x, w, y)  # auto still works
try:
    F.arcface_loss(x, w, y, backend="triton")
except RuntimeError as e:
    assert "triton" in str(e)
else:
    raise AssertionError("backend='triton' ran without triton")
print("ok")
"""


def test_triton_missing_never_breaks_import():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _NO_TRITON_SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_triton_accepts_supported_dtypes():
    backend = dispatch.get("triton")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert backend.cannot_run(_spec(dtype)) is None


# ------------------------------------------------------------------------------------------------ GPU only

gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("family", ["arcface", "mv_am_fixed", "mv_arc_adaptive", "curricular", "insightface_filter",
                                    "facexzoo_mv_am", "label_smoothing", "unnormalized_x"])
def test_triton_bf16(family):
    kw = FAMILIES[family]
    x, w, y = inputs(kw, torch.bfloat16, c=C_BIG)
    assert_matches_reference(x, w, y, "triton", **kw)


@gpu
@pytest.mark.parametrize("family", ["arcface", "mv_arc_adaptive", "label_smoothing"])
def test_triton_gpu_fp16_fp32_big(family):
    kw = FAMILIES[family]
    for dtype in (torch.float32, torch.float16):
        x, w, y = inputs(kw, dtype, b=256, c=20011, d=128)
        assert_matches_reference(x, w, y, "triton", **kw)


@gpu
@pytest.mark.slow
def test_triton_autotune_path(monkeypatch):
    """MVLOSS_AUTOTUNE=1: triton.autotune over the larger configuration set gives the same numbers."""
    monkeypatch.setenv("MVLOSS_AUTOTUNE", "1")
    kw = FAMILIES["mv_arc_adaptive"]
    x, w, y = inputs(kw, torch.bfloat16, b=64, c=5003, d=128)
    assert_matches_reference(x, w, y, "triton", label_smoothing=0.1, **kw)


def _big_problem(dtype=torch.bfloat16, b=1024, c=1_000_000, d=512):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(b, d, device="cuda", generator=g).to(dtype)
    w = torch.randn(c, d, device="cuda", generator=g).to(dtype)
    y = torch.randint(0, c, (b,), device="cuda", generator=g)
    y[:7] = -100
    return x, w, y


@gpu
@pytest.mark.slow
def test_triton_one_million_classes_bf16_vs_chunked_fp32():
    x, w, y = _big_problem()
    kw = dict(m2=0.5, mv="adaptive", t=0.2, scale=32.0, label_smoothing=0.1)
    got = run(x, w, y, "triton", F.margin_softmax_loss, **kw)
    want = run(x.float(), w.float(), y, "chunked", F.margin_softmax_loss, **kw)
    del x, w
    for name, a, e in zip(("loss", "dx", "dW"), got, want):
        err = (a - e).abs().max().item()
        assert err <= REL_FLOOR[torch.bfloat16] * e.abs().max().item(), f"{name}: error {err:.3e}"


@gpu
def test_triton_opcheck():
    import mvloss.triton.ops  # noqa: F401  (registers the ops)

    x, w, y = make_inputs(37, 1003, 77, torch.bfloat16, ignore=(3,), device="cuda")
    for bias in (None, torch.randn(1003, device="cuda")):
        fwd = op_args(x, w, y, bias)
        torch.library.opcheck(torch.ops.mvloss.triton_neg_forward.default, fwd)
        _, _, lse = torch.ops.mvloss.triton_neg_forward(*fwd)
        bwd = bwd_args(fwd, lse)
        torch.library.opcheck(torch.ops.mvloss.triton_neg_backward.default, bwd)
        g_cos = torch.linspace(-1.0, 1.0, x.shape[0], device="cuda")
        torch.library.opcheck(torch.ops.mvloss.triton_neg_backward_w.default,
                              bwd[:11] + (g_cos,) + bwd[11:] + (True, 1e-12))
        # a training step without label smoothing: no logit sum, and no gradient of it (None)
        torch.library.opcheck(torch.ops.mvloss.triton_neg_forward.default, fwd + (False,))
        no_sum = bwd[:10] + (None,) + bwd[11:]
        torch.library.opcheck(torch.ops.mvloss.triton_neg_backward.default, no_sum)
        torch.library.opcheck(torch.ops.mvloss.triton_neg_backward_w.default,
                              no_sum[:11] + (g_cos,) + no_sum[11:] + (True, 1e-12))


@gpu
def test_triton_training_step_captures_in_a_cuda_graph():
    """An eager training step (forward and backward) captures in a CUDA graph -- no host sync in it besides the label
    check, which is skipped while capturing -- and each replay on new inputs equals an eager step."""
    b, c, d = 256, 20000, 128
    kw = dict(scale=32.0, margin=0.5, mv="adaptive", t=0.2, label_smoothing=0.1)
    x, w, y = make_inputs(b, c, d, torch.bfloat16, ignore=(3,), device="cuda")
    sx, sw, sy = x.clone().requires_grad_(True), w.clone().requires_grad_(True), y.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream: Triton compiles, cuBLAS picks its kernels
        for _ in range(2):
            sx.grad = sw.grad = None
            F.arcface_loss(sx, sw, sy, backend="triton", **kw).backward()
    torch.cuda.current_stream().wait_stream(side)
    sx.grad = sw.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = F.arcface_loss(sx, sw, sy, backend="triton", **kw)
        static_loss.backward()
    for seed in (1, 2):
        x2, w2, y2 = make_inputs(b, c, d, torch.bfloat16, ignore=(5,), seed=seed, device="cuda")
        with torch.no_grad():
            sx.copy_(x2)
            sw.copy_(w2)
            sy.copy_(y2)
        graph.replay()
        xe, we = x2.clone().requires_grad_(True), w2.clone().requires_grad_(True)
        loss = F.arcface_loss(xe, we, y2, backend="triton", **kw)
        loss.backward()
        torch.cuda.synchronize()
        # the gradients are bf16: cuBLAS may pick another algorithm inside the graph, an ulp of the largest entry
        for got, want, tol in ((static_loss, loss.detach(), 1e-4), (sx.grad, xe.grad, 1e-2), (sw.grad, we.grad, 1e-2)):
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=tol * want.abs().max().item())


@gpu
@pytest.mark.slow
@pytest.mark.parametrize("workspace,forms", [(None, "default"), (64 * 1024, "default"), (None, "ws"),
                                             (64 * 1024, "fused_dw")])
def test_triton_compile_fullgraph_training_step(workspace, forms, monkeypatch):
    """Compiled against eager, with one class chunk and with five (the per-chunk writes into dW under Inductor), and
    with the warp-specialised forms asked for (eager runs them; the compiled graph takes the pointer kernels), and
    with the fused dW GEMM over five chunks (MVLOSS_TRITON_DW_GEMM=fused: its launches traced inside the op)."""
    if workspace:
        monkeypatch.setenv("MVLOSS_TRITON_WORKSPACE_ELEMS", str(workspace))
    if forms == "fused_dw":
        monkeypatch.setenv("MVLOSS_TRITON_DW_GEMM", "fused")
    if forms == "ws":
        monkeypatch.setenv("MVLOSS_TRITON_FORWARD", "ws")
        monkeypatch.setenv("MVLOSS_TRITON_DLOGITS", "ws")
    torch._dynamo.reset()  # the chunking is read while tracing: no graph cached from the other case
    b = 130 if forms == "ws" else 64  # ws splits its rows between two consumer groups from 65 rows up
    x, w, y = make_inputs(b, 5000, 128, torch.bfloat16, ignore=(2,), device="cuda")

    def loss_fn(x, w, y):
        return F.arcface_loss(x, w, y, backend="triton", mv="adaptive", t=0.2, label_smoothing=0.1)

    compiled = torch.compile(loss_fn, fullgraph=True)
    grads = []
    for fn in (compiled, loss_fn):
        xb, wb = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = fn(xb, wb, y)
        loss.backward()
        grads.append((loss.detach().float(), xb.grad.float(), wb.grad.float()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-3 * b.abs().max().item())


@gpu
@pytest.mark.slow
def test_triton_peak_memory_independent_of_b_times_c():
    """At B=1024, C=1M, D=512 (B x C fp32 would be 4 GB) each op allocates < 256 MB besides its outputs."""
    import mvloss.triton.ops  # noqa: F401

    x, w, y = _big_problem()
    fwd = op_args(x, w, y)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _, _, lse = torch.ops.mvloss.triton_neg_forward(*fwd)
    torch.cuda.synchronize()
    extra_fwd = torch.cuda.max_memory_allocated() - base
    assert extra_fwd < 256 * 2**20, f"forward peak extra {extra_fwd / 2**20:.1f} MB"

    bwd = bwd_args(fwd, lse)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    dxhat, dwhat, _, _ = torch.ops.mvloss.triton_neg_backward(*bwd)
    torch.cuda.synchronize()
    outputs = dxhat.numel() * dxhat.element_size() + dwhat.numel() * dwhat.element_size()
    extra_bwd = torch.cuda.max_memory_allocated() - base - outputs
    assert extra_bwd < 256 * 2**20, f"backward peak extra (beyond dxhat, dwhat) {extra_bwd / 2**20:.1f} MB"
    del dxhat, dwhat

    # what a training step runs: dW finished per chunk, in W's dtype (no C x D fp32 dwhat at all)
    wargs = bwd[:11] + (torch.ones(x.shape[0], device="cuda"),) + bwd[11:] + (True, 1e-12)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    dxhat, dw, _, _ = torch.ops.mvloss.triton_neg_backward_w(*wargs)
    torch.cuda.synchronize()
    assert dw.dtype == w.dtype
    outputs = dxhat.numel() * dxhat.element_size() + dw.numel() * dw.element_size()
    extra_w = torch.cuda.max_memory_allocated() - base - outputs
    assert extra_w < 256 * 2**20, f"fused backward peak extra (beyond dxhat, dW) {extra_w / 2**20:.1f} MB"


@gpu
@pytest.mark.slow
def test_triton_int64_offsets():
    """C x D > 2^31 elements: every offset is 64-bit.  Compared with the chunked backend on the same inputs."""
    from mvloss.backends import chunked
    from mvloss.triton import backward, forward

    b, c, d = 4, (1 << 22) + 5, 520
    assert c * d > 2**31
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(b, d, device="cuda", generator=g).to(torch.bfloat16)
    w = torch.empty(c, d, device="cuda", dtype=torch.bfloat16).normal_(generator=g)
    labels = torch.tensor([c - 1, 0, c // 2, -1], device="cuda")
    x[0] = w[c - 1]  # the last rows matter: row 0's target is the last class
    args = (x, w, inverse_norms(x, 1e-12), inverse_norms(w, 1e-12), labels, torch.full((b,), 0.2, device="cuda"),
            torch.full((b,), 30.0, device="cuda"), None, int(Treatment.ADAPTIVE), 0.2, False)
    got = forward(*args)
    want = chunked.forward(*args)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-3)
    g_lse = torch.ones(b, device="cuda")
    g_sum = torch.zeros(b, device="cuda")
    dx, dw, _, _ = backward(*args[:8], want[0], g_lse, g_sum, *args[8:], False, False)
    dx_ref, dw_ref, _, _ = chunked.backward(*args[:8], want[0], g_lse, g_sum, *args[8:], False, False)
    torch.testing.assert_close(dx, dx_ref, rtol=2e-2, atol=2e-2 * dx_ref.abs().max().item())
    for rows in (slice(0, 64), slice(c - 64, c)):
        torch.testing.assert_close(dw[rows], dw_ref[rows], rtol=2e-2, atol=2e-2 * dw_ref.abs().max().item())


@gpu
def test_triton_deterministic():
    import mvloss.triton.ops  # noqa: F401

    x, w, y = make_inputs(64, 30011, 256, torch.bfloat16, ignore=(3,), device="cuda")
    fwd = op_args(x, w, y, torch.randn(30011, device="cuda"))
    outs = []
    for _ in range(3):
        fwd_out = torch.ops.mvloss.triton_neg_forward(*fwd)
        outs.append(tuple(fwd_out) + tuple(torch.ops.mvloss.triton_neg_backward(*bwd_args(fwd, fwd_out[2]))))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_dw_side_stream_same_bits(monkeypatch, dtype):
    """MVLOSS_TRITON_DW_STREAM=1 (each chunk's normalisation backward of dW on a second stream) gives the default
    step's bits over eight class chunks, eager and replayed from a CUDA graph, and a few steps later the same again
    (the side stream's chunk buffers are not reused too early)."""
    monkeypatch.setenv("MVLOSS_TRITON_WORKSPACE_ELEMS", str(256 * 2048))  # 2048 classes a chunk: 8 chunks
    kw = dict(scale=32.0, margin=0.5, mv="adaptive", t=0.2)
    x, w, y = make_inputs(256, 16000, 128, dtype, ignore=(3,), device="cuda")

    def step(sx, sw):
        sx.grad = sw.grad = None
        F.arcface_loss(sx, sw, y, backend="triton", **kw).backward()
        return sx.grad, sw.grad

    grads = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("MVLOSS_TRITON_DW_STREAM", flag)
        sx, sw = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        grads[flag] = [tuple(g.clone() for g in step(sx, sw)) for _ in range(3)]
    for a, b in zip(grads["0"], grads["1"]):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    sx, sw = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(sx, sw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    sx.grad = sw.grad = None
    with torch.cuda.graph(graph):
        F.arcface_loss(sx, sw, y, backend="triton", **kw).backward()
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        # cuBLAS may pick another algorithm inside the graph: an ulp of the largest entry, as the capture test
        for got, want in ((sx.grad, grads["0"][0][0]), (sw.grad, grads["0"][0][1])):
            torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=1e-2 * want.abs().max().item())


@gpu
@pytest.mark.slow
def test_triton_no_memory_growth_over_1000_steps():
    x, w, y = make_inputs(256, 10000, 128, torch.bfloat16, ignore=(3,), device="cuda")
    w = w.requires_grad_(True)
    xb = x.requires_grad_(True)
    opt = torch.optim.SGD([w, xb], lr=1e-3)
    after = {}
    for step in range(1000):
        opt.zero_grad(set_to_none=True)
        F.arcface_loss(xb, w, y, backend="triton", mv="adaptive", t=0.2).backward()
        opt.step()
        if step in (10, 999):
            torch.cuda.synchronize()
            after[step] = torch.cuda.memory_allocated()
    assert after[999] <= after[10]


def test_triton_env_vars_documented():
    readme = os.path.join(os.path.dirname(mvloss.__file__), "triton", "README.md")
    text = open(readme).read()
    for var in ("MVLOSS_AUTOTUNE", "TRITON_INTERPRET", "MVLOSS_TRITON_SPLITS", "MVLOSS_TRITON_BACKWARD",
                "MVLOSS_TRITON_WORKSPACE_ELEMS", "MVLOSS_TRITON_FP32_PRECISION", "MVLOSS_TRITON_PROGRAMS",
                "MVLOSS_TRITON_FORWARD", "MVLOSS_TRITON_DLOGITS", "MVLOSS_TRITON_DW_STREAM", "MVLOSS_TRITON_DW_GEMM",
                "MVLOSS_TRITON_OPAQUE", "MVLOSS_TRITON_TILES", "MVLOSS_TRITON_MASKED"):
        assert var in text


def test_triton_fp32_precision_follows_torch_unless_set(monkeypatch):
    """fp32 inputs: exact products by default, TF32 when PyTorch's fp32 GEMMs may use it (as the cuBLAS GEMMs of the
    cuda backend do), the environment variable over both."""
    from mvloss.triton import _config

    monkeypatch.delenv("MVLOSS_TRITON_FP32_PRECISION", raising=False)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert _config.fp32_precision() == "ieee"
        torch.set_float32_matmul_precision("high")
        assert _config.fp32_precision() == "tf32"
        monkeypatch.setenv("MVLOSS_TRITON_FP32_PRECISION", "tf32x3")
        assert _config.fp32_precision() == "tf32x3"
    finally:
        torch.set_float32_matmul_precision(old)


@pytest.mark.parametrize("var", ["MVLOSS_TRITON_BACKWARD", "MVLOSS_TRITON_FP32_PRECISION", "MVLOSS_TRITON_FORWARD",
                                 "MVLOSS_TRITON_DLOGITS"])
def test_triton_bad_env_values_raise(monkeypatch, var):
    """A misspelt choice in an environment variable is a clear ValueError naming it, not a silent default."""
    from mvloss.triton import _config

    read = {"MVLOSS_TRITON_BACKWARD": _config.backward_mode, "MVLOSS_TRITON_FP32_PRECISION": _config.fp32_precision,
            "MVLOSS_TRITON_FORWARD": _config.forward_mode, "MVLOSS_TRITON_DLOGITS": _config.dlogits_mode}[var]
    monkeypatch.setenv(var, "fastest")
    with pytest.raises(ValueError, match=var):
        read()
