"""The one-fp32-lse-a-row rounding, on the rows of a bench/fuzz_backends.py case (NOTES.md, eighteenth session).

    python bench/lse_rounding.py --seed 1025 --scale 64

The negatives contract alone (no margin, no MV mask: thr = +inf) on the case's x, W and labels: per row, the error
of each backend's forward lse against the fp64 one (in fp32 ulps of the lse), and the relative error of the
gradient w.r.t. w-hat of the row's dominant negative class, s p x-hat, from each backend's backward given its own
lse, against fp64; beside them PyTorch's fp32 softmax, which subtracts the row's max before its exp, and the lse
of the fp32 cosines (x W^T in fp32 times the inverse norms, as the kernels form them) summed in fp64: the part of a
backend's lse error that its cosines' rounding alone brings (NOTES.md, twentieth session).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before mvloss is imported

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fuzz_backends import draw_case  # noqa: E402
from mvloss import dispatch  # noqa: E402
from mvloss.backends import chunked  # noqa: E402
from mvloss.negatives import inverse_norms  # noqa: E402


def ulp(v: torch.Tensor) -> torch.Tensor:
    return torch.finfo(torch.float32).eps * 2.0 ** torch.floor(torch.log2(v.abs()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=1025, help="the bench/fuzz_backends.py case")
    p.add_argument("--scale", type=float, default=64.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    import mvloss.triton.ops  # noqa: F401  (registers the ops)

    x, w, y, _, label = draw_case(args.seed, args.device)
    x, w, y = x.float(), w.float(), torch.where(y == -100, torch.full_like(y, -1), y)
    B = x.shape[0]
    inf = torch.full((B,), float("inf"), device=x.device)
    s = torch.full((B,), args.scale, device=x.device)
    fwd = (x, w, inverse_norms(x, 1e-12), inverse_norms(w, 1e-12), y, inf, s, None, 0, 0.0, False)
    xn = x.double() * fwd[2].double()[:, None]
    z = args.scale * xn @ (w.double() * fwd[3].double()[:, None]).T
    z[torch.arange(B), y.clamp_min(0)] = torch.where(y >= 0, float("-inf"), z[torch.arange(B), y.clamp_min(0)])
    lse64 = torch.logsumexp(z, 1)
    z32 = args.scale * ((x @ w.T) * fwd[2][:, None] * fwd[3][None, :]).double()
    lse_cos32 = torch.logsumexp(torch.where(torch.isinf(z), z, z32), 1)  # the same columns out
    dom = z.argmax(1)
    truth = args.scale * torch.softmax(z, 1).gather(1, dom[:, None]) * xn  # d lse / d w-hat_dom, per row
    g = torch.zeros(B, device=x.device)
    print(f"case {args.seed} ({label}), s = {args.scale}, negatives only")
    ops = {"triton": (torch.ops.mvloss.triton_neg_forward, torch.ops.mvloss.triton_neg_backward),
           "chunked": (chunked.forward, chunked.backward)}
    for i in range(B):
        if y[i] < 0:
            continue
        gi = g.clone()
        gi[i] = 1.0  # this row's lse alone
        p_dom = torch.exp(z[i, dom[i]] - lse64[i]).item()
        line = [f"row {i}: p of the dominant negative {p_dom:.5f}"]
        for name, (forward, backward) in ops.items():
            lse = dispatch.lse_for_backward(forward(*fwd))  # what its backward takes (Triton's lse_wide)
            _, dwhat, _, _ = backward(*fwd[:8], lse, gi, None, 0, 0.0, False, False, False)
            lse_ulps = ((lse[i].double() - lse64[i]) / ulp(lse64[i])).item()
            rel = ((dwhat[dom[i]].double() - truth[i]).norm() / truth[i].norm()).item()
            line.append(f"{name}: lse {lse_ulps:+.1f} ulp, dominant class's gradient {rel:.1e}")
        zf = z[i].float()
        p32 = torch.softmax(zf, 0)[dom[i]].double()
        rel = ((args.scale * p32 * xn[i] - truth[i]).norm() / truth[i].norm()).item()
        line.append(f"PyTorch fp32 softmax: {rel:.1e}")
        line.append(f"fp32 cosines summed exactly: lse {((lse_cos32[i] - lse64[i]) / ulp(lse64[i])).item():+.1f} ulp")
        print("; ".join(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
