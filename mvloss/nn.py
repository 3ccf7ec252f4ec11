"""nn.Module heads that own the class weights and return the loss from ``forward(feats, labels)``.

Constructors and state_dict layouts follow the heads users replace: ``MVSoftmaxHead`` and ``CurricularFaceHead``
load FaceX-Zoo checkpoints (weights stored D x C), ``CombinedMarginHead`` loads insightface PartialFC_V2 /
CombinedMarginLoss checkpoints (``weight`` C x D).  ``logits()`` materialises the B x C logit matrix (small C only).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from . import loss as _loss
from . import reference
from .config import LossConfig
from .margins import SphereFaceLambda


class MarginSoftmaxHead(nn.Module):
    """A head for any member of the family: ``loss_kwargs`` are the options of
    ``mvloss.functional.margin_softmax_loss`` (scale, m1, m2, m3, mv, t, preset, ...)."""

    weight_is_dim_by_class = False  # FaceX-Zoo heads store W as D x C
    weight_name = "weight"          # FaceX-Zoo's CurricularFace calls it "kernel"

    def __init__(self, embedding_size: int, num_classes: int, *, bias: bool = False, backend: str = "auto",
                 **loss_kwargs):
        super().__init__()
        if embedding_size < 1 or num_classes < 1:
            raise ValueError("embedding_size and num_classes must be positive")
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.backend = backend
        self.loss_kwargs = dict(loss_kwargs)
        LossConfig(**self._cfg_kwargs())  # reject bad options at construction
        shape = (embedding_size, num_classes) if self.weight_is_dim_by_class else (num_classes, embedding_size)
        self.register_parameter(self.weight_name, nn.Parameter(torch.empty(shape)))
        self.bias = nn.Parameter(torch.zeros(num_classes)) if bias else None
        self.reset_parameters()

    @property
    def stored_weight(self) -> nn.Parameter:
        return getattr(self, self.weight_name)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.stored_weight, std=0.01)

    def class_weight(self) -> torch.Tensor:
        """W as (num_classes, dim), a view when stored transposed."""
        w = self.stored_weight
        return w.t() if self.weight_is_dim_by_class else w

    def _cfg_kwargs(self) -> dict:
        return dict(self.loss_kwargs)

    def config(self) -> LossConfig:
        return LossConfig(**self._cfg_kwargs())

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _loss.margin_softmax_loss(feats, self.class_weight(), labels.reshape(-1), self.config(),
                                         bias=self.bias, backend=self.backend)

    def logits(self, feats: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The B x C logits (margins applied on the label columns when ``labels`` is given)."""
        cfg = self.config()
        if labels is None:
            labels = torch.full((feats.shape[0],), cfg.ignore_index, dtype=torch.long, device=feats.device)
            cfg.mv, cfg.interclass_filtering_threshold = "none", 0.0
        cfg.tau_momentum = 0.0  # inspecting logits must not move CurricularFace's tau
        return reference.logits(feats, self.class_weight(), labels.reshape(-1), cfg, self.bias)

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.loss_kwargs.items() if not isinstance(v, torch.Tensor))
        return f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, {opts}"


class SoftmaxHead(MarginSoftmaxHead):
    """Plain softmax of x W^T + b (nn.Linear's init)."""

    def __init__(self, embedding_size: int, num_classes: int, bias: bool = True, **kw):
        super().__init__(embedding_size, num_classes, bias=bias, scale=1.0, normalize_x=False, normalize_w=False,
                         **kw)

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.embedding_size)
            nn.init.uniform_(self.bias, -bound, bound)


class NormFaceHead(MarginSoftmaxHead):
    def __init__(self, embedding_size: int, num_classes: int, s: float = 30.0, **kw):
        super().__init__(embedding_size, num_classes, scale=s, **kw)


class CosFaceHead(MarginSoftmaxHead):
    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, margin: float = 0.4, **kw):
        super().__init__(embedding_size, num_classes, scale=s, m3=margin, **kw)


class ArcFaceHead(MarginSoftmaxHead):
    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, margin: float = 0.5,
                 arc_fallback: str = "insightface", **kw):
        super().__init__(embedding_size, num_classes, scale=s, m2=margin, arc_fallback=arc_fallback, **kw)


class SphereFaceHead(MarginSoftmaxHead):
    """Normalised SphereFace with the lambda annealing schedule, stepped once per training forward."""

    def __init__(self, embedding_size: int, num_classes: int, m: int = 4, s: float = 30.0, base: float = 1000.0,
                 gamma: float = 0.12, power: float = 1.0, lambda_min: float = 5.0, **kw):
        self.schedule = SphereFaceLambda(base, gamma, power, lambda_min)
        super().__init__(embedding_size, num_classes, scale=s, m1=float(m), **kw)

    def _cfg_kwargs(self) -> dict:
        return dict(self.loss_kwargs, sphere_lambda=self.schedule.value)

    def forward(self, feats, labels):
        if self.training:
            self.schedule.step()
        return super().forward(feats, labels)


class MVSoftmaxHead(MarginSoftmaxHead):
    """FaceX-Zoo's ``MV_Softmax(feat_dim, num_class, is_am, margin, mv_weight, scale)``: same constructor, same
    ``weight`` (D x C) and init, and with the default ``preset="facexzoo"`` the same loss and gradients as
    ``MV_Softmax`` followed by ``nn.CrossEntropyLoss()``.  ``preset=None`` gives the clean MV-Softmax of DESIGN.md."""

    weight_is_dim_by_class = True

    def __init__(self, feat_dim: int, num_class: int, is_am: bool, margin: float = 0.35, mv_weight: float = 1.12,
                 scale: float = 32.0, *, preset: Optional[str] = "facexzoo", **kw):
        margins = {"m3": margin} if is_am else {"m2": margin}
        self.is_am, self.margin, self.mv_weight = is_am, margin, mv_weight
        super().__init__(feat_dim, num_class, scale=scale, mv="adaptive", t=mv_weight - 1.0, preset=preset,
                         **margins, **kw)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)


class CurricularFaceHead(MarginSoftmaxHead):
    """FaceX-Zoo's ``CurricularFace(feat_dim, num_class, m, s)``: ``kernel`` (D x C) and the ``t`` buffer (tau, an
    EMA of the mean target cosine with momentum 0.01)."""

    weight_is_dim_by_class = True
    weight_name = "kernel"

    def __init__(self, feat_dim: int, num_class: int, m: float = 0.5, s: float = 64.0, *,
                 preset: Optional[str] = "facexzoo", momentum: float = 0.01, **kw):
        self._momentum = momentum
        super().__init__(feat_dim, num_class, scale=s, m2=m, mv="curricular", preset=preset, **kw)
        self.register_buffer("t", torch.zeros(1))

    def _cfg_kwargs(self) -> dict:
        t = getattr(self, "t", 0.0)
        momentum = self._momentum if self.training else 0.0
        return dict(self.loss_kwargs, t=t, tau_momentum=momentum)


class CombinedMarginHead(MarginSoftmaxHead):
    """insightface's ``CombinedMarginLoss(s, m1, m2, m3, interclass_filtering_threshold)`` on top of PartialFC_V2
    (sample_rate 1): ``weight`` C x D, normal(0, 0.01) init, labels of -1 ignored, and with the default
    ``preset="insightface"`` the same loss and gradients."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m1: float = 1.0, m2: float = 0.5,
                 m3: float = 0.0, interclass_filtering_threshold: float = 0.0, *,
                 preset: Optional[str] = "insightface", ignore_index: int = -1, **kw):
        super().__init__(embedding_size, num_classes, scale=s, m1=m1, m2=m2, m3=m3,
                         interclass_filtering_threshold=interclass_filtering_threshold, preset=preset,
                         ignore_index=ignore_index, **kw)
