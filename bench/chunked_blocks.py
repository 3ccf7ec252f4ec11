"""The chunked backend's block size on a CPU: time and peak extra memory of a step per ``MVLOSS_CHUNK_ELEMS``.

Each case runs in its own process through ``mvloss.bench`` (median time, peak extra resident memory of a step after
the warm-up), forward and forward+backward, for a few shapes.  Prints a Markdown table.

    python bench/chunked_blocks.py > bench/results/<device>/chunked_blocks.md
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from mvloss.bench import runner
from mvloss.bench.cli import device_name

SHAPES = ("mv_arc:fp32:256:100000:128", "arcface:fp32:1024:20000:512", "normface:bf16:256:100000:128")
BLOCKS = (131072, 262144, 524288, 1048576, 4194304)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, nargs="+", default=list(BLOCKS))
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), help="loss:dtype:B:C:D")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of repetitions per case")
    args = p.parse_args(argv)
    print(f"# chunked backend: block size on {device_name(torch.device('cpu'))}\n")
    print(f"torch {torch.__version__}; command: `python bench/chunked_blocks.py {' '.join(sys.argv[1:])}`\n")
    print("| loss | dtype | B | C | D | MVLOSS_CHUNK_ELEMS | fwd ms | fwd MB | fwd+bwd ms | fwd+bwd MB |")
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|")
    for shape in args.shapes:
        loss, dtype, B, C, D = shape.split(":")
        B, C, D = int(B), int(C), int(D)
        for elems in args.blocks:
            os.environ["MVLOSS_CHUNK_ELEMS"] = str(elems)  # read by the case's own process
            cells = []
            for pas in ("fwd", "fwd+bwd"):
                row = runner.measure_isolated(dict(method="mvloss:chunked", loss=loss, dtype=dtype, B=B, C=C, D=D,
                                                   device="cpu", **{"pass": pas}), budget_s=args.budget)
                ok = row["status"] == "ok"
                cells += [f"{row['ms']:.1f}" if ok else row["status"], f"{row['peak_extra_mb']:.1f}" if ok else ""]
            print(f"| {loss} | {dtype} | {B} | {C} | {D} | {elems} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
