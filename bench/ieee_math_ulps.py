"""Worst relative error, in units of 2^-24, of the O(B) kernels' scalar functions (``mvloss.triton._ieee_math`` and
the target side's softplus40) against fp64, beside PyTorch's own fp32 functions: the figures the READMEs quote.

    TRITON_INTERPRET=1 python bench/ieee_math_ulps.py      # on the CPU; on a GPU without the variable
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

NORMAL_MIN = 1.1754943508222875e-38


def worst(got: torch.Tensor, want: torch.Tensor, where: torch.Tensor) -> float:
    """Largest |got - want| / |want| over ``where``, in units of 2^-24."""
    return ((got.double() - want).abs() / want.abs())[where].max().item() / 2.0 ** -24


def main() -> int:
    from ieee_math_kernels import log_kernel, scalar_functions_kernel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    F = torch.nn.functional
    t = torch.linspace(-150.0, 150.0, 300001, device=device)
    sp, sig, e = (torch.empty_like(t) for _ in range(3))
    scalar_functions_kernel[(-(-t.numel() // 1024),)](t, sp, sig, e, t.numel(), BLOCK=1024)
    t64 = t.double()
    for name, got, ours_ref, want in (("softplus", sp, F.softplus(t), F.softplus(t64, threshold=1000.0)),
                                      ("sigmoid", sig, torch.sigmoid(t), torch.sigmoid(t64)),
                                      ("exp(-|t|)", e, torch.exp(-t.abs()), torch.exp(-t64.abs()))):
        normal = want.abs() >= NORMAL_MIN
        print(f"{name}: mvloss {worst(got, want, normal):.2f}, PyTorch fp32 {worst(ours_ref, want, normal):.2f} "
              f"(x 2^-24 relative, t in [-150, 150], {device})")
    x = torch.cat([torch.logspace(-37.9, 38.0, 400001), torch.linspace(0.5, 2.0, 200001)]).to(device)
    out = torch.empty_like(x)
    log_kernel[(-(-x.numel() // 1024),)](x, out, x.numel(), BLOCK=1024)
    want = x.double().log()
    far = want.abs() > 0.1  # near log x = 0 the tests bound the absolute error instead
    print(f"log: mvloss {worst(out, want, far):.2f}, PyTorch fp32 {worst(x.log(), want, far):.2f} "
          f"(x 2^-24 relative, |log x| > 0.1, x over fp32's normal range, {device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
