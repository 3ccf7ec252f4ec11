"""A training step under torch.compile(fullgraph=True) against the same step eager: loss and relative gradient
errors, one JSON line per shape.  Finds what only large shapes show (several class chunks, big buffers).

    python bench/compiled_step_check.py --B 1024 --C 100000 --D 512                 # Triton backend, bf16, GPU
    MVLOSS_TRITON_WORKSPACE_ELEMS=65536 python bench/compiled_step_check.py --B 64 --C 5000 --D 128
    python bench/compiled_step_check.py --backend cpu --device cpu --dtype fp32 --B 8 --C 300 --D 16

Exits 1 when a step fails or an error passes --tol (relative to the eager gradient's largest entry).  On a CPU the
Triton backend cannot be compiled (fake tensors reach the interpreter); the C++ backends can.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from triton_gpu_timings import DTYPES, MV_ARC, step_inputs  # noqa: E402  (the bench scripts' shared problem)


def check(B: int, C: int, D: int, dtype: torch.dtype, backend: str, device: str) -> dict:
    from mvloss import functional as F

    x, w, y = step_inputs(B, C, D, dtype, device)

    def step(x, w, y):
        return F.arcface_loss(x, w, y, backend=backend, **MV_ARC)

    rec = dict(B=B, C=C, D=D, dtype=str(dtype).replace("torch.", ""), backend=backend, device=device,
               workspace=os.environ.get("MVLOSS_TRITON_WORKSPACE_ELEMS"))
    results = {}
    torch._dynamo.reset()
    for name, fn in (("eager", step), ("compiled", torch.compile(step, fullgraph=True))):
        xb, wb = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        try:
            loss = fn(xb, wb, y)
            loss.backward()
            if device != "cpu":
                torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 -- reported, the exit status says it failed
            return dict(rec, ok=False, failed=name, error=repr(e)[:400])
        results[name] = (loss.detach().float(), xb.grad.float(), wb.grad.float())
    (le, dxe, dwe), (lc, dxc, dwc) = results["eager"], results["compiled"]
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()  # noqa: E731
    return dict(rec, ok=True, loss_eager=le.item(), loss_compiled=lc.item(), dx_err=rel(dxc, dxe),
                dw_err=rel(dwc, dwe))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--B", type=int, nargs="+", default=[1024])
    p.add_argument("--C", type=int, nargs="+", default=[100_000])
    p.add_argument("--D", type=int, nargs="+", default=[512])
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--backend", default="triton")
    p.add_argument("--device", default=None, help="default: cuda when there is one")
    p.add_argument("--tol", type=float, default=2e-2, help="largest relative gradient error accepted")
    a = p.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    bad = 0
    for B in a.B:
        for C in a.C:
            for D in a.D:
                rec = check(B, C, D, DTYPES[a.dtype], a.backend, device)
                rec["pass"] = rec["ok"] and max(rec["dx_err"], rec["dw_err"]) <= a.tol \
                    and abs(rec["loss_compiled"] - rec["loss_eager"]) <= a.tol * abs(rec["loss_eager"])
                bad += not rec["pass"]
                print(json.dumps(rec), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
