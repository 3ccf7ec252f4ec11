"""The negatives pass: the one contract every fused backend implements.

All target-side math (margins, fallbacks, SphereFace psi, presets' quirks, focal/HM weights) happens in PyTorch
on per-row vectors (see ``mvloss.loss``).  What is left for a backend is the O(B*C*D) part: every entry of the
cosine matrix that is *not* a row's target column.  With

    c_ik = clamp?((x_i . w_k) * x_inv_i * w_inv_k)                (clamp to [-1, 1] only when ``clamp`` is set)
    u_ik = h(c_ik)  if c_ik > thr_i  else  c_ik                   (h chosen by ``treatment``, see ``Treatment``)
    z_ik = scale_i * u_ik (+ bias_k)

for every class k != labels_i (a label of -1 excludes no column), a backend computes

    forward:  lse_i  = logsumexp_{k != y_i} z_ik        (-inf when there is no negative)
              zsum_i = sum_{k != y_i} z_ik               (only label smoothing needs it: with the keyword
                                                          ``need_zsum=False`` a backend may return 0 instead)

and, given per-row upstream gradients ``g_lse`` and ``g_sum`` (zero on ignored rows; ``g_sum`` None means zero),

    dz_ik    = g_lse_i * exp(z_ik - lse_i) + g_sum_i     (k != y_i; 0 on the target column)
    dc_ik    = dz_ik * scale_i * (h'(c_ik) if c_ik > thr_i else 1) * (0 if clamped away else 1)
    dxhat_i  = sum_k dc_ik * w_k * w_inv_k               (gradient w.r.t. the normalised x row)
    dwhat_k  = sum_i dc_ik * x_i * x_inv_i               (gradient w.r.t. the normalised w row)
    dscale_i = sum_k dz_ik * u_ik                        (only when asked)
    dbias_k  = sum_i dz_ik                               (only when asked)

A forward may return a third output, the same lse in a wider dtype, which ``mvloss.autograd`` hands its backward as
``lse`` instead (the Triton backend's fp64 lse: exp(z - lse) relative to the unrounded lse, not its fp32 rounding).
The normalisation backward (O(B*D + C*D)) is done once, in ``mvloss.autograd``, for every backend.
Shapes: x (B, D), w (C, D) (any strides), x_inv (B,), w_inv (C,), labels (B,) int64, thr (B,), scale (B,),
bias (C,) or None; every per-row / per-class vector is fp32.  Outputs are fp32; dxhat/dwhat may be returned in
fp32 or in the input dtype.  Nothing of size B*C may be held by a fused backend.
"""
from __future__ import annotations

import enum

import torch


class Treatment(enum.IntEnum):
    """How a negative whose cosine exceeds the row threshold is re-weighted (h in DESIGN.md)."""

    NONE = 0         # h(c) = c            (plain margin softmax; thr is +inf)
    FIXED = 1        # h(c) = c + t        (MV-Softmax fixed)
    ADAPTIVE = 2     # h(c) = (t + 1) c + t (MV-Softmax adaptive, FaceX-Zoo's mv_weight = 1 + t)
    CURRICULAR = 3   # h(c) = c (t + c)    (CurricularFace, t = tau)
    FILTER = 4       # h(c) = 0            (insightface interclass filtering: logit 0)


def apply_treatment(c: torch.Tensor, treatment: int, param: float) -> torch.Tensor:
    """h(c) for a tensor of cosines (no masking)."""
    if treatment == Treatment.NONE:
        return c
    if treatment == Treatment.FIXED:
        return c + param
    if treatment == Treatment.ADAPTIVE:
        return (param + 1.0) * c + param
    if treatment == Treatment.CURRICULAR:
        return c * (param + c)
    if treatment == Treatment.FILTER:
        return torch.zeros_like(c)
    raise ValueError(f"unknown treatment {treatment}")


def treatment_derivative(c: torch.Tensor, treatment: int, param: float) -> torch.Tensor:
    """h'(c) for a tensor of cosines."""
    if treatment == Treatment.NONE or treatment == Treatment.FIXED:
        return torch.ones_like(c)
    if treatment == Treatment.ADAPTIVE:
        return torch.full_like(c, param + 1.0)
    if treatment == Treatment.CURRICULAR:
        return param + 2.0 * c
    if treatment == Treatment.FILTER:
        return torch.zeros_like(c)
    raise ValueError(f"unknown treatment {treatment}")


def treatment_derivative_bound(treatment: int, param: float) -> float:
    """max |h'| over cos in [-1, 1], unmasked entries (h' = 1) included: a bound of |dc| / (|dz| s)."""
    if treatment == Treatment.ADAPTIVE:
        return max(abs(param + 1.0), 1.0)
    if treatment == Treatment.CURRICULAR:
        return max(abs(param) + 2.0, 1.0)
    return 1.0


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype of all arithmetic after loading: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# Elements per block of rows when a pass over W's rows upcasts on a CPU (1 MB of fp32, kept in cache): inverse_norms
# here, the normalisation backward in autograd.py.
CPU_ROW_BLOCK_ELEMS = 256 * 1024


def inverse_norms(t: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / max(||t_row||, eps) in the compute dtype, the convention of F.normalize."""
    acc = compute_dtype(t)
    # dtype= accumulates in the compute dtype without an upcast copy of t on a GPU (and under torch.compile); on a CPU
    # ATen copies t to fp32 first, so rows go through one reused 1 MB block: no C x D fp32 copy of a bf16 W, and ~6x
    # faster at 100k x 128 (the copies stay in cache)
    blocked = (t.device.type == "cpu" and t.dtype != acc and t.dim() == 2 and not torch.compiler.is_compiling()
               and not (t.requires_grad and torch.is_grad_enabled()))
    rows = max(1, CPU_ROW_BLOCK_ELEMS // max(t.shape[-1], 1))
    if blocked and t.shape[0] > rows:
        norms = torch.empty(t.shape[0], dtype=acc)
        block = torch.empty(rows, t.shape[1], dtype=acc)
        for r in range(0, t.shape[0], rows):
            part = block[:min(rows, t.shape[0] - r)]
            part.copy_(t[r:r + part.shape[0]])
            torch.linalg.vector_norm(part, dim=1, out=norms[r:r + part.shape[0]])
        return 1.0 / norms.clamp_min(eps)
    return 1.0 / torch.linalg.vector_norm(t, dim=1, dtype=acc).clamp_min(eps)
