"""Normalisation backward of row blocks in one pass: out = d/dt of t / max(||t||, eps) given the gradient dhat
w.r.t. the normalised rows (what ``mvloss.autograd.normalization_backward`` computes with several PyTorch ops).

Reads dhat (fp32) and t once, writes the gradient once in ``out``'s dtype: the backward's weight gradient of a class
chunk goes from the fp32 chunk straight to the weight's dtype, so no C x D fp32 buffer is ever needed.
"""
import torch
import triton
import triton.language as tl

from . import _config
from ._tiles import cast_for

MAX_D = 8192  # one program holds whole rows; wider rows use the PyTorch path


@triton.jit
def norm_backward_kernel(d_ptr, t_ptr, inv_ptr, out_ptr, R, row0, D, sdr, sdd, str_, std, sor, sod, eps,
                         NORMALIZE: tl.constexpr, PRESCALED: tl.constexpr, INTERPRETED: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row r of d goes with row row0 + r of t, inv and out."""
    local = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = local < R
    rows64 = local.to(tl.int64)
    trows64 = rows64 + row0
    cols64 = tl.arange(0, BLOCK_D).to(tl.int64)
    m = rmask[:, None] & (cols64[None, :] < D)
    d = tl.load(d_ptr + rows64[:, None] * sdr + cols64[None, :] * sdd, mask=m, other=0.0).to(tl.float32)
    if NORMALIZE:
        inv = tl.load(inv_ptr + trows64, mask=rmask, other=1.0).to(tl.float32)
        t = tl.load(t_ptr + trows64[:, None] * str_ + cols64[None, :] * std, mask=m, other=0.0).to(tl.float32)
        that = t * inv[:, None]
        dot = tl.sum(d * that, axis=1)
        projected = d - dot[:, None] * that
        # below eps the map is the linear t / eps: no projection (as the PyTorch path)
        above = (1.0 / inv) > eps
        d = tl.where(above[:, None], projected, d)
        if not PRESCALED:  # a prescaled d is dhat * inv already
            d = d * inv[:, None]
    tl.store(out_ptr + trows64[:, None] * sor + cols64[None, :] * sod, cast_for(d, out_ptr, INTERPRETED), mask=m)


def supports(dim: int) -> bool:
    return dim <= MAX_D


def launch(dhat: torch.Tensor, t: torch.Tensor, inv: torch.Tensor, eps: float, normalize: bool,
           out: torch.Tensor, prescaled: bool = False, row0: int = 0) -> torch.Tensor:
    """Write the gradient w.r.t. rows [row0, row0 + len(dhat)) of ``t`` (``dhat`` fp32, one row per such row) into
    the same rows of ``out`` and return ``out``.  ``prescaled``: ``dhat`` holds each row already multiplied by its
    ``inv`` (with ``normalize`` only).  ``inv`` is contiguous.  A row block is addressed by ``row0`` in the whole
    tensors, not passed as a slice: under torch.compile (2.11) a user kernel that writes into a slice gets a
    functional copy sized to the slice's end, which Inductor then reads past (illegal memory access)."""
    R, D = dhat.shape
    if R == 0:
        return out
    block_d = triton.next_power_of_2(max(D, 16))
    block_r = max(1, min(64, 4096 // block_d))
    if _config.interpreting():
        block_r = min(block_r, 8)
    grid = (_config.cdiv(R, block_r),)
    _config.launcher(norm_backward_kernel, dhat, t, inv, out)[grid](
        dhat, t, inv, out, R, int(row0), D, dhat.stride(0), dhat.stride(1), t.stride(0), t.stride(1), out.stride(0),
        out.stride(1), float(eps), NORMALIZE=bool(normalize), PRESCALED=bool(prescaled) and bool(normalize),
        INTERPRETED=_config.interpreting(),
        BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=4 if block_d <= 2048 else 8)
    return out
