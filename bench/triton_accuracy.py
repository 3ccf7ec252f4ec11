"""Accuracy of the Triton backend against an fp64 truth, next to PyTorch's own (the reference backend at the same
dtype): the largest error of loss, dx and dW over the truth's largest entry.

    python bench/triton_accuracy.py --out bench/results/cpu-amd-epyc-2-cores/triton_accuracy_interp.md

Without a GPU it runs under Triton's interpreter (half operands upcast for tl.dot, the backward's workspace still
rounded to the input dtype, as on a GPU).  Shape: B = 37, C = 203, D = 77 in class chunks of 64 (several chunks).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
FAMILIES_SHOWN = ("arcface", "mv_arc_adaptive", "curricular", "label_smoothing")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        os.environ["TRITON_INTERPRET"] = "1"  # chosen before Triton is imported: start again with it set
        os.execv(sys.executable, [sys.executable, *sys.argv])
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    from families import FAMILIES, needs_unit_features
    from helpers import make_inputs, run

    device = "cuda" if torch.cuda.is_available() else "cpu"
    b, c, d = 37, 203, 77
    os.environ["MVLOSS_TRITON_WORKSPACE_ELEMS"] = str(b * 64)
    lines = ["# Triton backend accuracy against an fp64 truth", "",
             "Command: `python bench/triton_accuracy.py`  ",
             f"Device: {torch.cuda.get_device_name() if device == 'cuda' else 'CPU, Triton interpreter'}; torch "
             f"{torch.__version__}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  ",
             f"B={b} C={c} D={d}, class chunks of 64; largest |error| / largest |truth| entry; dW by class row: "
             "‖error row‖ / ‖truth row‖, median and largest over the rows", "",
             "| dtype | family | triton loss | triton dx | triton dW | reference loss | reference dx | reference dW | "
             "triton dW row median | triton dW row max | reference dW row median | reference dW row max |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for dtype in (torch.bfloat16, torch.float16):
        for fam in FAMILIES_SHOWN:
            kw = FAMILIES[fam]
            x, w, y = make_inputs(b, c, d, torch.float32, ignore=(3, 11), device=device)
            if needs_unit_features(kw):
                x = 0.9 * x / x.norm(dim=1, keepdim=True)
            x, w = x.to(dtype), w.to(dtype)
            truth = run(x.double(), w.double(), y, "reference", **kw)
            errs, rows = {}, {}
            for backend in ("triton", "reference"):
                got = run(x, w, y, backend, **kw)
                errs[backend] = [((g - t).abs().max() / t.abs().max()).item() for g, t in zip(got, truth)]
                # per class row: a small row's own error, which the largest-entry ratio hides
                rel = (got[2] - truth[2]).norm(dim=1) / truth[2].norm(dim=1).clamp_min(1e-30)
                rows[backend] = [rel.median().item(), rel.max().item()]
            lines.append(f"| {str(dtype).replace('torch.', '')} | {fam} | "
                         + " | ".join(f"{e:.2e}" for e in errs["triton"] + errs["reference"] + rows["triton"]
                                      + rows["reference"]) + " |")
            print(lines[-1], flush=True)
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
