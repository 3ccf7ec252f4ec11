"""Scalar exp and log for the O(B) kernels, from adds, multiplies, IEEE division and exponent bits alone.

A GPU's tl.exp and tl.log are ``ex2.approx`` / ``lg2.approx`` around a rounded product with log2 e: tl.exp(x) is off by
~|x| 2^-24 relative, 1e-5 at |x| = 100, the size of a scaled logit difference, where PyTorch's exp is within an ulp.
These give a GPU what the interpreter computes (within a few 2^-24 of fp64), at the cost of a few dozen
instructions an element: used where there are B elements, not B x C (the B x C epilogues take ``ex2.approx.ftz`` of
arguments already in log2 units).  The compile test checks the PTX of their users for approximate instructions.
"""
import triton
import triton.language as tl

from ._tiles import LOG2E

LN2_HI = tl.constexpr(0.693145751953125)  # ln 2's leading 15 bits: n LN2_HI is exact for |n| <= 256
LN2_LO = tl.constexpr(1.4286068203094172e-06)  # ln 2 - LN2_HI


@triton.jit
def exp_neg(x):
    """e^-x for x >= 0 (+inf included) to ~1 ulp: x = n ln 2 + r (|r| <= ln 2 / 2, Cody-Waite), e^-r by its degree-8
    Taylor polynomial (truncation < 2e-10), 2^-n from the exponent bits (n <= 126); 0 above 87.5 (e^-x is below
    fp32's normal range from 87.34)."""
    xc = tl.where(x <= 87.5, x, 87.5)  # NaN too: nothing undefined reaches the integer cast
    n = tl.floor(xc * LOG2E + 0.5)
    v = n * LN2_HI - xc + n * LN2_LO  # -r
    p = 1.0 + v * (1.0 / 8.0)
    p = 1.0 + v * (1.0 / 7.0) * p
    p = 1.0 + v * (1.0 / 6.0) * p
    p = 1.0 + v * (1.0 / 5.0) * p
    p = 1.0 + v * 0.25 * p
    p = 1.0 + v * (1.0 / 3.0) * p
    p = 1.0 + v * 0.5 * p
    p = 1.0 + v * p
    two_n = ((127 - n.to(tl.int32)) << 23).to(tl.float32, bitcast=True)
    return tl.where(x <= 87.5, p * two_n, 0.0)


@triton.jit
def log1p_small(e):
    """log(1 + e) for -0.3 <= e <= 1 to ~1 ulp: 2 atanh(u), u = e / (2 + e), |u| <= 1/3 (IEEE division), by its
    series to u^15 (truncation < 2e-9 relative)."""
    u = tl.div_rn(e, 2.0 + e)
    q = u * u
    s = 1.0 / 15.0
    s = 1.0 / 13.0 + q * s
    s = 1.0 / 11.0 + q * s
    s = 1.0 / 9.0 + q * s
    s = 1.0 / 7.0 + q * s
    s = 1.0 / 5.0 + q * s
    s = 1.0 / 3.0 + q * s
    return 2.0 * u + (2.0 * u) * (q * s)


@triton.jit
def split_log(x):
    """(k, log m) with x = 2^k m, m in [1/sqrt 2, sqrt 2), for a positive normal fp32 x: k from the exponent bits
    (as fp32), log m to ~1 ulp of itself (|log m| <= 0.35), so k ln 2 + log m can be formed in a wider type."""
    bits = x.to(tl.int32, bitcast=True)
    m = ((bits & 8388607) | 1065353216).to(tl.float32, bitcast=True)  # the mantissa under exponent 0: [1, 2)
    big = m > 1.4142135
    m = tl.where(big, m * 0.5, m)
    kf = (((bits >> 23) & 255) - 127).to(tl.float32) + tl.where(big, 1.0, 0.0)
    return kf, log1p_small(m - 1.0)
