"""The fp32 edge shape's GPU-only error, reproduced on the CPU: the backward's z - lse with the logit's product fused
into the subtraction, as the compiler did for a GPU (an FMA: the product not rounded), against the forward's rounded z.

The interpreter rounds every fp32 op, so it never shows that.  This script copies ``mvloss`` to a temporary folder,
rewrites the backward's two ``z2 - lse2`` (``_tiles.dlogit_tile`` and ``dc_tile``) as one fp64 product and
subtraction rounded once to fp32 (an FMA's result), and runs ``bench/fp32_error_seeds.py`` on both copies:

    python bench/fp32_fma_emulation.py [--seeds 12]

bench/results/cpu-amd-epyc-2-cores/fp32_accuracy.md has its output beside the H100's (sixteenth session).  Since
then ``_tiles.logit_tile`` rounds the product on its own (``mul.rn.f32``), so a GPU cannot fuse it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the backward's subtractions, as written in _tiles.py, and what a fused product gives instead
FUSED = ("((scale * LOG2E).to(tl.float64)[:, None] * u.to(tl.float64) - lse2.to(tl.float64)[:, None])"
         ".to(tl.float32)")
EDITS = [
    ("p = exp2_ftz(negatives_only(z2 - lse2[:, None],", f"p = exp2_ftz(negatives_only({FUSED},"),
    ("arg = negatives_only(z2 - lse2[:, None],", f"arg = negatives_only({FUSED},"),
    ("def dlogit_tile(raw, c, z2, rmask,", "def dlogit_tile(raw, c, z2, u, rmask,"),
    ("dz, dc = dlogit_tile(raw, c, z2, rmask,", "dz, dc = dlogit_tile(raw, c, z2, u, rmask,"),
]


def fused_copy(dest: str) -> None:
    """mvloss, the tests' helpers and this folder's fp32_error_seeds.py copied into ``dest`` (the script puts its own
    root first on the path), with EDITS applied to _tiles.py (each must match once)."""
    for name in ("mvloss", "tests"):
        shutil.copytree(os.path.join(_ROOT, name), os.path.join(dest, name),
                        ignore=shutil.ignore_patterns("__pycache__"))
    os.makedirs(os.path.join(dest, "bench"))
    shutil.copy(os.path.join(_ROOT, "bench", "fp32_error_seeds.py"), os.path.join(dest, "bench"))
    path = os.path.join(dest, "mvloss", "triton", "_tiles.py")
    text = open(path).read()
    for old, new in EDITS:
        if text.count(old) != 1:
            raise SystemExit(f"_tiles.py changed: {old!r} found {text.count(old)} times")
        text = text.replace(old, new)
    with open(path, "w") as f:
        f.write(text)


def seeds(root: str, n: int) -> str:
    """fp32_error_seeds.py's lines for the tiny shape, run from ``root`` (its mvloss first on the path)."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, os.path.join(root, "bench", "fp32_error_seeds.py"), "--seeds", str(n),
                           "--shape", "1", "5", "3", "--options", "test", "plain", "s1"],
                          capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return "\n".join(ln for ln in proc.stdout.splitlines() if "target pytorch" in ln)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=12)
    a = p.parse_args(argv)
    print("as written (every product rounded):")
    print(seeds(_ROOT, a.seeds))
    with tempfile.TemporaryDirectory() as tmp:
        fused_copy(tmp)
        # the script puts its root first on sys.path, so the copy's mvloss is the one it imports
        where = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                                "import mvloss.triton._tiles as t; print(t.__file__)", tmp],
                               capture_output=True, text=True, env=dict(os.environ, TRITON_INTERPRET="1"))
        if not where.stdout.startswith(tmp):
            raise SystemExit(f"the copy is not what imports: {where.stdout or where.stderr[-2000:]}")
        print("the backward's z - lse with the product fused (a GPU's FMA before mul.rn):")
        print(seeds(tmp, a.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
