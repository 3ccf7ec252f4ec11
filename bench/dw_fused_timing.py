"""One class chunk's weight gradient, timed alone: the default (cuBLAS's GEMM G^T X-hat in W's dtype, then the
one-pass normalisation backward) against the fused kernel (MVLOSS_TRITON_DW_GEMM=fused, mvloss/triton/dw_fused.py)
with the table's tiles and each candidate's, and the bare GEMM; and how far the fused result is from the default's.

    python bench/dw_fused_timing.py --B 1024 --n 32768 --D 512 --tiles bench/tiles/dw_fused*.json --out dw.json
    python bench/dw_fused_timing.py --smoke      # the script itself on a CPU (interpreter, tiny shape)

A step at C = 1M runs 31 such chunks (B 1024, D 512, 32M workspace elements), so 31 x (default - fused) is what
the fused kernel would save a step.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.triton_gpu_timings import DTYPES, _time, env  # noqa: E402


def chunk_inputs(B: int, n: int, D: int, dtype: torch.dtype, device):
    """A chunk's operands as the default backward has them: the workspace G (B x n, carrying w_inv), X-hat (B x D),
    W's rows and their inverse norms (one chunk of classes), and the output (W's gradient rows)."""
    from mvloss.negatives import inverse_norms

    g = torch.Generator(device=device).manual_seed(0)
    work = (torch.randn(B, n, device=device, generator=g) / B).to(dtype)
    xhat = torch.nn.functional.normalize(torch.randn(B, D, device=device, generator=g), dim=1).to(dtype)
    w = (0.05 * torch.randn(n, D, device=device, generator=g)).to(dtype)
    return work, xhat, w, inverse_norms(w, 1e-12), torch.empty_like(w)


def run(B: int, n: int, D: int, dtype: torch.dtype, device, tiles=None, iters: int = 20) -> dict:
    from mvloss.triton import backward_gemm, dw_fused

    work, xhat, w, w_inv, out = chunk_inputs(B, n, D, dtype, device)
    eps = 1e-12

    def default():
        dw_c = backward_gemm._mm_same(work.T, xhat) if dtype == torch.bfloat16 else backward_gemm._mm32(work.T, xhat)
        backward_gemm._finish_chunk(dw_c, 0, n, w, w_inv, out, True, eps)

    def fused():
        dw_fused.launch(work, n, xhat, w, w_inv, eps, True, out, 0)

    def gemm():
        backward_gemm._mm_same(work.T, xhat)

    timed = lambda fn: _time(fn, device, warmup=3, iters=iters)  # noqa: E731
    flops = 2.0 * B * n * D
    rec = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
               B=B, n=n, D=D, dtype=str(dtype).replace("torch.", ""), command=" ".join(sys.argv))
    rec["gemm_ms"] = timed(gemm)
    rec["default_ms"] = timed(default)
    want = out.float().clone()
    candidates = [None] + list(tiles or [])
    rec["fused"] = []
    for t in candidates:
        with env(**({"MVLOSS_TRITON_TILES": t} if t else {})):
            from mvloss.triton import _config

            ms = timed(fused)
            err = (out.float() - want).abs().max().item() / want.abs().max().item()
            rec["fused"].append(dict(tiles=t or "table", config=_config.dw_fused_config(D, dtype), ms=ms,
                                     tflops=flops / ms / 1e9, max_rel_diff_vs_default=err))
    rec["gemm_tflops"] = flops / rec["gemm_ms"] / 1e9
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/dw_fused_timing.py")
    p.add_argument("--B", type=int, default=1024)
    p.add_argument("--n", type=int, default=32768, help="classes in the chunk (32M workspace elements / B)")
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--tiles", nargs="*", default=[], help="candidate MVLOSS_TRITON_TILES files (their \"dw\" tiles)")
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true", help="CPU, interpreter, a tiny chunk: checks the script")
    a = p.parse_args(argv)
    if a.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        a.B, a.n, a.D = 40, 70, 48
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    rec = run(a.B, a.n, a.D, DTYPES[a.dtype], device, a.tiles, iters=2 if a.smoke else 20)
    print(f"{rec['device']}: B {a.B} n {a.n} D {a.D} {a.dtype}: GEMM alone {rec['gemm_ms']:.4f} ms "
          f"({rec['gemm_tflops']:.0f} TFLOP/s), default (GEMM + normalisation backward) {rec['default_ms']:.4f} ms")
    for f in rec["fused"]:
        print(f"  fused, {f['tiles']}: {f['ms']:.4f} ms ({f['tflops']:.0f} TFLOP/s), "
              f"max diff vs default {f['max_rel_diff_vs_default']:.2e} of the largest entry")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump([rec], fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
