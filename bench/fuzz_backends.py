"""Random option combinations, each backend against the fp64 reference under the tests' rule.

    python bench/fuzz_backends.py --backends triton chunked cpu --cases 300 --seed 9000

Each case draws a shape (small, or up to B 140 / C 400 / D 140), a loss family (tests/families.py), a reduction,
label smoothing, focal weighting, hard mining, a chunk size, an fp32 / bf16 / fp16 dtype, a bias, unnormalised W,
a zero weight row, an ignored row and non-contiguous inputs, then checks loss, dx and dW of every backend the way
``tests/helpers.assert_matches_reference`` does: error against the fp64 truth <= factor x the reference's own error
at that dtype + a floor relative to the largest |truth|.  Prints one line per violation and a summary; exits 1 when
there was one.  The Triton backend runs under the interpreter on a machine without a GPU (set here).
"""
from __future__ import annotations

import argparse
import os
import random
import sys

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before mvloss (through the tests' helpers) is imported

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from families import FAMILIES, needs_unit_features  # noqa: E402
from helpers import allowed_error, run  # noqa: E402


def draw_case(seed: int, device: str):
    """(x, w, y, options, label) of one random case; the same seed gives the same case."""
    r = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    if r.random() < 0.6:
        B, C, D = r.randint(1, 9), r.randint(1, 70), r.randint(2, 40)
    else:
        B, C, D = r.randint(30, 140), r.randint(100, 400), r.randint(16, 140)
    family = r.choice(sorted(FAMILIES))
    kw = dict(FAMILIES[family])
    kw["reduction"] = r.choice(["mean", "sum", "none"])
    if r.random() < 0.3:
        kw["label_smoothing"] = r.choice([0.0, 0.1, 0.3])
    if r.random() < 0.2 and "focal_gamma" not in kw:
        kw["focal_gamma"] = r.choice([1.0, 2.0])
    if r.random() < 0.2 and "hard_ratio" not in kw:
        kw["hard_ratio"] = r.choice([0.5, 0.8])
    if r.random() < 0.3:
        kw["chunk_size"] = r.randint(1, C + 3)
    x = torch.randn(B, D, generator=g)
    if needs_unit_features(kw):
        x = 0.9 * x / x.norm(dim=1, keepdim=True)
    w = torch.randn(C, D, generator=g)
    zero_row = r.random() < 0.2
    if zero_row:
        w[r.randrange(C)] = 0.0
    y = torch.randint(0, C, (B,), generator=g)
    if r.random() < 0.3:
        y[r.randrange(B)] = -100
    if r.random() < 0.2:  # every other column of wider buffers
        bx, bw = torch.zeros(B, 2 * D), torch.zeros(C, 2 * D)
        bx[:, ::2], bw[:, ::2] = x, w
        x, w = bx[:, ::2], bw[:, ::2]
    dtype = r.choice([torch.float32] * 4 + [torch.bfloat16, torch.float16])
    if zero_row and dtype == torch.float16:
        dtype = torch.bfloat16  # the zero row's own dW is ~1/eps: inf in fp16 for every backend and the reference
    x, w = x.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype)
    if r.random() < 0.15:
        kw["bias"] = torch.randn(C, generator=g).to(device=device, dtype=dtype)
    if r.random() < 0.1:
        # raw class vectors: rows of norm 0.9, so no cosine lands on a clamp's kink at 1 (where the gradient jumps and
        # an ulp decides which side a backend takes; README "Gradients")
        kw["normalize_w"], kw["scale"] = False, 1.0
        w = 0.9 * w / w.float().norm(dim=1, keepdim=True).clamp_min(1e-12).to(w.dtype)
    label = f"B={B} C={C} D={D} {str(dtype)[6:]} {family} " + " ".join(
        f"{k}={v}" for k, v in kw.items() if k not in FAMILIES[family] and k != "bias") + (
        " bias" if "bias" in kw else "") + (" zero-w-row" if zero_row else "") + (
        "" if x.is_contiguous() else " strided")
    return x, w, y.to(device), kw, label


def check(x, w, y, backend: str, kw: dict, factor: float, detail: bool = False):
    """[(quantity, error / allowed)] of one backend on one case (a ratio above 1 breaks the rule); with ``detail``
    [(quantity, ratio, where)]: the row of the worst entry, its row's relative error against fp64 and the
    reference's on that row."""
    truth = run(x.double(), w.double(), y, "reference", **kw)
    ref = run(x, w, y, "reference", **kw)
    got = run(x, w, y, backend, **kw)
    out = []
    for name, t, r, g in zip(("loss", "dx", "dW"), truth, ref, got):
        if not torch.isfinite(g).all():
            out.append((name, float("inf"), "non-finite"))
            continue
        err = (g.double() - t).abs()
        where = ""
        if t.dim() > 0 and t.numel():
            row = int(err.reshape(t.shape[0], -1).amax(1).argmax())
            size = max(t[row].abs().max().item(), 1e-30)
            where = (f"row {row}: |truth| {size:.3g}, relative error {err[row].max().item() / size:.2e}, "
                     f"the reference's {(r[row].double() - t[row]).abs().max().item() / size:.2e}")
        out.append((name, err.max().item() / allowed_error(t, r, x.dtype, factor), where))
    return out if detail else [o[:2] for o in out]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", nargs="+", default=["triton", "chunked", "cpu"])
    p.add_argument("--cases", type=int, default=100)
    p.add_argument("--seed", type=int, default=0, help="case i uses seed + i")
    p.add_argument("--factor", type=float, default=2.0, help="the rule's factor on the reference's own error")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    worst = {b: (0.0, "") for b in args.backends}
    broken = {b: 0 for b in args.backends}
    skipped = {b: 0 for b in args.backends}
    for i in range(args.cases):
        x, w, y, kw, label = draw_case(args.seed + i, args.device)
        for backend in args.backends:
            try:
                ratios = check(x, w, y, backend, kw, args.factor, detail=True)
            except RuntimeError as e:  # an explicitly named backend that cannot run the call says why
                if "cannot" not in str(e) and "not support" not in str(e):
                    raise
                skipped[backend] += 1
                continue
            name, ratio, where = max(ratios, key=lambda t: t[1])
            if ratio > worst[backend][0]:
                worst[backend] = (ratio, f"case {args.seed + i}: {name}, {label}")
            if ratio > 1.0:
                broken[backend] += 1
                print(f"case {args.seed + i} {backend}: {name} error {ratio:.2f}x allowed ({label}); {where}",
                      flush=True)
    print(f"{args.cases} cases, seeds {args.seed}..{args.seed + args.cases - 1}, factor {args.factor}")
    for b in args.backends:
        print(f"  {b:8s} broke the rule in {broken[b]}, could not run {skipped[b]}; "
              f"worst {worst[b][0]:.2f}x allowed ({worst[b][1]})")
    return 1 if any(broken.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
