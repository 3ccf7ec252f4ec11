"""Loss options: one validated record shared by the reference and every backend, and the compatibility presets."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import torch

from .negatives import Treatment

ARC_FALLBACKS = ("insightface", "easy", "none")
COSFACE_FALLBACKS = ("none", "positive")
MV_MODES = ("none", "fixed", "adaptive", "curricular")
MASK_THRESHOLDS = ("target", "raw")
TARGET_GRADS = ("exact", "straight_through")
REDUCTIONS = ("mean", "sum", "none")
PRESETS = (None, "facexzoo", "insightface")


@dataclasses.dataclass
class LossConfig:
    scale: Union[float, torch.Tensor] = 64.0
    m1: float = 1.0
    m2: float = 0.0
    m3: float = 0.0
    arc_fallback: str = "insightface"
    cosface_fallback: str = "none"
    mv: str = "none"
    t: Union[float, torch.Tensor] = 0.0
    tau_momentum: float = 0.0
    mask_threshold: str = "target"
    interclass_filtering_threshold: float = 0.0
    sphere_lambda: float = 0.0
    target_grad: str = "exact"
    normalize_x: bool = True
    normalize_w: bool = True
    clamp_cos: bool = False
    eps: float = 1e-12
    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    focal_gamma: float = 0.0
    hard_ratio: float = 1.0
    chunk_size: Optional[int] = None
    preset: Optional[str] = None

    def __post_init__(self):
        self._check_choices()
        self._apply_preset()
        self._check_values()

    def _check_choices(self):
        for field, allowed in (("arc_fallback", ARC_FALLBACKS), ("cosface_fallback", COSFACE_FALLBACKS),
                               ("mv", MV_MODES), ("mask_threshold", MASK_THRESHOLDS),
                               ("target_grad", TARGET_GRADS), ("reduction", REDUCTIONS), ("preset", PRESETS)):
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"{field}={value!r} is not one of {allowed}")

    def _apply_preset(self):
        """Presets set only the convention flags that make numbers equal to the head users swap out."""
        if self.preset == "facexzoo":
            # FaceX-Zoo MV_Softmax / CurricularFace: raw features, cos clamped to [-1, 1], mask against the raw
            # margin target; MV-Arc's target falls back like "easy margin", CurricularFace's like insightface;
            # MV-AM subtracts m only where cos_y > m.
            self.normalize_x = False
            self.clamp_cos = True
            self.mask_threshold = "raw"
            self.arc_fallback = "insightface" if self.mv == "curricular" else "easy"
            self.cosface_fallback = "positive"
        elif self.preset == "insightface":
            # CombinedMarginLoss after PartialFC_V2: cos clamped; ArcFace path (m1 = 1, m3 = 0) is
            # cos(acos(c) + m2) with no fallback under no_grad (straight-through gradient); with m3 > 0 the
            # CosFace path runs and m2 is ignored.
            self.clamp_cos = True
            if self.m3 > 0:
                self.m2 = 0.0
            else:
                self.arc_fallback = "none"
                self.target_grad = "straight_through"

    def _check_values(self):
        scale = self.scale
        if isinstance(scale, torch.Tensor):
            if scale.numel() != 1 or not scale.is_floating_point():
                raise ValueError("scale must be a positive float or a one-element floating tensor")
            if not torch.compiler.is_compiling() and scale.device.type == "cpu" and float(scale.detach()) <= 0:
                raise ValueError(f"scale must be positive, got {float(scale.detach())}")
        elif not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        if self.mv in ("fixed", "adaptive") and not isinstance(self.t, torch.Tensor) and self.t < 0:
            raise ValueError(f"t must be >= 0 for mv={self.mv!r}, got {self.t}")
        if self.m1 <= 0:
            raise ValueError(f"m1 must be positive, got {self.m1}")
        if self.m2 < 0 or self.m3 < 0:
            raise ValueError(f"margins m2, m3 must be >= 0, got m2={self.m2}, m3={self.m3}")
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")
        if self.focal_gamma < 0:
            raise ValueError(f"focal_gamma must be >= 0, got {self.focal_gamma}")
        if not 0.0 < self.hard_ratio <= 1.0:
            raise ValueError(f"hard_ratio must be in (0, 1], got {self.hard_ratio}")
        if self.sphere_lambda < 0:
            raise ValueError(f"sphere_lambda must be >= 0, got {self.sphere_lambda}")
        if self.eps <= 0:
            raise ValueError(f"eps must be positive, got {self.eps}")
        if self.interclass_filtering_threshold < 0:
            raise ValueError("interclass_filtering_threshold must be >= 0 (0 turns it off)")
        if self.interclass_filtering_threshold > 0 and self.mv != "none":
            raise ValueError("interclass filtering and mv re-weighting both treat negatives; choose one")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")

    @property
    def treatment(self) -> Treatment:
        if self.interclass_filtering_threshold > 0:
            return Treatment.FILTER
        return {"none": Treatment.NONE, "fixed": Treatment.FIXED, "adaptive": Treatment.ADAPTIVE,
                "curricular": Treatment.CURRICULAR}[self.mv]

    def treatment_param(self) -> float:
        t = self.t
        return float(t.detach()) if isinstance(t, torch.Tensor) else float(t)
