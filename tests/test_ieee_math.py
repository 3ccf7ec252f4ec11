"""The O(B) kernels' scalar exp and log (``mvloss.triton._ieee_math``) and the target side's softplus against fp64.

They use adds, multiplies, IEEE division and exponent bits only (the compile test finds no approximate instruction in
their users' PTX), so a GPU computes what the interpreter does here.
"""
import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NORMAL_MIN = 1.1754943508222875e-38


def test_target_scalar_functions_to_a_few_ulps():
    """softplus(t), sigmoid(t) and e^-|t| of the target side's kernels against fp64, over arguments of a scaled
    logit difference's size: within 6 x 2^-24 relative wherever the result is a normal fp32 number (measured: 3.3,
    PyTorch's own fp32 softplus 2.7), 0 or below fp32's normal range beyond.  They use adds, multiplies and IEEE
    division only (the compile test finds no approximate instruction in their PTX), so a GPU computes what the
    interpreter does here; a GPU's tl.exp, ex2.approx of x log2 e, was ~|x| 2^-24 off (NOTES.md, fifteenth
    session)."""
    from ieee_math_kernels import scalar_functions_kernel

    t = torch.cat([torch.linspace(-150.0, 150.0, 30001), torch.tensor([0.0, -0.0, 1e-30, -1e-7, 1e-7, 39.99, 40.0,
                                                                        40.01, -87.0, -87.3, -88.0, 88.0])])
    t = torch.cat([t, torch.tensor([float("nan"), float("inf"), -float("inf")])]).to(DEVICE)
    sp, sig, e = (torch.empty_like(t) for _ in range(3))
    scalar_functions_kernel[(triton_cdiv(t.numel(), 1024),)](t, sp, sig, e, t.numel(), BLOCK=1024)
    assert sp[-3].isnan() and sig[-3].isnan()  # NaN stays NaN; +-inf: the limits
    assert sp[-2:].tolist() == [float("inf"), 0.0] and sig[-2:].tolist() == [1.0, 0.0] and e[-2:].tolist() == [0, 0]
    t, sp, sig, e = t[:-3], sp[:-3], sig[:-3], e[:-3]
    t64 = t.double()
    truth = {"softplus": torch.nn.functional.softplus(t64, threshold=1000.0), "sigmoid": torch.sigmoid(t64),
             "exp": torch.exp(-t64.abs())}
    for name, got in (("softplus", sp), ("sigmoid", sig), ("exp", e)):
        want = truth[name]
        normal = want >= NORMAL_MIN
        rel = ((got.double() - want).abs() / want.abs().clamp_min(1e-300))[normal]
        assert rel.max().item() <= 6 * 2.0 ** -24, (name, rel.max().item(), t[normal][rel.argmax()].item())
        assert (got[~normal].abs() <= NORMAL_MIN).all(), name


def triton_cdiv(a, b):
    return -(-a // b)


def test_log_is_exact_to_a_few_ulps_of_its_small_part():
    """log of positive normal numbers over fp32's range as the lse merge forms it (its total is >= 1): k ln 2 in
    fp64 plus log m, |log m| <= 0.35, in fp32; the error is within 2^-24 absolute of fp64 whatever |log x| is (an
    fp32 log x would be off by ~ulp(|log x|), 2^-18 at x = 2^100)."""
    from ieee_math_kernels import log_kernel

    x = torch.cat([torch.logspace(-37.9, 38.0, 20001), torch.linspace(0.5, 2.0, 4001),
                   torch.tensor([1.0, 2.0, 1.0000001, 0.99999994, 3.4e38, 0.70710677, 0.7071068, 1.4142135,
                                 1.4142137])]).to(DEVICE)
    out = torch.empty_like(x, dtype=torch.float64)
    log_kernel[(triton_cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    err = (out - x.double().log()).abs()
    assert err.max().item() <= 2.0 ** -24, (err.max().item(), x[err.argmax()].item())
    assert out[x == 1.0].abs().max().item() == 0.0


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the interpreter's 3.4e38 to fp16
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_stored_values_round_to_nearest_even(dtype):
    """What the kernels store in a half dtype (``_tiles.cast_for``) is PyTorch's round-to-nearest-even of the fp32
    value, ties, infinities, overflow to inf and NaN included (normal numbers), on a GPU and under the interpreter,
    whose own conversion to bf16 truncates (shown: the same kernel without the rounding)."""
    from ieee_math_kernels import cast_kernel

    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g) * torch.logspace(-30, 30, 20000)
    # bf16 halfway points, normal numbers (the interpreter's own conversion of subnormals to bf16 is wrong besides)
    ties = (torch.randint(0x0080, 0x7F80, (2000,), generator=g, dtype=torch.int32) << 16) | 0x8000
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 3.4e38, -3.4e38, 65520.0, 1.0])
    x = torch.cat([x, ties.view(torch.float32), special]).to(DEVICE)
    interpreted = DEVICE == "cpu"
    out = torch.empty_like(x, dtype=dtype)
    cast_kernel[(triton_cdiv(x.numel(), 1024),)](x, out, x.numel(), INTERPRETED=interpreted, BLOCK=1024)
    want = x.to(dtype)
    assert ((out == want) | (out.isnan() & want.isnan())).all()
    if interpreted and dtype == torch.bfloat16:  # the interpreter's own conversion: truncation
        raw = torch.empty_like(out)
        cast_kernel[(triton_cdiv(x.numel(), 1024),)](x, raw, x.numel(), INTERPRETED=False, BLOCK=1024)
        finite = x.isfinite()
        assert (raw[finite].float().abs() <= x[finite].abs()).all() and (raw != want).sum() > 1000
