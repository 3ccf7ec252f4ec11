"""One eager Triton training step for Nsight Compute: warm-up outside the profiled range, then exactly one step
inside it (``cudaProfilerStart`` / ``Stop``), so ``ncu --profile-from-start off`` sees only that step's kernels.

    ncu --profile-from-start off -k regex:'neg_lse|neg_dlogits|norm_backward' --section SpeedOfLight \\
        --section MemoryWorkloadAnalysis --section WarpStateStats python bench/ncu_step.py --C 1000000

``bash bench/gpu_session.sh`` runs it as the ``ncu`` stage.  Without a GPU: ``--smoke`` runs the same step under
the Triton interpreter (tiny shape) so the script cannot rot.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--B", type=int, default=1024)
    p.add_argument("--C", type=int, default=1_000_000)
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shape")
    a = p.parse_args(argv)
    if a.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        a.B, a.C, a.D = 8, 300, 16
    elif not torch.cuda.is_available():
        print("needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 1
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from triton_gpu_timings import MV_ARC, step_inputs

    from mvloss import functional as F

    device = "cpu" if a.smoke else "cuda"
    dtype = torch.float32 if a.smoke else torch.bfloat16
    x, w, y = step_inputs(a.B, a.C, a.D, dtype, device, requires_grad=True)

    def step():
        x.grad = w.grad = None
        loss = F.arcface_loss(x, w, y, backend="triton", **MV_ARC)
        loss.backward()
        return loss

    for _ in range(2):  # compile the kernels outside the profiled range
        step()
    if a.smoke:
        print(f"step ok, loss {step().item():.4f}")
        return 0
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"profiled one step at B={a.B} C={a.C} D={a.D} bf16 on {torch.cuda.get_device_name()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
