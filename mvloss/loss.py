"""The loss, assembled: validation, the per-row pre-pass, a backend's negatives pass, and the per-row finish.

pre-pass  (O(B*D), PyTorch autograd): cos_y, the target logit z_y = s f(cos_y) (+ b_y) and the mask threshold thr_i
negatives (O(B*C*D), a backend):      lse_i and zsum_i over k != y_i       (see mvloss.negatives)
finish    (O(B), PyTorch autograd):    -log p_y = softplus(lse_neg - z_y), label smoothing, focal, hard mining,
                                      reduction
On eager CUDA tensors the O(B) parts run as a few Triton kernels where they can (``target_kernels``, ``autograd``'s
glue); the PyTorch ops here define them.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from . import autograd, dispatch, margins
from ._validate import check_inputs
from .autograd import NegativesFunction, target_rows
from .config import LossConfig
from .negatives import compute_dtype


def _scale_vector(scale, n: int, like: torch.Tensor) -> torch.Tensor:
    """The scale per row, (n,) in the compute dtype: from a number (one fill on the device; torch.tensor would copy
    from pageable host memory, a stall on every CUDA step) or from a 0-d tensor (with its graph)."""
    s = scale_of(scale, like)
    if isinstance(s, torch.Tensor):
        return s.expand(n).contiguous()
    return torch.full((n,), s, device=like.device, dtype=compute_dtype(like))


def update_tau(cfg: LossConfig, cos_y: torch.Tensor, valid: torch.Tensor) -> None:
    """CurricularFace's EMA of the mean target cosine, updated in place before use (as FaceX-Zoo does)."""
    if cfg.mv != "curricular" or cfg.tau_momentum <= 0 or not isinstance(cfg.t, torch.Tensor):
        return
    with torch.no_grad():
        n = valid.sum()
        mean = torch.where(n > 0, (cos_y * valid).sum() / n.clamp_min(1), cfg.t.reshape(()).to(cos_y.dtype))
        cfg.t.mul_(1.0 - cfg.tau_momentum).add_(cfg.tau_momentum * mean.to(cfg.t.dtype))


def target_side(x, weight, labels, cfg: LossConfig, bias: Optional[torch.Tensor], kernels=None):
    """The pre-pass, without a graph (the negatives pass returns cos_y with its gradient):
    (valid, safe_labels, thr, target) where target = (x-hat, w-hat_y, raw cos_y with 0 on ignored rows), handed to
    the negatives pass so it does not gather and normalise the rows again.  ``kernels``: ``target_kernels``."""
    valid = labels != cfg.ignore_index
    safe_labels = torch.where(valid, labels, 0).long()
    target = target_rows_of(x, weight, safe_labels, valid, cfg)
    return valid, safe_labels, mask_thresholds(margins.clamp_cos(target[2], cfg), valid, cfg, kernels), target


def target_kernels(x, cfg: LossConfig, bias: Optional[torch.Tensor]):
    """``mvloss.triton.target_loss`` when its kernels compute this call's per-row target side (eager CUDA tensors,
    a configuration it supports: three launches instead of about sixty ops), else None.  MVLOSS_TARGET_KERNELS=0:
    the PyTorch ops always."""
    if not autograd.triton_glue(x) or os.environ.get("MVLOSS_TARGET_KERNELS", "1") == "0":
        return None
    part = autograd.triton_part("target_loss")
    return part if part is not None and part.supports(cfg, x, bias) else None


def target_rows_of(x, weight, safe_labels, has, cfg: LossConfig):
    """Without a graph: (x-hat, w-hat at safe_labels, the raw cosine x-hat . w-hat where ``has``, else 0); on eager
    CUDA tensors one Triton kernel (``mvloss.triton.target_rows``) instead of a dozen PyTorch ops."""
    with torch.no_grad():
        dt = compute_dtype(x)
        if dt == torch.float32 and autograd.triton_glue(x):
            part = autograd.triton_part("target_rows")
            if part is not None and part.supports(x.shape[1]):
                return part.target_rows(x, weight, safe_labels, has, cfg.normalize_x, cfg.normalize_w, cfg.eps)
        xhat, what_y = target_rows(x, weight, safe_labels, cfg.normalize_x, cfg.normalize_w, cfg.eps, dt)
        return xhat, what_y, torch.where(has, (xhat * what_y).sum(1), 0.0)


def mask_thresholds(cos_y: torch.Tensor, valid: torch.Tensor, cfg: LossConfig, kernels=None) -> torch.Tensor:
    """Moves CurricularFace's tau (once per call), then thr_i of the negatives' mask (detached); a margin threshold
    by one launch with ``kernels`` (``target_kernels``)."""
    cos_y = cos_y.detach()
    update_tau(cfg, cos_y, valid)
    if cfg.interclass_filtering_threshold > 0:
        return torch.full_like(cos_y, cfg.interclass_filtering_threshold)
    if cfg.mv == "none":
        return torch.full_like(cos_y, math.inf)
    if kernels is not None:
        return kernels.thresholds(cos_y, cfg)
    return margins.mask_threshold(cos_y, margins.margin_target(cos_y, cfg), cfg)


def scale_of(scale, like: torch.Tensor):
    """The scale s (cfg.scale): a number, or a 0-d tensor in the compute dtype (with its graph) when it is a tensor."""
    if isinstance(scale, torch.Tensor):
        return scale.to(device=like.device, dtype=compute_dtype(like)).reshape(())
    return float(scale)  # a Python number multiplies without a tensor of its own (a launch on a GPU)


def target_logits(cos_y: torch.Tensor, cfg: LossConfig, like: torch.Tensor):
    """From the target cosines (with their graph): (z_y = s f(cos_y), the scale as ``scale_of`` gives it)."""
    scale = scale_of(cfg.scale, like)
    return scale * margins.margin_target(cos_y, cfg), scale


def select_backend(x, weight, cfg: LossConfig, bias, backend: str) -> dispatch.Backend:
    scale_grad = isinstance(cfg.scale, torch.Tensor) and cfg.scale.requires_grad
    spec = dispatch.CallSpec(device=x.device, dtype=x.dtype, batch=x.shape[0], num_classes=weight.shape[0],
                             dim=x.shape[1], has_bias=bias is not None, scale_requires_grad=scale_grad,
                             bias_requires_grad=bias is not None and bias.requires_grad)
    return dispatch.select(backend, spec)


def negatives_pass(chosen: dispatch.Backend, x, weight, bias, neg_labels, thr, scale, cfg: LossConfig, target):
    """(lse_neg, zsum_neg, cos_y) over every class k != neg_labels_i (-1: none excluded) with a fused backend
    (zsum_neg only with label smoothing, its one reader: 0 otherwise); cos_y is the raw target cosine (0 where
    neg_labels is -1), differentiable.  ``target``: the pre-pass's (x-hat, w-hat_y, cos_y) for these labels
    (``target_rows_of``).  ``scale``: a number or a 0-d tensor."""
    scale_vec = _scale_vector(scale, x.shape[0], x)
    return NegativesFunction.apply(
        x, weight, scale_vec, bias, neg_labels.long().contiguous(), thr.to(scale_vec.dtype).contiguous(), *target,
        chosen, cfg.treatment, cfg.treatment_param(), cfg.clamp_cos, cfg.normalize_x, cfg.normalize_w, cfg.eps,
        cfg.chunk_size, cfg.label_smoothing > 0)


def negatives_nll(lse_neg: torch.Tensor, z_y: torch.Tensor) -> torch.Tensor:
    """-log p_y = logaddexp(lse_neg, z_y) - z_y, as one softplus of lse_neg - z_y: one op forward and one backward
    (the logaddexp and the difference take two and nine; each is a launch on a GPU).  Exact to rounding: the
    threshold above which softplus(t) returns t is 40, where log1p(exp(-t)) is below half an ulp of t in fp32 and
    fp64 (PyTorch's default of 20 is not, in fp64).  lse_neg = -inf (no negatives) gives 0."""
    return torch.nn.functional.softplus(lse_neg.to(z_y.dtype) - z_y, threshold=40.0)


def finish(nll: torch.Tensor, lse: Optional[torch.Tensor], zsum_all: Optional[torch.Tensor], valid: torch.Tensor,
           num_classes: int, cfg: LossConfig) -> torch.Tensor:
    """Per-row loss from -log p_y (and, read only with label smoothing, the full log-sum-exp lse and the logit sum),
    then focal / hard mining / reduction (O(B))."""
    per_row = nll
    if cfg.label_smoothing > 0:
        eps = cfg.label_smoothing
        per_row = (1.0 - eps) * nll + eps * (lse - zsum_all / num_classes)
    if cfg.focal_gamma > 0:
        p_y = torch.exp(-nll)
        per_row = (1.0 - p_y).clamp_min(0.0) ** cfg.focal_gamma * per_row
    per_row = torch.where(valid, per_row, 0.0)
    count = valid.sum()
    if cfg.hard_ratio < 1.0:
        keep = hard_rows(per_row.detach(), valid, cfg.hard_ratio)
        per_row = torch.where(keep, per_row, 0.0)
        count = keep.sum()
    if cfg.reduction == "none":
        return per_row
    total = per_row.sum()
    if cfg.reduction == "sum":
        return total
    # All rows ignored: 0 with zero gradients, not NaN (a NaN poisons a whole distributed step).
    return total / count.clamp_min(1)  # an integer count: the division promotes to total's dtype


def hard_rows(per_row: torch.Tensor, valid: torch.Tensor, ratio: float) -> torch.Tensor:
    """HM-Softmax: the ceil(ratio * n_valid) rows with the largest loss."""
    n_valid = valid.sum()
    k = torch.ceil(n_valid.to(torch.float64) * ratio).long()
    ranked = torch.where(valid, per_row, -math.inf)
    order = torch.argsort(ranked, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return valid & (rank < k)


def margin_softmax_loss(x, weight, labels, cfg: LossConfig, bias=None, backend: str = "auto") -> torch.Tensor:
    labels = check_inputs(x, weight, labels, cfg.ignore_index, bias)
    chosen = select_backend(x, weight, cfg, bias, backend)
    if not chosen.fused:
        from . import reference
        return reference.loss_of_checked(x, weight, labels, cfg, bias)
    kernels = target_kernels(x, cfg, bias)
    valid, safe_labels, thr, target = target_side(x, weight, labels, cfg, bias, kernels)
    neg_labels = torch.where(valid, labels, -1)
    lse_neg, zsum_neg, cos_y = negatives_pass(chosen, x, weight, bias, neg_labels, thr, cfg.scale, cfg, target)
    if kernels is not None:
        return kernels.TargetLossFunction.apply(cos_y, lse_neg, labels, cfg)
    z_y, _ = target_logits(margins.clamp_cos(cos_y, cfg), cfg, x)
    if bias is not None:
        z_y = z_y + bias[safe_labels].to(z_y.dtype)
    nll = negatives_nll(lse_neg, z_y)
    lse = zsum = None  # only label smoothing reads the full log-sum-exp and the logit sum
    if cfg.label_smoothing > 0:
        lse, zsum = z_y + nll, zsum_neg + z_y
    return finish(nll, lse, zsum, valid, weight.shape[0], cfg)
