"""A test kernel that evaluates the target side's scalar functions (``mvloss.triton.target_loss``: exp_neg,
softplus40) elementwise, so the tests can hold them against fp64 (imported only where Triton is installed)."""
import triton
import triton.language as tl

from mvloss.triton.target_loss import exp_neg, softplus40


@triton.jit
def scalar_functions_kernel(t_ptr, sp_ptr, sig_ptr, e_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    t = tl.load(t_ptr + i, mask=mask, other=0.0)
    sp, sig = softplus40(t)
    tl.store(sp_ptr + i, sp, mask=mask)
    tl.store(sig_ptr + i, sig, mask=mask)
    tl.store(e_ptr + i, exp_neg(tl.abs(t)), mask=mask)
