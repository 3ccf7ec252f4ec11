"""Public functional API: one general loss and the named members of the family.

Every function takes embeddings ``x`` (B, D), class weights ``weight`` (C, D) and integer ``labels`` (B,), and
returns the loss (a scalar for reduction "mean"/"sum", per-row for "none").  ``backend`` is "auto" (the fastest
backend that can run the inputs), or one of ``mvloss.backends()``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import loss as _loss
from .config import LossConfig

Scale = Union[float, torch.Tensor]


def margin_softmax_loss(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, scale: Scale = 64.0,
                        m1: float = 1.0, m2: float = 0.0, m3: float = 0.0, arc_fallback: str = "insightface",
                        mv: str = "none", t: Union[float, torch.Tensor] = 0.0, normalize_x: bool = True,
                        ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                        backend: str = "auto", bias: Optional[torch.Tensor] = None, normalize_w: bool = True,
                        cosface_fallback: str = "none", mask_threshold: str = "target",
                        interclass_filtering_threshold: float = 0.0, sphere_lambda: float = 0.0,
                        target_grad: str = "exact", clamp_cos: bool = False, eps: float = 1e-12,
                        focal_gamma: float = 0.0, hard_ratio: float = 1.0, tau_momentum: float = 0.0,
                        chunk_size: Optional[int] = None, preset: Optional[str] = None) -> torch.Tensor:
    """The whole family: target margin f(cos_y) = cos(m1 theta + m2) - m3, MV re-weighting of mis-classified
    negatives (``mv`` "fixed" | "adaptive" | "curricular" with ``t``), scale ``s``, then cross-entropy with
    optional label smoothing, focal weighting (``focal_gamma``) and hard-row mining (``hard_ratio``).

    ``preset`` "facexzoo" / "insightface" sets the convention flags that reproduce those projects' heads.
    See README.md for every option.
    """
    cfg = LossConfig(scale=scale, m1=m1, m2=m2, m3=m3, arc_fallback=arc_fallback, cosface_fallback=cosface_fallback,
                     mv=mv, t=t, tau_momentum=tau_momentum, mask_threshold=mask_threshold,
                     interclass_filtering_threshold=interclass_filtering_threshold, sphere_lambda=sphere_lambda,
                     target_grad=target_grad, normalize_x=normalize_x, normalize_w=normalize_w,
                     clamp_cos=clamp_cos, eps=eps, ignore_index=ignore_index, reduction=reduction,
                     label_smoothing=label_smoothing, focal_gamma=focal_gamma, hard_ratio=hard_ratio,
                     chunk_size=chunk_size, preset=preset)
    return _loss.margin_softmax_loss(x, weight, labels, cfg, bias=bias, backend=backend)


def softmax_loss(x, weight, labels, *, bias=None, **kw):
    """Plain softmax cross-entropy of x W^T + b: no normalisation, no scale."""
    return margin_softmax_loss(x, weight, labels, scale=1.0, normalize_x=False, normalize_w=False, bias=bias, **kw)


def l2_softmax_loss(x, weight, labels, *, alpha: Scale = 16.0, bias=None, **kw):
    """L2-Softmax (Ranjan et al. 2017): L2-normalised features scaled by alpha (a float, or a learnable tensor)."""
    return margin_softmax_loss(x, weight, labels, scale=alpha, normalize_x=True, normalize_w=False, bias=bias, **kw)


def normface_loss(x, weight, labels, *, scale: Scale = 30.0, **kw):
    """NormFace (Wang et al. 2017): cosine logits times s."""
    return margin_softmax_loss(x, weight, labels, scale=scale, **kw)


def sphereface_loss(x, weight, labels, *, m: int = 4, scale: Scale = 30.0, sphere_lambda: float = 0.0, **kw):
    """SphereFace / A-Softmax (Liu et al. 2017) in normalised form: s (lambda cos + psi(theta)) / (1 + lambda)."""
    return margin_softmax_loss(x, weight, labels, scale=scale, m1=float(m), sphere_lambda=sphere_lambda, **kw)


def cosface_loss(x, weight, labels, *, scale: Scale = 64.0, margin: float = 0.35, **kw):
    """CosFace / AM-Softmax (Wang et al. 2018): target logit s (cos - m)."""
    return margin_softmax_loss(x, weight, labels, scale=scale, m3=margin, **kw)


def arcface_loss(x, weight, labels, *, scale: Scale = 64.0, margin: float = 0.5, arc_fallback: str = "insightface",
                 **kw):
    """ArcFace (Deng et al. 2019): target logit s cos(theta + m), with ``arc_fallback`` past theta + m > pi."""
    return margin_softmax_loss(x, weight, labels, scale=scale, m2=margin, arc_fallback=arc_fallback, **kw)


def combined_margin_loss(x, weight, labels, *, scale: Scale = 64.0, m1: float = 1.0, m2: float = 0.5,
                         m3: float = 0.0, **kw):
    """insightface's combined margin cos(m1 theta + m2) - m3."""
    return margin_softmax_loss(x, weight, labels, scale=scale, m1=m1, m2=m2, m3=m3, **kw)


def mv_softmax_loss(x, weight, labels, *, scale: Scale = 32.0, margin_type: str = "am", margin: float = 0.35,
                    mv: str = "adaptive", t: float = 0.2, **kw):
    """MV-Softmax (Wang et al., AAAI 2020): an AM (``margin_type="am"``) or Arc target margin, and every negative
    with cos_ik > f(cos_iy) re-weighted by h: "fixed" cos + t or "adaptive" (t + 1) cos + t."""
    if margin_type not in ("am", "arc"):
        raise ValueError(f"margin_type must be 'am' or 'arc', got {margin_type!r}")
    if mv not in ("fixed", "adaptive"):
        raise ValueError(f"mv must be 'fixed' or 'adaptive' for MV-Softmax, got {mv!r}")
    margins = {"m3": margin} if margin_type == "am" else {"m2": margin}
    return margin_softmax_loss(x, weight, labels, scale=scale, mv=mv, t=t, **margins, **kw)


def sv_softmax_loss(x, weight, labels, *, scale: Scale = 32.0, mv: str = "fixed", t: float = 0.2, **kw):
    """SV-Softmax (Wang et al. 2018): MV re-weighting with no target margin."""
    return margin_softmax_loss(x, weight, labels, scale=scale, mv=mv, t=t, **kw)


def curricularface_loss(x, weight, labels, tau: Union[float, torch.Tensor], *, scale: Scale = 64.0,
                        margin: float = 0.5, momentum: float = 0.01, **kw):
    """CurricularFace (Huang et al. 2020): ArcFace target; hard negatives become cos (tau + cos).  When ``tau`` is a
    one-element tensor it is updated in place as tau <- momentum mean(cos_y) + (1 - momentum) tau before use."""
    return margin_softmax_loss(x, weight, labels, scale=scale, m2=margin, mv="curricular", t=tau,
                               tau_momentum=momentum if isinstance(tau, torch.Tensor) else 0.0, **kw)


def focal_softmax_loss(x, weight, labels, *, gamma: float = 2.0, scale: Scale = 30.0, **kw):
    """F-Softmax: (1 - p_y)^gamma times the (margin) softmax loss of each row; any margin via keyword arguments."""
    return margin_softmax_loss(x, weight, labels, scale=scale, focal_gamma=gamma, **kw)


def hm_softmax_loss(x, weight, labels, *, ratio: float = 0.9, scale: Scale = 30.0, **kw):
    """HM-Softmax: keep the hardest ``ratio`` of the batch's rows (mean over kept rows)."""
    return margin_softmax_loss(x, weight, labels, scale=scale, hard_ratio=ratio, **kw)


def ring_loss(x: torch.Tensor, radius: torch.Tensor, weight: float = 0.01) -> torch.Tensor:
    """Ring loss (Zheng et al. 2018): weight / 2 * mean_i (||x_i|| - R)^2, R usually learnable."""
    norms = torch.linalg.vector_norm(x.float(), dim=1)
    return 0.5 * weight * ((norms - radius.float()) ** 2).mean()


def up_loss(weight: torch.Tensor, novel_classes: torch.Tensor, base_classes: Optional[torch.Tensor] = None,
            coefficient: float = 1.0) -> torch.Tensor:
    """UP-loss (Guo and Zhang 2017, one-shot classes): pulls the squared norms of the novel classes' weight
    vectors toward alpha, the mean squared norm of the base classes (all other classes by default)."""
    sq = (weight.float() ** 2).sum(1)
    novel = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
    novel[novel_classes] = True
    base = ~novel if base_classes is None else torch.zeros_like(novel).index_fill_(0, base_classes, True)
    if not bool(base.any()) or not bool(novel.any()):
        raise ValueError("up_loss needs at least one novel and one base class")
    alpha = sq[base].mean().detach()
    return coefficient * ((sq[novel] - alpha) ** 2).mean()


def heated_up_scale(step: int, *, start: float = 64.0, end: float = 16.0, heat_at: int, heat_steps: int = 0) -> float:
    """Heated-up softmax (Zhang et al. 2018): keep the scale at ``start`` (low temperature) until ``heat_at``,
    then heat up to ``end`` — at once, or linearly over ``heat_steps`` steps."""
    if step < heat_at:
        return float(start)
    if heat_steps <= 0 or step >= heat_at + heat_steps:
        return float(end)
    frac = (step - heat_at) / heat_steps
    return float(start + (end - start) * frac)
