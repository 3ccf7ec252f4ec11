"""The per-row target side around the negatives pass in three launches: the mask thresholds, the loss, its backward.

``mvloss.loss`` forms thr_i = f(cos_y) before the negatives pass and, after it, z_y = s f(cos_y), -log p_y =
softplus(lse_neg - z_y), the ignored rows and the reduction: about 33 PyTorch ops forward and 24 backward, each a
launch on a GPU, for O(B) numbers (at C ~ 100k an eager step is bound by its launches). On eager CUDA tensors and for
the configurations ``supports`` accepts (m1 = 1, a number scale, no bias, focal, hard mining, label smoothing or
CurricularFace) these kernels do the same, f'(cos_y) written out from ``mvloss.margins``; they are checked against
that PyTorch path in the tests, which stays the definition.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from . import _config
from ._ieee_math import exp_neg, log1p_small

BLOCK = 1024  # rows per program; the loss kernel is one program looping over the batch (a deterministic sum)
_FALLBACK = {"none": 0, "insightface": 1, "easy": 2}
_REDUCTION = {"none": 0, "sum": 1, "mean": 2}


@triton.jit
def margin_f(c, cos_m, sin_m, th, mm, m3, ARC: tl.constexpr, FALLBACK: tl.constexpr, HAS_M3: tl.constexpr,
             M3_POSITIVE: tl.constexpr, STRAIGHT: tl.constexpr):
    """(f(c), f'(c)) of ``margins.margin_target`` for m1 = 1: cos(theta + m2) (with FALLBACK 0 none, 1 insightface:
    c - sin(pi - m2) m2 where theta + m2 > pi, 2 easy: c where c <= 0), minus m3 (only where c > m3 with
    M3_POSITIVE); STRAIGHT: the gradient of f is that of c."""
    f = c
    d = tl.full(c.shape, 1.0, tl.float32)
    if ARC:
        v = 1.0 - c * c
        # margins.safe_sqrt (fp32's smallest normal number); IEEE sqrt and division as PyTorch's (tl.sqrt and / are
        # approximate on a GPU), since sin(theta) and f' grow an ulp's error near |cos| = 1
        sq = tl.sqrt_rn(tl.maximum(v, 1.1754943508222875e-38))
        ctm = c * cos_m - sq * sin_m
        # clamp_min passes v >= tiny
        dctm = tl.where(v >= 1.1754943508222875e-38, cos_m + tl.div_rn(c * sin_m, sq), cos_m)
        if FALLBACK == 1:
            keep = c > th
            f = tl.where(keep, ctm, c - mm)
            d = tl.where(keep, dctm, 1.0)
        elif FALLBACK == 2:
            keep = c > 0.0
            f = tl.where(keep, ctm, c)
            d = tl.where(keep, dctm, 1.0)
        else:
            f = ctm
            d = dctm
    if HAS_M3:
        if M3_POSITIVE:
            f = tl.where(c > m3, f - m3, f)
        else:
            f = f - m3
    if STRAIGHT:
        d = tl.full(c.shape, 1.0, tl.float32)
    return f, d


@triton.jit
def clamped(c, CLAMP: tl.constexpr, CLAMP_AT_BOUNDS: tl.constexpr):
    """(the cosine as the margins see it, the gradient of that clamp): ``margins.clamp_cos``.  Whether the
    gradient passes at |c| = 1 itself is PyTorch's choice, which changed between releases (CLAMP_AT_BOUNDS)."""
    if CLAMP:
        if CLAMP_AT_BOUNDS:
            inside = (c >= -1.0) & (c <= 1.0)
        else:
            inside = (c > -1.0) & (c < 1.0)
        return tl.minimum(tl.maximum(c, -1.0), 1.0), tl.where(inside, 1.0, 0.0)
    return c, tl.full(c.shape, 1.0, tl.float32)


@triton.jit
def thresholds_kernel(cos_ptr, thr_ptr, B, cos_m, sin_m, th, mm, m3, CLAMP: tl.constexpr,
                      CLAMP_AT_BOUNDS: tl.constexpr, ARC: tl.constexpr, FALLBACK: tl.constexpr,
                      HAS_M3: tl.constexpr, M3_POSITIVE: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < B
    c, _ = clamped(tl.load(cos_ptr + rows, mask=mask, other=0.0), CLAMP, CLAMP_AT_BOUNDS)
    f, _ = margin_f(c, cos_m, sin_m, th, mm, m3, ARC, FALLBACK, HAS_M3, M3_POSITIVE, False)
    tl.store(thr_ptr + rows, f, mask=mask)


@triton.jit
def softplus40(t):
    """(softplus(t), its derivative sigmoid(t)) within a few ulps of PyTorch's (threshold 40: t itself above, which
    max(t, 0) + log1p(e^-|t|) gives exactly in fp32) with no hardware approximation (exp_neg, log1p_small), so a GPU
    computes what the interpreter does: the target row's loss and gradient carry s-sized arguments.  NaN stays NaN."""
    e = exp_neg(tl.abs(t))
    sp = tl.maximum(t, 0.0) + log1p_small(e)
    sig = tl.div_rn(tl.where(t >= 0.0, 1.0, e), 1.0 + e)
    return tl.where(t == t, sp, t), tl.where(t == t, sig, t)


@triton.jit
def loss_kernel(cos_ptr, lse_ptr, labels_ptr, row_ptr, out_ptr, count_ptr, B, ignore_index, scale, cos_m, sin_m,
                th, mm, m3, CLAMP: tl.constexpr, CLAMP_AT_BOUNDS: tl.constexpr, ARC: tl.constexpr,
                FALLBACK: tl.constexpr, HAS_M3: tl.constexpr, M3_POSITIVE: tl.constexpr, REDUCTION: tl.constexpr,
                BLOCK: tl.constexpr):
    """One program: per row -log p_y = softplus(lse_neg - s f(cos_y)), 0 where the label is ignore_index; the rows'
    losses (REDUCTION 0), or their sum (1) or mean over the counted rows (2) into out, and that count."""
    total = tl.zeros((BLOCK,), tl.float32)
    count = tl.zeros((BLOCK,), tl.int32)
    for r0 in range(0, B, BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        mask = rows < B
        valid = mask & (tl.load(labels_ptr + rows, mask=mask, other=ignore_index) != ignore_index)
        c, _ = clamped(tl.load(cos_ptr + rows, mask=mask, other=0.0), CLAMP, CLAMP_AT_BOUNDS)
        f, _ = margin_f(c, cos_m, sin_m, th, mm, m3, ARC, FALLBACK, HAS_M3, M3_POSITIVE, False)
        nll, _ = softplus40(tl.load(lse_ptr + rows, mask=mask, other=0.0) - scale * f)
        nll = tl.where(valid, nll, 0.0)
        if REDUCTION == 0:
            tl.store(row_ptr + rows, nll, mask=mask)
        total += nll
        count += valid.to(tl.int32)
    n = tl.sum(count, axis=0)
    tl.store(count_ptr, n)
    if REDUCTION == 1:
        tl.store(out_ptr, tl.sum(total, axis=0))
    if REDUCTION == 2:
        tl.store(out_ptr, tl.div_rn(tl.sum(total, axis=0), tl.maximum(n, 1).to(tl.float32)))


@triton.jit
def loss_backward_kernel(cos_ptr, lse_ptr, labels_ptr, count_ptr, g_ptr, g_cos_ptr, g_lse_ptr, B, ignore_index,
                         scale, cos_m, sin_m, th, mm, m3, CLAMP: tl.constexpr, CLAMP_AT_BOUNDS: tl.constexpr,
                         ARC: tl.constexpr, FALLBACK: tl.constexpr, HAS_M3: tl.constexpr,
                         M3_POSITIVE: tl.constexpr, STRAIGHT: tl.constexpr, REDUCTION: tl.constexpr,
                         BLOCK: tl.constexpr):
    """The gradients of loss_kernel's output w.r.t. the raw target cosine and lse_neg, per row."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < B
    valid = mask & (tl.load(labels_ptr + rows, mask=mask, other=ignore_index) != ignore_index)
    if REDUCTION == 0:
        g = tl.load(g_ptr + rows, mask=mask, other=0.0)
    elif REDUCTION == 1:
        g = tl.load(g_ptr)
    else:
        g = tl.div_rn(tl.load(g_ptr), tl.maximum(tl.load(count_ptr), 1).to(tl.float32))
    c, dclamp = clamped(tl.load(cos_ptr + rows, mask=mask, other=0.0), CLAMP, CLAMP_AT_BOUNDS)
    f, df = margin_f(c, cos_m, sin_m, th, mm, m3, ARC, FALLBACK, HAS_M3, M3_POSITIVE, STRAIGHT)
    _, sig = softplus40(tl.load(lse_ptr + rows, mask=mask, other=0.0) - scale * f)
    g_lse = tl.where(valid, g * sig, 0.0)
    tl.store(g_lse_ptr + rows, g_lse, mask=mask)
    tl.store(g_cos_ptr + rows, -(g_lse * scale) * df * dclamp, mask=mask)


def supports(cfg, x: torch.Tensor, bias) -> bool:
    """Whether these kernels compute ``cfg``'s target side for the fp32-math inputs ``x``."""
    return (x.dtype != torch.float64 and cfg.m1 == 1.0 and bias is None and not isinstance(cfg.scale, torch.Tensor)
            and cfg.mv != "curricular" and cfg.focal_gamma == 0 and cfg.hard_ratio >= 1.0
            and cfg.label_smoothing == 0)


@functools.lru_cache(maxsize=None)
def _clamp_grad_at_bounds() -> bool:
    """Whether this PyTorch's clamp passes the gradient at the bounds themselves (2.11 does, 2.14 does not)."""
    with torch.enable_grad():  # first called inside an autograd.Function's forward
        c = torch.ones(1, requires_grad=True)
        (g,) = torch.autograd.grad(c.clamp(-1.0, 1.0).sum(), c)
    return bool(g[0] == 1.0)


def _margin_args(cfg, with_fallbacks: bool) -> tuple[tuple, dict]:
    """(cos m2, sin m2, cos(pi - m2), sin(pi - m2) m2, m3) and the margin's constexprs, as ``margins`` forms them."""
    m2, m3 = float(cfg.m2), float(cfg.m3)
    args = (math.cos(m2), math.sin(m2), math.cos(math.pi - m2), math.sin(math.pi - m2) * m2, m3)
    meta = dict(ARC=m2 != 0.0, FALLBACK=_FALLBACK[cfg.arc_fallback] if with_fallbacks else 0, HAS_M3=m3 != 0.0,
                M3_POSITIVE=with_fallbacks and cfg.cosface_fallback == "positive", CLAMP=bool(cfg.clamp_cos),
                CLAMP_AT_BOUNDS=_clamp_grad_at_bounds())
    return args, meta


def thresholds(cos_y: torch.Tensor, cfg) -> torch.Tensor:
    """thr_i of the MV mask from the target cosines (``loss.mask_thresholds`` for a margin threshold)."""
    B = cos_y.shape[0]
    thr = torch.empty(B, dtype=torch.float32, device=cos_y.device)
    if B:
        args, meta = _margin_args(cfg, cfg.mask_threshold != "raw")
        thresholds_kernel[(_config.cdiv(B, BLOCK),)](cos_y, thr, B, *args, BLOCK=BLOCK, **meta)
    return thr


class TargetLossFunction(torch.autograd.Function):
    """The loss from the negatives pass's (lse_neg, cos_y): differentiable in both, fp32."""

    @staticmethod
    def forward(ctx, cos_y, lse_neg, labels, cfg):
        B = cos_y.shape[0]
        cos_y, lse_neg, labels = cos_y.float().contiguous(), lse_neg.float().contiguous(), labels.contiguous()
        args, meta = _margin_args(cfg, True)
        red = _REDUCTION[cfg.reduction]
        per_row = torch.empty(B if red == 0 else 0, dtype=torch.float32, device=cos_y.device)
        out = torch.empty((), dtype=torch.float32, device=cos_y.device)
        count = torch.empty(1, dtype=torch.int32, device=cos_y.device)
        loss_kernel[(1,)](cos_y, lse_neg, labels, per_row, out, count, B, int(cfg.ignore_index), float(cfg.scale),
                          *args, REDUCTION=red, BLOCK=BLOCK, **meta)
        ctx.save_for_backward(cos_y, lse_neg, labels, count)
        ctx.launch = (int(cfg.ignore_index), float(cfg.scale), args, dict(meta, REDUCTION=red),
                      cfg.target_grad == "straight_through")
        return per_row if red == 0 else out

    @staticmethod
    def backward(ctx, g):
        cos_y, lse_neg, labels, count = ctx.saved_tensors
        ignore_index, scale, args, meta, straight = ctx.launch
        B = cos_y.shape[0]
        g_cos, g_lse = torch.empty_like(cos_y), torch.empty_like(cos_y)
        if B:
            loss_backward_kernel[(_config.cdiv(B, BLOCK),)](
                cos_y, lse_neg, labels, count, g.float().contiguous(), g_cos, g_lse, B, ignore_index, scale, *args,
                STRAIGHT=straight, BLOCK=BLOCK, **meta)
        return g_cos, g_lse, None, None
