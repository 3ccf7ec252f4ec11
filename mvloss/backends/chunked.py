"""The "chunked" backend: the negatives pass (see ``mvloss.negatives``) in plain ATen ops, class chunk by class chunk.

It runs on any device, never holds more than a B x chunk block, and is the template the fused kernels follow:
an online (max, sum-exp) forward and a backward that recomputes each chunk's cosines.
"""
from __future__ import annotations

import os

import torch

from ..negatives import apply_treatment, compute_dtype, treatment_derivative

name = "chunked"
# Elements of one B x chunk block.  A GPU step is bound by its launches: 4M elements (16 MB fp32 per temporary).  A
# CPU step is not: 256k-element blocks stay in cache, as fast or up to 25% faster, a step 6-14x less memory
# (bench/chunked_blocks.py; README, "On the CPU").  MVLOSS_CHUNK_ELEMS sets both.
GPU_WORKSPACE_ELEMS = 4 * 1024 * 1024
CPU_WORKSPACE_ELEMS = 256 * 1024


def workspace_elems(device: torch.device) -> int:
    default = CPU_WORKSPACE_ELEMS if device.type == "cpu" else GPU_WORKSPACE_ELEMS
    return int(os.environ.get("MVLOSS_CHUNK_ELEMS", default))


def chunk_size_for(batch: int, num_classes: int, chunk_size: int | None = None, *, device: torch.device) -> int:
    if chunk_size is not None:
        return max(1, min(int(chunk_size), num_classes))
    return max(1, min(num_classes, workspace_elems(device) // max(batch, 1)))


def _chunk_logits(xhat, w, w_inv, c0, c1, labels, thr, scale, bias, treatment, param, clamp):
    """Cosines, treated cosines u, logits z (target column -> -inf) and the masks of one class chunk."""
    what = w[c0:c1].to(xhat.dtype) * w_inv[c0:c1, None].to(xhat.dtype)
    raw = xhat @ what.T
    c = raw.clamp(-1.0, 1.0) if clamp else raw
    hard = c > thr[:, None]
    u = torch.where(hard, apply_treatment(c, treatment, param), c)
    z = scale[:, None] * u
    if bias is not None:
        z = z + bias[None, c0:c1].to(z.dtype)
    is_target = labels[:, None] == torch.arange(c0, c1, device=labels.device)[None, :]
    return what, raw, c, hard, u, z, is_target


def forward(x, w, x_inv, w_inv, labels, thr, scale, bias, treatment, param, clamp, chunk_size=None, need_zsum=True):
    dt = compute_dtype(x)
    B, C = x.shape[0], w.shape[0]
    xhat = x.to(dt) * x_inv[:, None].to(dt)
    thr, scale = thr.to(dt), scale.to(dt)
    run_max = torch.full((B,), float("-inf"), dtype=dt, device=x.device)
    run_sum = torch.zeros(B, dtype=dt, device=x.device)
    zsum = torch.zeros(B, dtype=dt, device=x.device)
    step = chunk_size_for(B, C, chunk_size, device=x.device)
    for c0 in range(0, C, step):
        c1 = min(C, c0 + step)
        _, _, _, _, _, z, is_target = _chunk_logits(xhat, w, w_inv, c0, c1, labels, thr, scale, bias,
                                                    treatment, param, clamp)
        if need_zsum:  # out of place: torch 2.11's dynamo drops the gradient of a Function output mutated in place
            zsum = zsum + torch.where(is_target, 0.0, z).sum(1)
        z = z.masked_fill(is_target, float("-inf"))
        new_max = torch.maximum(run_max, z.amax(1))
        safe = torch.where(torch.isfinite(new_max), new_max, 0.0)
        run_sum = run_sum * torch.exp(run_max - safe) + torch.exp(z - safe[:, None]).sum(1)
        run_max = new_max
    lse = torch.where(run_sum > 0, run_max + torch.log(run_sum), float("-inf"))
    return lse, zsum


def backward(x, w, x_inv, w_inv, labels, thr, scale, bias, lse, g_lse, g_sum, treatment, param, clamp,
             need_dscale=False, need_dbias=False, chunk_size=None):
    dt = compute_dtype(x)
    B, C = x.shape[0], w.shape[0]
    xhat = x.to(dt) * x_inv[:, None].to(dt)
    thr, scale, lse = thr.to(dt), scale.to(dt), lse.to(dt)
    g_lse = g_lse.to(dt)
    g_sum = torch.zeros_like(g_lse) if g_sum is None else g_sum.to(dt)
    dxhat = torch.zeros(B, x.shape[1], dtype=dt, device=x.device)
    dwhat = torch.empty(C, x.shape[1], dtype=dt, device=x.device)
    dscale = torch.zeros(B, dtype=dt, device=x.device) if need_dscale else None
    dbias = torch.empty(C, dtype=dt, device=x.device) if need_dbias else None
    step = chunk_size_for(B, C, chunk_size, device=x.device)
    for c0 in range(0, C, step):
        c1 = min(C, c0 + step)
        what, raw, c, hard, u, z, is_target = _chunk_logits(xhat, w, w_inv, c0, c1, labels, thr, scale, bias,
                                                            treatment, param, clamp)
        p = torch.where(is_target, 0.0, torch.exp(z - lse[:, None]))
        dz = torch.where(is_target, 0.0, g_lse[:, None] * p + g_sum[:, None])
        dc = dz * scale[:, None] * torch.where(hard, treatment_derivative(c, treatment, param), 1.0)
        if clamp:
            dc = dc * ((raw >= -1.0) & (raw <= 1.0))
        dxhat += dc @ what
        dwhat[c0:c1] = dc.T @ xhat
        if dscale is not None:
            dscale += (dz * u).sum(1)
        if dbias is not None:
            dbias[c0:c1] = dz.sum(0)
    return dxhat, dwhat, dscale, dbias
