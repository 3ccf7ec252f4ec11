"""Target-side math on per-row vectors: the margin function f(cos_y) and the MV mask threshold.

This is the single definition of every target convention (ArcFace fallbacks, CosFace, SphereFace psi and lambda,
the FaceX-Zoo and insightface quirks).  The reference and every backend call it; it is O(B).
"""
from __future__ import annotations

import math

import torch


def safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """sqrt(max(v, 0)) with a zero (not infinite) gradient at and below 0: v is clamped to the smallest normal
    number, so v <= 0 gives sqrt(tiny) (1e-19 in fp32, below an ulp of the cos(theta + m) it is subtracted from) and
    a zero gradient (also for 0 < v < tiny, which 1 - c^2 never is: its nonzero values are >= 2^-24 in fp32, 2^-53 in
    fp64).  Two ops (each a launch on a GPU, forward and backward), not a where around a where."""
    return torch.sqrt(v.clamp_min(torch.finfo(v.dtype).tiny))


def clamp_cos(cos: torch.Tensor, cfg) -> torch.Tensor:
    """The cosines as the margins see them: clamped to [-1, 1] when ``cfg.clamp_cos`` (FaceX-Zoo's convention)."""
    return cos.clamp(-1.0, 1.0) if cfg.clamp_cos else cos


def cos_plus_margin(c: torch.Tensor, m: float) -> torch.Tensor:
    """cos(theta + m) = cos cos m - sin sin m, without acos."""
    return c * math.cos(m) - safe_sqrt(1.0 - c * c) * math.sin(m)


def chebyshev(c: torch.Tensor, m: int) -> torch.Tensor:
    """cos(m theta) as the Chebyshev polynomial T_m(cos theta)."""
    prev, cur = torch.ones_like(c), c
    if m == 0:
        return prev
    for _ in range(m - 1):
        prev, cur = cur, 2.0 * c * cur - prev
    return cur


def sphere_psi(c: torch.Tensor, m1: float, m2: float = 0.0) -> torch.Tensor:
    """SphereFace's monotone psi(theta) = (-1)^k cos(m1 theta + m2) - 2k, k = floor((m1 theta + m2) / pi)."""
    if float(m1).is_integer() and m2 == 0.0:
        cos_phi = chebyshev(c, int(m1))
        with torch.no_grad():
            phi = m1 * torch.acos(c.clamp(-1.0, 1.0))
    else:  # general combined form: acos is fine here (O(B), never inside a kernel), kept off the poles
        phi = m1 * torch.acos(c.clamp(-1.0 + 1e-7, 1.0 - 1e-7)) + m2
        cos_phi = torch.cos(phi)
    k = torch.floor(phi.detach() / math.pi)
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    return sign * cos_phi - 2.0 * k


def arc_target(c: torch.Tensor, m2: float, fallback: str) -> torch.Tensor:
    """cos(theta + m2) with one of the three conventions for theta + m2 > pi."""
    ctm = cos_plus_margin(c, m2)
    if fallback == "insightface":
        return torch.where(c > math.cos(math.pi - m2), ctm, c - math.sin(math.pi - m2) * m2)
    if fallback == "easy":
        return torch.where(c > 0, ctm, c)
    return ctm


def margin_target(c: torch.Tensor, cfg, with_fallbacks: bool = True) -> torch.Tensor:
    """f(cos_y) = cos(m1 theta + m2) - m3 per ``cfg`` (an ``mvloss.config.LossConfig``).

    ``with_fallbacks=False`` gives the raw margin formula (FaceX-Zoo's mask threshold).
    """
    if cfg.m1 != 1.0:
        psi = sphere_psi(c, cfg.m1, cfg.m2)
        f = (cfg.sphere_lambda * c + psi) / (1.0 + cfg.sphere_lambda)
    elif cfg.m2 != 0.0:
        f = arc_target(c, cfg.m2, cfg.arc_fallback if with_fallbacks else "none")
    else:
        f = c
    if cfg.m3 != 0.0:
        if with_fallbacks and cfg.cosface_fallback == "positive":
            f = torch.where(c > cfg.m3, f - cfg.m3, f)
        else:
            f = f - cfg.m3
    if cfg.target_grad == "straight_through":
        f = c + (f - c).detach()
    return f


def mask_threshold(c: torch.Tensor, f: torch.Tensor, cfg) -> torch.Tensor:
    """thr_i of the MV mask (a negative k is 'hard' when cos_ik > thr_i); no gradient flows through it."""
    if cfg.mask_threshold == "raw":
        return margin_target(c, cfg, with_fallbacks=False).detach()
    return f.detach()


class SphereFaceLambda:
    """SphereFace's annealing lambda = max(lambda_min, base (1 + gamma iter)^-power); ``step()`` once per iteration."""

    def __init__(self, base: float = 1000.0, gamma: float = 0.12, power: float = 1.0, lambda_min: float = 5.0):
        self.base, self.gamma, self.power, self.lambda_min = base, gamma, power, lambda_min
        self.iter = 0

    @property
    def value(self) -> float:
        return max(self.lambda_min, self.base * (1.0 + self.gamma * self.iter) ** (-self.power))

    def step(self) -> float:
        self.iter += 1
        return self.value

    def state_dict(self) -> dict:
        return {"iter": self.iter}

    def load_state_dict(self, state: dict) -> None:
        self.iter = int(state["iter"])
