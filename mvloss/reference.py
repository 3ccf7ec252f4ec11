"""The reference: every loss of the family in plain PyTorch, materialising the B x C logit matrix.

Obviously correct and differentiable by autograd; it is the oracle every backend is tested against.  It computes
the cosine matrix in the input dtype (what a PyTorch user's F.linear head does) and everything after it in fp32
(fp64 for fp64 inputs).  Target-side conventions come from ``mvloss.margins``, the one definition of them.
"""
from __future__ import annotations

import math

import torch

from . import margins
from ._validate import check_inputs
from .config import LossConfig
from .loss import compute_dtype, finish, update_tau
from .negatives import apply_treatment


def _normalize(t: torch.Tensor, eps: float) -> torch.Tensor:
    norm = torch.linalg.vector_norm(t.to(compute_dtype(t)), dim=1, keepdim=True)
    denom = norm.clamp_min(eps).to(t.dtype)
    if t.dtype == torch.float16:  # eps = 1e-12 is 0 in fp16: a zero row would be 0 / 0
        denom = denom.clamp_min(2.0 ** -24)
    return t / denom


def cosine_matrix(x: torch.Tensor, weight: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    xn = _normalize(x, cfg.eps) if cfg.normalize_x else x
    wn = _normalize(weight, cfg.eps) if cfg.normalize_w else weight
    cos = (xn @ wn.T).to(compute_dtype(x))
    return margins.clamp_cos(cos, cfg)


def logits(x, weight, labels, cfg: LossConfig, bias=None) -> torch.Tensor:
    """The B x C logit matrix z (target column z_iy = s f(cos_iy), negatives s h-or-cos); ignored rows unmarked."""
    cos = cosine_matrix(x, weight, cfg)
    valid = labels != cfg.ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    onehot = torch.zeros_like(cos, dtype=torch.bool).scatter_(1, safe[:, None], True) & valid[:, None]
    cos_y = cos.gather(1, safe[:, None]).squeeze(1)
    update_tau(cfg, cos_y, valid)
    f = margins.margin_target(cos_y, cfg)
    if cfg.interclass_filtering_threshold > 0:
        hard = cos > cfg.interclass_filtering_threshold
    elif cfg.mv != "none":
        hard = cos > margins.mask_threshold(cos_y, f, cfg)[:, None]
    else:
        hard = torch.zeros_like(onehot)
    u = torch.where(hard, apply_treatment(cos, int(cfg.treatment), cfg.treatment_param()), cos)
    u = torch.where(onehot, f[:, None].expand_as(u), u)
    scale = cfg.scale.to(u.dtype) if isinstance(cfg.scale, torch.Tensor) else cfg.scale
    z = scale * u
    if bias is not None:
        z = z + bias.to(z.dtype)[None, :]
    return z


def margin_softmax_loss(x, weight, labels, cfg: LossConfig, bias=None) -> torch.Tensor:
    return loss_of_checked(x, weight, check_inputs(x, weight, labels, cfg.ignore_index, bias), cfg, bias)


def loss_of_checked(x, weight, labels, cfg: LossConfig, bias=None) -> torch.Tensor:
    """The loss of inputs that ``check_inputs`` passed (its labels)."""
    z = logits(x, weight, labels, cfg, bias)
    valid = labels != cfg.ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    lse = torch.logsumexp(z, dim=1)
    z_y = z.gather(1, safe[:, None]).squeeze(1)
    zsum = z.sum(1) if cfg.label_smoothing > 0 else None
    return finish(lse - z_y, lse, zsum, valid, weight.shape[0], cfg)


def l2_softmax_alpha_lower_bound(num_classes: int, p: float = 0.9) -> float:
    """L2-Softmax's lower bound on the scale: alpha_low = log(p (C - 2) / (1 - p))."""
    if num_classes <= 2 or not 0.0 < p < 1.0:
        raise ValueError("need num_classes > 2 and 0 < p < 1")
    return math.log(p * (num_classes - 2) / (1.0 - p))
