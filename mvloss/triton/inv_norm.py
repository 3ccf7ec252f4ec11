"""Inverse row norms 1 / max(||row||, eps) in fp32, for x and W in one launch.

``mvloss.autograd`` computes the inverse norms in PyTorch for every backend; this kernel is the fused alternative
(one read of each matrix, one fp32 vector out), exposed as ``inverse_norms_pair`` and checked against
``mvloss.negatives.inverse_norms`` in the tests.
"""
import torch
import triton
import triton.language as tl

from . import _config


@triton.jit
def inv_norm_kernel(a_ptr, b_ptr, out_a_ptr, out_b_ptr, NA, NB, D, sab, sad, sbb, sbd, eps,
                    UPCAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Programs [0, cdiv(NA, BLOCK_R)) do the rows of a, the rest the rows of b."""
    pid = tl.program_id(0)
    a_blocks = tl.cdiv(NA, BLOCK_R)
    is_a = pid < a_blocks
    blk = tl.where(is_a, pid, pid - a_blocks)
    n = tl.where(is_a, NA, NB)
    srow = tl.where(is_a, sab, sbb).to(tl.int64)
    scol = tl.where(is_a, sad, sbd).to(tl.int64)
    rows = blk * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        m = rmask[:, None] & (ds[None, :] < D)
        off = rows64[:, None] * srow + ds[None, :] * scol
        if is_a:
            v = tl.load(a_ptr + off, mask=m, other=0.0).to(tl.float32)
        else:
            v = tl.load(b_ptr + off, mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(v * v, axis=1)
    # IEEE sqrt and division (tl.sqrt and / are approximate on a GPU): a cosine carries both rows' errors, and at
    # s = 64 an ulp of it is ~4e-6 of a logit
    inv = tl.div_rn(tl.full(acc.shape, 1.0, tl.float32), tl.maximum(tl.sqrt_rn(acc), eps))
    if is_a:
        tl.store(out_a_ptr + rows64, inv, mask=rmask)
    else:
        tl.store(out_b_ptr + rows64, inv, mask=rmask)


def inverse_norms_pair(a: torch.Tensor, b: torch.Tensor, eps: float):
    """(1 / max(||a_i||, eps), 1 / max(||b_k||, eps)) in fp32, one kernel launch."""
    assert a.shape[1] == b.shape[1]
    NA, D = a.shape
    NB = b.shape[0]
    out_a = torch.empty(NA, dtype=torch.float32, device=a.device)
    out_b = torch.empty(NB, dtype=torch.float32, device=a.device)
    BLOCK_R, BLOCK_D = (16, 32) if _config.interpreting() else (16, 128)
    grid = (_config.cdiv(NA, BLOCK_R) + _config.cdiv(NB, BLOCK_R),)
    inv_norm_kernel[grid](a, b, out_a, out_b, NA, NB, D, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                          float(eps), UPCAST=_config.interpreting(), BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D)
    return out_a, out_b
