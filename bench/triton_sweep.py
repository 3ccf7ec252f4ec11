"""Time the Triton kernels under a few launch configurations, one shape, to pick the fixed table in
mvloss/triton/_config.py (a quick alternative to MVLOSS_AUTOTUNE=1's full search).  The forward table also sets the
tiles of nothing else; the backward's recompute kernel (backward_gemm) has its own table (dlogits_config).

    python bench/triton_sweep.py --B 1024 --C 100000 --D 512 --dtype bf16 --out sweep.json
    python bench/triton_sweep.py --smoke        # check the script on the CPU (interpreter, tiny shape)
    python bench/triton_sweep.py --best sweep.json > tiles.json   # its fastest tiles, for MVLOSS_TRITON_TILES

Each configuration replaces the table's choice for one kernel (forward, dx or dW) and is timed on the bare kernel
(CUDA events, median).  The first row of each kernel is the table's own choice.  The forward and the recompute
kernel are timed in both of their loop forms (MVLOSS_TRITON_FORWARD = tiles / flat, MVLOSS_TRITON_DLOGITS = tiles /
persistent: the ``mode`` field).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

# Besides the table's own choice (always the first row): tiles that let two or more programs share an SM, so one
# program's epilogue can overlap another's tensor-core work (the table's tiles fit one each at bf16, B = 1024,
# D = 512).  Registers and programs per SM of each: python bench/triton_occupancy.py.
FORWARD = [dict(BLOCK_B=64, BLOCK_C=128, num_warps=4, num_stages=3),   # 2 programs per SM
           dict(BLOCK_B=64, BLOCK_C=128, num_warps=4, num_stages=4),   # 2
           dict(BLOCK_B=128, BLOCK_C=64, num_warps=4, num_stages=3),   # 2
           dict(BLOCK_B=64, BLOCK_C=64, num_warps=4, num_stages=4),    # 3 (shared memory bounds it)
           dict(BLOCK_B=256, BLOCK_C=128, num_warps=8, num_stages=3),  # 6% faster at 100k (run 3); spills on 3.8
           dict(BLOCK_B=256, BLOCK_C=64, num_warps=8, num_stages=3)]   # 1, no spill; W read once per 256 rows
DLOGITS = [dict(BLOCK_B=128, BLOCK_C=128, num_warps=8, num_stages=3),
           dict(BLOCK_B=32, BLOCK_C=128, num_warps=4, num_stages=3),   # 2
           dict(BLOCK_B=64, BLOCK_C=128, num_warps=8, num_stages=4),
           dict(BLOCK_B=64, BLOCK_C=64, num_warps=4, num_stages=3),    # 3
           dict(BLOCK_B=64, BLOCK_C=64, num_warps=4, num_stages=4),    # 3
           dict(BLOCK_B=64, BLOCK_C=128, num_warps=4, num_stages=3),   # 2, but spills (3.8)
           dict(BLOCK_B=64, BLOCK_C=128, num_warps=8, num_stages=3, maxnreg=128),  # the table's, capped: 2
           dict(BLOCK_B=128, BLOCK_C=64, num_warps=8, num_stages=3)]   # the table's transposed: 1, no spill
BACKWARD = [dict(BLOCK_B=64, BLOCK_C=64, BLOCK_DO=128, num_warps=8, num_stages=3),
            dict(BLOCK_B=64, BLOCK_C=64, BLOCK_DO=256, num_warps=8, num_stages=2),
            dict(BLOCK_B=128, BLOCK_C=64, BLOCK_DO=128, num_warps=8, num_stages=2),
            dict(BLOCK_B=64, BLOCK_C=128, BLOCK_DO=128, num_warps=8, num_stages=2)]


# the kernels whose tiles MVLOSS_TRITON_TILES sets, by the sweep's name for them
TILE_KINDS = {"forward": "forward", "backward_gemm": "dlogits"}


def best_tiles(records) -> dict:
    """The fastest configuration of the forward and of the default backward in the default loop form ("tiles"),
    among the sweep's records without an error, in MVLOSS_TRITON_TILES's form: {"forward": {...}, "dlogits": {...}}
    (BLOCK_K is left out: the forward and the backward share it)."""
    from mvloss.triton._config import TILE_KEYS

    best = {}
    for kernel, kind in TILE_KINDS.items():
        rows = [r for r in records if r.get("kernel") == kernel and "ms" in r and r.get("mode", "tiles") == "tiles"]
        if rows:
            fastest = min(rows, key=lambda r: r["ms"])
            best[kind] = {k: fastest[k] for k in TILE_KEYS if k in fastest}
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--B", type=int, default=1024)
    p.add_argument("--C", type=int, default=100_000)
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--modes", nargs="+", choices=("tiles", "alt"), default=["tiles", "alt"],
                   help="loop forms to sweep: tiles (the default one) and alt (flat forward, persistent recompute)")
    p.add_argument("--best", metavar="SWEEP.json", help="print the fastest tiles of a sweep's records as JSON")
    a = p.parse_args(argv)
    if a.best:
        with open(a.best) as f:
            print(json.dumps(best_tiles(json.load(f))))
        return 0
    if a.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        a.B, a.C, a.D, a.dtype = 5, 300, 24, "fp32"
    sys.path.insert(0, os.path.dirname(__file__))
    from triton_gpu_timings import DTYPES, _time, env, step_inputs

    from mvloss.negatives import inverse_norms
    from mvloss.triton import _config, backward_dw, backward_dx, backward_gemm, forward_lse

    device = torch.device("cpu" if a.smoke else "cuda")
    dtype = DTYPES[a.dtype]
    B, C, D = a.B, a.C, a.D
    x, w, y = step_inputs(B, C, D, dtype, device)
    args = (x, w, inverse_norms(x, 1e-12), inverse_norms(w, 1e-12), y, torch.zeros(B, device=device),
            torch.full((B,), 32.0, device=device), None, 2, 0.2, False)
    lse, _ = forward_lse.launch(*args)
    kargs = args[:8] + (lse, torch.ones(B, device=device) / B, torch.zeros(B, device=device), 2, 0.2, False, False)
    warmup, iters = (0, 1) if a.smoke else (2, 7)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)"
    table_fwd, table_bwd = _config.forward_config, _config.backward_config
    bk = _config.k_block(dtype)
    flops = 2.0 * B * C * D
    records = []

    def record(kernel, cfg, fn):
        try:
            ms = _time(fn, device, warmup, iters)
            rec = dict(device=name, kernel=kernel, B=B, C=C, D=D, dtype=a.dtype, ms=ms, tflops=flops / ms / 1e9,
                       **{k: v for k, v in cfg.items()})
        except Exception as exc:  # a configuration out of resources on this device
            rec = dict(device=name, kernel=kernel, error=f"{type(exc).__name__}: {str(exc)[:200]}", **cfg)
        records.append(rec)
        print(json.dumps(rec), flush=True)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(records, f, indent=1)

    def sweep(kernel, table_name, configs, mode_var, modes, fn):
        """Each configuration (None: the table's own) in each loop form --modes asks for (the first of ``modes`` is
        "tiles", the others "alt"), the table restored afterwards."""
        table = getattr(_config, table_name)
        try:
            for mode in modes:
                if ("tiles" if mode == "tiles" else "alt") not in a.modes:
                    continue
                with env(**{mode_var: mode}):
                    for cfg in [None] + configs:
                        setattr(_config, table_name,
                                table if cfg is None else (lambda *_, c=cfg: dict(c, BLOCK_K=bk)))
                        shown = dict(cfg or dict(table(B, D, dtype), table=True), mode=mode)
                        record(kernel, shown, fn)
        finally:
            setattr(_config, table_name, table)

    try:
        sweep("forward", "forward_config", FORWARD, "MVLOSS_TRITON_FORWARD", _config.FORWARD_MODES,
              lambda: forward_lse.launch(*args))
        sweep("backward_gemm", "dlogits_config", DLOGITS, "MVLOSS_TRITON_DLOGITS", _config.DLOGITS_MODES,
              lambda: backward_gemm.launch(*kargs, False))
        if os.environ.get("SWEEP_RECOMPUTE") == "1":
            for kernel, mod in (("dx", backward_dx), ("dw", backward_dw)):
                for cfg in [None] + BACKWARD:
                    if cfg is not None:
                        _config.backward_config = lambda *_, c=cfg: dict(c, BLOCK_K=bk)
                    record(kernel, cfg or dict(table_bwd(kernel, B, D, dtype), table=True),
                           lambda: mod.launch(*kargs))
                    _config.backward_config = table_bwd
    finally:
        _config.forward_config, _config.backward_config = table_fwd, table_bwd
    return 0


if __name__ == "__main__":
    sys.exit(main())
