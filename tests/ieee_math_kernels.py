"""Test kernels that evaluate the O(B) kernels' scalar functions elementwise (``mvloss.triton._ieee_math``, and the
target side's softplus40), so the tests can hold them against fp64, and the kernels' rounding of stored values
(``_tiles.cast_for``) (imported only where Triton is installed)."""
import triton
import triton.language as tl

from mvloss.triton._ieee_math import exp_neg, split_log
from mvloss.triton._tiles import LN2, cast_for
from mvloss.triton.target_loss import softplus40


@triton.jit
def scalar_functions_kernel(t_ptr, sp_ptr, sig_ptr, e_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    t = tl.load(t_ptr + i, mask=mask, other=0.0)
    sp, sig = softplus40(t)
    tl.store(sp_ptr + i, sp, mask=mask)
    tl.store(sig_ptr + i, sig, mask=mask)
    tl.store(e_ptr + i, exp_neg(tl.abs(t)), mask=mask)


@triton.jit
def log_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """log x as the lse merge forms it: k ln 2 + log m of split_log, summed in fp64 (out_ptr is fp64)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    k, log_m = split_log(tl.load(x_ptr + i, mask=mask, other=1.0))
    tl.store(out_ptr + i, k.to(tl.float64) * LN2 + log_m.to(tl.float64), mask=mask)


@triton.jit
def cast_kernel(x_ptr, out_ptr, n, INTERPRETED: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    tl.store(out_ptr + i, cast_for(tl.load(x_ptr + i, mask=mask, other=0.0), out_ptr, INTERPRETED), mask=mask)
