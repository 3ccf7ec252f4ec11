"""The Triton backend's fp32 error against an fp64 truth over many seeds, beside PyTorch's own (the reference backend
at fp32): the flash-attention rule of the tests, one seed at a time there, as a distribution here.

Made for the fp32 edge shape that fails on an H100 (``test_triton_edge_shapes[tiny]``: B 1, C 5, D 3): is the kernels'
error a few times PyTorch's on most seeds, or only on one?  Each option set runs with the target side's kernels and
with its PyTorch ops (``MVLOSS_TARGET_KERNELS=0``), to tell the two halves apart; ``s1`` (logit scale 1) shows whether
the excess grows with the scale (an error in the logits' arguments) or not.

    python bench/fp32_error_seeds.py --seeds 20 [--shape 1 5 3 --shape 5 203 200] [--json out.json]

``--emulate-ex2 REL`` (the CPU interpreter only): every fp32 ``exp2`` the kernels take is multiplied by 1 + u REL, u
uniform in [-1, 1], a stand-in for a GPU's ``ex2.approx.ftz.f32`` (about 2 ulp, REL 2.4e-7), the one approximate
instruction left in the B x C kernels: does it make the GPU's excess?
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.join(_ROOT, "tests"))

TEST_OPTIONS = dict(m2=0.5, mv="adaptive", t=0.2, label_smoothing=0.1)  # test_triton_edge_shapes'
OPTION_SETS = {"test": TEST_OPTIONS, "plain": dict(m2=0.0), "s1": dict(TEST_OPTIONS, scale=1.0)}
NAMES = ("loss", "dx", "dW")


def errors(shape, seed: int, device: str, options: dict) -> dict:
    """Per output: (triton's largest error, the reference's, the truth's largest magnitude), fp64 truth."""
    from helpers import make_inputs, run

    b, c, d = shape
    x, w, y = make_inputs(b, c, d, ignore=(2,) if b > 2 else (), seed=seed, device=device)
    truth = run(x.double(), w.double(), y, "reference", **options)
    ref = run(x, w, y, "reference", **options)
    got = run(x, w, y, "triton", **options)
    return {n: ((g - t).abs().max().item(), (r - t).abs().max().item(), t.abs().max().item())
            for n, t, r, g in zip(NAMES, truth, ref, got)}


def summary(per_seed: list[dict]) -> dict:
    from helpers import REL_FLOOR

    out = {}
    for n in NAMES:
        ratio = [e[n][0] / max(e[n][1], 1e-30) for e in per_seed]
        rel = [e[n][0] / max(e[n][2], 1e-30) for e in per_seed]
        ref_rel = [e[n][1] / max(e[n][2], 1e-30) for e in per_seed]
        # the tests' bound (helpers.assert_matches_reference): 2x the reference's error plus fp32's floor
        over = sum(e[n][0] > 2 * e[n][1] + REL_FLOOR[torch.float32] * e[n][2] for e in per_seed)
        out[n] = dict(ratio_median=statistics.median(ratio), ratio_max=max(ratio), rel_median=statistics.median(rel),
                      rel_max=max(rel), ref_rel_median=statistics.median(ref_rel), over_test_bound=over)
    return out


def emulate_ex2(rel: float, seed: int = 0) -> None:
    """The interpreter's exp2, rounded as a GPU's approximate one might be (see the module's docstring)."""
    import numpy as np
    from triton.runtime import interpreter

    rng = np.random.default_rng(seed)

    def noisy(x):
        r = np.exp2(x)
        if r.dtype == np.float32:
            r = (r.astype(np.float64) * (1 + rel * rng.uniform(-1.0, 1.0, size=r.shape))).astype(np.float32)
        return r

    interpreter.InterpreterBuilder.create_exp2 = lambda self, arg: self.unary_op(arg, noisy)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--shape", type=int, nargs=3, action="append", help="B C D (repeatable)")
    p.add_argument("--options", nargs="+", default=list(OPTION_SETS), choices=list(OPTION_SETS))
    p.add_argument("--json")
    p.add_argument("--emulate-ex2", type=float, default=0.0, metavar="REL")
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if a.emulate_ex2:
        if device != "cpu" or os.environ["TRITON_INTERPRET"] != "1":
            p.error("--emulate-ex2 changes the interpreter's exp2: CPU only, under TRITON_INTERPRET=1")
        emulate_ex2(a.emulate_ex2)
    shapes = [tuple(s) for s in a.shape] if a.shape else [(1, 5, 3), (5, 203, 200)]
    rows = []
    saved = os.environ.get("MVLOSS_TARGET_KERNELS")
    try:
        for shape in shapes:
            for oname in a.options:
                for target in ("kernels", "pytorch"):
                    os.environ["MVLOSS_TARGET_KERNELS"] = "1" if target == "kernels" else "0"
                    s = summary([errors(shape, seed, device, OPTION_SETS[oname]) for seed in range(a.seeds)])
                    rows.append(dict(shape=list(shape), options=oname, target_side=target, **s))
                    dx = s["dx"]
                    print(f"{shape} {oname:5s} target {target:7s}: dx error / reference's median "
                          f"{dx['ratio_median']:.2f} max {dx['ratio_max']:.2f}; relative median {dx['rel_median']:.1e}"
                          f" (reference {dx['ref_rel_median']:.1e}); over the test bound {dx['over_test_bound']} of "
                          f"{a.seeds} (loss {s['loss']['over_test_bound']}, dW {s['dW']['over_test_bound']})",
                          flush=True)
    finally:
        if saved is None:
            os.environ.pop("MVLOSS_TARGET_KERNELS", None)
        else:
            os.environ["MVLOSS_TARGET_KERNELS"] = saved
    if a.json:
        name = torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)"
        record = dict(device=name, torch=torch.__version__, seeds=a.seeds, emulate_ex2=a.emulate_ex2, rows=rows)
        with open(a.json, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
