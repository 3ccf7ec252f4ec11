"""The pre-pass's target rows in one launch: x-hat_i, w-hat_{y_i} and their cosine, in fp32.

``mvloss.loss.target_rows_of`` gathers and normalises the rows in PyTorch for every backend (about a dozen small
ops, each a launch on a GPU); on eager CUDA tensors this kernel does the same in one (``mvloss.autograd.triton_glue``)
and is checked against that PyTorch path in the tests.  One program per row, the whole row in registers.
"""
import torch
import triton
import triton.language as tl

from . import _config

MAX_D = 8192  # whole rows in registers: wider rows take the PyTorch path


@triton.jit
def target_rows_kernel(x_ptr, w_ptr, labels_ptr, has_ptr, xhat_ptr, what_ptr, cos_ptr, C, D, sxb, sxd, swc, swd,
                       eps, NORMALIZE_X: tl.constexpr, NORMALIZE_W: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lab = tl.load(labels_ptr + row).to(tl.int64)
    ds = tl.arange(0, BLOCK_D).to(tl.int64)
    dmask = ds < D
    # a label outside [0, C) (possible only where the label check is skipped: a CUDA graph being captured) reads
    # zeros, never memory outside W
    wmask = dmask & (lab >= 0) & (lab < C)
    x = tl.load(x_ptr + row * sxb + ds * sxd, mask=dmask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + lab * swc + ds * swd, mask=wmask, other=0.0).to(tl.float32)
    # divide by the norm, as the PyTorch path (and F.normalize) do: near |cos| = 1 the margins' sqrt(1 - cos^2)
    # magnifies an ulp of the cosine (IEEE sqrt and division: tl.sqrt and / are approximate on a GPU)
    if NORMALIZE_X:
        x = tl.div_rn(x, tl.maximum(tl.sqrt_rn(tl.sum(x * x, axis=0)), eps))
    if NORMALIZE_W:
        w = tl.div_rn(w, tl.maximum(tl.sqrt_rn(tl.sum(w * w, axis=0)), eps))
    tl.store(xhat_ptr + row * D + ds, x, mask=dmask)
    tl.store(what_ptr + row * D + ds, w, mask=dmask)
    has = tl.load(has_ptr + row) != 0
    tl.store(cos_ptr + row, tl.where(has, tl.sum(x * w, axis=0), 0.0))


def supports(dim: int) -> bool:
    return 0 < dim <= MAX_D


def target_rows_launch_options(dim: int) -> tuple[int, dict]:
    """(BLOCK_D, compiler options) for rows of ``dim`` features: 8 warps beyond 2048 keep a row's two copies at
    <= 32 registers a thread each."""
    block_d = triton.next_power_of_2(dim)
    return block_d, dict(num_warps=4 if _config.interpreting() or block_d <= 2048 else 8)


def target_rows(x: torch.Tensor, w: torch.Tensor, safe_labels: torch.Tensor, has: torch.Tensor,
                normalize_x: bool, normalize_w: bool, eps: float):
    """(x-hat (B, D), w-hat at safe_labels (B, D), x-hat . w-hat where ``has`` else 0 (B,)), fp32, one launch."""
    B, D = x.shape
    xhat = torch.empty((B, D), dtype=torch.float32, device=x.device)
    what = torch.empty((B, D), dtype=torch.float32, device=x.device)
    cos = torch.empty(B, dtype=torch.float32, device=x.device)
    if B == 0:
        return xhat, what, cos
    block_d, options = target_rows_launch_options(D)
    target_rows_kernel[(B,)](x, w, safe_labels, has, xhat, what, cos, w.shape[0], D, x.stride(0),
                             x.stride(1), w.stride(0), w.stride(1), float(eps), NORMALIZE_X=bool(normalize_x),
                             NORMALIZE_W=bool(normalize_w), BLOCK_D=block_d, **options)
    return xhat, what, cos
