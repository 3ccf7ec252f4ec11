"""Registers, spills, shared memory and programs per SM of the Triton kernels' tile configurations, compiled for
sm_90 without a GPU (Triton's bundled ptxas): which tiles let two or more programs share an SM, so one program's
epilogue can overlap another's tensor-core work.  The configurations are the table's own and the tile sweep's
(bench/triton_sweep.py), so the sweep on a GPU times exactly these.

    python bench/triton_occupancy.py --out bench/results/cpu-amd-epyc-2-cores/triton_occupancy_sm90.md
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # compiles for the GPU, not the interpreter

import torch  # noqa: E402


def rows(B: int, D: int, dtype: torch.dtype, step: bool = False, table_only: bool = False) -> list[dict]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from triton_sweep import DLOGITS_BY_MODE, FORWARD_BY_MODE

    from mvloss.triton._compile_check import compile_kernel

    out = []
    for kernel, configs in (("fwd", FORWARD_BY_MODE["tiles"]), ("fwd_tma", FORWARD_BY_MODE["tma"]),
                            ("fwd_ws", FORWARD_BY_MODE["ws"]), ("dlogits", DLOGITS_BY_MODE["tiles"]),
                            ("dlogits_tma", DLOGITS_BY_MODE["tma"]), ("dlogits_ws", DLOGITS_BY_MODE["ws"])):
        for cfg in [None] + ([] if table_only else configs):
            try:
                r = compile_kernel(kernel, dtype, B, D, config=cfg, training_step=step)
            except Exception as exc:  # a form this Triton cannot compile with these tiles (3.8: ws with 128 rows)
                r = dict(kernel=kernel, config=cfg, error=f"{type(exc).__name__}: {str(exc).strip()[:80]}")
            r["table"] = cfg is None
            out.append(r)
            print(r, flush=True)
    return out


def _partitions(r: dict) -> str:
    regs = r.get("partition_registers") or []
    return f" ({' / '.join(str(v) for v in regs)})" if regs else ""


NAMES = {"fwd": "forward", "fwd_tma": "forward, tma", "fwd_ws": "forward, ws", "dlogits": "recompute (dlogits)",
         "dlogits_tma": "recompute (dlogits), tma", "dlogits_ws": "recompute (dlogits), ws"}


def markdown(records: list[dict], B: int, D: int, dtype: str, command: str, step: bool = False) -> str:
    import triton

    flags = ("the flags of a training step of a fixed-scale loss without bias or label smoothing (no bias, no "
             "dscale / dbias partials, no logit sum or its gradient)" if step else
             "every optional output on (bias, dscale and dbias partials, the logit sum and its gradient)")
    lines = [f"# Occupancy of the Triton kernels' tiles on sm_90 (compiled, no GPU): {dtype}, B = {B}, D = {D}", "",
             f"Kernels compiled with {flags}; the forward's pointer form for a class count of whole tiles (FULL), "
             "so its count is its class-tile loop's, without the copy a partial last tile adds.", "",
             f"Command: `{command}`  ", f"torch {torch.__version__}, triton {triton.__version__}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Programs per SM from registers (64K a SM, "
             "allocated per warp in units of 256) and shared memory (228 KB a SM, 1 KB reserved a program); SASS "
             "instructions: the kernel's static count (nvdisasm), mostly the class-tile loop body. Forms: the "
             "default pointer loads, tma (TMA-descriptor loads) and ws (tma, warp-specialised: the warps column "
             "gives num_warps and, after the arrow, the warps launched with the producer group; its registers are "
             "the launch count, and the partitions' own, set by setmaxnreg, follow in brackets; its TMA copies: 3 "
             "where the row tile is split between the two consumer groups, x in two halves, 2 where both groups "
             "would do all the work).", "",
             "| kernel | BLOCK_B × BLOCK_C | warps | stages | register cap | registers | spill bytes | shared KB | "
             "programs / SM | SASS instructions | TMA copies |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        c = r["config"] or {}
        name = NAMES[r["kernel"]] + (" — table" if r["table"] else "")
        if "error" in r:
            lines.append(f"| {name} | {c.get('BLOCK_B')} × {c.get('BLOCK_C')} | {c.get('num_warps')} | "
                         f"{c.get('num_stages')} | {c.get('maxnreg', '')} | does not compile: {r['error']} |"
                         " | | | | |")
            continue
        warps = f"{c['num_warps']}" + (f" → {r['warps']}" if r.get("warps", c["num_warps"]) != c["num_warps"] else "")
        lines.append(f"| {name} | {c['BLOCK_B']} × {c['BLOCK_C']} | {warps} | {c['num_stages']} | "
                     f"{c.get('maxnreg', '')} | {r['registers']}{_partitions(r)} | {r['spill_bytes']} | "
                     f"{r['shared'] // 1024} | "
                     f"{r['programs_per_sm']} | {r['sass_instructions']} | "
                     f"{r['tma_copies'] if r['kernel'].endswith('_ws') else ''} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--B", type=int, default=1024)
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    p.add_argument("--out", default=None, help="write the markdown table here")
    p.add_argument("--step", action="store_true", help="compile with a training step's flags (MV-Arc: no bias, no "
                   "dscale / dbias, no logit sum) instead of every optional output")
    p.add_argument("--table-only", action="store_true", help="only the tiles the table picks, not the sweep's")
    a = p.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    text = markdown(rows(a.B, a.D, dtype, a.step, a.table_only), a.B, a.D, a.dtype,
                    "python bench/triton_occupancy.py " + " ".join(sys.argv[1:] if argv is None else argv), a.step)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
